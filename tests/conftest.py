"""Test-wide settings: one intra-op thread.

The tests run many small models; on a shared or small machine, OpenMP worker threads spinning on
tiny kernels cost far more than they save.
"""

import torch

torch.set_num_threads(1)
