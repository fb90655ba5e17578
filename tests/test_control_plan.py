"""Sampling-time techniques built by registry name from a JSON-able spec."""

import pytest

from attnlab.cli.flags import cli_spec, technique_options
from attnlab.control import PAG, AttnCache, TGate
from attnlab.control.plan import sampling_plan
from attnlab.errors import ConfigError


def test_spec_builds_controls_guidances_and_the_cfg_schedule():
    plan = sampling_plan(
        {"pag": {"scale": 2.0}, "tgate": {"gate": 0.5, "drop_cfg": True}, "attn_cache": None}
    )
    assert [type(c) for c in plan.controls] == [TGate, AttnCache] and isinstance(plan.guidances[0], PAG)
    schedule = plan.guidance(3.0)
    assert [schedule(i, 4) for i in range(4)] == [3.0, 3.0, 1.0, 1.0]
    assert sampling_plan({"tgate": {"gate": 0.5, "drop_cfg": False}}).guidance(3.0) == 3.0
    default = sampling_plan({"tgate": {"gate": 0.5}}).guidance(3.0)  # drops CFG, as the T-GATE code
    assert [default(i, 4) for i in range(4)] == [3.0, 3.0, 1.0, 1.0]
    assert cli_spec(tgate=0.5) == {"tgate": {"gate": 0.5, "drop_cfg": True}}
    assert cli_spec(tgate=0.5, tgate_keep_cfg=True) == {"tgate": {"gate": 0.5, "drop_cfg": False}}


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"nope": {}}, "unknown technique 'nope'"),
        ({"pag": {"strength": 1}}, r"technique 'pag': .*no option\(s\) \['strength'\]"),
        ({"p2p": {}}, "needs its prompts bound; use attnlab edit"),
        ({"sag": {"scale": -1}}, "sag: scale must be >= 0"),
    ],
)
def test_bad_specs_are_named(spec, match):
    with pytest.raises(ConfigError, match=match):
        sampling_plan(spec)


def test_cli_spec_leaves_off_options_out():
    assert cli_spec() == {}
    assert cli_spec(pag=1.0, cache_every=3) == {
        "pag": {"scale": 1.0},  # the technique's own default layers (the reference's)
        "attn_cache": {"every": 3},
    }
    assert cli_spec(sag=0.5, sag_layers="**")["sag"] == {"scale": 0.5, "layers": "**"}


def test_technique_flags_name_any_training_free_technique():
    assert technique_options(["pag", "pag.scale=2", "tgate.layers=[mid]", "tome.ratio=0.25"]) == {
        "pag": {"scale": 2},
        "tgate": {"layers": ["mid"]},
        "tome": {"ratio": 0.25},
    }
    for bad in ("pag.scale", ".scale=2", "pag=2"):
        with pytest.raises(ConfigError, match="expected NAME or NAME.option=value"):
            technique_options([bad])
