"""Conditioning (L1): class labels, text tokens from the offline MiniLM encoder, the null condition."""

from attnlab.conditioning.condition import NULL_LABEL, Condition
from attnlab.conditioning.make import make_condition
from attnlab.conditioning.text import TextEncoder, get_text_encoder

__all__ = ["NULL_LABEL", "Condition", "TextEncoder", "get_text_encoder", "make_condition"]
