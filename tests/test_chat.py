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


def test_session_keeps_history_and_the_image_after_every_question(tokenizer):
    model = tiny_llava(tokenizer)
    pixels = torch.zeros(3, 16, 16)
    session = ChatSession(model, tokenizer, pixels, max_new_tokens=3)
    first = session.ask("What is it?")
    session.ask("Are you sure?")
    assert [t["from"] for t in session.turns] == ["human", "gpt", "human", "gpt"]
    assert session.turns[0]["value"] == "What is it?\n<image>"
    assert session.turns[1]["value"].strip() == first  # kept as the model wrote it
    assert session.turns[2]["value"] == "Are you sure?\n<image>"
    # A single question through the helper equals the first turn of a session: both greedy.
    assert ask(model, tokenizer, pixels, "What is it?", max_new_tokens=3) == first
    session.set_image(None)
    assert session.turns == []
    assert ChatSession(model, tokenizer, None).turns == []  # no image: plain questions


def test_long_conversations_drop_the_oldest_turns_and_each_question_keeps_its_image(tokenizer):
    model = tiny_llava(tokenizer, max_seq_len=96)  # 4 image tokens + system line + a few turns
    session = ChatSession(model, tokenizer, torch.zeros(3, 16, 16), max_new_tokens=4)
    for i in range(8):
        session.ask(f"Question number {i}: what colour is the shape in the top left?")
    assert session.turns[-2]["value"] == (
        "Question number 7: what colour is the shape in the top left?\n<image>"
    )
    assert len(session.turns) < 16  # old turns were dropped
    assert all(t["value"].endswith("\n<image>") for t in session.turns[0::2])


# ----------------------------------------------------------------------------------------------
# --sample-image draws at the size the model was trained on: any other size the chat resizes,
# and a resized scene is not what training drew.


def test_sample_image_without_a_checkpoint_draws_at_the_cpu_preset_size(
    tmp_path, monkeypatch, capsys
):
    from minillava.presets import ModelSizes

    monkeypatch.chdir(tmp_path)  # no runs/cpu/llava.pt here: the default checkpoint is missing
    assert main(["--sample-image", "scene.png"]) == 0
    size = ModelSizes().image_size
    assert Image.open(tmp_path / "scene.png").size == (size, size) == (48, 48)
    out = capsys.readouterr().out
    assert f"{size}x{size}" in out and "no checkpoint" in out and "cpu preset" in out


def test_sample_image_draws_at_the_checkpoint_model_size(checkpoint, tmp_path, capsys):
    out = tmp_path / "scene.png"
    assert main(["--sample-image", str(out), "--checkpoint", str(checkpoint)]) == 0
    assert Image.open(out).size == (16, 16)  # tiny_llava_config's ViT reads 16 px
    printed = capsys.readouterr().out
    assert "16x16" in printed and str(checkpoint) in printed


def test_image_size_overrides_the_checkpoint(checkpoint, tmp_path, capsys):
    out = tmp_path / "scene.png"
    argv = ["--sample-image", str(out), "--checkpoint", str(checkpoint), "--image-size", "40"]
    assert main(argv) == 0
    assert Image.open(out).size == (40, 40)
    assert "--image-size" in capsys.readouterr().out
    with pytest.raises(SystemExit) as error:  # one ShapesWorld cannot draw: a usage error
        main(["--sample-image", str(out), "--image-size", "8"])
    assert error.value.code == 2


def test_sample_image_draws_the_checkpoint_world(tokenizer, tmp_path):
    import numpy as np

    from minillava.checkpoint import world_config_from_dict
    from minillava.data.shapes import ShapesWorld

    world = {"noise": 0.0, "max_objects": 2, "text_prob": 0.0}
    path = tmp_path / "run.pt"
    model = tiny_llava(tokenizer)
    config = {"tokenizer": "shapesworld", "world": world}
    save_checkpoint(path, model=model, step=0, config=config, model_config=asdict(model.config))
    assert main(["--sample-image", str(tmp_path / "a.png"), "--checkpoint", str(path)]) == 0
    expected = ShapesWorld("test", 1, world_config_from_dict(world, 16))[0].image
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(expected))


def test_an_unreadable_checkpoint_falls_back_to_the_cpu_preset_size(tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    assert main(["--sample-image", str(tmp_path / "s.png"), "--checkpoint", str(broken)]) == 0
    assert Image.open(tmp_path / "s.png").size == (48, 48)
    assert "could not read" in capsys.readouterr().out


def test_the_default_answer_length_holds_a_whole_description():
    """ "Describe the image." must not be cut off mid-sentence at the chat's default length."""
    from minillava.chat import ANSWER_TOKENS
    from minillava.data.shapes import ShapesWorld, WorldConfig, make_description
    from minillava.tokenizer import get_tokenizer

    tokenizer, world = get_tokenizer(), ShapesWorld("test", 2000, WorldConfig(image_size=48))
    longest = max(len(tokenizer.encode(make_description(world.scene(i)))) for i in range(2000))
    assert longest + 1 <= ANSWER_TOKENS  # the description, then its end token
