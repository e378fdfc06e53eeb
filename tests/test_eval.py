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
    evaluate_descriptions,
    evaluate_false_premises,
    evaluate_turns,
    false_premise_items,
    follow_up_items,
    generate_answers,
    normalise_answer,
    score,
    vqa_items,
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
    assert "Follow-ups (" in text and "Later turns" in text and "False premises" in text
    assert _is_png(tmp_path / "accuracy.png") and _is_png(tmp_path / "gallery_test.png")
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["splits"]["test"]["model"]["n"] == 8
    assert len(saved["splits"]["test"]["follow_ups"]["per_turn"]) == 2
    assert "f1" in saved["splits"]["test"]["descriptions_second_turn"]["totals"]
    assert '"Describe the image." as a second turn' in text
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


def test_the_evaluation_asks_exactly_what_the_chat_asks_and_gets_its_answers(
    tiny_model, tokenizer, items, monkeypatch
):
    """Batched through `chat.reply`, each prompt is `ChatSession`'s, and so is each answer."""
    import minillava.chat as chat_module
    from minillava.chat import ChatSession, next_question

    asked = []
    real_reply = chat_module.reply

    def spy_reply(model, tok, conversations, *args, **kwargs):
        asked.extend(conversations)
        return real_reply(model, tok, conversations, *args, **kwargs)

    monkeypatch.setattr("minillava.eval.reply", spy_reply)
    batch = items[:6]
    pixels = torch.stack([item["pixel_values"] for item in batch])
    questions = [item["question"] for item in batch]
    answers = generate_answers(tiny_model, tokenizer, questions, pixels, max_new_tokens=4)
    assert asked == [next_question([], q, with_image=True) for q in questions]
    assert asked[0][0]["value"] == questions[0] + "\n<image>"  # the question, then the image
    for item, answer in zip(batch, answers, strict=True):
        session = ChatSession(tiny_model, tokenizer, item["pixel_values"], max_new_tokens=4)
        assert session.ask(item["question"]) == answer


def test_later_turns_are_asked_as_a_chat_session_would_ask_them(tiny_model, tokenizer):
    from minillava.chat import ChatSession
    from minillava.data.instruct import VQADataset
    from minillava.data.shapes import WorldConfig

    data = VQADataset("test", 5, WorldConfig(image_size=16), turns=3)
    conversations = [data[i] for i in range(5)]
    result = evaluate_turns(tiny_model, tokenizer, conversations, batch_size=3, max_new_tokens=4)
    assert result.n == 5 and len(result.per_turn) == 3
    for item, record in zip(conversations, result.records, strict=True):
        session = ChatSession(tiny_model, tokenizer, item["pixel_values"], max_new_tokens=4)
        said = [session.ask(turn["question"]) for turn in item["turns"]]
        assert record["predictions"] == said  # the same history, the same answers
        assert record["questions"] == [turn["question"] for turn in item["turns"]]


def test_turns_false_premises_and_descriptions_are_judged_by_meaning(
    monkeypatch, tokenizer, tiny_model
):
    """With the model replaced by an oracle that answers in sentences, everything is right;
    with one that names a colour for anything, no false premise is answered honestly."""
    from minillava.data.instruct import VQADataset
    from minillava.data.shapes import ShapesWorld, WorldConfig, make_description

    config = WorldConfig(image_size=16)
    conversations = [VQADataset("test", 8, config, turns=3)[i] for i in range(8)]
    world = ShapesWorld("test", 4, config)
    samples = [world[i] for i in range(4)]
    described = {}

    def oracle_reply(model, tok, convs, pixel_values, *args, **kwargs):
        out = []
        for conv, pixels in zip(convs, pixel_values, strict=True):
            question = conv[-1]["value"].removesuffix("\n<image>")
            asked = [i for i in conversations if torch.equal(i["pixel_values"], pixels)]
            turns = [t for item in asked for t in item["turns"] if t["question"] == question]
            if turns:  # right, in a sentence
                out.append(f" I think the answer is {turns[0]['answer']}.")
            elif question == "Describe the image.":
                match = [s for s in samples if torch.equal(s.pixel_values, pixels)][0]
                out.append(" " + make_description(match.scene))
                described[match.index] = [t["value"] for t in conv if t["from"] == "human"]
            else:
                out.append(" There is no such thing in the image.")
        return out

    monkeypatch.setattr("minillava.eval.reply", oracle_reply)
    turns = evaluate_turns(tiny_model, tokenizer, conversations, batch_size=3)
    assert turns.per_turn == [1.0, 1.0, 1.0]
    premises = false_premise_items("test", 6, image_size=16)
    assert evaluate_false_premises(tiny_model, tokenizer, premises)["honest"] == 1.0
    descriptions = evaluate_descriptions(tiny_model, tokenizer, samples, batch_size=3)
    assert descriptions["totals"]["f1"] == 1.0 and len(described) == 4
    # As the second turn of a chat: the opener asked first, its answer kept in the history.
    opener = "Is there a pink hexagon?"
    second = evaluate_descriptions(
        tiny_model, tokenizer, samples, batch_size=3, earlier=[opener] * 4
    )
    assert second["totals"]["f1"] == 1.0
    assert all(asked == [f"{opener}\n<image>", "Describe the image.\n<image>"]
               for asked in described.values())  # fmt: skip

    monkeypatch.setattr(
        "minillava.eval.reply", lambda model, tok, convs, *a, **k: [" red"] * len(convs)
    )
    assert evaluate_false_premises(tiny_model, tokenizer, premises)["honest"] == 0.0


def test_loss_by_word_kind_splits_the_answer_tokens_into_content_and_the_rest():
    from minillava.data.collate import collate_conversations
    from minillava.data.instruct import make_conversation
    from minillava.data.shapes import ShapesWorld, WorldConfig, sample_rng
    from minillava.eval import content_word_ids, loss_by_word_kind

    tok = get_tokenizer()
    torch.manual_seed(0)
    model = Llava(tiny_llava_config(tok))
    world = WorldConfig(image_size=16)
    val = ShapesWorld("val", 4, world)
    rows = [
        {
            "pixel_values": val[i].pixel_values,
            "conversations": make_conversation(
                val[i].scene, val[i].captions, sample_rng(0, "val", i), "caption"
            ),
        }
        for i in range(4)
    ]
    batch = collate_conversations(rows, tok)
    content = content_word_ids(tok, world)
    assert set(tok.encode(" red")) <= content and not set(tok.encode(" There")) & content
    on_content, on_rest = loss_by_word_kind(model, batch, content)
    everything, nothing = loss_by_word_kind(model, batch, set(range(tok.vocab_size)))
    assert torch.isfinite(torch.tensor([on_content, on_rest, everything])).all()
    # The overall mean lies between the two parts' means, and with every id counted as content
    # the content mean is the overall mean of the scored tokens: the model's own loss.
    assert min(on_content, on_rest) <= everything <= max(on_content, on_rest)
    assert everything == pytest.approx(model(**batch).loss.item(), rel=1e-5)
    assert nothing != nothing  # no "other" words left: the mean of nothing is nan


def test_follow_ups_are_asked_in_one_conversation_and_need_it(monkeypatch, tokenizer, tiny_model):
    """An oracle that reads the conversation answers both questions; one that answers every
    question as if it were the first (no memory of what "it" is) fails the follow-ups."""
    pairs = follow_up_items("test", 9, image_size=16)
    assert all(item["turns"][1]["query"]["follow_up"] for item in pairs)

    def answers_from(turn_of):
        def fake_reply(model, tok, convs, pixel_values, *args, **kwargs):
            out = []
            for conv, pixels in zip(convs, pixel_values, strict=True):
                item = [i for i in pairs if torch.equal(i["pixel_values"], pixels)][0]
                k = turn_of(len([t for t in conv if t["from"] == "human"]))
                out.append(f" It is {item['turns'][k]['answer']}.")
            return out

        return fake_reply

    monkeypatch.setattr("minillava.eval.reply", answers_from(lambda asked: asked - 1))
    assert evaluate_turns(tiny_model, tokenizer, pairs, batch_size=4).per_turn == [1.0, 1.0]
    monkeypatch.setattr("minillava.eval.reply", answers_from(lambda asked: 0))
    first, follow_up = evaluate_turns(tiny_model, tokenizer, pairs, batch_size=4).per_turn
    assert first == 1.0 and follow_up == 0.0
