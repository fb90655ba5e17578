"""Which blocks an architectural technique acts on: U-Net feature sizes or DiT block indices."""

from __future__ import annotations

from attnlab.errors import ConfigError
from attnlab.models.specs import Where


def _int_tuple(owner: str, key: str, value) -> tuple[int, ...] | None:
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    )
    if not ok:
        raise ConfigError(
            f"model.techniques.{owner}.{key}={value!r} is not allowed: expected a list of integers"
        )
    return tuple(value)


class Scope:
    """The blocks a technique selects.

    Args:
        owner: the technique's registry name (for error messages).
        resolutions: U-Net feature sizes (H, or T for audio); None selects every one.
        blocks: DiT block indices (0-based); None selects every block.
    """

    def __init__(self, owner: str, resolutions=None, blocks=None):
        self.owner = owner
        self.resolutions = _int_tuple(owner, "resolutions", resolutions)
        self.blocks = _int_tuple(owner, "blocks", blocks)

    def contains(self, where: Where) -> bool:
        if where.side == "block":
            return self.blocks is None or where.index in self.blocks
        return self.resolutions is None or where.size in self.resolutions

    def check(self, cfg) -> None:
        """Each option belongs to the model's backbone and names blocks the model has."""
        key = f"model.techniques.{self.owner}"
        if cfg.backbone == "unet":
            if self.blocks is not None:
                raise ConfigError(f"{key}.blocks is a DiT option; a U-Net selects by resolutions")
            sizes = cfg.feature_sizes()
            bad = [r for r in self.resolutions or () if r not in sizes]
            if bad:
                raise ConfigError(
                    f"{key}.resolutions={list(self.resolutions)}: {bad[0]} is not a feature size {sizes}"
                )
        else:
            if self.resolutions is not None:
                raise ConfigError(f"{key}.resolutions is a U-Net option; a DiT selects by blocks")
            bad = [b for b in self.blocks or () if not 0 <= b < cfg.depth]
            if bad:
                raise ConfigError(
                    f"{key}.blocks={list(self.blocks)}: {bad[0]} is not a block index 0..{cfg.depth - 1}"
                )
