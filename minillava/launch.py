"""Several training processes on one CPU: `minillava train` starts torchrun, and owns it.

On a CPU, one process rarely keeps every core busy (small matrix products, Python between
them), so the cpu preset trains as two data-parallel processes, as torchrun runs them on GPUs:
each takes half of every batch and DDP averages the gradients (train.py). `minillava train`
starts them itself (`launch_cpu_processes`), so a learner types one command.

Starting processes means owning them. A run whose launcher was killed must not train on in the
background, still writing the checkpoints a later `--resume` would race with. Ctrl-C and
SIGTERM are passed on to torchrun, which stops its workers; a SIGKILL cannot be caught, so
torchrun and every worker ask the kernel beforehand to stop them when their parent dies
(`die_with_parent`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from minillava.presets import Preset


def threads_per_process(num_threads: int, processes: int) -> int:
    """A CPU's share of `num_threads` (0: one per core) for each of `processes` processes."""
    return max(1, (num_threads or os.cpu_count() or 1) // processes)


# The process a child must not outlive: set by `minillava train` for torchrun, by torchrun (our
# `run_torchrun`) for its workers. See `die_with_parent`.
PARENT_PID = "MINILLAVA_PARENT_PID"
PR_SET_PDEATHSIG = 1  # prctl option, from <linux/prctl.h>

# torchrun as `launch_cpu_processes` runs it: `python -m torch.distributed.run` through ours.
TORCHRUN = (
    "import sys; from minillava.launch import run_torchrun; sys.exit(run_torchrun(sys.argv[1:]))"
)


def launch_cpu_processes(preset: Preset, argv: list[str]) -> int:
    """Run this same command as `preset.cpu_processes` data-parallel processes, as torchrun does.

    Each process takes 1/N of every batch with num_threads / N threads (at least one), and DDP
    averages their gradients over gloo: the same training, more of the CPU kept busy.

    We own torchrun and its workers, so they never train on without us (still writing the
    checkpoints a later --resume would then race with): a Ctrl-C or SIGTERM we pass on to
    torchrun, which stops its workers, and we wait for it; a SIGKILL cannot be caught, so
    torchrun and each worker ask beforehand to be stopped when their parent dies
    (`die_with_parent`). Returns torchrun's exit status: the failed worker's, 128 + the signal
    number if stopped by one.
    """
    n = preset.cpu_processes
    command = [
        sys.executable, "-c", TORCHRUN, "--standalone", f"--nproc_per_node={n}",
        "-m", "minillava.train", *argv,
    ]  # fmt: skip
    # torchrun itself would set 1 (with a warning); say it, so OpenMP starts no extra threads.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(preset.num_threads, n)),
           PARENT_PID: str(os.getpid())}  # fmt: skip
    # In a session of its own, so a Ctrl-C in the terminal reaches us alone, and torchrun gets it
    # once, from us: a second one while it stops its workers would cut that short.
    process = subprocess.Popen(command, env=env, start_new_session=True)
    with signals_passed_on_to(process):
        return process.wait()


@contextlib.contextmanager
def signals_passed_on_to(process: subprocess.Popen):
    """While the block runs, SIGINT (Ctrl-C) and SIGTERM go on to `process` instead of stopping
    us. (Signal handlers can be set in the main thread only; elsewhere nothing changes.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def pass_on(signum, frame):
        process.send_signal(signum)  # (does nothing if it has ended)

    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def die_with_parent() -> None:
    """Have this process stopped (SIGTERM) as soon as the process that started it ends, however
    it ends, SIGKILL included.

    On Linux the kernel does it: prctl(PR_SET_PDEATHSIG) asks for the signal when our parent
    dies. Elsewhere (macOS) a thread checks every second whether we still have the same parent
    (an orphan is adopted by another process). If the parent died before we asked, we stop now.
    """
    parent = int(os.environ.get(PARENT_PID, "0")) or os.getppid()
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    else:
        threading.Thread(target=_stop_when_orphaned, args=(parent,), daemon=True).start()
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _stop_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def run_torchrun(torchrun_args: list[str]) -> int:
    """`python -m torch.distributed.run TORCHRUN_ARGS` as `launch_cpu_processes` runs it.

    The same torchrun, with three differences: it dies with `minillava train`, and its workers
    with it (they call `die_with_parent` too, in `main`); and a failed worker is reported by its
    exit status alone, without torchrun's traceback and log lines: the worker has already said
    in one line what went wrong. (LOGLEVEL=INFO in the environment shows torchrun's log again.)
    """
    die_with_parent()
    os.environ[PARENT_PID] = str(os.getpid())  # our workers inherit it: they die with us
    quiet = "LOGLEVEL" not in os.environ
    if quiet:  # the level torchrun gives most of its loggers as it makes them, on import
        os.environ["LOGLEVEL"] = "CRITICAL"
    # Imported here: only this process runs torchrun.
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if quiet:  # and the level of the others, which take their parent's
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(torchrun_args))
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -15: 143
    except SignalException as error:  # told to stop (by us): torchrun has stopped its workers
        return 128 + error.sigval
    return 0
