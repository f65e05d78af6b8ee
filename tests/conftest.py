"""Test-wide settings: one intra-op thread, and Triton's interpreter on machines without CUDA.

The tests run many small models; on a shared or small machine, OpenMP worker threads spinning on
tiny kernels cost far more than they save.

Triton fixes whether its own library functions run compiled or interpreted when it is first
imported, and any test may import it first (``torch.export`` and ``torch.compile`` do). On a
machine without CUDA the fused-kernel tests (``tests/kernels/test_triton_rotation.py``) need the
interpreter, so it is chosen here, before anything imports Triton. It changes nothing else:
sezm takes the fused path only on CUDA devices, or where a test asks for it explicitly.
"""

import os

import torch

torch.set_num_threads(1)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
