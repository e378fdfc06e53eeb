"""Every chapter's checks, run against solutions/ (CI) or exercises/ (MINILLAVA_GRADE_TARGET).

Against solutions/ every check must pass: a grader that fails the reference is a bug. Against
exercises/ this is your grade, as pytest output: `MINILLAVA_GRADE_TARGET=exercises pytest
tests/exercises/test_graders.py` (but `minillava grade chNN` reads better).
"""

import pytest

from minillava import grading

CHECKS = [c for chapter in grading.chapters().values() for c in chapter.checks]


@pytest.mark.parametrize("check", CHECKS, ids=[c.name for c in CHECKS])
def test_check_passes(check, grade_target):
    chapter = grading.get_chapter(check.chapter)
    module = grading.load_module(chapter, grade_target)
    callables = [getattr(module, name) for name in check.uses]
    result = grading.run_check(check, *callables)
    assert result.passed, f"{check.name} on {grade_target}/: {result.status}\n{result.message}"
    assert result.points == check.points


def test_every_chapter_is_complete():
    """Each graders file names its exercise module, and both files exist with the graded names."""
    for chapter in grading.chapters().values():
        assert chapter.checks, f"{chapter.id} registers no checks"
        for target in grading.TARGETS:
            module = grading.load_module(chapter, target)
            for check in chapter.checks:
                for name in check.uses:
                    assert hasattr(module, name), f"{target}.{chapter.module} lacks {name}"
