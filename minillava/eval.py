"""Evaluation: does the model *look* at the image? VQA accuracy by question type, with a baseline.

A VQA (visual question answering) benchmark asks short questions about images and compares the
model's answer with the truth, word for word, after a light normalisation (case, spaces, a final
full stop). We ask in LLaVA-1.5's short-answer style, with the question before the image
(`data.instruct.vqa_prompt` says why), the same prompt the instruct stage trained on:

    <|user|>What colour is the circle?\\n<image>\\nAnswer with a single word or phrase.<|assistant|>

and decode greedily (temperature 0) with the KV cache until the end-of-turn token. The answer is
read off the new tokens by the chat's `decode_answer`: what is scored is what `minillava chat`
would say to the same question.

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

The file reads in three parts: scoring (`normalise_answer`, `EvalResult`, `score`: any
answerer, proven right with oracles), the model as an answerer (`generate_answers`,
`model_answerer`), and the evaluation itself (`vqa_items`, `evaluate`). Showing the results
(tables, plots, chat samples, the ``minillava eval`` command) is `minillava.report`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from minillava.chat import decode_answer
from minillava.checkpoint import world_config_from_dict
from minillava.data.collate import collate_conversations
from minillava.data.instruct import VQADataset, vqa_prompt  # the prompt the instruct stage used
from minillava.device import autocast

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
    """Exact-match accuracy of one run: overall, per question type, and every answer.

    `records` holds one dict per question: index, type, question, answer (truth), prediction
    (raw), correct, and where the item says so "objects" (shapes in the image), "op" (the
    question's program) and "shortcut" (`data.instruct.shortcut_answer`); the first few also
    carry "pixel_values" (3, H, W), for `report.plot_gallery` to show.
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
    """Ask `answer_fn` every item's question, batch by batch, and score exact matches by type."""
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
                "correct": normalise_answer(prediction) == normalise_answer(item["answer"]),
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


@torch.inference_mode()
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
    """Greedy (or sampled) answers to a batch of single-turn questions, one image each or none.

    Prompts are left-padded: every row then ends at the same position, where the answer begins,
    and the attention mask keeps the padding out of attention and positions.
    `pixel_values` is (B, 3, H, W) matching `questions`, or None for text-only prompts.
    Each answer is read off its new tokens by the chat's own `decode_answer`.
    """
    with_image = pixel_values is not None
    if with_image and pixel_values.shape[0] != len(questions):
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} images for {len(questions)} questions"
        )
    samples = [
        {
            "pixel_values": pixel_values[i] if with_image else None,
            "conversations": [{"from": "human", "value": vqa_prompt(q, with_image)}],
        }
        for i, q in enumerate(questions)
    ]
    batch = collate_conversations(samples, tokenizer, padding_side="left")
    device = next(model.parameters()).device
    with autocast(device):
        new_ids = model.generate(
            batch["input_ids"].to(device),
            pixel_values=batch["pixel_values"].to(device) if with_image else None,
            attention_mask=batch["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_token_ids=tokenizer.stop_ids,
            pad_token_id=tokenizer.pad_id,
            generator=generator,
        )
    return [decode_answer(tokenizer, row) for row in new_ids.tolist()]


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
    """Exact-match VQA accuracy of `model` on `n` questions of `split`, overall and per type.

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
