"""vmoe: Vision Mixture-of-Experts in PyTorch, from sharding to capacity sweeps."""

__version__ = "0.1.0"
