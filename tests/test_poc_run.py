"""The PoC end to end at a tiny budget: every table and file of the report, a rerun that does no work
twice, and an interrupted run that keeps what it finished and resumes."""

import copy
import json
import shutil

import pytest
import torch
import yaml
from poc_util import ATTN16, BASE, PAG, load_poc, report_mismatches, save_untrained_evaluator, tiny_poc

import attnlab.poc.sampling as poc_sampling
import attnlab.poc.training as poc_training
from attnlab.evaluate import Evaluator
from attnlab.evaluate.network import EvaluatorNet
from attnlab.poc import load_poc_config, run_poc

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = tiny_poc(
    variants=[BASE, {**ATTN16, "note": "attention at 16 px too"}, PAG],
    metrics=["fid", "kid", "alignment", "cost", "localisation"],
)


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory):
    """An untrained shapes evaluator: the numbers are meaningless, the pipeline is the same."""
    return save_untrained_evaluator(tmp_path_factory.mktemp("evaluator"))


def tiny_config(tmp_path, evaluator_dir, **changes):
    return load_poc(tmp_path, {**TINY, "evaluator": str(evaluator_dir), **changes})


class Counter:
    """Wraps a function and counts its calls; `fail_at` raises KeyboardInterrupt at that call."""

    def __init__(self, fn, fail_at=None):
        self.fn, self.calls, self.fail_at = fn, 0, fail_at

    def __call__(self, *a, **k):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.fn(*a, **k)


@pytest.fixture
def counted(monkeypatch):
    def install(fail_at=None):
        train = Counter(poc_training.train)
        sample = Counter(poc_sampling.generate, fail_at)
        monkeypatch.setattr(poc_training, "train", train)
        monkeypatch.setattr(poc_sampling, "generate", sample)
        return train, sample

    return install


@pytest.fixture(scope="module")
def finished(tmp_path_factory, evaluator_dir, one_thread):
    tmp = tmp_path_factory.mktemp("poc")
    cfg = tiny_config(tmp, evaluator_dir)
    out = tmp / "out"
    results = run_poc(cfg, out, progress=False, echo=lambda line: None)
    return cfg, out, results


def test_report_holds_every_table_and_figure(finished):
    _, out, _ = finished
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    sections = ["## Summary", "## Variants", "## Quality", "## Condition alignment", "## Cost"]
    sections += [
        "## Quality versus cost",
        "## Training loss",
        "## Samples",
        "## Heat maps",
        "## How this was measured",
    ]
    for s in sections:
        assert s in md, s
        assert f"<h2>{s[3:]}</h2>" in html, s
    assert md.index("## Summary") < md.index("## Variants")  # the report opens with the summary
    for phrase in (
        "Best quality",
        "Best condition alignment",
        "Lowest cost",
        "Within noise",
        "Recommendation (quality)",
    ):
        assert phrase in md, phrase
    for header in (
        "| variant | FID | KID |",
        "all asked right",
        "latency per sample",
        "FLOPs per denoiser call",
        "heat-map IoU (shape words)",
        "A map that says nothing (all ones) scores",
    ):
        assert header in md, header
    assert "L2 · internal" in md and "L5 · output" in md  # rows grouped by level
    assert "± " in md  # spreads over seeds


def test_html_is_self_contained(finished):
    _, out, _ = finished
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 6  # trade-off, loss, side by side, 3 grids, heat maps
    assert "src='http" not in html and 'src="http' not in html and "<link" not in html
    assert "src='figures" not in html


def test_results_json_and_csv(finished):
    cfg, out, results = finished
    data = json.loads((out / "results.json").read_text())
    assert set(data) >= {
        "summary",
        "variants",
        "comparisons",
        "seeds",
        "prompts",
        "config",
        "timing",
        "heatmaps",
    }
    names = [v["name"] for v in data["variants"]]
    assert names == ["base", "attn16", "pag"]
    for v in data["variants"]:
        assert list(v["per_train_seed"]) == ["0"] and set(v["per_train_seed"]["0"]) == {"0", "1", "2"}
        for key in ("fid", "kid_mean", "all_correct", "latency_s"):
            stat = v["metrics"][key]
            assert len(stat["values"]) == 3 and stat["std"] >= 0
        for key in ("params", "flops_per_call", "flops_per_sample", "peak_mem_bytes", "train_seconds"):
            assert key in v["metrics"], key
    by_name = {v["name"]: v for v in data["variants"]}
    assert by_name["pag"]["trained_by"] == "base" and by_name["attn16"]["trained_by"] == "attn16"
    assert by_name["pag"]["levels"] == [5] and by_name["attn16"]["levels"] == [2]
    # PAG adds a perturbed pass per step: more FLOPs per sample on the same model
    assert (
        by_name["pag"]["metrics"]["flops_per_sample"]["mean"]
        > by_name["base"]["metrics"]["flops_per_sample"]["mean"]
    )
    assert by_name["pag"]["metrics"]["params"] == by_name["base"]["metrics"]["params"]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("variant,levels,techniques,trained_by,train_seed,seed,fid,kid_mean")
    assert len(csv_lines) == 1 + 3 * 3  # a row per variant and sampling seed
    assert data["summary"]["best_quality"]["variant"] in names
    # every number of report.md's tables is the mean ± std (ddof=1) with numpy over results.json's per_train_seed
    checked, bad = report_mismatches((out / "report.md").read_text(), data)
    assert checked >= 3 * (2 + 6 + 7) and bad == []


def test_rerun_does_no_work_twice(finished, counted):
    cfg, out, _ = finished
    markers = {p: p.stat().st_mtime_ns for p in out.rglob("stages/*.json")}
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    train, sample = counted()
    lines = []
    run_poc(cfg, out, progress=False, echo=lines.append)
    assert train.calls == 0 and sample.calls == 0
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing rewritten, report included
    per_variant = [p for p in markers if "variants" in p.parts]
    assert sum("done before, kept" in line for line in lines) == len(per_variant) + 2  # + real data, report


def test_more_sampling_seeds_only_add_work(finished, counted, evaluator_dir, tmp_path):
    # on copies: the other tests read the finished run with its three seeds, in any order
    cfg, out = copy.deepcopy(finished[0]), tmp_path / "out"
    shutil.copytree(finished[1], out)
    cfg.seeds = [0, 1, 2, 3]
    train, sample = counted()
    results = run_poc(cfg, out, progress=False, echo=lambda line: None)
    assert train.calls == 0
    assert sample.calls == 3  # seed 3 of each variant; training, cost and other seeds are kept
    assert all(len(v["per_train_seed"]["0"]) == 4 for v in results["variants"])


def test_interrupt_keeps_finished_stages_and_resumes(tmp_path, evaluator_dir, counted):
    cfg = tiny_config(tmp_path, evaluator_dir, variants=TINY["variants"][:1])
    out = tmp_path / "out"
    train, sample = counted(fail_at=3)  # Ctrl-C while drawing the third seed
    with pytest.raises(KeyboardInterrupt):
        run_poc(cfg, out, progress=False, echo=lambda line: None)
    stages = out / "variants" / "base" / "stages"
    assert {p.name for p in stages.iterdir()} == {
        "trained.json",
        "sampled-0.json",
        "evaluated-0.json",
        "sampled-1.json",
        "evaluated-1.json",
        "localised-0.json",
        "localised-1.json",
    }
    assert not list(out.rglob("*.tmp")) and not (out / "report.md").exists()
    train, sample = counted()
    run_poc(cfg, out, progress=False, echo=lambda line: None)
    assert train.calls == 0  # the trained model was kept
    assert sample.calls == 1 + 2  # seed 2, then the cost stage's two runs (FLOPs, peak memory)
    assert (out / "report.html").is_file()


def test_a_missing_evaluator_stops_before_any_training(tmp_path, counted):
    from attnlab.errors import CheckpointError

    cfg = tiny_config(tmp_path, tmp_path / "no-evaluator")
    train, _ = counted()
    with pytest.raises(CheckpointError, match="no-evaluator"):
        run_poc(cfg, tmp_path / "out", progress=False, echo=lambda line: None)
    assert train.calls == 0 and not (tmp_path / "out" / "variants").exists()


def test_audio_with_class_labels(tmp_path):
    """1D data and a class-conditioned model: label prompts, spectrogram figures, WAVs in the page."""
    from attnlab.evaluate.tasks import TonesTask

    torch.manual_seed(0)
    task = TonesTask()
    Evaluator(task, EvaluatorNet(task.network(1, 1)).eval(), {"name": "untrained", "sample_rate": 8000}).save(
        tmp_path / "ev" / "evaluator"
    )
    model = {
        "cond": "class",
        "width": 16,
        "channel_mult": [1, 2],
        "attn_resolutions": [512],
        "heads": 2,
        "norm_groups": 4,
    }
    path = tmp_path / "poc.yaml"
    cfg = {
        **TINY,
        "data": {"name": "tones", "size": 1024, "num": 32, "num_eval": 16},
        "model": model,
        "variants": [{"name": "base"}, {"name": "pag", "base": "base", "techniques": {"pag": {}}}],
        "evaluator": str(tmp_path / "ev"),
        "metrics": ["fid", "kid", "alignment", "cost"],
    }
    path.write_text(yaml.safe_dump(cfg))
    lines = []
    results = run_poc(load_poc_config(path), tmp_path / "out", progress=False, echo=lines.append)
    assert any("heat maps (the model reads no text): not applicable" in line for line in lines)
    from attnlab.data.tones import NOTES, WAVEFORMS

    assert all(p.split()[0] in WAVEFORMS and p.split()[1] in NOTES for p in results["prompts"])  # class names
    base = results["variants"][0]
    assert {"pitch_acc", "waveform_acc", "fid"} <= set(base["metrics"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert html.count("data:audio/wav;base64,") == 2 and "spectrograms in columns" in html


@pytest.fixture
def timed(monkeypatch):
    """A training step "takes" 0.25 s, so a minutes budget gives the same steps on any machine."""
    monkeypatch.setattr(poc_training, "seconds_per_step", lambda rc, data: 0.25)


def test_minutes_budget_is_resolved_once_and_cost_needs_no_evaluator(tmp_path, counted, timed):
    cfg = tiny_config(tmp_path, tmp_path / "no-evaluator", variants=TINY["variants"][:1], metrics=["cost"])
    cfg.budget.train_steps, cfg.budget.train_minutes = None, 0.01
    train, _ = counted()
    results = run_poc(cfg, tmp_path / "out", progress=False, echo=lambda line: None)
    budget = json.loads((tmp_path / "out" / "variants" / "base" / "stages" / "budget.json").read_text())
    assert budget["seconds_per_step"] == 0.25 and budget["steps"] == 2  # int(0.6 s / 0.25 s)
    assert results["variants"][0]["train"]["0"]["train_steps"] == budget["steps"] and train.calls == 1
    assert "fid" not in results["variants"][0]["metrics"] and "latency_s" in results["variants"][0]["metrics"]
    run_poc(cfg, tmp_path / "out", progress=False, echo=lambda line: None)
    assert train.calls == 1  # the rerun keeps the resolved steps: nothing to train


def test_side_by_side_training_gives_the_same_models(tmp_path, evaluator_dir):
    """Models trained at once in single-threaded processes equal those trained one after another."""
    from safetensors.torch import load_file

    from attnlab.train.checkpoint import latest_checkpoint

    small = {**TINY, "variants": TINY["variants"][:2], "metrics": ["cost"]}
    weights = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        cfg = tiny_config(tmp_path, evaluator_dir, **small)
        cfg.budget.train_processes = processes
        cfg.threads = 1  # one thread in every process, whatever os.cpu_count() says
        lines = []
        run_poc(cfg, out, progress=False, echo=lines.append)
        assert any("side by side: 2 processes" in line for line in lines) == (processes == 2)
        for name in ("base", "attn16"):
            ckpt = latest_checkpoint(out / "variants" / name / "model")
            weights[processes, name] = load_file(ckpt / "model.safetensors")
    for name in ("base", "attn16"):
        a, b = weights[1, name], weights[2, name]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_minutes_budget_counts_models_sharing_the_cores(tmp_path, evaluator_dir, timed):
    """Three models side by side on 2 cores: each step is timed on one thread and counted 1.5x
    slower, so they still finish in about the minutes asked."""
    third = {"name": "attn8", "model": {"heads": 4}, "level": 2}
    cfg = tiny_config(tmp_path, evaluator_dir, variants=[*TINY["variants"][:2], third], metrics=["cost"])
    cfg.budget.train_steps, cfg.budget.train_minutes, cfg.threads = None, 0.01, 2
    run_poc(cfg, tmp_path / "out", progress=False, echo=lambda line: None)
    for name in ("base", "attn16", "attn8"):
        budget = json.loads((tmp_path / "out" / "variants" / name / "stages" / "budget.json").read_text())
        assert budget["threads"] == 1 and budget["slowdown"] == 1.5
        assert budget["seconds_per_step"] == 0.375 and budget["steps"] == 1  # int(0.6 s / (1.5 * 0.25 s))


def test_training_seeds_train_every_model_once_per_seed(finished, tmp_path, evaluator_dir):
    """train_seeds [0, 1]: each trained variant trains twice, the training-free one samples both of
    its base's models, and training seed 0 is the single-seed run's model bit for bit."""
    from safetensors.torch import load_file

    from attnlab.poc.sampling import load_samples
    from attnlab.poc.stages import variant_dirs
    from attnlab.train.checkpoint import latest_checkpoint

    cfg = tiny_config(tmp_path, evaluator_dir, train_seeds=[0, 1], metrics=["fid", "alignment", "cost"])
    cfg.threads = 1
    out = tmp_path / "out"
    lines = []
    results = run_poc(cfg, out, progress=False, echo=lines.append)
    assert any("base (training seed 1)" in line for line in lines)

    def weights(root, name, seed=None):
        ckpt = latest_checkpoint(variant_dirs(root, name, seed).model)
        return load_file(ckpt / "model.safetensors")

    single = weights(finished[1], "base")  # the single-seed run: train.seed 0, variants/base/model
    for name in ("base", "attn16"):
        w0, w1 = weights(out, name, 0), weights(out, name, 1)
        assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # another seed, another model
    w0 = weights(out, "base", 0)
    assert all(torch.equal(w0[k], single[k]) for k in single)
    assert not (out / "variants" / "pag" / "train-seed-0" / "model").exists()  # pag trains nothing
    pag = [load_samples(variant_dirs(out, "pag", t), 0) for t in (0, 1)]
    assert not torch.equal(*pag)  # the same noise through the two seeds' base models
    data = json.loads((out / "results.json").read_text())
    assert data["train_seeds"] == [0, 1] and data["summary"]["noise"]["rule"] == "two seeds"
    for v in data["variants"]:
        assert v["train_seeds"] == [0, 1] and set(v["per_train_seed"]) == {"0", "1"}
        assert all(set(by) == {"0", "1", "2"} for by in v["per_train_seed"].values())
        assert v["metrics"]["fid"]["by_train_seed"] and len(v["metrics"]["fid"]["values"]) == 2
    checked, bad = report_mismatches((out / "report.md").read_text(), data)
    assert checked >= 3 * (2 + 2 + 2) and bad == []
    assert len((out / "results.csv").read_text().splitlines()) == 1 + 3 * 2 * 3
    md = (out / "report.md").read_text()
    assert "both training seeds' differences have the same sign" in md and "**Unreplicated:**" not in md
    assert results["summary"] == data["summary"]
