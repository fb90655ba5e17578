"""The token backbone's invariants: padding condition tokens change nothing (cross-attention and
in-context), the explicit-probabilities path equals the fused one, the null condition is one
learned token, and the layers carry the bus names and the sequence grid."""

import pytest
import torch
from tokens_util import tiny_tokens

from attnlab.attention import Control, attention_grids, attention_layers, control
from attnlab.conditioning import Condition

V, L = 12, 8


def model(techniques=None, seed=0):
    return tiny_tokens(V, L, techniques=techniques, seed=seed, noise=0.2).eval()


def inputs():
    g = torch.Generator().manual_seed(0)
    z = torch.randint(1, V, (2, L), generator=g)
    return z, torch.tensor([0.3, 0.8])


@pytest.mark.parametrize(
    "techniques", [{}, {"in_context": {}}, {"rope": {}}], ids=["cross", "in_context", "rope"]
)
def test_padding_condition_tokens_change_nothing(techniques):
    m, (z, t) = model(techniques), inputs()
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    a = Condition(tokens=torch.tensor([[1, 2, 3, 4], [5, 4, 3, 2]]), mask=mask)
    b = Condition(tokens=torch.tensor([[1, 2, 5, 5], [5, 4, 3, 1]]), mask=mask)
    with torch.no_grad():
        torch.testing.assert_close(m(z, t, a), m(z, t, b))
        assert not torch.allclose(
            m(z, t, a), m(z, t, a.replace(tokens=torch.tensor([[2, 2, 3, 4], [5, 4, 3, 2]])))
        )


class ReadsProbs(Control):
    """Installed but changes nothing; it only forces the explicit softmax path."""

    def needs_probs(self, call):
        return True


@pytest.mark.parametrize(
    "techniques", [{}, {"in_context": {}}, {"linear_attention": {}}], ids=["cross", "in_context", "linear"]
)
def test_the_explicit_path_equals_the_fused_one(techniques):
    m, (z, t) = model(techniques), inputs()
    cond = Condition(
        tokens=torch.tensor([[1, 2, 3], [4, 5, 0]]), mask=torch.tensor([[True] * 3, [True, True, False]])
    )
    with torch.no_grad():
        fused = m(z, t, cond)
        with control(m, [ReadsProbs()]):
            explicit = m(z, t, cond)
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)


def test_the_null_condition_is_one_learned_token():
    m, (z, t) = model(), inputs()
    cond = Condition(tokens=torch.tensor([[1, 2, 3], [4, 5, 0]]), mask=torch.ones(2, 3, dtype=torch.bool))
    with torch.no_grad():
        torch.testing.assert_close(m(z, t, None), m(z, t, cond.null_like()))
        assert not torch.allclose(m(z, t, None), m(z, t, cond))


def test_layers_carry_bus_names_and_the_sequence_grid():
    m = model()
    names = set(attention_layers(m))
    assert names == {"blocks.0.self", "blocks.0.cross", "blocks.1.self", "blocks.1.cross"}
    assert attention_grids(m) == {n: (L,) for n in names}


def test_logits_are_one_row_per_position_and_vocabulary_entry():
    m, (z, t) = model(), inputs()
    with torch.no_grad():
        out = m(z, t)
    assert out.shape == (2, L, V) and out.dtype == torch.float32
