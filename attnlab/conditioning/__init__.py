"""Conditioning (L1): class labels, text tokens from the offline MiniLM encoder, the null condition."""

from attnlab.conditioning.condition import NULL_LABEL, Condition

__all__ = ["NULL_LABEL", "Condition"]
