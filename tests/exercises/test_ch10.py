"""Chapter 10: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.eval, minillava.generate) agrees with solutions/ch10_eval.py.
"""

import random
import string
from collections import Counter

import pytest
import torch

from minillava import eval as library
from minillava.decoder import Decoder, DecoderConfig
from minillava.generate import generate
from solutions import ch10_eval as solution

# --- normalise_answer -----------------------------------------------------------------------


def no_lower(text):
    return " ".join(text.split()).rstrip(".!?,;:").strip()


def strip_only(text):
    return text.lower().strip().rstrip(".!?,;:")  # inner runs of spaces survive


def strips_all_punctuation(text):
    kept = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(kept.split())


def only_full_stop(text):
    return " ".join(text.lower().split()).rstrip(".").strip()


def forgets_uncovered_space(text):
    return " ".join(text.lower().split()).rstrip(".!?,;:")


def prints_instead(text):
    print(" ".join(text.lower().split()).rstrip(".!?,;:").strip())


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (no_lower, ["normalise_answer('Red') returned 'Red', expected 'red'", "lower-case"]),
        (strip_only, ["'top   left'", "collapse every run of whitespace"]),
        (strips_all_punctuation, ["'topleft'", "inside the answer"]),
        (only_full_stop, ["'no!'", ". ! ? , ; :"]),
        (forgets_uncovered_space, ["'circle '", "space it uncovers"]),
        (prints_instead, ["returned None", "return"]),
    ],
)
def test_normalise_answer_rejects(rejects, wrong, mentions):
    rejects("ch10.normalise_answer", wrong, mentions=mentions)


# --- accuracy_by_type -----------------------------------------------------------------------


def macro_average(records):
    overall, per_type, counts = solution.accuracy_by_type(records)
    return sum(per_type.values()) / len(per_type), per_type, counts


def unsorted_keys(records):
    per_type, counts = {}, {}
    for r in records:
        counts[r["type"]] = counts.get(r["type"], 0) + 1
        per_type[r["type"]] = per_type.get(r["type"], 0) + int(r["correct"])
    per_type = {t: per_type[t] / counts[t] for t in per_type}
    return sum(r["correct"] for r in records) / len(records), per_type, counts


def correct_counts_not_fractions(records):
    overall, per_type, counts = solution.accuracy_by_type(records)
    return overall, {t: round(per_type[t] * counts[t]) for t in per_type}, counts


def divides_by_zero(records):
    return sum(r["correct"] for r in records) / len(records), {}, {}


def only_two_values(records):
    overall, per_type, _ = solution.accuracy_by_type(records)
    return overall, per_type


def test_accuracy_by_type_rejects(rejects):
    rejects("ch10.accuracy_by_type", macro_average, mentions=["mean of the per-type accuracies"])
    rejects("ch10.accuracy_by_type", unsorted_keys, mentions=["sorted order"])
    rejects("ch10.accuracy_by_type", correct_counts_not_fractions, mentions=["per_type is wrong"])
    rejects("ch10.accuracy_by_type", divides_by_zero, mentions=["counts is wrong"])
    rejects("ch10.accuracy_by_type", only_two_values, mentions=["tuple of length 2"])


def test_accuracy_by_type_wants_value_error_on_empty(rejects):
    def no_guard(records):
        if not records:
            return 0.0, {}, {}
        return solution.accuracy_by_type(records)

    def zero_division(records):
        n = len(records)
        overall, per_type, counts = solution.accuracy_by_type(records) if n else (0, {}, {})
        return sum(r["correct"] for r in records) / n, per_type, counts

    rejects("ch10.accuracy_by_type", no_guard, mentions=["raise ValueError"])
    rejects("ch10.accuracy_by_type", zero_division, mentions=["ZeroDivisionError", "ValueError"])


# --- greedy_generate ------------------------------------------------------------------------


@torch.no_grad()
def no_cache_recompute(decoder, input_ids, max_new_tokens):
    ids, new = input_ids, []
    for _ in range(max_new_tokens):
        token = decoder(input_ids=ids).logits[:, -1].argmax(-1)
        new.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return torch.stack(new, 1)


@torch.no_grad()
def forgets_cache(decoder, input_ids, max_new_tokens):
    out, new = decoder(input_ids=input_ids, use_cache=True), []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        new.append(token)
        out = decoder(input_ids=token[:, None], use_cache=True)  # a fresh, empty cache
    return torch.stack(new, 1)


@torch.no_grad()
def refeeds_everything(decoder, input_ids, max_new_tokens):
    ids = input_ids
    out, new = decoder(input_ids=ids, use_cache=True), []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        new.append(token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        if len(new) < max_new_tokens:
            out = decoder(input_ids=ids, past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(new, 1)


@torch.no_grad()
def position_zero(decoder, input_ids, max_new_tokens):
    out, new = decoder(input_ids=input_ids, use_cache=True), []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        new.append(token)
        out = decoder(
            input_ids=token[:, None],
            past_key_values=out.past_key_values,
            use_cache=True,
            position_ids=torch.zeros(1, 1, dtype=torch.long),
        )
    return torch.stack(new, 1)


@torch.no_grad()
def feeds_last_prompt_token(decoder, input_ids, max_new_tokens):
    out, new = decoder(input_ids=input_ids, use_cache=True), []
    for _ in range(max_new_tokens):
        new.append(out.logits[:, -1].argmax(-1))
        out = decoder(
            input_ids=input_ids[:, -1:], past_key_values=out.past_key_values, use_cache=True
        )
    return torch.stack(new, 1)


@torch.no_grad()
def first_position_logits(decoder, input_ids, max_new_tokens):
    out, new = decoder(input_ids=input_ids, use_cache=True), []
    for _ in range(max_new_tokens):
        token = out.logits[:, 0].argmax(-1)
        new.append(token)
        out = decoder(input_ids=token[:, None], past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(new, 1)


@torch.no_grad()
def returns_list(decoder, input_ids, max_new_tokens):
    return solution.greedy_generate(decoder, input_ids, max_new_tokens).tolist()


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (no_cache_recompute, ["Your tokens are right", "past_key_values=out.past_key_values"]),
        (forgets_cache, ["without the cache", "forgotten the prompt"]),
        (refeeds_everything, ["feed only the new token"]),
        (position_zero, ["Do not pass position_ids", "cache length"]),
        (feeds_last_prompt_token, ["feed each new token back in"]),
        (first_position_logits, ["logits at the last position"]),
        (returns_list, ["returned a list, expected a torch.Tensor"]),
    ],
)
def test_greedy_generate_rejects(rejects, wrong, mentions):
    rejects("ch10.greedy_generate", wrong, mentions=mentions)


# --- majority_baseline ----------------------------------------------------------------------


def unnormalised(train_records, test_records):
    guess = {}
    for t in {r["type"] for r in train_records}:
        answers = [r["answer"] for r in train_records if r["type"] == t]
        guess[t] = Counter(answers).most_common(1)[0][0]
    out = {}
    for t in sorted({r["type"] for r in test_records}):
        rows = [r for r in test_records if r["type"] == t]
        out[t] = sum(guess.get(t) == r["answer"] for r in rows) / len(rows)
    return out


def global_majority(train_records, test_records):
    top = Counter(solution.normalise_answer(r["answer"]) for r in train_records)
    guess = top.most_common(1)[0][0]
    out = {}
    for t in sorted({r["type"] for r in test_records}):
        rows = [r for r in test_records if r["type"] == t]
        out[t] = sum(guess == solution.normalise_answer(r["answer"]) for r in rows) / len(rows)
    return out


def skips_unseen_types(train_records, test_records):
    result = solution.majority_baseline(train_records, test_records)
    seen = {r["type"] for r in train_records}
    return {t: v for t, v in result.items() if t in seen}


def unnormalised_test(train_records, test_records):
    guess = {}
    for t in {r["type"] for r in train_records}:
        answers = [solution.normalise_answer(r["answer"]) for r in train_records if r["type"] == t]
        guess[t] = Counter(answers).most_common(1)[0][0]
    out = {}
    for t in sorted({r["type"] for r in test_records}):
        rows = [r for r in test_records if r["type"] == t]
        out[t] = sum(guess.get(t) == r["answer"] for r in rows) / len(rows)
    return out


def test_majority_baseline_rejects(rejects):
    rejects("ch10.majority_baseline", unnormalised, mentions=["Normalise the training answers"])
    rejects("ch10.majority_baseline", unnormalised_test, mentions=["Normalise the test answers"])
    rejects("ch10.majority_baseline", global_majority, mentions=["of each type separately"])
    rejects("ch10.majority_baseline", skips_unseen_types, mentions=["missing ['shape']"])


# --- the library agrees with the solutions --------------------------------------------------


def test_normalise_answer_agrees_with_library():
    rng = random.Random(0)
    alphabet = "aB c.!?,;: \t\n-3"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(300)]
    for text in texts + ["  Top Left. ", "yes?!", "top-left", ""]:
        assert solution.normalise_answer(text) == library.normalise_answer(text), repr(text)


def test_accuracy_by_type_agrees_with_eval_score():
    rng = random.Random(1)
    items = [
        {"question": f"q{i}", "answer": rng.choice(["red", "2", "yes"]), "type": rng.choice("abc")}
        for i in range(40)
    ]
    predictions = {item["question"]: rng.choice(["Red.", "2", "no"]) for item in items}
    result = library.score(items, lambda batch: [predictions[i["question"]] for i in batch])
    overall, per_type, counts = solution.accuracy_by_type(result.records)
    assert overall == pytest.approx(result.accuracy)
    assert per_type == pytest.approx(result.per_type) and counts == result.counts
    assert list(per_type) == list(result.per_type)


def test_greedy_generate_agrees_with_library_generate():
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2,
                           num_kv_heads=1, intermediate_size=64, max_seq_len=64)  # fmt: skip
    decoder = Decoder(config).eval()
    input_ids = torch.randint(0, 40, (3, 6))
    expected = generate(decoder, input_ids, max_new_tokens=10, temperature=0.0, use_cache=False)
    torch.testing.assert_close(solution.greedy_generate(decoder, input_ids, 10), expected)
