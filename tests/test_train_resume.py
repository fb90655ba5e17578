"""Resume: a run killed (even mid-save) and rerun ends bit-identical to an uninterrupted run."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from models_util import TINY_RUN, run_torchrun, torchrun_train
from safetensors.torch import load_file

from attnlab.config import load_config
from attnlab.train import latest_checkpoint, load_model, train
from attnlab.train.log import read_log

TINY = [
    *TINY_RUN,
    "train.steps=8",
    "train.warmup=2",
    "train.log_every=2",
    "train.ckpt_every=4",
]

# Kills its own process (SIGKILL, no clean-up) right after ema.safetensors of checkpoint 8 is written.
KILL_MID_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import attnlab.train.checkpoint as ck
    real = ck.save_file
    def save_then_die(tensors, path, *a, **k):
        real(tensors, path, *a, **k)
        if "tmp-step-0000008" in str(path) and str(path).endswith("ema.safetensors"):
            os.kill(os.getpid(), signal.SIGKILL)
    ck.save_file = save_then_die
    from attnlab.config import load_config
    from attnlab.train import train
    train(load_config(None, sys.argv[2:]), sys.argv[1])
    """
)


def _weights(ckpt: Path, name="model.safetensors"):
    return load_file(ckpt / name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(load_config(None, TINY), out)
    return out


def test_kill_mid_save_then_resume_is_bit_identical(uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", KILL_MID_SAVE, str(run), *TINY],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # one thread, as the reference run in this process
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    # the half-written checkpoint is never taken for a good one
    partial = list((run / "checkpoints").glob(".tmp-step-0000008-*"))
    assert len(partial) == 1 and (partial[0] / "ema.safetensors").exists()
    assert latest_checkpoint(run).name == "step-0000004"
    model, _ = load_model(run, ema=False)
    ref4 = _weights(uninterrupted / "checkpoints" / "step-0000004")
    assert all(torch.equal(v, ref4[k]) for k, v in model.state_dict().items())
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [2, 4, 6, 8]  # logged past the checkpoint

    train(load_config(None, TINY), run)  # the same command again resumes from step 4

    assert not list((run / "checkpoints").glob(".tmp-*"))
    a, b = read_log(uninterrupted / "log.jsonl"), read_log(run / "log.jsonl")
    assert [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]
    assert b[-1]["wall"] > b[1]["wall"]  # wall time continues across the restart
    for name in ("model.safetensors", "ema.safetensors"):
        ref, got = _weights(latest_checkpoint(uninterrupted), name), _weights(latest_checkpoint(run), name)
        assert all(torch.equal(ref[k], got[k]) for k in ref), name


def test_rerun_of_a_finished_run_changes_nothing(uninterrupted):
    before = (latest_checkpoint(uninterrupted) / "model.safetensors").read_bytes()
    log_before = (uninterrupted / "log.jsonl").read_text()
    train(load_config(None, TINY), uninterrupted)
    assert (latest_checkpoint(uninterrupted) / "model.safetensors").read_bytes() == before
    assert (uninterrupted / "log.jsonl").read_text() == log_before


def test_resume_with_a_longer_schedule_continues(uninterrupted, tmp_path):
    import shutil

    run = tmp_path / "longer"
    shutil.copytree(uninterrupted, run)
    train(load_config(None, [*TINY, "train.steps=10"]), run)
    assert [r["step"] for r in read_log(run / "log.jsonl")] == [2, 4, 6, 8, 10]
    assert latest_checkpoint(run).name == "step-0000010"


def test_resume_with_another_model_is_refused(uninterrupted, tmp_path):
    import shutil

    from attnlab.errors import ConfigError

    run = tmp_path / "other"
    shutil.copytree(uninterrupted, run)
    with pytest.raises(ConfigError, match="model.width"):
        train(load_config(None, [*TINY, "model.width=32"]), run)


def test_resume_with_another_process_count_is_refused(uninterrupted, tmp_path):
    """Batches are drawn per (seed, step, process): a run checkpointed by 2 processes cannot be resumed
    bit-identically by 1, so it is refused with a message naming both counts."""
    import json
    import shutil

    from attnlab.errors import ConfigError

    run = tmp_path / "world"
    shutil.copytree(uninterrupted, run)
    state_file = latest_checkpoint(run) / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["processes"] == 1
    state_file.write_text(json.dumps({**state, "processes": 2}))
    with pytest.raises(ConfigError, match=r"trained with 2 process\(es\) but this run has 1"):
        train(load_config(None, [*TINY, "train.steps=10"]), run)
    assert latest_checkpoint(run).name == "step-0000008"  # nothing trained


def test_two_processes_train_with_gloo(tmp_path):
    """torchrun with 2 CPU processes: one world, one log line per window, loadable result."""
    run = tmp_path / "ddp"
    config = tmp_path / "tiny.yaml"
    config.write_text("train:\n  progress: false\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = torchrun_train(config, run, [*TINY, "train.steps=4"], 2)
    proc = run_torchrun(cmd, env, run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read_log(run / "log.jsonl")
    assert [r["step"] for r in log] == [2, 4]  # written once, by the main process
    state = (latest_checkpoint(run) / "trainer_state.json").read_text()
    assert '"processes": 2' in state
    model, cfg = load_model(run)
    assert cfg.train.batch_size == 8 and sum(p.numel() for p in model.parameters()) > 0
