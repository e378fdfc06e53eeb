"""Hardening the command line: every mistake a user can make is one line on stderr that names
the input and what to do, with a non-zero exit code, and never a traceback.

The cases are an adversarial user's (issue #36, items 5 and 6): images that cannot be read (a
decompression bomb, a truncated file, not an image) given to `minillava chat`, on the command
line and in the middle of an interactive session; sampling flags out of range; an answer budget
larger than the model's context; an empty question; an unknown eval split; an output folder
that is a file. Image paths in a LLaVA JSON, bombs in a data set and deeply nested JSON are
tested with the loader, in test_llava_json.py; `read_image` itself in test_image_processor.py.

Most tests call `minillava.cli.main` in-process, which is what the console script runs; one
starts a real process, to show that what reaches the console is the one line and no traceback.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from PIL import Image
from test_image_processor import png_claiming
from tiny_models import tiny_llava_config

from minillava.checkpoint import save_checkpoint
from minillava.cli import main
from minillava.llava import Llava
from minillava.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained LLaVA (16 px images, 4 image tokens, a 256-position context)."""
    tokenizer = get_tokenizer()
    torch.manual_seed(0)
    model = Llava(tiny_llava_config(tokenizer)).eval()
    path = tmp_path_factory.mktemp("run") / "llava.pt"
    config = {"tokenizer": "shapesworld"}
    save_checkpoint(path, model=model, step=0, config=config, model_config=asdict(model.config))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A good image and the bad files: a bomb, a truncated PNG, a text file, a plain file."""
    folder = tmp_path_factory.mktemp("files")
    Image.new("RGB", (20, 16), (230, 30, 30)).save(folder / "good.png")
    png_claiming(folder / "bomb.png", 30_000, 30_000, rows=1)  # 900 megapixels claimed
    png_claiming(folder / "wide.png", 10_000, 10_000)  # a real one: 12 KB, 100 megapixels
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).save(buffer, format="PNG")
    (folder / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "notes.png").write_text("not an image")
    (folder / "afile").write_text("a file, where a folder should be")
    return folder


def run(argv, capsys) -> tuple[int, str, str]:
    """`minillava ARGV` in this process -> (exit code, stdout, stderr); argparse's usage errors
    leave through SystemExit, as they do at the console."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(err: str, *words: str) -> None:
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


# ----------------------------------------------------------------------------------------------
# Images that cannot be read


@pytest.mark.parametrize(
    "name, why",
    [
        ("bomb.png", "decompression bomb"),
        ("wide.png", "10000x10000 px"),
        ("cut.png", "image is truncated or corrupt"),
        ("notes.png", "not a readable image file"),
        ("missing.png", "image file not found"),
    ],
)
def test_chat_with_an_unreadable_image_says_which_and_why(checkpoint, files, capsys, name, why):
    code, out, err = run(["chat", files / name, "What is it?", "--checkpoint", checkpoint], capsys)
    assert code == 1 and out == ""
    assert_one_line(err, "minillava chat: ", str(files / name), why)


def test_a_bomb_at_the_console_is_one_line_and_no_traceback(checkpoint, files):
    # Before: PIL's DecompressionBombError, a traceback, from the console script.
    argv = ["chat", str(files / "bomb.png"), "What is it?", "--checkpoint", str(checkpoint)]
    done = subprocess.run(
        [sys.executable, "-m", "minillava.cli", *argv], capture_output=True, text=True
    )
    assert done.returncode == 1 and done.stdout == ""
    assert_one_line(done.stderr, "bomb.png", "decompression bomb")


def test_interactive_chat_says_so_and_goes_on_after_bad_images(
    checkpoint, files, monkeypatch, capsys
):
    script = "What is it?\n"
    for name in ("cut.png", "bomb.png", "notes.png"):
        script += f"/image {files / name}\n"
    script += "/image\nAnd now?\n/quit\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    argv = ["chat", files / "good.png", "--checkpoint", checkpoint, "--max-new-tokens", 2]
    code, out, err = run(argv, capsys)
    assert code == 0 and err == ""
    assert out.count("minillava> ") == 2  # answered before and after the bad images
    refusals = [line for line in out.splitlines() if line.startswith("(cannot use that image")]
    assert len(refusals) == 3
    assert "truncated" in refusals[0] and "decompression bomb" in refusals[1]
    assert "not a readable image" in refusals[2] and "(which image? /image PATH)" in out


# ----------------------------------------------------------------------------------------------
# Chat options


OPTION_ERRORS = [
    (["--top-p", "5"], ["argument --top-p", "(0, 1]", "got 5"]),
    (["--top-p", "0"], ["argument --top-p", "(0, 1]"]),
    (["--top-p", "nan"], ["argument --top-p"]),
    (["--top-p", "most"], ["argument --top-p", "expected a number, got 'most'"]),
    (["--top-k", "0"], ["argument --top-k", "at least 1, got 0"]),
    (["--top-k", "-3"], ["argument --top-k", "at least 1"]),
    (["--temperature", "-1"], ["argument --temperature", ">= 0, got -1"]),
    (["--temperature", "inf"], ["argument --temperature", ">= 0, got inf"]),
    (["--max-new-tokens", "0"], ["argument --max-new-tokens", "at least 1, got 0"]),
    (["--max-new-tokens", "-5"], ["argument --max-new-tokens", "at least 1"]),
    (["--index", "-1"], ["argument --index", "0 or more"]),
    (["--frobnicate"], ["unrecognized arguments: --frobnicate"]),
]


@pytest.mark.parametrize("flags, words", OPTION_ERRORS, ids=[" ".join(f) for f, _ in OPTION_ERRORS])
def test_chat_options_out_of_range_are_one_line(files, capsys, flags, words):
    # Refused while parsing, before any checkpoint is looked for.
    code, out, err = run(["chat", files / "good.png", "What is it?", *flags], capsys)
    assert code == 2 and out == ""
    assert_one_line(err, "minillava chat: ", *words, "(see minillava chat --help)")


def test_an_answer_budget_beyond_the_context_says_the_largest_that_fits(checkpoint, files, capsys):
    # Before: "the question is too long", as a traceback. Refused, not clamped: see
    # chat.answer_budget_problem for why.
    argv = ["chat", files / "good.png", "What is it?", "--checkpoint", checkpoint]
    code, out, err = run([*argv, "--max-new-tokens", 100_000], capsys)
    assert code == 2 and out == ""
    assert_one_line(err, "--max-new-tokens 100000 does not fit", "reads 256 positions")
    largest = int(re.search(r"at most (\d+) tokens", err).group(1))
    assert 200 < largest < 256 - 4  # the context, less the image and the prompt
    assert run([*argv, "--max-new-tokens", largest + 1], capsys)[0] == 2
    code, out, err = run([*argv, "--max-new-tokens", largest], capsys)  # the largest works
    assert code == 0 and err == "" and out.count("\n") == 1
    # interactive: counted for the shortest question
    code, _, err = run(argv[:2] + argv[3:] + ["--max-new-tokens", 100_000], capsys)
    assert code == 2 and "the shortest question and the image" in err


def test_a_question_longer_than_the_context_is_one_line(checkpoint, files, capsys):
    question = "What colour is the shape on the left? " * 40  # > 256 tokens alone
    argv = ["chat", files / "good.png", question, "--checkpoint", checkpoint]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert_one_line(err, "the question is too long")


@pytest.mark.parametrize("question", ["", "   "])
def test_an_empty_question_is_refused_not_taken_as_interactive(
    checkpoint, files, monkeypatch, capsys, question
):
    # Before: `minillava chat IMG ""` silently started an interactive session.
    stdin = io.StringIO("What is it?\n")
    monkeypatch.setattr("sys.stdin", stdin)
    code, out, err = run(["chat", files / "good.png", question, "--checkpoint", checkpoint], capsys)
    assert code == 2 and out == "" and stdin.tell() == 0  # nothing read from stdin
    assert_one_line(err, "the question is empty", "leave it out to chat interactively")


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_a_device_that_is_not_here_is_one_line(checkpoint, files, capsys, command):
    argv = ["chat", files / "good.png", "What is it?"] if command == "chat" else ["eval"]
    for device in ["bogus"] + ([] if torch.cuda.is_available() else ["cuda"]):
        code, out, err = run([*argv, "--checkpoint", checkpoint, "--device", device], capsys)
        assert code == 2 and out == ""
        assert_one_line(err, f"minillava {command}: --device {device}", "try --device auto")


# ----------------------------------------------------------------------------------------------
# eval, export and data export


@pytest.mark.parametrize(
    "split, words",
    [("bogus", ["unknown split 'bogus'"]), ("test,nope", ["unknown split 'nope'"]), (",", [])],
    ids=["bogus", "test,nope", "comma"],
)
def test_eval_names_an_unknown_split_and_the_choices(capsys, split, words):
    # Before: a ValueError traceback, after the model had loaded.
    code, out, err = run(["eval", "--split", split], capsys)
    assert code == 2 and out == ""
    assert_one_line(err, "minillava eval: argument --split", *words, "train, val, test, heldout")


@pytest.mark.parametrize("flag", ["--n", "--batch-size", "--chat-samples"])
def test_eval_counts_out_of_range_are_one_line(capsys, flag):
    code, _, err = run(["eval", flag, "-1"], capsys)
    assert code == 2
    assert_one_line(err, f"minillava eval: argument {flag}")


def refuse_to_load(*args, **kwargs):
    raise AssertionError("the output folder should be checked before the model loads")


@pytest.mark.parametrize("command", ["eval", "export", "data export"])
@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_an_output_folder_that_is_a_file_is_one_line(
    checkpoint, files, monkeypatch, capsys, command, out
):
    # Before: FileExistsError (or NotADirectoryError) as a traceback, after the model loaded.
    monkeypatch.setattr("minillava.report.load_llava", refuse_to_load)
    monkeypatch.setattr("minillava.export.load_llava", refuse_to_load)
    target = files / out
    argv = {
        "eval": ["eval", "--out-dir", target, "--checkpoint", checkpoint],
        "export": ["export", target, "--checkpoint", checkpoint],
        "data export": ["data", "export", target, "--n", 1],
    }[command]
    code, _, err = run(argv, capsys)
    assert code == 2
    why = "a file, not a folder" if out == "afile" else "Not a directory"
    if command != "data export":  # checked up front (cli.output_dir_problem)
        why = "afile is a file, not a folder"
    assert_one_line(err, f"minillava {command}: ", str(target), why, "choose another")


def test_an_output_folder_without_permission_is_one_line(checkpoint, tmp_path, monkeypatch, capsys):
    # Faults injected, so that the test runs as root too (root may write anywhere).
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != str(locked))
    code, _, err = run(["export", locked / "out", "--checkpoint", checkpoint], capsys)
    assert code == 2
    assert_one_line(err, f"{locked / 'out'} cannot be made: no permission to write in {locked}")

    def denied(out_dir, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(out_dir))

    monkeypatch.setattr("minillava.data.export.export", denied)
    code, _, err = run(["data", "export", locked / "out", "--n", 1], capsys)
    assert code == 2
    assert_one_line(err, f"cannot write to {locked / 'out'} (Permission denied)")
