"""Point-cloud metrics against hand-computed cases and a brute-force Chamfer written from PointFlow's
definition; captions in the canonical frame; the shipped evaluator's accuracy on real eval clouds."""

import pytest
import torch

from attnlab.evaluate.pointcloud import (
    alignment,
    canonical,
    chamfer,
    mmd_cov,
    one_nna,
    pairwise_chamfer,
    pointflow_metrics,
)


def cloud(*pts) -> torch.Tensor:
    return torch.tensor(pts, dtype=torch.float64)


def brute_chamfer(a, b) -> float:
    """PointFlow's CD, loop by loop: mean over a of the squared distance to b's nearest point, plus
    the same from b to a."""
    ab = sum(min(sum((x - y) ** 2 for x, y in zip(p, q)) for q in b) for p in a) / len(a)
    ba = sum(min(sum((x - y) ** 2 for x, y in zip(p, q)) for q in a) for p in b) / len(b)
    return ab + ba


def test_chamfer_by_hand():
    # X = {0, e1}, Y = {0}: X -> Y squared distances 0 and 1 (mean 0.5); Y -> X 0: CD = 0.5
    assert chamfer(cloud((0, 0, 0), (1, 0, 0)), cloud((0, 0, 0))).item() == pytest.approx(0.5)
    # X = {0}, Y = {2 e2, e3}: X -> Y min 1; Y -> X 4 and 1 (mean 2.5): CD = 3.5
    assert chamfer(cloud((0, 0, 0)), cloud((0, 2, 0), (0, 0, 1))).item() == pytest.approx(3.5)


def test_pairwise_chamfer_against_brute_force():
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.randn(5, 7, 3, generator=g), torch.randn(4, 6, 3, generator=g)
    d = pairwise_chamfer(xs, ys, max_entries=100)  # chunks of 2 clouds
    for i in range(5):
        for j in range(4):
            assert d[i, j].item() == pytest.approx(
                brute_chamfer(xs[i].tolist(), ys[j].tolist()), rel=1e-5
            )  # float32 squared distances


def _line(*xs):
    """One-point clouds at x on a line: CD between two of them is 2 (x - x')^2."""
    return torch.tensor([[[x], [0.0], [0.0]] for x in xs])  # (n, 3, 1)


def test_mmd_cov_and_1nna_by_hand():
    # S_g = {0, 1}, S_r = {5, 20}; CD = 2 d^2.
    # MMD: r=5 -> min(50, 32) = 32; r=20 -> min(800, 722) = 722; mean 377.
    # COV: both generated clouds match r=5 -> 1 of 2 reference clouds covered.
    # 1-NNA: 0 -> 1 (g, right), 1 -> 0 (g, right), 5 -> 1 (g, wrong), 20 -> 5 (r, right): 3 / 4.
    m = pointflow_metrics(_line(0.0, 1.0), _line(5.0, 20.0))
    assert m == pytest.approx({"mmd_cd": 377.0, "cov_cd": 0.5, "nna_cd": 0.75})


def test_1nna_of_separable_and_interleaved_sets():
    assert pointflow_metrics(_line(0.0, 1.0), _line(10.0, 11.0))["nna_cd"] == 1.0
    assert pointflow_metrics(_line(0.0, 10.0), _line(1.0, 11.0))["nna_cd"] == 0.0


def test_1nna_leaves_each_cloud_out_and_cov_counts_distinct_matches():
    d_gr = torch.tensor([[1.0, 9.0, 9.0], [9.0, 1.0, 9.0]])
    assert mmd_cov(d_gr) == pytest.approx({"mmd_cd": (1 + 1 + 9) / 3, "cov_cd": 2 / 3})
    # every cloud's nearest other cloud is in the other set: 0 right
    d_gg, d_rr = torch.tensor([[0.0, 5.0], [5.0, 0.0]]), torch.tensor([[0.0, 5.0], [5.0, 0.0]])
    assert one_nna(d_gg, d_rr, torch.tensor([[1.0, 4.0], [4.0, 1.0]])) == 0.0


@pytest.mark.parametrize(
    "caption, frame",
    [
        ("a torus", (0, 2, -1)),
        ("a cone left of a cube", (1, 3, 1)),
        ("a cube right of a cone", (1, 3, 1)),
        ("a sphere above a pyramid", (2, 0, 5)),
        ("a pyramid below a sphere", (2, 0, 5)),
    ],
)
def test_captions_in_the_canonical_frame(caption, frame):
    assert canonical(caption) == frame


def test_a_caption_outside_the_grammar_is_refused():
    with pytest.raises(ValueError, match="not a points caption"):
        canonical("a red circle")


def test_alignment_by_hand():
    asked = torch.tensor([[0, 2, -1], [1, 3, 1], [2, 0, 5]])
    pred = torch.tensor([[0, 2, -1], [1, 3, 0], [1, 0, 5]])
    # layout 2 of 3; shapes: 2 (row 0), 3 and 1 -> right, wrong; 0 and 5 -> right, right: 4 of 5
    assert alignment(pred, asked) == pytest.approx(
        {"layout_acc": 2 / 3, "shape_acc": 4 / 5, "all_correct": 1 / 3}
    )


def test_the_shipped_evaluator_reads_real_eval_clouds():
    from attnlab.data import build_dataset
    from attnlab.data.config import DataConfig
    from attnlab.evaluate.pointcloud import load_point_evaluator, targets

    ev = load_point_evaluator()
    # eval clouds of a seed the evaluator never saw (it trained on seed 0's train split)
    ds = build_dataset(
        DataConfig(name="points", size=512, num=1, num_eval=300, max_objects=2, seed=7), "eval"
    )
    scores = alignment(ev.predict(ds.tensors()), targets(ds.texts()))
    assert scores["all_correct"] >= 0.95 and scores["shape_acc"] >= 0.95, scores
