"""A PoC killed or interrupted resumes to the results of an uninterrupted run, and a rerun after a
config change redoes exactly the stages that depend on the change (read from the stage markers)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from poc_util import BASE, PAG, save_untrained_evaluator, tiny_poc, write_poc

from attnlab.poc import load_poc_config, run_poc

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = tiny_poc(variants=[BASE, PAG], metrics=["fid", "kid", "alignment", "cost"], threads=1)

# Keys of results.json that measure time (or say when), which no two runs share.
TIMING = {"created", "timing", "latency_s", "seconds", "sampling_seconds", "train_seconds", "samples_per_s"}


@pytest.fixture(scope="module")
def evaluator_dir(tmp_path_factory):
    """An untrained shapes evaluator: the numbers are meaningless, the pipeline is the same."""
    return save_untrained_evaluator(tmp_path_factory.mktemp("evaluator"))


def write_config(tmp_path, evaluator_dir, **changes):
    return write_poc(tmp_path, {**TINY, "evaluator": str(evaluator_dir), **changes})


def without_timing(x):
    if isinstance(x, dict):
        return {k: without_timing(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [without_timing(v) for v in x]
    return x


def results(out):
    """results.json without its times; of the summary, the winners that no time decides."""
    found = without_timing(json.loads((out / "results.json").read_text()))
    summary = found.pop("summary")
    return {**found, "summary": {k: summary[k] for k in ("best_quality", "best_alignment")}}


def temporaries(out):
    return sorted(p for p in out.rglob(".*.tmp"))


# Killed and interrupted runs (in a subprocess, as a user runs them)


def poc(config, out) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "attnlab", "poc", str(config), "--out", str(out), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(proc: subprocess.Popen, path, timeout=240.0) -> None:
    """Poll until `path` exists (a stage marker), failing if the run ends or takes too long."""
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"no {path} after {timeout} s"
        time.sleep(0.02)


def finish(proc: subprocess.Popen, timeout=300.0) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=timeout)
    return proc.returncode, stdout, stderr


def test_sigkill_leaves_temporaries_the_rerun_removes_and_resumes_to_the_same_results(
    tmp_path, evaluator_dir
):
    config = write_config(tmp_path, evaluator_dir)
    rc, _, err = finish(poc(config, tmp_path / "whole"))
    assert rc == 0, err
    out = tmp_path / "killed"
    proc = poc(config, out)
    stages = out / "variants" / "base" / "stages"
    wait_for(proc, stages / "sampled-0.json")  # mid-run: trained, seed 0 sampled, seed 0 being scored
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists()
    # What a kill inside a write leaves (atomic_path's names), whether or not this kill hit one.
    (stages / ".evaluated-0.json.k1ll3d.tmp").write_text('{"fingerprint": "half')
    (out / "variants" / "base" / "samples" / ".seed-1.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 10)
    assert temporaries(out)
    rc, stdout, err = finish(poc(config, out))
    assert rc == 0, err
    assert temporaries(out) == []
    assert results(out) == results(tmp_path / "whole")


def test_a_kill_during_the_second_training_seed_resumes_it(tmp_path, evaluator_dir):
    """Training seeds one after another; killed while seed 1 trains, the rerun resumes it from its
    last checkpoint and ends with the results of an uninterrupted run."""
    budget = {**TINY["budget"], "train_steps": 24, "train_processes": 1}
    train = {**TINY["train"], "ckpt_every": 4}
    config = write_config(
        tmp_path, evaluator_dir, train_seeds=[0, 1], budget=budget, train=train, metrics=["fid", "alignment"]
    )
    whole = poc(config, tmp_path / "whole")  # beside the run to kill: the start-ups overlap
    out = tmp_path / "killed"
    proc = poc(config, out)
    seed1 = out / "variants" / "base" / "train-seed-1"
    wait_for(proc, seed1 / "model" / "checkpoints" / "step-0000004")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert (out / "variants" / "base" / "train-seed-0" / "stages" / "trained.json").is_file()
    assert not (seed1 / "stages" / "trained.json").exists()  # killed mid-training of seed 1
    for rc, _, err in (finish(poc(config, out)), finish(whole)):
        assert rc == 0, err
    assert results(out) == results(tmp_path / "whole")


def test_a_killed_poc_takes_its_side_by_side_trainers_with_it(tmp_path, evaluator_dir):
    """SIGKILL of the PoC process cannot be caught; its training processes notice their parent is
    gone and stop, instead of writing into the directories the rerun trains in."""
    budget = {**TINY["budget"], "train_steps": 5000, "train_processes": 2}
    config = write_config(tmp_path, evaluator_dir, train_seeds=[0, 1], budget=budget, metrics=["cost"])
    out = tmp_path / "out"
    proc = poc(config, out)
    logs = [out / "variants" / "base" / f"train-seed-{t}" / "model" / "log.jsonl" for t in (0, 1)]
    for log in logs:
        wait_for(proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()  # not communicate(): live trainers would hold its pipes open for their 5000 steps
    time.sleep(2.0)  # the trainers look for their parent every 0.5 s
    sizes = [log.stat().st_size for log in logs]
    time.sleep(1.5)
    assert [log.stat().st_size for log in logs] == sizes  # log_every 1: a live trainer grows its log
    proc.communicate(timeout=30)


@pytest.mark.slow  # timing-dependent: a SIGINT that lands inside a finaliser is reported by Python itself
def test_ctrl_c_exits_130_with_one_line(tmp_path, evaluator_dir):
    config = write_config(tmp_path, evaluator_dir)
    out = tmp_path / "out"
    proc = poc(config, out)
    wait_for(proc, out / "variants" / "base" / "stages" / "trained.json")
    proc.send_signal(signal.SIGINT)
    rc, _, err = finish(proc)
    assert rc == 130
    assert err.splitlines() == [  # no blank line before it, nothing after
        f"interrupted: finished stages are kept in {out}; rerun the same command to resume"
    ]
    assert (out / "variants" / "base" / "stages" / "trained.json").is_file() and temporaries(out) == []


# A rerun after a config change: which stage markers were written again


@pytest.fixture(scope="module")
def finished(tmp_path_factory, evaluator_dir, one_thread):
    tmp = tmp_path_factory.mktemp("poc")
    out = tmp / "out"
    run_poc(load_poc_config(write_config(tmp, evaluator_dir)), out, progress=False, echo=lambda line: None)
    return out


def markers(out) -> dict:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("stages/*.json")}


def rerun_after(finished, tmp_path, evaluator_dir, **changes) -> set[str]:
    """The stage markers a rerun of the finished PoC with `changes` wrote (rewritten or new)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "out"
    shutil.copytree(finished, out)  # copies keep their mtimes
    before = markers(out)
    cfg = load_poc_config(write_config(tmp_path, evaluator_dir, **changes))
    run_poc(cfg, out, progress=False, echo=lambda line: None)
    return {p for p, t in markers(out).items() if before.get(p) != t}


def per_variant(name, *stages):
    return {f"variants/{name}/stages/{s}.json" for s in stages}


SEEDS = TINY["seeds"]
EVALUATED = tuple(f"evaluated-{s}" for s in SEEDS)
SAMPLED = (*(f"sampled-{s}" for s in SEEDS), *EVALUATED, "cost")
REAL = {f"stages/real-data-{s}.json" for s in SEEDS}
REPORT = {"stages/report.json"}


def test_finished_run_has_the_markers_these_tests_read(finished):
    expected = per_variant("base", "trained", "heatmaps", *SAMPLED) | per_variant("pag", *SAMPLED)
    assert set(markers(finished)) == expected | REAL | REPORT


def test_one_variants_option_redoes_that_variant_only(finished, tmp_path, evaluator_dir):
    variants = [TINY["variants"][0], {**TINY["variants"][1], "techniques": {"pag": {"scale": 3.0}}}]
    assert (
        rerun_after(finished, tmp_path, evaluator_dir, variants=variants)
        == per_variant("pag", *SAMPLED) | REPORT
    )


def test_sampling_steps_redraw_every_sample_and_train_nothing(finished, tmp_path, evaluator_dir):
    budget = {**TINY["budget"], "sample_steps": 3}
    redone = rerun_after(finished, tmp_path, evaluator_dir, budget=budget)
    assert redone == per_variant("base", "heatmaps", *SAMPLED) | per_variant("pag", *SAMPLED) | REPORT


def test_dropping_a_metric_redoes_only_what_computes_it(finished, tmp_path, evaluator_dir):
    no_cost = [m for m in TINY["metrics"] if m != "cost"]
    assert rerun_after(finished, tmp_path / "a", evaluator_dir, metrics=no_cost) == REPORT
    no_kid = [m for m in TINY["metrics"] if m != "kid"]
    scored = per_variant("base", *EVALUATED) | per_variant("pag", *EVALUATED)
    assert rerun_after(finished, tmp_path / "b", evaluator_dir, metrics=no_kid) == scored | REAL | REPORT


def test_other_data_redoes_everything(finished, tmp_path, evaluator_dir):
    data = {**TINY["data"], "num": 40}
    assert rerun_after(finished, tmp_path, evaluator_dir, data=data) == set(markers(finished))
