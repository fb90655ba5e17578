"""A diffusers denoiser as an attnlab backbone: `UNet2DConditionModel`, `PixArtTransformer2DModel`
or the class-conditional `DiTTransformer2DModel`, trained by attnlab's trainer on attnlab's data,
sampled by attnlab's loop and controlled through the diffusers host.

    model: {backbone: diffusers, cond: text, diffusers_class: UNet2DConditionModel,
            diffusers_config: {block_out_channels: [16, 32, 64], ...}}

The data decides the fields it fixes (sample size, in/out channels, the text width or the number
of classes); the rest is the class's own constructor arguments. Text tokens reach the model as
`encoder_hidden_states` with their padding mask; class labels as class labels, the null label as
one extra class. attnlab's architectural techniques change attnlab's own blocks, so they are
refused here.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from attnlab.conditioning import Condition
from attnlab.errors import ConfigError
from attnlab.precision import autocast

# class -> the conditions it takes
DENOISERS = {
    "UNet2DConditionModel": ("text", "class"),
    "PixArtTransformer2DModel": ("text",),
    "DiTTransformer2DModel": ("class",),
}


def _class(name: str):
    import diffusers

    if name not in DENOISERS:
        known = ", ".join(DENOISERS)
        if isinstance(getattr(diffusers, name, None), type):
            raise ConfigError(
                f"model.diffusers_class: {name} is not a denoiser attnlab trains; one of {known}"
            )
        raise ConfigError(f"model.diffusers_class: {name!r} is not a diffusers class; one of {known}")
    return getattr(diffusers, name)


def data_fields(cfg) -> dict:
    """The constructor arguments the data fixes, per class."""
    name, out = cfg.diffusers_class, {}
    if name == "UNet2DConditionModel":
        out = {"sample_size": cfg.size, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels}
        if cfg.cond == "text":
            out["cross_attention_dim"] = cfg.context_dim
        else:
            out["num_class_embeds"] = cfg.num_classes + 1  # the last one: the null label
            out["cross_attention_dim"] = cfg.diffusers_config.get("cross_attention_dim", 8)
    elif name == "PixArtTransformer2DModel":
        out = {"sample_size": cfg.size, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
               "caption_channels": cfg.context_dim}  # fmt: skip
    elif name == "DiTTransformer2DModel":
        out = {
            "sample_size": cfg.size,
            "in_channels": cfg.in_channels,
            "out_channels": cfg.in_channels,
            "num_embeds_ada_norm": cfg.num_classes,
        }  # fmt: skip  (DiT keeps one more: the null class)
    return out


def check_config(cfg) -> None:
    """Raise ConfigError for a class that is unknown or no denoiser, a condition it cannot take, a
    constructor key it does not have or that the data fixes, architectural techniques, or 1D data."""
    if not cfg.diffusers_class:
        raise ConfigError("model.diffusers_class: backbone diffusers needs a class: " + ", ".join(DENOISERS))
    cls = _class(cfg.diffusers_class)
    conds = DENOISERS[cfg.diffusers_class]
    if cfg.cond not in conds:
        raise ConfigError(
            f"model.cond: {cfg.diffusers_class} takes {' or '.join(conds)} conditions, got {cfg.cond!r}"
        )
    if cfg.dims != 2:
        raise ConfigError("model.dims: diffusers backbones are image models (dims 2)")
    if cfg.techniques:
        name = next(iter(cfg.techniques))
        raise ConfigError(
            f"model.techniques.{name}: attnlab's architectural techniques change attnlab's own blocks; "
            "a diffusers backbone takes its class's own options (model.diffusers_config)"
        )
    if cfg.cond == "class" and cfg.num_classes < 1:
        raise ConfigError("model.num_classes: at least 1 when cond=class")
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    for key in cfg.diffusers_config:
        if key not in params:
            raise ConfigError(
                f"model.diffusers_config.{key}: {cfg.diffusers_class} has no such argument; it takes "
                + ", ".join(sorted(params))
            )
    fixed = set(data_fields(cfg)) - {"cross_attention_dim"} if cfg.cond == "class" else set(data_fields(cfg))
    taken = sorted(fixed & set(cfg.diffusers_config))
    if taken:
        raise ConfigError(
            f"model.diffusers_config.{taken[0]}: set by the data (model.size, in_channels, context_dim, num_classes)"
        )


class DiffusersBackbone(nn.Module):
    """`forward(x, t, cond)` over a diffusers denoiser (`self.net`), with attnlab's conventions:
    the prediction shaped like x (a learned-variance half of the output dropped), computed in
    `self.precision`."""

    precision = "fp32"

    def __init__(self, cfg, plan=None):
        super().__init__()
        self.config = cfg
        cls = _class(cfg.diffusers_class)
        self.net = cls(**{**cfg.diffusers_config, **data_fields(cfg)})
        if cfg.diffusers_class == "DiTTransformer2DModel":  # attnlab drops conditions itself (cfg_dropout)
            for m in self.net.modules():
                if hasattr(m, "dropout_prob") and type(m).__name__ == "LabelEmbedding":
                    m.dropout_prob = 0.0

    def export_diffusers(self, folder, state: dict[str, Tensor]) -> None:
        """Write `state` (this model's state dict, e.g. its EMA weights) as a diffusers model folder:
        config.json and diffusion_pytorch_model.safetensors, loadable with `Class.from_pretrained`."""
        from pathlib import Path

        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.net.save_config(folder)
        net = {k[len("net.") :]: v.contiguous() for k, v in state.items() if k.startswith("net.")}
        save_file(net, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        name, c = self.config.diffusers_class, self.config.in_channels
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        cond = self._or_null(cond, x)
        with autocast(self.precision, x.device):
            if name == "UNet2DConditionModel":
                out = self._unet(x, t, cond)
            elif name == "PixArtTransformer2DModel":
                out = self.net(
                    x, encoder_hidden_states=cond.tokens, timestep=t, encoder_attention_mask=cond.mask.float(),
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
                )[0]  # fmt: skip
            else:
                out = self.net(
                    x, timestep=t, class_labels=self._labels(cond, self.config.num_classes), return_dict=False
                )[0]
        return out[:, :c].to(x.dtype)

    def _unet(self, x: Tensor, t: Tensor, cond: Condition | None) -> Tensor:
        if self.config.cond == "text":
            return self.net(
                x,
                t,
                encoder_hidden_states=cond.tokens,
                encoder_attention_mask=cond.mask.float(),
                return_dict=False,
            )[0]
        ehs = torch.zeros(x.shape[0], 1, self.net.config.cross_attention_dim, device=x.device, dtype=x.dtype)
        return self.net(
            x,
            t,
            encoder_hidden_states=ehs,
            class_labels=self._labels(cond, self.config.num_classes),
            return_dict=False,
        )[0]

    def _or_null(self, cond: Condition | None, x: Tensor) -> Condition:
        """`cond`, or the null condition where it is missing (as attnlab's own backbones read it):
        one all-zero text token, or the null label."""
        b = x.shape[0]
        if self.config.cond == "text" and (cond is None or cond.tokens is None):
            tokens = x.new_zeros(b, 1, self.config.context_dim)
            return Condition(tokens=tokens, mask=torch.ones(b, 1, dtype=torch.bool, device=x.device))
        if self.config.cond == "class" and (cond is None or cond.labels is None):
            return Condition(labels=torch.full((b,), -1, dtype=torch.long, device=x.device))
        return cond

    @staticmethod
    def _labels(cond: Condition, null: int) -> Tensor:
        """Labels with the null label (-1) as class `null` (the extra class)."""
        labels = cond.labels.long()
        return torch.where(labels < 0, torch.full_like(labels, null), labels)
