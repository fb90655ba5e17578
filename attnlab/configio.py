"""Config loading: YAML plus `key=value` overrides into a typed dataclass tree (OmegaConf structured
configs), with the model fields the data decides filled in, and one ConfigError naming the file and key."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from attnlab.errors import AttnlabError, ConfigError

T = TypeVar("T")


# Loading


def load_structured(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    refused: Mapping[str, str] | None = None,
) -> T:
    """Load a `schema` dataclass from YAML, apply `key=value` overrides, fill in the data's facts, validate.

    Args:
        schema: a dataclass with `data` and `model` sections and a `validate()` method.
        path: the YAML file, or None for the defaults.
        overrides: dotted `key=value` items (e.g. `model.width=64`), applied after the file.
        refused: keys the schema has that neither the file nor an override may set -> why not
            (the error reads "<key> is <why>").
    Raises:
        ConfigError: naming the file or override, the key and what was expected.
    """
    layers = config_layers(path, overrides)
    source = str(path) if path is not None else "overrides"
    for layer in layers:
        for key, why in (refused or {}).items():
            if OmegaConf.select(layer, key, default=None) is not None:
                raise ConfigError(f"{source}: {key} is {why}")
    return build_structured(schema, layers, source)


def build_structured(schema: type[T], layers: list, source: str, fill_from_data: bool = True) -> T:
    """Merge `layers` over the schema's defaults into a validated `schema`; errors name `source`."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        if fill_from_data:
            facts = data_facts(OmegaConf.to_object(merged.data))
            for key, value in model_fields_from_data(merged.model.cond, facts).items():
                merged.model[key] = value  # before the model is built: its checks need the real size
        cfg = OmegaConf.to_object(merged)
        cfg.validate()
    except ConfigKeyError as e:
        raise ConfigError(f"{source}: unknown key {e.full_key!r}{_known_keys(schema, e)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {e.full_key}: {_first_line(e)}") from None
    except AttnlabError as e:
        raise type(e)(f"{source}: {e}") from None
    return cfg


def config_layers(path: str | Path | None, overrides: Sequence[str] = ()) -> list:
    """The OmegaConf layers of a YAML file (none for None) and its `key=value` overrides, in the
    order `build_structured` merges them.

    Raises:
        ConfigError: a missing or malformed file, or an override not of the form key=value.
    """
    layers = [read_yaml(Path(path))] if path is not None else []
    return layers + [read_override(item) for item in overrides]


def read_yaml(path: Path):
    """A YAML file holding a mapping, as an OmegaConf node (ConfigError names the file)."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (data, model, ...), got {type(data).__name__}"
        )
    return OmegaConf.create(data)


def read_override(item: str):
    """One dotted `key=value` override as an OmegaConf node (ConfigError names the override)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.width=64)")
    try:
        return OmegaConf.from_dotlist([item])
    except OmegaConfBaseException as e:
        raise ConfigError(f"override {item!r}: {_first_line(e)}") from None


def _known_keys(schema: type, e: ConfigKeyError) -> str:
    """'; known keys of model: ...' for the section (the dataclass) an unknown key was given in."""
    node = getattr(e, "object_type", None)
    if not dataclasses.is_dataclass(node):
        return ""
    parent = (e.full_key or "").rpartition(".")[0]
    where = parent or ("the config" if node is schema else node.__name__)
    return f"; known keys of {where}: {', '.join(f.name for f in dataclasses.fields(node))}"


def _first_line(e: OmegaConfBaseException) -> str:
    return (getattr(e, "msg", None) or str(e)).splitlines()[0]


# The model fields the data decides


@dataclass(frozen=True)
class DataFacts:
    """What a dataset tells a model: its name (for messages), one item's channels, size and
    dimensionality, its number of classes (None: unlabelled) and, once a text encoder is loaded,
    the width of its token features."""

    dataset: str
    in_channels: int
    size: int
    dims: int
    num_classes: int | None
    context_dim: int | None = None

    @staticmethod
    def of(dataset: str, x, num_classes: int | None, context_dim: int | None = None) -> DataFacts:
        """The facts of one item `x` (C, *spatial)."""
        return DataFacts(dataset, x.shape[0], x.shape[-1], x.dim() - 1, num_classes, context_dim)


def data_facts(data) -> DataFacts:
    """The facts of the data a DataConfig describes (the text encoder's width is not known yet).

    Procedural data is asked with a two-item replica, so this costs milliseconds.
    """
    from attnlab.data import build_dataset

    small = dataclasses.replace(data, num=min(data.num, 2), num_eval=min(data.num_eval, 2))
    ds = build_dataset(small, "train")
    return DataFacts.of(data.name, ds[0]["x"], ds.num_classes)


def model_fields_from_data(cond: str, facts: DataFacts) -> dict[str, Any]:
    """The model fields the data decides: channels, size and dims always, the number of classes for
    cond="class", the token width for cond="text" once the encoder is known.

    Raises:
        ConfigError: cond="class" on data without classes.
    """
    fields: dict[str, Any] = dict(in_channels=facts.in_channels, size=facts.size, dims=facts.dims)
    if cond == "class":
        if not facts.num_classes:
            raise ConfigError(
                f"model.cond='class' but dataset {facts.dataset!r} has no classes; use cond=text or none"
            )
        fields["num_classes"] = facts.num_classes
    if cond == "text" and facts.context_dim:
        fields["context_dim"] = facts.context_dim
    return fields
