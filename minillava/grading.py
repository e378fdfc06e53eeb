"""Grading: run each chapter's checks against your code and explain every failure in words.

Three ways in, one machinery underneath:

    minillava grade ch01             one line per exercise, a total, what is wrong under a failure
    minillava grade ch01 --hint      the same, and a hint under each failure: where to look next
    minillava grade all              a table with every chapter's score
    check(project_onto_vector)       in a notebook: grade one function inline, same messages

A *check* is a small function in `minillava/graders/chNN.py`. It calls your function on random
inputs, compares the result with the library's reference (values, shapes, gradients) and tests
invariants (a projection applied twice changes nothing; a causal model cannot see the future).
When something is off it raises `GradingFailure` with a sentence you can act on.

Help comes in steps. A failure always says what is wrong and, where the check recognises the
mistake, why ("the rows do not sum to 1: the softmax ran over the wrong dimension"). A *hint*
(shown with --hint, or `check(fn, hint=True)`) says where to look next, in words: no hint
holds code, so the step from the idea to the lines stays yours.

Each check runs in a child process (forked, so it starts in milliseconds) with a timeout, and
your file is imported only there, never in the grading process: an exception in your code is
reported with your own line, a `while True:` costs that exercise's points (its chapter's, at the
top level of the file), and an `os._exit` ends the child, never the whole run. Your functions
are called on copies of their arguments, so one that changes its input in place is told so by
name; what they print is shown under the check, cut to a few KB. A stub that still raises
`NotImplementedError` scores 0 as "not implemented yet".

The grader defends against accidents and easy tricks, not a determined attacker: where the
trust boundary lies is explained at the top of grading_isolation.py.

This file tells the story, top to bottom: registering checks, the helpers checks use, running
one check, grading a chapter, the reports, `check()` and the command. Three files underneath
hold the rest: grading_checks.py (a Check, its statuses, GradingFailure, the registry),
grading_guard.py (your arguments are copies; the grader's names are snapshotted) and
grading_isolation.py (the child process, its timeout and its output). Import from here: every
name of the grader is importable from `minillava.grading`.

How to write a grader for a new chapter: docs/grading.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import inspect
import linecache
import os
import pkgutil
import re
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

# The grader's other files (see the docstring above). The names marked
# "re-exported" are not used here: they are imported so that `from minillava.grading import ...`
# finds every name of the grader, wherever it is defined.
from minillava.grading_checks import (
    _REGISTRY,
    CRASH,
    ERROR,
    FAIL,
    PASS,
    STATUS_LABEL,
    TIMEOUT,
    TODO,
    Check,
    GradingFailure,
)
from minillava.grading_guard import (
    _GRADER_CHANGED,
    InputChanged,  # noqa: F401 - re-exported
    _copy,  # noqa: F401 - re-exported
    _grader_changed_message,
    _grader_snapshot,
    _on_copies,
    _same,  # noqa: F401 - re-exported
)
from minillava.grading_isolation import (
    _MESSAGE_LIMIT,
    OUTPUT_LIMIT,  # noqa: F401 - re-exported
    OUTPUT_LINES,  # noqa: F401 - re-exported
    WIDTH,
    _ended_by,
    _is_your_ctrl_c,
    _isolated,
    _Outcome,
    _silenced,
    _verdict,
    isolation_mode,  # noqa: F401 - re-exported
)

DEFAULT_TIMEOUT = float(os.environ.get("MINILLAVA_GRADE_TIMEOUT", "10"))
TARGETS = ("exercises", "solutions")  # the two packages a chapter's checks can grade

# ---------------------------------------------------------------------------------------------
# Registering checks
# ---------------------------------------------------------------------------------------------


@dataclass
class Chapter:
    """A chapter's graders: `minillava/graders/chNN.py`, with TITLE and MODULE at its top."""

    id: str  # "ch01"
    title: str  # "Projections"
    module: str  # "ch01_projections": exercises/ch01_projections.py, solutions/ch01_projections.py
    checks: list[Check] = field(default_factory=list)

    @property
    def max_points(self) -> int:
        return sum(c.points for c in self.checks)


def grader(name: str, points: int = 1, uses: str | Sequence[str] | None = None):
    """Decorator that registers a check in a `minillava/graders/chNN.py` file.

        @grader("project_onto_vector", points=2)
        def check_project_onto_vector(project_onto_vector):
            ...

    `name` becomes "chNN.<name>"; `uses` names the learner's callables the check receives, in
    order (default: just `name`). The first line of the docstring says what is checked.
    """
    uses_tuple = (name,) if uses is None else (uses,) if isinstance(uses, str) else tuple(uses)

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        module = fn.__module__
        chapter = module.rsplit(".", 1)[-1]
        doc = inspect.getdoc(fn) or ""
        check_ = Check(f"{chapter}.{name}", points, uses_tuple, fn, doc.split("\n")[0])
        checks = _REGISTRY.setdefault(module, [])
        checks[:] = [c for c in checks if c.name != check_.name] + [check_]  # re-import safe
        return fn

    return register


def chapters() -> dict[str, Chapter]:
    """Every chapter that has graders, {"ch01": Chapter, ...}, in order."""
    from minillava import graders

    found = {}
    for info in sorted(pkgutil.iter_modules(graders.__path__), key=lambda m: m.name):
        if not (info.name.startswith("ch") and info.name[2:].isdigit()):
            continue
        module = importlib.import_module(f"minillava.graders.{info.name}")
        found[info.name] = Chapter(
            id=info.name,
            title=getattr(module, "TITLE", info.name),
            module=getattr(module, "MODULE", info.name),
            checks=list(_REGISTRY.get(module.__name__, [])),
        )
    return found


def get_chapter(chapter: str | int) -> Chapter:
    """The Chapter for `chapter` = "ch01", "01", "1" or 1 (a KeyError names those that exist)."""
    text = str(chapter).lower().removeprefix("ch")
    known = chapters()
    key = f"ch{int(text):02d}" if text.isdigit() else str(chapter)
    if key not in known:
        raise KeyError(
            f"no graders for chapter {chapter!r}; chapters with exercises: {list(known)}"
        )
    return known[key]


def get_check(name: str) -> Check:
    """The Check called `name`, e.g. "ch01.project_onto_vector"."""
    chapter = get_chapter(name.split(".")[0])
    for c in chapter.checks:
        if c.name == name:
            return c
    names = [c.name for c in chapter.checks]
    raise KeyError(f"no check named {name!r}; {chapter.id} has {names}")


# ---------------------------------------------------------------------------------------------
# Helpers for writing checks: every message says what was checked, expected vs got, and why
# ---------------------------------------------------------------------------------------------

_step = threading.local()


def step(description: str) -> None:
    """Say what the check does next ("calling least_squares(A, b) with A (6, 3)").

    If your code raises, the report says it happened "while <description>".
    """
    _step.text = description


def fail(message: str, hint: str | None = None) -> None:
    raise GradingFailure(message, hint)


def _failure(message: str, hint: str | None, diagnosis: str | None) -> GradingFailure:
    """A failure whose message ends with the diagnosis, when the check recognised the mistake."""
    return GradingFailure(f"{message}\n{diagnosis}" if diagnosis else message, hint)


def fmt(x, precision: int = 4, max_items: int = 16, indent: int = 0) -> str:
    """A short, readable rendering of a tensor / array / number for a message.

    Small matrices keep one row per line; `indent` is the column where continuation lines start
    (so rows line up under the first one).
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16 or x.dtype == torch.float16:
            x = x.float()
        x = x.numpy()
    if isinstance(x, np.ndarray):
        if x.size > max_items:
            flat = np.array2string(x.reshape(-1)[:6], precision=precision, separator=", ")
            return f"{flat[:-1]}, ...] (shape {tuple(x.shape)})"
        text = np.array2string(
            x, precision=precision, separator=", ", suppress_small=True, max_line_width=10_000
        )
        return ("\n" + " " * indent).join(row.rstrip() for row in text.splitlines())
    if isinstance(x, float):
        return f"{x:.{precision}g}"
    return repr(x)


def shape_str(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def assert_tensor(
    got, what: str, hint: str | None = None, diagnosis: str | None = None
) -> torch.Tensor:
    """`got` must be a torch.Tensor; anything else is explained (a list, numpy, a tuple, None)."""
    if isinstance(got, torch.Tensor):
        return got
    kind = type(got).__name__
    if got is None:
        detail = "returned None: is a `return` statement missing?"
    elif isinstance(got, np.ndarray):
        detail = "returned a numpy array; use torch operations so the result is a torch.Tensor"
    elif isinstance(got, tuple):
        detail = f"returned a tuple of {len(got)} items, expected a single tensor"
    else:
        detail = f"returned a {kind}, expected a torch.Tensor"
    raise _failure(f"{what} {detail}.", hint, diagnosis)


def assert_shape(
    got,
    expected: Sequence[int],
    what: str,
    why: str = "",
    hint: str | None = None,
    diagnosis: str | None = None,
):
    """The shape must match exactly; the message spells out both shapes and common causes."""
    got = assert_tensor(got, what, hint, diagnosis)
    expected = tuple(expected)
    if tuple(got.shape) == expected:
        return got
    message = f"{what} has shape {shape_str(got.shape)}, expected {shape_str(expected)}"
    message += f": {why}." if why else "."
    got_shape = tuple(got.shape)
    if len(expected) >= 2 and got_shape == expected[:-2] + expected[-2:][::-1]:
        message += " That is the expected shape transposed: swap the last two dimensions."
    elif [s for s in got_shape if s != 1] == [s for s in expected if s != 1]:
        message += " Only dimensions of size 1 differ: look for a missing or extra (un)squeeze."
    elif got.numel() == int(np.prod(expected)):
        message += " Same number of values, arranged differently: check your reshape/transpose."
    raise _failure(message, hint, diagnosis)


def assert_close(
    got,
    expected: torch.Tensor,
    what: str,
    hint: str | None = None,
    atol: float = 1e-5,
    rtol: float = 1e-4,
    why_shape: str = "",
    diagnosis: str | None = None,
) -> torch.Tensor:
    """Values must match the reference (after a shape check); says where and by how much not.

    `diagnosis` (from `diagnose`) names the mistake when the check recognised it: it ends the
    message, shown at once. `hint` says where to look next, shown on request (--hint).
    """
    got = assert_shape(got, expected.shape, what, why=why_shape, hint=hint, diagnosis=diagnosis)
    if got.dtype == torch.bool or not (got.is_floating_point() or got.is_complex()):
        got = got.to(expected.dtype)
    g, e = got.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(g).all() and torch.isfinite(e).all():
        bad = tuple((~torch.isfinite(g)).nonzero()[0].tolist())
        raise _failure(
            f"{what} contains {fmt(g[bad].item())} at index {bad}, where the reference is "
            f"finite ({fmt(e[bad].item())}). NaN usually comes from 0/0 or a softmax over a row "
            "of -inf; inf from a division by zero or an overflow.",
            hint,
            diagnosis,
        )
    close = torch.isclose(g, e, atol=atol, rtol=rtol, equal_nan=True)
    if close.all():
        return got
    if g.numel() <= 16:
        message = (
            f"{what} is wrong.\n  expected {fmt(e, indent=11)}\n  got      {fmt(g, indent=11)}"
        )
    else:
        diff = (g - e).abs().nan_to_num(nan=float("inf"))
        worst = tuple(int(i) for i in np.unravel_index(int(diff.argmax()), tuple(g.shape)))
        message = (
            f"{what} is wrong: {int((~close).sum())} of {g.numel()} values differ from the "
            f"reference. The largest difference is at index {worst}: expected "
            f"{fmt(e[worst].item())}, got {fmt(g[worst].item())}."
        )
    raise _failure(message, hint, diagnosis)


def assert_equal(
    got,
    expected: torch.Tensor,
    what: str,
    hint: str | None = None,
    why_shape: str = "",
    diagnosis: str | None = None,
):
    """Exact match, dtype included: for masks (bool) and integer results."""
    got = assert_shape(got, expected.shape, what, why=why_shape, hint=hint, diagnosis=diagnosis)
    if got.dtype != expected.dtype:
        message = f"{what} has dtype {got.dtype}, expected {expected.dtype}."
        raise _failure(message, hint, diagnosis)
    if not torch.equal(got, expected):
        wrong = (got != expected).nonzero()[0].tolist()
        message = f"{what} is wrong at index {tuple(wrong)}"
        if got.numel() <= 64:
            # Whole, not cut at fmt's usual 16 items: two lists cut before the first difference
            # would look identical.
            shown = {"indent": 11, "max_items": 64}
            message += f".\n  expected {fmt(expected, **shown)}\n  got      {fmt(got, **shown)}"
        else:
            message += (
                f": expected {expected[tuple(wrong)].item()}, got {got[tuple(wrong)].item()}."
            )
        raise _failure(message, hint, diagnosis)
    return got


def diagnose(got, mistakes: dict[str, torch.Tensor | None]) -> str | None:
    """The diagnosis of the first known mistake that `got` reproduces, else None.

    `mistakes` maps a diagnosis ("It looks like you forgot to divide by u·u: ...") to what that
    mistake would return on the same inputs, so the message can name the mistake exactly. Pass
    it as `diagnosis=` to the assert_* helpers: it is shown at once, with the failure. Say what
    is wrong and why; leave the fix to the learner.
    """
    if isinstance(got, torch.Tensor):
        for diagnosis, wrong in mistakes.items():
            if wrong is None or tuple(got.shape) != tuple(wrong.shape):
                continue
            with contextlib.suppress(RuntimeError, TypeError):
                g, w = got.detach().double(), wrong.detach().double()
                if torch.allclose(g, w, 1e-3, 1e-4, equal_nan=True):
                    return diagnosis
    return None


# ---------------------------------------------------------------------------------------------
# A check's result, and an exception in your code explained
# ---------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What happened when one check ran against your code."""

    name: str
    status: str  # pass | fail | todo | error | timeout | crash
    points: int  # earned
    max_points: int
    message: str = ""  # for you: what was checked, expected vs got, what is wrong and why
    seconds: float = 0.0
    output: str = ""  # what your code printed while the check ran (the first few KB)
    hint: str = ""  # where to look next: shown on request (--hint, check(fn, hint=True))

    @property
    def passed(self) -> bool:
        return self.status == PASS


_LIBRARY_DIRS = tuple(
    str(Path(p).resolve())
    for p in {
        Path(__file__).parent,  # minillava itself: the grader and the reference
        Path(torch.__file__).parent.parent,  # site-packages
        Path(os.__file__).parent,  # the standard library
    }
)


def _learner_files(callables: Sequence) -> set[str]:
    """Source files of the learner's callables (and of the module each one lives in)."""
    files = set()
    for obj in callables:
        members = [obj] + (list(vars(obj).values()) if inspect.isclass(obj) else [])
        for member in members:
            code = getattr(inspect.unwrap(member), "__code__", None) if callable(member) else None
            if code is not None:
                files.add(code.co_filename)
        module = sys.modules.get(getattr(obj, "__module__", "") or "")
        if getattr(module, "__file__", None):
            files.add(module.__file__)
    return files


@dataclass
class _Frame:
    filename: str
    lineno: int
    name: str  # qualified: "MultiHeadAttention.forward"


def _frames(exc: BaseException) -> list[_Frame]:
    frames, tb = [], exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        frames.append(
            _Frame(code.co_filename, tb.tb_lineno, getattr(code, "co_qualname", code.co_name))
        )
        tb = tb.tb_next
    return frames


def _learner_frame(exc: BaseException, learner_files: set[str]) -> _Frame | None:
    """The deepest traceback frame in the learner's code, else the deepest outside libraries."""
    frames = _frames(exc)
    for frame in reversed(frames):
        if frame.filename in learner_files:
            return frame
    for frame in reversed(frames):
        path = str(Path(frame.filename).resolve()) if os.path.exists(frame.filename) else ""
        if frame.filename.startswith("<") or (path and path.startswith(_LIBRARY_DIRS)):
            continue
        return frame
    return None


def _where(frame) -> str:
    name = frame.filename
    if "ipykernel_" in name or name.startswith("<ipython"):
        place = f"your notebook cell, line {frame.lineno}"
    else:
        with contextlib.suppress(ValueError):
            name = os.path.relpath(name)
        place = f"{name}, line {frame.lineno}"
    line = linecache.getline(frame.filename, frame.lineno).strip()
    return f"{place}, in {frame.name}:\n    {line}" if line else f"{place}, in {frame.name}"


def _explain_exception(exc: BaseException, learner_files: set[str]) -> tuple[str, str]:
    """(status, message) for an exception that escaped a check."""
    frame = _learner_frame(exc, learner_files)
    if isinstance(exc, NotImplementedError) and frame is not None:
        if _frames(exc)[-1] == frame:
            return TODO, f"not implemented yet ({frame.name} still raises NotImplementedError)."
    text = f"{type(exc).__name__}: {exc}".strip()
    if len(text) > 400:
        text = text[:400] + " ..."
    while_ = getattr(_step, "text", "")
    if frame is not None:
        message = f"Your code raised {text}\nat {_where(frame)}"
    else:
        message = (
            f"The check could not use what your code returned: {text}\n"
            "Check that your function takes the arguments in the docstring and returns what it "
            "says (a tensor of the right shape)."
        )
        graders_dir = str(Path(__file__).parent / "graders")
        in_check = [f for f in _frames(exc) if f.filename.startswith(graders_dir)]
        if in_check:  # for course authors: where the check stopped
            where = os.path.relpath(in_check[-1].filename, Path(__file__).parent.parent)
            message += f" (The check stopped at {where}, line {in_check[-1].lineno}.)"
    if while_:
        message += f"\nThis happened while {while_}."
    return ERROR, message


# ---------------------------------------------------------------------------------------------
# Running one check
# ---------------------------------------------------------------------------------------------


class _NotGradable(Exception):
    """The learner's callables could not be found: the message says why."""


def _execute(
    check_: Check, callables: Sequence, seed: int, run: Callable[..., None] | None = None
) -> tuple[str, str, str]:
    """Run the check right here, on copies; every exception becomes (status, message, hint)."""
    _step.text = ""
    changed: list[str] = []  # what your functions changed in place, one message each
    run = check_.run if run is None else run
    hint = ""
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            run(*[_on_copies(c, changed) for c in callables])
    except GradingFailure as failure:
        status, message, hint = FAIL, failure.message, failure.hint or ""
    except BaseException as exc:  # noqa: BLE001 - the learner's code may raise anything
        if _is_your_ctrl_c(exc):
            raise
        status, message = _explain_exception(exc, _learner_files(callables))
    else:
        status, message = PASS, ""
    if changed:  # reported even if the check caught the InputChanged and went on
        return FAIL, changed[0], ""
    return status, message, hint


def _run_job(
    check_: Check, resolve: Callable[[], Sequence], seed: int, grader_changes: Callable
) -> list:
    """Find the learner's callables (importing their file), run the check: [status, message]
    or, for a failure with a hint, [status, message, hint].

    This is where the learner's code runs, in the check's child. What the verdict depends on
    (the check's function, `_execute`, `grader_changes` from the snapshot taken before the
    fork) is bound before any of it runs, so a file that replaces them cannot change how this
    check is run; and a file that rebinds the grader is reported, after the import and again
    after the check.
    """
    run, execute = check_.run, _execute
    try:
        with _silenced():
            callables = list(resolve())
    except _NotGradable as problem:
        return [ERROR, str(problem)]
    except BaseException as exc:  # noqa: BLE001 - a syntax error, a SystemExit at the top level
        if _is_your_ctrl_c(exc):
            raise
        return [ERROR, _import_error_message(exc, "your module")]
    changed = grader_changes()
    if changed:
        return [ERROR, _grader_changed_message(changed, "when your file was imported")]
    status, message, hint = execute(check_, callables, seed, run)
    changed = grader_changes()
    if changed:
        return [ERROR, _grader_changed_message(changed, "while the check ran")]
    return [status, message, hint] if hint else [status, message]


def _run(check_: Check, resolve: Callable[[], Sequence], timeout: float | None, seed: int):
    """Run one check isolated; `resolve()` finds the learner's callables where they will run."""
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    start = time.perf_counter()
    job = functools.partial(_run_job, check_, resolve, seed, _grader_snapshot())
    outcome = _isolated(job, timeout)
    status, message, hint = _verdict(outcome, timeout)
    points = check_.points if status == PASS else 0  # the parent's own count, never the child's
    seconds = time.perf_counter() - start
    return Result(
        check_.name, status, points, check_.points, message, seconds, outcome.output, hint
    )


def run_check(
    check_: Check | str,
    *callables,
    timeout: float | None = None,
    seed: int = 0,
) -> Result:
    """Run one check against the given callables (in the order of `check_.uses`)."""
    check_ = get_check(check_) if isinstance(check_, str) else check_
    if len(callables) != len(check_.uses):
        raise TypeError(f"{check_.name} needs {len(check_.uses)} callables {check_.uses}")
    return _run(check_, lambda: callables, timeout, seed)


# ---------------------------------------------------------------------------------------------
# Grading a chapter: import the learner's file (in a child), run every check
# ---------------------------------------------------------------------------------------------


@dataclass
class ChapterReport:
    chapter: Chapter
    target: str  # "exercises" or "solutions"
    results: list[Result]
    path: str = ""  # the graded file
    import_error: str = ""  # set when the file could not be imported at all
    import_output: str = ""  # what the file printed when it was imported

    @property
    def points(self) -> int:
        return sum(r.points for r in self.results)

    @property
    def max_points(self) -> int:
        return sum(r.max_points for r in self.results)


def load_module(chapter: Chapter, target: str = "exercises", reload: bool = False) -> ModuleType:
    """Import exercises/<module>.py (or solutions/); `reload` picks up edits made since.

    This imports into the calling process: the grader itself only calls it in a check's child.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r}, expected one of {TARGETS}")
    name = f"{target}.{chapter.module}"
    if reload and name in sys.modules:
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)


def _import_error_message(exc: BaseException, name: str) -> str:
    if isinstance(exc, SyntaxError):
        where = f"{os.path.relpath(exc.filename) if exc.filename else name}, line {exc.lineno}"
        line = (exc.text or "").rstrip()
        return f"{name} has a syntax error at {where}:\n    {line.strip()}\n{exc.msg}"
    frame = _learner_frame(exc, set())
    at = f"\nat {_where(frame)}" if frame else ""
    return f"{name} could not be imported: {type(exc).__name__}: {exc}{at}"


def _import_callables(chapter: Chapter, target: str, names: Sequence[str]) -> list:
    """In a check's child: the learner's file, read from disk again, and the graded names."""
    label = f"{target}/{chapter.module}.py"
    try:
        module = load_module(chapter, target, reload=True)
    except BaseException as exc:  # noqa: BLE001 - a SystemExit at the top level, for one
        raise _NotGradable(_import_error_message(exc, label)) from None
    missing = [n for n in names if not hasattr(module, n)]
    if missing:
        raise _NotGradable(f"{label} has no {', '.join(missing)}: was it renamed or deleted?")
    return [getattr(module, n) for n in names]


def _probe(chapter: Chapter, target: str, grader_changes: Callable) -> list:
    """In a child: import the file once. ["imported", its path, the graded names it has] or
    [ERROR, why not]. What the import printed comes back with it (as output)."""
    label = f"{target}/{chapter.module}.py"
    try:
        module = load_module(chapter, target, reload=True)
    except BaseException as exc:  # noqa: BLE001 - a syntax error, a SystemExit at the top level
        return [ERROR, _import_error_message(exc, label)]
    changed = grader_changes()
    if changed:
        return [ERROR, _grader_changed_message(changed, f"when {label} was imported")]
    names = sorted({n for c in chapter.checks for n in c.uses if hasattr(module, n)})
    return ["imported", getattr(module, "__file__", None) or label, names]


def _import_problem(outcome: _Outcome, label: str, timeout: float) -> tuple[str, str] | None:
    """(status, message) for every check of a chapter whose file could not be imported."""
    if outcome.status == TIMEOUT:
        return TIMEOUT, (
            f"Importing {label} did not finish in {timeout:g} s: look for a loop that never ends "
            "at the top level of the file (outside any function). Every check of the chapter "
            "needs the file, so each scores 0."
        )
    if outcome.status == CRASH:
        return CRASH, (
            f"{label} ended the grading process while it was imported "
            f"({_ended_by(outcome.exit_code)}): look for sys.exit() or os._exit() at the top "
            "level of the file (outside any function)."
        )
    value = outcome.value
    if isinstance(value, list) and len(value) == 2 and value[0] == ERROR:
        return ERROR, str(value[1])[:_MESSAGE_LIMIT]
    if not (
        isinstance(value, list)
        and len(value) == 3
        and value[0] == "imported"
        and isinstance(value[1], str)
        and isinstance(value[2], list)
    ):
        return CRASH, f"Importing {label} sent back something that is not a result."
    return None


def grade_chapter(
    chapter: Chapter | str | int,
    target: str = "exercises",
    timeout: float | None = None,
) -> ChapterReport:
    """Run every check of a chapter against exercises/ (or solutions/).

    This process never imports the file: a first child imports it (so a syntax error, a loop or
    an exit at the top level is reported once, for the whole chapter), then each check's child
    imports it again, fresh from disk, and runs the check.
    """
    chapter = chapter if isinstance(chapter, Chapter) else get_chapter(chapter)
    if target not in TARGETS:
        raise ValueError(f"target={target!r}, expected one of {TARGETS}")
    timeout = DEFAULT_TIMEOUT if timeout is None else timeout
    label = f"{target}/{chapter.module}.py"
    probe = _isolated(functools.partial(_probe, chapter, target, _grader_snapshot()), timeout)
    problem = _import_problem(probe, label, timeout)
    if problem is not None:
        status, message = problem
        results = [Result(c.name, status, 0, c.points, message) for c in chapter.checks]
        return ChapterReport(chapter, target, results, label, message, probe.output)
    _, path, present = probe.value
    results = []
    for check_ in chapter.checks:
        missing = [n for n in check_.uses if n not in present]
        if missing:
            message = f"{label} has no {', '.join(missing)}: was it renamed or deleted?"
            results.append(Result(check_.name, ERROR, 0, check_.points, message))
            continue
        resolve = functools.partial(_import_callables, chapter, target, check_.uses)
        results.append(_run(check_, resolve, timeout, seed=0))
    with contextlib.suppress(ValueError):
        path = os.path.relpath(path)
    return ChapterReport(chapter, target, results, path, import_output=probe.output)


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------
#
# WIDTH, the 96 columns a report wraps to, is set in grading_isolation.py, which cuts printed
# lines to it.


_SHAPE = re.compile(r"\((\d+(?:, \d+)*,?)\)")  # "(4, 3)": never split across lines


def _indent(message: str, prefix: str = "        ") -> str:
    lines = []
    for paragraph in message.splitlines():
        if paragraph.startswith("  ") or not paragraph.strip():  # pre-formatted (code, values)
            lines.append(prefix + paragraph)
            continue
        glued = _SHAPE.sub(lambda m: m.group(0).replace(" ", "\0"), paragraph)
        wrapped = textwrap.wrap(glued, WIDTH, initial_indent=prefix, subsequent_indent=prefix)
        lines += [line.replace("\0", " ") for line in wrapped]
    return "\n".join(lines)


def _printed(output: str, what: str, prefix: str = "        ") -> str:
    """What the learner's code printed, under a heading, each line marked so it stands apart."""
    return "\n".join(
        [f"{prefix}{what} printed:"] + [f"{prefix}| {line}" for line in output.splitlines()]
    )


def format_result(result: Result, name_width: int = 34, hints: bool = False) -> str:
    """One check's line; under a failure, what is wrong (and its hint, if `hints`)."""
    label = STATUS_LABEL[result.status]
    score = f"{result.points}/{result.max_points}"
    line = f"  {label:<7} {result.name:<{name_width}} {score:>5}"
    if result.status == TODO:
        line += "   not implemented yet"
    elif not result.passed and result.message:
        line += "\n" + _indent(result.message)
        if hints and result.hint:
            line += "\n" + _indent("Hint: " + result.hint)
    if result.output:
        line += "\n" + _printed(result.output, "Your code")
    return line


def _hints_waiting(results: Sequence[Result]) -> int:
    """How many failures have a hint not shown yet."""
    return sum(not r.passed and r.status != TODO and bool(r.hint) for r in results)


def format_report(report: ChapterReport, hints: bool = False) -> str:
    """`minillava grade chNN`: a line per exercise, what is wrong under each failure, a total.
    With `hints`, each failure's hint under it; without, a line saying how to see them."""
    chapter = report.chapter
    width = max([34] + [len(r.name) for r in report.results])
    lines = [f"Chapter {int(chapter.id[2:])}: {chapter.title}   (grading {report.path})", ""]
    if report.import_output:
        lines += [_printed(report.import_output, f"Importing {report.path}", "  "), ""]
    if report.import_error:  # the same message for every check: say it once, below them
        lines += [format_result(replace(r, message=""), width) for r in report.results]
        lines += ["", _indent(report.import_error, "  ")]
    else:
        lines += [format_result(r, width, hints) for r in report.results]
    total = f"{report.points}/{report.max_points}"
    lines += ["", f"  {'Total':<{width + 8}} {total:>5}"]
    waiting = _hints_waiting(report.results)
    if waiting and not hints:
        lines.append(
            f"  Stuck? minillava grade {chapter.id} --hint adds a hint under "
            f"{'the failure' if waiting == 1 else f'each of the {waiting} failures'}."
        )
    todo = sum(r.status == TODO for r in report.results)
    if report.points == report.max_points:
        lines.append("  All exercises pass. On to the next chapter!")
    elif todo == len(report.results):
        lines.append(f"  Nothing implemented yet: open {report.path} and fill in the stubs.")
    return "\n".join(lines)


def format_summary(reports: Sequence[ChapterReport]) -> str:
    """The `minillava grade all` table."""
    header = f"  {'Chapter':<34} {'Score':>7}   Exercises"
    lines = [header, "  " + "-" * (len(header) + 12)]
    for report in reports:
        results = report.results
        passed = sum(r.passed for r in results)
        todo = sum(r.status == TODO for r in results)
        detail = f"{passed} of {len(results)} pass"
        if report.import_error:
            why = {TIMEOUT: "importing the file never ends", CRASH: "importing it ends the grader"}
            detail = why.get(results[0].status if results else ERROR, "file does not import")
            if report.import_error.startswith(_GRADER_CHANGED):
                detail = "the file changes the grader"
            detail += ": run minillava grade " + report.chapter.id
        elif todo:
            detail += f", {todo} not implemented yet"
        title = f"{report.chapter.id}  {report.chapter.title}"
        lines.append(f"  {title:<34} {report.points:>3}/{report.max_points:<3}   {detail}")
    total = sum(r.points for r in reports)
    max_total = sum(r.max_points for r in reports)
    lines += ["  " + "-" * (len(header) + 12), f"  {'Total':<34} {total:>3}/{max_total:<3}"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Notebooks: check(fn)
# ---------------------------------------------------------------------------------------------


def _checks_for(fn) -> list[Check]:
    """Checks that grade `fn` alone, found by its name (and its chapter, if it is in a file)."""
    name = getattr(fn, "__name__", None)
    module = getattr(fn, "__module__", "") or ""
    matches = [c for chapter in chapters().values() for c in chapter.checks if c.uses == (name,)]
    parts = module.split(".")
    if len(parts) == 2 and parts[0] in TARGETS:  # exercises.ch02_attention -> only ch02's
        matches = [c for c in matches if parts[1].startswith(c.chapter + "_")] or matches
    return matches


def _fresh(fn):
    """For a function from exercises/, its current version on disk (edits since import count).

    Called in the check's child, like every import of the learner's file: a file that now loops
    or exits at the top level costs that check, not the notebook.
    """
    module = getattr(fn, "__module__", "") or ""
    if module.split(".")[0] != "exercises" or module not in sys.modules:
        return fn
    try:
        return getattr(importlib.reload(sys.modules[module]), fn.__name__, fn)
    except Exception:  # noqa: BLE001 - grade what we have; the check will report the rest
        return fn


def check(name_or_fn, *callables, timeout: float | None = None, hint: bool = False) -> None:
    """Grade one exercise inline (in a notebook) and print the result.

        check(project_onto_vector)                 # every check of that function
        check(project_onto_vector, hint=True)      # the same, with a hint under a failure
        check("ch02.attention", my_attention)      # one named check, your own function

    A function imported from exercises/ is re-read from disk first, so edits in your editor
    count without restarting the kernel. Never raises for a wrong or unfinished exercise.
    """
    if isinstance(name_or_fn, str):
        selected = [get_check(name_or_fn)]
        resolve = lambda: callables
        if len(callables) != len(selected[0].uses):
            print(f"{name_or_fn} grades {', '.join(selected[0].uses)}: pass exactly those.")
            return None
    else:
        fns = (name_or_fn, *callables)
        selected = _checks_for(name_or_fn)
        if not selected or callables:
            name = getattr(name_or_fn, "__name__", repr(name_or_fn))
            print(f'No exercise is graded by the name {name!r}. Use check("chNN.name", fn).')
            return None
        chapters_ = {c.chapter for c in selected}
        if len(chapters_) > 1:
            options = ", ".join(f'check("{c.name}", fn)' for c in selected)
            print(f"{name_or_fn.__name__} is an exercise in several chapters: use one of {options}")
            return None
        resolve = lambda: [_fresh(f) for f in fns]
    results = [_run(c, resolve, timeout, seed=0) for c in selected]
    width = max(len(r.name) for r in results)
    print("\n".join(format_result(r, width, hint) for r in results))
    if all(r.passed for r in results):
        print("  Well done!")
    elif _hints_waiting(results) and not hint:
        print("  Stuck? Run the check again with hint=True for a hint.")
    return None


# ---------------------------------------------------------------------------------------------
# The `minillava grade` command
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="minillava grade",
        description="Grade your exercises: one line per exercise, what is wrong under each "
        "failure.",
    )
    parser.add_argument("chapter", help="ch01 (or 01, 1) for one chapter, `all` for a table")
    parser.add_argument(
        "--solutions", action="store_true", help="grade solutions/ instead (course authors)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per exercise (10)"
    )
    parser.add_argument(
        "--hint", action="store_true", help="add a hint under each failure: where to look next"
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 unless every exercise passes"
    )
    args = parser.parse_args(argv)
    target = "solutions" if args.solutions else "exercises"
    if args.chapter == "all":
        reports = [grade_chapter(c, target, args.timeout) for c in chapters().values()]
        print(format_summary(reports))
    else:
        try:
            chapter = get_chapter(args.chapter)
        except (KeyError, ValueError) as exc:
            print(f"minillava grade: {exc.args[0]}", file=sys.stderr)
            return 2
        reports = [grade_chapter(chapter, target, args.timeout)]
        print(format_report(reports[0], hints=args.hint))
    complete = all(r.points == r.max_points for r in reports)
    return 1 if args.strict and not complete else 0


if __name__ == "__main__":
    sys.exit(main())
