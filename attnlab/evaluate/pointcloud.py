"""Point-cloud metrics: the PointFlow protocol (Yang et al. 2019, arXiv:1906.12320; as used by PVD,
LION, DiT-3D) under the Chamfer distance: minimum matching distance (MMD), coverage (COV) and
1-nearest-neighbour accuracy (1-NNA); a Frechet distance on the shipped point evaluator's features
(FPD, Shu et al. 2019); and condition alignment by that evaluator (layout and shape of each solid).

Definitions (PointFlow, Section 5.2), for generated clouds S_g and reference clouds S_r:
- CD(X, Y) = mean_{x in X} min_{y in Y} ||x - y||^2 + mean_{y in Y} min_{x in X} ||x - y||^2;
- MMD = 1/|S_r| sum_{Y in S_r} min_{X in S_g} CD(X, Y)   (lower is better);
- COV = |{argmin_{Y in S_r} CD(X, Y) : X in S_g}| / |S_r|   (higher is better);
- 1-NNA = (sum_{X in S_g} 1[N_X in S_g] + sum_{Y in S_r} 1[N_Y in S_r]) / (|S_g| + |S_r|), N_X the
  nearest neighbour of X in S_g + S_r without X itself (50% is best: the sets cannot be told apart).
EMD is not computed: an exact matching per pair of 512-point clouds, for the 160,000 pairs the
protocol needs at 200 + 200 clouds, is not affordable on a CPU.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnlab.data.points import SHAPES_3D
from attnlab.models.points import farthest_point_sample, gather, knn

WEIGHTS = Path(__file__).parent / "weights"
LAYOUTS = ("one", "side by side", "stacked")  # a single solid, left-right pair, top-bottom pair


# Chamfer distance and the PointFlow protocol


def chamfer(a: Tensor, b: Tensor) -> Tensor:
    """Chamfer distance between clouds a (..., N, 3) and b (..., M, 3): the mean squared distance
    from each point to the other cloud, summed over the two directions (PointFlow's CD).

    The squared distances are ||x||^2 + ||y||^2 - 2 x.y in float32 (one batched matrix product; a
    nearest-neighbour distance of 512-point clouds is ~1e-3, float32's error on it ~1e-7), the
    means in float64."""
    a, b = a.float(), b.float()
    lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a, b = a.expand(*lead, *a.shape[-2:]), b.expand(*lead, *b.shape[-2:])
    a, b = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    b_sq = b.square().sum(-1)[:, None, :]  # (P, 1, M)
    d = torch.baddbmm(b_sq, a, b.transpose(1, 2), alpha=-2.0).add_(a.square().sum(-1)[:, :, None])
    d = d.clamp_min_(0.0)  # (P, N, M)
    cd = d.min(-1).values.double().mean(-1) + d.min(-2).values.double().mean(-1)
    return cd.reshape(lead)


def pairwise_chamfer(xs: Tensor, ys: Tensor, max_entries: int = 4_000_000) -> Tensor:
    """(n, N, 3) and (m, M, 3) clouds -> (n, m) Chamfer distances: each x against chunks of ys, a
    chunk's distance table (chunk, N, M) held to about `max_entries` numbers."""
    chunk = max(1, max_entries // (xs.shape[1] * ys.shape[1]))
    out = torch.empty(len(xs), len(ys), dtype=torch.float64)
    for i in range(len(xs)):
        for j in range(0, len(ys), chunk):
            out[i, j : j + chunk] = chamfer(xs[i][None], ys[j : j + chunk])
    return out


def mmd_cov(d_gr: Tensor) -> dict[str, float]:
    """MMD and COV from the (|S_g|, |S_r|) distances between generated and reference clouds."""
    mmd = d_gr.min(dim=0).values.mean()
    cov = d_gr.argmin(dim=1).unique().numel() / d_gr.shape[1]
    return {"mmd_cd": float(mmd), "cov_cd": float(cov)}


def one_nna(d_gg: Tensor, d_rr: Tensor, d_gr: Tensor) -> float:
    """1-NNA from the distances within S_g, within S_r and between them (leave-one-out)."""
    g, r = len(d_gg), len(d_rr)
    top = torch.cat([d_gg, d_gr], dim=1)  # rows: generated; columns: S_g then S_r
    bottom = torch.cat([d_gr.T, d_rr], dim=1)
    d = torch.cat([top, bottom]).clone()
    d.fill_diagonal_(float("inf"))  # a cloud is not its own neighbour
    nearest_is_generated = d.argmin(dim=1) < g
    right = nearest_is_generated[:g].sum() + (~nearest_is_generated[g:]).sum()
    return float(right) / (g + r)


def pointflow_metrics(generated: Tensor, reference: Tensor) -> dict[str, float]:
    """MMD-CD, COV-CD and 1-NNA-CD of (n, 3, N) generated against (m, 3, M) reference clouds."""
    g, r = generated.transpose(1, 2), reference.transpose(1, 2)
    d_gr = pairwise_chamfer(g, r)
    return {**mmd_cov(d_gr), "nna_cd": one_nna(pairwise_chamfer(g, g), pairwise_chamfer(r, r), d_gr)}


# What a caption asks, in a frame that does not depend on the word order


def canonical(caption: str) -> tuple[int, int, int]:
    """(layout, shape of the single / left / top solid, shape of the right / bottom solid or -1):
    "a cone right of a cube" and "a cube left of a cone" ask the same cloud.

    Raises:
        ValueError: a caption not in the `points` grammar ("a SHAPE" or "a SHAPE RELATION a SHAPE").
    """
    words = "|".join(SHAPES_3D)
    m = re.fullmatch(rf"a ({words})(?: (left of|right of|above|below) a ({words}))?", caption.strip())
    if m is None:
        raise ValueError(f"{caption!r} is not a points caption ('a SHAPE [RELATION a SHAPE]')")
    first, relation, second = m.groups()
    if relation is None:
        return 0, SHAPES_3D.index(first), -1
    a, b = (first, second) if relation in ("left of", "above") else (second, first)
    return (1 if relation in ("left of", "right of") else 2), SHAPES_3D.index(a), SHAPES_3D.index(b)


# The point evaluator


@dataclass
class PointEvaluatorConfig:
    width: int = 128
    groups: int = 32
    neighbours: int = 16
    depth: int = 2
    heads: int = 4


class PointEvaluator(nn.Module):
    """A small point transformer classifier: farthest-point groups pooled by a mini-PointNet (as the
    points backbone does), two transformer encoder layers, max + mean pooling into the feature
    vector (the FPD features), and heads for the layout and the shape of each solid."""

    def __init__(self, cfg: PointEvaluatorConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PointEvaluatorConfig()
        d = cfg.width
        self.local = nn.Sequential(nn.Linear(3, d // 2), nn.GELU(), nn.Linear(d // 2, d))
        self.where = nn.Sequential(nn.Linear(3, d // 2), nn.GELU(), nn.Linear(d // 2, d))
        layer = nn.TransformerEncoderLayer(
            d, cfg.heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(2 * d)
        self.layout = nn.Linear(2 * d, len(LAYOUTS))
        self.shape_a = nn.Linear(2 * d, len(SHAPES_3D))
        self.shape_b = nn.Linear(2 * d, len(SHAPES_3D))

    @property
    def num_features(self) -> int:
        return 2 * self.cfg.width

    def features(self, x: Tensor) -> Tensor:
        """(B, 3, N) clouds -> (B, 2 * width) features."""
        p = x.transpose(1, 2).float()  # (B, N, 3)
        centres = gather(p, farthest_point_sample(p, self.cfg.groups))  # (B, G, 3)
        _, members = knn(centres, p, self.cfg.neighbours)
        rel = gather(p, members) - centres[:, :, None]  # (B, G, k, 3)
        h = self.local(4.0 * rel).amax(dim=2) + self.where(centres)  # (B, G, width)
        h = self.encoder(h)
        return self.norm(torch.cat([h.amax(dim=1), h.mean(dim=1)], dim=-1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)
        return {"layout": self.layout(f), "shape_a": self.shape_a(f), "shape_b": self.shape_b(f)}

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 128) -> Tensor:
        """(B, 3) long: layout, shape A, shape B (-1 where the layout has one solid)."""
        self.eval()
        rows = []
        for i in range(0, len(x), batch_size):
            out = self(x[i : i + batch_size])
            lay, a, b = (out[k].argmax(-1) for k in ("layout", "shape_a", "shape_b"))
            rows.append(torch.stack([lay, a, torch.where(lay == 0, -1, b)], dim=1))
        return torch.cat(rows)


class FeatureNet(nn.Module):
    """The evaluator as a (B, 3, N) -> (B, D) feature module (for `fid_kid`)."""

    def __init__(self, evaluator: PointEvaluator):
        super().__init__()
        self.evaluator = evaluator

    def forward(self, x: Tensor) -> Tensor:
        return self.evaluator.features(x)


def targets(captions: list[str]) -> Tensor:
    return torch.tensor([canonical(c) for c in captions])


def evaluator_loss(model: PointEvaluator, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    loss = F.cross_entropy(out["layout"], y[:, 0]) + F.cross_entropy(out["shape_a"], y[:, 1])
    return loss + F.cross_entropy(out["shape_b"], y[:, 2], ignore_index=-1)


def alignment(pred: Tensor, asked: Tensor) -> dict[str, float]:
    """Agreement of predicted and asked (layout, shape A, shape B): the layout (one solid, side by
    side, stacked), the shape of each asked solid, and all of it at once."""
    pair = asked[:, 0] > 0
    layout = pred[:, 0] == asked[:, 0]
    a = pred[:, 1] == asked[:, 1]
    b = pred[:, 2] == asked[:, 2]
    return {
        "layout_acc": layout.float().mean().item(),
        "shape_acc": torch.cat([a, b[pair]]).float().mean().item(),
        "all_correct": (layout & a & (b | ~pair)).float().mean().item(),
    }


# Training and shipping the evaluator


def train_point_evaluator(
    train_x: Tensor,
    train_y: Tensor,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    jitter: float = 0.03,
    seed: int = 0,
    log=print,
) -> PointEvaluator:
    """Train on clouds (N, 3, P) and targets (N, 3), augmented (`augment`: generated clouds are
    noisier than the data)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = PointEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        idx = torch.randint(len(train_x), (batch_size,), generator=g)
        x = augment(train_x[idx], jitter, g)
        loss = evaluator_loss(model.train(), x, train_y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            log(f"step {step} loss {loss.item():.4f}")
    return model.eval()


def augment(x: Tensor, jitter: float, g: torch.Generator) -> Tensor:
    """Per cloud: Gaussian jitter of a random strength up to `jitter` and a scale in [0.9, 1.1]
    (a turn about z would move a left-right pair in depth, so the clouds are not turned)."""
    b = len(x)
    sigma = jitter * torch.rand(b, 1, 1, generator=g)
    scale = 0.9 + 0.2 * torch.rand(b, 1, 1, generator=g)
    return scale * x + sigma * torch.randn(x.shape, generator=g)


def save_point_evaluator(model: PointEvaluator, info: dict, name: str = "points") -> Path:
    """Weights as `name.safetensors`, config + how it was trained + its accuracy as `name.json`."""
    from safetensors.torch import save_file

    from attnlab.io import atomic_path, write_json

    path = WEIGHTS / f"{name}.safetensors"
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(WEIGHTS / f"{name}.json", {"config": asdict(model.cfg), **info})
    return path


def load_point_evaluator(name: str = "points") -> PointEvaluator:
    """The shipped point evaluator (attnlab/evaluate/weights/points.*), in eval mode."""
    from safetensors.torch import load_file

    info = json.loads((WEIGHTS / f"{name}.json").read_text())
    model = PointEvaluator(PointEvaluatorConfig(**info["config"]))
    model.load_state_dict(load_file(str(WEIGHTS / f"{name}.safetensors")))
    model.info = info
    return model.eval()


class PointsEvaluator:
    """The point evaluator as the PoC reads an evaluator (`name`, `net`, `feature_net()`), holding
    the reference clouds MMD, COV and 1-NNA compare against (PointFlow: as many as are generated)."""

    def __init__(self, net: PointEvaluator, reference: Tensor):
        self.net, self.reference = net.eval(), reference
        self.info = getattr(net, "info", {})
        self.name = self.info.get("name", "points")

    def feature_net(self) -> FeatureNet:
        return FeatureNet(self.net).eval()


def score_points(
    fake: Tensor,
    requests: list[dict] | None,
    ev: PointsEvaluator,
    real_features: Tensor | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """What a PoC reports of generated clouds (n, 3, N): FPD ("fid", Frechet distance of the point
    evaluator's features against `real_features`), MMD-CD, COV-CD and 1-NNA-CD against the first n
    reference clouds, and alignment with the requests (`canonical` frames) when given."""
    from attnlab.evaluate.quality import extract_features, fid_kid_from_features

    out: dict[str, float] = {}
    if real_features is not None:
        q = fid_kid_from_features(real_features, extract_features(fake, ev.feature_net()), seed=seed)
        out.update({k: q[k] for k in ("fid", "kid_mean", "kid_std")})
    out.update(pointflow_metrics(fake, ev.reference[: len(fake)]))
    if requests is not None:
        asked = torch.tensor([[r["layout"], r["shape_a"], r["shape_b"]] for r in requests])
        out.update(alignment(ev.net.predict(fake), asked))
    return out


def request_of(caption: str) -> dict:
    """The request a points caption makes, in the canonical frame."""
    layout, a, b = canonical(caption)
    return {"layout": layout, "shape_a": a, "shape_b": b}


def evaluate_clouds(
    generated: Tensor, prompts: list[str], reference: Tensor, evaluator: PointEvaluator | None = None
) -> dict[str, float]:
    """Every point-cloud metric of generated clouds (n, 3, N) drawn for `prompts`, against reference
    clouds (m, 3, M): MMD-CD, COV-CD, 1-NNA-CD, FPD and the evaluator's alignment."""
    from attnlab.evaluate.quality import fid_kid

    ev = evaluator or load_point_evaluator()
    out = pointflow_metrics(generated, reference)
    out["fpd"] = fid_kid(reference, generated, FeatureNet(ev), kid_subsets=10)["fid"]
    out.update(alignment(ev.predict(generated), targets(prompts)))
    return out
