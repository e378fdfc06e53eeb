"""Chapter 10, Inference and evaluation: reference solutions. Same names and signatures as
exercises/ch10_eval.py.

The library versions live in minillava/eval.py (normalise_answer, score) and
minillava/generate.py (generate, which adds sampling, stop tokens and left padding).
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

END_PUNCTUATION = ".!?,;:"


def normalise_answer(text: str) -> str:
    """Lower-case, collapse whitespace, strip trailing punctuation: "  Top Left. " -> "top left"."""
    text = " ".join(text.lower().split())
    return text.rstrip(END_PUNCTUATION).strip()


def accuracy_by_type(records: list[dict]) -> tuple[float, dict[str, float], dict[str, int]]:
    """(overall accuracy, {type: accuracy}, {type: count}) of records with "type" and "correct"."""
    if not records:
        raise ValueError("accuracy_by_type: no records to score")
    counts: Counter[str] = Counter()
    right: Counter[str] = Counter()
    for record in records:
        counts[record["type"]] += 1
        right[record["type"]] += int(bool(record["correct"]))
    types = sorted(counts)
    per_type = {t: right[t] / counts[t] for t in types}
    overall = sum(right.values()) / len(records)  # every question weighs the same
    return overall, per_type, {t: counts[t] for t in types}


@torch.no_grad()
def greedy_generate(decoder, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding with the KV cache: input_ids (B, T) -> new tokens (B, max_new_tokens)."""
    out = decoder(input_ids=input_ids, use_cache=True)  # prefill: the whole prompt, once
    new_tokens = []
    for step in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(dim=-1)  # (B,)
        new_tokens.append(next_token)
        if step == max_new_tokens - 1:
            break
        # One new position; the cache holds the keys and values of all the earlier ones.
        out = decoder(
            input_ids=next_token[:, None], past_key_values=out.past_key_values, use_cache=True
        )
    if not new_tokens:
        return input_ids.new_empty(input_ids.shape[0], 0)
    return torch.stack(new_tokens, dim=1)  # (B, max_new_tokens)


def majority_baseline(train_records: list[dict], test_records: list[dict]) -> dict[str, float]:
    """Per-type accuracy on test of always answering the type's most common training answer."""
    by_type: dict[str, Counter[str]] = {}
    for record in train_records:
        by_type.setdefault(record["type"], Counter())[normalise_answer(record["answer"])] += 1
    guess = {t: answers.most_common(1)[0][0] for t, answers in by_type.items()}
    counts: Counter[str] = Counter()
    right: Counter[str] = Counter()
    for record in test_records:
        t = record["type"]
        counts[t] += 1
        right[t] += int(guess.get(t) == normalise_answer(record["answer"]))
    return {t: right[t] / counts[t] for t in sorted(counts)}
