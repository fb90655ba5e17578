"""Model directories and checkpoints: JSON config + safetensors weights, written whole or not at all.

A run directory holds `checkpoints/step-NNNNNNN/` model directories and a `checkpoints/latest`
pointer. A checkpoint is written into a hidden temporary directory, flushed to disk, and only then
renamed into place; the pointer moves after the rename. A kill mid-save leaves at most a hidden
temporary directory, which is never taken for a checkpoint and is removed by the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from attnlab.config import RunConfig
from attnlab.errors import AttnlabError, CheckpointError
from attnlab.io import write_text

CHECKPOINTS, LATEST = "checkpoints", "latest"
CONFIG, MODEL, EMA_WEIGHTS, OPTIMIZER, STATE = (
    "config.json",
    "model.safetensors",
    "ema.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
)


# Writing


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    cfg: RunConfig,
    model: nn.Module,
    ema: dict[str, Tensor] | None,
    optimizer_state: dict | None,
    trainer_state: dict,
    keep: int = 2,
) -> Path:
    """Write checkpoint `step` under `run_dir/checkpoints` atomically and point `latest` at it.

    Args:
        model: the unwrapped model.
        ema: the EMA weights (state-dict shaped) or None.
        optimizer_state: `optimizer.state_dict()` or None.
        trainer_state: JSON-able resume state (step, log offset, ...).
        keep: how many checkpoints to keep.
    Returns:
        The checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:07d}-", dir=root))
    try:
        (tmp / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        save_file(_plain(model.state_dict()), tmp / MODEL)
        if ema is not None:
            save_file(_plain(ema), tmp / EMA_WEIGHTS)
        if hasattr(model, "export_diffusers"):  # a diffusers backbone: also a diffusers model folder
            model.export_diffusers(tmp / "diffusers", _plain(ema if ema is not None else model.state_dict()))
        if optimizer_state is not None:
            tensors, groups = _flatten_optimizer(optimizer_state)
            save_file(tensors, tmp / OPTIMIZER, metadata={"param_groups": json.dumps(groups)})
        (tmp / STATE).write_text(json.dumps({"step": step, **trainer_state}, indent=2) + "\n")
        _fsync_files(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
        final = root / f"step-{step:07d}"
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)  # the atomic step: the directory appears complete or not at all
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_text(root / LATEST, final.name + "\n")
    _prune(root, keep, final)
    return final


def _plain(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def _flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], list]:
    tensors = {
        f"{i}.{k}": v.detach().cpu().contiguous().clone()
        for i, s in state["state"].items()
        for k, v in s.items()
    }
    return tensors, state["param_groups"]


def _fsync_files(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int, current: Path) -> None:
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        if old != current:
            shutil.rmtree(old, ignore_errors=True)


def remove_partial(run_dir: str | Path) -> int:
    """Remove temporary directories left by a save that was killed; returns how many."""
    stale = list((Path(run_dir) / CHECKPOINTS).glob(".tmp-step-*"))
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return len(stale)


# Finding


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (the `latest` pointer, else the highest step)."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / MODEL).is_file() and (target / STATE).is_file():
            return target
    done = sorted(p for p in root.glob("step-*") if (p / MODEL).is_file() and (p / STATE).is_file())
    return done[-1] if done else None


def model_dir(path: str | Path) -> Path:
    """Resolve a model directory: a checkpoint itself, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such model directory")
    if (path / MODEL).is_file() or (path / CONFIG).is_file() and not (path / CHECKPOINTS).is_dir():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(
            f"{path}: not a model directory (no {MODEL}, no complete checkpoint in {CHECKPOINTS}/)"
        )
    return found


# Reading


def read_config(path: str | Path) -> RunConfig:
    """The RunConfig of a model directory's config.json."""
    file = Path(path) / CONFIG
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (a model directory holds {CONFIG} and {MODEL})")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object with data, model, diffusion, train sections")
    try:
        return RunConfig.from_dict(data, source=str(file))
    except AttnlabError as e:
        raise CheckpointError(str(e)) from None


def load_weights(model: nn.Module, file: str | Path) -> None:
    """Load a safetensors file into `model`, every key and shape checked."""
    state = read_tensors(file)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{file}: does not fit the model: missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if v.shape != state[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{file}: shape mismatch with the model (file vs model): {_few(wrong)}")
    model.load_state_dict(state)


def read_tensors(file: str | Path) -> dict[str, Tensor]:
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


def read_optimizer_state(file: str | Path) -> dict:
    """`optimizer.state_dict()` back from its safetensors file."""
    tensors = read_tensors(file)
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        groups = json.loads((f.metadata() or {}).get("param_groups", "null"))
    if groups is None:
        raise CheckpointError(f"{file}: no param_groups metadata")
    state: dict[int, dict[str, Tensor]] = {}
    for key, v in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = v
    return {"state": state, "param_groups": groups}


def read_trainer_state(ckpt: str | Path) -> dict:
    file = Path(ckpt) / STATE
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable trainer state ({e})") from None


def load_model(path: str | Path, ema: bool = True, device: str = "cpu") -> tuple[nn.Module, RunConfig]:
    """Build the model of a model directory and load its weights, in one call.

    Args:
        path: a checkpoint directory or a run directory (its latest checkpoint is used).
        ema: load the EMA weights (the ones to sample with) rather than the raw ones.
        device: where to put the model.
    Returns:
        (model in eval mode, its RunConfig).
    Raises:
        CheckpointError: naming the missing, unreadable or mismatching file.
    """
    from attnlab.models import build_model

    d = model_dir(path)
    cfg = read_config(d)
    model = build_model(cfg.model)
    load_weights(model, weights_file(d, ema))
    return model.to(device).eval(), cfg


def weights_file(path: str | Path, ema: bool = True) -> Path:
    d = model_dir(path)
    file = d / (EMA_WEIGHTS if ema else MODEL)
    if not file.is_file():
        hint = " (the run kept no EMA; load with ema=False / --no-ema)" if ema else ""
        raise CheckpointError(f"{file}: missing{hint}")
    return file


def file_sha256(file: str | Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _few(items: list[str], n: int = 4) -> str:
    if not items:
        return "none"
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more
