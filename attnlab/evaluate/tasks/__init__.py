"""Evaluator tasks: per kind of data, the heads an evaluator has, its training targets and how its
outputs are decoded into predictions (objects, notes, a class).

A task is looked up by the `kind` stored in an evaluator's JSON config:
    "shapes"  objects with shape, colour and 3x3 position, decoded from per-pixel heads
    "tones"   notes with waveform and note name, decoded from per-frame heads
    "classes" one class per sample (digits, labelled folders)
    "pretext" no labels: features learnt by predicting a transform (unlabelled folders)
"""

from __future__ import annotations

from attnlab.evaluate.tasks.base import Task
from attnlab.evaluate.tasks.classes import ClassesTask, PretextTask
from attnlab.evaluate.tasks.shapes import ShapesTask
from attnlab.evaluate.tasks.tones import TonesTask

TASKS: dict[str, type[Task]] = {
    "shapes": ShapesTask,
    "tones": TonesTask,
    "classes": ClassesTask,
    "pretext": PretextTask,
}

__all__ = ["TASKS", "ClassesTask", "PretextTask", "ShapesTask", "Task", "TonesTask"]
