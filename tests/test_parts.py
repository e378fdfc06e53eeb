"""`minillava train --parts`: the exercises' functions run inside the model (minillava/parts.py).

With the reference solutions at a seam, the model's loss and gradients are the library's (to
float rounding): so a learner's run that ends at the library's figures says their parts are
right. A stub, or a function that fails its checks, leaves the library's in place, and the
table says why.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from minillava import grading, parts
from minillava.clip import CLIP
from minillava.llava import Llava
from minillava.lora import apply_lora
from minillava.presets import get_preset
from minillava.stages import clip_config, llava_config
from minillava.tokenizer import get_tokenizer


@pytest.fixture(autouse=True)
def library_parts():
    """Every test starts and ends with the library's function at every seam."""
    parts.reset()
    yield
    parts.reset()


def solution(seam: parts.Seam):
    chapter = grading.get_chapter(seam.chapter)
    return getattr(importlib.import_module(f"solutions.{chapter.module}"), seam.name)


# ---------------------------------------------------------------------------------------------
# Tiny-preset models and a batch that takes every path: padding, an image per row, labels
# ---------------------------------------------------------------------------------------------

TOKENIZER = get_tokenizer("shapesworld")


def build(kind: str) -> torch.nn.Module:
    preset = get_preset("tiny")
    torch.manual_seed(0)
    if kind == "clip":
        return CLIP(clip_config(preset, TOKENIZER.vocab_size))
    if kind == "llava_linear":
        preset.model.projector = "linear"
    model = Llava(llava_config(preset, TOKENIZER))
    if kind == "llava_lora":
        apply_lora(model.language_model, preset.lora_targets, rank=4, alpha=8.0)
        with torch.no_grad():  # B = 0 at the start: give the update something to add
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(std=0.1)
    return model


def llava_batch(padding_side: str = "right") -> dict:
    """3 prompts of 9, 12 and 7 tokens, an <image> in each, padded; the answers are scored."""
    g = torch.Generator().manual_seed(1)
    lengths, T = (9, 12, 7), 12
    ids = torch.randint(10, 100, (3, T), generator=g)
    mask = torch.zeros(3, T, dtype=torch.long)
    labels = torch.full((3, T), -100)
    for b, n in enumerate(lengths):
        span = slice(T - n, T) if padding_side == "left" else slice(0, n)
        mask[b, span] = 1
        real = torch.arange(T)[span]
        ids[b, real[1]] = TOKENIZER.image_id  # the second token of each prompt
        labels[b, real[-3:]] = ids[b, real[-3:]]  # the last three tokens: the answer
    ids = ids.masked_fill(mask == 0, TOKENIZER.pad_id)
    pixels = torch.randn(3, 3, 16, 16, generator=g)
    return dict(input_ids=ids, pixel_values=pixels, attention_mask=mask, labels=labels)


def clip_batch() -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(10, 100, (4, 9), generator=g)
    mask = torch.ones(4, 9, dtype=torch.long)
    mask[1, 6:] = mask[3, 4:] = 0  # captions of different lengths
    return dict(
        pixel_values=torch.randn(4, 3, 16, 16, generator=g), input_ids=ids, attention_mask=mask
    )


def outputs(kind: str) -> dict[str, torch.Tensor]:
    """The training loss (loss-only path), every gradient, and left-padded logits (as in
    generation): what a seam must leave unchanged."""
    model = build(kind)
    if kind == "clip":
        loss = model(**clip_batch()).loss
    else:
        loss = model(**llava_batch(), return_logits=False).loss
    loss.backward()
    found = {"loss": loss.detach()}
    found |= {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    if kind != "clip":
        with torch.no_grad():
            batch = llava_batch("left")
            found["left-padded logits"] = model(**batch, padding_side="left").logits
    return found


def assert_same(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal to float32 rounding: off by at most 1e-5 of the tensor's largest value (+ 1e-7:
    a key bias's gradient, zero in exact arithmetic, is rounding noise of 1e-8).

    Four seams round differently from the library: attention by hand against PyTorch's fused
    kernel, RoPE's angles computed rather than looked up in a table, CLIP's logits divided by
    the temperature rather than multiplied by the scale (2e-6 of the largest value at most,
    here); the others give the library's numbers bit for bit."""
    assert got.shape == expected.shape, name
    error = float((got - expected).abs().max()) if got.numel() else 0.0
    scale = float(expected.abs().max()) if got.numel() else 0.0
    assert error <= 1e-5 * scale + 1e-7, f"{name}: off by {error:.3g} (largest value {scale:.3g})"


# Which models each seam runs in (and must not change).
MODELS = {
    "scaled_dot_product_attention": ("llava", "clip"),
    "rms_norm": ("llava",),
    "apply_rotary": ("llava",),
    "swiglu": ("llava",),
    "patchify": ("llava", "clip"),
    "add_cls_and_positions": ("llava", "clip"),
    "contrastive_loss": ("clip",),
    "linear_projector": ("llava_linear",),
    "mlp_projector": ("llava",),
    "splice_image": ("llava",),
    "build_labels": ("llava",),
    "lora_forward": ("llava_lora",),
}


def test_every_seam_has_a_test_and_names_the_library_function_it_replaces():
    assert set(MODELS) == set(parts.SEAMS_BY_NAME)
    for seam in parts.SEAMS:
        module, _, name = seam.library.rpartition(".")
        if module.rpartition(".")[2][0].isupper():  # a method: minillava.vit.Class.method
            module, _, owner = module.rpartition(".")
            name = f"{owner}.{name}"
        target = importlib.import_module(module)
        for attr in name.split("."):
            target = getattr(target, attr)
        assert callable(target), seam.library
        chapter = grading.get_chapter(seam.chapter)
        assert any(check.uses == (seam.name,) for check in chapter.checks), seam.name


@pytest.mark.parametrize("seam", parts.SEAMS, ids=[s.name for s in parts.SEAMS])
def test_the_solution_at_a_seam_gives_the_library_loss_and_gradients(seam):
    fn, calls = solution(seam), []

    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    for kind in MODELS[seam.name]:
        parts.reset()
        expected = outputs(kind)
        parts.use(seam.name, counted)
        got = outputs(kind)
        assert calls, f"{seam.name} never ran in the {kind} model"
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert_same(got[name], value, name)


def answers(model: Llava) -> torch.Tensor:
    """Greedy answers to left-padded prompts: the KV cache's one-token steps, rows at different
    positions."""
    batch = llava_batch("left")
    del batch["labels"]
    return model.generate(**batch, max_new_tokens=4)


def test_all_the_solutions_at_once_give_the_library_loss_and_answers():
    expected, expected_answers = outputs("llava")["loss"], answers(build("llava"))
    choices = parts.use_parts("solutions")
    assert [c.whose for c in choices] == [parts.SOLUTION] * len(parts.SEAMS)
    assert_same(outputs("llava")["loss"], expected, "loss")
    assert torch.equal(answers(build("llava")), expected_answers)


def test_the_library_is_the_default_and_library_parts_changes_nothing():
    assert parts.get("rms_norm") is None and parts.in_use() == {}
    choices = parts.use_parts("library")
    assert all(c.whose == parts.LIBRARY for c in choices) and parts.in_use() == {}
    with pytest.raises(ValueError, match="expected one of"):
        parts.use_parts("mine")


def test_a_part_makes_its_tensors_on_the_models_device():
    """The solution's apply_rotary makes its frequencies with torch.arange(D), on the CPU,
    where the checks run it; at its seam it follows the model's device. ("meta" stands in for
    a GPU: a device that is not the CPU, present on every machine.)"""
    from solutions import ch04_brain

    x, positions = torch.empty(2, 2, 5, 8, device="meta"), torch.zeros(2, 5, device="meta")
    with pytest.raises(RuntimeError, match="device"):
        ch04_brain.apply_rotary(x, positions[0])
    parts.use("apply_rotary", ch04_brain.apply_rotary)
    assert parts.get("apply_rotary")(x, positions, 10000.0).device.type == "meta"


# ---------------------------------------------------------------------------------------------
# Choosing the learner's parts: checked first, the library's where they are not done or wrong
# ---------------------------------------------------------------------------------------------


def is_stub(fn) -> bool:
    """A function whose body (after its docstring) only raises NotImplementedError."""
    node = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    body = [s for s in node.body if not isinstance(s, ast.Expr)]
    return len(body) == 1 and isinstance(body[0], ast.Raise)


def test_stubs_leave_the_library_in_place_and_say_not_implemented_yet():
    choices = parts.use_parts("exercises")
    for choice in choices:
        module = grading.load_module(grading.get_chapter(choice.seam.chapter), "exercises")
        if is_stub(getattr(module, choice.seam.name)):  # (a learner's done ones may pass)
            assert choice.whose == parts.LIBRARY and choice.why == "not implemented yet"
            assert choice.seam.name not in parts.in_use()
    table = parts.format_parts_report(choices)
    assert "Parts (--parts exercises)" in table and "not implemented yet" in table


def eps_outside(x, weight, eps=1e-5):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt() * weight + 0 * eps


def interleaved(x, positions, theta=10000.0):
    D = x.shape[-1]
    angles = positions.float()[:, None] * theta ** (-torch.arange(0, D, 2).float() / D)
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def test_a_wrong_function_is_refused_with_its_graders_reason(monkeypatch):
    """rms_norm with eps outside the root, RoPE pairing neighbours: the library runs there, and
    the table says why; a correct swiglu next to them is used."""
    from solutions import ch04_brain

    learner = SimpleNamespace(rms_norm=eps_outside, apply_rotary=interleaved,
                              swiglu=ch04_brain.swiglu)  # fmt: skip
    stubs = SimpleNamespace()  # the other chapters: nothing there
    monkeypatch.setattr(
        grading, "load_module", lambda chapter, *a, **k: learner if chapter.id == "ch04" else stubs
    )
    choices = {c.seam.name: c for c in parts.use_parts("exercises")}
    assert choices["rms_norm"].whose == parts.LIBRARY
    assert choices["rms_norm"].why.startswith("fails ch04.rms_norm: ")
    assert "NaN" in choices["rms_norm"].why  # the grader's own words: a zero vector gave NaN
    assert choices["apply_rotary"].whose == parts.LIBRARY
    assert choices["apply_rotary"].why.startswith("fails ch04.apply_rotary: ")
    assert choices["swiglu"].whose == parts.YOURS
    assert "has no function patchify" in choices["patchify"].why
    assert parts.in_use() == {"swiglu": ch04_brain.swiglu}
    table = parts.format_parts_report(list(choices.values()))
    assert "fails ch04.rms_norm" in table and "yours     ch04 swiglu" in table


def test_workers_follow_the_launchers_decision_without_checking_again(monkeypatch):
    from solutions import ch04_brain

    learner = SimpleNamespace(rms_norm=ch04_brain.rms_norm, swiglu=ch04_brain.swiglu)
    monkeypatch.setattr(grading, "load_module", lambda *a, **k: learner)
    monkeypatch.setattr(grading, "run_check", lambda *a, **k: pytest.fail("checked again"))
    choices = [parts.Choice(seam, parts.YOURS if seam.name == "rms_norm" else parts.LIBRARY)
               for seam in parts.SEAMS]  # fmt: skip
    monkeypatch.delenv(parts.PARTS_ENV, raising=False)
    assert parts.decided_in_env() is None
    with parts.decision_in_env(choices):
        decided = parts.decided_in_env()
        assert decided == {"rms_norm"}
        parts.use_parts("exercises", decided)
    assert parts.decided_in_env() is None  # the launcher's own environment is as before
    assert parts.in_use() == {"rms_norm": ch04_brain.rms_norm}  # swiglu did not pass there


# ---------------------------------------------------------------------------------------------
# `minillava train --parts`
# ---------------------------------------------------------------------------------------------


def test_train_with_the_solutions_prints_whose_parts_run_and_records_them(tmp_path, capsys):
    import json

    from minillava.train import main

    args = ["--preset", "tiny", "--parts", "solutions", "--stage", "lm", "--steps", "2"]
    assert main([*args, "--out-dir", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Parts (--parts solutions): the solutions' at 12 of 12 seams" in out
    assert "solution  ch04 rms_norm" in out
    config = json.loads((tmp_path / "preset.json").read_text())
    assert config["preset"]["parts"] == "solutions" and config["parts"]["rms_norm"] == "solution"
    assert len((tmp_path / "lm.jsonl").read_text().splitlines()) == 2


def test_a_bad_parts_setting_is_refused(tmp_path, capsys):
    from minillava.train import main

    assert main(["--preset", "tiny", "--set", "parts=mine", "--out-dir", str(tmp_path)]) == 2
    assert "parts='mine'" in capsys.readouterr().err


def test_a_notebook_uses_your_finished_parts_up_to_its_chapter(monkeypatch, capsys):
    """Chapter 4's notebook: your swiglu runs in its model, a wrong rms_norm does not, and a
    finished chapter-7 projector is not brought into chapter 4's model."""
    from solutions import ch04_brain, ch07_bridge

    learner = {
        "ch04": SimpleNamespace(rms_norm=eps_outside, swiglu=ch04_brain.swiglu),
        "ch07": SimpleNamespace(mlp_projector=ch07_bridge.mlp_projector),
    }
    monkeypatch.setattr(
        grading, "load_module",
        lambda chapter, *a, **k: learner.get(chapter.id, SimpleNamespace()),
    )  # fmt: skip
    choices = parts.use_your_parts("ch04")
    assert [c.seam.chapter for c in choices] == ["ch02", "ch04", "ch04", "ch04"]
    assert parts.in_use() == {"swiglu": ch04_brain.swiglu}  # not ch07's projector
    said = capsys.readouterr().out
    assert said.startswith("The model below runs your swiglu; the library's: ")
    assert "rms_norm" in said and said.count("\n") == 1
    parts.reset()
    monkeypatch.setattr(grading, "load_module", lambda chapter, *a, **k: SimpleNamespace())
    parts.use_your_parts("ch04")
    assert "none of yours is done and passing yet" in capsys.readouterr().out
    assert parts.in_use() == {}


def test_a_run_on_other_parts_goes_beside_the_librarys():
    from minillava.presets import get_preset
    from minillava.train import default_out_dir

    preset = get_preset("cpu")
    assert default_out_dir(preset) == Path("runs/cpu")  # where chat and eval look by default
    preset.parts = "exercises"
    assert default_out_dir(preset) == Path("runs/cpu-exercises")
