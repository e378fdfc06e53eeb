"""Shared fixtures for the exercise graders' tests (see docs/grading.md).

MINILLAVA_GRADE_TARGET picks what test_graders.py grades: "solutions" (default, what CI runs:
every check must pass the reference) or "exercises" (your own work, graded through pytest).
"""

import os

import pytest

from minillava import grading


@pytest.fixture(scope="session")
def grade_target() -> str:
    target = os.environ.get("MINILLAVA_GRADE_TARGET", "solutions")
    if target not in grading.TARGETS:
        raise pytest.UsageError(f"MINILLAVA_GRADE_TARGET={target!r}, expected {grading.TARGETS}")
    return target


@pytest.fixture
def rejects():
    """rejects("ch01.name", wrong_fn, mentions=("u·u",)): the check must fail, and say so.

    Asserts the wrong version scores 0 with status fail/error (not "not implemented yet"), that
    the message (what a learner sees at once) contains every string in `mentions`, and the hint
    (shown with --hint) every string in `hint_mentions` (case-insensitive): the words a learner
    needs to find the mistake, at each step. Returns the Result for further asserts.
    """

    def _rejects(
        name: str, *fns, mentions=(), hint_mentions=(), status=(grading.FAIL, grading.ERROR)
    ):
        result = grading.run_check(name, *fns)
        assert result.status in status, (
            f"{name} should reject this wrong version, got {result.status}: {result.message}"
        )
        assert result.points == 0
        assert result.message.strip(), "a rejected version must come with an explanation"
        for text in mentions:
            assert text.lower() in result.message.lower(), (
                f"{name}: message should mention {text!r}:\n{result.message}"
                + (
                    f"\n(the hint has it: {result.hint})"
                    if text.lower() in result.hint.lower()
                    else ""
                )
            )
        for text in hint_mentions:
            assert text.lower() in result.hint.lower(), (
                f"{name}: hint should mention {text!r}:\n{result.hint or '(no hint)'}"
            )
        return result

    return _rejects
