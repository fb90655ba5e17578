"""Per-point heat maps on the points backbone (DAAM's maps, each step's group-token maps spread onto
the points with that step's grouping) and their IoU against per-point object ids: equivariance to
permuting the points, the spread against a computation written from its definition, IoU against
hand-computed cases, and the real-cloud localisation end to end."""

import pytest
import torch
from control_toy import WordTokenizer
from models_util import perturbed

from attnlab.attention import Control, control
from attnlab.control import HeatMaps
from attnlab.control.heatmaps import spread_to_points
from attnlab.data import build_dataset
from attnlab.data.config import DataConfig
from attnlab.diffusion import make_scheduler, sample
from attnlab.errors import ConfigError
from attnlab.evaluate import heatmap_localisation, points_word_targets, word_localisation
from attnlab.models import ModelConfig

ENC = WordTokenizer()
N = 64  # the least points a `points` cloud has
PROMPTS = ["a cube left of a cone", "a torus"]


def points_model(seed: int = 0):
    cfg = ModelConfig(
        backbone="points",
        dims=1,
        in_channels=3,
        size=N,
        width=32,
        depth=2,
        heads=2,
        patch=8,
        groups=12,
        cond="text",
        context_dim=ENC.dim,
    )
    return perturbed(cfg, seed, scale=0.3).eval()  # attention far from uniform


def _sample_maps(model, x_T):
    hm = HeatMaps()
    with torch.no_grad(), control(model, hm):
        sample(
            model,
            x_T.shape,
            ENC.condition(PROMPTS),
            scheduler=make_scheduler("ddim"),
            steps=3,
            guidance=2.0,
            seeds=[0, 1],
            x_T=x_T,
        )
    return hm.maps((N,))


# Equivariance and the spread


def test_permuting_the_points_permutes_their_maps():
    model, perm = points_model(), torch.randperm(N)
    x_T = torch.randn(2, 3, N, generator=torch.Generator().manual_seed(3))
    maps, maps_perm = _sample_maps(model, x_T), _sample_maps(model, x_T[:, :, perm])
    assert maps.shape == (2, len(ENC.tokens_of(PROMPTS[0])), N) and (maps >= 0).all()
    assert maps[0].std(-1).max() > 1e-3  # not flat: there is something to permute
    torch.testing.assert_close(maps[..., perm], maps_perm, atol=1e-6, rtol=1e-5)


def test_a_spread_by_hand():
    # tokens' maps (1, 3) at 2 tokens; point 0 reads 3/4 of token 0 and 1/4 of token 1, point 1 halves
    m = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    near, w = torch.tensor([[[0, 1], [1, 0]]]), torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    assert spread_to_points(m, near, w).flatten().tolist() == [1.5, 2.0]


class RawCross(Control):
    """Keeps each cross-attention call's probabilities, untouched."""

    kind = "cross"

    def __init__(self):
        self.calls = []

    def needs_probs(self, call):
        return True

    def probs(self, call, p):
        self.calls.append(p.detach().clone())  # (B, heads, G, L)
        return p


def test_the_spread_matches_its_definition_step_by_step():
    """Per step, point i's map of token l is sum_j w_ij m_l(near_ij), with that step's own grouping;
    summed over steps, then the mean over layers and heads."""
    model = points_model()
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, N, generator=g) for _ in range(3)]  # a different cloud per step
    ts = [torch.full((2,), t) for t in (900, 500, 100)]
    cond = ENC.condition(PROMPTS)
    hm, raw = HeatMaps(), RawCross()
    with torch.no_grad(), control(model, [hm, raw]):
        for x, t in zip(xs, ts):
            model(x, t, cond)
    assert len(raw.calls) == 3 * 2  # 3 steps of 2 cross-attention layers
    weights = [model.point_weights(x) for x in xs]
    assert not torch.equal(weights[0][0], weights[1][0])  # the tokens regroup between steps
    layers = 2
    expected = torch.zeros(2, cond.tokens.shape[1], N)
    for k, p in enumerate(raw.calls):  # calls run layer by layer within a step
        near, w = weights[k // layers]
        for b in range(2):
            for i in range(N):
                for j in range(near.shape[-1]):
                    m = p[b, :, near[b, i, j], :]  # (heads, L): the token's map per head
                    expected[b, :, i] += w[b, i, j] * m.sum(0)  # summed over heads here
    expected /= layers * p.shape[1]  # the mean over layers and heads
    torch.testing.assert_close(hm.maps((N,)), expected, atol=1e-6, rtol=1e-5)


def test_maps_on_points_are_asked_at_the_cloud_size():
    model, hm = points_model(), HeatMaps()
    with torch.no_grad(), control(model, hm):
        model(torch.randn(1, 3, N), torch.tensor([500]), ENC.condition(PROMPTS[:1]))
    with pytest.raises(ConfigError, match=f"a cloud of {N} points"):
        hm.maps((N + 1,))


# IoU against per-point object ids


def two_solids(n: int) -> list[dict]:
    """The first n eval clouds of two solids each (real clouds, so each point's solid is known)."""
    cfg = DataConfig(name="points", size=N, num=2, num_eval=n, min_objects=2, max_objects=2)
    ds = build_dataset(cfg, "eval")
    return [ds[i] for i in range(n)]


def _mask(*on, n=8):
    m = torch.zeros(n, dtype=torch.bool)
    m[list(on)] = True
    return m


@pytest.mark.parametrize(
    "on, truth, iou",
    [
        ((0, 1, 2, 3), (0, 1, 2, 3), 1.0),  # the map covers the object's points exactly
        ((0, 1, 2, 3), (4, 5, 6, 7), 0.0),  # disjoint
        ((0, 1, 2, 3), (2, 3, 4, 5), 2 / 6),  # half overlap: 2 shared of 6 in either
        ((0,), (0, 1, 2, 3), 1 / 4),
    ],
)
def test_iou_by_hand(on, truth, iou):
    heat = 0.1 * torch.rand(8) + 0.2  # below the cut after min-max normalisation
    heat[list(on)] = torch.linspace(0.9, 1.0, len(on))  # above it
    heat[7] = 0.0  # the minimum (point 7 is never on)
    scores = heatmap_localisation(heat[None], _mask(*truth)[None])
    assert scores["iou"] == pytest.approx(iou) and scores["n"] == 1
    assert scores["pointing"] == float(int(heat.argmax()) in truth)


def test_the_threshold_is_the_image_rule():
    # min-max normalised 0, 0.3, 0.5, 1: "on" above 0.4 (DAAM's), as for images
    heat, truth = torch.tensor([[0.0, 0.3, 0.5, 1.0]]), torch.tensor([[False, False, True, True]])
    assert heatmap_localisation(heat, truth)["iou"] == 1.0
    assert heatmap_localisation(heat, truth, threshold=0.2)["iou"] == pytest.approx(2 / 3)
    with pytest.raises(ConfigError, match=r"\(N, P\) per point"):
        heatmap_localisation(heat, truth[:, :3])


def test_targets_are_the_points_of_the_solid_a_shape_word_names():
    item = two_solids(1)[0]
    shapes = [o["shape"] for o in item["objects"]]
    targets = points_word_targets(item)
    if shapes[0] != shapes[1]:
        assert [(c, w) for c, w, _ in targets] == [("shape", shapes[0]), ("shape", shapes[1])]
        for k, (_, _, m) in enumerate(targets):
            assert torch.equal(m, item["point_objects"] == k)
    twice = {"point_objects": torch.tensor([0, 0, 1, 1]), "objects": [{"shape": "cube"}] * 2}
    assert [(w, m.tolist()) for _, w, m in points_word_targets(twice)] == [("cube", [True] * 4)]


def test_localisation_on_real_clouds_runs_as_for_images():
    items = two_solids(4)
    scores = word_localisation(
        points_model(),
        ENC,
        torch.stack([it["x"] for it in items]),
        [it["text"] for it in items],
        [points_word_targets(it) for it in items],
        make_scheduler("ddim"),
        steps=3,
        batch_size=2,
    )["shape"]
    assert 0.0 <= scores["iou"] <= 1.0 and 0.0 <= scores["pointing"] <= 1.0
    masks = [m for it in items for _, _, m in points_word_targets(it)]
    assert scores["n"] == len(masks)
    assert scores["area_iou"] == pytest.approx(sum(float(m.float().mean()) for m in masks) / len(masks))


# Figures


def test_a_cloud_is_drawn_coloured_by_its_map(tmp_path):
    from attnlab.control.figures import heat_clouds
    from attnlab.data.pointfiles import preview

    cloud = two_solids(1)[0]["x"]
    on = (cloud[0] < 0).float()  # the left half hot
    assert not (preview(cloud, values=on) == preview(cloud)).all()
    with pytest.raises(ValueError, match="one per point"):
        preview(cloud, values=on[:-1])
    path = heat_clouds(tmp_path / "maps.png", cloud, {"cube": on, "cone": 1 - on}, "a cube left of a cone")
    assert path.is_file() and path.stat().st_size > 0


# The points PoC


def test_a_points_poc_scores_and_draws_per_point_heat_maps(tmp_path):
    from poc_util import load_poc, tiny_poc

    from attnlab.poc import run_poc

    cfg = load_poc(
        tmp_path,
        tiny_poc(
            data={"name": "points", "size": N, "num": 16, "num_eval": 4, "max_objects": 2},
            model={
                "backbone": "points",
                "cond": "text",
                "width": 16,
                "depth": 1,
                "heads": 2,
                "patch": 8,
                "groups": 8,
            },
            variants=[{"name": "base"}],
            metrics=["localisation"],
            heatmaps=True,
        ),
    )
    results = run_poc(cfg, tmp_path / "out", progress=False, echo=lambda line: None)
    scores = results["variants"][0]["per_train_seed"]
    per_seed = next(iter(scores.values()))
    assert all(0.0 <= s["heatmap_iou"] <= 1.0 for s in per_seed.values())
    report = (tmp_path / "out" / "report.md").read_text()
    assert "eval clouds are noised" in report and "solid's points" in report
    assert next((tmp_path / "out").rglob("heatmaps.png")).stat().st_size > 0
