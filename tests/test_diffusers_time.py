"""T-GATE, the attention cache and token merging on stock diffusers pipelines, against their peers.

- T-GATE: the `tgate` package's pipelines (`TgateSDLoader`, `TgateSDXLLoader`,
  `TgatePixArtSigmaLoader`, HaozheLiu-ST/T-GATE); joint attention (SD3, Flux) is refused.
- The attention cache: diffusers' pyramid attention broadcast (`apply_pyramid_attention_broadcast`),
  which hooks every attention module of any of these denoisers.
- Token merging: `tomesd.apply_patch` on the U-Nets; on PixArt and SD3, whose blocks tomesd's
  copied forward does not cover, a processor written here merges with tomesd's own
  `bipartite_soft_matching_random2d` (only SD3's image tokens); Flux is refused.

Every pipeline is tiny and random (`diffusers_tiny`), runs in fp32 on one thread. Tolerance: 1e-5
relative to the output's scale; each control's own effect (against the bare pipeline) is checked to
be at least 100 times that. The peers' known defects are pinned in tests of their own.
"""

from __future__ import annotations

from contextlib import contextmanager

import diffusers_tiny as tiny
import pytest
import torch

from attnlab.attention import control
from attnlab.control import AttnCache, TGate
from attnlab.errors import ConfigError
from attnlab.models.techniques.tome import TokenMerging

pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-5
PROMPTS = ["a red car", "a blue cat"]
NEGATIVE = ["a dog", "a green tree"]  # makes the chunk run after T-GATE's gate matter on SDXL


def _close(out, ref, base=None):
    scale = ref.abs().max()
    err = ((out - ref).abs().max() / scale).item()
    assert err <= RTOL, f"relative difference {err:.2e}"
    if base is not None:
        effect = ((base - ref).abs().max() / scale).item()
        assert effect >= 100 * RTOL, f"the control's own effect {effect:.2e} is too small to test"


def _far(a, b):
    return ((a - b).abs().max() / b.abs().max()).item() >= 100 * RTOL


BUILD = {
    "sd": (tiny.sd, 32, {}),
    "sdxl": (tiny.sdxl, 32, {}),
    "pixart": (
        tiny.pixart,
        32,
        {"max_sequence_length": 16, "use_resolution_binning": False, "clean_caption": False},
    ),
    "sd3": (tiny.sd3, 32, {"max_sequence_length": 16}),
    "flux": (tiny.flux, 16, {"max_sequence_length": 16}),
}


def _pipe(family):
    build, size, extra = BUILD[family]
    pipe = build()
    if family == "pixart":  # an unclipped x0 keeps every difference visible in the latents
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    return pipe, size, extra


def _kw(pipe, size, extra, steps, batch=2, **more):
    return dict(
        prompt=PROMPTS[:batch],
        num_inference_steps=steps,
        guidance_scale=5.0,
        latents=tiny.latents(pipe, batch, size),
        output_type="latent",
        height=size,
        width=size,
        **extra,
        **more,
    )


def _denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


# T-GATE against the tgate package


def tgate_package():
    return pytest.importorskip(
        "tgate",
        reason="tgate 1.0.0, the reference package, is not installed (`pip install tgate==1.0.0 --no-deps`)",
    )


def _unpatch_tgate(den):
    """tgate replaces every Attention's `forward` and keeps its cache on the module, and leaves both
    there after its call; take them off so the bare pipeline runs again."""
    for m in den.modules():
        m.__dict__.pop("forward", None)
        m.__dict__.pop("cache", None)


LOADERS = {"sd": "TgateSDLoader", "sdxl": "TgateSDXLLoader", "pixart": "TgatePixArtSigmaLoader"}
TGATE_CASES = {
    # (family, steps, TGate): the package's own defaults (gate_step=10 of 25, sp 5, fi 1, warm-up 2),
    # then short runs that also reuse self-attention after the gate (fi_interval 2)
    "sd-defaults": ("sd", 25, TGate()),
    "sd": ("sd", 6, TGate(gate=0.5, sp_interval=2, fi_interval=2, warm_up=1)),
    "sdxl": ("sdxl", 6, TGate(gate=0.5, sp_interval=2, fi_interval=2, warm_up=1)),
    "pixart": ("pixart", 8, TGate(gate=0.25, sp_interval=2, fi_interval=2, warm_up=1)),
}


def _tgate_reference(pipe, family, tg, kw):
    loader = getattr(tgate_package(), LOADERS[family])
    steps = kw["num_inference_steps"]
    try:
        return (
            loader(pipe)
            .tgate(
                **kw,
                gate_step=tg.gate_step(steps),
                sp_interval=tg.sp_interval,
                fi_interval=tg.fi_interval,
                warm_up=tg.warm_up,
            )
            .images
        )
    finally:
        _unpatch_tgate(_denoiser(pipe))
        del pipe.tgate


@pytest.mark.parametrize("case", list(TGATE_CASES))
def test_tgate_matches_the_tgate_pipelines(case):
    family, steps, tg = TGATE_CASES[case]
    pipe, size, extra = _pipe(family)
    kw = _kw(pipe, size, extra, steps, negative_prompt=NEGATIVE)
    ref = _tgate_reference(pipe, family, tg, kw)
    base = pipe(**kw).images
    with control(pipe, [tg]):
        out = pipe(**kw).images
    _close(out, ref, base)
    assert tg.skipped["cross"] > 0 and tg.skipped["self"] > 0


def test_tgate_after_the_gate_runs_the_negative_prompt_as_the_package_does():
    """SDXL's U-Net also reads the pooled text and size conditions, so which chunk runs after the
    gate shows: the package runs the negative prompt's, and so does the host."""
    pipe, size, extra = _pipe("sdxl")
    tg = TGate(gate=0.5, sp_interval=2, fi_interval=2, warm_up=1)
    kw = _kw(pipe, size, extra, 6, negative_prompt=NEGATIVE)
    seen = []  # what enters the U-Net's embedding of the pooled text and size conditions
    hook = pipe.unet.add_embedding.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    try:
        ref = _tgate_reference(pipe, "sdxl", tg, kw)
        n = len(seen)
        with control(pipe, [tg]):
            out = pipe(**kw).images
    finally:
        hook.remove()
    _close(out, ref)
    package, ours = seen[:n], seen[n:]
    assert [len(t) for t in ours] == [len(t) for t in package] == [4, 4, 4, 2, 2, 2]
    for a, b in zip(ours, package):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(ours[-1], ours[0][:2], rtol=0, atol=0)  # the negative prompt's rows


def test_tgate_package_leaves_its_forwards_behind_and_the_scope_does_not():
    """Pinned defect of the package: after `pipe.tgate(...)` every Attention keeps its replaced
    `forward` and its cache, so a later plain call reuses the gate's outputs (here one chunk's,
    which a CFG batch of two cannot take)."""
    tgate_package()
    pipe, size, extra = _pipe("sd")
    kw = _kw(pipe, size, extra, 4)
    base = pipe(**kw).images
    pipe = tgate_package().TgateSDLoader(pipe)
    pipe.tgate(**kw, gate_step=2, sp_interval=2, fi_interval=1, warm_up=1)
    assert any("forward" in m.__dict__ for m in pipe.unet.modules())
    with pytest.raises(RuntimeError, match="size of tensor"):
        pipe(**kw)
    _unpatch_tgate(pipe.unet)
    with control(pipe, [TGate(gate=0.5, warm_up=1, sp_interval=2)]):
        pipe(**kw)
    assert not any("forward" in m.__dict__ for m in pipe.unet.modules())
    torch.testing.assert_close(pipe(**kw).images, base, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tgate_refuses_joint_attention_with_the_reason(family):
    pipe, _, _ = _pipe(family)
    with pytest.raises(ConfigError, match="joint attention.*one softmax.*no cross-attention output"):
        with control(pipe, [TGate()]):
            pass


# The attention cache against pyramid attention broadcast


@contextmanager
def pyramid_broadcast(pipe, every: int, cross: bool):
    """diffusers' PAB on every attention module of the denoiser: self-attention (PAB's "spatial",
    which includes SD3's and Flux's joint attention) and cross-attention skipped `every - 1` times out
    of `every`, over a timestep range that holds every step (the callback's value then only has to
    lie inside it). PAB counts its iterations per module call and resets them only where the
    pipeline resets stateful hooks (CacheMixin models: Flux), so they are reset here before the run."""
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks import HookRegistry

    den = _denoiser(pipe)
    everything = (-1, 1001)
    config = PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=every,
        cross_attention_block_skip_range=every if cross else None,
        spatial_attention_timestep_skip_range=everything,
        cross_attention_timestep_skip_range=everything,
        current_timestep_callback=lambda: 500,
    )
    apply_pyramid_attention_broadcast(den, config)
    registry = HookRegistry.check_if_exists_or_initialize(den)
    registry.reset_stateful_hooks(recurse=True)
    try:
        yield registry
    finally:
        registry.remove_hook("pyramid_attention_broadcast", recurse=True)


CACHE_CASES = {
    # family: (steps, every, kind of AttnCache, PAB caches cross-attention too)
    "sd": (6, 2, "both", True),
    "sd-self": (6, 3, "self", False),
    "sdxl": (6, 2, "both", True),
    "pixart": (6, 2, "both", True),
    "sd3": (8, 4, "both", False),
    "flux": (6, 3, "both", False),
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_attention_cache_matches_pyramid_attention_broadcast(case):
    family = case.split("-")[0]
    steps, every, kind, cross = CACHE_CASES[case]
    pipe, size, extra = _pipe(family)
    kw = _kw(pipe, size, extra, steps)
    with pyramid_broadcast(pipe, every, cross):
        ref = pipe(**kw).images
    base = pipe(**kw).images
    cache = AttnCache(every=every, kind=kind, start=0.0)
    with control(pipe, [cache]):
        out = pipe(**kw).images
    _close(out, ref, base)
    assert cache.hits > 0


def test_pyramid_broadcast_counts_on_across_calls_and_the_cache_restarts():
    """Pinned defect of PAB on models without CacheMixin (the U-Nets, PixArt, SD3): nothing resets
    its per-module iteration count between pipeline calls, so a second call refreshes on other steps
    than the first; the attention cache counts the pipeline's own steps, from 0 in every call."""
    from diffusers.hooks import HookRegistry

    pipe, size, extra = _pipe("sd")
    kw = _kw(pipe, size, extra, 5)
    with pyramid_broadcast(pipe, 2, cross=True):
        first, second = pipe(**kw).images, pipe(**kw).images
        HookRegistry.check_if_exists_or_initialize(pipe.unet).reset_stateful_hooks(recurse=True)
        reset = pipe(**kw).images
    assert _far(second, first)
    torch.testing.assert_close(reset, first, rtol=0, atol=0)
    with control(pipe, [AttnCache(every=2, start=0.0)]):
        a, b = pipe(**kw).images, pipe(**kw).images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    _close(a, first)


# Token merging against tomesd


def tomesd():
    return pytest.importorskip(
        "tomesd", reason="tomesd, the reference package, is not installed (make setup installs the peers)"
    )


@contextmanager
def tomesd_patch(pipe, **opts):
    tomesd().apply_patch(pipe if hasattr(pipe, "unet") else pipe.transformer, **opts)
    try:
        yield
    finally:
        tomesd().remove_patch(pipe if hasattr(pipe, "unet") else pipe.transformer)


@pytest.mark.parametrize(
    "family, tomesd_downsample",
    [("sd", 1), ("sdxl", 2)],  # SDXL's finest attention is at half the latent's side
)
def test_token_merging_matches_tomesd_on_the_unets(family, tomesd_downsample):
    """tomesd's downsample is counted from the latent, attnlab's from the finest self-attention grid:
    the same on SD, one level apart on SDXL, whose first level has no attention."""
    pipe, size, extra = _pipe(family)
    kw = _kw(pipe, size, extra, 4)
    with tomesd_patch(pipe, ratio=0.5, max_downsample=tomesd_downsample, use_rand=False):
        ref = pipe(**kw).images
    base = pipe(**kw).images
    with control(pipe, [TokenMerging(ratio=0.5, rand=False, max_downsample=1)]):
        out = pipe(**kw).images
    _close(out, ref, base)


def test_tomesd_merges_nothing_on_sdxl_by_default():
    """Pinned (tomesd #50, SDXL unsupported): with its default max_downsample=1 tomesd counts from the
    latent, where SDXL has no attention, so nothing merges."""
    pipe, size, extra = _pipe("sdxl")
    kw = _kw(pipe, size, extra, 3)
    base = pipe(**kw).images
    with tomesd_patch(pipe, ratio=0.5, use_rand=False):
        torch.testing.assert_close(pipe(**kw).images, base, rtol=0, atol=0)
    with control(pipe, [TokenMerging(ratio=0.5, rand=False)]):
        assert _far(pipe(**kw).images, base)


class MergedAttention:
    """An attention processor that merges the query tokens as tomesd does, written from its
    documented behaviour: the similarity is measured on the block's input (before its norm), one
    destination per 2x2 cell at its top-left (no_rand), the r most similar sources averaged into
    theirs, the module's own processor run on the merged tokens, and each merged source given its
    destination's output back. On a joint layer (SD3) only the image tokens merge and unmerge."""

    def __init__(self, inner, grid, ratio):
        self.inner, self.grid, self.ratio = inner, grid, ratio
        self.block_input = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        h, w = self.grid
        n = hidden_states.shape[1]
        merge, unmerge = tomesd().merge.bipartite_soft_matching_random2d(
            self.block_input, w, h, 2, 2, int(n * self.ratio), no_rand=True
        )
        out = self.inner(attn, merge(hidden_states), encoder_hidden_states, attention_mask, **kw)
        if isinstance(out, tuple):  # SD3's joint attention: (image outputs, text outputs)
            return (unmerge(out[0]), *out[1:])
        return unmerge(out)


@contextmanager
def merged_processors(blocks, attr, grid, ratio):
    handles, saved = [], []
    for block in blocks:
        attn = getattr(block, attr)
        proc = MergedAttention(attn.processor, grid, ratio)
        saved.append((attn, attn.processor))
        attn.processor = proc

        def keep(mod, args, kwargs, proc=proc):
            proc.block_input = args[0] if args else kwargs["hidden_states"]

        handles.append(block.register_forward_pre_hook(keep, with_kwargs=True))
    try:
        yield
    finally:
        for hnd in handles:
            hnd.remove()
        for attn, proc in saved:
            attn.processor = proc


@pytest.mark.parametrize("family", ["pixart", "sd3"])
def test_token_merging_on_transformers_matches_tomesds_merge(family):
    """PixArt's self-attention and SD3's joint attention (its image tokens; the text tokens attend
    and are attended to unmerged); every block is at the finest grid."""
    pipe, size, extra = _pipe(family)
    kw = _kw(pipe, size, extra, 4)
    tr = pipe.transformer
    side = size // pipe.vae_scale_factor // tr.config.patch_size
    attr = "attn1" if family == "pixart" else "attn"
    with merged_processors(tr.transformer_blocks, attr, (side, side), 0.5):
        ref = pipe(**kw).images
    base = pipe(**kw).images
    with control(pipe, [TokenMerging(ratio=0.5, rand=False)]):
        out = pipe(**kw).images
    _close(out, ref, base)


def test_tomesd_cannot_run_pixart_and_attnlab_can():
    """Pinned defect of tomesd: its copied block forward knows no `ada_norm_single` (it skips
    PixArt's modulation and asks for a `norm3` these blocks do not have), so it fails on PixArt even
    when it merges nothing (ratio 0); attnlab's merging at ratio 0 is the bare pipeline."""
    pipe, size, extra = _pipe("pixart")
    kw = _kw(pipe, size, extra, 3)
    base = pipe(**kw).images
    with tomesd_patch(pipe, ratio=0.0), pytest.raises(AttributeError, match="norm3"):
        pipe(**kw)
    with control(pipe, [TokenMerging(ratio=0.0)]):
        _close(pipe(**kw).images, base)


def test_token_merging_refuses_flux_for_its_rotary_positions():
    pipe, _, _ = _pipe("flux")
    with pytest.raises(ConfigError, match="RoPE"):
        with control(pipe, [TokenMerging()]):
            pass


def test_random_destinations_come_from_the_sample_seeds_not_the_global_generator():
    """Pinned difference: tomesd forks torch's global generator at its first merge and draws one
    destination per cell for the whole batch; attnlab draws each row's from its sample's seed (the
    host's `seeds`), so a sample does not depend on the global generator or on its batch."""
    pipe, size, extra = _pipe("sd")
    kw = _kw(pipe, size, extra, 3)

    def tomesd_run(global_seed):
        torch.manual_seed(global_seed)
        with tomesd_patch(pipe, ratio=0.5, use_rand=True):
            return pipe(**kw).images

    def ours(global_seed, seeds, batch=2):
        torch.manual_seed(global_seed)
        with control(pipe, [TokenMerging(ratio=0.5)], seeds=seeds):
            return pipe(**_kw(pipe, size, extra, 3, batch=batch)).images

    assert _far(tomesd_run(1), tomesd_run(0))
    a = ours(0, [3, 4])
    torch.testing.assert_close(ours(1, [3, 4]), a, rtol=0, atol=0)
    assert _far(ours(0, [5, 6]), a)
    _close(ours(0, [3], batch=1), a[:1])
    with control(pipe, [TokenMerging(ratio=0.5, rand=False)]):
        assert _far(a, pipe(**kw).images)  # the draws mattered


def test_hosted_downsample_counts_from_the_finest_attention_grid():
    pipe, size, extra = _pipe("sdxl")
    seen = {}

    class Probe(TokenMerging):
        def before(self, call, x):
            seen[call.name] = (x.shape[1], self.merges(call.name, call.layer, x.shape[1]))
            return super().before(call, x)

    with control(pipe, [Probe(ratio=0.5, rand=False)]):
        pipe(**_kw(pipe, size, extra, 1))
    finest = max(n for n, _ in seen.values())
    assert {n for n, m in seen.values() if m} == {finest}
    assert finest == (size // pipe.vae_scale_factor // 2) ** 2  # half the latent's side
