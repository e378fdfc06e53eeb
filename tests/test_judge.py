"""The judge: free answers right by meaning, honest refusals, descriptions faithful to the scene."""

from __future__ import annotations

import json
import random
from functools import lru_cache

import pytest

from minillava.data.instruct import QA, QUESTION_TYPES, make_question, noun_phrase
from minillava.data.shapes import (
    CELL_NAMES,
    CHARACTERS,
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    WorldConfig,
    make_description,
    object_phrase,
    sample_rng,
    sample_scene,
)
from minillava.judge import (
    aggregate,
    answer_kind,
    judge_answer,
    judge_false_premise,
    score_description,
)

CONFIG = WorldConfig()


@lru_cache(maxsize=1)
def scenes(n: int = 300) -> list:
    return [sample_scene(sample_rng(0, "train", i), CONFIG, "train") for i in range(n)]


# ----------------------------------------------------------------------------------------------
# Short answers: a table of (type, canonical answer, response, expected), the question optional

TABLE = [
    # colour: the word, a sentence, competing colours, a denied colour, an echoed noun phrase
    ("colour", "red", "red", True),
    ("colour", "red", "Red.", True),
    ("colour", "red", "The circle is red.", True),
    ("colour", "red", "It is red.", True),
    ("colour", "red", "It's a red circle.", True),
    ("colour", "red", "blue", False),
    ("colour", "red", "red or blue", False),
    ("colour", "red", "It is red and blue.", False),
    ("colour", "red", "It is not blue, it is red.", True),
    ("colour", "red", "It is not red.", False),
    ("colour", "red", "I don't know.", False),
    ("colour", "purple", "It is violet.", True),
    # shape
    ("shape", "circle", "circle", True),
    ("shape", "circle", "It is a circle.", True),
    ("shape", "circle", "A small red circle.", True),
    ("shape", "circle", "a square", False),
    ("shape", "circle", "a circle or a square", False),
    ("shape", "cross", "It is a cross.", True),
    # count: digits and number words, no other number
    ("count", "2", "2", True),
    ("count", "2", "two", True),
    ("count", "2", "There are two red circles.", True),
    ("count", "2", "There are 2 of them.", True),
    ("count", "2", "three", False),
    ("count", "2", "two or three", False),
    ("count", "0", "There are no red circles.", True),
    ("count", "0", "none", True),
    ("count", "0", "zero", True),
    ("count", "1", "There is one.", True),
    ("count", "1", "There are none.", False),
    # existence: the first yes/no word; "There is (no) ..." sentences
    ("existence", "yes", "Yes.", True),
    ("existence", "yes", "Yes, there is a green square.", True),
    ("existence", "yes", "There is a green square.", True),
    ("existence", "yes", "No.", False),
    ("existence", "no", "No, there isn't.", True),
    ("existence", "no", "There is no green square.", True),
    ("existence", "no", "There isn't a green square in the image.", True),
    ("existence", "no", "I can't see one.", True),
    ("existence", "no", "Yes.", False),
    ("existence", "no", "There is a green square.", False),
    ("existence", "no", "maybe", False),
    ("existence", "no", "yes or no", False),
    ("existence", "yes", "yes or no", False),
    # position: cell names, centre spellings, no competing cell
    ("position", "top left", "top left", True),
    ("position", "top left", "It is in the top left.", True),
    ("position", "top left", "In the upper left corner.", True),
    ("position", "top left", "top-left", True),
    ("position", "top left", "top right", False),
    ("position", "top left", "top left or bottom right", False),
    ("position", "top left", "at the top", False),
    ("position", "center", "center", True),
    ("position", "center", "In the centre.", True),
    ("position", "center", "It is in the middle of the image.", True),
    ("position", "center", "middle left", False),
    ("position", "middle left", "middle left", True),
    ("position", "middle left", "It is in the centre left.", True),
    ("position", "middle left", "center", False),
    ("position", "top middle", "top center", True),
    ("position", "bottom middle", "bottom middle", True),
    ("position", "bottom middle", "bottom left", False),
    ("position", "yes", "Yes, there is a shape there.", True),
    # relation: yes/no, and the nearest object's colour-shape name
    ("relation", "yes", "Yes, it is.", True),
    ("relation", "no", "No, it is not.", True),
    ("relation", "no", "It is not.", True),
    ("relation", "no", "Yes.", False),
    ("relation", "blue square", "the blue square", True),
    ("relation", "blue square", "The small blue square.", True),
    ("relation", "blue square", "the red square", False),
    ("relation", "blue square", "the square", False),
    ("relation", "blue square", "the blue square or the red circle", False),
    # text: the character as a standalone word, any case; nothing; yes/no; the text's cell
    ("text", "A", "A", True),
    ("text", "A", "a", True),
    ("text", "A", "The letter A.", True),
    ("text", "A", "The letter A is written in the image.", True),
    ("text", "A", "It says A.", True),
    ("text", "A", "It is a B.", False),
    ("text", "B", "It is a B.", True),
    ("text", "B", "the letter b", True),
    ("text", "A", "A or B", False),
    ("text", "A", "nothing", False),
    ("text", "A", "The answer is Z.", False),
    ("text", "7", "The digit 7.", True),
    ("text", "7", "7", True),
    ("text", "7", "The digit 2.", False),
    ("text", "nothing", "nothing", True),
    ("text", "nothing", "Nothing is written in the image.", True),
    ("text", "nothing", "There is no text.", True),
    ("text", "nothing", "No letter or digit.", True),
    ("text", "nothing", "There isn't any text in the image.", True),
    ("text", "nothing", "A", False),
    ("text", "nothing", "The letter K.", False),
    ("text", "yes", "Yes, the letter A.", True),
    ("text", "no", "No, there is no text.", True),
    ("text", "no", "Nothing is written.", True),
    ("text", "top right", "It is in the top right.", True),
    # reasoning: numbers and yes/no, the final answer after a cue judged alone
    ("reasoning", "2", "2", True),
    ("reasoning", "2", "Two shapes would remain.", True),
    ("reasoning", "2", "There are 3 shapes and 1 of them is red, so 2 would remain.", True),
    ("reasoning", "2", "There are 3 shapes and 1 of them is red.", False),
    ("reasoning", "2", "So the answer is 2.", True),
    ("reasoning", "2", "So the answer is 3.", False),
    ("reasoning", "no", "No.", True),
    ("reasoning", "no", "There are 2 red shapes and 1 blue shape, so no.", True),
    ("reasoning", "yes", "No.", False),
]


@pytest.mark.parametrize("question_type,answer,response,expected", TABLE)
def test_judge_answer_by_meaning(question_type, answer, response, expected):
    qa = QA("", answer, question_type)
    assert judge_answer(qa, response) is expected, (question_type, answer, response)


@pytest.mark.parametrize(
    "question_type,question,answer,response,expected",
    [
        # the question's own noun phrase, echoed, does not compete with the answer
        ("relation", "Which shape is nearest to the red circle?", "blue square",
         "The blue square is nearest to the red circle.", True),
        ("relation", "Which shape is nearest to the red circle?", "blue square",
         "The red circle is nearest to the blue square.", True),
        ("relation", "What is closest to the circle?", "green cross",
         "The green cross, next to the circle.", True),
        ("colour", "What colour is the red circle?", "blue", "The red circle is blue.", True),
        ("colour", "What colour is the red circle?", "red", "The red circle is blue.", False),
        ("colour", "What colour is the red circle?", "red", "The red circle is red.", True),
        ("colour", "What colour is the red circle?", "red", "Red circle.", True),
        ("colour", "What colour is the shape in the top left?", "red",
         "The shape in the top left is red.", True),
        ("position", "Where is the letter A?", "top left", "The letter A is in the top left.",
         True),
        # yes/no without a yes/no word: a restatement of the question is a yes
        ("relation", "Is the red circle to the left of the blue square?", "yes",
         "The red circle is to the left of the blue square.", True),
        ("relation", "Is the red circle to the left of the blue square?", "no",
         "The red circle is to the left of the blue square.", False),
        ("relation", "Is the red circle to the left of the blue square?", "no",
         "The red circle is not to the left of the blue square.", True),
        ("relation", "Is the red circle to the left of the blue square?", "no",
         "It is to the right.", False),  # decides nothing: wrong whatever the truth
        ("reasoning", "Do all the shapes have the same colour?", "yes",
         "All the shapes have the same colour.", True),
        ("reasoning", "Are there more red shapes than blue shapes?", "yes",
         "There are more red shapes than blue shapes.", True),
        ("position", "Is there a shape in the top left?", "no",
         "There is no shape in the top left.", True),
    ],
)  # fmt: skip
def test_judge_answer_with_the_question(question_type, question, answer, response, expected):
    qa = QA(question, answer, question_type)
    assert judge_answer(qa, response) is expected, (question, answer, response)


def test_judge_answer_takes_a_dict_as_vqa_items_and_turns_are():
    item = {"question": "How many circles are there?", "answer": "3", "type": "count"}
    assert judge_answer(item, "There are three circles.")
    assert not judge_answer(item, "There are two circles.")
    # a false premise is judged as one: honest refusals are right, a colour is not
    turn = {"question": "What colour is the circle?", "answer": "There is no circle in the image.",
            "type": "false_premise", "query": {"op": "absent", "absent": "circle"}}  # fmt: skip
    assert judge_answer(turn, "There is no circle.")
    assert not judge_answer(turn, "red")


def test_answer_kind_reads_every_answer_form():
    assert answer_kind("yes", "existence") == "yes/no"
    assert answer_kind("Top Left.", "position") == "cell"
    assert answer_kind("center", "position") == "cell"
    assert answer_kind("3", "count") == "number"
    assert answer_kind("7", "text") == "character"  # a digit written in the image is read
    assert answer_kind("nothing", "text") == "nothing"
    assert answer_kind("red", "colour") == "colour"
    assert answer_kind("circle", "shape") == "shape"
    assert answer_kind("blue square", "relation") == "name"
    assert answer_kind("a dog", "caption") == "exact"


def other_answer(qa: QA, rng: random.Random) -> str:
    """A different canonical answer of the same kind: the answer a wrong model would give."""
    kind, a = answer_kind(qa.answer, qa.type), qa.answer
    if kind == "yes/no":
        return {"yes": "no", "no": "yes"}[a]
    if kind == "cell":
        return rng.choice([c for c in CELL_NAMES if c != a])
    if kind == "number":
        return str(int(a) + rng.choice([1, 2]))
    if kind == "character":
        return rng.choice([c for c in CHARACTERS if c != a])
    if kind == "nothing":
        return rng.choice(CHARACTERS)
    if kind == "colour":
        return rng.choice([c for c in COLOURS if c != a])
    if kind == "shape":
        return rng.choice([s for s in SHAPES if s != a])
    if kind == "size":
        return {"large": "small", "small": "large"}[a]
    assert kind == "name", (qa, kind)
    colour, shape = a.split()
    return f"{rng.choice([c for c in COLOURS if c != colour])} {shape}"


def sentence_answer(qa: QA) -> str:
    """The answer as a person would write it in a sentence."""
    kind, a = answer_kind(qa.answer, qa.type), qa.answer
    target = qa.query.get("target")
    subject = noun_phrase(target).capitalize() if target else "It"
    if kind == "yes/no":
        return f"{a.capitalize()}, {'it is' if a == 'yes' else 'it is not'}."
    if kind == "cell":
        return f"{subject} is in the {a}."
    if kind == "number":
        return f"There are {NUMBER_WORDS[int(a)]}."
    if kind == "character":
        return f"The {'digit' if a.isdigit() else 'letter'} {a} is written in the image."
    if kind == "nothing":
        return "Nothing is written in the image."
    if kind == "colour":
        return f"{subject} is {a}."
    if kind == "shape":
        return f"{subject} is a {a}."
    if kind == "size":
        return f"{subject} is {'big' if a == 'large' else 'little'}."
    return f"The {a} is the nearest."


def test_judge_answer_on_real_questions_right_and_wrong_answers():
    rng = random.Random(0)
    kinds = set()
    for i, scene in enumerate(scenes()):
        for t in QUESTION_TYPES:
            qa = make_question(scene, t, sample_rng(0, "train", i, stream=f"judge-{t}"), CONFIG)
            kinds.add(answer_kind(qa.answer, qa.type))
            for right in (qa.answer, qa.answer.upper(), f"The answer is {qa.answer}.",
                          sentence_answer(qa)):  # fmt: skip
                assert judge_answer(qa, right), (qa, right)
            wrong = other_answer(qa, rng)
            for response in (wrong, f"The answer is {wrong}.", f"{qa.answer} or {wrong}"):
                assert not judge_answer(qa, response), (qa, response)
    assert kinds == {"yes/no", "cell", "number", "character", "nothing", "colour", "shape",
                     "size", "name"}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# False premises


@pytest.mark.parametrize(
    "response,absent",
    [
        ("There is no circle in the image.", "circle"),
        ("There is no circle.", "circle"),
        ("I don't see a circle.", "circle"),
        ("no circle", "circle"),
        ("There are no circles.", "circle"),
        ("There isn't a red square in this picture.", "red square"),
        ("The image does not contain a red square.", "red square"),
        ("I cannot find a green shape.", "green shape"),
        ("There is no green object.", "green shape"),
        ("Nothing green.", "green shape"),
        ("There is no such shape.", "circle"),
        ("The circle is not in the image.", "circle"),
        ("There isn't one.", "circle"),
        ("There is no circle, but there is a red square.", "circle"),
    ],
)
def test_judge_false_premise_honest_refusals(response, absent):
    assert judge_false_premise(response, absent), response


@pytest.mark.parametrize(
    "response,absent",
    [
        ("red", "circle"),
        ("Red.", "circle"),
        ("yes", "circle"),
        ("Yes, it is red.", "circle"),
        ("The circle is red.", "circle"),
        ("It is in the top left.", "red square"),
        ("It is a square.", "green shape"),
        ("There is no circle; it is red.", "circle"),
        ("It is not red.", "circle"),
        ("It is not red it is blue.", "circle"),
        ("No.", "circle"),  # a yes/no reflex says nothing about what is missing
        ("", "circle"),
    ],
)
def test_judge_false_premise_answers_as_if_there_are_not_honest(response, absent):
    assert not judge_false_premise(response, absent), response


def test_the_data_engines_false_premise_answers_are_honest():
    for i, scene in enumerate(scenes()[:100]):
        qa = make_question(scene, "false_premise", sample_rng(0, "train", i, stream="fp"), CONFIG)
        assert judge_false_premise(qa.answer, qa.query["absent"]), qa
        assert judge_answer(qa, qa.answer)
        assert not judge_answer(qa, "red") and not judge_answer(qa, "top left")


# ----------------------------------------------------------------------------------------------
# Descriptions


def test_the_data_engines_descriptions_are_faithful():
    texts = 0
    for scene in scenes():
        score = score_description(scene, make_description(scene))
        assert score.mentions == score.correct == score.objects == len(scene.objects)
        assert score.precision == score.recall == score.f1 == 1.0
        assert score.hallucinated == score.repeated == 0 and score.wrong_words == []
        assert score.count_right is True
        assert score.text_right is (True if scene.text is not None else None)
        texts += scene.text is not None
    assert texts > 30  # the text branch was exercised


def find_scene(test) -> object:
    return next(s for s in scenes() if test(s))


def mention(obj) -> str:
    return f"In the {obj.cell} there is {object_phrase(obj)}."


def free_cell(scene) -> str:
    used = {o.cell for o in scene.objects} | {scene.text_cell}
    return next(c for c in CELL_NAMES if c not in used)


def planted(scene, obj, sentence: str, word: str) -> tuple[str, tuple[int, int]]:
    """The description with obj's sentence replaced by `sentence`; the span of `word` in it."""
    text = make_description(scene).replace(mention(obj), sentence)
    start = text.index(sentence) + sentence.index(f" {word}") + 1
    return text, (start, start + len(word))


def assert_one_wrong(scene, text: str, span: tuple[int, int], field: str) -> object:
    n = len(scene.objects)
    score = score_description(scene, text)
    assert score.mentions == n and score.correct == n - 1
    assert score.precision == pytest.approx((n - 1) / n) and score.recall == score.precision
    assert score.wrong_words == [span], (text, score.wrong_words, span)
    assert [m.wrong for m in score.parsed if not m.correct] == [(field,)]
    assert score.repeated == 0
    return score


def test_a_wrong_cell_is_wrong_but_not_hallucinated():
    scene = find_scene(lambda s: len(s.objects) >= 3)
    obj, cell = scene.objects[1], free_cell(scene)
    sentence = f"In the {cell} there is {object_phrase(obj)}."
    text, span = planted(scene, obj, sentence, cell)
    assert text[span[0] : span[1]] == cell
    score = assert_one_wrong(scene, text, span, "cell")
    assert score.hallucinated == 0


def test_a_wrong_size_marks_the_size_word():
    scene = find_scene(lambda s: len(s.objects) >= 2)
    obj = scene.objects[0]
    size = "small" if obj.size == "large" else "large"
    text, span = planted(scene, obj, f"In the {obj.cell} there is a {size} {obj.name}.", size)
    assert assert_one_wrong(scene, text, span, "size").hallucinated == 0


def test_a_wrong_colour_marks_the_colour_word_and_is_a_hallucination():
    scene = find_scene(lambda s: len(s.objects) >= 2)
    obj = scene.objects[-1]
    colour = next(c for c in COLOURS if c not in {o.colour for o in scene.objects})
    sentence = f"In the {obj.cell} there is a {obj.size} {colour} {obj.shape}."
    text, span = planted(scene, obj, sentence, colour)
    assert assert_one_wrong(scene, text, span, "colour").hallucinated == 1


def test_a_wrong_shape_marks_the_shape_word():
    scene = find_scene(lambda s: len(s.objects) >= 2)
    obj = scene.objects[0]
    shape = next(s for s in SHAPES if s not in {o.shape for o in scene.objects})
    sentence = f"In the {obj.cell} there is a {obj.size} {obj.colour} {shape}."
    text, span = planted(scene, obj, sentence, shape)
    assert assert_one_wrong(scene, text, span, "shape").hallucinated == 1


def test_a_wrong_colour_that_exists_elsewhere_is_wrong_but_not_hallucinated():
    scene = find_scene(
        lambda s: any(
            a.shape == b.shape and a.colour != b.colour for a in s.objects for b in s.objects
        )  # fmt: skip
    )
    a, b = next((a, b) for a in scene.objects for b in scene.objects
                if a.shape == b.shape and a.colour != b.colour)  # fmt: skip
    text, span = planted(scene, a, f"In the {a.cell} there is a {a.size} {b.name}.", b.colour)
    assert assert_one_wrong(scene, text, span, "colour").hallucinated == 0


def test_a_hallucinated_object():
    scene = find_scene(lambda s: len(s.objects) == 2)
    present = {(o.colour, o.shape) for o in scene.objects}
    colour, shape = next((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present)
    text = (
        make_description(scene) + f" In the {free_cell(scene)} there is a small {colour} {shape}."
    )
    score = score_description(scene, text)
    assert (score.mentions, score.correct, score.hallucinated, score.repeated) == (3, 2, 1, 0)
    assert score.precision == pytest.approx(2 / 3) and score.recall == 1.0


def test_a_repeated_object_lowers_precision_not_recall():
    scene = find_scene(lambda s: len(s.objects) == 3)
    text = make_description(scene) + " " + mention(scene.objects[1])
    score = score_description(scene, text)
    assert (score.mentions, score.correct, score.repeated, score.hallucinated) == (4, 3, 1, 0)
    assert score.precision == pytest.approx(3 / 4) and score.recall == 1.0
    assert score.wrong_words == []  # every word is true; it is said twice


def test_a_missing_object_lowers_recall_not_precision():
    scene = find_scene(lambda s: len(s.objects) == 4)
    text = make_description(scene).replace(mention(scene.objects[2]) + " ", "")
    score = score_description(scene, text)
    assert (score.mentions, score.correct, score.objects) == (3, 3, 4)
    assert score.precision == 1.0 and score.recall == pytest.approx(3 / 4)
    assert score.f1 == pytest.approx(2 * 0.75 / 1.75)


def test_a_wrong_text_character_or_cell():
    scene = find_scene(lambda s: s.text is not None and s.text != "B")
    right = f"The {scene.text_kind} {scene.text} is written"
    wrong = "The letter B is written"
    text = make_description(scene).replace(right, wrong)
    start = text.index(wrong) + len("The letter ")
    score = score_description(scene, text)
    assert score.text_right is False and score.wrong_words == [(start, start + 1)]
    assert score.precision == score.recall == 1.0  # the objects are untouched
    cell = free_cell(scene)
    text = make_description(scene).replace(
        f"white in the {scene.text_cell}", f"white in the {cell}"
    )
    assert score_description(scene, text).text_right is False
    # text where there is none, and no text mentioned where there is some
    plain = find_scene(lambda s: s.text is None)
    assert score_description(plain, make_description(plain)).text_right is None
    invented = make_description(plain) + " The letter A is written in white in the top left."
    assert score_description(plain, invented).text_right is False
    assert score_description(scene, mention(scene.objects[0])).text_right is False


def test_a_score_as_json():
    scene = find_scene(lambda s: len(s.objects) == 2)
    obj = scene.objects[0]
    size = "small" if obj.size == "large" else "large"
    text, span = planted(scene, obj, f"In the {obj.cell} there is a {size} {obj.name}.", size)
    as_dict = json.loads(json.dumps(score_description(scene, text).to_dict()))
    assert as_dict["wrong_words"] == [list(span)] and as_dict["correct"] == 1
    assert "parsed" not in as_dict and as_dict["text_right"] in (None, True)


def test_a_wrong_count_sentence():
    scene = find_scene(lambda s: len(s.objects) == 2)
    text = make_description(scene).replace("shows two shapes", "shows three shapes")
    score = score_description(scene, text)
    start = text.index("three")
    assert score.count_right is False and score.wrong_words == [(start, start + 5)]
    assert score.precision == score.recall == 1.0
    assert score_description(scene, mention(scene.objects[0])).count_right is None


def test_sentences_that_are_not_mentions_count_only_their_invented_objects():
    scene = find_scene(lambda s: len(s.objects) == 2 and s.objects[0].name != s.objects[1].name)
    a, b = scene.objects
    description = make_description(scene)
    relation = f" The {a.name} is next to the {b.name}. All the shapes are small."
    score = score_description(scene, description + relation)
    assert (score.mentions, score.correct, score.hallucinated, score.named) == (2, 2, 0, 2)
    present = {(o.colour, o.shape) for o in scene.objects}
    colour, shape = next((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present)
    invented = f" The {a.name} is to the left of the {colour} {shape}."
    text = description + invented
    score = score_description(scene, text)
    start = text.index(f"{colour} {shape}")
    assert (score.mentions, score.correct, score.hallucinated) == (2, 2, 1)
    assert score.precision == score.recall == 1.0
    assert score.wrong_words == [(start, start + len(f"{colour} {shape}"))]


def test_other_ways_of_mentioning_an_object():
    scene = find_scene(lambda s: len(s.objects) == 2)
    a, b = scene.objects
    text = (
        f"There is {object_phrase(a)} in the {a.cell}, and {object_phrase(b)} in the {b.cell}. "
        f"The {a.name} is in the {a.cell}."  # definite, with a cell: the same cell again
    )
    score = score_description(scene, text)
    assert (score.mentions, score.correct, score.repeated) == (3, 2, 1)
    assert score.recall == 1.0
    # an object without a cell is a mention, and not a correct one
    score = score_description(scene, f"There is {object_phrase(a)}.")
    assert (score.mentions, score.correct, score.hallucinated) == (1, 0, 0)
    assert score.parsed[0].wrong == ("cell",) and score.wrong_words == []
    empty = score_description(scene, "")
    assert (empty.mentions, empty.precision, empty.recall, empty.f1) == (0, 0.0, 0.0, 0.0)


def test_aggregate_micro_averages():
    by_size = {len(s.objects): s for s in scenes()}
    s2, s3 = by_size[2], by_size[3]
    perfect = score_description(s2, make_description(s2))  # 2 of 2, no text or count errors
    repeated = score_description(s3, make_description(s3) + " " + mention(s3.objects[0]))
    present = {(o.colour, o.shape) for o in s3.objects}
    colour, shape = next((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present)
    invented = score_description(s3, f"In the {free_cell(s3)} there is a small {colour} {shape}.")
    totals = aggregate([perfect, repeated, invented])
    assert totals["n"] == 3
    assert (totals["mentions"], totals["correct"], totals["objects"]) == (2 + 4 + 1, 2 + 3, 8)
    assert totals["precision"] == pytest.approx(5 / 7)
    assert totals["recall"] == pytest.approx(5 / 8)
    p, r = 5 / 7, 5 / 8
    assert totals["f1"] == pytest.approx(2 * p * r / (p + r))
    assert totals["hallucinated"] == 1
    assert totals["hallucination_rate"] == pytest.approx(1 / 7)
    assert totals["chair_s"] == pytest.approx(1 / 3)
    assert totals["repeated_per_description"] == pytest.approx(1 / 3)
    texts = [s.text_right for s in (perfect, repeated, invented) if s.text_right is not None]
    assert totals["text_accuracy"] == (sum(texts) / len(texts) if texts else None)
    assert totals["count_accuracy"] == 1.0  # the third description states no count
    empty = aggregate([])
    assert empty["n"] == 0 and empty["precision"] == 0.0 and empty["text_accuracy"] is None
