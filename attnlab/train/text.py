"""Text runs: the config, the token data, MDLM training and sampling to JSONL, for the token
backbone (`attnlab.models.tokens`) and masked diffusion (`attnlab.diffusion.masked`).

A run directory holds config.json (the resolved config), tokenizer.json (`tokenizers`' JSON),
conditions.json (the condition vocabulary), model.safetensors and ema.safetensors, log.jsonl, and
the reference LM of the generative perplexity (reference_lm.safetensors + .json): the shipped scenes
LM where the run's data and tokenizer are the built-in ones, else one trained on the ref split.
Every file is written whole; a finished run is skipped when trained again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor

from attnlab.conditioning import Condition
from attnlab.config import TrainConfig
from attnlab.configio import build_structured, config_layers, read_yaml
from attnlab.data.scenes import ScenesConfig, TextSplit, build_scenes, condition_vocab
from attnlab.data.tokenizer import TextTokenizer, train_tokenizer
from attnlab.diffusion.masked import EPS, SAMPLERS, mdlm_loss, sample_tokens
from attnlab.errors import CheckpointError, ConfigError, DataError, check
from attnlab.io import write_atomic, write_json, write_text
from attnlab.models.config import ModelConfig
from attnlab.train import checkpoint as ckpt
from attnlab.train.ema import EMA
from attnlab.train.log import LossLog
from attnlab.train.trainer import drop_condition, lr_at, step_generator

TOKENIZER, CONDITIONS, MODEL, EMA_FILE, CONFIG, LOG = (
    "tokenizer.json",
    "conditions.json",
    "model.safetensors",
    "ema.safetensors",
    "config.json",
    "log.jsonl",
)

# The config


@dataclass
class TextDataConfig:
    """Which text.

    Attributes:
        name: "scenes" (the built-in grammar, `attnlab.data.scenes`) or "folder" (your text).
        num, num_eval, num_ref, seed, max_objects, shapes, colors: scenes only (`ScenesConfig`).
        root: folder only: the directory with metadata.jsonl / .csv (a `text` column).
        condition_columns: folder only: columns whose values condition the text.
        skip_bad: folder only: skip bad rows instead of stopping at the first.
        tokenizer: "word" or "bpe" (`attnlab.data.tokenizer`); vocab_size: BPE's vocabulary.
        length: tokens per sequence; 0 = the longest training text's.
    """

    name: Literal["scenes", "folder"] = "scenes"
    num: int = 4096
    num_eval: int = 512
    num_ref: int = 2048
    seed: int = 0
    max_objects: int = 2
    shapes: list[str] = field(default_factory=lambda: ["circle", "square", "triangle"])
    colors: list[str] = field(default_factory=lambda: ["red", "green", "blue", "yellow"])
    root: str | None = None
    condition_columns: list[str] = field(default_factory=list)
    skip_bad: bool = False
    tokenizer: Literal["word", "bpe"] = "word"
    vocab_size: int = 2000
    length: int = 0

    def validate(self) -> None:
        check(self.name in ("scenes", "folder"), "data.name", self.name, "scenes or folder")
        check(self.length >= 0, "data.length", self.length, "0 (the longest text) or a positive length")
        if self.name == "folder":
            check(
                bool(self.root), "data.root", self.root, "the folder holding metadata.jsonl or metadata.csv"
            )
        else:
            self.scenes()

    def scenes(self) -> ScenesConfig:
        keys = ("num", "num_eval", "num_ref", "seed", "max_objects", "shapes", "colors")
        return ScenesConfig(**{k: getattr(self, k) for k in keys})


@dataclass
class MaskedDiffusionConfig:
    """Attributes:
    cond_drop: probability of the null condition per training row (for classifier-free guidance).
    eps: the log-linear schedule's epsilon (MDLM: 1e-3)."""

    cond_drop: float = 0.1
    eps: float = EPS

    def validate(self) -> None:
        check(0 <= self.cond_drop < 1, "diffusion.cond_drop", self.cond_drop, "a probability in [0, 1)")
        check(0 < self.eps < 1, "diffusion.eps", self.eps, "a number in (0, 1)")


@dataclass
class TextSampleConfig:
    """Defaults of `attnlab sample` on a text run: sampler "ancestral" (MDLM) or "confidence"
    (LLaDA), steps, CFG scale (1: conditional only), the confidence sampler's temperature."""

    sampler: Literal["ancestral", "confidence"] = "ancestral"
    steps: int = 32
    guidance: float = 1.0
    temperature: float = 0.0

    def validate(self) -> None:
        check(self.sampler in SAMPLERS, "sample.sampler", self.sampler, " or ".join(SAMPLERS))
        check(self.steps >= 1, "sample.steps", self.steps, "a positive integer")


def _token_model() -> ModelConfig:
    return ModelConfig(
        backbone="tokens",
        dims=1,
        in_channels=8,
        size=16,
        width=128,
        depth=4,
        heads=4,
        cond="text",
        context_dim=8,
    )


@dataclass
class TextRunConfig:
    """Everything that defines a text run; `config.json` in a text run directory is one of these.
    `reference_lm_steps`: training steps of the reference LM of the generative perplexity."""

    modality: Literal["tokens"] = "tokens"
    reference_lm_steps: int = 600
    data: TextDataConfig = field(default_factory=TextDataConfig)
    model: ModelConfig = field(default_factory=_token_model)
    diffusion: MaskedDiffusionConfig = field(default_factory=MaskedDiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: TextSampleConfig = field(default_factory=TextSampleConfig)

    def validate(self) -> None:
        for section in (self.data, self.model, self.diffusion, self.train, self.sample):
            section.validate()
        check(self.model.backbone == "tokens", "model.backbone", self.model.backbone, "tokens for a text run")

    def to_dict(self) -> dict[str, Any]:
        from attnlab.models.config import native_keys

        d = json.loads(json.dumps(dataclasses.asdict(self)))
        native_keys(d["model"])
        return d


def is_text_config(path: str | Path) -> bool:
    """Whether a YAML run config is a text run (`modality: tokens`)."""
    data = OmegaConf.to_container(read_yaml(Path(path)))
    return isinstance(data, dict) and data.get("modality") == "tokens"


def is_text_run(path: str | Path) -> bool:
    """Whether a directory is a text run (its config.json says `modality: tokens`)."""
    f = Path(path) / CONFIG
    try:
        return f.is_file() and json.loads(f.read_text()).get("modality") == "tokens"
    except (OSError, json.JSONDecodeError):
        return False


def load_text_config(path: str | Path | None, overrides: list[str] = ()) -> TextRunConfig:
    """The text run config of a YAML file with key=value overrides (ConfigError names the key)."""
    layers = config_layers(path, overrides)
    return build_structured(TextRunConfig, layers, str(path or "overrides"), fill_from_data=False)


# The data


@dataclass
class TokenData:
    """A text set tokenized: ids (N, L) per split, condition ids (N, Lc) and mask per split."""

    tokenizer: TextTokenizer
    conditions: list[str]  # the condition vocabulary, "[null]" first
    splits: dict[str, TextSplit]
    ids: dict[str, Tensor]
    cond_ids: dict[str, tuple[Tensor, Tensor]]

    def condition(self, split: str, idx) -> Condition | None:
        if len(self.conditions) <= 1:
            return None
        ids, mask = self.cond_ids[split]
        return Condition(tokens=ids[idx], mask=mask[idx])


def text_splits(cfg: TextDataConfig) -> dict[str, TextSplit]:
    if cfg.name == "scenes":
        sc = cfg.scenes()
        return {s: build_scenes(sc, s) for s in ("train", "eval", "ref")}
    from attnlab.data.text_folder import read_text_folder

    cols = tuple(cfg.condition_columns)
    return {s: read_text_folder(cfg.root, s, cols, cfg.skip_bad)[0] for s in ("train", "eval", "ref")}


def encode_conditions(conds: list[list[str]], vocab: list[str], where: str) -> tuple[Tensor, Tensor]:
    """(N, Lc) condition ids padded with 0 and their (N, Lc) mask; a row without conditions is the
    null token. Raises DataError for a condition token outside the vocabulary."""
    index = {w: i for i, w in enumerate(vocab)}
    width = max(1, max((len(c) for c in conds), default=1))
    ids, mask = (
        torch.zeros(len(conds), width, dtype=torch.long),
        torch.zeros(len(conds), width, dtype=torch.bool),
    )
    for i, c in enumerate(conds):
        unknown = [w for w in c if w not in index]
        if unknown:
            raise DataError(
                f"{where} item {i}: condition {unknown[0]!r} was never seen in the training split"
            )
        ids[i, : len(c)] = torch.tensor([index[w] for w in c], dtype=torch.long)
        mask[i, : max(1, len(c))] = True
    return ids, mask


def build_token_data(cfg: TextDataConfig, tokenizer: TextTokenizer | None = None, vocab=None) -> TokenData:
    """Every split tokenized, with a tokenizer trained on the train split unless one is given.
    With `length` 0 the sequences are as long as the longest text of any split (only lengths are
    read off eval and ref), and a folder's condition vocabulary holds every split's values (a value
    that only eval has gets an untrained embedding rather than stopping the run)."""
    splits = text_splits(cfg)
    tok = tokenizer
    if tok is None:
        tok = train_tokenizer(splits["train"].texts, cfg.tokenizer, cfg.vocab_size, cfg.length)
        if not cfg.length:
            tok.length = max(len(e.ids) for sp in splits.values() for e in tok.tok.encode_batch(sp.texts))
    if vocab is None:
        seen = sorted({w for sp in splits.values() for c in sp.conditions for w in c})
        vocab = condition_vocab(cfg.scenes()) if cfg.name == "scenes" else ["[null]", *seen]
    ids = {s: tok.encode(sp.texts, f"data {s} split") for s, sp in splits.items()}
    conds = {s: encode_conditions(sp.conditions, vocab, f"data {s} split") for s, sp in splits.items()}
    return TokenData(tok, list(vocab), splits, ids, conds)


def fit_model(cfg: TextRunConfig, data: TokenData) -> TextRunConfig:
    """The model fields the data decides: vocabulary, sequence length, condition vocabulary."""
    cond = "text" if len(data.conditions) > 1 else "none"
    model = dataclasses.replace(
        cfg.model,
        in_channels=data.tokenizer.vocab_size,
        size=data.tokenizer.length,
        context_dim=len(data.conditions),
        cond=cond,
        dims=1,
    )
    return dataclasses.replace(cfg, model=model)


# Training


def train_text(
    cfg: TextRunConfig, out: str | Path, dry_run: bool = False, log=print, reference_lm: Path | None = None
) -> Path:
    """Train a text run into `out` (skipped when it is already trained to cfg.train.steps).

    Args:
        reference_lm: a folder holding the reference LM of this data, to copy instead of training
            one (a PoC trains it once for all its runs).
    Returns:
        The run directory.
    """
    from attnlab.models import build_model

    out = Path(out)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    data = build_token_data(cfg.data)
    cfg = fit_model(cfg, data)
    if trained_to(out) >= t.steps:
        log(f"{out}: already trained to step {trained_to(out)}")
        return out
    torch.manual_seed(t.seed)
    model = build_model(cfg.model)
    write_json(out / CONFIG, cfg.to_dict())
    data.tokenizer.save(out / TOKENIZER)
    write_json(out / CONDITIONS, data.conditions)
    params = sum(p.numel() for p in model.parameters())
    log(
        f"{cfg.data.name}: {len(data.splits['train'])} train texts, {data.tokenizer.vocab_size} tokens, "
        f"length {data.tokenizer.length}, {len(data.conditions)} condition tokens; tokens backbone "
        f"({cfg.model.cond}-conditioned) with {params / 1e6:.2f}M parameters"
    )
    if dry_run:
        return out
    wall, cpu = _train_loop(cfg, model, data, out)
    lm_source = reference_language_model(cfg.data, data, out, reference_lm, cfg.reference_lm_steps)
    log(f"reference LM of the generative perplexity: {lm_source}")
    write_json(out / "state.json", {"step": t.steps, "wall_s": wall, "cpu_s": cpu})  # the run is complete
    log(f"trained {t.steps} steps in {wall:.0f} s; run directory: {out}")
    return out


def reference_language_model(
    cfg: TextDataConfig, data: TokenData, out: Path, source: Path | None = None, steps: int = 600
) -> str:
    """The reference LM of the generative perplexity in `out`: copied from `source` when it has
    one; else the shipped scenes LM when the data is the built-in scenes set with the word tokenizer
    and the run's tokenizer holds exactly its vocabulary (`text_lm.scenes_lm_for`); else one trained
    on the ref split. Its JSON's `info` says which, why, and its perplexity on the eval and ref
    splits; it is saved to `source` too when that is empty.

    Returns:
        Where the LM came from, in words.
    """
    import shutil

    from attnlab.evaluate.text_lm import CONFIG as LM_CONFIG
    from attnlab.evaluate.text_lm import WEIGHTS as LM_WEIGHTS
    from attnlab.evaluate.text_lm import lm_info, perplexity, save_lm, scenes_lm_for, train_reference_lm

    if source is not None and (source / LM_CONFIG).is_file() and (source / LM_WEIGHTS).is_file():
        for name in (LM_WEIGHTS, LM_CONFIG):
            write_atomic(out / name, lambda p, name=name: shutil.copyfile(source / name, p))
        return lm_info(out).get("source", f"copied from {source}")
    tok = data.tokenizer
    lm, why = None, "user text (a folder) has no shipped LM"
    if cfg.name == "scenes":
        lm, why = scenes_lm_for(tok) if cfg.tokenizer == "word" else (None, "the tokenizer is BPE, not word")
    if lm is not None:
        info = {"source": "shipped scenes LM (attnlab/evaluate/weights/scenes_lm.*), in this run's ids"}
    else:
        lm = train_reference_lm(data.ids["ref"], tok.vocab_size, tok.bos_id, tok.pad_id, steps=steps)
        info = {"source": f"trained on this run's ref split ({steps} steps)", "not_shipped_because": why}
    info["perplexity"] = {s: perplexity(lm, data.ids[s], tok.bos_id, tok.pad_id) for s in ("eval", "ref")}
    for folder in (out, source) if source is not None else (out,):
        save_lm(lm, folder, info)
    return info["source"]


def trained_to(out: Path) -> int:
    """The step a text run directory is trained to (0: not trained, or not finished)."""
    state = out / "state.json"
    if not (state.is_file() and (out / MODEL).is_file()):
        return 0
    return int(json.loads(state.read_text()).get("step", 0))


def _train_loop(cfg: TextRunConfig, model, data: TokenData, out: Path) -> tuple[float, float]:
    """The MDLM steps, checkpointed every `train.ckpt_every` steps (a killed run resumes from its
    last checkpoint and, since every step draws from a generator of (seed, step), ends with the
    weights an uninterrupted run has); returns the wall and CPU seconds of all its steps."""
    t = cfg.train
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    state = _resume(cfg, out, model, ema, opt)
    log = LossLog(out / LOG, keep_bytes=state["log_bytes"])
    x, mask_id, n = data.ids["train"], data.tokenizer.mask_id, len(data.splits["train"])
    wall0, window, cpu0 = time.perf_counter() - state["wall"], [], time.process_time() - state["cpu"]
    model.train()
    for step in range(state["step"], t.steps):
        g = step_generator(t.seed, step, 0)
        idx = torch.randint(0, n, (t.batch_size,), generator=g)
        cond = drop_condition(data.condition("train", idx), cfg.diffusion.cond_drop, g)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = mdlm_loss(model, x[idx], cond, mask_id=mask_id, generator=g, eps=cfg.diffusion.eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model, step)
        window.append(loss.item())
        done = step + 1
        if done % t.log_every == 0 or done == t.steps:
            log.append({"step": done, "loss": sum(window) / len(window), "wall": time.perf_counter() - wall0})
            window = []
        if done % t.ckpt_every == 0 or done == t.steps:
            timing = {"wall": time.perf_counter() - wall0, "cpu": time.process_time() - cpu0}
            ckpt.save_checkpoint(
                out,
                done,
                cfg,
                model,
                ema.state_dict() if ema else None,
                opt.state_dict(),
                {"log_bytes": log.size(), **timing},
                keep=t.keep_checkpoints,
            )
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    _save_weights(out / MODEL, model.state_dict())
    _save_weights(out / EMA_FILE, ema.state_dict() if ema else model.state_dict())
    return wall, cpu


# Keys a resumed text run may change; anything else must match its checkpoint's config.
RESUMABLE = {"steps", "log_every", "ckpt_every", "keep_checkpoints", "threads", "progress"}


def _resume(cfg: TextRunConfig, out: Path, model, ema, opt) -> dict:
    """Restore model, EMA and optimizer from the run's last checkpoint; the step to start at."""
    found = ckpt.latest_checkpoint(out)
    if found is None:
        return {"step": 0, "log_bytes": 0, "wall": 0.0, "cpu": 0.0}
    old, new = json.loads((found / ckpt.CONFIG).read_text()), cfg.to_dict()
    for d in (old, new):
        for k in RESUMABLE:
            d["train"].pop(k, None)
    diff = [
        f"{s}.{k}"
        for s in new
        if isinstance(new[s], dict)
        for k in new[s]
        if old.get(s, {}).get(k) != new[s][k]
    ]
    diff += [k for k in new if not isinstance(new[k], dict) and old.get(k) != new[k]]
    if diff:
        raise ConfigError(
            f"{out} holds a text run with a different config ({', '.join(diff[:4])} differ from "
            f"{found / ckpt.CONFIG}); resume with the same config or train into a new --out"
        )
    model.load_state_dict(ckpt.read_tensors(found / ckpt.MODEL))
    if ema is not None:
        ema.load_state_dict(ckpt.read_tensors(found / ckpt.EMA_WEIGHTS))
    opt.load_state_dict(ckpt.read_optimizer_state(found / ckpt.OPTIMIZER))
    return ckpt.read_trainer_state(found)


def _save_weights(path: Path, state: dict[str, Tensor]) -> None:
    plain = {k: v.detach().contiguous().clone() for k, v in state.items()}
    write_atomic(path, lambda p: save_file(plain, str(p)))


# Loading and sampling


@dataclass
class TextRun:
    """A trained text run, loaded."""

    path: Path
    cfg: TextRunConfig
    model: torch.nn.Module
    data: TokenData
    weights: str


def load_text_run(path: str | Path, ema: bool = True) -> TextRun:
    """Raises CheckpointError naming the missing file of an incomplete run."""
    from attnlab.models import build_model

    path = Path(path)
    for name in (CONFIG, TOKENIZER, CONDITIONS, MODEL, EMA_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path} is not a trained text run: {name} is missing")
    raw = json.loads((path / CONFIG).read_text())
    cfg = build_structured(TextRunConfig, [OmegaConf.create(raw)], str(path / CONFIG), fill_from_data=False)
    tok = TextTokenizer.load(path / TOKENIZER, cfg.model.size)
    data = build_token_data(cfg.data, tok, json.loads((path / CONDITIONS).read_text()))
    model = build_model(cfg.model)
    weights = EMA_FILE if ema else MODEL
    model.load_state_dict(load_file(str(path / weights)))
    return TextRun(path, cfg, model.eval(), data, weights)


def check_token_techniques(spec: dict) -> None:
    """Refuse a sampling technique that does not declare the tokens modality, saying why."""
    from attnlab.techniques import get
    from attnlab.techniques.registry import modality_names, refusal_note

    for name in spec:
        try:
            tech = get(name)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        if "tokens" not in tech.modalities:
            raise ConfigError(
                f"technique {name!r} works on {modality_names(tech.modalities)} data, not tokens"
                f"{refusal_note(tech, 'tokens')}"
            )


def draw_text(
    run: TextRun,
    n: int,
    *,
    seed: int = 0,
    sampler: str | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    techniques: dict | None = None,
    batch_size: int = 128,
    split: str = "eval",
) -> list[dict]:
    """`n` samples, sample k conditioned on item k of `split` (cycling) with seed `seed + k`.

    Returns:
        One dict per sample: text, ids, well_formed, the condition asked, seed and the settings.
    """
    from attnlab.control.plan import sampling_plan

    s = run.cfg.sample
    sampler, steps = sampler or s.sampler, steps or s.steps
    guidance = s.guidance if guidance is None else guidance
    check(sampler in SAMPLERS, "--sampler", sampler, " or ".join(SAMPLERS))
    spec = dict(techniques or {})
    check_token_techniques(spec)
    plan = sampling_plan(spec)
    items = [k % len(run.data.splits[split]) for k in range(n)]
    rows, tok = [], run.data.tokenizer
    with plan.installed(run.model):
        for start in range(0, n, batch_size):
            idx = torch.tensor(items[start : start + batch_size])
            seeds = [seed + k for k in range(start, start + len(idx))]
            cond = run.data.condition(split, idx)
            t0 = time.perf_counter()
            ids = sample_tokens(
                run.model,
                (len(idx), tok.length),
                cond,
                mask_id=tok.mask_id,
                steps=steps,
                sampler=sampler,
                guidance=plan.guidance(guidance),
                seeds=seeds,
                guidances=plan.guidances,
                temperature=s.temperature,
            )
            per = (time.perf_counter() - t0) / len(idx)
            for j, k in enumerate(idx.tolist()):
                text, ok = tok.decode(ids[j])
                rows.append(
                    {
                        "text": text,
                        "ids": ids[j].tolist(),
                        "well_formed": ok,
                        "condition": run.data.splits[split].conditions[k],
                        "item": k,
                        "seed": seeds[j],
                        "seconds": per,
                    }
                )
    return [{**provenance(run, sampler, steps, guidance, spec), **r} for r in rows]


def provenance(run: TextRun, sampler: str, steps: int, guidance: float, spec: dict) -> dict:
    """What every sample line of one draw records, to draw it again: attnlab's version, the run and
    its weights (with their hash), the sampler, steps, CFG scale, techniques and temperature."""
    import attnlab
    from attnlab.train.checkpoint import file_sha256

    return {
        "attnlab": attnlab.__version__,
        "model_dir": str(run.path.resolve()),
        "weights": run.weights,
        "weights_sha256": file_sha256(run.path / run.weights),
        "sampler": sampler,
        "steps": steps,
        "guidance": guidance,
        "temperature": run.cfg.sample.temperature,
        "techniques": {**run.cfg.model.techniques, "sampling": spec},
    }


def score_samples(run: TextRun, rows: list[dict], split: str = "eval") -> dict[str, float | str]:
    """Validity, agreement, attribute accuracy (scenes), diversity and generative perplexity (with
    `gen_ppl_lm`, where its reference LM came from)."""
    from attnlab.evaluate.text import agreement, attribute_accuracy, diversity, validity
    from attnlab.evaluate.text_lm import lm_info, load_lm, perplexity

    texts = [r["text"] for r in rows]
    tok = run.data.tokenizer
    out: dict[str, float | str] = {
        "n": len(rows),
        "well_formed": sum(r["well_formed"] for r in rows) / len(rows),
    }
    if run.cfg.data.name == "scenes":
        sc = run.cfg.data.scenes()
        valid = validity(texts, [r["well_formed"] for r in rows], sc)
        asked = [run.data.splits[split].scenes[r["item"]] for r in rows]
        agree = agreement(texts, valid, asked, sc)
        for r, v, a in zip(rows, valid, agree):
            r["valid"], r["agrees"] = v, a
        out |= {"valid": sum(valid) / len(rows), "agree": sum(agree) / len(rows)}
        out["attribute_accuracy"] = attribute_accuracy(texts, valid, asked, sc)
    out |= diversity(texts)
    if (run.path / "reference_lm.json").is_file():
        ids = torch.tensor([r["ids"] for r in rows])
        out["gen_ppl"] = perplexity(load_lm(run.path), ids, tok.bos_id, tok.pad_id)
        out["gen_ppl_lm"] = lm_info(run.path).get("source", "trained on this run's ref split")
    out["seconds_per_sample"] = sum(r["seconds"] for r in rows) / len(rows)
    return out


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    """One JSON object a line, written whole."""
    return write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
