"""Shared pytest setup.

CI is a 2-core machine and `make test` runs two pytest workers (pytest-xdist), so each worker
keeps torch to one thread: two workers x two threads would oversubscribe the cores and make
small-tensor tests several times slower.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

torch.set_num_threads(1)
