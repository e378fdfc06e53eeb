"""The grading machinery: isolation, timeouts, messages, the CLI and check() for notebooks.

Chapter-specific graders are tested in tests/exercises/.
"""

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import exercises
from minillava import grading
from solutions import ch01_projections as solution


def stub(v, u):
    raise NotImplementedError("fill me in")


def loops_forever(v, u):
    while True:
        pass


def raises_inside(v, u):
    scale = v @ u
    return scale * u[10]  # IndexError on this line


def exits(v, u):
    os._exit(3)


def calls_sys_exit(v, u):
    sys.exit("bye")


def returns_none(v, u):
    (v @ u) / (u @ u) * u


def test_passing_and_stub():
    result = grading.run_check("ch01.project_onto_vector", solution.project_onto_vector)
    assert (result.status, result.points, result.max_points) == (grading.PASS, 2, 2)
    result = grading.run_check("ch01.project_onto_vector", stub)
    assert (result.status, result.points) == (grading.TODO, 0)
    assert "not implemented yet" in result.message and "stub" in result.message


def test_infinite_loop_is_stopped_by_the_timeout():
    start = time.perf_counter()
    result = grading.run_check("ch01.project_onto_vector", loops_forever, timeout=0.5)
    assert time.perf_counter() - start < 5
    assert result.status == grading.TIMEOUT and result.points == 0
    assert "loop that never ends" in result.message


def test_exception_reports_the_learners_line():
    result = grading.run_check("ch01.project_onto_vector", raises_inside)
    assert result.status == grading.ERROR and result.points == 0
    assert "IndexError" in result.message
    assert "test_grading.py, line" in result.message and "in raises_inside" in result.message
    assert "return scale * u[10]" in result.message
    assert "while projecting v = [2, 3] onto u = [4, 0]" in result.message


def test_exits_and_crashes_are_contained():
    result = grading.run_check("ch01.project_onto_vector", exits)
    assert result.status == grading.CRASH and "exit code 3" in result.message
    result = grading.run_check("ch01.project_onto_vector", calls_sys_exit)
    assert result.status == grading.ERROR and "SystemExit" in result.message


def test_wrong_return_type_is_explained():
    result = grading.run_check("ch01.project_onto_vector", returns_none)
    assert result.status == grading.FAIL
    assert "returned None: is a `return` statement missing?" in result.message


@pytest.mark.parametrize("mode", ["thread", "inline"])
def test_other_isolation_modes(monkeypatch, mode):
    monkeypatch.setenv("MINILLAVA_GRADE_ISOLATION", mode)
    assert grading.run_check("ch01.project_onto_vector", solution.project_onto_vector).passed
    result = grading.run_check("ch01.project_onto_vector", raises_inside)
    assert result.status == grading.ERROR and "return scale * u[10]" in result.message
    assert grading.run_check("ch01.project_onto_vector", stub).status == grading.TODO
    if mode == "thread":

        def slow(v, u):
            time.sleep(2)

        assert grading.run_check("ch01.project_onto_vector", slow, timeout=0.2).status == "timeout"


def test_checks_do_not_touch_the_callers_random_state():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    grading.run_check("ch01.project_onto_vector", solution.project_onto_vector)
    assert torch.equal(torch.rand(1), expected)


# --- message helpers ------------------------------------------------------------------------


def _message(fn, *args, **kwargs) -> str:
    with pytest.raises(grading.GradingFailure) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_assert_shape_spells_out_the_mismatch():
    msg = _message(grading.assert_shape, torch.zeros(4, 3), (3, 4), "W", why="W is d_in x d_out")
    assert "W has shape (4, 3), expected (3, 4): W is d_in x d_out." in msg
    assert "transposed" in msg
    msg = _message(grading.assert_shape, torch.zeros(2, 1), (2,), "p")
    assert "dimensions of size 1" in msg
    msg = _message(grading.assert_shape, torch.zeros(2, 6), (3, 4), "x", hint="reshape it")
    assert "Same number of values" in msg and "Hint: reshape it" in msg
    assert "returned a numpy array" in _message(grading.assert_tensor, torch.zeros(2).numpy(), "f")


def test_assert_close_shows_expected_and_got():
    msg = _message(grading.assert_close, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 3.0]), "f(x)")
    assert "f(x) is wrong." in msg and "expected [1., 3.]" in msg and "got      [1., 2.]" in msg
    big, ref = torch.zeros(4, 8), torch.zeros(4, 8)
    big[2, 5] = 1.0
    msg = _message(grading.assert_close, big, ref, "out")
    assert "1 of 32 values differ" in msg and "index (2, 5)" in msg
    msg = _message(grading.assert_close, torch.tensor([float("nan")]), torch.tensor([1.0]), "o")
    assert "nan" in msg
    msg = _message(
        grading.assert_equal, torch.ones(2, dtype=torch.int64), torch.ones(2).bool(), "m"
    )
    assert "dtype torch.int64, expected torch.bool" in msg


def test_diagnose_names_the_mistake():
    got = torch.tensor([2.0, 4.0])
    mistakes = {"forgot the 1/2": torch.tensor([2.0, 4.0]), "other": torch.zeros(2)}
    assert grading.diagnose(got, mistakes) == "forgot the 1/2"
    assert grading.diagnose(torch.ones(3), mistakes) is None
    assert grading.diagnose(None, mistakes) is None


def test_a_diagnosis_is_shown_with_the_failure_and_a_hint_apart():
    with pytest.raises(grading.GradingFailure) as info:
        grading.assert_close(
            torch.ones(2), torch.zeros(2), "f(x)", diagnosis="You added one.", hint="Look at b."
        )
    assert (
        info.value.message.endswith("\nYou added one.") and "Look at b." not in info.value.message
    )
    assert info.value.hint == "Look at b."


# --- grading a chapter, the CLI, a broken file ----------------------------------------------


def test_cli_grades_a_chapter(capsys):
    total = grading.get_chapter("ch01").max_points
    assert grading.main(["ch01"]) == 0
    out = capsys.readouterr().out
    assert "Chapter 1: Projections" in out and "exercises/ch01_projections.py" in out
    assert "TODO    ch01.project_onto_vector" in out and "not implemented yet" in out
    assert "Total" in out and f"0/{total}" in out
    assert grading.main(["1", "--solutions"]) == 0
    out = capsys.readouterr().out
    assert "PASS    ch01.least_squares" in out and f"{total}/{total}" in out
    assert "All exercises pass" in out
    assert grading.main(["ch01", "--strict"]) == 1
    capsys.readouterr()


@pytest.mark.slow
def test_cli_all_prints_a_table(capsys):
    assert grading.main(["all", "--solutions"]) == 0
    out = capsys.readouterr().out
    for chapter in grading.chapters().values():
        assert f"{chapter.id}  {chapter.title}" in out
        assert f"{chapter.max_points:>3}/{chapter.max_points:<3}" in out
    assert "Total" in out


def test_cli_unknown_chapter(capsys):
    assert grading.main(["ch99"]) == 2
    assert "no graders for chapter 'ch99'" in capsys.readouterr().err


@pytest.fixture
def scratch_exercises(tmp_path, monkeypatch):
    """A temporary exercises/ch01_scratch.py the tests can rewrite."""
    monkeypatch.setattr(exercises, "__path__", [str(tmp_path), *exercises.__path__])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    yield tmp_path / "ch01_scratch.py"
    sys.modules.pop("exercises.ch01_scratch", None)


def _scratch_chapter() -> grading.Chapter:
    ch01 = grading.get_chapter("ch01")
    return grading.Chapter("ch01", ch01.title, "ch01_scratch", ch01.checks)


def test_syntax_error_in_the_learners_file(scratch_exercises):
    scratch_exercises.write_text("def project_onto_vector(v, u)\n    return v\n")
    report = grading.grade_chapter(_scratch_chapter())
    assert report.import_error and report.points == 0
    assert "syntax error" in report.import_error and "line 1" in report.import_error
    assert all(r.status == grading.ERROR for r in report.results)
    assert "file does not import" in grading.format_summary([report])


def test_missing_function_is_reported(scratch_exercises):
    scratch_exercises.write_text("def something_else():\n    pass\n")
    report = grading.grade_chapter(_scratch_chapter())
    assert "has no project_onto_vector: was it renamed or deleted?" in report.results[0].message


# --- check() in notebooks -------------------------------------------------------------------


def test_check_prints_and_never_raises(capsys):
    assert grading.check(solution.project_onto_vector) is None
    out = capsys.readouterr().out
    assert "PASS    ch01.project_onto_vector" in out and "Well done" in out

    def projection_matrix(A):  # defined in a notebook cell: graded by its name
        return A @ A.T

    grading.check(projection_matrix)
    out = capsys.readouterr().out
    assert "FAIL    ch01.projection_matrix" in out and "orthonormal" in out

    from exercises.ch01_projections import projection_properties

    grading.check(projection_properties)
    assert "not implemented yet" in capsys.readouterr().out

    grading.check("ch01.least_squares", solution.least_squares)
    assert "PASS    ch01.least_squares" in capsys.readouterr().out

    def not_an_exercise(x):
        return x

    grading.check(not_an_exercise)
    assert 'check("chNN.name", fn)' in capsys.readouterr().out


def test_check_rereads_an_edited_exercise_file(scratch_exercises, capsys):
    scratch_exercises.write_text(
        textwrap.dedent(
            """
            def project_onto_vector(v, u):
                raise NotImplementedError
            """
        )
    )
    from exercises.ch01_scratch import project_onto_vector

    grading.check(project_onto_vector)
    assert "not implemented yet" in capsys.readouterr().out
    scratch_exercises.write_text(
        "def project_onto_vector(v, u):\n    return (v @ u) / (u @ u) * u  # now solved\n"
    )
    grading.check(project_onto_vector)  # the old function object: the file is read again
    assert "PASS" in capsys.readouterr().out


def test_a_result_the_check_cannot_use_is_explained():
    def run(f):
        f().shape  # noqa: B018 - the check assumes a tensor came back

    # Pretend `run` lives in minillava/graders/, as every real check does.
    graders_file = str(Path(grading.__file__).parent / "graders" / "__init__.py")
    run.__code__ = run.__code__.replace(co_filename=graders_file)
    check_ = grading.Check("ch01.fake", 1, ("f",), run)
    result = grading.run_check(check_, lambda: None)
    assert result.status == grading.ERROR
    assert "could not use what your code returned: AttributeError" in result.message
    assert "The check stopped at minillava/graders/__init__.py, line" in result.message
