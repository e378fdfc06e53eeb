"""`minillava chat`: one question, the interactive loop (stdin not a TTY), errors, sample images."""

from __future__ import annotations

import io
from dataclasses import asdict

import pytest
import torch
from PIL import Image
from tiny_models import tiny_llava_config

from minillava.chat import ChatSession, ask, decode_answer, main
from minillava.checkpoint import save_checkpoint
from minillava.llava import Llava
from minillava.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


def tiny_llava(tokenizer, max_seq_len: int = 256) -> Llava:
    torch.manual_seed(0)
    config = tiny_llava_config(tokenizer, max_seq_len=max_seq_len)
    return Llava(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("run") / "llava.pt"
    model = tiny_llava(tokenizer)
    save_checkpoint(
        path,
        model=model,
        step=0,
        config={"tokenizer": "shapesworld"},
        model_config=asdict(model.config),
    )
    return path


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.new("RGB", (40, 30), (230, 30, 30)).save(path)  # not square: the processor pads it
    return path


def test_one_question_prints_an_answer(checkpoint, image_file, capsys):
    argv = [str(image_file), "What colour is the shape?", "--checkpoint", str(checkpoint)]
    assert main(argv + ["--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out.splitlines()) == 1


def test_sampling_flags_are_accepted_and_seeded(checkpoint, image_file, capsys):
    argv = [str(image_file), "What is it?", "--checkpoint", str(checkpoint)]
    argv += ["--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    argv += ["--max-new-tokens", "6"]
    assert main(argv) == 0 and main(argv) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == second  # same seed, same sample


def test_interactive_mode_reads_stdin_that_is_not_a_tty(
    checkpoint, image_file, monkeypatch, capsys
):
    script = f"What is it?\n\n/image {image_file}\nAnd now?\n/image nowhere.png\n/quit\nignored\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(script))
    argv = [str(image_file), "--checkpoint", str(checkpoint), "--max-new-tokens", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("minillava> ") == 2  # two questions, /quit stops before "ignored"
    assert "now looking at" in out and "cannot use that image" in out
    assert "you> " not in out  # no prompt when stdin is a pipe


def test_missing_image_is_a_clear_error(checkpoint, tmp_path, capsys):
    assert main([str(tmp_path / "no.png"), "hi", "--checkpoint", str(checkpoint)]) == 1
    assert "no.png" in capsys.readouterr().err


def test_sample_image_draws_a_scene(tmp_path, capsys):
    out = tmp_path / "scene.png"
    assert main(["--sample-image", str(out), "--index", "2", "--image-size", "32"]) == 0
    assert Image.open(out).size == (32, 32)
    assert "minillava chat" in capsys.readouterr().out


def test_the_answer_ends_at_the_first_stop_or_padding_token(tokenizer):
    words = tokenizer.encode("a red circle")
    stop, pad = tokenizer.stop_ids[0], tokenizer.pad_id
    assert decode_answer(tokenizer, words + [stop] + tokenizer.encode(" more")) == "a red circle"
    assert decode_answer(tokenizer, words + [pad, pad]) == "a red circle"
    assert decode_answer(tokenizer, tokenizer.encode(" red ")) == "red"  # ran out of tokens
    assert decode_answer(tokenizer, [stop]) == ""


def test_session_keeps_history_and_the_image_in_the_first_turn(tokenizer):
    model = tiny_llava(tokenizer)
    pixels = torch.zeros(3, 16, 16)
    session = ChatSession(model, tokenizer, pixels, max_new_tokens=3)
    first = session.ask("What is it?")
    session.ask("Are you sure?")
    assert [t["from"] for t in session.turns] == ["human", "gpt", "human", "gpt"]
    assert (
        session.turns[0]["value"] == "<image>\nWhat is it?" and session.turns[1]["value"] == first
    )
    assert "<image>" not in session.turns[2]["value"]
    # A single question through the helper equals the first turn of a session: both greedy.
    assert ask(model, tokenizer, pixels, "What is it?", max_new_tokens=3) == first
    session.set_image(None)
    assert session.turns == []


def test_long_conversations_drop_the_oldest_turns_but_keep_the_image(tokenizer):
    model = tiny_llava(tokenizer, max_seq_len=96)  # 4 image tokens + system line + a few turns
    session = ChatSession(model, tokenizer, torch.zeros(3, 16, 16), max_new_tokens=4)
    for i in range(8):
        session.ask(f"Question number {i}: what colour is the shape in the top left?")
    assert session.turns[-2]["value"].endswith(
        "Question number 7: what colour is the shape in the top left?"
    )
    assert len(session.turns) < 16  # old turns were dropped
    assert session.turns[0]["value"].startswith("<image>\n")
    assert sum("<image>" in t["value"] for t in session.turns) == 1
