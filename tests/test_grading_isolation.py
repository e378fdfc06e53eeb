"""The grader does not trust the learner's code: fault injection, one case per way to break it.

Each test writes a small exercise file into a temporary folder that is put in front of
exercises/ (like tests/test_grading.py's scratch file) and grades it with ch01's checks, with a
short timeout so a loop costs a second. What must hold: the grading process never imports the
file, a file that loops, exits or patches the grader costs its own chapter and nothing else, a
function that changes its input fails with the argument named, printed output is cut, and a
process the learner's code forks does not outlive its check.
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
from solutions import ch02_attention as solution_ch02

TIMEOUT = 1.0
STUBS = Path(exercises.__file__).parent / "ch01_projections.py"
SOLVED = Path(solution.__file__)
CH01 = grading.get_chapter("ch01")
CH01_POINTS, CH01_CHECKS = CH01.max_points, len(CH01.checks)  # the solved file scores all
forks = pytest.mark.skipif(
    grading.isolation_mode() != "fork", reason="only a forked child can be killed or captured"
)


@pytest.fixture
def exercise_file(tmp_path, monkeypatch):
    """write(name, source) -> a Chapter that grades exercises/<name>.py with ch01's checks."""
    monkeypatch.setattr(exercises, "__path__", [str(tmp_path), *exercises.__path__])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    written = []
    ch01 = grading.get_chapter("ch01")

    def write(name: str, source: str, chapter_id: str = "ch01") -> grading.Chapter:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return grading.Chapter(chapter_id, f"{ch01.title} ({name})", name, ch01.checks)

    yield write
    for name in written:
        sys.modules.pop(f"exercises.{name}", None)


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting to be reaped does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _gone(pid: int, within: float = 2.0) -> bool:
    end = time.monotonic() + within
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.02)
    return not _alive(pid)


# --- the learner's file: imported only in the checks' children ------------------------------


@forks
def test_the_grading_process_never_imports_the_file(exercise_file):
    chapter = exercise_file("ch01_solved", SOLVED.read_text())
    report = grading.grade_chapter(chapter, timeout=TIMEOUT)
    assert report.points == report.max_points == CH01_POINTS
    assert "exercises.ch01_solved" not in sys.modules
    assert report.path.endswith("ch01_solved.py")


@forks
def test_a_loop_at_the_top_of_the_file_costs_its_chapter_as_a_timeout(exercise_file):
    looping = exercise_file("ch01_loops", "while True:\n    pass\n")
    solved = exercise_file("ch01_solved", SOLVED.read_text())
    start = time.perf_counter()
    report = grading.grade_chapter(looping, timeout=TIMEOUT)
    assert time.perf_counter() - start < 3 * TIMEOUT  # one timeout for the file, not one a check
    assert [r.status for r in report.results] == [grading.TIMEOUT] * CH01_CHECKS
    assert report.points == 0
    assert "Importing exercises/ch01_loops.py did not finish" in report.import_error
    assert "top level of the file" in report.import_error
    assert grading.grade_chapter(solved, timeout=TIMEOUT).points == CH01_POINTS  # goes on


@forks
def test_an_exit_at_the_top_of_the_file_is_reported_and_the_run_goes_on(
    exercise_file, monkeypatch, capsys
):
    exiting = exercise_file("ch01_exits", "import os\nos._exit(7)\n")
    solved = exercise_file("ch01_solved", SOLVED.read_text(), chapter_id="ch02")
    report = grading.grade_chapter(exiting, timeout=TIMEOUT)
    assert [r.status for r in report.results] == [grading.CRASH] * CH01_CHECKS
    assert report.points == 0
    assert "exercises/ch01_exits.py ended the grading process" in report.import_error
    assert "exit code 7" in report.import_error
    text = grading.format_report(report)
    assert text.count("exit code 7") == 1  # said once for the chapter, not under every check
    # The same two files through `minillava grade all`: the table has both, and a total.
    monkeypatch.setattr(grading, "chapters", lambda: {"ch01": exiting, "ch02": solved})
    assert grading.main(["all", "--timeout", str(TIMEOUT)]) == 0
    out = capsys.readouterr().out
    assert "importing it ends the grader: run minillava grade ch01" in out
    assert f"{CH01_POINTS}/{CH01_POINTS}" in out and f"{CH01_CHECKS} of {CH01_CHECKS} pass" in out


def test_sys_exit_at_the_top_of_the_file_is_an_import_error(exercise_file):
    report = grading.grade_chapter(exercise_file("ch01_sysexit", "import sys\nsys.exit('bye')\n"))
    assert report.points == 0 and all(r.status == grading.ERROR for r in report.results)
    assert "could not be imported: SystemExit: bye" in report.import_error


PATCHES = """
import minillava.grading as g
import torch
import minillava.graders.ch01 as checks

g.run_check = lambda check, *a, **k: g.Result(str(check), "pass", 2, 2)
g._execute = lambda *a, **k: ("pass", "")
g.GradingFailure = type("NeverRaised", (Exception,), {})
g.assert_close = checks.assert_close = lambda got, *a, **k: got
torch.isclose = lambda a, b, **k: torch.ones_like(a, dtype=torch.bool)
for check in g.get_chapter("ch01").checks:
    check.run = lambda *a: None
"""


@pytest.mark.parametrize("mode", ["fork", "thread"])
def test_patching_the_grader_at_the_top_of_the_file_forges_nothing(
    exercise_file, monkeypatch, mode
):
    if mode == "fork" and grading.isolation_mode() != "fork":
        pytest.skip("no fork on this platform")
    monkeypatch.setenv("MINILLAVA_GRADE_ISOLATION", mode)
    guarded = lambda: (grading.run_check, grading._execute, grading.GradingFailure, torch.isclose)
    originals = guarded()
    runs = [c.run for c in grading.get_chapter("ch01").checks]
    patched = exercise_file("ch01_patched", STUBS.read_text() + PATCHES)
    report = grading.grade_chapter(patched, timeout=TIMEOUT)
    assert report.points == 0 and not any(r.passed for r in report.results)
    assert "Your code changed the grader" in report.import_error
    assert "the file changes the grader" in grading.format_summary([report])
    assert "it changed minillava.grading." in report.import_error
    # This process is untouched (in thread mode the file was imported here: the patch is undone).
    assert guarded() == originals
    assert [c.run for c in grading.get_chapter("ch01").checks] == runs
    solved = exercise_file("ch01_solved", SOLVED.read_text())
    assert grading.grade_chapter(solved, timeout=TIMEOUT).points == CH01_POINTS  # as usual


def test_patching_the_grader_while_the_check_runs_is_caught():
    def patches_then_answers_wrong(v, u):
        import minillava.graders.ch01 as checks

        checks.assert_close = lambda got, *a, **k: got
        return v

    result = grading.run_check("ch01.project_onto_vector", patches_then_answers_wrong)
    assert result.status == grading.ERROR and result.points == 0
    assert "changed the grader while the check ran" in result.message
    assert "minillava.graders.ch01.assert_close" in result.message


def test_a_message_the_parent_does_not_know_is_not_a_pass():
    for value in (
        ["PASS", ""], ["pass"], {"status": "pass"}, "pass", ["pass", 3], ["fail", "x", 3],
        ["pass", "", "", ""],
    ):  # fmt: skip
        status, *_ = grading._verdict(grading._Outcome(value), TIMEOUT)
        assert status == grading.CRASH


# --- the learner's function: called on copies --------------------------------------------------


def zeroes_its_input(v, u):
    v.zero_()
    return v


def adds_in_place(vector, u):
    vector += 1  # the classic: += on a tensor argument writes into the caller's tensor
    return (vector @ u) / (u @ u) * u


@pytest.mark.parametrize("mode", ["fork", "thread", "inline"])
def test_a_function_that_changes_its_input_fails_and_the_argument_is_named(monkeypatch, mode):
    if mode == "fork" and grading.isolation_mode() != "fork":
        pytest.skip("no fork on this platform")
    monkeypatch.setenv("MINILLAVA_GRADE_ISOLATION", mode)
    result = grading.run_check("ch01.project_onto_vector", zeroes_its_input)
    assert result.status == grading.FAIL and result.points == 0
    assert "zeroes_its_input changed its argument `v` (a tensor) in place" in result.message
    assert "return a new tensor" in result.message
    result = grading.run_check("ch01.project_onto_vector", adds_in_place)
    assert result.status == grading.FAIL
    assert "changed its argument `vector` (a tensor) in place" in result.message


def test_a_module_whose_forward_changes_its_input_is_named():
    class MultiHeadAttention(solution_ch02.MultiHeadAttention):
        def forward(self, x, mask=None):
            x.mul_(2.0)
            return super().forward(x, mask)

    result = grading.run_check("ch02.multi_head_attention", MultiHeadAttention)
    assert result.status == grading.FAIL
    assert "MultiHeadAttention.forward changed its argument `x` (a tensor)" in result.message


def test_a_function_that_changes_the_weights_it_was_handed_is_named():
    def freeze_for_alignment(model):
        model.vision_tower.requires_grad_(False)
        model.language_model.requires_grad_(False)
        model.projector.requires_grad_(True)
        with torch.no_grad():  # a stray update of the caller's weights
            next(model.projector.parameters()).add_(1.0)

    result = grading.run_check("ch08.freeze_for_alignment", freeze_for_alignment)
    assert result.status == grading.FAIL
    assert "changed the weights of its argument `model` in place (model.projector." in (
        result.message
    )


def test_copies_keep_gradients_and_strides():
    x = torch.randn(4, 6, requires_grad=True)
    view = x.detach()[:, :3]  # not contiguous: .view() must fail on the copy as on the original
    copy = grading._copy(x)
    copy.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # the copy is differentiable
    assert not grading._copy(view).is_contiguous()
    assert grading._same([x, {"a": view}], grading._copy([x, {"a": view}]))
    nan = torch.tensor([float("nan"), 1.0])
    assert grading._same(nan, grading._copy(nan))


def test_check_in_a_notebook_reports_a_changed_input(capsys):
    def project_onto_vector(v, u):
        v.mul_(0.0)
        return (v @ u) / (u @ u) * u

    grading.check(project_onto_vector)
    out = capsys.readouterr().out
    assert "FAIL    ch01.project_onto_vector" in out
    assert "changed its argument `v` (a tensor) in place" in out


# --- output and processes: what a check leaves behind ----------------------------------------


@forks
def test_printed_output_is_captured_and_cut():
    def chatty(v, u):
        print("first line from the learner")
        print("x" * 1_000_000, file=sys.stderr)
        return solution.project_onto_vector(v, u)

    result = grading.run_check("ch01.project_onto_vector", chatty)
    assert result.passed
    assert result.output.startswith("first line from the learner")
    assert len(result.output) < grading.OUTPUT_LIMIT
    assert "[cut: your code printed" in result.output and " MB;" in result.output  # once a call
    text = grading.format_result(result)
    assert "Your code printed:\n        | first line from the learner" in text


@forks
def test_what_the_file_prints_when_imported_is_shown_once(exercise_file):
    chapter = exercise_file("ch01_prints", STUBS.read_text() + "\nprint('hello from the top')\n")
    report = grading.grade_chapter(chapter, timeout=TIMEOUT)
    assert report.import_output == "hello from the top"
    assert not any(r.output for r in report.results)  # not repeated under every check
    assert grading.format_report(report).count("hello from the top") == 1


def _forks_a_sleeper(pid_file: Path, then_loop: bool):
    def project_onto_vector(v, u):
        pid = os.fork()
        if pid == 0:  # the grandchild: sleeps far longer than the check
            time.sleep(60)
            os._exit(0)
        pid_file.write_text(str(pid))
        while then_loop:
            pass
        return v

    return project_onto_vector


@forks
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
@pytest.mark.parametrize("then_loop", [False, True], ids=["returns", "times-out"])
def test_a_process_forked_by_the_learner_does_not_outlive_the_check(tmp_path, then_loop):
    pid_file = tmp_path / "pid"
    fn = _forks_a_sleeper(pid_file, then_loop)
    result = grading.run_check("ch01.project_onto_vector", fn, timeout=TIMEOUT)
    assert result.status == (grading.TIMEOUT if then_loop else grading.FAIL)
    assert _gone(int(pid_file.read_text()))
