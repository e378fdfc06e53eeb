"""The training mixture: which conversation about a scene a training row holds.

The data engine (`data.instruct`) can write many things about one scene: a multi-turn
conversation, a detailed description, a reasoning chain, a caption, or a few short-answer
questions in a row. The `lm`, `align` and `instruct` stages each draw one of them per row; this
file decides which, and how often each question type is asked:

    scene_turns(scene, captions, rng, config)                 a conversation of a random kind
    scene_turns(..., vqa=True, type_weights={"colour": 3.0})  short-answer questions, one a turn
    curriculum_phases(((("colour",), 400),), weights)         phases that ask some types only

Every draw comes from the `rng` it is given, so a batch is a function of its seed alone.
"""

from __future__ import annotations

import random

from minillava.data.instruct import (
    QA,
    QUESTION_TYPES,
    false_premise_question,
    follow_up_question,
    image_with_every_question,
    make_conversation,
    make_question,
    question_with_image,
)
from minillava.data.shapes import Scene, WorldConfig


def scene_turns(
    scene: Scene,
    captions: list[str],
    rng: random.Random,
    config: WorldConfig,
    vqa: bool = False,
    kinds: tuple[str, ...] = ("conversation", "detail", "reasoning"),
    type_weights: dict[str, float] | None = None,
    text_weight: float | None = None,
    questions: int = 3,
    false_premise_share: float = 0.0,
    follow_up_share: float = 0.0,
    describe_later_share: float = 0.0,
) -> list[dict]:
    """One training conversation about `scene`, the image after every question.

    `vqa=True`: `questions` short-answer questions (`vqa_turns`, with `type_weights`,
    `text_weight`, `false_premise_share` and `follow_up_share`). Otherwise: a conversation of
    one of the data engine's `kinds` (conversation, detail, reasoning, caption); a detailed
    description comes, with probability `describe_later_share`, after a short question about
    the same image, as a chat often goes ("What colour is the circle?", then "Describe the
    image.").
    """
    if vqa:
        weights = (type_weights, text_weight, false_premise_share, follow_up_share)
        return vqa_turns(scene, rng, config, questions, *weights)[0]
    kind = rng.choice(kinds)
    conversation = make_conversation(scene, captions, rng, kind, config=config)
    if kind == "detail" and describe_later_share and rng.random() < describe_later_share:
        qa = make_question(scene, rng.choice(QUESTION_TYPES), rng, config)
        opener = [{"from": "human", "value": qa.question}, {"from": "gpt", "value": qa.answer}]
        conversation = opener + conversation
    return space_answers(image_with_every_question(conversation))


def vqa_turns(
    scene: Scene,
    rng: random.Random,
    config: WorldConfig,
    questions: int = 3,
    type_weights: dict[str, float] | None = None,
    text_weight: float | None = None,
    false_premise_share: float = 0.0,
    follow_up_share: float = 0.0,
) -> tuple[list[dict], list[QA]]:
    """`questions` short-answer questions about `scene`, one a turn, and their `QA`s (type,
    answer and the query each runs, e.g. {"op": "relation", ...}).

    As LLaVA-1.5 mixed VQAv2 and GQA into its data: without short answers the model answers in
    sentences, and without several turns it learns to answer the first question only. Every
    question is followed by the image (`data.instruct.question_with_image`), exactly as
    `minillava chat` asks it; every answer is trained on.
    `type_weights` (e.g. {"colour": 3.0}) makes some question types more frequent; a type it
    does not name has weight 1 (all 1: the uniform mix). `text_weight`, if not None, is the
    text type's weight instead on a scene that shows a character (`DataSizes.read_text_weight`),
    unless `type_weights` gives text 0 (a curriculum phase without it). Each question is, with
    probability `false_premise_share`, one about an object that is not there, answered "There
    is no circle in the image." (`data.instruct.false_premise_question`). After a question
    about one object, the next is, with probability `follow_up_share`, about the same object by
    pronoun ("Where is it?", `data.instruct.follow_up_question`).
    """
    weights = question_type_weights(type_weights)
    text = QUESTION_TYPES.index("text")
    if text_weight is not None and scene.text is not None and weights[text] > 0:
        weights[text] = text_weight
    turns, asked = [], []
    for _ in range(questions):
        qa = None
        if asked and follow_up_share and rng.random() < follow_up_share:
            qa = follow_up_question(scene, asked[-1], rng)  # None if it named no one object
        if qa is None and false_premise_share and rng.random() < false_premise_share:
            qa = false_premise_question(scene, rng, config)
        if qa is None:
            qa = make_question(scene, rng.choices(QUESTION_TYPES, weights)[0], rng, config)
        turns += [{"from": "human", "value": question_with_image(qa.question)},
                  {"from": "gpt", "value": qa.answer}]  # fmt: skip
        asked.append(qa)
    return space_answers(turns), asked


def space_answers(turns: list[dict]) -> list[dict]:
    """Start every answer with a space, as a word inside a sentence does (in place).

    Our BPE has one token for " blue" (in captions, descriptions, questions) and another for
    "blue", and the answer should be the word the model has read everywhere else. The eval
    strips the space.
    """
    for turn in turns[1::2]:
        turn["value"] = " " + turn["value"]
    return turns


def question_type_weights(type_weights: dict[str, float] | None) -> list[float]:
    """One weight per entry of QUESTION_TYPES (1 where `type_weights` is silent), checked."""
    type_weights = type_weights or {}
    unknown = sorted(set(type_weights) - set(QUESTION_TYPES))
    if unknown:
        raise ValueError(
            f"data.vqa_type_weights: unknown question types {unknown}; expected some of "
            f"{QUESTION_TYPES}"
        )
    weights = [float(type_weights.get(t, 1.0)) for t in QUESTION_TYPES]
    if any(w < 0 for w in weights) or not any(weights):
        raise ValueError(f"data.vqa_type_weights must be >= 0, not all 0; got {type_weights}")
    return weights


def curriculum_phases(curriculum, type_weights: dict | None) -> list[tuple[int, dict]]:
    """data.curriculum ((types, steps), ...) -> [(first step after the phase, type weights)].

    Each phase keeps `type_weights` for its own types and 0 for the others: its short-answer
    batches ask only those types; the other batches (1 - vqa_fraction) stay conversations.
    """
    weights = dict(zip(QUESTION_TYPES, question_type_weights(type_weights), strict=True))
    phases, end = [], 0
    for phase in curriculum:
        is_pair = isinstance(phase, tuple | list) and len(phase) == 2
        types, steps = phase if is_pair else (None, None)
        types = (types,) if isinstance(types, str) else tuple(types or ())
        unknown = sorted(set(types) - set(QUESTION_TYPES))
        if not types or unknown or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"data.curriculum: each phase is ((question types...), steps >= 1) with types "
                f"from {QUESTION_TYPES}; got {phase!r}"
            )
        phase_weights = {t: w if t in types else 0.0 for t, w in weights.items()}
        if not any(phase_weights.values()):
            raise ValueError(f"data.curriculum: {types} all weigh 0 in data.vqa_type_weights")
        end += steps
        phases.append((end, phase_weights))
    return phases
