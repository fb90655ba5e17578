"""The model config: one typed dataclass for every backbone, validated once, and the named presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from attnlab.errors import ConfigError, check

BACKBONES = ("unet", "dit", "diffusers", "points", "tokens")
CONDS = ("none", "class", "text")


@dataclass
class ModelConfig:
    """Which denoiser to build. One config builds the same model, with the same layer names, every time.

    Attributes:
        backbone: "unet" (convolutional U-Net with attention at chosen resolutions) or "dit"
            (a transformer over patches, Peebles & Xie 2023); "points" (a point transformer over
            farthest-point groups of a 3D point cloud, `attnlab.models.points`).
        dims: 2 for images (B, C, H, W), 1 for audio (B, C, T).
        in_channels: data channels (3 for RGB, 1 for audio); the output has as many.
        size: image side H = W, or audio length T.
        width: U-Net base channels (level i has width * channel_mult[i]); DiT hidden size.
        channel_mult: U-Net channel multiplier per resolution level (one level per entry).
        num_res_blocks: U-Net residual blocks per down level (up levels get one more, for the skips).
        attn_resolutions: U-Net feature sizes (H of the map, or T for audio) whose blocks get attention.
        mid_attention: whether the U-Net middle block has attention.
        heads: attention heads of every attention layer.
        mlp_ratio: width of the MLP in transformer blocks relative to the tokens; None = the
            backbone's default (DiT 4; U-Net 0, as in ADM: its residual blocks already mix channels).
        norm_groups: U-Net GroupNorm groups (capped so that it divides the channels). Few groups keep
            GroupNorm fast on channels-last maps on CPU.
        cond: "none", "class" (labels, -1 = null) or "text" (token features + padding mask).
        num_classes: number of classes when cond="class".
        context_dim: width of the text token features (MiniLM: 384).
        patch: DiT patch side (a patch is patch x patch pixels, or patch samples for audio).
        depth: DiT transformer blocks.
        techniques: architectural techniques by registry name -> options (empty: the base model).
        diffusers_class: with backbone "diffusers", the diffusers denoiser class to train
            (UNet2DConditionModel, PixArtTransformer2DModel, DiTTransformer2DModel).
        diffusers_config: its constructor's arguments; the data's fields (sample size, channels,
            text width, classes) are filled in (`attnlab.models.diffusers_backbone`).
        groups: with backbone "points" (dims 1, size = points per cloud, in_channels 3), the
            farthest-point centres, one token each; 0 = 2 * size // patch. There `patch` is the
            neighbours pooled into each group token (`attnlab.models.points`).
        With backbone "tokens" (a bidirectional transformer over token ids, `attnlab.models.tokens`):
            dims 1, size = sequence length, in_channels = vocabulary size (the logits per position),
            cond "text" = a sequence of condition token ids, context_dim = their vocabulary size.
    """

    backbone: Literal["unet", "dit", "diffusers", "points", "tokens"] = "unet"
    dims: Literal[1, 2] = 2
    in_channels: int = 3
    size: int = 16
    width: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (8,)
    mid_attention: bool = True
    heads: int = 4
    mlp_ratio: float | None = None
    norm_groups: int = 8
    cond: Literal["none", "class", "text"] = "none"
    num_classes: int = 0
    context_dim: int = 384
    patch: int = 2
    depth: int = 6
    techniques: dict[str, dict[str, Any]] = field(default_factory=dict)
    diffusers_class: str = ""
    diffusers_config: dict[str, Any] = field(default_factory=dict)
    groups: int = 0

    def __post_init__(self):
        self.channel_mult = _int_tuple("channel_mult", self.channel_mult)
        self.attn_resolutions = _int_tuple("attn_resolutions", self.attn_resolutions)
        self.techniques = _techniques(self.techniques)
        self.validate()

    def sample_shape(self, *batch: int) -> tuple[int, ...]:
        """(C, *spatial) of one sample of the config's data; `sample_shape(n)` is (n, C, *spatial);
        on the tokens backbone a sample is `size` token ids: (n, size)."""
        if self.backbone == "tokens":
            return (*batch, self.size)
        return (*batch, self.in_channels, *([self.size] * self.dims))

    # Validation

    def validate(self) -> None:
        """Raise ConfigError naming the first field whose value is not allowed."""
        check(self.backbone in BACKBONES, "model.backbone", self.backbone, f"one of {', '.join(BACKBONES)}")
        check(self.dims in (1, 2), "model.dims", self.dims, "1 (audio) or 2 (images)")
        check(self.cond in CONDS, "model.cond", self.cond, f"one of {', '.join(CONDS)}")
        for key in ("in_channels", "size", "width", "heads", "context_dim", "norm_groups"):
            check(_is_int(getattr(self, key), 1), f"model.{key}", getattr(self, key), "a positive integer")
        check(self.width % self.heads == 0, "model.heads", self.heads, f"a divisor of width={self.width}")
        ratio_ok = self.mlp_ratio is None or (
            isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio >= 0
        )
        check(ratio_ok, "model.mlp_ratio", self.mlp_ratio, "None or a number >= 0")
        if self.cond == "class":
            check(
                _is_int(self.num_classes, 1),
                "model.num_classes",
                self.num_classes,
                "at least 1 when cond=class",
            )
        if self.backbone == "diffusers":
            from attnlab.models.diffusers_backbone import check_config

            check_config(self)
            return
        if self.backbone == "points":
            self._validate_points()
            return
        if self.backbone == "tokens":
            self._validate_tokens()
            return
        (self._validate_unet if self.backbone == "unet" else self._validate_dit)()

    def _validate_unet(self) -> None:
        mult = self.channel_mult
        check(bool(mult), "model.channel_mult", mult, "at least one level")
        check(
            _is_int(self.num_res_blocks, 1), "model.num_res_blocks", self.num_res_blocks, "a positive integer"
        )
        down = 2 ** (len(mult) - 1)
        check(self.size % down == 0, "model.size", self.size, f"a multiple of {down} for {len(mult)} levels")
        for m in mult:
            check(
                (self.width * m) % self.heads == 0,
                "model.heads",
                self.heads,
                "a divisor of every level's channels",
            )
        sizes = self.feature_sizes()
        for r in self.attn_resolutions:
            check(r in sizes, "model.attn_resolutions", self.attn_resolutions, f"feature sizes among {sizes}")

    def _validate_dit(self) -> None:
        check(
            _is_int(self.patch, 1) and self.size % self.patch == 0,
            "model.patch",
            self.patch,
            f"a divisor of size={self.size}",
        )
        check(_is_int(self.depth, 1), "model.depth", self.depth, "a positive integer")
        # the fixed sin-cos positions spend half the width on each axis, in sin/cos pairs
        step = 2 * self.dims
        check(
            self.width % step == 0, "model.width", self.width, f"a multiple of {step} for a {self.dims}D DiT"
        )

    def _validate_points(self) -> None:
        check(self.dims == 1, "model.dims", self.dims, "1 for point clouds (B, 3, N)")
        check(self.in_channels == 3, "model.in_channels", self.in_channels, "3 (x, y, z) for point clouds")
        check(_is_int(self.depth, 1), "model.depth", self.depth, "a positive integer")
        check(
            _is_int(self.patch, 1) and self.patch <= self.size,
            "model.patch",
            self.patch,
            f"the neighbours per group, 1 to size={self.size}",
        )
        ok = isinstance(self.groups, int) and 0 <= self.groups <= self.size
        check(ok, "model.groups", self.groups, f"0 (2 * size // patch) or 1 to size={self.size} centres")

    def _validate_tokens(self) -> None:
        check(self.dims == 1, "model.dims", self.dims, "1 for token sequences (B, L)")
        check(_is_int(self.depth, 1), "model.depth", self.depth, "a positive integer")
        check(self.in_channels >= 3, "model.in_channels", self.in_channels, "the vocabulary size (>= 3)")
        check(self.cond in ("none", "text"), "model.cond", self.cond, "none or text for the tokens backbone")
        check(self.width % 2 == 0, "model.width", self.width, "an even width (sin-cos positions)")

    # Derived values

    @property
    def modality(self) -> int | str:
        """What the techniques' `modalities` name: "points" / "tokens" on those backbones, else dims."""
        return self.backbone if self.backbone in ("points", "tokens") else self.dims

    def point_groups(self) -> int:
        """The points backbone's group tokens."""
        return self.groups or max(1, min(self.size, 2 * self.size // self.patch))

    def feature_sizes(self) -> list[int]:
        """U-Net feature-map size (H, or T for audio) at each level, top to bottom."""
        return [self.size // 2**i for i in range(len(self.channel_mult))]

    def block_mlp_ratio(self) -> float:
        if self.mlp_ratio is not None:
            return float(self.mlp_ratio)
        return 4.0 if self.backbone in ("dit", "points", "tokens") else 0.0

    # (De)serialisation

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["channel_mult"], d["attn_resolutions"] = list(self.channel_mult), list(self.attn_resolutions)
        return native_keys(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a plain dict (JSON, YAML); an unknown key is a ConfigError naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"model.{unknown[0]} is not a model option; options: {', '.join(sorted(known))}"
            )
        return cls(**d)


def native_keys(d: dict[str, Any]) -> dict[str, Any]:
    """A model dict without the diffusers-backbone keys when the backbone is attnlab's own, so
    configs, checkpoints and stage fingerprints of every native model read as before the keys
    existed."""
    if d.get("backbone") != "diffusers":
        d.pop("diffusers_class", None)
        d.pop("diffusers_config", None)
    if d.get("backbone") != "points":
        d.pop("groups", None)
    return d


def _int_tuple(key: str, value) -> tuple[int, ...]:
    ok = isinstance(value, (list, tuple)) and all(_is_int(v, 1) for v in value)
    check(ok, f"model.{key}", value, "a list of positive integers")
    return tuple(value)


def _techniques(value) -> dict[str, dict[str, Any]]:
    """Normalise `techniques` to {name: {option: value}}; None as options means the defaults."""
    ok = isinstance(value, Mapping) and all(
        isinstance(k, str) and (v is None or isinstance(v, Mapping)) for k, v in value.items()
    )
    check(ok, "model.techniques", value, "a mapping of technique name -> options mapping")
    return {k: dict(v or {}) for k, v in value.items()}


def _is_int(v, lo: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


# Presets (named factories; a factory takes overrides, e.g. PRESETS["unet-tiny"](cond="text"))


def _preset(**base) -> Callable[..., ModelConfig]:
    def make(**overrides) -> ModelConfig:
        return ModelConfig(**{**base, **overrides})

    return make


PRESETS: dict[str, Callable[..., ModelConfig]] = {
    "unet-tiny": _preset(backbone="unet", width=32, channel_mult=(1, 2), attn_resolutions=(8,), heads=2),
    "unet-small": _preset(
        backbone="unet", width=64, channel_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8, 4), heads=4
    ),
    "unet-base": _preset(
        backbone="unet", width=96, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8, 4), heads=4
    ),
    "dit-tiny": _preset(backbone="dit", width=96, depth=4, heads=3, patch=2),
    "dit-small": _preset(backbone="dit", width=192, depth=8, heads=6, patch=2),
    "points-tiny": _preset(
        backbone="points", dims=1, in_channels=3, size=512, width=96, depth=4, heads=4, patch=16
    ),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The preset `name` with fields overridden; an unknown name is a ConfigError listing the presets."""
    if name not in PRESETS:
        raise ConfigError(f"model preset {name!r} is unknown; presets: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)
