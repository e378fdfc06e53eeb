"""Checkpoints: atomic writes, safe loads, configs rebuilt from plain dicts."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from minillava.checkpoint import (
    CheckpointNotFoundError,
    config_from_dict,
    load_checkpoint,
    require_checkpoint,
    save_checkpoint,
    unwrap_model,
    world_config_from_dict,
)
from minillava.data.shapes import WorldConfig
from minillava.presets import Preset, get_preset


def _save(path, model, **kw):
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    save_checkpoint(
        path,
        model=model,
        optimizer=opt,
        step=7,
        config={"a": [1, 2.0, "x"]},
        model_config={"in": 3},
        **kw,
    )
    return opt


def test_round_trip_restores_weights_optimizer_and_metadata(tmp_path):
    model = nn.Linear(3, 2)
    rng_state = torch.get_rng_state()
    opt = _save(tmp_path / "c.pt", model, extra={"rng": rng_state})
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["step"] == 7 and ckpt["config"] == {"a": [1, 2.0, "x"]}
    assert ckpt["model_config"] == {"in": 3}
    assert torch.equal(ckpt["extra"]["rng"], rng_state)
    fresh = nn.Linear(3, 2)
    fresh.load_state_dict(ckpt["model"])
    assert torch.equal(fresh.weight, model.weight)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    fresh_opt.load_state_dict(ckpt["optimizer"])
    assert torch.equal(
        fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_write_is_atomic_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    _save(path, nn.Linear(3, 2))
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        _save(path, nn.Linear(3, 2))
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert load_checkpoint(path)["step"] == 7


def test_objects_that_weights_only_loading_would_refuse_are_rejected_at_save(tmp_path):
    with pytest.raises(TypeError, match=r"config\['preset'\] is a Preset"):
        save_checkpoint(
            tmp_path / "c.pt",
            model=nn.Linear(1, 1),
            step=0,
            config={"preset": Preset()},
            model_config={},
        )
    assert not (tmp_path / "c.pt").exists()


def test_load_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Preset()}, path)  # a custom class, pickled
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        load_checkpoint(path)


def test_missing_file_says_how_to_get_one(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="make train") as error:
        load_checkpoint(tmp_path / "nope.pt")
    assert isinstance(error.value, FileNotFoundError) and "nope.pt" in str(error.value)
    (tmp_path / "there.pt").write_bytes(b"")
    assert require_checkpoint(str(tmp_path / "there.pt")) == tmp_path / "there.pt"


def test_unwrap_model_strips_compile_wrapper():
    model = nn.Linear(2, 2)
    assert unwrap_model(torch.compile(model)) is model
    assert unwrap_model(model) is model


def test_config_from_dict_rebuilds_nested_dataclasses_and_tuples():
    preset = get_preset("gpu")
    preset.lora_targets = ("q_proj",)
    as_dict = preset.to_dict()
    as_dict["lora_targets"] = list(as_dict["lora_targets"])  # what a JSON round trip gives
    rebuilt = config_from_dict(Preset, as_dict)
    assert rebuilt == preset and dataclasses.is_dataclass(rebuilt.model)
    with pytest.raises(ValueError, match="unknown fields"):
        config_from_dict(Preset, {**as_dict, "bogus": 1})


def test_world_config_from_dict_reads_a_checkpoint_world_at_the_model_size():
    stored = dataclasses.asdict(WorldConfig(max_objects=2, text_prob=0.0))
    stored["heldout_combos"] = [list(pair) for pair in stored["heldout_combos"]]  # via JSON
    stored["unknown_field"] = 1  # a newer run's field: ignored, not a crash
    config = world_config_from_dict(stored, image_size=32)
    assert config == WorldConfig(image_size=32, max_objects=2, text_prob=0.0)
    assert world_config_from_dict(None, image_size=48) == WorldConfig(image_size=48)


def _save_tiny_llava(path, *, vocab_size=None, image_token_id=None):
    """A tiny LLaVA checkpoint as `minillava train` writes it, optionally with the decoder built
    for another vocabulary (what a checkpoint from before a tokenizer change looks like)."""
    from tiny_models import tiny_llava_config

    from minillava.llava import Llava
    from minillava.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("shapesworld")
    vocabulary = SimpleNamespace(  # what the model is built for: by default, this tokenizer
        vocab_size=vocab_size or tokenizer.vocab_size, image_id=image_token_id or tokenizer.image_id
    )
    model = Llava(config := tiny_llava_config(vocabulary))
    save_checkpoint(
        path,
        model=model,
        step=3,
        config={"tokenizer": "shapesworld"},
        model_config=dataclasses.asdict(config),
    )
    return model, tokenizer


def test_load_llava_rebuilds_a_checkpoint_made_with_the_current_tokenizer(tmp_path):
    from minillava.checkpoint import load_llava

    saved, tokenizer = _save_tiny_llava(tmp_path / "llava.pt")
    model, loaded_tokenizer, info = load_llava(tmp_path / "llava.pt", device="cpu")
    assert loaded_tokenizer.vocab_size == tokenizer.vocab_size and info["step"] == 3
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in model.state_dict().items())


def test_load_llava_refuses_a_checkpoint_from_another_vocabulary(tmp_path):
    from minillava.checkpoint import load_llava
    from minillava.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("shapesworld")
    old = tokenizer.vocab_size - 18  # e.g. the 666-id vocabulary before the system-line merges
    path = tmp_path / "old_llava.pt"
    _save_tiny_llava(path, vocab_size=old, image_token_id=old - 4)  # specials sit at the end
    with pytest.raises(ValueError) as error:
        load_llava(path, device="cpu")
    message = str(error.value)
    assert "old_llava.pt" in message  # names the file
    assert f"vocab_size {old} in the checkpoint vs {tokenizer.vocab_size}" in message
    assert "minillava train" in message and "vocabulary" in message  # says what to do and why


def test_load_llava_refuses_a_checkpoint_whose_image_token_moved(tmp_path):
    from minillava.checkpoint import load_llava
    from minillava.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("shapesworld")
    moved = (tokenizer.image_id + 1) % tokenizer.vocab_size
    path = tmp_path / "llava.pt"
    _save_tiny_llava(path, image_token_id=moved)
    with pytest.raises(ValueError, match=rf"<image> id {moved} in the checkpoint vs "
                       rf"{tokenizer.image_id}.*minillava train"):  # fmt: skip
        load_llava(path, device="cpu")


def test_the_command_line_reports_a_stale_checkpoint_in_one_line(tmp_path, capsys):
    from minillava import cli
    from minillava.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("shapesworld")
    path = tmp_path / "old_llava.pt"
    old = tokenizer.vocab_size - 18
    _save_tiny_llava(path, vocab_size=old, image_token_id=old - 4)
    image = tmp_path / "scene.png"
    assert cli.main(["chat", "--sample-image", str(image)]) == 0  # a picture to ask about
    code = cli.main(["chat", str(image), "What colour is the circle?", "--checkpoint", str(path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("minillava chat: checkpoint") and "minillava train" in err
    assert "Traceback" not in err
