"""sezm: the DPA4 / SeZM equivariant interatomic potential in PyTorch."""

__version__ = "0.1.0"

from .infer.deep_pot import DeepPot, DeepProperty

__all__ = ["DeepPot", "DeepProperty"]
