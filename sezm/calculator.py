"""``from sezm.calculator import SeZMCalculator``: the ASE calculator (sezm/infer/calculator.py)."""

from .infer.calculator import SeZMCalculator, stress_from_virial

__all__ = ["SeZMCalculator", "stress_from_virial"]
