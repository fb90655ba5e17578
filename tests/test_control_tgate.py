"""T-GATE and attention caching: what is computed at which step, and what is reused."""

import pytest
import torch
from control_toy import WordTokenizer, toy

from attnlab.attention import attention_layers, control
from attnlab.control import AttnCache, TGate
from attnlab.diffusion import make_scheduler, sample
from attnlab.errors import ConfigError

ENC = WordTokenizer()
STEPS = 6


def _count_projections(model):
    """Per step: how many cross (to_kv) and self (to_qkv) projections ran, and the batch sizes seen."""
    log = []

    def hook(kind):
        return lambda mod, inp, out: log.append((model.bus_state.step, kind, inp[0].shape[0]))

    handles = []
    for layer in attention_layers(model).values():
        proj = layer.to_kv if layer.kind == "cross" else layer.to_qkv
        handles.append(proj.register_forward_hook(hook(layer.kind)))
    return log, handles


def _sample(model, guidance=3.0):
    cond = ENC.condition(["a red circle", "a blue square"])
    return sample(
        model,
        (2, 1, 8, 8),
        cond,
        scheduler=make_scheduler("ddim"),
        steps=STEPS,
        seeds=[0, 1],
        guidance=guidance,
    )


def test_tgate_stops_cross_attention_after_the_gate():
    model = toy()
    tg = TGate(gate=0.5)
    log, handles = _count_projections(model)
    with control(model, tg):
        _sample(model)
    for h in handles:
        h.remove()
    n_cross = sum(1 for m in attention_layers(model).values() if m.kind == "cross")
    cross_steps = [s for s, kind, _ in log if kind == "cross"]
    assert tg.gate_step(STEPS) == 3
    assert sorted(set(cross_steps)) == [0, 1, 2]  # never computed from the gate step on
    assert len(cross_steps) == 3 * n_cross
    assert tg.skipped["cross"] == (STEPS - 3) * n_cross
    assert sorted({s for s, kind, _ in log if kind == "self"}) == list(range(STEPS))


def test_tgate_drop_cfg_halves_the_batch_after_the_gate():
    model = toy()
    tg = TGate(gate=0.5, drop_cfg=True)
    log, _ = _count_projections(model)
    with control(model, tg):
        _sample(model, guidance=tg.guidance_schedule(3.0))
    batch = {s: b for s, kind, b in log if kind == "self"}
    assert [batch[s] for s in range(STEPS)] == [4, 4, 4, 2, 2, 2]


def test_tgate_keeps_the_mean_of_uncond_and_cond_or_each_chunk():
    model = toy()
    cross = [n for n, m in attention_layers(model).items() if m.kind == "cross"]
    kept = {}
    for average in (True, False):
        tg = TGate(gate=0.5, average=average, drop_cfg=False)
        with control(model, tg):
            _sample(model)
            kept[average] = {n: dict(tg.cache[n]) for n in cross}
    assert all(set(kept[True][n]) == {None} for n in cross)  # one mean shared by both chunks
    own = kept[False][cross[0]]
    assert set(own) == {"uncond", "cond"} and not torch.equal(own["uncond"], own["cond"])
    torch.testing.assert_close(kept[True][cross[0]][None], (own["uncond"] + own["cond"]) / 2)


def test_tgate_changes_samples_and_keeps_guidance_per_chunk_when_not_averaging():
    model = toy()
    ref = _sample(model)
    with control(model, TGate(gate=0.5)):
        avg = _sample(model)
    with control(model, TGate(gate=0.5, average=False)):
        own = _sample(model)
    assert not torch.equal(avg, ref) and not torch.equal(own, avg)


def test_attention_cache_computes_every_kth_step_in_its_window():
    model = toy()
    cache = AttnCache(every=2, kind="self", start=0.0, end=1.0)
    log, _ = _count_projections(model)
    with control(model, cache):
        _sample(model)
    self_steps = sorted({s for s, kind, _ in log if kind == "self"})
    cross_steps = sorted({s for s, kind, _ in log if kind == "cross"})
    assert self_steps == [0, 2, 4] and cross_steps == list(range(STEPS))
    n_self = sum(1 for m in attention_layers(model).values() if m.kind == "self")
    assert cache.hits == 3 * n_self and not cache.cache.store  # cleared when the scope ends


def test_tgate_self_attention_intervals_around_the_gate():
    model = toy()
    tg = TGate(gate=0.5, sp_interval=3, fi_interval=2, warm_up=1)
    log, _ = _count_projections(model)
    cond = ENC.condition(["a red circle", "a blue square"])
    with control(model, tg):
        sample(
            model, (2, 1, 8, 8), cond, scheduler=make_scheduler("ddim"), steps=12, seeds=[0, 1], guidance=3.0
        )
    # warm-up step 0; stored at warm_up (1) and multiples of 3; the gate (5); multiples of 2 after
    assert sorted({s for s, kind, _ in log if kind == "self"}) == [0, 1, 3, 5, 6, 8, 10]


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TGate(gate=1.5), "gate must be"),
        (lambda: TGate(sp_interval=0), "sp_interval must be > 0"),
        (lambda: TGate(warm_up=-1), "warm_up must be >= 0"),
        (lambda: AttnCache(every=0), "every must be > 0"),
        (lambda: AttnCache(kind="joint"), "kind='joint' is not one of"),
        (lambda: AttnCache(start=0.8, end=0.2), "start=0.8, end=0.2"),
    ],
)
def test_bad_options_name_the_field(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_a_pattern_that_selects_nothing_lists_the_layers():
    model = toy()
    with pytest.raises(
        ConfigError, match=r"selects no cross layer; the model has: blocks\.0\.attn1 \(self\)"
    ):
        with control(model, TGate(layers="decoder")):
            pass
