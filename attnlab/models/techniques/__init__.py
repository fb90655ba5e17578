"""Architectural attention techniques (levels 1-4), one file each.

Each module holds a technique's options dataclass (registered in `attnlab.techniques`, which imports
the modules listed in its `PROVIDERS`), the blocks or kernels it adds, and the hooks it provides to
the backbones through the model plan (`attnlab.models.plan`).
"""
