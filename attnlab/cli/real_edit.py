"""`attnlab edit --image`: invert a real image under its caption, edit it from the inverted noise,
and write the reconstruction, each edit, a side-by-side figure and edit.json."""

from __future__ import annotations

from pathlib import Path

import typer

from attnlab.errors import ConfigError


def edit_real(
    target, prompt: str, edits: list[str], p2p, options: dict, settings: dict, *, image: Path,
    mask: Path | None, inversion: str, seed: int, out: Path, null_tokens: str = "all",
) -> None:  # fmt: skip
    """`target`: a diffusers pipeline, or (model, cfg, encoder, scheduler, settings) of a run."""
    from attnlab.cli.sample import output_dir
    from attnlab.control.edit import read_image, read_mask
    from attnlab.control.inversion import METHODS, NULL_TOKENS
    from attnlab.train.checkpoint import file_sha256

    if inversion not in METHODS:
        raise ConfigError(f"--inversion {inversion!r} is not supported; choose one of {', '.join(METHODS)}")
    if null_tokens not in NULL_TOKENS:
        raise ConfigError(f"--null-tokens {null_tokens!r}: choose one of {', '.join(NULL_TOKENS)}")
    on_pipeline = not isinstance(target, tuple)
    if on_pipeline and null_tokens != "all":
        raise ConfigError(
            "--null-tokens one: a pipeline's null-text optimises its whole negative-prompt embedding"
        )
    size, channels = _image_shape(target, on_pipeline)
    x, notes = read_image(image, size, channels)
    notes = [notes] if notes else []
    m = None
    if mask is not None:
        m, note = read_mask(mask, size)
        notes += [note] if note else []
    output_dir(out)
    steps, guidance = settings["steps"], settings["guidance"]
    kw = dict(method=inversion, steps=steps, guidance=guidance, seed=seed, mask=m)
    if on_pipeline:
        from attnlab.integrations.diffusers.invert import edit_image

        result = edit_image(target, x, prompt, edits, p2p, **kw)
    else:
        from attnlab.control.edit import edit_image

        model, cfg, encoder, scheduler, _ = target
        result = edit_image(
            model, encoder, x, prompt, edits, p2p, scheduler=scheduler, null_tokens=null_tokens, **kw
        )
        settings = {**_run_provenance(settings, cfg), **settings}
    inputs = {"image": str(image), "image_sha256": file_sha256(image)}
    if mask is not None:
        inputs.update(mask=str(mask), mask_sha256=file_sha256(mask))
    base = {**settings, **inputs, "source": prompt, "edits": edits, "p2p": options}
    base["inversion"] = result.inversion.summary()
    files = _write(out, x, m, prompt, edits, result, base)
    write_json_out(out, base, result, notes, files)
    typer.echo(
        f"wrote {len(files)} files to {out} (inversion {inversion}, reconstruction {result.psnr:.1f} dB)"
        + "".join(f"; note: {n}" for n in notes)
    )


def _image_shape(target, on_pipeline: bool) -> tuple[tuple[int, int], int]:
    if on_pipeline:
        from attnlab.integrations.diffusers.invert import check_pipeline, image_size

        check_pipeline(target)
        return image_size(target), 3
    cfg = target[1]
    shape = cfg.model.sample_shape()
    if cfg.model.dims != 2 or shape[0] not in (1, 3):
        raise ConfigError("--image needs a model of images (1 or 3 channels, 2-D); this run's are not")
    return tuple(shape[1:]), shape[0]


def _run_provenance(settings: dict, cfg) -> dict:
    from attnlab.errors import CheckpointError
    from attnlab.samples import provenance_base
    from attnlab.train.checkpoint import model_dir, weights_file

    run = settings.get("run_dir")
    ema = True
    try:
        w = weights_file(run, ema)
    except CheckpointError:  # a run kept without EMA weights
        w, ema = weights_file(run, False), False
    base = provenance_base(model_dir(run), w, cfg, "ddim", settings["steps"], settings["guidance"], {})
    return {**base, "ema": ema}


def _write(out: Path, x, m, prompt: str, edits: list[str], result, base: dict) -> list[str]:
    from attnlab.control.figures import side_by_side
    from attnlab.samples import save_png, slug

    files = [save_png(out / "reconstruction.png", result.reconstruction.clamp(-1, 1), base).name]
    for k, e in enumerate(edits):
        meta = {**base, "prompt": e}
        files.append(save_png(out / f"edit{k + 1}-{slug(e)}.png", result.edits[k].clamp(-1, 1), meta).name)
    images = [x, result.reconstruction, *result.edits]
    titles = [
        "input",
        f"reconstruction ({result.psnr:.1f} dB)",
        *[f"edit {k + 1}: {e}" for k, e in enumerate(edits)],
    ]
    if m is not None:
        images.insert(1, m * 2 - 1)
        titles.insert(1, "mask")
    files.append(side_by_side(out / "side-by-side.png", [i.clamp(-1, 1) for i in images], titles).name)
    return files


def write_json_out(out: Path, base: dict, result, notes: list[str], files: list[str]) -> None:
    from attnlab.io import write_json

    seconds = {k: round(v, 3) for k, v in result.seconds.items()}
    write_json(
        out / "edit.json",
        {
            **base,
            "reconstruction_psnr": round(result.psnr, 3),
            "seconds": seconds,
            "notes": notes,
            "files": files,
        },
    )
