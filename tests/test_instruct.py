"""The data engine: every answer true of the scene, balanced mixes, LLaVA-format records."""

from __future__ import annotations

import collections
import random

import pytest

from minillava.data.instruct import (
    ALL_KINDS,
    KINDS,
    QA,
    QUESTION_TYPES,
    InstructDataset,
    VQADataset,
    false_premise_question,
    follow_up_question,
    make_conversations,
    make_question,
    question_with_image,
    shortcut_answer,
    vqa_pairs,
    world_text,
)
from minillava.data.shapes import HELDOUT_COMBOS, Scene, SceneObject, ShapesWorld, WorldConfig

SMALL = WorldConfig(image_size=32)
ROWS, COLS = ("top", "middle", "bottom"), ("left", "middle", "right")


# An evaluator written independently of the generator: the query (what the question asks, as
# data) and the annotation alone give the answer.
def cell(row: int, col: int) -> str:
    return "center" if (row, col) == (1, 1) else f"{ROWS[row]} {COLS[col]}"


def attrs(o) -> dict:
    return {"shape": o.shape, "colour": o.colour, "size": o.size, "row": o.row, "col": o.col,
            "cell": cell(o.row, o.col)}  # fmt: skip


def find(scene, constraints: dict) -> list:
    return [o for o in scene.objects if all(attrs(o)[k] == v for k, v in constraints.items())]


def the(scene, constraints: dict):
    found = find(scene, constraints)
    assert len(found) == 1, f"reference {constraints} is ambiguous or empty: {found}"
    return found[0]


def yes_no(b: bool) -> str:
    return "yes" if b else "no"


def true_answer(scene, query: dict) -> str:
    op = query["op"]
    if op == "colour_of":
        return the(scene, query["target"]).colour
    if op == "shape_of":
        return the(scene, query["target"]).shape
    if op == "size_of":
        return the(scene, query["target"]).size
    if op == "cell_of":
        o = the(scene, query["target"])
        return cell(o.row, o.col)
    if op == "count":
        return str(len(find(scene, query["filter"])))
    if op == "exists":
        return yes_no(len(find(scene, query["filter"])) > 0)
    if op in ("relation", "any_relation"):
        a = the(scene, query["target"] if op == "any_relation" else query["a"])
        others = [o for o in scene.objects if o is not a] if op == "any_relation" else None
        b_list = others if op == "any_relation" else [the(scene, query["b"])]
        rel = query["relation"]

        def holds(x, y):  # is x <rel> y ?
            return {"left": x.col < y.col, "right": x.col > y.col, "above": x.row < y.row,
                    "below": x.row > y.row}[rel]  # fmt: skip

        if op == "relation":
            return yes_no(holds(a, b_list[0]))
        return yes_no(any(holds(o, a) for o in b_list))
    if op == "nearest":
        a = the(scene, query["target"])
        dist = sorted(
            ((o.row - a.row) ** 2 + (o.col - a.col) ** 2, f"{o.colour} {o.shape}")
            for o in scene.objects
            if o is not a
        )
        assert dist[0][0] < dist[1][0], "nearest asked with a tie"
        return dist[0][1]
    if op == "has_text":
        return yes_no(scene.text is not None)
    if op == "text":
        return scene.text if scene.text is not None else "nothing"
    if op == "text_cell":
        return cell(scene.text_row, scene.text_col)
    if op == "remain_after_remove":
        return str(len(scene.objects) - len(find(scene, query["filter"])))
    if op == "more":
        return yes_no(len(find(scene, query["a"])) > len(find(scene, query["b"])))
    if op == "n_colours":
        return str(len({o.colour for o in scene.objects}))
    if op == "all_same":
        return yes_no(len({getattr(o, query["attr"]) for o in scene.objects}) == 1)
    raise AssertionError(f"unknown op {op}")


def words_of(query: dict) -> list[str]:
    """Attribute words the question must mention (colour, shape stem, size, cell)."""
    words = []
    for key, value in query.items():
        if isinstance(value, dict):
            words += words_of(value)
        elif key in ("colour", "size", "cell"):
            words.append(value)
        elif key == "shape":
            words.append(value[:-1] if value.endswith("s") else value)  # stem: "cros" ~ crosses
    return words


def check(scene, qa) -> None:
    assert qa.type in QUESTION_TYPES
    assert qa.answer == true_answer(scene, qa.query), (qa, scene)
    assert qa.answer and len(qa.answer.split()) <= 2, f"answer not short: {qa.answer!r}"
    for word in words_of(qa.query):
        assert word in qa.question, f"{word!r} missing from {qa.question!r}"
    if qa.explanation is not None:
        assert qa.answer in qa.explanation or qa.answer in ("yes", "no")


@pytest.mark.parametrize("split", ["train", "test", "heldout"])
def test_answers_true_of_the_scene(split):
    world = ShapesWorld(split, 1500, WorldConfig(image_size=32, text_prob=0.5))
    rng = random.Random(0)
    for i in range(1500):
        scene = world.scene(i)
        for qa in vqa_pairs(scene, rng):
            check(scene, qa)


def test_every_form_of_question_is_checked():
    """The truth test above only counts if every op really occurs."""
    world = ShapesWorld("train", 1500, SMALL)
    rng = random.Random(1)
    ops = collections.Counter(
        qa.query["op"] for i in range(1500) for qa in vqa_pairs(world.scene(i), rng)
    )
    expected = {"colour_of", "shape_of", "cell_of", "count", "exists", "relation", "nearest",
                "any_relation", "has_text", "text", "text_cell", "remain_after_remove", "more",
                "n_colours", "all_same"}  # fmt: skip
    assert expected <= set(ops), f"never generated: {expected - set(ops)}"


def test_existence_is_balanced_and_avoids_heldout_pairs():
    world = ShapesWorld("train", 2000, SMALL)
    rng = random.Random(2)
    answers = collections.Counter()
    for i in range(2000):
        qa = make_question(world.scene(i), "existence", rng)
        answers[qa.answer] += 1
        pair = (qa.query["filter"]["shape"], qa.query["filter"]["colour"])
        assert pair not in HELDOUT_COMBOS, "outside heldout, a held-out pair would always be 'no'"
    assert 0.45 < answers["yes"] / 2000 < 0.55, answers


def test_yes_no_questions_are_not_one_sided():
    world = ShapesWorld("train", 2000, SMALL)
    rng = random.Random(3)
    for qtype in ("relation", "reasoning", "text"):
        answers = collections.Counter(
            make_question(world.scene(i), qtype, rng).answer for i in range(2000)
        )
        if qtype == "relation":
            yes, no = answers["yes"], answers["no"]
            assert 0.3 < yes / (yes + no) < 0.7, answers
        assert answers.most_common(1)[0][1] < 0.6 * 2000, f"{qtype} is too predictable: {answers}"


def test_shortcut_answer_is_what_a_model_that_does_not_count_would_say():
    box = (0.0, 0.0, 0.1, 0.1)
    scene = Scene([SceneObject("circle", "red", "small", 0, 0, box),
                   SceneObject("circle", "red", "large", 2, 2, box),
                   SceneObject("square", "blue", "small", 1, 2, box)])  # fmt: skip

    def qa(answer: str, type_: str, **query) -> QA:
        return QA("?", answer, type_, query)

    # Two red circles: counting the subset says 2, checking that one is there says 1.
    assert shortcut_answer(qa("2", "count", op="count", filter={"shape": "circle"}), scene) == "1"
    assert shortcut_answer(qa("0", "count", op="count", filter={"colour": "green"}), scene) == "0"
    assert shortcut_answer(qa("1", "reasoning", op="count", filter={"row": 0}), scene) == "1"
    assert shortcut_answer(qa("1", "reasoning", op="remain_after_remove",
                              filter={"colour": "red"}), scene) == "2"  # fmt: skip
    assert shortcut_answer(qa("2", "reasoning", op="n_colours"), scene) == "3"
    assert shortcut_answer(qa("no", "relation", op="any_relation", relation="left",
                              target={"colour": "blue"}), scene) == "yes"  # fmt: skip
    # Forms without a known shortcut, and the total count (nothing to select).
    assert shortcut_answer(qa("3", "count", op="count", filter={}), scene) is None
    assert shortcut_answer(qa("red", "colour", op="colour_of", target={}), scene) is None
    assert shortcut_answer(qa("yes", "relation", op="relation"), scene) is None

    # On the generator's own questions: with one shape, no counting is needed, and the shortcut
    # is always right; on the training mix it is right most of the time (why it is learnt).
    world = ShapesWorld("train", 1500, SMALL)
    rng, right, known = random.Random(4), 0, 0
    for i in range(1500):
        scene = world.scene(i)
        for q in (make_question(scene, t, rng) for t in ("count", "reasoning", "relation")):
            guess = shortcut_answer(q, scene)
            if guess is None:
                continue
            known, right = known + 1, right + (guess == q.answer)
            if len(scene.objects) == 1 and q.query["op"] != "any_relation":
                assert guess == q.answer, (q, scene)
    assert known > 1000 and 0.6 < right / known < 0.95, (right, known)


def test_vqa_mix_is_balanced_and_deterministic():
    n = 10 * len(QUESTION_TYPES)
    data = VQADataset("test", n, SMALL)
    types = collections.Counter(data.qa(i)[1].type for i in range(n))
    assert types == {t: 10 for t in QUESTION_TYPES}
    item = data[5]
    assert set(item) >= {"pixel_values", "question", "answer", "type", "scene", "conversations"}
    again = VQADataset("test", n, SMALL)[5]
    assert (item["question"], item["answer"]) == (again["question"], again["answer"])
    assert item["conversations"][0]["value"] == question_with_image(item["question"])  # chat's
    assert item["conversations"][0]["value"] == item["question"] + "\n<image>"
    assert item["conversations"][1]["value"] == item["answer"]
    check(item["scene"], data.qa(5)[1])


def test_later_turns_see_every_type_and_follow_the_first_in_the_conversation():
    n = 10 * len(QUESTION_TYPES)
    data = VQADataset("test", n, SMALL, turns=3)
    for turn in range(3):
        types = collections.Counter(data[i]["turns"][turn]["type"] for i in range(n))
        assert types == {t: 10 for t in QUESTION_TYPES}, turn
    item = data[7]
    assert item["question"] == item["turns"][0]["question"]  # turn 1 is the single question
    assert item["question"] == VQADataset("test", n, SMALL)[7]["question"]
    humans = item["conversations"][0::2]
    assert [h["value"] for h in humans] == [t["question"] + "\n<image>" for t in item["turns"]]
    scene, questions = data.questions(7)
    for qa in questions:
        check(scene, qa)


def test_a_false_premise_asks_about_an_absent_object_and_says_it_is_not_there():
    world, rng = ShapesWorld("train", 600, SMALL), random.Random(0)
    forms = collections.Counter()
    for i in range(600):
        scene = world.scene(i)
        qa = false_premise_question(scene, rng, SMALL)
        absent = qa.query["filter"]
        assert not [o for o in scene.objects if all(getattr(o, k) == v for k, v in absent.items())]
        assert qa.type == "false_premise"
        assert qa.answer == f"There is no {qa.query['absent']} in the image."
        for word in absent.values():
            assert word in qa.question and word in qa.answer
        if "shape" in absent and "colour" in absent:
            assert (absent["shape"], absent["colour"]) not in HELDOUT_COMBOS
        forms[qa.query["form"]] += 1
    assert set(forms) == {"colour_of", "shape_of", "cell_of"} and min(forms.values()) > 150
    asked = VQADataset("test", 20, SMALL, types=("false_premise",))[3]
    assert asked["type"] == "false_premise" and asked["answer"].startswith("There is no ")


def assert_llava_record(record: dict) -> None:
    assert set(record) >= {"id", "image", "kind", "conversations"}
    turns = record["conversations"]
    assert len(turns) >= 2 and len(turns) % 2 == 0
    for k, turn in enumerate(turns):
        assert turn["from"] == ("human" if k % 2 == 0 else "gpt")
        assert isinstance(turn["value"], str) and turn["value"].strip()
        if turn["from"] == "gpt":
            assert "type" in turn
    assert turns[0]["value"].startswith("<image>\n")
    assert sum(t["value"].count("<image>") for t in turns) == 1


def test_conversations_in_llava_format():
    world = ShapesWorld("train", 50, SMALL)
    rng = random.Random(4)
    kinds = collections.Counter()
    for i in range(50):
        sample = world[i]
        records = make_conversations(
            sample.scene, sample.captions, rng, kinds=ALL_KINDS, record_id=f"train-{i}"
        )
        assert [r["kind"] for r in records] == list(ALL_KINDS)
        for record in records:
            assert_llava_record(record)
            kinds[record["kind"]] += 1
            turns = record["conversations"]
            if record["kind"] == "conversation":
                assert 3 <= len(turns) // 2 <= 5
                types = [t["type"] for t in turns[1::2]]
                assert len(set(types)) == len(types) and set(types) <= set(QUESTION_TYPES)
            if record["kind"] == "detail":
                assert turns[1]["value"] == sample.description
            if record["kind"] == "caption":
                assert turns[1]["value"] in sample.captions
            if record["kind"] == "reasoning":
                for gpt in turns[1::2]:
                    assert "So the answer is" in gpt["value"]


def test_instruct_dataset_items():
    data = InstructDataset("val", 9, SMALL)
    kinds = [data[i]["kind"] for i in range(9)]
    assert collections.Counter(kinds) == {k: 3 for k in KINDS}
    item = data[0]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert_llava_record({"id": 0, "image": "x", "kind": item["kind"], **item})
    assert InstructDataset("val", 9, SMALL)[4]["conversations"] == data[4]["conversations"]
    with pytest.raises(ValueError, match="kinds"):
        InstructDataset(kinds=("chat",))


def test_world_text_is_deterministic_text_only_and_modest():
    texts = list(world_text("train", n=300, seed=0))
    assert texts == list(world_text("train", n=300, seed=0))
    assert len(texts) > 300 * 5
    assert all(isinstance(t, str) and t and "<image>" not in t for t in texts)
    vocabulary = {w.strip(".,:?") for t in texts for w in t.split()}
    assert len(vocabulary) < 250, f"the world's vocabulary grew to {len(vocabulary)} words"
    joined = " ".join(texts)
    for word in ("circle", "purple", "top left", "How many", "yes", "no"):
        assert word in joined


def test_image_once_and_image_with_every_question_undo_each_other():
    from minillava.data.instruct import image_once, image_with_every_question, question_with_image

    ours = [
        {"from": "human", "value": question_with_image("What colour is the circle?")},
        {"from": "gpt", "value": " red"},
        {"from": "human", "value": question_with_image("Where is it?")},
        {"from": "gpt", "value": " top left"},
    ]
    llava = image_once(ours)
    assert [t["value"] for t in llava[0::2]] == [
        "<image>\nWhat colour is the circle?",
        "Where is it?",
    ]
    assert llava[1::2] == ours[1::2] and ours[0]["value"].endswith("<image>")  # ours untouched
    assert image_with_every_question(llava) == ours


# --- follow-ups by pronoun ("Where is it?") ----------------------------------------------------

ASKED = {"colour_of": "colour", "shape_of": "shape", "cell_of": "cell", "size_of": "size"}


def test_a_follow_up_asks_about_the_same_object_by_pronoun():
    world, rng = ShapesWorld("train", 400, SMALL), random.Random(0)
    attributes = collections.Counter()
    for i in range(len(world)):
        scene = world.scene(i)
        for t in ("colour", "shape", "size", "position", "count", "existence"):
            first = make_question(scene, t, rng, SMALL)
            second = follow_up_question(scene, first, rng)
            if first.query["op"] not in ASKED:  # no single object named: nothing to call "it"
                assert second is None, (first, second)
                continue
            assert second is not None and " it" in second.question, second
            assert second.query["follow_up"] and second.query["target"] == first.query["target"]
            assert second.answer == true_answer(scene, second.query), (scene, first, second)
            asked = ASKED[second.query["op"]]
            assert asked != ASKED[first.query["op"]]  # another attribute than the one asked
            unnamed = set(ASKED.values()) - {ASKED[first.query["op"]], *first.query["target"]}
            assert asked in unnamed or not unnamed  # nor one the question named, if it can
            attributes[asked] += 1
        assert follow_up_question(scene, false_premise_question(scene, rng, SMALL), rng) is None
    assert set(attributes) == {"colour", "shape", "cell", "size"}


def test_vqa_dataset_with_follow_ups_pairs_each_question_with_one():
    data = VQADataset("test", 12, SMALL, types=("colour", "shape", "size"), follow_up=True)
    for i in range(12):
        item = data[i]
        first, second = item["turns"]
        assert not first["query"].get("follow_up") and second["query"]["follow_up"]
        assert second["query"]["target"] == first["query"]["target"]
        assert [t["value"] for t in item["conversations"][0::2]] == [
            question_with_image(t["question"]) for t in item["turns"]
        ]
    with pytest.raises(ValueError, match="follow_up needs types from"):
        VQADataset("test", 4, SMALL, types=("count",), follow_up=True)


def test_follow_up_share_asks_by_pronoun_in_training():
    from minillava.data.mixture import vqa_turns

    world = ShapesWorld("train", 200, SMALL)
    for share, low, high in ((0.0, 0, 0), (0.5, 0.4, 0.6), (1.0, 1, 1)):
        rng, follow_ups = random.Random(0), []
        for i in range(len(world)):
            scene = world.scene(i)
            turns, asked = vqa_turns(scene, rng, world.config, follow_up_share=share)
            for previous, qa in zip(asked, asked[1:], strict=False):
                if qa.query.get("follow_up"):
                    assert qa.query["target"] == previous.query["target"]
                    assert qa.answer == true_answer(scene, qa.query)
                if previous.query["op"] in ASKED:  # it named one object: a follow-up may come
                    follow_ups.append(bool(qa.query.get("follow_up")))
        assert low <= sum(follow_ups) / len(follow_ups) <= high, share


def test_a_description_may_come_after_a_short_question_in_training():
    from minillava.data.instruct import DETAIL_PROMPTS
    from minillava.data.mixture import scene_turns
    from minillava.data.shapes import make_description

    world = ShapesWorld("train", 60, SMALL)
    for share in (0.0, 1.0):
        rng, seconds = random.Random(0), 0
        for i in range(len(world)):
            scene = world.scene(i)
            turns = scene_turns(
                scene, [], rng, SMALL, kinds=("detail",), describe_later_share=share
            )
            humans, answers = turns[0::2], [t["value"].strip() for t in turns[1::2]]
            assert all(h["value"].endswith("\n<image>") for h in humans)  # the image every time
            assert answers[-1] == make_description(scene)
            assert humans[-1]["value"].removesuffix("\n<image>") in DETAIL_PROMPTS
            if len(turns) == 4:  # a short question first, its answer true of the scene
                seconds += 1
                assert len(answers[0].split()) <= 2
        assert seconds == (len(world) if share else 0)
