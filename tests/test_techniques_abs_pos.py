"""Absolute position tables: a DiT's learned table starts as the fixed one and learns; a U-Net's
attention input differs from the base model's by exactly the table."""

import pytest
import torch
from models_util import inputs, perturbed, tiny_config

from attnlab.errors import ConfigError
from attnlab.evaluate.cost import count_parameters
from attnlab.models import build_model
from attnlab.models.embeddings import sincos_pos_embed

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dims", [2, 1])
def test_a_learned_dit_table_starts_as_the_fixed_one_and_gets_gradients(dims):
    cfg = tiny_config("dit", dims, "class")
    torch.manual_seed(0)
    base = build_model(cfg)
    torch.manual_seed(0)
    learned = build_model(tiny_config("dit", dims, "class", techniques={"abs_pos": {}}))
    assert isinstance(learned.pos, torch.nn.Parameter)
    assert count_parameters(learned) == count_parameters(base) + learned.pos.numel()
    x, t, c = inputs(cfg)
    with torch.no_grad():  # the zero-initialised output hides nothing here: compare the hidden tokens
        for model in (base, learned):
            model.final.linear.weight.normal_(generator=torch.Generator().manual_seed(1))
    assert torch.equal(learned(x, t, c), base(x, t, c))
    learned(x, t, c).square().mean().backward()
    assert learned.pos.grad is not None and learned.pos.grad.abs().sum() > 0


def _block_inputs(model):
    """The tokens entering each U-Net attention block, by block name."""
    seen = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, args[0])

        return hook

    for name, m in model.named_modules():
        if name.endswith(".attn") and m is not None:
            m.register_forward_pre_hook(record(name))
    return seen


@pytest.mark.parametrize("dims, kind", [(2, "sincos"), (1, "sincos"), (2, "learned")])
def test_unet_attention_input_differs_from_the_base_by_the_table(dims, kind):
    cfg = tiny_config("unet", dims, "text")
    base = perturbed(cfg)
    model = build_model(tiny_config("unet", dims, "text", techniques={"abs_pos": {"kind": kind}}))
    model.load_state_dict(base.state_dict(), strict=False)  # same weights; learned tables start at sin-cos
    x, t, c = inputs(cfg)
    seen_base, seen_pos = _block_inputs(base), _block_inputs(model)
    base(x, t, c), model(x, t, c)
    first = next(iter(seen_base))  # the first attention block: everything before it is the same
    block = model.get_submodule(first.rsplit(".", 1)[0])
    table = sincos_pos_embed((cfg.size // 2,) * dims, block.attn.self.dim)[None]  # (1, N, C)
    torch.testing.assert_close(seen_pos[first] - seen_base[first], table.expand_as(seen_pos[first]))
    assert not torch.allclose(model(x, t, c), base(x, t, c))


def test_sincos_needs_whole_sin_cos_pairs():
    with pytest.raises(ConfigError, match="abs_pos needs token widths divisible by 4"):
        build_model(tiny_config("unet", 2, techniques={"abs_pos": {}}, width=18, heads=2, norm_groups=2))


def test_unknown_kind_is_named():
    with pytest.raises(ConfigError, match="abs_pos.kind='rotary' is not allowed"):
        build_model(tiny_config("dit", 2, techniques={"abs_pos": {"kind": "rotary"}}))
