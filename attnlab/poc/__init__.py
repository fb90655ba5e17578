"""Proof of concept: compare attention designs by level on one dataset, at one budget, in one report.

    cfg = load_poc_config("examples/poc-shapes.yaml", ["budget.train_steps=200"])
    results = run_poc(cfg, "runs/poc-shapes")   # report.md, report.html, results.json, results.csv

Each variant is a set of registered techniques: architectural ones are trained into a model,
training-free ones act at sampling time on a trained model. Every variant draws the same prompts
with the same sampling seeds; every metric is reported as mean ± std over the seeds, and the report
says which differences are within that noise. A rerun skips every finished stage.
"""

from attnlab.poc.config import BudgetConfig, PocConfig, SamplingConfig, VariantConfig, load_poc_config
from attnlab.poc.runner import run_poc

__all__ = ["BudgetConfig", "PocConfig", "SamplingConfig", "VariantConfig", "load_poc_config", "run_poc"]
