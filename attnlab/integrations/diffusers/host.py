"""The diffusers host: attnlab's bus on a stock diffusers pipeline or denoiser, for one scope.

What `control(pipe, [...])` does, and undoes at the end of the block:
- names every attention module of the denoiser by its module path (`mid_block.attentions.0.
  transformer_blocks.0.attn1`, `transformer_blocks.1.attn`, `single_transformer_blocks.0.attn`)
  and adapts it as a `HostedAttention` (kind "self", "cross" or "joint"), so controls select
  layers with the same whole-part patterns as on attnlab models;
- sets a `BusProcessor` only on the modules some control selected; a call where no installed
  control is active runs the module's own processor (and attention backend) untouched;
- wraps the denoiser's `forward` (an instance attribute, deleted afterwards) to tell the bus the
  step, the timestep and the batch layout ([uncond; cond] under CFG), to run guidance terms' extra
  passes and add their terms to every chunk of the output (so the pipeline's own CFG formula folds
  them in), to drop the uncond rows after T-GATE's gate, and to apply latent updates;
- wraps the pipeline scheduler's `set_timesteps` and `step` to count steps and to hand updated
  latents (Attend-and-Excite) to the pipeline's own `scheduler.step`.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from attnlab.attention.bus import BusState, Control
from attnlab.errors import ConfigError
from attnlab.integrations.diffusers.layers import HostedAttention, adapt, processor_for

DENOISER_ATTRS = ("unet", "transformer")
NOT_BATCHED = frozenset(
    {"img_ids", "txt_ids", "return_dict", "joint_attention_kwargs", "cross_attention_kwargs"}
)


def _from_diffusers(obj) -> bool:
    return any(c.__module__.split(".")[0] == "diffusers" for c in type(obj).__mro__)


def hosts(target) -> bool:
    """Whether `target` is a diffusers pipeline or model (this host's job), not an attnlab model."""
    return _from_diffusers(target)


def resolve(target) -> tuple[Any, nn.Module]:
    """(pipeline or None, denoiser) of a diffusers pipeline or denoiser.

    Raises:
        ConfigError: a pipeline without a U-Net or transformer, or a model with no attention.
    """
    if isinstance(target, nn.Module):
        return None, target
    for attr in DENOISER_ATTRS:
        den = getattr(target, attr, None)
        if isinstance(den, nn.Module):
            return target, den
    raise ConfigError(
        f"{type(target).__name__}: attnlab controls need a pipeline with a `unet` or `transformer` "
        "(Stable Diffusion 1.x/2.x, SDXL, PixArt, SD3, Flux) or one of those denoisers"
    )


FAMILIES = {
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
}


def family(target) -> str | None:
    """The pipeline family of a diffusers pipeline or denoiser ("sd" for SD 1.x/2.x, "sdxl",
    "pixart", "sd3", "flux"; `attnlab.techniques.registry.PIPELINES`), None for any other model."""
    den = target if isinstance(target, nn.Module) else resolve(target)[1]
    name = type(den).__name__
    if name == "UNet2DConditionModel":
        return "sdxl" if den.config.get("addition_embed_type") == "text_time" else "sd"
    return FAMILIES.get(name)


def check_family(items, fam: str | None) -> None:
    """Refuse a registered technique that declares it does not run on this pipeline family."""
    from attnlab.techniques.registry import REGISTRY, load_all

    if fam is None:
        return
    load_all()
    by_class = {t.options: t for t in REGISTRY.values()}
    for it in items:
        tech = by_class.get(type(it))
        if tech is not None and fam not in tech.pipelines:
            why = f" ({tech.pipelines_note})" if tech.pipelines_note else ""
            raise ConfigError(
                f"technique {tech.name!r} does not run on {fam} pipelines{why}; it runs on: "
                + (", ".join(tech.pipelines) or "no pretrained pipeline")
            )


def hosted_layers(denoiser: nn.Module) -> dict[str, HostedAttention]:
    """Every attention module of a diffusers denoiser, adapted, by module path."""
    found = {}
    for name, module in denoiser.named_modules():
        layer = adapt(name, module)
        if layer is not None:
            found[name] = layer
    return found


class Host:
    """One scope's state: the denoiser, its adapted layers, the pipeline's step count."""

    def __init__(self, pipe, denoiser: nn.Module, seeds: Sequence[int] | None, cfg: bool | None = None):
        self.pipe, self.denoiser, self.cfg = pipe, denoiser, cfg
        self.state = BusState(seeds=None if seeds is None else tuple(int(s) for s in seeds))
        self.layers = hosted_layers(denoiser)
        if not self.layers:
            raise ConfigError(f"{type(denoiser).__name__} has no attention layer attnlab can adapt")
        for layer in self.layers.values():
            layer.state, layer.host = self.state, self
        self.step: int | None = None
        self.num_steps: int | None = None
        self.timesteps: Tensor | None = None
        self.spatial: tuple[int, ...] | None = None  # the sample's token grid at full resolution
        self.text_len: int | None = None  # text tokens of the current call (Flux single blocks)
        self.pending: Tensor | None = None  # updated latents for the next scheduler.step
        self.guidances: list = []
        self.schedules: list = []
        # the role groups of the current denoiser call's rows, when it holds a guidance's pass
        # beside the main pass (PAG's perturbed rows): [(roles, rows), ...]; None otherwise
        self.groups: list[tuple[tuple[str, ...], int]] | None = None

    # What the layers ask

    def grid_for(self, n: int) -> tuple[int, ...]:
        """The (h, w) grid of a layer with n query tokens: the sample's grid, downsampled evenly."""
        if self.spatial is None or len(self.spatial) != 2:
            return (n,)
        h, w = self.spatial
        f = math.sqrt(h * w / n)
        for rnd in (round, math.ceil):
            gh, gw = max(1, rnd(h / f)), max(1, rnd(w / f))
            if gh * gw == n:
                return (gh, gw)
        return (n,)

    # The denoiser call

    def roles(self, sample: Tensor) -> tuple[str, ...]:
        """("uncond", "cond") when the call's batch is the pipeline's CFG batch, else ("cond",).

        The pipeline's own `do_classifier_free_guidance` decides where it has one; otherwise the
        batch is a CFG batch when its two halves are the same latents (`torch.cat([latents] * 2)`).
        """
        b = sample.shape[0]
        if b % 2:
            return ("cond",)
        cfg = self.cfg
        if cfg is None and self.pipe is not None:
            try:
                cfg = bool(self.pipe.do_classifier_free_guidance)
            except (AttributeError, TypeError):
                cfg = None
        if cfg is None:
            cfg = bool(torch.equal(sample[: b // 2], sample[b // 2 :]))
        return ("uncond", "cond") if cfg else ("cond",)

    def context(self, t: Tensor, x: Tensor) -> dict[str, Any]:
        """What guidance terms read of the step: the scheduler, its noise level (alpha_bar_t for
        eps / v models; sigma for flow models, whose scheduler has sigmas and no alphas_cumprod,
        prediction_type "flow") and, for packed latents (Flux), `to_image` / `from_image`."""
        sch = getattr(self.pipe, "scheduler", None)
        cfg = getattr(sch, "config", {}) or {}
        kind = cfg.get("prediction_type", "epsilon") if hasattr(cfg, "get") else "epsilon"
        ab = sigma = None
        if sch is not None and getattr(sch, "alphas_cumprod", None) is not None:
            idx = t.round().long().clamp(0, len(sch.alphas_cumprod) - 1)
            ab = sch.alphas_cumprod.to(x.device)[idx].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        elif getattr(sch, "sigmas", None) is not None and self.step is not None:
            kind, sigma = "flow", sch.sigmas[min(self.step, len(sch.sigmas) - 1)].to(x.device, x.dtype)
        ctx = {
            "i": self.step,
            "steps": self.num_steps,
            "scheduler": sch,
            "alpha_bar_t": ab,
            "sigma": sigma,
            "prediction_type": kind,
            "guidance": getattr(self.pipe, "guidance_scale", None) if self.pipe is not None else None,
        }
        if x.dim() == 3 and self.spatial is not None and len(self.spatial) == 2 and x.shape[-1] % 4 == 0:
            ctx["to_image"], ctx["from_image"] = _unpack_2x2(self.spatial), _pack_2x2(self.spatial)
        return ctx

    def loop_timestep(self, fallback: Tensor | float, n: int) -> Tensor:
        """(n,) the pipeline loop's timestep at the current step (the scheduler's value, on the
        0..1000 scale PAG's adaptive scale reads), else the denoiser's timestep argument."""
        if self.timesteps is not None and self.step is not None and self.step < len(self.timesteps):
            t = self.timesteps[self.step]
        else:
            t = fallback
        t = torch.as_tensor(t).float().flatten()
        return t[:1].expand(n) if t.numel() != n else t


class PipelineCondition:
    """The conditioning of one chunk of a denoiser call, as guidance terms pass it back to `model`.

    Holds the call's keyword arguments; `null_like()` is the uncond chunk's, `index(rows)` some rows.
    """

    def __init__(self, kwargs: dict, batch: int, roles: tuple[str, ...], role: str = "cond", rows=None):
        self.kwargs, self.batch, self.roles, self.role = kwargs, batch, roles, role
        self.rows = None if rows is None else [int(r) for r in rows]

    def null_like(self) -> PipelineCondition:
        if "uncond" not in self.roles:
            raise ConfigError("this call has no unconditional rows (the pipeline runs without CFG)")
        return PipelineCondition(self.kwargs, self.batch, self.roles, "uncond", self.rows)

    def index(self, rows) -> PipelineCondition:
        rows = rows.tolist() if isinstance(rows, Tensor) else list(rows)
        picked = rows if self.rows is None else [self.rows[r] for r in rows]
        return PipelineCondition(self.kwargs, self.batch, self.roles, self.role, picked)

    def __len__(self) -> int:
        return self.batch // len(self.roles) if self.rows is None else len(self.rows)

    def select(self, v):
        """`v` (a call argument) cut to this condition's rows."""
        if isinstance(v, dict):
            return {k: self.select(x) for k, x in v.items()}
        if not isinstance(v, Tensor) or v.dim() == 0 or v.shape[0] != self.batch:
            return v
        n = self.batch // len(self.roles)
        i = self.roles.index(self.role)
        chunk = v[i * n : (i + 1) * n]
        return chunk if self.rows is None else chunk[self.rows]


class HostModel:
    """`model(x, t, cond)` for guidance terms: the denoiser's original forward on `cond`'s rows,
    with the sample replaced by x; returns the prediction tensor."""

    def __init__(self, host: Host, forward, sample_key: str):
        self.host, self.forward, self.sample_key = host, forward, sample_key
        self.bus_state = host.state
        self.training = False

    def __call__(self, x: Tensor, t: Tensor, cond: PipelineCondition) -> Tensor:
        kw = {k: (v if k in NOT_BATCHED else cond.select(v)) for k, v in cond.kwargs.items()}
        kw[self.sample_key] = x
        kw["return_dict"] = False
        return self.forward(**kw)[0]

    def parameters(self):
        return self.host.denoiser.parameters()


def _split(items) -> tuple[list[Control], list, list]:
    """Controls, guidance terms (PAG, SAG, Attend-and-Excite) and CFG schedules (T-GATE)."""
    controls, guidances, schedules = [], [], []
    for it in items:
        if hasattr(it, "correction") and hasattr(it, "controls"):
            guidances.append(it)
            controls.extend(it.controls())
        elif isinstance(it, Control):
            controls.append(it)
            if hasattr(it, "guidance_scale") and getattr(it, "drop_cfg", False):
                schedules.append(it)
        else:
            raise ConfigError(
                f"{type(it).__name__} is neither an attention control nor a guidance term; "
                "pass attnlab.control objects (PAG, SAG, HeatMaps, TGate, AttnCache, ...)"
            )
    return controls, guidances, schedules


def _sample_key(forward) -> str:
    params = list(inspect.signature(forward).parameters)
    for key in ("sample", "hidden_states"):
        if key in params:
            return key
    return params[0]


@contextmanager
def control(
    target, controls: Control | Iterable, *, seeds: Sequence[int] | None = None, cfg: bool | None = None
) -> Iterator[list]:
    """Install attnlab controls and guidance terms on a diffusers pipeline or denoiser for a block.

    Args:
        target: a diffusers pipeline (its `unet` or `transformer` is hosted) or the denoiser.
        controls: attnlab controls (HeatMaps, AttnCache, TGate, ToMe, ...) and guidance terms (PAG,
            SAG, AttendExcite); several on one layer compose as on attnlab models.
        seeds: one seed per sample of the pipeline's batch, for controls that draw random numbers
            per sample (token merging); None: every sample draws from seed 0.
        cfg: whether the denoiser's batches are [uncond; cond] CFG batches; None (the default) asks
            the pipeline (`do_classifier_free_guidance`) and otherwise takes a batch whose halves
            are the same latents for one. Pass it when calling a denoiser directly with a batch of
            equal latents that is not a CFG batch (Prompt-to-Prompt's source and edit rows).
    Raises:
        ConfigError: not a supported pipeline or denoiser, or a control that selects no layer.
    """
    items = [controls] if isinstance(controls, Control) or hasattr(controls, "correction") else list(controls)
    pipe, den = resolve(target)
    check_family(items, family(den))
    host = Host(pipe, den, seeds, cfg)
    ctrls, host.guidances, host.schedules = _split(items)
    with ExitStack() as stack:
        den.bus_state = host.state
        stack.callback(_drop_attrs, den, ("bus_state",))
        _install(stack, host, den, den, ctrls)
        _wrap_forward(stack, host)
        if pipe is not None and getattr(pipe, "scheduler", None) is not None:
            _wrap_scheduler(stack, host, pipe.scheduler)
        yield items


def _install(stack: ExitStack, host: Host, holder: nn.Module, den: nn.Module, ctrls: list[Control]) -> None:
    """Adapt `den`'s attention modules, show them to controls on `holder` (what they select on),
    install the controls and set a bus processor on every module one selected; undone by `stack`."""
    holder.attnlab_layers = host.layers
    stack.callback(_drop_attrs, holder, ("attnlab_layers",))
    installed: list[tuple[HostedAttention, Control]] = []
    stack.callback(_uninstall, installed)
    for c in ctrls:
        layers = c.select(holder)
        c.on_install(holder, layers)
        stack.callback(c.on_remove, holder)
        for layer in layers:
            layer.controls.append(c)
            installed.append((layer, c))
    for layer in {id(lay): lay for lay, _ in installed}.values():
        original = layer.module.processor
        layer.module.processor = processor_for(layer, original)
        stack.callback(setattr, layer.module, "processor", original)
        if any(c.changes_tokens for c in layer.controls):
            _watch_block_input(stack, den, layer)


def backbone_of(model) -> nn.Module | None:
    """The diffusers denoiser an attnlab model wraps (`attnlab.models.diffusers_backbone`), or None."""
    net = getattr(model, "net", None)
    return net if isinstance(net, nn.Module) and _from_diffusers(net) and hasattr(model, "config") else None


@contextmanager
def control_backbone(model: nn.Module, controls) -> Iterator[list]:
    """Controls on an attnlab model whose backbone is a diffusers denoiser (`backbone: diffusers`):
    its attention modules are hosted as on a pipeline, but attnlab's own sampling loop drives the
    bus (step, batch roles, guidance passes and sample seeds go through the model's bus state), so
    guidance terms are `sample(guidances=...)` plug-ins there, as for every attnlab model."""
    from attnlab.attention.bus import bus_state

    ctrls = [controls] if isinstance(controls, Control) else list(controls)
    for c in ctrls:
        if not isinstance(c, Control):
            raise ConfigError(
                f"{type(c).__name__}: on an attnlab model, guidance terms go to sample(guidances=...), "
                "controls to control(model, ...)"
            )
    den = backbone_of(model)
    host = Host(None, den, None)
    host.state = bus_state(model)
    for layer in host.layers.values():
        layer.state = host.state

    def note_input(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        host.spatial = tuple(x.shape[2:]) if isinstance(x, Tensor) and x.dim() == 4 else None
        cond = args[2] if len(args) > 2 else kwargs.get("cond")
        tokens = getattr(cond, "tokens", None)
        host.text_len = tokens.shape[1] if isinstance(tokens, Tensor) else None

    with ExitStack() as stack:
        _install(stack, host, model, den, ctrls)
        handle = model.register_forward_pre_hook(note_input, with_kwargs=True)
        stack.callback(handle.remove)
        yield ctrls


def _watch_block_input(stack: ExitStack, den: nn.Module, layer: HostedAttention) -> None:
    """Keep the tokens entering the layer's transformer block (before its norm) on the layer, as
    `AttnCall.pre_norm`: token merging measures similarity on them, as tomesd does."""
    parent = den.get_submodule(layer.name.rsplit(".", 1)[0]) if "." in layer.name else den

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states")
        layer.block_input = x if isinstance(x, Tensor) else None

    handle = parent.register_forward_pre_hook(hook, with_kwargs=True)
    stack.callback(handle.remove)
    stack.callback(setattr, layer, "block_input", None)


def _drop_attrs(obj, names) -> None:
    for n in names:
        obj.__dict__.pop(n, None)


def _uninstall(installed) -> None:
    for layer, c in installed:
        if c in layer.controls:
            layer.controls.remove(c)


def _patch(stack: ExitStack, obj, name: str, new) -> None:
    """Set an instance attribute for the scope; afterwards the attribute is as it was (deleted if
    it was the class's)."""
    had = name in obj.__dict__
    old = obj.__dict__.get(name)
    obj.__dict__[name] = new

    def undo():
        if had:
            obj.__dict__[name] = old
        else:
            obj.__dict__.pop(name, None)

    stack.callback(undo)


def _wrap_scheduler(stack: ExitStack, host: Host, scheduler) -> None:
    set_timesteps, step = scheduler.set_timesteps, scheduler.step

    @functools.wraps(set_timesteps)  # pipelines read its signature (custom sigmas, timesteps)
    def wrapped_set_timesteps(*args, **kwargs):
        out = set_timesteps(*args, **kwargs)
        host.timesteps = scheduler.timesteps.detach().cpu()
        host.step, host.num_steps, host.pending = 0, len(host.timesteps), None
        return out

    @functools.wraps(step)  # pipelines read its signature (eta, generator)
    def wrapped_step(model_output, timestep, sample, *args, **kwargs):
        if host.pending is not None and host.pending.shape == sample.shape:
            sample = host.pending.to(sample)  # the latent update reaches the pipeline's latents
        host.pending = None
        out = step(model_output, timestep, sample, *args, **kwargs)
        blends = [g for g in host.guidances if hasattr(g, "after_step")]
        if blends and host.step is not None:  # the latent after the step (P2P's local blend)
            x = out[0] if isinstance(out, tuple) else out.prev_sample
            for g in blends:
                x = g.after_step(x, host.step, host.num_steps)
            out = (x, *out[1:]) if isinstance(out, tuple) else _with_prev(out, x)
        if host.step is not None:
            host.step += 1
        return out

    _patch(stack, scheduler, "set_timesteps", wrapped_set_timesteps)
    _patch(stack, scheduler, "step", wrapped_step)


def _with_prev(out, x: Tensor):
    out.prev_sample = x
    return out


def _wrap_forward(stack: ExitStack, host: Host) -> None:
    den = host.denoiser
    original = den.forward  # the bound forward, or an instance attribute already set (hooks)
    sig = inspect.signature(original)
    key = _sample_key(original)
    model = HostModel(host, original, key)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        kw = dict(bound.arguments)
        extra = kw.pop(next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), ""), {})
        kw.update(extra)
        return _hosted_call(host, model, original, key, kw)

    _patch(stack, den, "forward", forward)


def _hosted_call(host: Host, model: HostModel, original, key: str, kw: dict):
    sample = kw[key]
    st = host.state
    roles = host.roles(sample)
    b = sample.shape[0]
    n = b // len(roles)
    host.spatial = tuple(sample.shape[2:]) if sample.dim() == 4 else _packed_grid(kw)
    ehs = kw.get("encoder_hidden_states")
    host.text_len = ehs.shape[1] if isinstance(ehs, Tensor) and ehs.dim() == 3 else None
    t_loop = host.loop_timestep(kw.get("timestep", 0), b)
    ctx = host.context(t_loop[:n], sample[:n])
    step, steps = host.step, host.num_steps
    saved = (st.step, st.num_steps, st.timestep, st.roles)
    st.step, st.num_steps, st.timestep = step, steps, t_loop
    try:
        # T-GATE after its gate: no CFG, so one chunk runs, the negative prompt's as in the T-GATE
        # pipelines (its pooled text and micro-conditions enter SDXL's U-Net too); the pipeline's
        # formula then gives uncond + w * (uncond - uncond) = uncond
        if (
            roles == ("uncond", "cond")
            and step is not None
            and any(s.guidance_scale(2.0, step, steps) == 1.0 for s in host.schedules)
        ):
            neg = PipelineCondition(kw, b, roles, "uncond")
            half = {k: (v if k in NOT_BATCHED else neg.select(v)) for k, v in kw.items()}
            st.roles = ("uncond",)
            out = original(**half)
            return _replace_pred(out, lambda p: torch.cat([p, p]))
        cond = PipelineCondition(kw, b, roles)
        x_in = sample[(len(roles) - 1) * n :]  # one chunk of the (equal) latents
        preparing = [g for g in host.guidances if hasattr(g, "prepare") and not hasattr(g, "after_step")]
        preparing = preparing if step is not None else []  # after_step: in the scheduler's step
        if preparing:
            # latent updates act on the pipeline's latents: the model input divided by the
            # scheduler's input scaling (Euler: 1 / sqrt(sigma^2 + 1); DDIM, flows: none)
            c = _input_scale(ctx["scheduler"], x_in, t_loop[0])
            z = x_in if c is None else x_in / c
            z0 = z
            for g in preparing:
                st.roles = ("cond",)
                z = g.prepare(model, z, t_loop[:n], cond, ctx)
            if z is not z0:
                x_in = z if c is None else z * c
                kw = dict(kw)
                kw[key] = torch.cat([x_in] * len(roles))
                host.pending = z.detach()
        active = [g for g in host.guidances if step is None or g.active(step, steps)]
        folded = _foldable(active, t_loop[:n])
        if folded is not None:  # its pass rides in the main call: [main rows; its cond rows]
            kw = {k: (v if k in NOT_BATCHED else _with_rows(v, cond, b)) for k, v in kw.items()}
            host.groups = [(roles, b), ((folded.pass_role,), n)]
        st.roles = roles
        try:
            out = original(**kw)
        finally:
            host.groups = None
        pred = _pred(out)
        if not active:
            return out
        chunks = dict(zip(roles, pred[:b].chunk(len(roles))))
        total = None
        for g in active:
            st.roles = ("cond",)
            if g is folded:
                term = g.combine(chunks["cond"], pred[b:], t_loop[:n])
            else:
                term = g.correction(model, x_in, t_loop[:n], cond, chunks, ctx)
            total = term if total is None else total + term
        return _replace_pred(
            out, lambda p: p[:b] + total.to(p.dtype).repeat(len(roles), *[1] * (p.dim() - 1))
        )
    finally:
        st.step, st.num_steps, st.timestep, st.roles = saved


def _input_scale(scheduler, x: Tensor, t: Tensor) -> Tensor | None:
    """The factor the scheduler's `scale_model_input` multiplies latents by at this step (called
    after the pipeline's own call of the step, so a step index it keeps is already set), or None
    where it has none or it is the identity."""
    scale = getattr(scheduler, "scale_model_input", None)
    if scale is None:
        return None
    c = scale(torch.ones_like(x[:1]), t)
    return None if bool((c == 1).all()) else c


def _foldable(active: list, t: Tensor):
    """The one active guidance term whose extra pass can run in the main call (it declares
    `pass_role` and `combine`, and needs the pass at this step), else None. Its pass then costs
    no separate forward, as diffusers' PAG pipelines batch [uncond, cond, perturbed]."""
    for g in active:
        if hasattr(g, "combine") and hasattr(g, "pass_role") and g.needs_pass(t):
            return g
    return None


def _with_rows(v, cond: PipelineCondition, b: int):
    """A call argument with the cond chunk's rows appended (batch-first tensors; dicts of them)."""
    if isinstance(v, dict):
        return {k: _with_rows(x, cond, b) for k, x in v.items()}
    if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b:
        return torch.cat([v, cond.select(v)])
    return v


def _packed_grid(kw: dict) -> tuple[int, ...] | None:
    """Flux packs latents as tokens; its `img_ids` hold each token's (_, row, col)."""
    ids = kw.get("img_ids")
    if isinstance(ids, Tensor) and ids.shape[-1] == 3:
        ids = ids.reshape(-1, 3)
        return (int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
    return None


def _unpack_2x2(grid: tuple[int, int]):
    """Flux's packed latents (B, h*w, 4C), 2x2 patches of C channels, as the image (B, C, 2h, 2w)."""
    h, w = grid

    def to_image(x: Tensor) -> Tensor:
        b, _, c4 = x.shape
        x = x.view(b, h, w, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h, 2, w, 2)
        return x.reshape(b, c4 // 4, 2 * h, 2 * w)

    return to_image


def _pack_2x2(grid: tuple[int, int]):
    """The inverse of `_unpack_2x2` (the pipeline's `_pack_latents`)."""
    h, w = grid

    def from_image(z: Tensor) -> Tensor:
        b, c = z.shape[:2]
        z = z.view(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, C, 2, 2)
        return z.reshape(b, h * w, c * 4)

    return from_image


def _pred(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _replace_pred(out, fn):
    if isinstance(out, tuple):
        return (fn(out[0]), *out[1:])
    out.sample = fn(out.sample)
    return out
