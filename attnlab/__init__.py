"""attnlab: attention in diffusion models, by level: build, train, control and measure."""

__version__ = "0.1.0"
