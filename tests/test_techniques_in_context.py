"""In-context conditioning: the condition's tokens share the self-attention sequence (and nothing
else carries it), padding is masked, and a sample does not depend on the padding of its batch."""

import pytest
import torch
from models_util import CTX, inputs, perturbed, tiny_config

from attnlab.attention import Control, attention_layers, control
from attnlab.conditioning import Condition
from attnlab.errors import ConfigError
from attnlab.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


class Lengths(Control):
    def __init__(self):
        self.seen = {}

    def before(self, call, x):
        self.seen[call.name] = x.shape[1]
        return x


@pytest.mark.parametrize("dims", [2, 1])
@pytest.mark.parametrize("cond, extra", [("class", 1), ("text", 1 + 5)])
def test_self_attention_sees_the_condition_tokens_and_there_is_no_cross_attention(dims, cond, extra):
    cfg = tiny_config("dit", dims, cond, techniques={"in_context": {}})
    model = build_model(cfg)
    assert all(m.kind == "self" for m in attention_layers(model).values())
    rec = Lengths()
    with control(model, rec):
        out = model(*inputs(cfg))
    n = (cfg.size // cfg.patch) ** dims
    assert set(rec.seen.values()) == {n + extra}  # pooled vector + 5 text tokens, or the class token
    assert out.shape == inputs(cfg)[0].shape  # the condition tokens are dropped before the output


def test_the_condition_reaches_the_model_only_through_the_tokens():
    cfg = tiny_config("dit", 2, "class", techniques={"in_context": {}})
    model = perturbed(cfg)
    x, t, _ = inputs(cfg)
    a, b = Condition(labels=torch.tensor([0, 1, 2])), Condition(labels=torch.tensor([2, 0, 1]))
    assert torch.equal(model.embed(t, a, 3)[0], model.embed(t, b, 3)[0])  # adaLN sees the time only
    assert not torch.allclose(model(x, t, a), model(x, t, b))


def test_padding_is_masked_so_a_sample_does_not_depend_on_its_batch():
    cfg = tiny_config("dit", 2, "text", techniques={"in_context": {}})
    model = perturbed(cfg)
    x, t, c = inputs(cfg)
    ref = model(x, t, c)
    garbage = c.tokens.clone()
    garbage[0, 2:] = 1e3 * torch.randn(3, CTX)  # row 0's padding
    torch.testing.assert_close(model(x, t, c.replace(tokens=garbage)), ref, atol=1e-5, rtol=1e-5)
    # row 0 alone, cut to its 2 real tokens, gives what it gives in the padded batch
    alone = Condition(tokens=c.tokens[:1, :2], mask=c.mask[:1, :2])
    torch.testing.assert_close(model(x[:1], t[:1], alone), ref[:1], atol=1e-5, rtol=1e-5)


def test_needs_a_condition_and_a_kernel_that_can_mask():
    with pytest.raises(ConfigError, match="in_context needs a condition"):
        build_model(tiny_config("dit", 2, "none", techniques={"in_context": {}}))
    with pytest.raises(ConfigError, match="linear_attention cannot mask"):
        build_model(tiny_config("dit", 2, "text", techniques={"in_context": {}, "linear_attention": {}}))
    with pytest.raises(ConfigError, match="not an architectural technique of the unet backbone"):
        build_model(tiny_config("unet", 2, "text", techniques={"in_context": {}}))
