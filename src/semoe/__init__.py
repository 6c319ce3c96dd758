"""semoe: Mixture-of-Experts training and inference on PyTorch (SE-MoE)."""

__version__ = "0.1.0"
