"""Does the model answer "Is A left of B?", asked bare and asked to explain its answer?

Relation's pair questions ("Is the square above the cross?") compare two places looked up in
the image. `DataSizes.explain_relation_share` trains some of them with " Explain your answer."
in place of the short-answer instruction, answered with the working first: "the square is
bottom, the cross is middle, so no". This script asks a trained LLaVA the first N pair
questions of the test split both ways (greedy) and reports:

* `bare`: the short answer right, as `minillava eval` scores it;
* `working`: the explained answer starts with the true working (both places right);
* `final`: the yes/no after the model's own ", so " right, whatever its working said.

A model trained without explained questions answers the explained prompt as it learnt to
answer reasoning questions ("There are 0 crosses ... So the answer is no."): its `working` is
0 and its `final` is read from whatever follows the last ", so " (docs/results.md, session 18).

    python bench/probe_pair.py --checkpoint runs/cpu/llava.pt --n 200
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from minillava.checkpoint import load_llava  # noqa: E402
from minillava.data.instruct import VQADataset, answer_after_working, with_working  # noqa: E402
from minillava.eval import generate_answers, normalise_answer, world_config  # noqa: E402


def pair_items(dataset: VQADataset, n: int) -> list[dict]:
    """The first `n` pair questions of a relation-only `dataset`, with their working."""
    items, index = [], 0
    while len(items) < n:
        if index >= len(dataset):
            raise ValueError(f"only {len(items)} pair questions in {len(dataset)} scenes")
        _, qa = dataset.qa(index)  # the question alone: cheap, no pixels
        if qa.query["op"] == "relation":
            items.append({"index": index, "question": qa.question, "answer": qa.answer,
                          "working": qa.explanation})  # fmt: skip
        index += 1
    return items


def final_answer(text: str) -> str:
    """The yes/no an explained answer ends with: what follows its last ", so "."""
    return normalise_answer(answer_after_working(text))


def score_pairs(items: list[dict], bare: list[str], explained: list[str]) -> dict:
    """Shares of `items` answered right bare, with the right working, and right after it."""
    n = len(items)
    rows = list(zip(items, bare, explained, strict=True))
    return {
        "n": n,
        "yes_share": sum(item["answer"] == "yes" for item in items) / n,
        "bare": sum(normalise_answer(b) == item["answer"] for item, b, _ in rows) / n,
        "working": sum(e.strip().startswith(item["working"]) for item, _, e in rows) / n,
        "final": sum(final_answer(e) == item["answer"] for item, _, e in rows) / n,
    }


def ask_pairs(model, tokenizer, dataset: VQADataset, items: list[dict], batch: int = 32):
    """Greedy answers to `items`, bare and explained: two lists of strings."""
    bare, explained = [], []
    for start in range(0, len(items), batch):
        part = items[start : start + batch]
        pixels = torch.stack([dataset.world[item["index"]].pixel_values for item in part])
        questions = [item["question"] for item in part]
        bare += generate_answers(model, tokenizer, questions, pixels, max_new_tokens=4)
        explained += generate_answers(
            model, tokenizer, questions, pixels, max_new_tokens=32, explain=True
        )
    return bare, explained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/cpu/llava.pt", help="a trained llava.pt")
    parser.add_argument("--n", type=int, default=200, help="pair questions to ask")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1; got {args.n}")
    torch.set_num_threads(args.threads)

    model, tokenizer, info = load_llava(args.checkpoint, device="cpu")
    config = world_config(info["config"]["world"], model.config.vision.image_size)
    dataset = VQADataset("test", 10 * args.n, config, seed=0, types=("relation",))
    items = pair_items(dataset, args.n)
    bare, explained = ask_pairs(model, tokenizer, dataset, items)
    figures = score_pairs(items, bare, explained)
    print(f"{figures['n']} test pair questions ('yes' {figures['yes_share']:.1%}): bare "
          f"{figures['bare']:.1%}; explained: working {figures['working']:.1%}, "
          f"yes/no after it {figures['final']:.1%}")  # fmt: skip
    for item, b, e in list(zip(items, bare, explained, strict=True))[:4]:
        print(f"  {item['question']} (truth: {with_working(item['working'], item['answer'])})")
        print(f"    bare: {b!r}   explained: {e!r}")
    if args.out:
        record = {"command": "python bench/probe_pair.py " + " ".join(argv or sys.argv[1:]),
                  "checkpoint": args.checkpoint, **figures}  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
