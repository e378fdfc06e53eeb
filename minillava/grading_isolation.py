"""Isolation: a child process per check, a timeout, the output kept short.

grading.py hands this file a task (a check's job: import your file, call your functions on the
check, return [status, message]). `_isolated` runs it in a forked child with a timeout, keeps
the beginning of what it printed, and `_verdict` decides, in the parent, what came back.

The trust boundary. The learner's code (their file, imported, and their functions, called)
runs only in a child process forked for one check, in its own process group: a `while True`
costs that check, an `os._exit` ends only the child, a process it forks is killed with it, and
whatever it changes in memory (a patched grader, a global) dies with it. `grade_chapter` and
`check()` never import the learner's file in this process. The parent decides the verdict
from one message, [status, message], decoded as JSON (never unpickled: a message cannot run
code in the parent), checked against the known statuses, and counts the points from its own
copy of the check.

What a child can still forge: it may write any message to its pipe, so code written to fool
the grader (writing to the pipe's file descriptor, patching the interpreter's internals or an
object the snapshot does not cover, a forked process that leaves its process group) can claim
a pass for the check it runs in. We defend against accidents and easy tricks, not a determined
attacker: the rebinding of the grader is caught and reported, and nothing one child does
reaches the parent's tallies or another check.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minillava.grading_checks import CRASH, ERROR, STATUS_LABEL, TIMEOUT

OUTPUT_LIMIT = 4096  # bytes of what your code printed that a report shows, per check
OUTPUT_LINES = 40  # and at most this many lines of it
WIDTH = 96  # columns of a report; a longer line of what your code printed is cut
_MESSAGE_LIMIT = 8000  # characters of a child's message the parent keeps
_MESSAGE_BYTES = 1_000_000  # bytes: a longer message from a child is not read at all


def isolation_mode() -> str:
    """How checks are isolated: "fork" (default where the OS has it), "thread" or "inline".

    Set MINILLAVA_GRADE_ISOLATION to choose; "inline" runs the check in this process so you can
    step through it with a debugger (no timeout then). "thread" is the fallback where fork does
    not exist (Windows): a timeout still stops the report from waiting, but your file is imported
    in the grading process and what your code prints is not captured.
    """
    mode = os.environ.get("MINILLAVA_GRADE_ISOLATION", "")
    if mode:
        if mode not in ("fork", "thread", "inline"):
            raise ValueError(f"MINILLAVA_GRADE_ISOLATION={mode!r}, expected fork|thread|inline")
        return mode
    return "fork" if "fork" in multiprocessing.get_all_start_methods() else "thread"


@dataclass
class _Outcome:
    """What came back from running a task isolated: its value, or why there is none."""

    value: object = None  # what the task returned (decoded from the child's message)
    status: str = ""  # TIMEOUT or CRASH when there is no value
    message: str = ""
    output: str = ""  # what the task printed, cut to OUTPUT_LIMIT
    exit_code: int | None = None


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB" if n >= 1e3 else f"{n} bytes"


class _Captured:
    """The first OUTPUT_LIMIT bytes read from the child's output; the rest only counted."""

    def __init__(self):
        self.kept = bytearray()
        self.total = 0

    def read(self, fd: int) -> bool:
        """Read what is there; False at the end (every writer has closed the pipe)."""
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        self.total += len(chunk)
        self.kept += chunk[: max(0, OUTPUT_LIMIT - len(self.kept))]
        return bool(chunk)

    def text(self) -> str:
        lines = self.kept.decode("utf-8", errors="replace").rstrip().splitlines()
        shown = [line if len(line) <= WIDTH else line[:WIDTH] + " ..." for line in lines]
        shown = shown[:OUTPUT_LINES]
        if self.total > len(self.kept) or shown != lines:
            shown.append(f"[cut: your code printed {_size(self.total)}; this is the beginning]")
        return "\n".join(shown)


# Set in a check's child by _child_main (an attribute, not a global: the grader's names are
# compared with the parent's after the fork, and this one is meant to change).
_process = types.SimpleNamespace(is_check_child=False)


def _is_your_ctrl_c(exc: BaseException) -> bool:
    """Ctrl-C in a check run inline stops the grader; anywhere else it is the learner's doing."""
    return (
        isinstance(exc, KeyboardInterrupt)
        and not _process.is_check_child
        and threading.current_thread() is threading.main_thread()
    )


@contextlib.contextmanager
def _silenced():
    """In a check's child, drop what importing your file prints: the report shows it once."""
    if not _process.is_check_child:
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def _child_main(sender, out_read: int, out_write: int, task: Callable[[], object]) -> None:
    """The child: its own process group, its output into a pipe, then task(); send the value."""
    _process.is_check_child = True
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # the parent kills this group at the end: grandchildren included
    os.close(out_read)
    os.dup2(out_write, 1)
    os.dup2(out_write, 2)
    os.close(out_write)
    null = os.open(os.devnull, os.O_RDONLY)  # input() gets an end of file instead of a hang
    os.dup2(null, 0)
    os.close(null)
    sys.stdout, sys.stderr = (
        open(fd, "w", encoding="utf-8", errors="replace", buffering=1, closefd=False)
        for fd in (1, 2)
    )
    # A forked child must not reuse the parent's OpenMP thread pool (it would deadlock), and the
    # checks are tiny anyway: one thread is fastest.
    torch.set_num_threads(1)
    # The grader's own warnings (a check converting a tensor that requires grad, say) are not
    # what your code printed.
    warnings.filterwarnings("ignore", module=r"minillava\.graders")
    send, dumps = sender.send_bytes, json.dumps  # bound before any learner code runs
    try:
        message = dumps(task())
    except BaseException as exc:  # noqa: BLE001 - the report must say something
        message = dumps([ERROR, f"The grader failed in the check's process: {exc!r}"[:500]])
    if len(message) > _MESSAGE_BYTES:
        message = dumps([ERROR, "The check's message was too long to send back."])
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    send(message.encode())
    sender.close()


def _kill_group(process) -> None:
    """Kill the child and every process it started (they share its process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # before join: the group id is still the child's
    with contextlib.suppress(Exception):
        process.kill()


def _run_forked(task: Callable[[], object], timeout: float) -> _Outcome:
    ctx = multiprocessing.get_context("fork")
    receiver, sender = ctx.Pipe(duplex=False)
    out_read, out_write = os.pipe()
    sys.stdout.flush()  # or the child would print the parent's buffered output a second time
    sys.stderr.flush()
    process = ctx.Process(target=_child_main, args=(sender, out_read, out_write, task), daemon=True)
    with warnings.catch_warnings():  # Python 3.12+ warns about forking a threaded process;
        warnings.simplefilter("ignore", DeprecationWarning)  # the child only runs the check
        process.start()
    with contextlib.suppress(OSError):  # the child does the same: whichever comes first
        os.setpgid(process.pid, process.pid)
    sender.close()
    os.close(out_write)
    os.set_blocking(out_read, False)
    captured, outcome = _Captured(), _Outcome()
    deadline = time.monotonic() + timeout
    watched = [receiver, out_read, process.sentinel]
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                outcome.status = TIMEOUT
                break
            ready = multiprocessing.connection.wait(watched, left)
            if out_read in ready and not captured.read(out_read):
                watched.remove(out_read)  # every writer closed it: nothing more to read
            if receiver in ready or (process.sentinel in ready and receiver.poll(0)):
                try:
                    outcome.value = json.loads(receiver.recv_bytes(_MESSAGE_BYTES))
                except EOFError:
                    outcome.status = CRASH  # it closed the pipe without a word: it died
                except (OSError, ValueError):
                    pass  # too long, or not JSON: no value, which _verdict says
                break
            if process.sentinel in ready:
                outcome.status = CRASH
                break
        if outcome.status == CRASH:
            process.join(1.0)
            outcome.exit_code = process.exitcode
    finally:
        _kill_group(process)
        process.join()
        receiver.close()
        end = time.monotonic() + 1.0  # the rest of the output: the writers are dead now
        while out_read in watched and time.monotonic() < end:
            if multiprocessing.connection.wait([out_read], end - time.monotonic()):
                if not captured.read(out_read):
                    break
        os.close(out_read)
    outcome.output = captured.text()
    return outcome


def _run_threaded(task: Callable[[], object], timeout: float) -> _Outcome:
    values: list[object] = []
    worker = threading.Thread(target=lambda: values.append(task()), daemon=True)
    worker.start()
    worker.join(timeout)
    if values:
        return _Outcome(values[0])
    return _Outcome(status=TIMEOUT, message="(It may still be running: restart to stop it.)")


def _isolated(task: Callable[[], object], timeout: float) -> _Outcome:
    """Run task() the way isolation_mode() says, at most `timeout` seconds (not inline)."""
    mode = isolation_mode()
    if mode == "fork":
        return _run_forked(task, timeout)
    if mode == "thread":
        return _run_threaded(task, timeout)
    return _Outcome(task())


def _timeout_message(timeout: float) -> str:
    return (
        f"Stopped after {timeout:g} s: the check takes a few milliseconds with a correct "
        "solution. Look for a loop that never ends (a `while` whose condition never changes)."
    )


def _ended_by(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _verdict(outcome: _Outcome, timeout: float) -> tuple[str, str, str]:
    """(status, message, hint) for a check, decided here from what its process sent back:
    [status, message] or [status, message, hint]."""
    if outcome.status == TIMEOUT:
        return TIMEOUT, " ".join(filter(None, [_timeout_message(timeout), outcome.message])), ""
    if outcome.status == CRASH:
        return (
            CRASH,
            (
                f"Your code ended the grading process ({_ended_by(outcome.exit_code)}) before the "
                "check finished: look for sys.exit(), os._exit() or a crash in a native library."
            ),
            "",
        )
    value = outcome.value
    if (
        isinstance(value, list | tuple)
        and len(value) in (2, 3)
        and value[0] in STATUS_LABEL
        and all(isinstance(v, str) for v in value[1:])
    ):
        hint = value[2][:_MESSAGE_LIMIT] if len(value) == 3 else ""
        return value[0], value[1][:_MESSAGE_LIMIT], hint
    return CRASH, "The check's process sent back something that is not a result.", ""
