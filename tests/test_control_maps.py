"""Heat maps (DAAM) on 2D and 1D grids, and Attend-and-Excite raising the weakest token's attention."""

import pytest
import torch
from control_toy import WordTokenizer, toy

from attnlab.attention import control
from attnlab.control import AttendExcite, HeatMaps, word_maps
from attnlab.diffusion import make_scheduler, sample
from attnlab.errors import ConfigError

ENC = WordTokenizer()
PROMPT = "a red circle and a blue square"


@pytest.mark.parametrize("dims, size", [(2, (8, 8)), (1, (32,))])
def test_heat_maps_are_non_negative_normalised_and_sized(dims, size):
    model = toy(dims)
    hm = HeatMaps()
    cond = ENC.condition([PROMPT, "a blue square"])
    with control(model, hm):
        sample(
            model, (2, 1, *size), cond, scheduler=make_scheduler("ddim"), steps=3, seeds=[0, 1], guidance=2.0
        )
    n_cross = 3  # blocks.0, blocks.1, mid: cond rows only, every step
    assert hm.count == 3 * n_cross and set(hm.sums) == {"blocks.0.attn2", "blocks.1.attn2", "mid.attn2"}
    assert {tuple(m.shape[3:]) for m in hm.sums.values()} == {size[:1] * dims, tuple(s // 2 for s in size)}
    maps = hm.maps(size)
    assert maps.shape == (2, cond.tokens.shape[1], *size) and (maps >= 0).all()
    words = word_maps(hm, PROMPT, ["red", "square"], ENC, size, row=0)
    for m in words.values():
        assert m.shape == size and m.min() == 0.0 and m.max() == 1.0
    assert not torch.allclose(words["red"], words["square"])


def test_heat_maps_sum_steps_and_average_heads():
    model = toy()
    hm = HeatMaps(layers="blocks.0")
    with control(model, hm):
        for _ in range(2):
            model(torch.randn(1, 1, 8, 8), torch.tensor([10]), ENC.condition([PROMPT]))
    # each query's map sums to 1 over tokens: summed over 2 steps (DAAM), averaged over heads
    torch.testing.assert_close(hm.maps((8, 8)).sum(1), torch.full((1, 8, 8), 2.0))


def test_heat_map_errors_name_the_problem():
    hm = HeatMaps()
    with pytest.raises(ConfigError, match="nothing was recorded"):
        hm.maps((8, 8))
    model = toy()
    with control(model, hm):
        model(torch.randn(1, 1, 8, 8), torch.tensor([10]), ENC.condition([PROMPT]))
    with pytest.raises(ConfigError, match="word 'green' is not in the prompt"):
        word_maps(hm, PROMPT, ["green"], ENC, (8, 8))


def _excite_setup(seed):
    model = toy(seed=seed)
    cond = ENC.condition([PROMPT])
    idx = ENC.word_token_indices(PROMPT, "circle") + ENC.word_token_indices(PROMPT, "square")
    ae = AttendExcite(step_size=20.0, max_refine=5).bind([idx], [(1, len(ENC.tokens_of(PROMPT)) - 1)])
    sched = make_scheduler("ddim")
    sched.set_timesteps(5)
    ctx = {"i": 0, "steps": 5, "scheduler": sched}
    return model, cond, ae, sched.timesteps[0].expand(1), ctx


@pytest.mark.parametrize("seed", [0, 1])
def test_attend_and_excite_raises_the_weakest_token(seed):
    model, cond, ae, t, ctx = _excite_setup(seed)
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    with control(model, ae.controls()):
        before = ae.token_maxima(model, x, t, cond, ctx)[0]
        with torch.no_grad():  # as inside the sampling loop
            moved = ae.prepare(model, x, t, cond, ctx)
        after = ae.token_maxima(model, moved, t, cond, ctx)[0]
    assert after.min() > before.min()
    assert not any(p.grad is not None for p in model.parameters())  # only the latent moved


def test_attend_and_excite_acts_only_in_its_window():
    model, cond, ae, t, ctx = _excite_setup(0)
    x = torch.randn(1, 1, 8, 8)
    with control(model, ae.controls()):
        assert torch.equal(ae.prepare(model, x, t, cond, {**ctx, "i": 3}), x)  # end = 0.5 of 5 steps


def test_attend_and_excite_bind_checks_token_span():
    with pytest.raises(ConfigError, match=r"inside \[1, 4\)"):
        AttendExcite().bind([[5]], [(1, 4)])
