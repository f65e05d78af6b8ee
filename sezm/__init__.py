"""sezm: the DPA4 / SeZM equivariant interatomic potential in PyTorch."""

from .infer.deep_pot import DeepPot, DeepProperty

__all__ = ["DeepPot", "DeepProperty"]
__version__ = "0.1.0"
