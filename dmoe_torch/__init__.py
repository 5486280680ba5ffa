"""dmoe-torch: wireless-aware distributed Mixture-of-Experts (DMoE) in PyTorch."""

__version__ = "0.1.0"
