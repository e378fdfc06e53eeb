"""Evaluation and its report: the scoring is proven right with oracles; the model path, the
tables, plots and the `minillava eval` command run on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_llava_config

from minillava.data.instruct import QUESTION_TYPES as INSTRUCT_QUESTION_TYPES
from minillava.eval import (
    EvalResult,
    evaluate,
    generate_answers,
    normalise_answer,
    score,
    vqa_items,
    vqa_prompt,
)
from minillava.llava import Llava
from minillava.report import (
    clip_zero_shot,
    format_table,
    plot_accuracy_bars,
    plot_gallery,
    report,
)
from minillava.tokenizer import get_tokenizer
from minillava.vit import ViTConfig

QUESTION_TYPES = set(INSTRUCT_QUESTION_TYPES)


@pytest.fixture(scope="module")
def tokenizer():
    return get_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    config = tiny_llava_config(tokenizer)
    return Llava(config).eval()


@pytest.fixture(scope="module")
def items():
    return vqa_items("test", n=16, image_size=16)


def test_normalise_answer():
    assert normalise_answer("  Top Left. ") == "top left"
    assert normalise_answer("RED!") == "red"
    assert normalise_answer("yes") == "yes"
    assert normalise_answer("two  shapes?!") == "two shapes"
    assert normalise_answer("") == ""
    # Only trailing punctuation goes: "3.5" or an inner comma stays.
    assert normalise_answer("3.5") == "3.5"
    assert normalise_answer("red, blue.") == "red, blue"


def test_vqa_prompt_follows_the_eval_convention():
    assert (
        vqa_prompt("What colour?") == "What colour?\n<image>\nAnswer with a single word or phrase."
    )
    assert vqa_prompt("What colour?", with_image=False).startswith("What colour?\n")


def test_an_oracle_scores_100_percent_and_a_wrong_answerer_0(items):
    types = {item["type"] for item in items}
    assert types == QUESTION_TYPES  # 16 items cycle through all 8 types twice

    def oracle(batch):  # right, but in the casing and punctuation a model might use
        return [item["answer"].upper() + "." for item in batch]

    result = score(items, oracle, batch_size=5)
    assert result.accuracy == 1.0 and result.n == 16
    assert set(result.per_type) == types and set(result.per_type.values()) == {1.0}
    assert sum(result.counts.values()) == 16

    wrong = score(items, lambda batch: ["zzz"] * len(batch))
    assert wrong.accuracy == 0.0 and set(wrong.per_type.values()) == {0.0}


def test_per_type_accuracy_is_the_fraction_right_in_each_type():
    fake = [{"question": f"q{i}", "answer": "yes", "type": t} for i, t in enumerate("aaabbc")]
    # Right on a's 1st and 2nd, b's 1st; wrong elsewhere.
    answers = iter(["yes", "Yes.", "no", "yes", "no", "no"])
    result = score(fake, lambda batch: [next(answers) for _ in batch], batch_size=4)
    assert result.counts == {"a": 3, "b": 2, "c": 1}
    assert result.per_type == pytest.approx({"a": 2 / 3, "b": 1 / 2, "c": 0.0})
    assert result.accuracy == pytest.approx(3 / 6)


def test_accuracy_by_the_number_of_shapes_in_the_image(items):
    """A reader that never finds the object: right on every 1-shape image, wrong on the others."""

    def reads_the_only_shape(batch):
        return [item["answer"] if len(item["scene"].objects) == 1 else "zzz" for item in batch]

    result = score(items, reads_the_only_shape)
    counts = {k: sum(len(i["scene"].objects) == k for i in items) for k in range(1, 5)}
    assert result.by_objects == {k: (1.0 if k == 1 else 0.0, n) for k, n in counts.items() if n}
    assert result.to_dict()["by_objects"] == {str(k): a for k, (a, _) in result.by_objects.items()}
    assert "by shapes in the image: 1: 100%" in format_table(result)
    assert score([{"question": "q", "answer": "a", "type": "t"}], lambda b: ["a"]).by_objects == {}


def test_accuracy_by_question_form_for_the_types_asked_in_several_ways():
    """Relation right on "Is there a shape left of A?", wrong on "Is A left of B?": the split
    shows in by_op and in the table; a type asked one way only (colour) is not listed."""
    fake = [
        {"question": "q", "answer": "yes", "type": "relation", "op": "any_relation"},
        {"question": "q", "answer": "yes", "type": "relation", "op": "any_relation"},
        {"question": "q", "answer": "no", "type": "relation", "op": "relation"},
        {"question": "q", "answer": "no", "type": "relation", "op": "relation"},
        {"question": "q", "answer": "no", "type": "relation", "op": "relation"},
        {"question": "q", "answer": "red", "type": "colour", "op": "colour_of"},
        {"question": "q", "answer": "red", "type": "colour"},  # an item without an op
    ]
    result = score(fake, lambda batch: ["yes" for _ in batch])
    assert result.by_op == {"relation": {"any_relation": (1.0, 2), "relation": (0.0, 3)}}
    assert result.to_dict()["by_op"] == {"relation": {"any_relation": 1.0, "relation": 0.0}}
    table = format_table(result)
    assert "relation by question form: any_relation 100% (n=2), relation 0% (n=3)" in table
    assert "colour by question form" not in table


def test_accuracy_where_a_shortcut_is_wrong_shows_a_model_that_does_not_count():
    """A model that answers "1" to every count: right where one shape matches, wrong where two
    do, and there it gives the shortcut's answer every time."""
    fake = [
        {"question": "q", "answer": "1", "type": "count", "op": "count", "shortcut": "1"},
        {"question": "q", "answer": "1", "type": "count", "op": "count", "shortcut": "1"},
        {"question": "q", "answer": "2", "type": "count", "op": "count", "shortcut": "1"},
        {"question": "q", "answer": "3", "type": "count", "op": "count", "shortcut": "1"},
        {"question": "q", "answer": "3", "type": "count", "op": "count"},  # "How many shapes?"
        {"question": "q", "answer": "no", "type": "relation", "op": "any_relation"},
    ]
    fake[-1]["shortcut"] = "yes"  # "Is there a shape left of A?" with 3 shapes: "yes"
    result = score(fake, lambda batch: ["1" if item["type"] == "count" else "no" for item in batch])
    assert result.per_type == {"count": 0.4, "relation": 1.0}  # which does not say why
    assert result.where_shortcut_fails == {"any_relation": (1.0, 0.0, 1), "count": (0.0, 1.0, 2)}
    assert result.to_dict()["where_shortcut_fails"]["count"] == {
        "accuracy": 0.0, "took_shortcut": 1.0, "n": 2}  # fmt: skip
    table = format_table(result)
    assert "where a shortcut is wrong" in table
    assert "count 0% right, 100% the shortcut (n=2)" in table
    plain = score([{"question": "q", "answer": "a", "type": "t"}], lambda b: ["a"])
    assert plain.where_shortcut_fails == {} and "shortcut" not in format_table(plain)


def test_vqa_items_name_the_program_of_their_question(items):
    # The eval's items carry the query's op, so by_op works on a real split.
    assert all(isinstance(item["op"], str) and item["op"] for item in items)
    ops = {item["type"]: set() for item in items}
    for item in items:
        ops[item["type"]].add(item["op"])
    assert ops["colour"] == {"colour_of"}  # 16 items cycle through all eight types


def test_vqa_items_say_what_a_shortcut_would_answer():
    from minillava.data.instruct import VQADataset, shortcut_answer
    from minillava.data.shapes import WorldConfig

    data = VQADataset("test", 160, WorldConfig(image_size=16))
    known = 0
    for i in range(len(data)):
        scene, qa = data.qa(i)
        assert data[i]["shortcut"] == shortcut_answer(qa, scene)
        known += data[i]["shortcut"] is not None
    assert 20 < known < 80  # count, reasoning's counts, any_relation: not the other forms


def test_evaluate_on_a_tiny_random_model(tiny_model, tokenizer, items):
    result = evaluate(tiny_model, tokenizer, "test", items=items, batch_size=8, max_new_tokens=3)
    assert isinstance(result, EvalResult)
    assert set(result.per_type) == QUESTION_TYPES
    assert all(0.0 <= acc <= 1.0 for acc in result.per_type.values())
    assert 0.0 <= result.accuracy <= 1.0 and result.n == 16
    for mode in ("blank", "no_image"):
        blind = evaluate(
            tiny_model, tokenizer, items=items[:8], blind=True, blind_mode=mode, max_new_tokens=2
        )
        assert blind.blind and blind.blind_mode == mode and blind.n == 8
    assert not tiny_model.training


def test_batched_left_padded_answers_equal_one_at_a_time(tiny_model, tokenizer, items):
    """Left padding must not change an answer: the padding is masked out of attention and RoPE."""
    chosen = [items[i] for i in (0, 2, 5, 6)]  # questions of different lengths
    questions = [item["question"] for item in chosen]
    assert len({len(tokenizer.encode(q)) for q in questions}) > 1
    pixels = torch.stack([item["pixel_values"] for item in chosen])
    batched = generate_answers(tiny_model, tokenizer, questions, pixels, max_new_tokens=5)
    alone = [
        generate_answers(tiny_model, tokenizer, [q], pixels[i : i + 1], max_new_tokens=5)[0]
        for i, q in enumerate(questions)
    ]
    assert batched == alone


def test_format_table_lists_types_blind_and_gain():
    result = EvalResult("test", 0.75, {"colour": 1.0, "count": 0.5}, {"colour": 2, "count": 2})
    blind = EvalResult("test", 0.25, {"colour": 0.5, "count": 0.0}, {"colour": 2, "count": 2})
    blind.blind_mode = "blank"
    table = format_table(result, blind)
    lines = table.splitlines()
    colour = next(line for line in lines if line.startswith("colour"))
    assert "100.0%" in colour and "50.0%" in colour and "+50.0" in colour
    overall = next(line for line in lines if line.startswith("overall"))
    assert "75.0%" in overall and "25.0%" in overall and "+50.0" in overall
    assert "gain" not in format_table(result)
    # A second baseline (another blind mode) adds its own two columns.
    no_image = EvalResult("test", 0.5, {"colour": 0.5, "count": 0.5}, {"colour": 2, "count": 2})
    no_image.blind_mode = "no_image"
    both = format_table(result, blind, [no_image])
    assert "(blank / no_image)" in both.splitlines()[0]
    assert both.splitlines()[1].split() == ["type", "n", "accuracy", "blind", "gain"] + [
        "no_image",
        "gain",
    ]
    count = next(line for line in both.splitlines() if line.startswith("count"))
    assert count.split()[-4:] == ["0.0%", "+50.0", "50.0%", "+0.0"]


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path, items):
    result = score(items, lambda batch: [item["answer"] for item in batch], keep_images=6)
    assert sum("pixel_values" in r for r in result.records) == 6
    blind = score(items, lambda batch: ["yes"] * len(batch))
    bars = plot_accuracy_bars({"test": result, "test blind": blind}, tmp_path / "bars.png")
    gallery = plot_gallery(result, tmp_path / "gallery.png", n=6)
    assert _is_png(bars) and _is_png(gallery)


@pytest.mark.slow  # two splits of generation, matplotlib, chat samples
def test_report_prints_tables_and_writes_plots_and_json(tiny_model, tokenizer, tmp_path):
    lines = []
    summary = report(
        tiny_model, tokenizer, tmp_path, n=8, splits=("test",), n_chat=1, print_fn=lines.append
    )
    text = "\n".join(lines)
    assert "overall" in text and "blind" in text and "minillava:" in text
    assert _is_png(tmp_path / "accuracy.png") and _is_png(tmp_path / "gallery_test.png")
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["splits"]["test"]["model"]["n"] == 8
    assert summary["splits"]["test"]["blind"]["blind"] is True
    # Both baselines by default: a grey image first (the bars' and "blind"), then no image.
    assert summary["splits"]["test"]["blind"]["blind_mode"] == "blank"
    assert saved["splits"]["test"]["blind_no_image"]["blind_mode"] == "no_image"
    assert "(blank / no_image)" in text
    with pytest.raises(ValueError, match="blind_modes must be some of"):
        report(tiny_model, tokenizer, tmp_path, n=8, splits=("test",), blind_modes=("grey",))


def test_clip_zero_shot_on_a_tiny_random_clip(tokenizer):
    from minillava.clip import CLIP, CLIPConfig, TextEncoderConfig

    torch.manual_seed(0)
    clip = CLIP(
        CLIPConfig(
            vision=ViTConfig(
                image_size=16,
                patch_size=8,
                hidden_size=32,
                num_layers=1,
                num_heads=2,
                intermediate_size=64,
            ),
            text=TextEncoderConfig(
                vocab_size=tokenizer.vocab_size,
                hidden_size=32,
                num_layers=1,
                num_heads=2,
                intermediate_size=64,
            ),
            embed_dim=16,
        )
    )
    for attribute, k in (("shape", 5), ("colour", 6)):
        out = clip_zero_shot(clip, tokenizer, attribute, n=10)
        assert 0.0 <= out["accuracy"] <= 1.0 and out["n"] == 10
        assert out["chance"] == pytest.approx(1 / k) and len(out["classes"]) == k


def test_generate_answers_asks_the_short_answer_prompt_and_reads_it_as_the_chat_does(
    tiny_model, tokenizer, items, monkeypatch
):
    """The prompt is the instruct stage's `vqa_prompt`; the answer is `chat.decode_answer`'s."""
    import minillava.eval as eval_module
    from minillava.chat import decode_answer

    asked, decoded = [], []
    real_collate = eval_module.collate_conversations

    def spy_collate(samples, *args, **kwargs):
        asked.extend(sample["conversations"][0]["value"] for sample in samples)
        return real_collate(samples, *args, **kwargs)

    def spy_decode(tokenizer, ids):
        decoded.append(decode_answer(tokenizer, ids))
        return decoded[-1]

    monkeypatch.setattr(eval_module, "collate_conversations", spy_collate)
    monkeypatch.setattr(eval_module, "decode_answer", spy_decode)
    pixels = items[0]["pixel_values"][None]
    question = items[0]["question"]
    answers = generate_answers(tiny_model, tokenizer, [question], pixels, max_new_tokens=2)
    assert asked == [vqa_prompt(question)] and answers == decoded
