"""The Evaluator: a trained evaluator network with its task, vocabulary and provenance, saved as
safetensors + JSON.

attnlab ships one per built-in dataset (`Evaluator.load("shapes" | "digits" | "tones")`, trained
by scripts/train_evaluators.py); `attnlab evaluator train` makes one for a folder dataset. A saved
evaluator is two files: `<stem>.json` (task kind, vocabulary, network shape, what it was trained on
and its accuracy on held-out data) and `<stem>.safetensors` (weights stored as float16, which
halves the package size; they are rounded to float16 before the held-out check, so the recorded
accuracy is the shipped network's, and run in float32).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from math import gcd
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from attnlab.errors import CheckpointError, ConfigError
from attnlab.evaluate.network import EvaluatorConfig, EvaluatorNet, FeatureNet
from attnlab.evaluate.tasks import TASKS, Task
from attnlab.io import atomic_path, write_json

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUILTIN = ("shapes", "digits", "tones")
FORMAT = "attnlab-evaluator/1"
STEM = "evaluator"  # file stem inside a user evaluator directory


@dataclass
class Evaluator:
    """A trained evaluator.

    Attributes:
        task: what it predicts (`attnlab.evaluate.tasks`), with its vocabulary.
        net: the network (eval mode).
        info: the JSON config: name, modality, sample_rate (audio), trained_on, metrics.
    """

    task: Task
    net: EvaluatorNet
    info: dict = field(default_factory=dict)

    # Loading and saving

    @classmethod
    def load(cls, name_or_path: str | Path) -> Evaluator:
        """Load a built-in evaluator by dataset name, or a saved one by path.

        Args:
            name_or_path: "shapes", "digits" or "tones"; a directory holding evaluator.json and
                evaluator.safetensors; or the path of either file of a pair.

        Raises:
            CheckpointError: nothing is there, or the files are not an attnlab evaluator.
        """
        config_path = _config_path(name_or_path)
        info = _read_config(config_path)
        weights = config_path.with_suffix(".safetensors")
        if not weights.is_file():
            raise CheckpointError(f"{weights}: evaluator weights missing (beside {config_path.name})")
        try:
            task = TASKS[info["kind"]](info["vocab"], **info.get("options", {}))
            net = EvaluatorNet(EvaluatorConfig.from_dict(info["network"]))
            state = load_file(str(weights))
        except (ConfigError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{config_path}: not a usable evaluator config ({err})") from None
        except Exception as err:  # safetensors raises its own error types for a corrupt file
            raise CheckpointError(f"{weights}: cannot read as safetensors ({err})") from None
        _load_state(net, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, weights)
        return cls(task, net.eval(), info)

    def save(self, stem: str | Path) -> tuple[Path, Path]:
        """Write `<stem>.json` and `<stem>.safetensors` atomically; returns both paths."""
        stem = Path(stem)
        config_path, weights = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
        state = {k: _stored(v) for k, v in self.net.state_dict().items()}
        with atomic_path(weights) as tmp:
            save_file(state, str(tmp))
        info = {
            "format": FORMAT,
            **self.info,
            "kind": self.task.kind,
            "vocab": self.task.vocab,
            "options": self.task.options,
            "network": self.net.cfg.to_dict(),
        }
        write_json(config_path, info)
        return config_path, weights

    # Inference

    @property
    def name(self) -> str:
        return self.info.get("name", self.task.kind)

    @property
    def sample_rate(self) -> int | None:
        return self.info.get("sample_rate")

    def feature_net(self) -> FeatureNet:
        """The (B, num_features) feature module for `fid_kid`."""
        return FeatureNet(self.net).eval()

    @torch.no_grad()
    def outputs(self, x: Tensor, batch_size: int = 256, sample_rate: int | None = None) -> dict[str, Tensor]:
        """Raw head outputs for a batch of samples in [-1, 1], batched to bound memory."""
        x = self.resample(x, sample_rate)
        parts = [self.net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 256, sample_rate: int | None = None) -> list[dict]:
        """Decoded predictions, one dict per sample (objects, notes or a label; see the task)."""
        out = self.outputs(x, batch_size, sample_rate)
        return self.task.decode(out, **self.decode_context())

    def decode_context(self) -> dict:
        if self.net.cfg.dims == 1 and self.sample_rate:
            return {"frame_s": self.net.dense_stride / self.sample_rate}
        return {}

    def resample(self, x: Tensor, sample_rate: int | None) -> Tensor:
        """Audio at `sample_rate` -> audio at the evaluator's rate (images and None pass through)."""
        if self.net.cfg.dims != 1 or sample_rate is None or sample_rate == self.sample_rate:
            return x
        from scipy.signal import resample_poly

        g = gcd(int(sample_rate), int(self.sample_rate))
        y = resample_poly(x.double().numpy(), self.sample_rate // g, sample_rate // g, axis=-1)
        return torch.from_numpy(y).float()


def feature_network(
    evaluator: Evaluator | str | Path, inception: str | Path | None = None
) -> torch.nn.Module:
    """The feature network for FID/KID: local Inception weights when given, else the evaluator's.

    Args:
        evaluator: an Evaluator, or a name/path for `Evaluator.load`.
        inception: path of the pytorch-fid Inception weights (images only).
    """
    ev = evaluator if isinstance(evaluator, Evaluator) else Evaluator.load(evaluator)
    if inception is None:
        return ev.feature_net()
    if ev.net.cfg.dims != 2:
        raise ConfigError(
            f"Inception features are for images; {ev.name!r} data is audio (leave inception unset)"
        )
    from attnlab.evaluate.inception import load_inception

    return load_inception(inception)


def _stored(t: Tensor) -> Tensor:
    return (t.detach().half() if t.is_floating_point() else t.detach()).contiguous()


@torch.no_grad()
def round_to_stored(net: torch.nn.Module) -> None:
    """Round a network's float weights to what `save` stores, so checks see the shipped network."""
    for t in net.state_dict().values():
        if t.is_floating_point():
            t.copy_(t.half().float())


def _config_path(name_or_path: str | Path) -> Path:
    if str(name_or_path) in BUILTIN:
        path = WEIGHTS_DIR / f"{name_or_path}.json"
        if not path.is_file():
            raise CheckpointError(f"built-in evaluator {name_or_path!r} is not installed ({path} missing)")
        return path
    path = Path(name_or_path)
    if path.is_dir():
        path = path / f"{STEM}.json"
    elif path.suffix == ".safetensors":
        path = path.with_suffix(".json")
    if not path.is_file():
        raise CheckpointError(
            f"{name_or_path}: no evaluator here: expected a built-in name ({', '.join(BUILTIN)}), "
            f"a directory with {STEM}.json + {STEM}.safetensors, or one of such a pair"
        )
    return path


def _read_config(path: Path) -> dict:
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: cannot read evaluator config ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        found = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise CheckpointError(
            f"{path}: not an attnlab evaluator config (format {found!r}, expected {FORMAT!r})"
        )
    if info.get("kind") not in TASKS:
        raise CheckpointError(
            f"{path}: unknown evaluator kind {info.get('kind')!r}: expected one of {', '.join(TASKS)}"
        )
    return info


def _load_state(net: EvaluatorNet, state: dict[str, Tensor], path: Path) -> None:
    expected = net.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"shape of {wrong[:3]}"
        )
        raise CheckpointError(f"{path}: weights do not match the network in its JSON config ({detail})")
    net.load_state_dict(state)
