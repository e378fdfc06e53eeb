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

import tempfile  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def temporary_files_inside_pytests_own_directory(tmp_path_factory):
    """Point TMPDIR (and so `tempfile`) into this session's pytest directory.

    The notebooks make their run directories with tempfile.mkdtemp (as a learner's session
    would: kept for them to look at), torchrun its rendezvous files; the processes that make
    them (kernels, DDP ranks) inherit TMPDIR. Pytest keeps only its last three sessions'
    directories, so the suite no longer leaves ~50 MB in /tmp each time it runs.
    """
    directory = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as patch:  # both undone when the session ends
        patch.setenv("TMPDIR", str(directory))
        patch.setattr(tempfile, "tempdir", None)  # forget the directory tempfile already chose
        yield directory
