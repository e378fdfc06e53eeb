"""The best a blind guess can do: answer each question with its most common answer in training.

`minillava eval`'s blind baseline is the trained model with the image taken away. It shows what
*that* model answers without looking, not what *can* be answered without looking: shown a grey
image it never saw in training, a model may do worse than the answer prior it learnt. Six runs
of the cpu preset gave relation a blind baseline of 33 to 60% (docs/results.md, session 12),
and with it a "gain" of +3 to +33 for the same 63-67% accuracy. This script computes the
other bound, with no model and no image: a table of counts.

For each question it answers what was answered most often to the same question among N
training questions (the evaluation's own generator, `VQADataset`, on the train split). A
question seen fewer than `--min-count` times is answered by its *form* instead: the question
with its colour, shape and size words masked, "Is the <colour> <shape> to the left of the
<colour> <shape>?". A blind model hears the whole question, so it could learn this table; a
model that beats it by little has learnt little from the image, whatever its blind baseline.

    python bench/answer_prior.py                      # the test split's first 2,000 questions
    python bench/answer_prior.py --eval runs/cpu      # the questions of that run's eval.json,
                                                      # next to the model and its blind baseline

With `--eval` the prior is scored on exactly the questions the run was scored on, and the table
shows, per type, the model, its blind baseline, the prior, and the model's gain over each.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare_runs, beside this script

from compare_runs import BASELINE_EXEMPT_ABOVE, eval_json_path  # noqa: E402

from minillava.data.instruct import PLURALS, VQADataset  # noqa: E402
from minillava.data.shapes import COLOURS, SHAPES, SIZES, WorldConfig  # noqa: E402
from minillava.eval import EvalResult, format_table, normalise_answer, score  # noqa: E402

# The words that name what is in a scene; masked, a question keeps only its form.
NAME_WORDS = {
    **{colour: "<colour>" for colour in COLOURS},
    **{shape: "<shape>" for shape in SHAPES},
    **{plural: "<shapes>" for plural in PLURALS.values()},
    **{size: "<size>" for size in SIZES},
}
_NAME_PATTERN = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, NAME_WORDS), key=len, reverse=True)) + r")\b"
)


def question_form(question: str) -> str:
    """The question with its colour, shape and size words masked.

    "Is the blue square to the left of the yellow circle?"
    -> "Is the <colour> <shape> to the left of the <colour> <shape>?"
    """
    return _NAME_PATTERN.sub(lambda match: NAME_WORDS[match.group(1)], question)


@dataclass
class AnswerPrior:
    """Answer counts by question and by question form, from training questions."""

    by_question: dict[str, Counter] = field(default_factory=dict)
    by_form: dict[str, Counter] = field(default_factory=dict)
    min_count: int = 30  # fewer sightings of a question than this: answer by its form

    def add(self, question: str, answer: str) -> None:
        answer = normalise_answer(answer)
        self.by_question.setdefault(question, Counter())[answer] += 1
        self.by_form.setdefault(question_form(question), Counter())[answer] += 1

    def answer(self, question: str) -> str:
        """The most common training answer to `question` (or to its form); "" if never seen."""
        counts = self.by_question.get(question)
        if counts is None or sum(counts.values()) < self.min_count:
            counts = self.by_form.get(question_form(question))
        if not counts:
            return ""
        # Ties go to the answer first seen (Counter keeps insertion order): deterministic.
        return counts.most_common(1)[0][0]


def fit_prior(
    n: int = 100_000,
    seed: int = 0,
    config: WorldConfig | None = None,
    min_count: int = 30,
    split: str = "train",
) -> AnswerPrior:
    """Count the answers to the first `n` VQA questions of `split` (no image is drawn)."""
    if n < 1:
        raise ValueError(f"n must be >= 1 training questions, got {n}")
    prior = AnswerPrior(min_count=min_count)
    dataset = VQADataset(split, n, config, seed)
    for index in range(n):
        _, qa = dataset.qa(index)
        prior.add(qa.question, qa.answer)
    return prior


def question_items(
    split: str = "test", n: int = 2000, seed: int = 0, config: WorldConfig | None = None
) -> list[dict]:
    """The first `n` questions of `split` as `minillava eval` asks them (without the images)."""
    dataset = VQADataset(split, n, config, seed)
    items = []
    for index in range(n):
        scene, qa = dataset.qa(index)
        items.append(
            {"question": qa.question, "answer": qa.answer, "type": qa.type,
             "op": qa.query["op"], "scene": scene}
        )  # fmt: skip
    return items


def score_prior(prior: AnswerPrior, items: list[dict], split: str = "test") -> EvalResult:
    """The prior's exact-match accuracy on `items`, as `minillava eval` scores a model."""
    result = score(items, lambda batch: [prior.answer(item["question"]) for item in batch], split)
    result.blind, result.blind_mode = True, "answer prior"
    return result


def items_of_eval(path: Path, split: str = "test") -> tuple[list[dict], dict]:
    """The questions a run was scored on (its eval.json records), and that split's figures."""
    evaluation = json.loads(path.read_text())
    try:
        figures = evaluation["splits"][split]
        records = figures["model"]["records"]
    except KeyError:
        splits = sorted(evaluation.get("splits", {}))
        raise ValueError(f"{path}: no model records for split {split!r}; has {splits}") from None
    keys = ("question", "answer", "type", "op")
    return [{k: record[k] for k in keys if k in record} for record in records], figures


def comparison_table(prior: EvalResult, figures: dict) -> str:
    """Per type: the model, its blind baseline, the prior, the gains over both (points).

    A type counts for the goal (>= 30 points over the blind baseline) when its baseline is at
    most 60%; the last column says whether it would count with the prior as its baseline.
    """
    model, blind = figures["model"], figures.get("blind") or {}  # {}: a run without one
    mode = blind.get("blind_mode") or "blank"
    header = ["type", "n", "model", f"blind ({mode})", "gain", "prior", "gain over prior",
              f"prior > {BASELINE_EXEMPT_ABOVE:.0%}"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    rows = [(t, prior.counts[t], model["per_type"][t], blind.get("per_type", {}).get(t),
             prior.per_type[t]) for t in prior.per_type]  # fmt: skip
    rows.append(("overall", prior.n, model["accuracy"], blind.get("accuracy"), prior.accuracy))
    for kind, count, acc, blind_acc, prior_acc in rows:
        cells = [kind, str(count), f"{acc:.1%}",
                 "" if blind_acc is None else f"{blind_acc:.1%}",
                 "" if blind_acc is None else f"{100 * (acc - blind_acc):+.1f}",
                 f"{prior_acc:.1%}", f"{100 * (acc - prior_acc):+.1f}",
                 "" if kind == "overall" else ("exempt" if prior_acc > BASELINE_EXEMPT_ABOVE
                                               else "counts")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    # The forms of a type apart: a type's gain can come from one form alone.
    model_forms = model.get("by_op", {})
    prior_forms = prior.by_op
    form_rows = [(kind, op, model_forms[kind][op], acc, n)
                 for kind, ops in prior_forms.items() for op, (acc, n) in ops.items()
                 if op in model_forms.get(kind, {})]  # fmt: skip
    if form_rows:
        lines += [
            "",
            "| type: form | n | model | prior | gain over prior |",
            "|---|---:|---:|---:|---:|",
        ]
        for kind, op, acc, prior_acc, n in form_rows:
            gain = 100 * (acc - prior_acc)
            lines.append(f"| {kind}: {op} | {n} | {acc:.1%} | {prior_acc:.1%} | {gain:+.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=100_000, help="training questions counted")
    parser.add_argument("--min-count", type=int, default=30, help="else answer by the form")
    parser.add_argument("--split", default="test", help="test | heldout | val")
    parser.add_argument("--n", type=int, default=2000, help="questions scored (without --eval)")
    parser.add_argument("--seed", type=int, default=0, help="the evaluation's seed")
    parser.add_argument(
        "--eval", default=None, help="a run dir, eval dir or eval.json: score its questions"
    )
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    prior = fit_prior(args.train, min_count=args.min_count)
    print(
        f"answer prior: {args.train:,} training questions, {len(prior.by_question):,} distinct, "
        f"{len(prior.by_form):,} forms ({time.perf_counter() - start:.1f} s)"
    )
    figures = None
    if args.eval:
        path = eval_json_path(args.eval)
        items, figures = items_of_eval(path, args.split)
        print(f"questions: the {len(items):,} of {path} (split {args.split!r})")
    else:
        items = question_items(args.split, args.n, args.seed)
    result = score_prior(prior, items, args.split)
    print(format_table(result))
    if figures is not None:
        print()
        print(comparison_table(result, figures))
    if args.out:
        record = {
            "command": "python bench/answer_prior.py " + " ".join(argv or sys.argv[1:]),
            "prior": {k: v for k, v in result.to_dict().items() if k != "records"},
        }
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
