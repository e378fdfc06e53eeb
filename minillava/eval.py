"""Evaluation: does the model *look* at the image, and is what it says true?

Everything here asks the model as `minillava chat` does, through the chat's own `reply`: a
plain question as a person types it ("What colour is the circle?", no instruction about the
answer's form), then the image, greedy decoding with the KV cache until the end of the
turn. So every figure is what a learner gets from the chat. Answers are judged by meaning
(`minillava.judge`): "red", "Red." and "The circle is red." are all right; "red or blue" is not.

Four measurements:

- **Short answers** by question type (colour, shape, count, existence, position, relation,
  text, reasoning), each beside a blind baseline (below): `evaluate`.
- **Later turns**: the same kinds of question asked as the 2nd and 3rd turn of one
  conversation, the model's own answers in the history: `evaluate_turns`. A model trained
  only on first questions answers these badly, and a chat is mostly later turns.
- **False premises**: "What colour is the circle?" about a scene without one. An honest model
  says there is none; one that never saw such a question names a colour:
  `evaluate_false_premises`.
- **Descriptions**: "Describe the image.", scored against the scene annotation, CHAIR-style:
  objects named right in cell, size, colour and shape, objects named that are not there,
  repeats, the text: `evaluate_descriptions`.

Accuracy alone can fool you. Ask "Is there a red shape?" and always answering "yes" may be right
half the time; ask "How many shapes are there?" of scenes with 1-4 shapes and "two" may be right a
third of the time. So every number is shown next to a **blind baseline**: the *same* model,
asked the *same* questions, with the image taken away. What the blind model gets right it
learnt from the questions alone (the answer prior); the *gain* is what the image adds.

How to take the image away (``blind_mode``):

- ``"blank"`` (the default): the image is replaced by an all-zero tensor, the grey that the
  ImageProcessor uses for "no signal" (it pads non-square images with it). The prompt, the number
  of image tokens and every position are unchanged, so the only difference from the real run is
  the missing visual information. This is the fairer baseline for a model that was fine-tuned
  with an image in every prompt: it is not thrown off by an input format it never saw.
- ``"no_image"``: the ``<image>`` token is dropped from the prompt, so the decoder answers as a pure
  language model from the question alone. Closer to "the LM without eyes", but the instruct stage
  never showed it a prompt without an image, so it may underestimate the prior a little.

Both are honest baselines (neither sees the scene). ``minillava eval`` and the table at the end
of ``make train`` show both, blank first; ``minillava eval --blind-mode`` can pick one.

The held-out split shows (shape, colour) pairs never seen in training: a model that learnt
"purple" and "triangle" separately answers as well there as on the test split; one that learnt
only the pairs it saw does not.

The file reads in four parts: scoring (`normalise_answer`, `EvalResult`, `score`: any
answerer, proven right with oracles), the model as an answerer (`generate_answers`,
`model_answerer`), the short-answer evaluation (`vqa_items`, `evaluate`), and the rest (turns,
false premises, descriptions). Showing the results (tables, plots, chat samples, the
``minillava eval`` command) is `minillava.report`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from minillava.chat import fit_to_context, next_question, reply
from minillava.checkpoint import world_config_from_dict
from minillava.data.instruct import FOLLOW_UP_TYPES, VQADataset
from minillava.judge import aggregate, judge_answer, judge_false_premise, score_description

BLIND_MODES = ("blank", "no_image")
# Characters stripped from the end of an answer: "Red." and "red" are the same answer.
TRAILING_PUNCTUATION = ".!?,;:"

# An answerer takes a batch of VQA items (dicts with "question", "pixel_values", ...) and returns
# one answer string per item. The model is one answerer; tests use an oracle that reads "answer".
Answerer = Callable[[Sequence[dict]], list[str]]


# ----------------------------------------------------------------------------------------------
# Scoring


def normalise_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip trailing punctuation: "  Top Left. " -> "top left"."""
    text = " ".join(text.lower().split())
    return text.rstrip(TRAILING_PUNCTUATION).strip()


@dataclass
class EvalResult:
    """Accuracy of one run (answers judged by meaning): overall, per question type, every answer.

    `records` holds one dict per question: index, type, question, answer (truth), prediction
    (raw), correct (by meaning), exact (word for word, after `normalise_answer`), and where the
    item says so "objects" (shapes in the image), "op" (the question's program) and "shortcut"
    (`data.instruct.shortcut_answer`); the first few also carry "pixel_values" (3, H, W), for
    `report.plot_gallery` to show.
    """

    split: str
    accuracy: float
    per_type: dict[str, float]
    counts: dict[str, int]
    records: list[dict] = field(default_factory=list, repr=False)
    blind: bool = False
    blind_mode: str | None = None

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def by_objects(self) -> dict[int, tuple[float, int]]:
        """Accuracy and count by the number of shapes in the image (records that know it).

        One shape: "the circle" can only be that one. With more, the model must *find* the object
        the question names before it reads its colour or cell; a model that reads but does not
        find scores about 1/k on k-shape images (docs/results.md).
        """
        groups: dict[int, list[bool]] = {}
        for record in self.records:
            if "objects" in record:
                groups.setdefault(record["objects"], []).append(record["correct"])
        return {k: (sum(v) / len(v), len(v)) for k, v in sorted(groups.items())}

    @property
    def by_op(self) -> dict[str, dict[str, tuple[float, int]]]:
        """Accuracy and count by the program a question runs, for types asked in several ways.

        A type's one number can hide a form the model never learnt: relation is "Is A left of
        B?" (op "relation"), "Is there a shape left of A?" ("any_relation") and "Which shape is
        nearest to A?" ("nearest"); the first is a coin flip for the cpu preset's model while
        the second is mostly right (docs/results.md). {type: {op: (accuracy, n)}}.
        """
        groups: dict[str, dict[str, list[bool]]] = {}
        for record in self.records:
            if "op" in record:
                ops = groups.setdefault(record["type"], {})
                ops.setdefault(record["op"], []).append(record["correct"])
        return {
            kind: {op: (sum(v) / len(v), len(v)) for op, v in sorted(ops.items())}
            for kind, ops in sorted(groups.items())
            if len(ops) > 1
        }

    @property
    def where_shortcut_fails(self) -> dict[str, tuple[float, float, int]]:
        """On the questions a known shortcut gets wrong, by op: (accuracy, share of answers that
        are the shortcut's, n).

        "How many circles?" with two circles: a model that only checks that a circle is there
        says "1" (`data.instruct.shortcut_answer` lists the shortcuts). Most questions of these
        forms have the shortcut's answer, so a type's accuracy can look fine while the model
        never counts; here it shows (docs/results.md).
        """
        groups: dict[str, list[tuple[bool, bool]]] = {}
        for record in self.records:
            shortcut = record.get("shortcut")
            if shortcut is None or normalise_answer(shortcut) == normalise_answer(record["answer"]):
                continue
            took = normalise_answer(record["prediction"]) == normalise_answer(shortcut)
            groups.setdefault(record["op"], []).append((record["correct"], took))
        return {
            op: (sum(c for c, _ in v) / len(v), sum(t for _, t in v) / len(v), len(v))
            for op, v in sorted(groups.items())
        }

    def to_dict(self) -> dict:
        """JSON-ready summary (no tensors)."""
        records = [{k: v for k, v in r.items() if k != "pixel_values"} for r in self.records]
        return {
            "split": self.split,
            "n": self.n,
            "accuracy": self.accuracy,
            "per_type": self.per_type,
            "counts": self.counts,
            "by_objects": {str(k): acc for k, (acc, _) in self.by_objects.items()},
            "by_op": {
                kind: {op: acc for op, (acc, _) in ops.items()} for kind, ops in self.by_op.items()
            },
            "where_shortcut_fails": {
                op: {"accuracy": acc, "took_shortcut": took, "n": n}
                for op, (acc, took, n) in self.where_shortcut_fails.items()
            },
            "blind": self.blind,
            "blind_mode": self.blind_mode,
            "records": records,
        }


def score(
    items: Iterable[dict],
    answer_fn: Answerer,
    split: str = "test",
    batch_size: int = 32,
    keep_images: int = 16,
) -> EvalResult:
    """Ask `answer_fn` every item's question, batch by batch, and judge the answers by type."""
    records: list[dict] = []
    batch: list[dict] = []

    def flush() -> None:
        predictions = answer_fn(batch)
        if len(predictions) != len(batch):
            raise ValueError(
                f"answer_fn returned {len(predictions)} answers for {len(batch)} items"
            )
        for item, prediction in zip(batch, predictions, strict=True):
            record = {
                "index": len(records),
                "type": item["type"],
                "question": item["question"],
                "answer": item["answer"],
                "prediction": prediction,
                "correct": is_right(item, prediction),  # by meaning: "It is red." is right
                "exact": normalise_answer(prediction) == normalise_answer(item["answer"]),
            }
            if item.get("scene") is not None:
                record["objects"] = len(item["scene"].objects)
            for key in ("op", "shortcut"):
                if item.get(key) is not None:
                    record[key] = item[key]
            if len(records) < keep_images and item.get("pixel_values") is not None:
                record["pixel_values"] = item["pixel_values"].detach().cpu()
            records.append(record)
        batch.clear()

    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not records:
        raise ValueError(f"no items to evaluate on split {split!r}")

    counts: dict[str, int] = {}
    right: dict[str, int] = {}
    for record in records:
        counts[record["type"]] = counts.get(record["type"], 0) + 1
        right[record["type"]] = right.get(record["type"], 0) + int(record["correct"])
    per_type = {kind: right[kind] / counts[kind] for kind in sorted(counts)}
    accuracy = sum(right.values()) / len(records)
    return EvalResult(split, accuracy, per_type, dict(sorted(counts.items())), records)


# ----------------------------------------------------------------------------------------------
# The model as an answerer


def generate_answers(
    model,
    tokenizer,
    questions: Sequence[str],
    pixel_values: torch.Tensor | None,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Greedy (or sampled) answers to a batch of first questions, one image each or none.

    Each question opens a conversation exactly as `minillava chat` opens one (`chat.
    next_question`: the image, then the question as typed), and the answers come from the
    chat's own `reply`. `pixel_values` is (B, 3, H, W) matching `questions`, or None.
    """
    with_image = pixel_values is not None
    conversations = [next_question([], q, with_image) for q in questions]
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    answers = reply(model, tokenizer, conversations, pixel_values, max_new_tokens,
                    generator=generator, **sampling)  # fmt: skip
    return [answer.strip() for answer in answers]


def model_answerer(
    model,
    tokenizer,
    blind: bool = False,
    blind_mode: str = "blank",
    max_new_tokens: int = 16,
) -> Answerer:
    """Wrap the model as an `Answerer`; `blind` takes the image away (see the module docstring)."""
    if blind_mode not in BLIND_MODES:
        raise ValueError(f"blind_mode must be one of {BLIND_MODES}, got {blind_mode!r}")

    def answer(items: Sequence[dict]) -> list[str]:
        pixel_values = torch.stack([item["pixel_values"] for item in items])  # (B, 3, H, W)
        if blind and blind_mode == "blank":
            pixel_values = torch.zeros_like(pixel_values)  # normalised grey: no signal
        elif blind:
            pixel_values = None  # no <image> token at all
        questions = [item["question"] for item in items]
        return generate_answers(model, tokenizer, questions, pixel_values, max_new_tokens)

    return answer


# ----------------------------------------------------------------------------------------------
# The evaluation: a split's questions, asked with and without the image


def vqa_items(
    split: str = "test",
    n: int = 500,
    image_size: int = 64,
    seed: int = 0,
    world: Mapping | None = None,
) -> list[dict]:
    """The first `n` VQA items of a ShapesWorld split, images rendered at `image_size`.

    `world` overrides WorldConfig fields (e.g. the training run's `max_objects`, `text_prob`): a
    checkpoint's stored "world" dict, read by `checkpoint.world_config_from_dict`.
    """
    config = world_config_from_dict(world, image_size)
    dataset = VQADataset(split=split, size=n, config=config, seed=seed)
    return [dataset[i] for i in range(min(n, len(dataset)))]


def evaluate(
    model,
    tokenizer,
    split: str = "test",
    n: int = 500,
    image_size: int | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    blind: bool = False,
    blind_mode: str = "blank",
    max_new_tokens: int = 16,
    seed: int = 0,
    world: Mapping | None = None,
    items: Sequence[dict] | None = None,
) -> EvalResult:
    """VQA accuracy of `model` on `n` first questions of `split`, overall and per type.

    image_size defaults to the model's ViT input size. `device` moves the model there first
    (default: wherever it already is). `blind=True` is the baseline without the image.
    Pass `items` to evaluate on given VQA items instead (e.g. the same ones for model and blind).
    The model is put in eval mode and restored to its previous mode afterwards.
    """
    if device is not None:
        model.to(device)
    if image_size is None:
        image_size = model.config.vision.image_size
    if items is None:
        items = vqa_items(split, n, image_size, seed, world)
    answer_fn = model_answerer(model, tokenizer, blind, blind_mode, max_new_tokens)
    was_training = model.training
    model.eval()
    try:
        result = score(items, answer_fn, split=split, batch_size=batch_size)
    finally:
        model.train(was_training)
    result.blind, result.blind_mode = blind, blind_mode if blind else None
    return result


# ----------------------------------------------------------------------------------------------
# Beyond one question: later turns, false premises, descriptions


def is_right(turn: Mapping, prediction: str) -> bool:
    """A free answer judged by meaning (`judge`): an honest "there is none" for a question about
    an absent object, the right value and no other for the rest."""
    if turn["type"] == "false_premise":
        return judge_false_premise(prediction, turn["query"]["absent"])
    return judge_answer(turn, prediction)


@dataclass
class TurnResult:
    """Accuracy of each turn of a conversation: the same questions asked 1st, 2nd, 3rd.

    `records` holds one dict per conversation: its questions, the truths, the model's answers
    and whether each was right. A model that learnt to answer only a conversation's first
    question shows it here: turn 1 high, the others low.
    """

    split: str
    per_turn: list[float]
    per_turn_type: list[dict[str, float]]
    records: list[dict] = field(default_factory=list, repr=False)

    @property
    def n(self) -> int:
        return len(self.records)

    def to_dict(self) -> dict:
        return {"split": self.split, "n": self.n, "per_turn": self.per_turn,
                "per_turn_type": self.per_turn_type, "records": self.records}  # fmt: skip


def ask_next(
    model, tokenizer, histories: Sequence[list[dict]], questions: Sequence[str],
    pixel_values: torch.Tensor, max_new_tokens: int,
) -> tuple[list[list[dict]], list[str]]:  # fmt: skip
    """Ask each conversation its next question, as `ChatSession.ask` does (the image after the
    question, the oldest turns dropped if they no longer fit): (each conversation with the
    question and the model's answer added, the answers as written)."""
    asked = [
        next_question(h, q, with_image=True) for h, q in zip(histories, questions, strict=True)
    ]
    conversations = [
        fit_to_context(model, tokenizer, turns, True, max_new_tokens) for turns in asked
    ]
    answers = reply(model, tokenizer, conversations, pixel_values, max_new_tokens)
    said = [
        turns + [{"from": "gpt", "value": a}]
        for turns, a in zip(conversations, answers, strict=True)
    ]
    return said, answers


def evaluate_turns(
    model, tokenizer, items: Sequence[dict], split: str = "test", batch_size: int = 32,
    max_new_tokens: int = 24,
) -> TurnResult:  # fmt: skip
    """Ask each item's questions ("turns", `VQADataset(turns=k)`) one after the other in one
    conversation, as a person would in `minillava chat`: the model's own answers stay in the
    history. Every answer judged by meaning (`is_right`)."""
    records = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        pixel_values = torch.stack([item["pixel_values"] for item in batch])  # (B, 3, H, W)
        histories: list[list[dict]] = [[] for _ in batch]
        rows = [{"questions": [], "answers": [], "predictions": [], "types": [], "correct": []}
                for _ in batch]  # fmt: skip
        for k in range(len(batch[0]["turns"])):
            questions = [item["turns"][k]["question"] for item in batch]
            histories, answers = ask_next(model, tokenizer, histories, questions, pixel_values,
                                          max_new_tokens)  # fmt: skip
            for i, (item, answer) in enumerate(zip(batch, answers, strict=True)):
                turn = item["turns"][k]
                row = rows[i]
                row["questions"].append(turn["question"])
                row["answers"].append(turn["answer"])
                row["predictions"].append(answer.strip())
                row["types"].append(turn["type"])
                row["correct"].append(is_right(turn, answer.strip()))
        records += rows
    if not records:
        raise ValueError(f"no conversations to evaluate on split {split!r}")
    turns = len(records[0]["correct"])
    per_turn = [sum(r["correct"][k] for r in records) / len(records) for k in range(turns)]
    per_turn_type = []
    for k in range(turns):
        groups: dict[str, list[bool]] = {}
        for r in records:
            groups.setdefault(r["types"][k], []).append(r["correct"][k])
        per_turn_type.append({t: sum(v) / len(v) for t, v in sorted(groups.items())})
    return TurnResult(split, per_turn, per_turn_type, records)


def false_premise_items(
    split: str = "test", n: int = 200, image_size: int = 64, seed: int = 0,
    world: Mapping | None = None,
) -> list[dict]:  # fmt: skip
    """`n` questions about objects the image does not show ("What colour is the circle?" in a
    scene without one), on a split's first scenes."""
    config = world_config_from_dict(world, image_size)
    dataset = VQADataset(split=split, size=n, config=config, seed=seed, types=("false_premise",))
    return [dataset[i] for i in range(min(n, len(dataset)))]


def follow_up_items(
    split: str = "test", n: int = 200, image_size: int = 64, seed: int = 0,
    world: Mapping | None = None,
) -> list[dict]:  # fmt: skip
    """`n` two-question conversations on a split's first scenes: a colour, shape or size
    question about one object, then one about the same object by pronoun ("Where is it?",
    `data.instruct.follow_up_question`). Ask them with `evaluate_turns`."""
    config = world_config_from_dict(world, image_size)
    dataset = VQADataset(split, n, config, seed, types=FOLLOW_UP_TYPES, follow_up=True)
    return [dataset[i] for i in range(min(n, len(dataset)))]


def evaluate_false_premises(
    model, tokenizer, items: Sequence[dict], batch_size: int = 32, max_new_tokens: int = 24
) -> dict:
    """Share of questions about an absent object that the model answers as such ("There is no
    circle in the image.") instead of naming a colour, shape or cell for it: `score` with the
    model as answerer, each answer judged by `is_right` (an honest "there is none")."""
    answerer = model_answerer(model, tokenizer, max_new_tokens=max_new_tokens)
    result = score(items, answerer, split="false premises", batch_size=batch_size, keep_images=0)
    return {"n": result.n, "honest": result.accuracy, "records": result.records}


DESCRIBE = "Describe the image."  # as a person would ask it


def evaluate_descriptions(
    model, tokenizer, samples: Sequence, question: str = DESCRIBE, batch_size: int = 32,
    max_new_tokens: int = 128, earlier: Sequence[str] | None = None,
) -> dict:  # fmt: skip
    """Ask for a description of each sample (ShapesWorld `Sample`s: scene and pixels) and score
    it against the scene annotation (`judge.score_description`): objects named right in cell,
    size, colour and shape (precision, recall, F1), hallucinated and repeated mentions, the
    text. Returns the totals (`judge.aggregate`) and every description with its score.

    `earlier`: one question per sample, asked first as a person might open the chat ("What
    colour is the circle?"), the model's answer kept in the history; the description is then
    the second turn, as `evaluate_turns` asks later questions."""
    records, scores = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        pixel_values = torch.stack([s.pixel_values for s in batch])
        if earlier is None:
            answers = generate_answers(model, tokenizer, [question] * len(batch), pixel_values,
                                       max_new_tokens)  # fmt: skip
        else:
            openers = earlier[start : start + len(batch)]
            histories, _ = ask_next(model, tokenizer, [[]] * len(batch), openers, pixel_values, 24)
            _, described = ask_next(model, tokenizer, histories, [question] * len(batch),
                                    pixel_values, max_new_tokens)  # fmt: skip
            answers = [text.strip() for text in described]
        for sample, text in zip(batch, answers, strict=True):
            result = score_description(sample.scene, text)
            scores.append(result)
            records.append({"index": sample.index, "description": text, "score": result})
    return {"question": question, "totals": aggregate(scores), "records": records}


# ----------------------------------------------------------------------------------------------
# Does the image help? The loss on the words that name what is in it, with and without it


def content_word_ids(tokenizer, world) -> set[int]:
    """The token ids of the words a caption gets from the image: colours, shapes, sizes, places
    (`world`: the ShapesWorld config the model was trained on)."""
    places = ("top", "middle", "bottom", "left", "right", "center")
    words = [*world.colours, *world.shapes, "large", "small", *places]
    return {i for w in words for i in tokenizer.encode(" " + w) + tokenizer.encode(w)}


@torch.no_grad()
def loss_by_word_kind(model, batch: Mapping, content_ids: set[int]) -> tuple[float, float]:
    """(mean loss on the answers' content words, mean loss on their other words) of `batch`.

    A caption's loss mixes words the image decides ("red", "circle", "top left") with words it
    does not ("There is a ... in the ..."): comparing the two with the right image and with
    another image says whether the model reads the picture or only learnt the caption's form.
    """
    model.eval()
    out = model(**batch)
    _, _, labels, _ = model.embed_multimodal(
        batch["input_ids"], batch["pixel_values"], batch["attention_mask"], batch["labels"]
    )
    targets, logits = labels[:, 1:], out.logits[:, :-1]  # position t predicts token t + 1
    loss = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=-100, reduction="none"
    )  # (B, T - 1)
    scored = targets != -100
    content = torch.isin(targets, torch.tensor(sorted(content_ids), device=targets.device))
    content &= scored
    return loss[content].mean().item(), loss[scored & ~content].mean().item()
