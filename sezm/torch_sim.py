"""``from sezm.torch_sim import SeZMModel``: the torch-sim model interface (sezm/infer/torch_sim.py).

Needs torch-sim: ``pip install "sezm[torchsim]"``.
"""

from .infer.torch_sim import SeZMModel

__all__ = ["SeZMModel"]
