"""Training: the one accelerate-based trainer, EMA, atomic checkpoints, and model directories."""

from attnlab.train.checkpoint import latest_checkpoint, load_model, model_dir, weights_file
from attnlab.train.trainer import train

__all__ = ["latest_checkpoint", "load_model", "model_dir", "train", "weights_file"]
