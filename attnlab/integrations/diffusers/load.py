"""Local diffusers pipeline folders, loaded safely (local files only, safetensors only), sampled
with attnlab's controls installed through the host, and described for each sample's provenance."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

import attnlab
from attnlab.errors import CheckpointError, ConfigError

# The text-to-image pipeline classes attnlab samples, by family.
PIPELINES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
}
PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PIXART_BINS = (32, 64, 128, 256)  # the transformer sample sizes PixArt's resolution binning knows


# The folder


def read_index(folder: str | Path) -> dict:
    """The folder's model_index.json, checked: a known pipeline class, every component's folder
    present, and every model's weights in safetensors.

    Raises:
        CheckpointError: naming the folder, file or component at fault.
    """
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not folder.is_dir():
        raise CheckpointError(f"--pipeline {folder}: no such folder")
    if not index_file.is_file():
        raise CheckpointError(
            f"--pipeline {folder}: not a diffusers pipeline folder (no model_index.json); "
            "single-file checkpoints are not supported, save the pipeline with save_pretrained"
        )
    try:
        index = json.loads(index_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index_file}: not valid JSON ({e})") from None
    name = index.get("_class_name") if isinstance(index, dict) else None
    _check_class(index_file, name)
    for comp in components(index):
        _check_component(folder, comp, index[comp])
    return index


def _check_class(index_file: Path, name) -> None:
    import diffusers

    if name in PIPELINES:
        return
    known = ", ".join(sorted(PIPELINES))
    if not isinstance(name, str) or not hasattr(diffusers, name):
        raise CheckpointError(f"{index_file}: unknown pipeline class {name!r}; attnlab samples {known}")
    raise CheckpointError(f"{index_file}: pipeline class {name!r} is not supported; attnlab samples {known}")


def components(index: dict) -> list[str]:
    """The components model_index.json names with a library and class (not the null ones)."""
    return [
        k
        for k, v in index.items()
        if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and None not in v
    ]


def _check_component(folder: Path, comp: str, spec: list) -> None:
    path = folder / comp
    if not path.is_dir():
        raise CheckpointError(
            f"--pipeline {folder}: component {comp!r} ({spec[1]}) is listed in model_index.json "
            f"but has no folder {path}"
        )
    files = [p for p in path.rglob("*") if p.is_file()]
    if any(p.suffix == ".safetensors" for p in files):
        return
    pickled = sorted(p for p in files if p.suffix in PICKLED)
    if pickled:
        raise CheckpointError(
            f"--pipeline {folder}: {pickled[0]} holds pickled weights, which can run code when loaded; "
            "attnlab loads safetensors only (convert them, e.g. load and save_pretrained with "
            "safe_serialization=True, in a session you trust)"
        )


def folder_family(folder: str | Path) -> str:
    """The family of the pipeline a folder holds, read off its model_index.json (no weights loaded)."""
    return PIPELINES[read_index(folder)["_class_name"]]


def weights_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every safetensors file of the pipeline's components, by path inside the folder
    (read in 1 MiB blocks, so a 10 GB pipeline is not held in memory)."""
    from attnlab.train.checkpoint import file_sha256

    folder = Path(folder)
    index = read_index(folder)
    files = sorted(p for comp in components(index) for p in (folder / comp).rglob("*.safetensors"))
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in files}


# Loading


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No per-component loading bars from diffusers and transformers for the block (a command's
    output is its own progress and its one-line errors)."""
    from diffusers.utils import logging as dl
    from transformers.utils import logging as tl

    was = dl.is_progress_bar_enabled(), tl.is_progress_bar_enabled()
    dl.disable_progress_bar()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dl.enable_progress_bar()
        if was[1]:
            tl.enable_progress_bar()


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """HF_HUB_OFFLINE=1 for the block, in the environment and in huggingface_hub's constant
    (read once at import), so nothing can reach a hub."""
    import huggingface_hub.constants as hub

    old_env, old_const = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def check_device(device: str) -> torch.device:
    """The torch device `device` names, if this machine has it.

    Raises:
        ConfigError: not a device name, or CUDA asked for where there is none.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def load_pipeline(folder: str | Path, precision: str = "fp32", device: str = "cpu"):
    """A diffusers pipeline from a local folder, its weights in `precision` on `device`.

    Args:
        folder: a folder written by `save_pretrained` (model_index.json and one folder per component).
        precision: fp32, bf16, fp16 or auto (`attnlab.precision.resolve`); the weights are loaded in it.
        device: where the pipeline runs (cpu, cuda, cuda:N).
    Returns:
        The pipeline, with `attnlab_precision` (the resolved precision) set on it.
    Raises:
        CheckpointError: not a pipeline folder, an unknown or unsupported class, a missing component
            folder, pickled weights, or weights diffusers cannot load.
        ConfigError: a bad precision or device.
    """
    from diffusers import DiffusionPipeline

    from attnlab.precision import DTYPES, resolve

    folder = Path(folder)
    read_index(folder)
    dev = check_device(device)
    precision = resolve(precision, dev, "--precision")
    try:
        with offline(), quiet_loading():
            pipe = DiffusionPipeline.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, dtype=DTYPES[precision]
            )
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"--pipeline {folder}: diffusers cannot load it ({first})") from None
    pipe.to(dev)
    pipe.attnlab_precision = precision
    return pipe


def denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


def family(pipe) -> str:
    """ "sd", "sdxl", "pixart", "sd3" or "flux", read off the pipeline's denoiser (the host's `family`).

    Raises:
        ConfigError: a denoiser of none of these families.
    """
    from attnlab.integrations.diffusers.host import family as host_family

    fam = host_family(pipe)
    if fam is None:
        raise ConfigError(
            f"{type(pipe).__name__}: its denoiser {type(denoiser(pipe)).__name__} is of no family attnlab knows"
        )
    return fam


# Sampling


def call_default(pipe, name: str):
    """The default of one of the pipeline's `__call__` arguments (num_inference_steps, guidance_scale)."""
    import inspect

    return inspect.signature(type(pipe).__call__).parameters[name].default


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    steps: int,
    guidance: float,
    controls: Sequence = (),
    batch_size: int = 4,
    bind=None,
    **call,
) -> Tensor:
    """Images for `prompts[i]` from seed `seeds[i]`, drawn by the pipeline's own `__call__` with
    `controls` installed through the host.

    Each sample's noise comes from its own CPU generator, so an image does not depend on the batch
    it was drawn in nor on the device. `bind(prompts)` gives further controls bound to one batch's
    prompts (Attend-and-Excite's tokens); `call` goes to the pipeline's call (height, width).
    Returns (N, 3, H, W) in [-1, 1] on the CPU.
    """
    from attnlab.attention import control

    out = []
    for i in range(0, len(prompts), batch_size):
        rows, sds = list(prompts[i : i + batch_size]), list(seeds[i : i + batch_size])
        batch = [*controls, *(bind(rows) if bind is not None else ())]
        scope = control(pipe, batch, seeds=sds) if batch else contextlib.nullcontext()
        with scope:
            images = pipe(**call_arguments(pipe, rows, sds, steps, guidance), **call).images
        out.append(images.float().cpu() * 2 - 1)
    return torch.cat(out)


def call_arguments(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> dict:
    kw = {
        "prompt": prompts,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "generator": [torch.Generator("cpu").manual_seed(int(s)) for s in seeds],
        "output_type": "pt",
    }
    if family(pipe) == "pixart" and denoiser(pipe).config.sample_size not in PIXART_BINS:
        kw["use_resolution_binning"] = False
    return kw


def provenance(folder: str | Path, pipe, steps: int, guidance: float, spec: dict, device: str) -> dict:
    """What every sample of one run shares: attnlab's own provenance fields, plus the pipeline
    folder, its class and family, and the sha256 of each of its safetensors files."""
    import diffusers

    sched = pipe.scheduler
    return {
        "attnlab": attnlab.__version__,
        "diffusers": diffusers.__version__,
        "pipeline": str(Path(folder).resolve()),
        "pipeline_class": type(pipe).__name__,
        "family": family(pipe),
        "weights_sha256": weights_hashes(folder),
        "sampler": type(sched).__name__,
        "steps": steps,
        "guidance": guidance,
        "prediction": sched.config.get(
            "prediction_type", "flow" if family(pipe) in ("sd3", "flux") else None
        ),
        "techniques": {"sampling": spec},
        "precision": getattr(pipe, "attnlab_precision", "fp32"),
        "device": str(device),
    }
