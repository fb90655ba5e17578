"""Attention: the one module and the bus that controls attach to."""

from attnlab.attention.bus import (
    BusState,
    Control,
    StepWindow,
    attention_grids,
    attention_layers,
    bus_state,
    control,
    match_layer,
    name_layers,
    reading_points,
    sample_rows,
    sample_seeds,
    sampling_step,
    select_layers,
)
from attnlab.attention.core import Attention, AttnCall

__all__ = [
    "Attention",
    "AttnCall",
    "BusState",
    "Control",
    "StepWindow",
    "attention_grids",
    "attention_layers",
    "bus_state",
    "control",
    "match_layer",
    "name_layers",
    "reading_points",
    "sample_rows",
    "sample_seeds",
    "sampling_step",
    "select_layers",
]
