"""Shared pytest setup.

Torch is kept to one thread: the tests use tiny tensors, where a second thread costs more in
synchronisation than it gains, and the processes some tests start (notebook kernels, DDP ranks,
grader forks) run beside pytest on CI's two cores. Measured on this 2-core machine under load: a
small training step took 5x longer with two threads than with one (docs/results.md).
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
