"""The `points` dataset (surfaces, captions, per-point object ids, determinism, disjoint splits), the
folder convention for `.ply` / `.npy` clouds with its bad-file handling, and the sample files
(PLY with provenance in the header, two-view preview)."""

import json
import warnings

import numpy as np
import pytest
import torch

from attnlab.data import build_dataset
from attnlab.data.config import DataConfig
from attnlab.data.pointfiles import preview, save_ply
from attnlab.data.points import SURFACES, sample_cloud
from attnlab.errors import ConfigError, DataError
from attnlab.samples import read_provenance


def points(**kw) -> DataConfig:
    return DataConfig(**{"name": "points", "size": 128, "num": 24, "num_eval": 24, "max_objects": 2, **kw})


def test_items_are_deterministic_and_splits_disjoint():
    a, b = build_dataset(points(), "train"), build_dataset(points(num=30), "train")
    assert torch.equal(a.tensors(), b.tensors()[:24]) and a.texts() == b.texts()[:24]
    ev = build_dataset(points(), "eval")

    def turns(ds):
        return {round(ds[i]["objects"][0]["rotation"] / (2 * np.pi) * 720) % 2 for i in range(len(ds))}

    assert turns(a) == {0} and turns(ev) == {1}
    assert not {tuple(x.flatten()[:6].tolist()) for x in a.tensors()} & {
        tuple(x.flatten()[:6].tolist()) for x in ev.tensors()
    }


def test_captions_objects_and_point_ids_agree():
    ds = build_dataset(points(num=60), "train")
    assert ds.tensors().shape == (60, 3, 128) and ds.modality == "points"
    seen = set()
    for i in range(len(ds)):
        item = ds[i]
        objs, ids, x = item["objects"], item["point_objects"], item["x"]
        assert ids.shape == (128,) and set(ids.tolist()) == set(range(len(objs)))
        assert item["text"].startswith(f"a {objs[0]['shape']}") and item["label"] == ds.class_names.index(
            objs[0]["shape"]
        )
        if len(objs) == 2:
            rel = item["relation"]
            assert item["text"] == f"a {objs[0]['shape']} {rel} a {objs[1]['shape']}"
            axis = 0 if rel in ("left of", "right of") else 2
            first, second = (x[axis, ids == k].mean().item() for k in (0, 1))
            assert (first < second) == (rel in ("left of", "below"))  # the relation holds in the cloud
            seen.add(rel)
    assert seen == {"left of", "right of", "above", "below"}


def test_surfaces_by_hand():
    rng = np.random.default_rng(0)
    assert np.allclose(np.linalg.norm(SURFACES["sphere"](rng, 500), axis=1), 0.8)
    cube = SURFACES["cube"](rng, 600)
    assert np.allclose(np.abs(cube).max(1), 0.8)
    counts = np.bincount(np.argmax(np.abs(cube), 1), minlength=3)
    assert counts.min() > 150  # every face pair gets its share
    cyl = SURFACES["cylinder"](rng, 4000)
    caps = np.isclose(np.abs(cyl[:, 2]), 0.8)
    # area share of the two caps: 2 pi r^2 / (2 pi r^2 + 2 pi r h) with r = 0.6, h = 1.6
    assert abs(caps.mean() - 0.72 / (0.72 + 1.92)) < 0.03
    torus = SURFACES["torus"](rng, 800)
    ring = np.hypot(torus[:, 0], torus[:, 1])
    assert np.allclose(np.hypot(ring - 0.55, torus[:, 2]), 0.25)
    pyr = SURFACES["pyramid"](rng, 500)
    assert (pyr[:, 2] >= -0.8 - 1e-9).all() and (
        np.abs(pyr[:, :2]).max(1) <= 0.8 * (0.8 - pyr[:, 2]) / 1.6 + 1e-6
    ).all()


def test_one_solid_clouds_are_centred():
    rng = np.random.default_rng(1)
    p, ids, solids, relation, text = sample_cloud(rng, 256, (1, 1), 0)
    assert relation is None and text == f"a {solids[0]['shape']}" and (ids == 0).all()
    assert np.abs(p).max() < 1.1


@pytest.mark.parametrize("kw, key", [({"size": 32}, "data.size"), ({"max_objects": 3}, "data.max_objects")])
def test_bad_points_configs_are_refused(kw, key):
    with pytest.raises(ConfigError, match=key):
        points(**kw)


# The folder convention


def _folder(tmp_path, files: dict, rows: list[dict]):
    for name, write in files.items():
        write(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return DataConfig(name="folder", root=str(tmp_path), size=64, eval_fraction=0.5)


def _npy(n, nan=False):
    def write(path):
        a = np.random.default_rng(n).normal(size=(n, 3)).astype(np.float32)
        if nan:
            a[3, 1] = np.nan
        np.save(path, a)

    return write


def _ply(n):
    return lambda path: save_ply(path, np.random.default_rng(n).normal(size=(n, 3)), {"x": 1})


def test_a_folder_of_ply_and_npy_clouds(tmp_path):
    cfg = _folder(
        tmp_path,
        {"a.ply": _ply(100), "b.npy": _npy(90)},
        [
            {"file_name": "a.ply", "text": "a", "split": "train"},
            {"file_name": "b.npy", "text": "b", "split": "eval"},
        ],
    )
    tr, ev = build_dataset(cfg, "train"), build_dataset(cfg, "eval")
    assert tr.modality == "points" and tr.tensors().shape == (1, 3, 64) and ev.texts() == ["b"]
    x = tr.tensors()[0]
    assert abs(x.abs().max().item() - 0.9) < 1e-5  # scaled to a half-extent of 0.9


@pytest.mark.parametrize(
    "name, write, why",
    [
        ("few.npy", _npy(10), "10 points; data.size asks for 64"),
        ("nan.npy", _npy(100, nan=True), "1 point\\(s\\) with NaN"),
        ("bad.ply", lambda p: p.write_bytes(b"ply\nformat nonsense\n"), "cannot read points bad.ply"),
        ("flat.npy", lambda p: np.save(p, np.zeros((100, 2))), "expected an \\(N, 3\\) array"),
    ],
)
def test_a_bad_cloud_names_its_file_or_is_skipped_and_counted(tmp_path, name, write, why):
    rows = [{"file_name": "ok.npy", "split": "train"}, {"file_name": name, "split": "train"}]
    cfg = _folder(
        tmp_path, {"ok.npy": _npy(100), name: write}, rows + [{"file_name": "ok.npy", "split": "eval"}]
    )
    with pytest.raises(DataError, match=f"line 2.*{why}"):
        build_dataset(cfg, "train")
    cfg.skip_bad = True
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        ds = build_dataset(cfg, "train")
    assert ds.skipped == 1 and len(ds) == 1


# Sample files


def test_ply_keeps_points_and_provenance_and_preview_has_two_views(tmp_path):
    x = torch.randn(3, 50)
    path = save_ply(tmp_path / "s.ply", x, {"prompt": "a cube", "seed": 3})
    assert read_provenance(path) == {"prompt": "a cube", "seed": 3}
    from plyfile import PlyData

    v = PlyData.read(str(path))["vertex"].data
    assert np.allclose(np.stack([v["x"], v["y"], v["z"]]), x.numpy())
    img = preview(x)
    assert img.shape[1] == 2 * img.shape[0] and img.dtype == np.uint8
    left, right = img[:, : img.shape[1] // 2], img[:, img.shape[1] // 2 :]
    assert (left < 250).any() and (right < 250).any() and not np.array_equal(left, right)
    with pytest.raises(DataError, match="cannot read"):
        (tmp_path / "bad.ply").write_bytes(b"nonsense")
        read_provenance(tmp_path / "bad.ply")
