"""The registry of attention techniques, by level (L1 input ... L5 output)."""

from attnlab.techniques.registry import LEVELS, REGISTRY, Technique, get, register, techniques

__all__ = ["LEVELS", "REGISTRY", "Technique", "get", "register", "techniques"]
