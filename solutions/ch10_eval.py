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


@torch.no_grad()
def greedy_generate_batch(
    decoder, prompts: list[list[int]], max_new_tokens: int, eot_id: int, pad_id: int
) -> Tensor:
    """Greedy answers to prompts of different lengths in one batch, each row stopping at its
    own end token: (B, n_new) new tokens, n_new <= max_new_tokens, padding after a row's end."""
    B, T = len(prompts), max(len(p) for p in prompts)
    device = decoder.embed_tokens.weight.device
    input_ids = torch.full((B, T), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, prompt in enumerate(prompts):  # on the left: every row ends with its last real token
        input_ids[i, T - len(prompt) :] = torch.tensor(prompt, device=device)
        attention_mask[i, T - len(prompt) :] = 1
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens = []
    for step in range(max_new_tokens):
        next_token = out.logits[:, -1].argmax(dim=-1)  # (B,)
        new_tokens.append(next_token.masked_fill(finished, pad_id))  # done rows: padding
        finished |= next_token == eot_id  # the end token itself is kept
        if bool(finished.all()) or step == max_new_tokens - 1:
            break  # no call whose logits nobody would read
        # The mask covers every key, the cached ones too: one more real column per step.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        out = decoder(
            input_ids=next_token[:, None],
            attention_mask=attention_mask,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return torch.stack(new_tokens, dim=1)  # (B, n_new)


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
