"""Rotary positions: scores depend only on the offset between two tokens (1D and 2D), rotation keeps
lengths, tokens past the grid stay unrotated, and the backbones take it where heads allow."""

import pytest
import torch
from models_util import inputs, perturbed, tiny_config

from attnlab.attention import attention_layers
from attnlab.errors import ConfigError
from attnlab.models import build_model
from attnlab.models.techniques.rope import Rotary, rope_angles

pytestmark = pytest.mark.usefixtures("one_thread")


def _scores_of_one_pair(grid, head_dim=8, seed=0):
    """Scores between every query and key position when every token holds the same q and the same k."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(grid).numel()
    q = torch.randn(1, 1, 1, head_dim, generator=g).expand(1, 1, n, head_dim)
    k = torch.randn(1, 1, 1, head_dim, generator=g).expand(1, 1, n, head_dim)
    qr, kr = Rotary(head_dim, base=10.0)(q, k, grid)
    return (qr @ kr.transpose(-2, -1))[0, 0]  # (N, N)


def test_1d_scores_depend_only_on_the_offset():
    s = _scores_of_one_pair((12,))
    for offset in range(-11, 12):
        diag = torch.diagonal(s, offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.diagonal(s, 0)[0], torch.diagonal(s, 3)[0])  # positions do matter


def test_2d_scores_depend_only_on_the_row_and_column_offsets():
    h, w = 4, 5
    s = _scores_of_one_pair((h, w)).reshape(h, w, h, w)  # [qi, qj, ki, kj]
    by_offset = {}
    for qi in range(h):
        for qj in range(w):
            for ki in range(h):
                for kj in range(w):
                    by_offset.setdefault((qi - ki, qj - kj), []).append(s[qi, qj, ki, kj])
    for values in by_offset.values():
        torch.testing.assert_close(torch.stack(values), values[0].expand(len(values)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(s[0, 0, 0, 1], s[0, 0, 1, 0])  # a row step is not a column step


def test_rotation_keeps_lengths_and_leaves_extra_tokens_alone():
    q, k = torch.randn(2, 3, 9 + 2, 8), torch.randn(2, 3, 9 + 2, 8)
    qr, kr = Rotary(8)(q, k, (3, 3))
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    assert torch.equal(qr[:, :, 9:], q[:, :, 9:]) and torch.equal(kr[:, :, 9:], k[:, :, 9:])
    assert torch.equal(rope_angles((3, 3), 8, 100.0)[0], torch.zeros(4))  # the first token: no turn


def test_fewer_tokens_than_the_grid_is_an_error():
    with pytest.raises(ConfigError, match="merged tokens have no position"):
        Rotary(8)(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), (3, 3))


@pytest.mark.parametrize("backbone, dims", [("unet", 2), ("unet", 1), ("dit", 2), ("dit", 1)])
def test_every_self_attention_rotates_and_cross_attention_does_not(backbone, dims):
    model = build_model(tiny_config(backbone, dims, "text", techniques={"rope": {}}))
    layers = attention_layers(model).values()
    assert all(isinstance(m.rotary, Rotary) for m in layers if m.kind == "self")
    assert all(m.rotary is None for m in layers if m.kind == "cross")


def test_a_dit_with_rope_drops_its_absolute_table_unless_asked():
    cfg = tiny_config("dit", 2, techniques={"rope": {}})
    assert build_model(cfg).pos is None
    kept = build_model(tiny_config("dit", 2, techniques={"rope": {"absolute": True}}))
    assert torch.equal(kept.pos, build_model(tiny_config("dit", 2)).pos)


def test_rope_changes_what_the_model_computes():
    cfg = tiny_config("unet", 2, "class")
    base = perturbed(cfg)
    rope = build_model(tiny_config("unet", 2, "class", techniques={"rope": {}}))
    rope.load_state_dict(base.state_dict())  # same weights: the rotation is the only difference
    x, t, c = inputs(cfg)
    assert not torch.allclose(rope(x, t, c), base(x, t, c), atol=1e-4)


def test_a_head_width_without_whole_rotation_pairs_is_named():
    with pytest.raises(ConfigError, match=r"head width divisible by 4 for 2D data; width 24 / heads 4 = 6"):
        build_model(tiny_config("dit", 2, techniques={"rope": {}}, width=24, heads=4))
