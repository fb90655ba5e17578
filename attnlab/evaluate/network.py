"""The evaluator network: a small CNN (2D images or 1D audio) with image-level and dense heads.

One encoder serves both jobs of evaluation. Its pooled bottleneck, after one linear layer, is the
"penultimate" embedding the heads read (as Inception's pool layer is for Heusel et al., 2017).
The vector FID/KID compare is that embedding plus a texture block: the log energy of each stem
filter's response, standardised on the training data and weighted to a quarter of the embedding's
variance. The heads are trained to see through blur and noise (so they read imperfect samples),
which leaves the embedding nearly blind to them; the texture block keeps FID sensitive to
blurred, noisy or over-sharp samples while content (shape, colour, layout) still dominates. Heads read labels off it: `global_heads` from the pooled features (class,
count, which shapes/colours are present) and `dense_heads` per pixel or per frame at the
resolution of encoder level `dense_level`, reached through a U-Net-style decoder (Ronneberger et
al., 2015, with skips added rather than concatenated, to keep it cheap on a CPU); dense outputs are
decoded into objects or notes with their attributes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.errors import ConfigError


@dataclass
class EvaluatorConfig:
    """Shape of an evaluator network.

    Attributes:
        dims: 2 for images, 1 for audio.
        in_channels: image channels (1 or 3) or 1 for audio.
        input_size: images are resized to input_size x input_size first (one size for 16-64 px data);
            audio is not resized (its frequencies would move) and input_size is unused.
        width: channels of the first level; levels use width * mult.
        mult: channel multipliers per level; every level after the first halves the resolution.
        feature_dim: length of the feature vector FID/KID use.
        global_heads: head name -> (kind, size), kind "class" (softmax) or "multi" (sigmoids).
        dense_heads: head name -> (kind, size) predicted per pixel / per frame.
        dense_level: encoder level whose grid the dense heads predict on (0: the input grid,
            -1: the coarsest level).
        stft_sizes: 1D only: window lengths of log-magnitude STFT front ends, stacked as channels,
            so the CNN runs over frames with frequency bins as channels (cheap, and pitch is
            explicit); a long window resolves pitch, a short one resolves time. Empty: raw samples.
        stft_hop: samples between STFT frames (all sizes share it).
    """

    dims: Literal[1, 2] = 2
    in_channels: int = 3
    input_size: int = 32
    width: int = 16
    mult: tuple[int, ...] = (1, 2, 4, 4)
    feature_dim: int = 128
    global_heads: dict[str, tuple[str, int]] = field(default_factory=dict)
    dense_heads: dict[str, tuple[str, int]] = field(default_factory=dict)
    dense_level: int = 1
    stft_sizes: tuple[int, ...] = ()
    stft_hop: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EvaluatorConfig:
        d = dict(d)
        d["mult"] = tuple(d.get("mult", cls.mult))
        d["stft_sizes"] = tuple(d.get("stft_sizes", ()))
        for key in ("global_heads", "dense_heads"):
            d[key] = {k: (str(v[0]), int(v[1])) for k, v in d.get(key, {}).items()}
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"evaluator config: unknown keys {sorted(unknown)}")
        return cls(**d)


def _conv(dims: int, cin: int, cout: int, k: int, stride: int = 1) -> nn.Module:
    conv = nn.Conv2d if dims == 2 else nn.Conv1d
    return conv(cin, cout, k, stride=stride, padding=k // 2)


class ConvBlock(nn.Sequential):
    """conv -> GroupNorm -> SiLU; GroupNorm keeps a sample's output independent of its batch."""

    def __init__(self, dims: int, cin: int, cout: int, k: int, stride: int = 1):
        super().__init__(_conv(dims, cin, cout, k, stride), nn.GroupNorm(min(8, cout), cout), nn.SiLU())


class EvaluatorNet(nn.Module):
    """Encoder -> pooled features -> global heads; encoder (+ decoder for 2D) -> dense heads.

    forward(x) returns {"features": (B, feature_dim), <global head>: (B, size),
    <dense head>: (B, size, *grid)}, where grid is the grid of encoder level `dense_level`
    (input_size / 2**level for 2D, about T / 2**level frames for 1D).
    """

    def __init__(self, cfg: EvaluatorConfig):
        super().__init__()
        self.cfg = cfg
        d, chans = cfg.dims, [cfg.width * m for m in cfg.mult]
        raw_audio = d == 1 and not cfg.stft_sizes
        k = 9 if raw_audio else 3  # on raw audio a wider kernel spans a few periods of a low note
        cin = sum(n // 2 + 1 for n in cfg.stft_sizes) or cfg.in_channels  # STFT bins are the channels
        self.stem = nn.Sequential(ConvBlock(d, cin, chans[0], 15 if raw_audio else 3))
        for n in cfg.stft_sizes:
            self.register_buffer(f"window_{n}", torch.hann_window(n), persistent=False)
        self.down = nn.ModuleList(
            nn.Sequential(ConvBlock(d, cin, cout, k, stride=2), ConvBlock(d, cout, cout, k))
            for cin, cout in zip(chans[:-1], chans[1:])
        )
        self.embed = nn.Sequential(nn.Linear(chans[-1], cfg.feature_dim), nn.SiLU())
        self.global_heads = nn.ModuleDict(
            {n: nn.Linear(cfg.feature_dim, s) for n, (_, s) in cfg.global_heads.items()}
        )
        self.dense_level = cfg.dense_level % len(chans)
        skips = chans[self.dense_level : -1][::-1] if cfg.dense_heads else []  # decoder levels, deepest first
        deeps = [chans[-1], *skips[:-1]]
        self.lateral = nn.ModuleList(_conv(d, cd, cs, 1) for cd, cs in zip(deeps, skips))
        self.up = nn.ModuleList(ConvBlock(d, cs, cs, k) for cs in skips)
        dense_out = sum(s for _, s in cfg.dense_heads.values())
        self.dense = _conv(d, chans[self.dense_level], dense_out, 1) if dense_out else None
        # Texture statistics of the training data (see `calibrate_texture`); weight 0 until calibrated.
        self.register_buffer("texture_mean", torch.zeros(chans[0]))
        self.register_buffer("texture_std", torch.ones(chans[0]))
        self.register_buffer("texture_weight", torch.zeros(()))

    @property
    def dense_stride(self) -> int:
        """Input pixels / samples per dense-head cell along each axis."""
        return 2**self.dense_level * (self.cfg.stft_hop if self.cfg.stft_sizes else 1)

    @property
    def num_features(self) -> int:
        """Length of the FID/KID feature vector: the embedding plus one texture value per stem filter."""
        return self.cfg.feature_dim + self.stem[0][0].out_channels

    def texture(self, x: Tensor) -> Tensor:
        """(B, stem filters) log energy of the stem convolution's responses, before normalisation."""
        response = self.stem[0][0](self.prepare(x))
        return torch.log(response.pow(2).flatten(2).mean(-1) + 1e-4)

    @torch.no_grad()
    def calibrate_texture(self, batches: list[Tensor], share: float = 0.25) -> None:
        """Standardise the texture block on training data and weight it so its total variance is
        `share` of the embedding's."""
        emb = torch.cat([self.embed(self.encode(x)[-1].flatten(2).mean(-1)) for x in batches])
        tex = torch.cat([self.texture(x) for x in batches])
        self.texture_mean.copy_(tex.mean(0))
        self.texture_std.copy_(tex.std(0).clamp(min=1e-3))
        self.texture_weight.fill_(float((share * emb.var(0).sum() / tex.shape[1]).sqrt()))

    def features(self, x: Tensor) -> Tensor:
        """(B, num_features): the embedding and the weighted, standardised texture block."""
        emb = self.embed(self.encode(x)[-1].flatten(2).mean(-1))  # (B, feature_dim)
        tex = (self.texture(x) - self.texture_mean) / self.texture_std * self.texture_weight
        return torch.cat([emb, tex], 1)

    def prepare(self, x: Tensor) -> Tensor:
        """Bring a batch to the network's input: 2D resized to input_size, grey <-> RGB matched;
        1D with `stft_sizes`: the log-magnitude spectrograms, stacked."""
        x = x.float()
        if self.cfg.dims == 2:
            if x.shape[-1] != self.cfg.input_size or x.shape[-2] != self.cfg.input_size:
                x = F.interpolate(x, size=(self.cfg.input_size,) * 2, mode="bilinear", antialias=True)
            if x.shape[1] != self.cfg.in_channels:
                x = (
                    x.mean(1, keepdim=True)
                    if self.cfg.in_channels == 1
                    else x.expand(-1, self.cfg.in_channels, -1, -1)
                )
        elif self.cfg.stft_sizes:
            x = torch.cat([self._log_stft(x.mean(1), n) for n in self.cfg.stft_sizes], 1)  # (B, bins, frames)
        return x

    def _log_stft(self, x: Tensor, n_fft: int) -> Tensor:
        window = getattr(self, f"window_{n_fft}")
        spec = torch.stft(x, n_fft, self.cfg.stft_hop, window=window, center=True, return_complex=True)
        return torch.log1p(spec.abs())  # (B, n_fft // 2 + 1, 1 + T // hop)

    def encode(self, x: Tensor) -> list[Tensor]:
        """Feature maps per level, finest first."""
        maps = [self.stem(self.prepare(x))]
        for level in self.down:
            maps.append(level(maps[-1]))
        return maps

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        maps = self.encode(x)
        features = self.embed(maps[-1].flatten(2).mean(-1))  # (B, feature_dim)
        out = {"features": features}
        out.update({name: head(features) for name, head in self.global_heads.items()})
        if self.dense is not None:
            out.update(self._dense(maps))
        return out

    def _dense(self, maps: list[Tensor]) -> dict[str, Tensor]:
        h = maps[-1]
        for lateral, block, skip in zip(self.lateral, self.up, maps[self.dense_level : -1][::-1]):
            h = F.interpolate(lateral(h), size=skip.shape[2:], mode="nearest")  # (B, c_skip, *grid of skip)
            h = block(h + skip)
        logits = self.dense(h)  # (B, sum of dense sizes, *grid)
        sizes = [s for _, s in self.cfg.dense_heads.values()]
        return dict(zip(self.cfg.dense_heads, logits.split(sizes, dim=1)))


class FeatureNet(nn.Module):
    """The evaluator's FID/KID feature vector alone: x -> (B, num_features)."""

    def __init__(self, net: EvaluatorNet):
        super().__init__()
        self.net = net
        self.num_features = net.num_features

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)
