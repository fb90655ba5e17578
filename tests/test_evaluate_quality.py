"""FID and KID: zero for a set against itself, large against noise, equal to the closed form."""

import numpy as np
import pytest
import torch
from scipy import linalg

from attnlab.errors import ConfigError
from attnlab.evaluate import extract_features, fid_kid, fid_kid_from_features


class Flatten(torch.nn.Module):
    """A fixed feature map: per channel mean, spread and edge energy, plus a random projection."""

    num_features = 16

    def __init__(self, d_in: int):
        super().__init__()
        self.proj = torch.nn.Linear(d_in, self.num_features - 4)

    def forward(self, x):
        edges = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1, keepdim=True)
        stats = torch.cat(
            [x.flatten(1).mean(1, keepdim=True), x.flatten(1).std(1, keepdim=True), edges, edges**2], 1
        )
        return torch.cat([torch.tanh(self.proj(x.flatten(1))), stats], 1)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(0)
    # Smooth blobs: a structured set unlike white noise.
    base = torch.rand(400, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(8, 8), mode="bilinear") * 2 - 1


def _closed_form_fid(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al., 2017, eq. 6)."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(sa @ sb).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sa + sb - 2 * root))


def test_self_is_zero_and_noise_is_far(images):
    torch.manual_seed(0)
    net = Flatten(3 * 8 * 8)
    same = fid_kid(images, images, net)
    assert abs(same["fid"]) < 1e-6
    assert abs(same["kid_mean"]) < 3 * same["kid_std"] + 1e-4
    # Two halves of one distribution are close; a set of noise is far from either.
    halves = fid_kid(images[:200], images[200:], net)
    noise = fid_kid(images[:200], torch.randn(200, 3, 8, 8).clamp(-1, 1), net)
    assert noise["fid"] > 10 * halves["fid"]
    assert noise["kid_mean"] > 10 * abs(halves["kid_mean"]) + 3 * noise["kid_std"]


def test_fid_matches_the_closed_form(images):
    torch.manual_seed(1)
    net = Flatten(3 * 8 * 8)
    half = images[:200], (images[200:] * 0.7).clamp(-1, 1)
    ours = fid_kid(*half, net)["fid"]
    ref = _closed_form_fid(*(extract_features(h, net).numpy() for h in half))
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-8)


def test_kid_is_seeded_and_split_independent(images):
    torch.manual_seed(2)
    net = Flatten(3 * 8 * 8)
    a = fid_kid(images[:200], images[200:], net, seed=3, batch_size=7)
    b = fid_kid(images[:200], images[200:], net, seed=3, batch_size=64)
    assert a["kid_mean"] == pytest.approx(b["kid_mean"], rel=1e-5, abs=1e-9)  # float32 sums differ by batch
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-5, abs=1e-9)


def test_bad_sets_are_refused():
    with pytest.raises(ConfigError, match="differ in shape"):
        fid_kid(torch.zeros(4, 3, 8, 8), torch.zeros(4, 3, 4, 4), Flatten(192))
    with pytest.raises(ConfigError, match="at least 2 samples"):
        fid_kid_from_features(torch.zeros(1, 4), torch.zeros(5, 4))


def test_fid_of_a_shifted_copy_is_d_c_squared():
    """Equal covariances leave only the mean term: ||c 1||^2 = d c^2 (Heusel et al., 2017, eq. 6)."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(64, 5, generator=g, dtype=torch.float64) @ torch.randn(
        5, 5, generator=g, dtype=torch.float64
    )
    for c in (0.0, 0.5, 2.0):
        fid = fid_kid_from_features(real, real + c)["fid"]
        assert fid == pytest.approx(5 * c**2, rel=1e-6, abs=1e-6), c


def _hand_kid(xs: list[list[float]], ys: list[list[float]]) -> float:
    """The unbiased MMD^2 with the polynomial kernel k(x, y) = (x.y / d + 1)^3 (Binkowski et al., 2018)."""
    d, m, n = len(xs[0]), len(xs), len(ys)

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / d + 1) ** 3

    xx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(ys[i], ys[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x, y) for x in xs for y in ys) / (m * n)
    return xx + yy - 2 * xy


def test_kid_on_a_handful_of_points_is_the_hand_computed_mmd():
    xs = [[0.0, 1.0, 2.0], [1.0, -1.0, 0.5], [2.0, 0.0, -1.0], [-0.5, 0.5, 1.5]]
    ys = [[1.0, 1.0, 1.0], [0.0, -2.0, 1.0], [3.0, 0.5, 0.0], [-1.0, 2.0, -0.5]]
    # subsets of all four points: every subset is the whole set, so each score is the same MMD
    out = fid_kid_from_features(torch.tensor(xs), torch.tensor(ys), kid_subsets=3, kid_subset_size=4)
    assert out["kid_mean"] == pytest.approx(_hand_kid(xs, ys), rel=1e-9, abs=1e-12)
    assert out["kid_std"] == pytest.approx(0.0, abs=1e-9)
    assert abs(_hand_kid(xs, ys)) > 0.1  # not a trivial zero (unbiased, so it may be negative)
