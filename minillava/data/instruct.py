"""The data engine: from a scene's annotation to LLaVA-style instruction conversations.

LLaVA-Instruct-150K was written by GPT-4, which never saw the images: it was given COCO captions
and object boxes, and asked for three kinds of data: multi-turn *conversations* about the image,
*detailed descriptions*, and *complex reasoning*. We do the same with rules instead of GPT-4:
every question below is built from the annotation (objects, colours, cells, boxes, text), never
from pixels, so every answer is true of the scene by construction (tests check it on thousands).

Answers are short and canonical ("red", "circle", "3", "yes", "top left"), so that exact-match
accuracy is meaningful; the *questions* come in varied wording, so the model must understand
them rather than match a template. Every Q/A pair carries its type:

    colour     What colour is the circle?                         -> red
    shape      What shape is the red object?                      -> circle
    size       Is the red circle large or small?                  -> large
    count      How many blue shapes are there?                    -> 2
    existence  Is there a green square? (yes and no balanced)     -> no
    position   Where is the red circle?                           -> top left
    relation   Is the red circle to the left of the blue square?  -> yes   (also: nearest)
    text       What is written in the image?                      -> A
    reasoning  How many shapes would remain if all red shapes were removed?  -> 2

Records are in the LLaVA JSON format, with two extra fields LLaVA ignores: "kind" on the record
and "type" on each answer:

    {"id": "train-000007-conversation", "image": "train_000007.png", "kind": "conversation",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                       {"from": "gpt", "value": "red", "type": "colour"}, ...]}
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from minillava.data.shapes import (
    CELL_NAMES,
    Scene,
    SceneObject,
    ShapesWorld,
    WorldConfig,
    count_phrase,
    join_words,
    make_captions,
    make_description,
    sample_rng,
)

QUESTION_TYPES: tuple[str, ...] = (
    "colour",
    "shape",
    "count",
    "existence",
    "position",
    "relation",
    "text",
    "reasoning",
    "size",
)
KINDS: tuple[str, ...] = ("conversation", "detail", "reasoning")  # LLaVA-Instruct's three
ALL_KINDS: tuple[str, ...] = KINDS + ("caption",)  # + stage-1 image-caption pairs
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles",
           "diamond": "diamonds", "cross": "crosses"}  # fmt: skip
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "middle", "right")


@dataclass
class QA:
    """One question with its short canonical answer.

    `query` states the question as data ({"op": "count", "filter": {"colour": "red"}}): tests
    recompute the answer from it and the annotation, independently of the wording.
    `explanation` says why the answer holds, for reasoning questions: the sentence a reasoning
    conversation answers with before "So the answer is ...".
    """

    question: str
    answer: str
    type: str
    query: dict = field(default_factory=dict)
    explanation: str | None = None


# ----------------------------------------------------------------------------------------------
# Referring to objects: the shortest description that picks out exactly one object


def matches(obj: SceneObject, constraints: dict) -> bool:
    """Does `obj` satisfy every attribute in `constraints` (shape/colour/size/cell/row/col)?"""
    return all(getattr(obj, key) == value for key, value in constraints.items())


def select(scene: Scene, constraints: dict) -> list[SceneObject]:
    return [o for o in scene.objects if matches(o, constraints)]


# The ways to name an object, from shortest to longest; a question about an attribute never
# names the object *by* that attribute ("what colour is the red circle?").
REFERENCE_KEYS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "colour", "shape"),
    ("colour",),
    ("size", "colour"),
    ("cell",),
)


def reference(scene: Scene, obj: SceneObject, avoid: tuple[str, ...] = ()) -> dict | None:
    """The first REFERENCE_KEYS naming `obj` uniquely without the `avoid` attributes."""
    for keys in REFERENCE_KEYS:
        if any(k in avoid for k in keys):
            continue
        constraints = {k: getattr(obj, k) for k in keys}
        if len(select(scene, constraints)) == 1:
            return constraints
    return None


def noun_phrase(constraints: dict, noun: str = "shape") -> str:
    """{"colour": "red", "shape": "circle"} -> "the red circle"; {"cell": ...} -> "the shape in
    the top left"; {"colour": "red"} -> "the red shape"."""
    if "cell" in constraints:
        return f"the {noun} in the {constraints['cell']}"
    words = [constraints[k] for k in ("size", "colour") if k in constraints]
    words.append(constraints.get("shape", noun))
    return "the " + " ".join(words)


def filter_phrase(constraints: dict) -> str:
    """Plural noun phrase for counting: {"colour": "red"} -> "red shapes", {} -> "shapes"."""
    words = [constraints[k] for k in ("size", "colour") if k in constraints]
    words.append(PLURALS[constraints["shape"]] if "shape" in constraints else "shapes")
    return " ".join(words)


def counted(k: int, constraints: dict) -> str:
    """(1, {"colour": "red"}) -> "1 red shape"; (2, {"shape": "cross"}) -> "2 crosses"."""
    plural = filter_phrase(constraints)
    if k != 1:
        return f"{k} {plural}"
    words = [constraints[key] for key in ("size", "colour") if key in constraints]
    return " ".join([str(k)] + words + [constraints.get("shape", "shape")])


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


# ----------------------------------------------------------------------------------------------
# One generator per question type: (scene, rng, config) -> QA


def colour_question(scene: Scene, rng: random.Random, config: WorldConfig) -> QA:
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, avoid=("colour",)) or {"cell": obj.cell}
    template = rng.choice(
        ["What colour is {ref}?", "What is the colour of {ref}?", "Which colour is {ref}?",
         "What color is {ref}?", "Tell me the colour of {ref}."]
    )  # fmt: skip
    question = template.format(ref=noun_phrase(ref))
    return QA(question, obj.colour, "colour", {"op": "colour_of", "target": ref})


def shape_question(scene: Scene, rng: random.Random, config: WorldConfig) -> QA:
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, avoid=("shape",)) or {"cell": obj.cell}
    if "cell" in ref:
        template = rng.choice(
            ["What shape is in the {cell}?", "Which shape is in the {cell}?",
             "What is the shape of the object in the {cell}?"]
        )  # fmt: skip
        question = template.format(cell=ref["cell"])
    else:
        template = rng.choice(
            ["What shape is {ref}?", "What is the shape of {ref}?", "Which shape is {ref}?"]
        )
        question = template.format(ref=noun_phrase(ref, noun="object"))
    return QA(question, obj.shape, "shape", {"op": "shape_of", "target": ref})


def size_question(scene: Scene, rng: random.Random, config: WorldConfig) -> QA:
    """How big one object is. Descriptions name every object's size ("a large red circle"),
    and without a question that asks for it alone, the model learnt to say "small" for almost
    every object it described (docs/results.md)."""
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, avoid=("size",)) or {"cell": obj.cell}
    template = rng.choice(
        ["What size is {ref}?", "Is {ref} large or small?", "Is {ref} small or large?",
         "How big is {ref}?", "Is {ref} big or small?"]
    )  # fmt: skip
    return QA(template.format(ref=noun_phrase(ref)), obj.size, "size",
              {"op": "size_of", "target": ref})  # fmt: skip


def _random_filter(scene: Scene, rng: random.Random, config: WorldConfig) -> dict:
    """Attributes to count by: half the time those of an object present, else any."""
    kind = rng.choice(["colour", "shape", "size", "colour_shape"])
    obj = rng.choice(scene.objects) if rng.random() < 0.6 else None
    colour = obj.colour if obj else rng.choice(config.colours)
    shape = obj.shape if obj else rng.choice(config.shapes)
    size = obj.size if obj else rng.choice(config.sizes)
    return {
        "colour": {"colour": colour},
        "shape": {"shape": shape},
        "size": {"size": size},
        "colour_shape": {"colour": colour, "shape": shape},
    }[kind]


def count_question(scene: Scene, rng: random.Random, config: WorldConfig) -> QA:
    constraints = {} if rng.random() < 0.3 else _random_filter(scene, rng, config)
    n = len(select(scene, constraints))
    things = filter_phrase(constraints)
    template = rng.choice(
        ["How many {things} are there?", "How many {things} are in the image?",
         "How many {things} can you see?", "Count the {things}."]
    )  # fmt: skip
    return QA(
        template.format(things=things), str(n), "count", {"op": "count", "filter": constraints}
    )


def existence_question(scene: Scene, rng: random.Random, config: WorldConfig) -> QA:
    """Yes and no equally often; "no" asks about a near miss (same colour or same shape)."""
    heldout = set(config.heldout_combos)
    present = {(o.shape, o.colour) for o in scene.objects}
    want_yes = rng.random() < 0.5
    if want_yes:
        obj = rng.choice(scene.objects)
        shape, colour = obj.shape, obj.colour
    else:
        # Never ask about a held-out pair outside the heldout split: "no" would be the only
        # answer ever seen for it, a shortcut that would spoil the compositional test.
        absent = [
            (s, c)
            for s in config.shapes
            for c in config.colours
            if (s, c) not in present and (s, c) not in heldout
        ]
        near = [(s, c) for s, c in absent if any(s == ps or c == pc for ps, pc in present)]
        shape, colour = rng.choice(near or absent)
    constraints = {"colour": colour, "shape": shape}
    phrase = f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"
    template = rng.choice(
        ["Is there {x}?", "Is there {x} in the image?", "Does the image contain {x}?",
         "Can you see {x}?", "Is there {x} in this picture?"]
    )  # fmt: skip
    answer = _yes_no(bool(select(scene, constraints)))
    return QA(
        template.format(x=phrase), answer, "existence", {"op": "exists", "filter": constraints}
    )


def position_question(scene: Scene, rng: random.Random, config: WorldConfig) -> QA:
    candidates = [(o, reference(scene, o, avoid=("cell",))) for o in scene.objects]
    candidates = [(o, ref) for o, ref in candidates if ref is not None]
    if not candidates:  # every object has a twin: ask about a cell instead
        cell = rng.choice(CELL_NAMES)
        answer = _yes_no(bool(select(scene, {"cell": cell})))
        question = f"Is there a shape in the {cell}?"
        return QA(question, answer, "position", {"op": "exists", "filter": {"cell": cell}})
    obj, ref = rng.choice(candidates)
    template = rng.choice(
        ["Where is {ref}?", "Where is {ref} in the image?", "In which part of the image is {ref}?",
         "Where can you see {ref}?"]
    )  # fmt: skip
    return QA(template.format(ref=noun_phrase(ref)), obj.cell, "position",
              {"op": "cell_of", "target": ref})  # fmt: skip


# A question about the object the previous question named, by pronoun: the attribute asked, its
# question type and query op, and a few wordings.
FOLLOW_UPS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "colour": ("colour", "colour_of", ("What colour is it?", "And what colour is it?",
                                       "Which colour is it?")),
    "shape": ("shape", "shape_of", ("What shape is it?", "And what shape is it?",
                                    "What kind of shape is it?")),
    "cell": ("position", "cell_of", ("Where is it?", "And where is it?",
                                     "Where is it in the image?")),
    "size": ("size", "size_of", ("Is it large or small?", "How big is it?", "What size is it?")),
}  # fmt: skip
OBJECT_OPS = {"colour_of": "colour", "shape_of": "shape", "cell_of": "cell", "size_of": "size"}
FOLLOW_UP_TYPES = ("colour", "shape", "size")  # questions that always name one object


def follow_up_question(scene: Scene, previous: QA, rng: random.Random) -> QA | None:
    """ "Where is it?" after "What colour is the circle?": a question about the object the
    previous question named, by pronoun, about an attribute that question neither asked nor
    named; None if it named no single object.

    In a chat a person asks this way, and only the conversation says what "it" is: the model
    must find the object the earlier question named, then look it up in the image again.
    """
    target = previous.query.get("target")
    if previous.query.get("op") not in OBJECT_OPS or not target:
        return None
    found = select(scene, target)
    if len(found) != 1:
        return None
    obj = found[0]
    others = [a for a in FOLLOW_UPS if a != OBJECT_OPS[previous.query["op"]]]
    unsaid = [a for a in others if a not in target]  # not in the question's words either
    attribute = rng.choice(unsaid or others)
    question_type, op, wordings = FOLLOW_UPS[attribute]
    return QA(rng.choice(wordings), getattr(obj, attribute), question_type,
              {"op": op, "target": target, "follow_up": True})  # fmt: skip


def false_premise_question(scene: Scene, rng: random.Random, config: WorldConfig) -> QA:
    """A question about an object the image does not show, answered honestly.

        What colour is the circle?            (no circle)      -> There is no circle in the image.
        What shape is the green object?       (nothing green)  -> There is no green shape in ...
        Where is the red square?              (no red square)  -> There is no red square in ...

    A model that only ever saw questions about objects that are there learns that every
    question has a colour, a shape or a cell for an answer, and names one: it hallucinates.
    POPE (Li et al., 2023) measures the same failure with yes/no questions; here the question
    presupposes the object, as a user's often does. The absent pair is a near miss when it can
    be (same shape or same colour as something there), and never a held-out pair.
    """
    heldout = set(config.heldout_combos)
    present = {(o.shape, o.colour) for o in scene.objects}
    absent = {
        "colour_of": [{"shape": s} for s in config.shapes if s not in {p[0] for p in present}],
        "shape_of": [{"colour": c} for c in config.colours if c not in {p[1] for p in present}],
        "cell_of": [{"colour": c, "shape": s} for s in config.shapes for c in config.colours
                    if (s, c) not in present and (s, c) not in heldout],
    }  # fmt: skip
    form = rng.choice([f for f in ("colour_of", "shape_of", "cell_of") if absent[f]])
    choices = absent[form]
    if form == "cell_of":  # a near miss when there is one: same shape or same colour
        near = [x for x in choices if any(x["shape"] == s or x["colour"] == c for s, c in present)]
        choices = near or choices
    constraints = rng.choice(choices)
    words = [constraints[k] for k in ("colour", "shape") if k in constraints]
    thing = " ".join(words if "shape" in constraints else words + ["shape"])
    templates = {
        "colour_of": ["What colour is the {x}?", "What is the colour of the {x}?",
                      "Which colour is the {x}?"],
        "shape_of": ["What shape is the {c} object?", "Which shape is the {c} one?",
                     "What is the shape of the {c} object?"],
        "cell_of": ["Where is the {x}?", "Where is the {x} in the image?",
                    "In which part of the image is the {x}?"],
    }  # fmt: skip
    question = rng.choice(templates[form]).format(x=thing, c=constraints.get("colour"))
    query = {"op": "absent", "form": form, "filter": constraints, "absent": thing}
    return QA(question, f"There is no {thing} in the image.", "false_premise", query)


RELATIONS = {  # name -> (words, the axis it compares, test on (a, b))
    "left": ("to the left of", "col", lambda a, b: a.col < b.col),
    "right": ("to the right of", "col", lambda a, b: a.col > b.col),
    "above": ("above", "row", lambda a, b: a.row < b.row),
    "below": ("below", "row", lambda a, b: a.row > b.row),
}


def cell_distance(a: SceneObject, b: SceneObject) -> float:
    return ((a.row - b.row) ** 2 + (a.col - b.col) ** 2) ** 0.5


def relation_question(scene: Scene, rng: random.Random, config: WorldConfig) -> QA:
    named = [(o, reference(scene, o, avoid=("cell",))) for o in scene.objects]
    named = [(o, ref) for o, ref in named if ref is not None]
    if len(named) >= 2 and rng.random() < 0.7:
        (a, ref_a), (b, ref_b) = rng.sample(named, 2)
        true_rels = [r for r, (_, _, test) in RELATIONS.items() if test(a, b)]
        false_rels = [r for r in RELATIONS if r not in true_rels]
        want_yes = bool(true_rels) and rng.random() < 0.5
        rel = rng.choice(true_rels if want_yes else false_rels)
        if len(scene.objects) >= 3 and rng.random() < 0.35:
            # Nearest: only when the nearest object is unique (no ties on the grid).
            d = sorted((cell_distance(a, o), o.name) for o in scene.objects if o is not a)
            if d[0][0] < d[1][0]:
                template = rng.choice(
                    ["Which shape is nearest to {a}?", "What is closest to {a}?",
                     "Which object is the nearest to {a}?"]
                )  # fmt: skip
                question = template.format(a=noun_phrase(ref_a))
                return QA(question, d[0][1], "relation", {"op": "nearest", "target": ref_a})
        words = RELATIONS[rel][0]
        template = rng.choice(["Is {a} {rel} {b}?", "Is {a} located {rel} {b}?"])
        question = template.format(a=noun_phrase(ref_a), rel=words, b=noun_phrase(ref_b))
        answer = _yes_no(RELATIONS[rel][2](a, b))
        query = {"op": "relation", "a": ref_a, "b": ref_b, "relation": rel}
        return QA(question, answer, "relation", query)
    # One object, or by chance: is anything on that side of it?
    obj = rng.choice(scene.objects)
    ref = reference(scene, obj, avoid=("cell",)) or {"cell": obj.cell}
    rel = rng.choice(list(RELATIONS))
    words, _, test = RELATIONS[rel]
    answer = _yes_no(any(test(o, obj) for o in scene.objects if o is not obj))
    question = f"Is there a shape {words} {noun_phrase(ref)}?"
    return QA(question, answer, "relation", {"op": "any_relation", "target": ref, "relation": rel})


def text_question(scene: Scene, rng: random.Random, config: WorldConfig) -> QA:
    form = rng.choice(["read", "read", "has", "where"])
    if form == "has" or (form == "where" and scene.text is None):
        template = rng.choice(
            ["Is there a letter or digit in the image?", "Is there any text in the image?",
             "Is anything written in the image?"]
        )  # fmt: skip
        return QA(template, _yes_no(scene.text is not None), "text", {"op": "has_text"})
    if form == "where":
        template = rng.choice(["Where is the {kind} {char}?", "Where is the text in the image?"])
        question = template.format(kind=scene.text_kind, char=scene.text)
        return QA(question, scene.text_cell, "text", {"op": "text_cell"})
    template = rng.choice(
        ["What is written in the image?", "What letter or digit is in the image?",
         "Read the text in the image.", "Which character is written in the image?"]
    )  # fmt: skip
    answer = scene.text if scene.text is not None else "nothing"
    return QA(template, answer, "text", {"op": "text"})


def reasoning_question(scene: Scene, rng: random.Random, config: WorldConfig) -> QA:
    n = len(scene.objects)
    form = rng.choice(["remove", "remove", "more", "colours", "line", "same"])
    if form == "same" and n < 2:
        form = "remove"
    if form == "remove":
        obj = rng.choice(scene.objects)
        constraints = rng.choice([{"colour": obj.colour}, {"shape": obj.shape}])
        removed = len(select(scene, constraints))
        things = filter_phrase(constraints)
        template = rng.choice(
            ["How many shapes would remain if all the {x} were removed?",
             "If all the {x} were taken away, how many shapes would be left?",
             "How many shapes would be left after removing every one of the {x}?"]
        )  # fmt: skip
        if "colour" in constraints:
            what = constraints["colour"]
        else:
            what = f"a {constraints['shape']}" if removed == 1 else things
        is_are = "is" if removed == 1 else "are"
        why = (
            f"There {'is' if n == 1 else 'are'} {count_phrase(n)} and {removed} of them "
            f"{is_are} {what}, so {n - removed} would remain."
        )
        query = {"op": "remain_after_remove", "filter": constraints}
        return QA(template.format(x=things), str(n - removed), "reasoning", query, why)
    if form == "more":
        attr = rng.choice(["colour", "shape"])
        values = config.colours if attr == "colour" else config.shapes
        present = [getattr(o, attr) for o in scene.objects]
        first = rng.choice(present)
        second = rng.choice([v for v in values if v != first])
        if rng.random() < 0.5:
            first, second = second, first
        a, b = {attr: first}, {attr: second}
        count_a, count_b = len(select(scene, a)), len(select(scene, b))
        question = f"Are there more {filter_phrase(a)} than {filter_phrase(b)}?"
        is_are = "is" if count_a == 1 else "are"
        why = f"There {is_are} {counted(count_a, a)} and {counted(count_b, b)}."
        return QA(question, _yes_no(count_a > count_b), "reasoning",
                  {"op": "more", "a": a, "b": b}, why)  # fmt: skip
    if form == "colours":
        colours = sorted({o.colour for o in scene.objects})
        question = rng.choice(
            ["How many different colours are there?", "How many different colours can you see?"]
        )
        k = len(colours)
        why = f"The shapes are {join_words(colours)}, so there {'is' if k == 1 else 'are'} {k}."
        return QA(question, str(len(colours)), "reasoning", {"op": "n_colours"}, why)
    if form == "line":
        if rng.random() < 0.5:
            index = rng.randrange(3)
            constraints, where = {"row": index}, f"the {ROW_NAMES[index]} row"
        else:
            index = rng.randrange(3)
            constraints, where = {"col": index}, f"the {COL_NAMES[index]} column"
        k = len(select(scene, constraints))
        question = f"How many shapes are in {where}?"
        why = f"There {'is' if k == 1 else 'are'} {counted(k, {})} in {where}."
        return QA(question, str(k), "reasoning", {"op": "count", "filter": constraints}, why)
    # "same": do all the shapes share a colour (or a shape)?
    attr = rng.choice(["colour", "shape"])
    values = sorted({getattr(o, attr) for o in scene.objects})
    question = f"Do all the shapes have the same {attr}?"
    why = f"The shapes are {join_words([o.name for o in scene.objects])}."
    return QA(
        question, _yes_no(len(values) == 1), "reasoning", {"op": "all_same", "attr": attr}, why
    )


QUESTION_MAKERS: dict[str, Callable[[Scene, random.Random, WorldConfig], QA]] = {
    "colour": colour_question,
    "shape": shape_question,
    "count": count_question,
    "existence": existence_question,
    "position": position_question,
    "relation": relation_question,
    "text": text_question,
    "reasoning": reasoning_question,
    "size": size_question,
    "false_premise": false_premise_question,  # not a QUESTION_TYPE: it has no answer to find
}


def make_question(
    scene: Scene, question_type: str, rng: random.Random, config: WorldConfig | None = None
) -> QA:
    """One question of `question_type` about `scene` (answer from the annotation)."""
    if question_type not in QUESTION_MAKERS:
        raise ValueError(
            f"question_type must be one of {tuple(QUESTION_MAKERS)}, got {question_type!r}"
        )
    return QUESTION_MAKERS[question_type](scene, rng, config or WorldConfig())


def vqa_pairs(scene: Scene, rng: random.Random, config: WorldConfig | None = None) -> list[QA]:
    """One short-answer question of every type about `scene`, in QUESTION_TYPES order."""
    return [make_question(scene, t, rng, config) for t in QUESTION_TYPES]


def shortcut_answer(qa: QA, scene: Scene) -> str | None:
    """What a model that neither counts nor compares answers to `qa`, where we know a shortcut.

    The cpu preset's model was caught taking these (docs/results.md); each reads a little of the
    image, but less than the question asks:

        count a subset ("How many circles?")     0 or 1: it checks whether one is there
        shapes left after removing the red ones  n - 1: it removes one
        how many different colours               n: as if no two shapes shared one
        "Is there a shape left of the square?"   yes with 3 or more shapes, no with 2

    On most training scenes the shortcut is right (four in five counts of a subset are 0 or 1),
    so it is learnt first and the skill may never be; VQA v2 rebalanced its answers for the same
    reason (Goyal et al., 2017). `minillava eval` reports the accuracy where the shortcut is
    wrong. Asking those questions more often in training moved the model's prior (it took the
    opposite shortcut), not its skill. None: no shortcut known for this form.
    """
    op, n = qa.query.get("op"), len(scene.objects)
    if op == "count" and qa.query.get("filter"):  # count, and reasoning's row / column counts
        return str(min(int(qa.answer), 1))
    if op == "remain_after_remove":
        return str(n - 1)
    if op == "n_colours":
        return str(n)
    if op == "any_relation":
        return _yes_no(n >= 3)
    return None


# ----------------------------------------------------------------------------------------------
# Conversations in the LLaVA format

DETAIL_PROMPTS = (
    "Describe the image in detail.",
    "Describe this image.",
    "What do you see in this picture?",
    "Give a detailed description of the image.",
    "Tell me everything you see in the image.",
)
CAPTION_PROMPTS = (
    "Write a short caption for the image.",
    "Describe the image briefly.",
    "Give a short caption.",
    "What is in the image? Answer in one sentence.",
)
EXPLAIN_SUFFIX = " Explain your answer."
# LLaVA-1.5's short-answer instruction (VQAv2, GQA): appended to a question, it asks for a bare
# answer. Our convention asks plain questions, as a person types them, and the data teaches the
# answer's form instead; the string stays in FIXED_PROMPTS only so that
# `python -m minillava.vocabulary train` still reproduces the shipped vocabulary.
ANSWER_SUFFIX = "\nAnswer with a single word or phrase."
# Every fixed string the data engine writes into a human turn besides the questions, written as
# it appears there (the suffixes with their leading space or newline: BPE tokens include them).
# The BPE is trained on these (python -m minillava.vocabulary train) so that each of their words
# is one token.
FIXED_PROMPTS: tuple[str, ...] = (*DETAIL_PROMPTS, *CAPTION_PROMPTS, EXPLAIN_SUFFIX, ANSWER_SUFFIX)
IMAGE = "<image>"  # the placeholder the model replaces by the image's tokens
MAX_TURNS = 5  # questions in the data engine's longest conversation


def question_with_image(question: str, image: str = IMAGE) -> str:
    """A human turn about the image: the question, then the image.

        What colour is the circle?\n<image>

    Our convention everywhere: the training data, the evaluation, `minillava chat` and
    `ChatSession` all write every question of a conversation this way, so that what is measured
    is what a learner gets. With `image=""` (a text-only prompt, or the image taken away) the
    question stands alone.

    LLaVA puts the image once, before the first question ("<image>\\nWhat ..."), and every later
    question after it. For a decoder this small the order decides what it can learn, because
    attention is causal: image tokens placed after a question can read it, and each can mark
    itself as the object asked about; image tokens placed before it cannot, and the answer
    position must then carry the question's referent ("the circle") to the image and look it
    up itself, two steps to learn at once. Measured in the cpu preset (docs/results.md, "Where
    the question goes"): with LLaVA's order, position questions stayed near 45% and colour and
    shape questions about unseen colour-shape pairs near 55%; with the image after every
    question, 99%, 84% and 75%, and every turn of a conversation is answered like the first.
    The price is the image's tokens once per question (9 positions in the cpu preset) and a ViT
    pass per copy.
    """
    return f"{question}\n{image}" if image else question


def count_images(turns: list[dict], image: str = IMAGE) -> int:
    """How many copies of the image a conversation holds (one per question about it).

    Only the human turns count: the tokenizer reads "<image>" as the image's place there, and as
    plain text in an answer (a model may well write the word)."""
    return sum(turn["value"].count(image) for turn in turns[0::2])


def image_with_every_question(turns: list[dict], image: str = IMAGE) -> list[dict]:
    """A conversation in LLaVA's format (the image once, before the first question) rewritten in
    ours (`question_with_image`: the image after every question). New dicts: `turns` stays."""
    out = [dict(turn) for turn in turns]
    for turn in out[0::2]:
        question = turn["value"].replace(f"{image}\n", "").replace(image, "").strip()
        turn["value"] = question_with_image(question, image)
    return out


def image_once(turns: list[dict], image: str = IMAGE) -> list[dict]:
    """The other way round: a conversation in our format rewritten in LLaVA's (the image once,
    before the first question), as a pretrained LLaVA-1.5 was trained to read it (its tokenizer
    says so: `image_every_question = False`). New dicts: `turns` stays."""
    out = [dict(turn) for turn in turns]
    for k, turn in enumerate(out[0::2]):
        question = turn["value"].replace(f"\n{image}", "").replace(image, "").strip()
        turn["value"] = f"{image}\n{question}" if k == 0 else question
    return out


def _turn(speaker: str, value: str, type_: str | None = None) -> dict:
    turn = {"from": speaker, "value": value}
    if type_ is not None:
        turn["type"] = type_
    return turn


def make_conversation(
    scene: Scene,
    captions: list[str],
    rng: random.Random,
    kind: str,
    image: str = "<image>",
    config: WorldConfig | None = None,
    num_turns: tuple[int, int] = (3, MAX_TURNS),
) -> list[dict]:
    """The turns of one conversation of `kind` (conversation | detail | reasoning | caption).

    The first human turn starts with the `image` placeholder, as in LLaVA's data.
    """
    config = config or WorldConfig()
    if kind == "conversation":
        types = rng.sample(QUESTION_TYPES, rng.randint(*num_turns))
        pairs = [(make_question(scene, t, rng, config), t) for t in types]
        turns = []
        for qa, t in pairs:
            turns += [_turn("human", qa.question), _turn("gpt", qa.answer, t)]
    elif kind == "detail":
        description = make_description(scene)
        turns = [_turn("human", rng.choice(DETAIL_PROMPTS)), _turn("gpt", description, "detail")]
    elif kind == "reasoning":
        turns = []
        for _ in range(rng.randint(1, 2)):
            qa = reasoning_question(scene, rng, config)
            answer = f"{qa.explanation} So the answer is {qa.answer}."
            turns += [
                _turn("human", qa.question + EXPLAIN_SUFFIX),
                _turn("gpt", answer, "reasoning"),
            ]
    elif kind == "caption":
        caption = rng.choice(captions)
        turns = [_turn("human", rng.choice(CAPTION_PROMPTS)), _turn("gpt", caption, "caption")]
    else:
        raise ValueError(f"kind must be one of {ALL_KINDS}, got {kind!r}")
    turns[0]["value"] = f"{image}\n{turns[0]['value']}"  # LLaVA's format: the image first, once
    return turns


def make_conversations(
    scene: Scene,
    captions: list[str],
    rng: random.Random,
    image: str = "<image>",
    kinds: tuple[str, ...] = KINDS,
    image_file: str | None = None,
    record_id: str = "sample",
    config: WorldConfig | None = None,
) -> list[dict]:
    """One LLaVA record per kind for this scene: {"id", "image", "kind", "conversations"}.

    `image` is the placeholder written into the first human turn; `image_file` is the value of
    the record's "image" field (the PNG's file name when exported).
    """
    records = []
    for kind in kinds:
        turns = make_conversation(scene, captions, rng, kind, image=image, config=config)
        records.append(
            {
                "id": f"{record_id}-{kind}",
                "image": image_file if image_file is not None else f"{record_id}.png",
                "kind": kind,
                "conversations": turns,
            }
        )
    return records


# ----------------------------------------------------------------------------------------------
# Datasets for training and evaluation


class InstructDataset(torch.utils.data.Dataset):
    """Sample i: the image of ShapesWorld[i] with one conversation (kinds taken in turn).

    Item: {"pixel_values": (3, H, W), "conversations": [...], "kind": str, "scene": Scene}.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10_000,
        config: WorldConfig | None = None,
        seed: int = 0,
        kinds: tuple[str, ...] = KINDS,
        world: ShapesWorld | None = None,
    ) -> None:
        unknown = [k for k in kinds if k not in ALL_KINDS]
        if unknown or not kinds:
            raise ValueError(f"kinds must be chosen from {ALL_KINDS}, got {kinds}")
        self.world = world or ShapesWorld(split, size, config, seed)
        self.kinds = tuple(kinds)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, index: int) -> dict:
        sample = self.world[index]
        world = self.world
        kind = self.kinds[sample.index % len(self.kinds)]
        rng = sample_rng(world.seed, world.split, sample.index, stream="instruct")
        turns = make_conversation(sample.scene, sample.captions, rng, kind, config=world.config)
        return {
            "pixel_values": sample.pixel_values,
            "conversations": turns,
            "kind": kind,
            "scene": sample.scene,
        }


class VQADataset(torch.utils.data.Dataset):
    """Sample i: ShapesWorld[i] with `turns` short-answer questions; types in turn (balanced mix).

    The first question of sample i has type types[i % len(types)], the next ones the types that
    follow it: over the samples, every turn sees every type equally often.

    Item: {"pixel_values", "scene", "question", "answer", "type", "op", "shortcut", "query",
    "turns", "conversations"}. "question" ... "query" are the first question's (shortcut:
    `shortcut_answer`, None for most forms); "turns" lists every question as such a dict; and
    "conversations" is the whole exchange as the chat would hold it (`question_with_image`: each
    question, then the image; the canonical answers as the gpt turns).
    `types` may name "false_premise" too: questions about an object that is not there.
    `follow_up=True`: each question is followed by a question about the same object by pronoun
    ("Where is it?", `follow_up_question`), so `turns` questions make 2 x `turns` turns; the
    types must then be ones that name an object (FOLLOW_UP_TYPES).
    """

    def __init__(
        self,
        split: str = "test",
        size: int = 1_000,
        config: WorldConfig | None = None,
        seed: int = 0,
        types: tuple[str, ...] = QUESTION_TYPES,
        world: ShapesWorld | None = None,
        turns: int = 1,
        follow_up: bool = False,
    ) -> None:
        unknown = [t for t in types if t not in QUESTION_MAKERS]
        if unknown or not types:
            raise ValueError(f"types must be chosen from {tuple(QUESTION_MAKERS)}, got {types}")
        if turns < 1:
            raise ValueError(f"turns must be >= 1, got {turns}")
        if follow_up and not set(types) <= set(FOLLOW_UP_TYPES):
            raise ValueError(f"follow_up needs types from {FOLLOW_UP_TYPES}, got {types}")
        self.world = world or ShapesWorld(split, size, config, seed)
        self.types, self.turns, self.follow_up = tuple(types), turns, follow_up

    def __len__(self) -> int:
        return len(self.world)

    def questions(self, index: int) -> tuple[Scene, list[QA]]:
        """The questions of sample `index` without drawing the image."""
        world = self.world
        index = index % len(world)
        scene = world.scene(index)
        rng = sample_rng(world.seed, world.split, index, stream="vqa")
        types = [self.types[(index + k) % len(self.types)] for k in range(self.turns)]
        questions = [make_question(scene, t, rng, world.config) for t in types]
        if self.follow_up:  # (these types always name one object: never None)
            questions = [q for qa in questions for q in (qa, follow_up_question(scene, qa, rng))]
        return scene, questions

    def qa(self, index: int) -> tuple[Scene, QA]:
        """The first question of sample `index` without drawing the image."""
        scene, questions = self.questions(index)
        return scene, questions[0]

    def __getitem__(self, index: int) -> dict:
        sample = self.world[index]
        _, questions = self.questions(sample.index)
        turns = [
            {
                "question": qa.question,
                "answer": qa.answer,
                "type": qa.type,
                "op": qa.query["op"],  # the program it runs: relation, any_relation, ...
                "shortcut": shortcut_answer(qa, sample.scene),  # what not counting answers
                "query": qa.query,
            }
            for qa in questions
        ]
        conversation = []
        for qa in questions:
            conversation += [
                _turn("human", question_with_image(qa.question)),
                _turn("gpt", qa.answer, qa.type),
            ]
        return {
            "pixel_values": sample.pixel_values,
            "scene": sample.scene,
            **turns[0],
            "turns": turns,
            "conversations": conversation,
        }


def world_text(
    split: str = "train", n: int = 10_000, seed: int = 0, config: WorldConfig | None = None
) -> Iterator[str]:
    """The text of the world, scene by scene, with no pixels drawn: for LM pretraining and BPE.

    Per scene it yields its captions, its detailed description, the turns of each conversation
    kind (one string per conversation: turns joined by newlines, no <image> placeholder), and its
    eight short Q/A pairs as "question answer" lines.
    """
    world = ShapesWorld(split, n, config, seed)
    for index in range(n):
        scene = world.scene(index)  # same scene as world[index], from a fresh rng
        rng = sample_rng(seed, split, index, stream="text")
        captions = make_captions(scene, rng)
        yield from captions
        yield make_description(scene)
        for kind in KINDS:
            turns = make_conversation(scene, captions, rng, kind, image="", config=world.config)
            yield "\n".join(t["value"].strip() for t in turns)
        yield "\n".join(f"{qa.question} {qa.answer}" for qa in vqa_pairs(scene, rng, world.config))
