"""The exercise stubs score 0, "not implemented yet", and never crash the grader.

A learner who has started the exercises still gets a green `make test`: a function that is no
longer a stub (its body is more than `raise NotImplementedError`) is only required to be graded
without crashing the grader, whatever its score.
"""

import ast
import inspect
import textwrap

import pytest

from minillava import grading

CHAPTERS = list(grading.chapters().values())


def _is_stub_function(node: ast.AST) -> bool:
    body = [
        s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
    ]
    return (
        len(body) == 1
        and isinstance(body[0], ast.Raise)
        and "NotImplementedError" in ast.unparse(body[0])
    )


def is_stub(obj) -> bool:
    """A function whose body only raises NotImplementedError, or a class with such a method."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    node = tree.body[0]
    if isinstance(node, ast.ClassDef):
        return any(_is_stub_function(n) for n in node.body if isinstance(n, ast.FunctionDef))
    return _is_stub_function(node)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=[c.id for c in CHAPTERS])
def test_stubs_score_zero_without_crashing(chapter):
    module = grading.load_module(chapter, "exercises")
    report = grading.grade_chapter(chapter, "exercises")
    assert not report.import_error, report.import_error
    for check, result in zip(chapter.checks, report.results, strict=True):
        assert result.status in grading.STATUS_LABEL
        assert 0 <= result.points <= result.max_points
        if result.status != grading.PASS:
            assert result.points == 0 and result.message
        if any(is_stub(getattr(module, name)) for name in check.uses):
            assert result.status == grading.TODO and result.points == 0, (
                f"{check.name}: a stub must score 0 as 'not implemented yet', got "
                f"{result.status}: {result.message}"
            )
            assert "not implemented yet" in result.message
    text = grading.format_report(report)  # the report a learner reads
    assert f"{report.points}/{report.max_points}" in text
    assert all(check.name in text for check in chapter.checks)
