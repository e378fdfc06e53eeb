"""A check, the outcomes it can end in, and the failure it raises: the grader's vocabulary.

The grader is four files. `grading.py` tells the story (registering checks with `@grader`, the
helpers checks use, running a check, grading a chapter, the reports, `check()` and the
command); `grading_guard.py` hands your functions copies of their arguments and keeps the
grader's names from being rebound; `grading_isolation.py` runs each check in a child process.
The few names they all need live here, below the other three, so that no file of the grader
imports another in a circle: the statuses a check can end with, `GradingFailure`, a `Check`,
and the registry `@grader` fills. Import them from `minillava.grading`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

# Outcomes of one check. Only "pass" earns points.
PASS, FAIL, TODO, ERROR, TIMEOUT, CRASH = "pass", "fail", "todo", "error", "timeout", "crash"
STATUS_LABEL = {
    PASS: "PASS",
    FAIL: "FAIL",
    TODO: "TODO",
    ERROR: "ERROR",
    TIMEOUT: "TIMEOUT",
    CRASH: "CRASH",
}


class GradingFailure(Exception):
    """Raised by a check when your function gives a wrong answer. The message is for you."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\nHint: {hint}")


@dataclass
class Check:
    """One graded exercise: `run(*your_callables)` returns quietly or raises GradingFailure."""

    name: str  # "ch01.project_onto_vector"
    points: int
    uses: tuple[str, ...]  # names of the functions/classes in exercises/chNN_*.py it needs
    run: Callable[..., None]
    description: str = ""  # first line of the check's docstring: what is checked

    @property
    def chapter(self) -> str:
        return self.name.split(".")[0]


_REGISTRY: dict[str, list[Check]] = {}  # graders module name -> its checks, in file order
