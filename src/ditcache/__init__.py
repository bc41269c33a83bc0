"""ditcache: feature caching for Diffusion Transformers, measured honestly."""

__version__ = "0.1.0"
