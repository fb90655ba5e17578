"""Token merging (ToMe, Bolya et al. 2023, arXiv:2210.09461; for diffusion, Bolya & Hoffman 2023,
arXiv:2303.17604): before self-attention, similar tokens are merged by bipartite soft matching; after
it, every merged token gets its destination's output back, so the layer keeps its token grid.

The defaults are tomesd's (`apply_patch(ratio=0.5, max_downsample=1, sx=2, sy=2, use_rand=True)`):
similarity is measured on the block's input before the norm (tomesd's `compute_merge(x)`) while the
normalised attention input is what gets merged; each 2x2 cell's destination is drawn at random; and
only the finest resolution that has self-attention merges. Where tomesd draws one destination per
cell for the whole batch from a forked global generator, each row here draws its own from its
sample's seed, the step and the layer name, so a sample never depends on the batch around it.

One class serves both uses: a sampling-time control on a trained model (training-free, as in
tomesd) and, through `model.techniques.tome`, a control the model carries from its construction, so
it is trained with the merging it samples with.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from attnlab.attention import AttnCall, Control, attention_grids, attention_layers, select_layers
from attnlab.errors import ConfigError
from attnlab.techniques import register

Unmerge = Callable[[Tensor], Tensor]


# Partition


def plane(grid: tuple[int, ...]) -> tuple[int, int]:
    """(h, w) of a token grid: a 1D grid (T,) is one row."""
    return (grid[0], grid[1]) if len(grid) == 2 else (1, grid[0])


def cells(grid: tuple[int, ...], stride: int) -> tuple[int, int, int, int]:
    """(rows, cols, sy, sx): the whole sy x sx cells that hold one destination each. A 2D grid has
    stride x stride cells (tomesd's sx = sy = stride); a 1D grid is one row of 1 x stride cells."""
    h, w = plane(grid)
    sy, sx = (stride, stride) if len(grid) == 2 else (1, stride)
    return h // sy, w // sx, sy, sx


def partition(grid: tuple[int, ...], stride: int, choice: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(dst (B', D), src (B', S)) token indices of the row-major grid, each in ascending order.

    Args:
        grid: the token grid.
        stride: cell side (see `cells`).
        choice: (B, rows, cols) each cell's destination, k meaning (k // sx, k % sx) inside the cell
            (tomesd's layout); None: the top-left token of every cell (tomesd's `no_rand`), B' = 1.
    Tokens outside the whole cells (a grid the stride does not divide) are all sources, as in tomesd.
    """
    if choice is None:
        return _fixed_partition(tuple(grid), stride)
    hc, wc, sy, sx = cells(grid, stride)
    b = choice.shape[0]
    in_cell = torch.zeros(b, hc, wc, sy * sx, dtype=torch.bool, device=choice.device)
    in_cell.scatter_(3, choice[..., None], True)
    is_dst = torch.zeros(b, *plane(grid), dtype=torch.bool, device=choice.device)  # (B, h, w)
    cell_maps = in_cell.view(b, hc, wc, sy, sx).transpose(2, 3)  # (B, rows, sy, cols, sx)
    is_dst[:, : hc * sy, : wc * sx] = cell_maps.reshape(b, hc * sy, wc * sx)
    order = (~is_dst.flatten(1)).to(torch.uint8).argsort(dim=1, stable=True)  # (B, N) dst first, then src
    return order[:, : hc * wc], order[:, hc * wc :]


@lru_cache(maxsize=64)
def _fixed_partition(grid: tuple[int, ...], stride: int) -> tuple[Tensor, Tensor]:
    hc, wc, _, _ = cells(grid, stride)
    return partition(grid, stride, torch.zeros(1, hc, wc, dtype=torch.long))


def merge_count(grid: tuple[int, ...], ratio: float, stride: int) -> int:
    """How many of the grid's N tokens `ratio` removes: int(ratio * N), at most the sources (so the
    ratio is capped at 1 - 1/stride^2 on a grid the stride divides, as tomesd caps it silently)."""
    hc, wc, _, _ = cells(grid, stride)
    n = math.prod(grid)
    return 0 if hc * wc == 0 else min(int(ratio * n), n - hc * wc)


def destination_seed(seed: int, step: int, name: str) -> int:
    """The 64-bit seed of one row's destination draw: numpy's SeedSequence mixes the sample's seed,
    the sampling step and the CRC-32 of the layer name (as the trainer mixes seed, step and rank)."""
    words = np.random.SeedSequence([int(seed) % 2**64, step, zlib.crc32(name.encode())]).generate_state(
        2, dtype=np.uint32
    )
    return int(words[0]) << 32 | int(words[1])


@lru_cache(maxsize=4096)
def destination_choice(seed: int, step: int, name: str, grid: tuple[int, ...], stride: int) -> Tensor:
    """(rows, cols) one row's random destination per cell: tomesd's draw,
    `torch.randint(sy * sx, (rows, cols, 1), generator=g)`, from g seeded by `destination_seed`."""
    hc, wc, sy, sx = cells(grid, stride)
    g = torch.Generator().manual_seed(destination_seed(seed, step, name))
    return torch.randint(sy * sx, (hc, wc, 1), generator=g)[..., 0]


# Matching


def bipartite_merge(
    x: Tensor,
    grid: tuple[int, ...],
    r: int,
    stride: int = 2,
    *,
    metric: Tensor | None = None,
    choice: Tensor | None = None,
) -> tuple[Tensor, Unmerge]:
    """Merge r grid tokens of `x` into their most similar destination (Bolya et al. 2023, Alg. 1;
    tomesd's `bipartite_soft_matching_random2d`).

    Sources and destinations split the grid (one destination per stride cell), each source picks its
    most cosine-similar destination, and the r sources with the best matches are averaged into theirs.

    Args:
        x: (B, N, C) tokens; the first prod(grid) are the grid in row-major order, any after it
            (e.g. in-context condition tokens) pass through unmerged.
        grid: the token grid.
        r: tokens to remove (at most the sources).
        stride: side of the cell that holds one destination.
        metric: (B, N, C'') the tokens whose cosine similarity decides the matching (default x).
        choice: (B, rows, cols) each cell's destination (see `partition`); None: top-left.
    Returns:
        (merged (B, N - r, C): the unmerged sources, most similar first, then the destinations in
        grid order, then the extra tokens; unmerge: (B, N - r, C') -> (B, N, C')).
    """
    b, n, c = x.shape
    g = math.prod(grid)
    dst, src = (i.to(x.device) for i in partition(tuple(grid), stride, choice))  # (B', D), (B', S)
    n_dst, n_src = dst.shape[1], src.shape[1]
    r = min(r, n_src)
    metric = x if metric is None else metric

    def pick(t: Tensor, idx: Tensor) -> Tensor:  # rows idx (B', k) of t (B, M, C) -> (B, k, C)
        return t.gather(1, idx[..., None].expand(t.shape[0], -1, t.shape[-1]))

    with torch.no_grad():  # the matching is a discrete choice; gradients flow through the averages
        m = metric[:, :g] / metric[:, :g].norm(dim=-1, keepdim=True).clamp_min(1e-6)
        scores = pick(m, src) @ pick(m, dst).transpose(1, 2)  # (B, S, D) cosine similarities
        best, best_dst = scores.max(dim=-1)  # (B, S) each source's closest destination
        order = best.argsort(dim=-1, descending=True)  # (B, S) most similar sources first
        merged_src, kept_src = order[:, :r], order[:, r:]  # positions in `src`
        into = best_dst.gather(1, merged_src)  # (B, r) destination position of each merged source

    x_src, x_dst = pick(x[:, :g], src), pick(x[:, :g], dst)  # (B, S, C), (B, D, C)
    dst_mean = x_dst.scatter_reduce(1, into[..., None].expand(-1, -1, c), pick(x_src, merged_src), "mean")
    merged = torch.cat([pick(x_src, kept_src), dst_mean, x[:, g:]], dim=1)  # (B, S - r + D + N - G, C)
    n_kept = n_src - r

    def unmerge(y: Tensor) -> Tensor:
        kept, y_dst, y_extra = y[:, :n_kept], y[:, n_kept : n_kept + n_dst], y[:, n_kept + n_dst :]
        cy = y.shape[-1]
        y_src = y.new_empty(b, n_src, cy)  # (B, S, C')
        y_src.scatter_(1, kept_src[..., None].expand_as(kept), kept)
        y_src.scatter_(1, merged_src[..., None].expand(-1, -1, cy), pick(y_dst, into))
        out = y.new_empty(b, g, cy)  # (B, G, C') back on the grid
        out.scatter_(1, dst[..., None].expand(b, -1, cy), y_dst)
        out.scatter_(1, src[..., None].expand(b, -1, cy), y_src)
        return torch.cat([out, y_extra], dim=1)

    return merged, unmerge


def downsamples(model: nn.Module, layers) -> dict[str, int]:
    """Each self-attention layer's downsample, tomesd's `ceil(sqrt(HW / tokens))` measured from the
    finest self-attention grid of the model instead of the latent: 1 at the finest grid, 2 at half
    its side, and so on (the token ratio itself on 1D grids). On a model that attends at its
    sample's resolution (Stable Diffusion's U-Net) the two agree; on one whose finest attention is
    coarser (attnlab's U-Nets, a DiT's patch grid) tomesd's default would merge nothing. Layers the
    model's grids do not list (a model without a config) count as the finest."""
    grids, kinds = attention_grids(model), {n: m.kind for n, m in attention_layers(model).items()}
    finest = max((math.prod(g) for n, g in grids.items() if kinds.get(n) == "self"), default=0)
    out = {}
    for layer in layers:
        grid = grids.get(layer.name)
        if grid is not None:
            ratio = finest // math.prod(grid)
            out[layer.name] = math.ceil(math.sqrt(ratio)) if len(grid) == 2 else ratio
    return out


def hosted_downsample(layer, n: int) -> int | None:
    """The downsample of a diffusers layer with n image tokens, tomesd's `ceil(sqrt(HW // n))` with
    HW the tokens of the denoiser's finest self-attention grid: the sample's grid over the patch
    size (transformers), and over 4 per level a U-Net's encoder runs without attention (SDXL's
    first level); None outside a hosted call."""
    host = getattr(layer, "host", None)
    if host is None or host.spatial is None:
        return None
    cfg = getattr(host.denoiser, "config", None) or {}
    patch = cfg.get("patch_size") or 1
    levels = list(cfg.get("down_block_types") or ())
    plain = next((i for i, t in enumerate(levels) if "Attn" in t), 0)
    finest = math.prod(host.spatial) // (patch * patch) // 4**plain
    return math.ceil(math.sqrt(finest // n)) if n else None


def joint_parts(call: AttnCall, out: Tensor) -> tuple[Tensor, Tensor, bool]:
    """(image outputs, text outputs, text first) of a joint layer's packed output (SD3: [image;
    text], Flux: [text; image]), whatever number of image tokens are left after merging."""
    n_txt = call.text.stop - call.text.start
    if call.text.start == 0:
        return out[:, n_txt:], out[:, :n_txt], True
    return out[:, : out.shape[1] - n_txt], out[:, out.shape[1] - n_txt :], False


# The technique


@register(
    "tome",
    level=1,
    paper="ToMe (Bolya et al., 2023, arXiv:2210.09461); ToMe for SD (Bolya & Hoffman, 2023, arXiv:2303.17604)",
    training_free=True,
    provides=("controls", "check", "attach"),
    modalities=(1, 2, "points"),
    pipelines=("sd", "sdxl", "pixart", "sd3"),
    pipelines_note="Flux rotates every token by its position (RoPE); a merged token stands for several",
    summary=(
        "merge similar tokens before self-attention, unmerge after: fewer tokens in q/k/v and the "
        "N^2 scores at the price of a matching step and some detail; tomesd's defaults; also a "
        "model option (model.techniques.tome) to train with it"
    ),
    modality_notes={
        "tokens": "merges similar tokens of an image or audio grid; every token of a sentence is predicted, so none can be merged away"
    },
)
@dataclass(eq=False)
class TokenMerging(Control):
    """Merge `ratio` of each selected self-attention layer's tokens (at most the sources of the
    stride cells) inside the sampling window [start, end), with tomesd's defaults.

    The matching is measured on the tokens before the block's norm (`AttnCall.pre_norm`, the
    attention input where a block does not pass them) and applied to the attention input.

    Where each cell's destination is (with `rand`): in a sampling run, row i draws it from a
    generator seeded by (its sample's seed, the step, the layer name) (`destination_seed`), the
    same for its uncond and cond rows and on every guidance pass of the step; a run without
    per-sample seeds, or a forward in eval mode outside one, uses seed 0 (step 0 outside a run), so
    every row gets the same choice. In training (a layer in train mode outside a sampling run) each
    row draws from torch's global generator, which the trainer seeds from each step's generator:
    the model trains on the random destinations it will meet when sampling. tomesd turns the
    randomness off for odd batches, so that prompted and unprompted rows computed apart agree;
    seeding per sample makes them agree anyway, so the batch size changes nothing here.

    On a joint image + text layer (SD3) only the image tokens merge: the text tokens attend and are
    attended to as they are, and only the image part of the output is unmerged. Flux is refused:
    its attention rotates every query and key by its token's position (RoPE), and a merged token
    stands for several positions.

    Args:
        ratio: fraction of the grid's tokens removed before attention (0 = the layer unchanged),
            capped at the sources, 1 - 1/stride^2 (tomesd's silent cap).
        stride: one destination token per stride x stride cell (tomesd's sx = sy; 1 x stride in 1D).
        rand: draw each cell's destination at random (tomesd's use_rand); False: its top-left token.
        max_downsample: merge only layers whose downsample (see `downsamples`: 1 at the model's
            finest self-attention grid, 2 at half its side, ...) is at most this; None: every layer.
        layers: self-attention layer name patterns (see `attnlab.attention.match_layer`).
        start, end: the sampling window, as fractions of the run (training: always on).
    """

    ratio: float = 0.5
    stride: int = 2
    rand: bool = True
    max_downsample: int | None = 1
    layers: str | tuple[str, ...] = "**"
    start: float = 0.0
    end: float = 1.0

    kind = "self"
    changes_tokens = True

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"tome: ratio must be in [0, 1), got {self.ratio}")
        if not isinstance(self.stride, int) or self.stride < 2:
            raise ConfigError(f"tome: stride must be an integer >= 2, got {self.stride!r}")
        if not isinstance(self.rand, bool):
            raise ConfigError(f"tome: rand must be true or false, got {self.rand!r}")
        md = self.max_downsample
        if md is not None and (isinstance(md, bool) or not isinstance(md, int) or md < 1):
            raise ConfigError(f"tome: max_downsample must be an integer >= 1 or null, got {md!r}")
        from attnlab.control.common import as_patterns, window

        self.window = window(self.start, self.end, "tome")
        self.layers = as_patterns(self.layers)
        self.downsample: dict[str, int] = {}  # layer name -> downsample, found at install

    def select(self, model: nn.Module):
        from attnlab.control.common import require_layers

        found = select_layers(model, self.layers, ("self", "joint"))
        require_layers("tome", model, found, self.layers, "self")
        rotary = [m.name for m in found if getattr(m, "family", None) == "flux"]
        if rotary:
            raise ConfigError(
                f"tome cannot merge Flux's attention ({rotary[0]}, ...): it rotates each query and key "
                "by its token's grid position (RoPE), and a merged token, the mean of several "
                "tokens, has no one position to rotate by; drop tome on Flux"
            )
        return found

    def on_install(self, model: nn.Module, layers) -> None:
        check_model(getattr(model, "config", None))
        self.downsample.update(downsamples(model, layers))

    def merges(self, name: str, layer=None, n: int = 0) -> bool:
        """Whether layer `name` merges at all (its downsample is within `max_downsample`); a
        diffusers layer's downsample is found at the call, from its n image tokens."""
        if self.max_downsample is None:
            return True
        down = self.downsample.get(name)
        if down is None and layer is not None:
            down = hosted_downsample(layer, n)
        return (down or 1) <= self.max_downsample

    def before(self, call: AttnCall, x: Tensor) -> Tensor:
        r = merge_count(call.grid, self.ratio, self.stride)
        n = x.shape[1]
        if r == 0 or n < math.prod(call.grid) or not self.merges(call.name, call.layer, n):
            return x  # nothing to merge, merged already, or too coarse a layer
        metric = call.pre_norm if call.pre_norm is not None and call.pre_norm.shape == x.shape else x
        choice = self.choice(call) if self.rand else None
        merged, call.scratch[id(self)] = bipartite_merge(
            x, call.grid, r, self.stride, metric=metric, choice=choice
        )
        return merged

    def choice(self, call: AttnCall) -> Tensor:
        """(B, rows, cols) each row's destination per cell (see the class docstring)."""
        hc, wc, sy, sx = cells(call.grid, self.stride)
        if call.step is None and call.layer.training:
            return torch.randint(sy * sx, (call.batch, hc, wc))  # the global generator (training)
        seeds = call.seeds or (0,) * call.batch
        step = call.step or 0
        return torch.stack([destination_choice(s, step, call.name, call.grid, self.stride) for s in seeds])

    def after(self, call: AttnCall, out: Tensor) -> Tensor:
        unmerge = call.scratch.get(id(self))
        if unmerge is None:
            return out
        if call.text is None:
            return unmerge(out)
        image, text, text_first = joint_parts(call, out)  # the text outputs were never merged
        return torch.cat([text, unmerge(image)] if text_first else [unmerge(image), text], dim=1)

    def check(self, cfg) -> None:
        """Config-time check for the architectural use (called by `check_techniques`)."""
        check_model(cfg)

    def attach(self, model: nn.Module) -> None:
        """Install for the model's whole life (the architectural use; `build_model` calls it)."""
        layers = self.select(model)
        self.on_install(model, layers)
        for layer in layers:
            layer.controls.append(self)


def check_model(cfg) -> None:
    """Merging cannot shrink a key padding mask it does not see, keep rotary positions, or leave
    windows whole."""
    techniques = getattr(cfg, "techniques", {}) or {}
    if "in_context" in techniques and cfg.cond == "text":
        raise ConfigError(
            "tome cannot merge a sequence that holds in-context text tokens with a padding mask; "
            "drop tome or use cond=class with in_context"
        )
    if "rope" in techniques:
        raise ConfigError("tome merges tokens across grid positions, so rope cannot rotate them; drop one")
    if "window_attention" in techniques:
        raise ConfigError(
            "tome leaves fewer tokens than the grid, which window_attention needs whole; drop one"
        )
