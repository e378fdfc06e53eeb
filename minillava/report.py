"""Showing an evaluation: the tables, plots and samples of `minillava eval` and `make train`.

`minillava.eval` produces the numbers (an `EvalResult` per split, with and without the image);
this file turns them into what a person reads:

- `format_table`: one row per question type, with the accuracy, each blind baseline and the
  *gain* over it, in percentage points. Read the gain column first: a type at 60% with a blind
  baseline at 58% has learnt its answer prior, not to look. Under the table come the breakdowns
  that one number per type hides: accuracy by the number of shapes in the image (does the model
  *find* the object a question names?), by the form of the question for the types asked in
  several ways, and on the questions where a known shortcut gives the wrong answer.
- `plot_accuracy_bars` (bars by type, the blind ones hatched) and `plot_gallery` (images with
  the question, the model's answer and the truth, green when right, red when wrong).
- `clip_zero_shot`: how well the CLIP vision encoder alone names the shape or colour of a
  one-shape scene, with its text encoder as the classifier: a check of the eyes before the
  decoder is involved. `load_clip_for_eval` reads the `clip` stage's checkpoint.
- `chat_samples`: a few open questions through the chat itself ("Describe the image."): what no
  accuracy shows, whether the free text is fluent and true.
- `report`: all of it for each split, printed and saved (eval.json, accuracy.png,
  gallery_<split>.png); what `minillava train` runs at the end. `main` is `minillava eval`.

Figures are drawn on a bare `matplotlib.figure.Figure`, not through pyplot: no global backend
switch, so a notebook keeps its inline plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from minillava.chat import ask
from minillava.checkpoint import (
    DEFAULT_CHECKPOINT,
    config_from_dict,
    load_checkpoint,
    load_llava,
    require_checkpoint,
    world_config_from_dict,
)
from minillava.cli import ArgumentParser, non_negative_int, output_dir_problem, positive_int
from minillava.clip import CLIP, CLIPConfig
from minillava.data.collate import collate_text
from minillava.data.image_processor import ImageProcessor
from minillava.data.instruct import VQADataset
from minillava.data.shapes import SPLITS, ShapesWorld, WorldConfig
from minillava.device import device_from_flag
from minillava.eval import (
    BLIND_MODES,
    DESCRIBE,
    EvalResult,
    TurnResult,
    evaluate,
    evaluate_descriptions,
    evaluate_false_premises,
    evaluate_turns,
    false_premise_items,
    follow_up_items,
    vqa_items,
)

# ----------------------------------------------------------------------------------------------
# Tables


def format_table(
    result: EvalResult, blind: EvalResult | None = None, others: Sequence[EvalResult] = ()
) -> str:
    """Per-type table: type, n, accuracy, blind accuracy, gain (percentage points).

    `others`: more blind baselines (other `blind_mode`s), each two more columns: its accuracy and
    the gain over it, headed by its mode ("no_image": the decoder without the image token).
    """
    blinds = ([blind] if blind is not None else []) + list(others)
    title = f"VQA accuracy, split {result.split!r} ({result.n} first questions, by meaning)"
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


def format_turns(result: TurnResult) -> str:
    """Accuracy of the 1st, 2nd, 3rd ... question of a conversation, overall and by type."""
    turns = len(result.per_turn)
    header = f"{'type':<14}" + "".join(f" {'turn ' + str(k + 1):>8}" for k in range(turns))
    lines = [
        f"Later turns, split {result.split!r}: {result.n} conversations of {turns} questions, "
        "the model's own answers in the history",
        header,
        "-" * len(header),
    ]
    kinds = sorted({kind for per_type in result.per_turn_type for kind in per_type})
    for kind in kinds:
        cells = [per_type.get(kind) for per_type in result.per_turn_type]
        lines.append(f"{kind:<14}" + "".join(
            f" {'-':>8}" if c is None else f" {c:>8.1%}" for c in cells))  # fmt: skip
    lines.append("-" * len(header))
    lines.append(f"{'all':<14}" + "".join(f" {acc:>8.1%}" for acc in result.per_turn))
    return "\n".join(lines)


def format_follow_ups(result: TurnResult) -> str:
    """One line: questions about an object asked by pronoun after a question that named it."""
    first, follow_up = result.per_turn
    by_type = ", ".join(f"{t} {acc:.0%}" for t, acc in result.per_turn_type[1].items())
    return (
        f'Follow-ups ("Where is it?" after a question about the object, {result.n} '
        f"conversations): {follow_up:.1%} right ({by_type}); the first question {first:.1%}"
    )


def format_descriptions(totals: Mapping, false_premises: Mapping | None = None) -> str:
    """Faithfulness of the descriptions (`judge.aggregate`'s totals), and false premises."""
    lines = [
        f'Descriptions ("{DESCRIBE}", {totals["n"]} images): objects named right in cell, '
        f"size, colour and shape: precision {totals['precision']:.3f}, recall "
        f"{totals['recall']:.3f}, F1 {totals['f1']:.3f}; hallucinated "
        f"{totals['hallucination_rate']:.1%} of objects named ({totals['chair_s']:.1%} of "
        f"descriptions name one); repeated mentions {totals['repeated_per_description']:.2f} a "
        f"description; the count right {_pct(totals.get('count_accuracy'))}, the text right "
        f"{_pct(totals.get('text_accuracy'))}"
    ]
    if false_premises is not None:
        lines.append(
            f"False premises (a question about an object that is not there): "
            f"{false_premises['honest']:.1%} of {false_premises['n']} answered that it is not"
        )
    return "\n".join(lines)


def format_second_turn_descriptions(totals: Mapping) -> str:
    """One line: "Describe the image." asked after a short question, in the same chat."""
    return (
        f'"{DESCRIBE}" as a second turn, after a short question ({totals["n"]} images): F1 '
        f"{totals['f1']:.3f}, hallucinated {totals['hallucination_rate']:.1%} of objects named"
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


# ----------------------------------------------------------------------------------------------
# Plots


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
    ax.set_ylabel("accuracy (%), answers judged by meaning")
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


def mark_wrong_words(text: str, spans: Sequence[tuple[int, int]]) -> str:
    """The description with each wrong span in [BRACKETS AND CAPITALS], for a plain-text plot."""
    out, last = [], 0
    for start, end in sorted(spans):
        out += [text[last:start], f"[{text[start:end].upper()}]"]
        last = end
    return "".join(out + [text[last:]])


def plot_description_gallery(
    samples: Sequence, records: Sequence[dict], path: str | Path, n: int = 6, columns: int = 3
) -> Path:
    """Images with the model's description, wrong words [MARKED]; the title says the score.

    `samples` are the ShapesWorld samples described, `records` `evaluate_descriptions`'s.
    """
    shown = list(zip(samples, records, strict=False))[:n]
    if not shown:
        raise ValueError("plot_description_gallery: nothing to show")
    rows = math.ceil(len(shown) / columns)
    # Each image sits above its text: two rows of axes per row of samples.
    fig = Figure(figsize=(4.4 * columns, 6.4 * rows))
    axes = fig.subplots(2 * rows, columns, squeeze=False, height_ratios=[3, 2] * rows)
    for ax in axes.flat:
        ax.axis("off")
    image_axes = [axes[2 * (k // columns), k % columns] for k in range(len(shown))]
    text_axes = [axes[2 * (k // columns) + 1, k % columns] for k in range(len(shown))]
    for ax, text_ax, (sample, record) in zip(image_axes, text_axes, shown, strict=True):
        score = record["score"]
        ax.imshow(sample.image)
        text = mark_wrong_words(record["description"], score.wrong_words)
        right = score.f1 == 1.0 and not score.hallucinated and not score.repeated
        ax.set_title(f"F1 {score.f1:.2f}, {score.hallucinated} hallucinated, "
                     f"{score.repeated} repeated", fontsize=9,
                     color="green" if right else "red")  # fmt: skip
        text_ax.text(0.0, 1.0, _wrap(text, 56), transform=text_ax.transAxes, fontsize=7.5,
                     va="top")  # fmt: skip
    fig.suptitle(f'"{DESCRIBE}": wrong words in [CAPITALS]')
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _shorten(text: str, width: int) -> str:
    """One line of at most `width` characters (an untrained model can ramble)."""
    text = " ".join(text.split()) or "(nothing)"
    return text if len(text) <= width else text[: width - 3] + "..."


# ----------------------------------------------------------------------------------------------
# CLIP zero-shot classification: the eyes alone


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
    if attribute not in ("shape", "colour"):
        raise ValueError(f"attribute must be 'shape' or 'colour', got {attribute!r}")
    if image_size is None:
        image_size = clip_model.config.vision.image_size
    config = WorldConfig(image_size=image_size, min_objects=1, max_objects=1, text_prob=0.0)
    classes = list(config.shapes if attribute == "shape" else config.colours)
    device = next(clip_model.parameters()).device
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


def load_clip_for_eval(path: str | Path, device: torch.device):
    """A CLIP model from a `clip` stage checkpoint, or None if the file or its layout is absent."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path)  # CheckpointUnreadableError (a ValueError): empty, cut short
        model = CLIP(config_from_dict(CLIPConfig, ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        print(f"minillava eval: skipping CLIP zero-shot, cannot load {path}: {error}")
        return None
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Chat samples: free text, through the chat


def chat_samples(
    model, tokenizer, n: int = 3, world: Mapping | None = None, seed: int = 0
) -> list[dict]:
    """Ask the model open questions about a few test scenes (an honest look at free text).

    Through the chat itself (`chat.ask`, greedy): these are the answers `minillava chat` gives.
    """
    config = world_config_from_dict(world, model.config.vision.image_size)
    scenes = ShapesWorld("test", size=n, config=config, seed=seed + 1)
    questions = ("Describe the image.", "What shapes do you see?", "What is in the image?")
    samples = []
    for i in range(n):
        sample = scenes[i]
        question = questions[i % len(questions)]
        answer = ask(model, tokenizer, sample.pixel_values, question)
        samples.append({"scene": sample.captions[0], "question": question, "answer": answer})
    return samples


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
    turns: int = 3,
    n_conversations: int | None = None,
    n_descriptions: int | None = None,
) -> dict:
    """Evaluate on each split with and without the image; print tables + chat samples; save plots.

    Per split: `n` first questions (with the blind baselines), `n_conversations` conversations
    of `turns` questions and as many false premises (default n // 4), `n_descriptions`
    descriptions (default n // 10), all asked through the chat's `reply`.

    `blind_modes`: the blind baselines, each a column pair of the table; the first is *the*
    baseline (eval.json's "blind", the bars), the others are kept as "blind_<mode>". Both by
    default: a grey image and no image token at all can differ by tens of points on a type
    whose answer the model guesses (docs/results.md), and a gain means what its baseline
    means.
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
        summary["splits"][split].update(
            talk_about(model, tokenizer, split, out_dir, print_fn, batch_size, image_size, world,
                       seed, turns, n_conversations or max(1, n // 4),
                       n_descriptions or max(1, n // 10))
        )  # fmt: skip
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
    print_fn(f"\nplots and answers in {out_dir}/ (accuracy.png, gallery_*.png, "
             "descriptions_*.png, eval.json)")  # fmt: skip
    return summary


def talk_about(model, tokenizer, split, out_dir, print_fn, batch_size, image_size, world, seed,
               turns, n_conversations, n_descriptions) -> dict:  # fmt: skip
    """What a chat needs beyond first questions, on one split: later turns, follow-ups by
    pronoun, false premises, descriptions. Printed, the description gallery saved; returns
    their eval.json entries."""
    config = world_config_from_dict(world, image_size)
    conversations = VQADataset(split, n_conversations, config, seed, turns=turns)
    items = [conversations[i] for i in range(len(conversations))]
    by_turn = evaluate_turns(model, tokenizer, items, split, batch_size)
    pairs = follow_up_items(split, n_conversations, image_size, seed, world)
    follow_ups = evaluate_turns(model, tokenizer, pairs, split, batch_size)
    premises = false_premise_items(split, n_conversations, image_size, seed, world)
    false_premises = evaluate_false_premises(model, tokenizer, premises, batch_size)
    scenes = ShapesWorld(split, n_descriptions, config, seed=seed)
    samples = [scenes[i] for i in range(len(scenes))]
    descriptions = evaluate_descriptions(model, tokenizer, samples, batch_size=batch_size)
    openers = VQADataset(split, n_descriptions, config, seed)  # the same scenes' first questions
    earlier = [openers.qa(i)[1].question for i in range(len(samples))]
    second = evaluate_descriptions(
        model, tokenizer, samples, batch_size=batch_size, earlier=earlier
    )
    print_fn("")
    print_fn(format_turns(by_turn))
    print_fn(format_follow_ups(follow_ups))
    print_fn(format_descriptions(descriptions["totals"], false_premises))
    print_fn(format_second_turn_descriptions(second["totals"]))
    plot_description_gallery(samples, descriptions["records"],
                             out_dir / f"descriptions_{split}.png")  # fmt: skip
    described = [{"index": r["index"], "description": r["description"],
                  **r["score"].to_dict()} for r in descriptions["records"]]  # fmt: skip
    return {
        "turns": by_turn.to_dict(),
        "follow_ups": follow_ups.to_dict(),
        "false_premises": false_premises,
        "descriptions": {"totals": descriptions["totals"], "records": described},
        "descriptions_second_turn": {
            "totals": second["totals"],
            "records": [
                {"index": r["index"], "description": r["description"]} for r in second["records"]
            ],
        },  # fmt: skip
    }


def split_list(text: str) -> list[str]:
    """An argparse type: comma-separated ShapesWorld splits ("test,heldout"), each one known."""
    splits = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        what = f"unknown split {', '.join(map(repr, unknown))}" if unknown else "no split given"
        raise argparse.ArgumentTypeError(
            f"{what}; choose from {', '.join(SPLITS)}, comma-separated"
        )
    return splits


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="minillava eval",
        description="VQA accuracy by question type, against a blind baseline (same model, no "
        "image), plus a bar chart and a gallery.",
    )
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="a `minillava train` run")
    parser.add_argument(
        "--split",
        type=split_list,
        default="test,heldout",
        help="comma-separated: test, heldout, val, train",
    )
    parser.add_argument("--n", type=positive_int, default=500, help="questions per split")
    parser.add_argument("--batch-size", type=positive_int, default=32)
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
    parser.add_argument("--chat-samples", type=non_negative_int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    checkpoint = require_checkpoint(args.checkpoint)  # none: `minillava` says run `make train`
    out_dir = Path(args.out_dir) if args.out_dir else checkpoint.parent / "eval"
    # Checked before the model loads: a bad folder should not wait for minutes of evaluation.
    problem = output_dir_problem(out_dir)
    if problem:
        print(f"minillava eval: --out-dir: {problem}; choose another folder", file=sys.stderr)
        return 2
    try:
        device = device_from_flag(args.device)
    except ValueError as error:  # no such device here, or a name torch does not know
        print(f"minillava eval: {error}", file=sys.stderr)
        return 2
    model, tokenizer, info = load_llava(checkpoint, device=device)
    world = (info.get("config") or {}).get("world")  # the ShapesWorld the model trained on
    clip_path = Path(args.clip_checkpoint or checkpoint.with_name("clip.pt"))
    clip_model = load_clip_for_eval(clip_path, next(model.parameters()).device)
    report(
        model,
        tokenizer,
        out_dir,
        n=args.n,
        splits=args.split,
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
