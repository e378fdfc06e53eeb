"""Help comes in steps, and never as code.

A failure says what is wrong (and, where the check recognises the mistake, why); `--hint` adds
where to look next. Neither may hand over the answer as code: these tests read every grader's
hints and diagnoses from its source and look for code in them, and run a wrong version through
the command to see each step shown when it should be.
"""

import ast
import re
from pathlib import Path

import pytest
import torch

from minillava import grading

GRADERS = Path(grading.__file__).parent / "graders"
CHAPTER_FILES = sorted(GRADERS.glob("ch*.py"))

# What code looks like in a sentence. A hint may name an idea ("the softmax", "the last
# dimension", "u·u"), not write the line that does it.
CODE = {
    "a backquoted expression": r"`",
    "a torch call": r"\b(?:torch|F|nn)\.\w",
    "a method call": r"\.\w+\(",
    "a function call": r"\b\w+\([^()]*\)",
    "a slice": r"\[[^\]]*:[^\]]*\]",
    "an operator": r" @ |\*\*|==|!=|\+=|->|\blambda\b",
    "a keyword argument": r"\b\w+=[\w\-\"'(\[]",
    "an assignment or formula": r"\b\w+ = ",
}


def _texts(node: ast.AST) -> str:
    """The literal text of a hint expression: its strings and f-strings' fixed parts."""
    parts = []
    for child in ast.walk(node):
        if isinstance(child, ast.Constant) and isinstance(child.value, str):
            parts.append(child.value)
    return " ".join(parts)


def _help_texts(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every hint and diagnosis a grader file writes."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            for keyword in node.keywords:
                if keyword.arg in ("hint", "diagnosis"):
                    found.append((keyword.value.lineno, _texts(keyword.value)))
            if name in ("fail", "GradingFailure", "_failure") and len(node.args) >= 2:
                found.append((node.args[1].lineno, _texts(node.args[1])))
            if name == "diagnose" and len(node.args) >= 2 and isinstance(node.args[1], ast.Dict):
                found += [(k.lineno, _texts(k)) for k in node.args[1].keys if k is not None]
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [getattr(t, "id", "") for t in targets]
            if node.value is not None and any("hint" in n.lower() for n in names):
                found.append((node.value.lineno, _texts(node.value)))
    return [(line, text) for line, text in found if text.strip()]


def test_the_scan_finds_hints():
    """The scan reads hints where graders write them (not an empty list that passes anything)."""
    assert sum(len(_help_texts(path)) for path in CHAPTER_FILES) >= 40


@pytest.mark.parametrize("path", CHAPTER_FILES, ids=lambda p: p.stem)
def test_no_code_in_hints_or_diagnoses(path):
    offenders = []
    for line, text in _help_texts(path):
        for what, pattern in CODE.items():
            match = re.search(pattern, text)
            if match:
                offenders.append(f"line {line}: {what} ({match.group(0)!r}) in {text!r}")
                break
    assert not offenders, f"{path.name}: code in hints:\n" + "\n".join(offenders)


def test_the_code_pattern_catches_code_and_spares_words():
    def has_code(text):
        return any(re.search(p, text) for p in CODE.values())

    for code in (
        "use min(pairs, key=counts.get)",
        "p = (v·u) / (u·u) * u",
        "A @ torch.linalg.solve(A.T @ A, A.T)",
        "mask with scores.masked_fill(mask, -inf)",
        "take x[:, 0]",
        "softmax(dim=-1)",
    ):
        assert has_code(code), code
    for words in (
        "Divide by the squared length of u, not by its length.",
        "The softmax must run over the keys: the last dimension of the scores (T, T).",
        "Ties go to the pair that appeared first; the ids 0-255 are the bytes.",
    ):
        assert not has_code(words), words


# --- the steps, as the learner sees them ------------------------------------------------------


def _no_division(v, u):
    return (v @ u) * u


def test_a_failure_says_what_is_wrong_and_the_hint_waits_for_hint(capsys):
    result = grading.run_check("ch01.project_onto_vector", _no_division)
    assert result.status == grading.FAIL
    assert "divide" in result.message.lower()  # the diagnosis: shown at once
    assert result.hint and result.hint not in result.message  # the hint: a step further

    chapter = grading.get_chapter("ch01")
    report = grading.ChapterReport(chapter, "exercises", [result], "exercises/ch01.py")
    plain = grading.format_report(report)
    assert "Hint:" not in plain and "minillava grade ch01 --hint" in plain
    with_hints = grading.format_report(report, hints=True)
    assert "Hint:" in with_hints and "--hint" not in with_hints


def test_check_in_a_notebook_shows_the_hint_on_request(capsys):
    grading.check("ch01.project_onto_vector", _no_division)
    plain = capsys.readouterr().out
    assert "Hint:" not in plain and "hint=True" in plain
    grading.check("ch01.project_onto_vector", _no_division, hint=True)
    assert "Hint:" in capsys.readouterr().out


def test_grade_command_takes_hint(capsys):
    assert grading.main(["ch01", "--hint"]) == 0
    out = capsys.readouterr().out
    assert "Chapter 1" in out and "--hint adds" not in out


def test_a_passing_check_has_no_hint():
    from solutions import ch01_projections as solution

    result = grading.run_check("ch01.project_onto_vector", solution.project_onto_vector)
    assert result.passed and result.hint == "" and torch.is_tensor(torch.zeros(1))


# --- the exercise stubs: their hints are words too --------------------------------------------

EXERCISES = Path(__file__).resolve().parents[2] / "exercises"
EXERCISE_FILES = sorted(EXERCISES.glob("ch[0-9][0-9]_*.py"))
HINT_LABEL = re.compile(r"\bhint:", re.IGNORECASE)

# A stub's docstring may name a tool for the learner to look up, by its bare name (torch.tril,
# F.normalize, einops.rearrange); the call written out with its arguments is still caught, by
# the patterns for a function call and a method call.
DOCSTRING_CODE = {what: pattern for what, pattern in CODE.items() if what != "a torch call"}


def _hint_paragraphs(lines: list[str], first_line: int) -> list[tuple[int, str]]:
    """(line, text) of each hint in `lines`: from a "Hint:" label to the next blank line."""
    found = []
    for i, line in enumerate(lines):
        label = HINT_LABEL.search(line)
        if not label:
            continue
        paragraph = [line[label.start() :].strip()]
        for following in lines[i + 1 :]:
            if not following.strip() or HINT_LABEL.search(following):
                break
            paragraph.append(following.strip())
        found.append((first_line + i, " ".join(paragraph)))
    return found


def _docstring_hints(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every hint in the docstrings of a file's functions, classes and methods,
    and in its comments."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                found += _hint_paragraphs(first.value.value.split("\n"), first.value.lineno)
    # Comments: a "# Hint:" line and the comment lines that continue it.
    comments = [
        line.strip()[1:] if line.strip().startswith("#") else "" for line in source.split("\n")
    ]
    found += _hint_paragraphs(comments, 1)
    return found


def test_the_scan_finds_the_stubs_hints():
    """The scan reads the hints the stubs give (not an empty list that passes anything)."""
    assert len(EXERCISE_FILES) >= 11
    assert sum(len(_docstring_hints(path)) for path in EXERCISE_FILES) >= 20


@pytest.mark.parametrize("path", EXERCISE_FILES, ids=lambda p: p.stem)
def test_no_code_in_the_stubs_hints(path):
    offenders = []
    for line, text in _docstring_hints(path):
        for what, pattern in DOCSTRING_CODE.items():
            match = re.search(pattern, text)
            if match:
                offenders.append(f"line {line}: {what} ({match.group(0)!r}) in {text!r}")
                break
    assert not offenders, f"exercises/{path.name}: code in hints:\n" + "\n".join(offenders)


def test_the_docstring_patterns_allow_a_tool_name_but_not_its_call():
    def has_code(text):
        return any(re.search(p, text) for p in DOCSTRING_CODE.values())

    for code in (
        "Hint: torch.tril(torch.ones(T, T)) keeps the lower triangle.",
        "Hint: min(counts, key=lambda p: (-counts[p], p)).",
        "Hint: F.normalize(e, dim=-1) makes every row unit length.",
        "Hint: inv_freq = theta ** (-torch.arange(0, D, 2).float() / D).",
    ):
        assert has_code(code), code
    for words in (
        "Hint: torch.tril keeps the lower triangle of a square matrix of ones.",
        "Hint: F.normalize makes every row unit length; then one matrix product.",
        "Hint: on a tie, the smaller pair wins, comparing first ids then second ids.",
    ):
        assert not has_code(words), words

    lines = ["Args and so on.", "Hint: the first line", "  and its next line.", "", "Not a hint."]
    assert _hint_paragraphs(lines, 10) == [(11, "Hint: the first line and its next line.")]
