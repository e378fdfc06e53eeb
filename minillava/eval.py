"""Evaluation: does the model *look* at the image? VQA accuracy by question type, with a baseline.

A VQA (visual question answering) benchmark asks short questions about images and compares the
model's answer with the truth, word for word, after a light normalisation (case, spaces, a final
full stop). We ask in LLaVA-1.5's short-answer style, with the question before the image
(`data.instruct.vqa_prompt` says why), the same prompt the instruct stage trained on:

    <|user|>What colour is the circle?\\n<image>\\nAnswer with a single word or phrase.<|assistant|>

and decode greedily (temperature 0) with the KV cache until the end-of-turn token.

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

Both are honest baselines (neither sees the scene). `report` (the table of ``minillava eval`` and
of ``make train``) shows both, blank first; ``minillava eval --blind-mode`` can pick one.

The held-out split shows (shape, colour) pairs never seen in training: a model that learnt
"purple" and "triangle" separately answers as well there as on the test split; one that learnt
only the pairs it saw does not.

`report(...)` is what `minillava train` calls at the end: tables, plots, a few chat samples.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from matplotlib.figure import Figure

from minillava.data.instruct import vqa_prompt  # the short-answer prompt the instruct stage used

BLIND_MODES = ("blank", "no_image")
DEFAULT_CHECKPOINT = "runs/cpu/llava.pt"
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
    carry "pixel_values" (3, H, W) for `plot_gallery`.
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
        find scores about 1/k on k-shape images (docs/results.md, session 4).
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
        the second is mostly right (docs/results.md, session 9). {type: {op: (accuracy, n)}}.
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
        never counts; here it shows (docs/results.md, session 12).
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


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


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
    explain: bool = False,
) -> list[str]:
    """Greedy (or sampled) answers to a batch of single-turn questions, one image each or none.

    Prompts are left-padded: every row then ends at the same position, where the answer begins,
    and the attention mask keeps the padding out of attention and positions.
    `pixel_values` is (B, 3, H, W) matching `questions`, or None for text-only prompts.
    `explain=True` asks for the working instead of a short answer (`vqa_prompt(explain=True)`).
    """
    from minillava.data.collate import collate_conversations
    from minillava.device import autocast

    with_image = pixel_values is not None
    if with_image and pixel_values.shape[0] != len(questions):
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} images for {len(questions)} questions"
        )
    samples = [
        {
            "pixel_values": pixel_values[i] if with_image else None,
            "conversations": [{"from": "human", "value": vqa_prompt(q, with_image, explain)}],
        }
        for i, q in enumerate(questions)
    ]
    batch = collate_conversations(samples, tokenizer, padding_side="left")
    device = _model_device(model)
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


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """New token ids -> text, cut at the first stop (or padding) token."""
    ends = set(tokenizer.stop_ids) | {tokenizer.pad_id}
    kept = []
    for token in ids:
        if token in ends:
            break
        kept.append(token)
    return tokenizer.decode(kept).strip()


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


def world_config(world: Mapping | None, image_size: int):
    """A WorldConfig from a training run's `world` dict (as checkpoints store it), at image_size.

    Checkpoints store configs as plain dicts; lists come back where the dataclass has tuples.
    """
    from minillava.data.shapes import WorldConfig

    def as_tuple(value):
        return tuple(as_tuple(v) for v in value) if isinstance(value, list | tuple) else value

    known = set(WorldConfig.__dataclass_fields__)
    options = {k: as_tuple(v) for k, v in (world or {}).items() if k in known}
    options["image_size"] = image_size
    return WorldConfig(**options)


def vqa_items(
    split: str = "test",
    n: int = 500,
    image_size: int = 64,
    seed: int = 0,
    world: Mapping | None = None,
) -> list[dict]:
    """The first `n` VQA items of a ShapesWorld split, images rendered at `image_size`.

    `world` overrides WorldConfig fields (e.g. the training run's `max_objects`, `text_prob`).
    """
    from minillava.data.instruct import VQADataset

    dataset = VQADataset(split=split, size=n, config=world_config(world, image_size), seed=seed)
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


# ----------------------------------------------------------------------------------------------
# Showing the results


def format_table(
    result: EvalResult, blind: EvalResult | None = None, others: Sequence[EvalResult] = ()
) -> str:
    """Per-type table: type, n, accuracy, blind accuracy, gain (percentage points).

    `others`: more blind baselines (other `blind_mode`s), each two more columns: its accuracy and
    the gain over it, headed by its mode ("no_image": the decoder without the image token).
    """
    blinds = ([blind] if blind is not None else []) + list(others)
    title = f"VQA accuracy, split {result.split!r} ({result.n} questions, exact match)"
    if blinds:
        modes = " / ".join(b.blind_mode or "blank" for b in blinds)
        title += f"; blind = same model without the image ({modes})"
    header = f"{'type':<11} {'n':>5} {'accuracy':>9}"
    for k, b in enumerate(blinds):
        name = "blind" if k == 0 else (b.blind_mode or "blank")[:8]
        header += f" {name:>8} {'gain':>6}"
    lines = [title, header, "-" * len(header)]

    def row(name: str, count: int, acc: float, blind_accs: list[float | None]) -> str:
        line = f"{name:<11} {count:>5} {acc:>9.1%}"
        for blind_acc in blind_accs:
            if blind_acc is None:
                line += f" {'-':>8} {'-':>6}"
            else:
                line += f" {blind_acc:>8.1%} {100 * (acc - blind_acc):>+6.1f}"
        return line

    for kind, acc in result.per_type.items():
        lines.append(row(kind, result.counts[kind], acc, [b.per_type.get(kind) for b in blinds]))
    lines.append("-" * len(header))
    lines.append(row("overall", result.n, result.accuracy, [b.accuracy for b in blinds]))
    by_objects = result.by_objects  # a property that walks every record: once
    if by_objects:
        shapes = ", ".join(f"{k}: {acc:.0%} (n={count})" for k, (acc, count) in by_objects.items())
        lines.append(f"by shapes in the image: {shapes}")
    for kind, ops in result.by_op.items():
        forms = ", ".join(f"{op} {acc:.0%} (n={count})" for op, (acc, count) in ops.items())
        lines.append(f"{kind} by question form: {forms}")
    fails = result.where_shortcut_fails
    if fails:
        forms = ", ".join(
            f"{op} {acc:.0%} right, {took:.0%} the shortcut (n={n})"
            for op, (acc, took, n) in fails.items()
        )
        lines.append(f"where a shortcut is wrong (data.instruct.shortcut_answer): {forms}")
    return "\n".join(lines)


def plot_accuracy_bars(
    results: Mapping[str, EvalResult], path: str | Path, title: str = "VQA accuracy by type"
) -> Path:
    """Grouped bar chart, one group per question type (+ overall), one bar per labelled result.

    `results` maps a label to a result, e.g. {"test": r, "test blind": b, "heldout": h}.
    Bars whose label contains "blind" are hatched, so the baseline stands apart.
    """
    if not results:
        raise ValueError("plot_accuracy_bars needs at least one result")
    kinds = sorted({kind for r in results.values() for kind in r.per_type}) + ["overall"]
    width = 0.8 / len(results)
    # A bare Figure, not pyplot: no global backend switch, so a notebook keeps inline plots.
    fig = Figure(figsize=(max(6.0, 1.1 * len(kinds) + 2), 4.0))
    ax = fig.subplots()
    for i, (label, result) in enumerate(results.items()):
        values = [result.per_type.get(k, math.nan) for k in kinds[:-1]] + [result.accuracy]
        positions = [j + (i - (len(results) - 1) / 2) * width for j in range(len(kinds))]
        ax.bar(
            positions,
            [100 * v for v in values],
            width,
            label=label,
            hatch="//" if "blind" in label else None,
            edgecolor="black",
            linewidth=0.5,
        )
    ax.set_xticks(range(len(kinds)), kinds, rotation=20)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_gallery(
    result: EvalResult, path: str | Path, n: int = 12, columns: int = 4, title: str | None = None
) -> Path:
    """Images with their question, the model's answer and the truth (green right, red wrong).

    Uses the records that kept their image (`score(..., keep_images=...)`).
    """
    from minillava.data.image_processor import ImageProcessor

    shown = [r for r in result.records if "pixel_values" in r][:n]
    if not shown:
        raise ValueError("plot_gallery: no record kept its image (evaluate with keep_images > 0)")
    rows = math.ceil(len(shown) / columns)
    fig = Figure(figsize=(3.0 * columns, 3.4 * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    processor = ImageProcessor(image_size=shown[0]["pixel_values"].shape[-1])
    for ax in axes.flat:
        ax.axis("off")
    for ax, record in zip(axes.flat, shown, strict=False):
        ax.imshow(processor.denormalise(record["pixel_values"].float()).permute(1, 2, 0).numpy())
        colour = "green" if record["correct"] else "red"
        ax.set_title(
            f"{_wrap(record['question'], 34)}\nmodel: {_shorten(record['prediction'], 28)}"
            f"\ntruth: {record['answer']}",
            fontsize=8,
            color=colour,
        )
    fig.suptitle(title or f"{result.split}: {result.accuracy:.0%} of {result.n} correct")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


def _shorten(text: str, width: int) -> str:
    """One line of at most `width` characters (an untrained model can ramble)."""
    text = " ".join(text.split()) or "(nothing)"
    return text if len(text) <= width else text[: width - 3] + "..."


# ----------------------------------------------------------------------------------------------
# CLIP zero-shot classification


def clip_zero_shot(
    clip_model,
    tokenizer,
    attribute: str = "shape",
    split: str = "test",
    n: int = 200,
    image_size: int | None = None,
    template: str = "an image of a {}.",
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """Zero-shot accuracy of a CLIP model on single-object scenes: name the shape (or colour).

    No classifier is trained: the text encoder *is* the classifier. Each class is described in
    the words of the captions CLIP was trained on, "an image of a large red circle.", and, as in
    the CLIP paper's *prompt ensembling*, over every value of the other attributes (all sizes and
    colours for a shape class): the class embedding is the normalised mean of those sentence
    embeddings. An image gets the class whose embedding is the most similar (cosine) to its own.
    Scenes with one object and no text keep the label unambiguous.
    Returns {"attribute", "accuracy", "chance", "n", "classes"}.
    """
    from minillava.data.collate import collate_text
    from minillava.data.shapes import ShapesWorld, WorldConfig

    if attribute not in ("shape", "colour"):
        raise ValueError(f"attribute must be 'shape' or 'colour', got {attribute!r}")
    if image_size is None:
        image_size = clip_model.config.vision.image_size
    config = WorldConfig(image_size=image_size, min_objects=1, max_objects=1, text_prob=0.0)
    classes = list(config.shapes if attribute == "shape" else config.colours)
    device = _model_device(clip_model)
    was_training = clip_model.training
    clip_model.eval()
    try:
        with torch.inference_mode():
            class_embeds = []
            for name in classes:
                shapes = [name] if attribute == "shape" else config.shapes
                colours = [name] if attribute == "colour" else config.colours
                sentences = [
                    template.format(f"{size} {colour} {shape}")
                    for size in config.sizes
                    for colour in colours
                    for shape in shapes
                ]
                text = collate_text(sentences, tokenizer, max_len=None)
                embeds = clip_model.encode_text(
                    text["input_ids"].to(device), text["attention_mask"].to(device)
                )  # (prompts, E)
                class_embeds.append(torch.nn.functional.normalize(embeds.mean(0), dim=-1))
            class_embeds = torch.stack(class_embeds)  # (K, E)

            world = ShapesWorld(split, size=n, config=config, seed=seed)
            correct = 0
            for start in range(0, n, batch_size):
                samples = [world[i] for i in range(start, min(n, start + batch_size))]
                pixel_values = torch.stack([s.pixel_values for s in samples]).to(device)
                image_embeds = clip_model.encode_image(pixel_values)  # (B, E)
                predicted = (image_embeds @ class_embeds.T).argmax(dim=-1).cpu()  # (B,)
                truth = [classes.index(getattr(s.scene.objects[0], attribute)) for s in samples]
                correct += int((predicted == torch.tensor(truth)).sum())
    finally:
        clip_model.train(was_training)
    return {
        "attribute": attribute,
        "accuracy": correct / n,
        "chance": 1 / len(classes),
        "n": n,
        "classes": classes,
    }


# ----------------------------------------------------------------------------------------------
# The report printed at the end of `minillava train`, and `minillava eval`


def report(
    model,
    tokenizer,
    out_dir: str | Path,
    n: int = 200,
    splits: Sequence[str] = ("test", "heldout"),
    n_chat: int = 3,
    batch_size: int = 32,
    blind_modes: Sequence[str] = BLIND_MODES,
    clip_model=None,
    world: Mapping | None = None,
    seed: int = 0,
    print_fn: Callable[[str], None] = print,
) -> dict:
    """Evaluate on each split with and without the image; print tables + chat samples; save plots.

    `blind_modes`: the blind baselines, each a column pair of the table; the first is *the*
    baseline (eval.json's "blind", the bars), the others are kept as "blind_<mode>". Both by
    default: a grey image and no image token at all can differ by tens of points on a type
    whose answer the model guesses (docs/results.md, session 12), and a gain means what its
    baseline means.
    Writes to `out_dir`: eval.json (every number and answer), accuracy.png (bars by type, model
    vs blind, per split), gallery_<split>.png (images with question, answer, truth).
    Returns the summary dict that eval.json holds. `clip_model` adds CLIP zero-shot accuracy.
    """
    if not blind_modes or any(mode not in BLIND_MODES for mode in blind_modes):
        raise ValueError(f"blind_modes must be some of {BLIND_MODES}, got {tuple(blind_modes)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_size = model.config.vision.image_size
    summary: dict = {"splits": {}}
    bars: dict[str, EvalResult] = {}
    for split in splits:
        items = vqa_items(split, n, image_size, seed, world)
        result = evaluate(model, tokenizer, split, batch_size=batch_size, items=items)
        blind, *others = (
            evaluate(
                model, tokenizer, split, batch_size=batch_size, blind=True, blind_mode=mode,
                items=items,
            )
            for mode in blind_modes
        )  # fmt: skip
        print_fn("")
        print_fn(format_table(result, blind, others))
        bars[split] = result
        bars[f"{split} blind"] = blind
        summary["splits"][split] = {"model": result.to_dict(), "blind": blind.to_dict()}
        for other in others:
            summary["splits"][split][f"blind_{other.blind_mode}"] = other.to_dict()
        plot_gallery(result, out_dir / f"gallery_{split}.png")
    plot_accuracy_bars(bars, out_dir / "accuracy.png")

    if clip_model is not None:
        summary["clip_zero_shot"] = {}
        for attribute in ("shape", "colour"):
            zs = clip_zero_shot(clip_model, tokenizer, attribute, n=n, seed=seed)
            summary["clip_zero_shot"][attribute] = zs
            print_fn(
                f"CLIP zero-shot {attribute}: {zs['accuracy']:.1%} of {zs['n']} "
                f"(chance {zs['chance']:.1%})"
            )

    if n_chat > 0:
        summary["chat_samples"] = chat_samples(model, tokenizer, n_chat, world=world, seed=seed)
        print_fn("")
        print_fn("Chat samples (test images, greedy decoding):")
        for sample in summary["chat_samples"]:
            print_fn(f"  scene: {sample['scene']}")
            print_fn(f"    user: {sample['question']}")
            print_fn(f"    minillava: {sample['answer']}")
    with open(out_dir / "eval.json", "w") as f:
        json.dump(summary, f, indent=1)
    print_fn(f"\nplots and answers in {out_dir}/ (accuracy.png, gallery_*.png, eval.json)")
    return summary


def chat_samples(
    model, tokenizer, n: int = 3, world: Mapping | None = None, seed: int = 0
) -> list[dict]:
    """Ask the model open questions about a few test scenes (an honest look at free text)."""
    from minillava.chat import ask
    from minillava.data.shapes import ShapesWorld

    config = world_config(world, model.config.vision.image_size)
    scenes = ShapesWorld("test", size=n, config=config, seed=seed + 1)
    questions = ("Describe the image.", "What shapes do you see?", "What is in the image?")
    samples = []
    for i in range(n):
        sample = scenes[i]
        question = questions[i % len(questions)]
        answer = ask(model, tokenizer, sample.pixel_values, question, max_new_tokens=48)
        samples.append({"scene": sample.captions[0], "question": question, "answer": answer})
    return samples


def load_clip_for_eval(path: str | Path, device: torch.device):
    """A CLIP model from a `clip` stage checkpoint, or None if the file or its layout is absent."""
    path = Path(path)
    if not path.is_file():
        return None
    from minillava.checkpoint import config_from_dict, load_checkpoint
    from minillava.clip import CLIP, CLIPConfig

    ckpt = load_checkpoint(path)
    try:
        model = CLIP(config_from_dict(CLIPConfig, ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        print(f"minillava eval: skipping CLIP zero-shot, cannot load {path}: {error}")
        return None
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="minillava eval",
        description="VQA accuracy by question type, against a blind baseline (same model, no "
        "image), plus a bar chart and a gallery.",
    )
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a `minillava train` run")
    parser.add_argument(
        "--split", default="test,heldout", help="comma-separated: test, heldout, val, train"
    )
    parser.add_argument("--n", type=int, default=500, help="questions per split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--blind-mode",
        choices=(*BLIND_MODES, "both"),
        default="both",
        help="the blind baseline: a grey image (blank), no image token (no_image), or both, "
        "blank first (default)",
    )
    parser.add_argument(
        "--out-dir", default=None, help="where plots and eval.json go (default: <run dir>/eval)"
    )
    parser.add_argument(
        "--clip-checkpoint",
        default=None,
        help="CLIP checkpoint for zero-shot accuracy (default: clip.pt next to the checkpoint)",
    )
    parser.add_argument("--chat-samples", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        print(
            f"minillava eval: no checkpoint at {checkpoint}; run `make train` first "
            "(or pass --checkpoint PATH)",
            file=sys.stderr,
        )
        return 1
    if args.n < 1:
        parser.error(f"--n must be at least 1, got {args.n}")
    splits = [s.strip() for s in args.split.split(",") if s.strip()]
    from minillava.checkpoint import load_llava

    model, tokenizer, info = load_llava(checkpoint, device=args.device)
    world = (info.get("config") or {}).get("world")  # the ShapesWorld the model trained on
    clip_path = Path(args.clip_checkpoint or checkpoint.with_name("clip.pt"))
    clip_model = load_clip_for_eval(clip_path, _model_device(model))
    out_dir = Path(args.out_dir) if args.out_dir else checkpoint.parent / "eval"
    report(
        model,
        tokenizer,
        out_dir,
        n=args.n,
        splits=splits,
        n_chat=args.chat_samples,
        batch_size=args.batch_size,
        blind_modes=BLIND_MODES if args.blind_mode == "both" else (args.blind_mode,),
        clip_model=clip_model,
        world=world,
        seed=args.seed,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
