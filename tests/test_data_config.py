"""DataConfig validation and the contract every registered dataset keeps."""

import pytest
import torch

from attnlab.data import DATASETS, TEXT_SETS, DataConfig, build_dataset, describe_datasets
from attnlab.errors import ConfigError

BUILT_IN = {
    "shapes": {"size": 16, "max_objects": 3},
    "digits": {"size": 16},
    "tones": {"size": 2048, "max_notes": 2},
}


@pytest.mark.parametrize(
    "kw,names",
    [
        ({"name": "mnist"}, ["data.name='mnist'", "shapes, digits, tones, points, folder"]),
        ({"size": 20}, ["data.size=20", "16, 32, 64"]),
        ({"name": "digits", "size": 64}, ["data.size=64", "16, 32"]),
        ({"name": "tones"}, ["data.size=16", "1024 to 8000 samples"]),
        ({"max_objects": 5}, ["data.max_objects=5", "1 to 4"]),
        ({"min_objects": 2}, ["data.min_objects=2", "max_objects (1)"]),
        (
            {"shapes": ("circle", "star")},
            ["data.shapes=", "'star'", "circle, square, triangle, diamond, cross"],
        ),
        ({"colors": ()}, ["data.colors=[]", "non-empty subset"]),
        ({"name": "tones", "size": 4096, "max_notes": 3}, ["data.max_notes=3", "1 or 2"]),
        ({"name": "folder"}, ["data.root=None", "metadata.jsonl"]),
        ({"num": 0}, ["data.num=0"]),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(kw, names):
    with pytest.raises(ConfigError) as err:
        DataConfig(**kw)
    for part in names:
        assert part in str(err.value)


def test_config_works_as_an_omegaconf_schema():
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(
        OmegaConf.structured(DataConfig), OmegaConf.from_dotlist(["shapes=[circle,cross]", "size=32"])
    )
    cfg = OmegaConf.to_object(merged)
    assert cfg.shapes == ("circle", "cross") and cfg.size == 32
    with pytest.raises(ConfigError, match="data.size=17"):
        OmegaConf.to_object(OmegaConf.merge(merged, {"size": 17}))


@pytest.mark.parametrize("name", list(BUILT_IN))
@pytest.mark.parametrize("split", ["train", "eval"])
def test_every_built_in_keeps_the_contract(name, split):
    ds = build_dataset(DataConfig(name=name, num=16, num_eval=8, **BUILT_IN[name]), split)
    x = ds.tensors()
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and len(ds) == len(x)
    assert (ds.modality == "audio") == (x.dim() == 3) and (ds.sample_rate is not None) == (
        ds.modality == "audio"
    )
    assert len(ds.texts()) == len(ds) and ds.labels().shape == (len(ds),) and ds.labels().dtype == torch.long
    assert len(ds.class_names) == ds.num_classes and int(ds.labels().max()) < ds.num_classes
    for i in (0, len(ds) - 1):
        item = ds[i]
        assert (
            torch.equal(item["x"], x[i])
            and item["text"] == ds.texts()[i]
            and item["label"] == int(ds.labels()[i])
        )


def test_registry_describes_every_dataset():
    rows = describe_datasets()
    assert [r["name"] for r in rows] == [*DATASETS, *TEXT_SETS]
    assert all(r["description"] and r["modality"] and r["sizes"] for r in rows)
    described = {name: d for name, (_, d) in DATASETS.items()} | TEXT_SETS
    assert all(r["description"] == described[r["name"]] for r in rows)


def test_a_text_set_in_an_image_run_config_points_to_text_runs():
    with pytest.raises(ConfigError, match="scenes is a text set: a text run config has modality: tokens"):
        DataConfig(name="scenes")
