"""bench/oracle_vqa.py: the relation forms it tells apart, and the questions it restricts to."""

import json
import random

import pytest
import torch
from tiny_models import load_bench_script

from minillava.data.instruct import ANSWER_SUFFIX, EXPLAIN_SUFFIX, ask_relation
from minillava.data.shapes import COLS, ROWS, ShapesWorld, WorldConfig
from minillava.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def oracle():
    return load_bench_script("oracle_vqa")


def tiny_decoder(oracle, tokenizer):
    """A decoder of width 16 (the oracle tokens' width in these tests), one layer."""
    return oracle.Decoder(
        oracle.DecoderConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=16, num_layers=1, num_heads=2,
            intermediate_size=32, max_seq_len=512,
        )
    )  # fmt: skip


def test_every_relation_query_has_a_form(oracle):
    # The script names a relation question's form by its query's op: a new op must get one.
    world, rng = ShapesWorld("train", 300, WorldConfig(image_size=48)), random.Random(0)
    ops = {ask_relation(world.scene(i), rng, world.config).query["op"] for i in range(300)}
    assert ops == set(oracle.FORM_OF_OP)


def test_make_batch_asks_only_the_forms_and_scenes_allowed(oracle):
    tokenizer = get_tokenizer()
    decoder = tiny_decoder(oracle, tokenizer)
    oracle_cells, scenes = oracle.OracleCells(16), []

    def cells(scene):  # the oracle tokens, and a record of the scenes they were built from
        scenes.append(scene)
        return oracle_cells(scene)

    world, rng = ShapesWorld("val", 200, WorldConfig(image_size=48)), random.Random(0)
    options = {"relation_forms": ("pair",), "objects": (2,)}
    x, y, mask, asked, _ = oracle.make_batch(
        world, range(24), ("relation",), 1, rng, tokenizer, decoder, cells, options
    )
    assert asked == [["relation:pair"]] * 24  # scenes that cannot give one were swapped
    assert [len(scene.objects) for scene in scenes] == [2] * 24
    assert x.shape[:2] == y.shape == mask.shape and x.shape[0] == 24

    _, _, _, asked, _ = oracle.make_batch(
        world, range(48), ("relation", "colour"), 1, rng, tokenizer, decoder, cells
    )
    kinds = {kind for row in asked for kind in row}
    assert "colour" in kinds and kinds <= {"colour", "relation:pair", "relation:any",
                                           "relation:nearest"}  # fmt: skip


def test_worked_pair_answers_end_in_the_yes_no_and_name_the_right_places(oracle):
    world, rng = ShapesWorld("train", 300, WorldConfig(image_size=48)), random.Random(0)
    pairs = [
        (scene, qa)
        for scene in map(world.scene, range(300))
        if (qa := ask_relation(scene, rng, world.config)).query["op"] == "relation"
    ]
    assert len(pairs) > 50
    for scene, qa in pairs:
        a = oracle.select(scene, qa.query["a"])[0]
        b = oracle.select(scene, qa.query["b"])[0]
        horizontal = qa.query["relation"] in ("left", "right")
        a_axis = COLS[a.col] if horizontal else ROWS[a.row]
        b_axis = COLS[b.col] if horizontal else ROWS[b.row]
        a_name, b_name = oracle.noun_phrase(qa.query["a"]), oracle.noun_phrase(qa.query["b"])
        answers = {
            form: oracle.worked_answer(scene, qa, form).answer for form in oracle.PAIR_ANSWERS
        }
        assert answers["plain"] == qa.answer in ("yes", "no")
        assert answers["cells"] == f"{a.cell} and {b.cell}, so {qa.answer}"
        assert answers["axis"] == f"{a_axis} and {b_axis}, so {qa.answer}"
        assert answers["restate"] == f"{a_name} is {a.cell}, {b_name} is {b.cell}, so {qa.answer}"
        assert (
            answers["restate_axis"] == f"{a_name} is {a_axis}, {b_name} is {b_axis}, so {qa.answer}"
        )
    # The other relation forms keep their answer.
    other = next(
        (scene, qa)
        for scene in map(world.scene, range(300))
        if (qa := ask_relation(scene, rng, world.config)).query["op"] != "relation"
    )
    assert oracle.worked_answer(*other, "restate_axis") is other[1]


def test_accuracy_scores_the_working_and_the_yes_no_apart(oracle):
    tokenizer = get_tokenizer()
    decoder = tiny_decoder(oracle, tokenizer)
    cells = oracle.OracleCells(16)
    world = ShapesWorld("val", 100, WorldConfig(image_size=48))
    options = {"relation_forms": ("pair",), "objects": (2,), "pair_answer": "axis"}
    x, y, mask, _, _ = oracle.make_batch(
        world, range(4), ("relation",), 1, random.Random(0), tokenizer, decoder, cells, options
    )
    scored = [tokenizer.decode([t for t in row.tolist() if t != -100]) for row in y]
    assert all(", so yes" in text or ", so no" in text for text in scored), scored
    result = oracle.accuracy(decoder, cells, world, tokenizer, ("relation",), 48, 1, options)
    assert {"relation:pair/work", "relation:pair/final"} <= set(result)
    assert result["relation:pair"] <= min(
        result["relation:pair/work"], result["relation:pair/final"]
    )
    plain = oracle.accuracy(
        decoder, cells, world, tokenizer, ("relation",), 48, 1, options | {"pair_answer": "plain"}
    )
    assert "relation:pair/final" not in plain


def test_explain_share_asks_some_pair_questions_to_explain_and_works_only_those(
    oracle, monkeypatch
):
    tokenizer = get_tokenizer()
    decoder = tiny_decoder(oracle, tokenizer)
    cells = oracle.OracleCells(16)
    world = ShapesWorld("val", 100, WorldConfig(image_size=48))
    rendered, render = [], tokenizer.render

    def spy(turns):  # the human turn and the answer of every row
        rendered.append((turns[0]["value"], turns[1]["value"]))
        return render(turns)

    monkeypatch.setattr(tokenizer, "render", spy)
    options = {"relation_forms": ("pair",), "objects": (2,), "pair_answer": "axis"}
    for share, expected in ((0.0, 0), (1.0, 40), (0.5, None)):
        rendered.clear()
        oracle.make_batch(
            world, range(40), ("relation",), 1, random.Random(1), tokenizer, decoder, cells,
            options | {"explain_share": share},
        )  # fmt: skip
        explained = [q.endswith(EXPLAIN_SUFFIX) for q, _ in rendered]
        worked = [", so " in a for _, a in rendered]
        assert explained == worked  # the working exactly where the prompt asks for it
        for (question, answer), asked in zip(rendered, explained, strict=True):
            if not asked:
                assert question.endswith(ANSWER_SUFFIX) and answer in (" yes", " no")
        if expected is not None:
            assert sum(explained) == expected
        else:
            assert 10 < sum(explained) < 30
    monkeypatch.undo()
    # Scored on the bare yes/no (share 0): no working to score apart.
    bare = oracle.accuracy(
        decoder, cells, world, tokenizer, ("relation",), 48, 1, options | {"explain_share": 0.0}
    )
    assert "relation:pair/final" not in bare
    explained = oracle.accuracy(
        decoder, cells, world, tokenizer, ("relation",), 48, 1, options | {"explain_share": 1.0}
    )
    assert "relation:pair/final" in explained


def test_explain_share_needs_a_working_and_one_question(oracle, tmp_path):
    out = tmp_path / "o.json"
    for bad in (["--explain-share", "0.5"], ["--explain-share", "1.5", "--pair-answer", "axis"]):
        with pytest.raises(SystemExit):
            oracle.main([*bad, "--questions", "1", "--eval-questions", "1", "--out", str(out)])
    assert not out.exists()


def test_pointer_targets_name_each_shape_of_a_pair_question_at_the_answering_position(oracle):
    tokenizer = get_tokenizer()
    decoder = tiny_decoder(oracle, tokenizer)
    world, rng = ShapesWorld("val", 200, WorldConfig(image_size=48)), random.Random(1)
    options = {"relation_forms": ("pair",), "objects": (2, 3, 4), "pair_answer": "plain"}
    scenes, cell_tokens, oracle_cells = [], [], oracle.OracleCells(16)

    def cells(scene):
        scenes.append(scene)
        cell_tokens.append(oracle_cells(scene))
        return cell_tokens[-1]

    x, y, _, _, pointers = oracle.make_batch(
        world, range(16), ("relation",), 1, rng, tokenizer, decoder, cells, options
    )
    for row, scene in enumerate(scenes):
        at, a_cell, b_cell, image = pointers[row].tolist()
        assert image + 9 <= at  # the 9 image tokens come after the question, before the answer
        assert torch.equal(x[row, image : image + 9], cell_tokens[row])
        # position `at` predicts the first token of the answer: " yes" or " no"
        assert tokenizer.decode([y[row, at + 1].item()]).strip() in ("yes", "no")
        assert (y[row, : at + 1] == -100).all()
        occupied = {o.row * 3 + o.col for o in scene.objects}
        assert a_cell in occupied and b_cell in occupied and a_cell != b_cell
    # A is the shape named first: "Is A left of B?" is "yes" exactly when A's column is smaller
    rng, checked = random.Random(2), 0
    for i in range(60):
        scene = world.scene(i)
        qa = ask_relation(scene, rng, world.config) if len(scene.objects) > 1 else None
        if qa is None or qa.query["op"] != "relation":
            continue
        a_cell, b_cell = oracle.pointer_targets(scene, qa)
        a_row, a_col, b_row, b_col = a_cell // 3, a_cell % 3, b_cell // 3, b_cell % 3
        truth = {"left": a_col < b_col, "right": a_col > b_col,
                 "above": a_row < b_row, "below": a_row > b_row}  # fmt: skip
        assert truth[qa.query["relation"]] == (qa.answer == "yes"), qa.question
        checked += 1
    assert checked >= 10
    # other questions, and pair questions asked to explain, have no probe target
    assert oracle.pointer_targets(scene, oracle.QA("What colour?", "red", "colour", {})) == (-1, -1)


def test_the_probe_loss_trains_and_is_recorded(oracle, tmp_path):
    out = tmp_path / "run.json"
    argv = [
        "--types", "relation", "--relation-forms", "pair", "--objects", "2", "--questions", "1",
        "--eval-questions", "1", "--steps", "3", "--eval-every", "3", "--batch-size", "8",
        "--val-images", "48", "--hidden-size", "32", "--layers", "2", "--out", str(out),
    ]  # fmt: skip
    for at, layer in (("answer", "2"), ("image", "2"), ("answer,image", "2,1")):
        probe = ["--pointer-weight", "1", "--pointer-at", at, "--pointer-layer", layer]
        assert oracle.main([*argv, *probe]) == 0
        history = json.loads(out.read_text())["history"]
        assert "pointer_loss" not in history[0] and 0 < history[-1]["pointer_loss"] < 5
        assert ("pointer_loss:image" in history[-1]) == ("," in at)  # the parts, when two
    with pytest.raises(SystemExit):  # a layer the decoder does not have
        oracle.main([*argv, "--pointer-weight", "1.0", "--pointer-layer", "3"])
    # a curriculum: the comparison of written places first, then the questions as asked
    assert oracle.main([*argv, "--given-axis-until", "2"]) == 0
    with pytest.raises(SystemExit):  # a place there is no probe for
        oracle.main([*argv, "--pointer-weight", "1.0", "--pointer-at", "question"])


def test_a_given_axis_question_writes_both_places_the_relation_compares(oracle):
    world, rng, checked = ShapesWorld("val", 200, WorldConfig(image_size=48)), random.Random(3), 0
    for i in range(80):
        scene = world.scene(i)
        if len(scene.objects) < 2:
            continue
        qa = ask_relation(scene, rng, world.config)
        if qa.query["op"] != "relation":
            continue
        question = oracle.given_axis_question(scene, qa)  # "Is A, place, rel B, place?"
        a_name, a_place, rest = question.removeprefix("Is ").split(", ", 2)
        words, axis, _ = oracle.RELATIONS[qa.query["relation"]]
        b_name, b_place = rest.removeprefix(words + " ").removesuffix("?").rsplit(", ", 1)
        assert (a_name, b_name) == (
            oracle.noun_phrase(qa.query["a"]),
            oracle.noun_phrase(qa.query["b"]),
        )
        # The answer follows from the two places written in, without the image.
        order = (COLS if axis == "col" else ROWS).index
        first, second = order(a_place), order(b_place)
        before = qa.query["relation"] in ("left", "above")  # A's place comes first
        holds = first < second if before else first > second
        assert holds == (qa.answer == "yes"), question
        checked += 1
    assert checked >= 10
