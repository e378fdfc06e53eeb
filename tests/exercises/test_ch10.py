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
    "wrong, mentions, hint_mentions",
    [
        (
            no_lower,
            ["normalise_answer('Red') returned 'Red', expected 'red'", "lower-case"],
            ["before the other two rules"],
        ),
        (strip_only, ["'top   left'", "collapse every run of whitespace"], ["joining the words"]),
        (strips_all_punctuation, ["'topleft'", "inside the answer"], ["right end"]),
        (only_full_stop, ["'no!'", ". ! ? , ; :"], ["whole set of characters"]),
        (forgets_uncovered_space, ["'circle '", "space it uncovers"], ["once more"]),
        (prints_instead, ["returned None", "return"], ["printing it is not returning"]),
    ],
)
def test_normalise_answer_rejects(rejects, wrong, mentions, hint_mentions):
    rejects("ch10.normalise_answer", wrong, mentions=mentions, hint_mentions=hint_mentions)


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
    rejects(
        "ch10.accuracy_by_type",
        macro_average,
        mentions=["mean of the per-type accuracies"],
        hint_mentions=["all types together"],
    )
    rejects("ch10.accuracy_by_type", unsorted_keys, mentions=["sorted order"])
    rejects(
        "ch10.accuracy_by_type",
        correct_counts_not_fractions,
        mentions=["per_type is wrong", "numbers of correct records, not fractions"],
    )
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

    rejects(
        "ch10.accuracy_by_type",
        no_guard,
        mentions=["raise ValueError"],
        hint_mentions=["empty list"],
    )
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
    "wrong, mentions, hint_mentions",
    [
        (
            no_cache_recompute,
            ["Your tokens are right", "recomputes the whole sequence"],
            ["hand the cache"],
        ),
        (forgets_cache, ["without the cache", "forgotten the prompt"], ["hand it back"]),
        (refeeds_everything, ["more than the new token", "counts them twice"], ["only the token"]),
        (position_zero, ["passed position ids", "cache length"], ["leave the positions"]),
        (feeds_last_prompt_token, ["must be fed back in"], ["chose at the step before"]),
        (first_position_logits, ["first position", "logits at the last position"], ["largest"]),
        (returns_list, ["returned a list, expected a torch.Tensor"], ["one column per step"]),
    ],
)
def test_greedy_generate_rejects(rejects, wrong, mentions, hint_mentions):
    rejects("ch10.greedy_generate", wrong, mentions=mentions, hint_mentions=hint_mentions)


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
    rejects(
        "ch10.majority_baseline",
        unnormalised,
        mentions=["training answers without normalising"],
        hint_mentions=["normalise every answer"],
    )
    rejects(
        "ch10.majority_baseline",
        unnormalised_test,
        mentions=["test answers without normalising"],
    )
    rejects(
        "ch10.majority_baseline",
        global_majority,
        mentions=["one most common answer for all types"],
        hint_mentions=["group the training answers by type", "on its own"],
    )
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


# --- greedy_generate_batch (stretch) --------------------------------------------------------


def _padded(prompts, pad_id, left=True):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        where = slice(T - len(prompt), T) if left else slice(0, len(prompt))
        ids[i, where] = torch.tensor(prompt)
        mask[i, where] = 1
    return ids, mask


@torch.no_grad()
def _batch_loop(decoder, prompts, n, eot_id, pad_id, left=True, step_mask=True, prefill_mask=True,
                keep_eot=True, pad_finished=True, stop_on_first=False, end_early=True):  # fmt: skip
    """The solution's loop, with one step switched off or done wrong by each flag."""
    ids, mask = _padded(prompts, pad_id, left)
    out = decoder(input_ids=ids, attention_mask=mask if prefill_mask else None, use_cache=True)
    finished, new = torch.zeros(len(prompts), dtype=torch.bool), []
    for step in range(n):
        token = out.logits[:, -1].argmax(-1)
        done_now = finished | (token == eot_id) if not keep_eot else finished
        new.append(token.masked_fill(done_now, pad_id) if pad_finished else token)
        finished |= token == eot_id
        if step == n - 1 or (end_early and bool(finished.all())):
            break
        if stop_on_first and bool(finished.any()):
            break
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
        out = decoder(
            input_ids=token[:, None],
            attention_mask=mask if step_mask and prefill_mask else None,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return torch.stack(new, 1)


def right_padded(decoder, prompts, n, eot_id, pad_id):
    return _batch_loop(decoder, prompts, n, eot_id, pad_id, left=False)


def no_mask(decoder, prompts, n, eot_id, pad_id):
    return _batch_loop(decoder, prompts, n, eot_id, pad_id, prefill_mask=False)


def mask_in_prefill_only(decoder, prompts, n, eot_id, pad_id):
    return _batch_loop(decoder, prompts, n, eot_id, pad_id, step_mask=False)


def drops_eot(decoder, prompts, n, eot_id, pad_id):
    return _batch_loop(decoder, prompts, n, eot_id, pad_id, keep_eot=False)


def never_pads(decoder, prompts, n, eot_id, pad_id):
    return _batch_loop(decoder, prompts, n, eot_id, pad_id, pad_finished=False)


def stops_at_first_eot(decoder, prompts, n, eot_id, pad_id):
    return _batch_loop(decoder, prompts, n, eot_id, pad_id, stop_on_first=True)


def never_ends_early(decoder, prompts, n, eot_id, pad_id):
    return _batch_loop(decoder, prompts, n, eot_id, pad_id, end_early=False)


def trims_after_the_fact(decoder, prompts, n, eot_id, pad_id):
    tokens = _batch_loop(decoder, prompts, n, eot_id, pad_id, end_early=False)
    while tokens.shape[1] > 1 and bool((tokens[:, -1] == pad_id).all()):
        tokens = tokens[:, :-1]  # right tokens, but the model ran every step
    return tokens


@torch.no_grad()
def mask_not_grown(decoder, prompts, n, eot_id, pad_id):
    ids, mask = _padded(prompts, pad_id)
    out, new = decoder(input_ids=ids, attention_mask=mask, use_cache=True), []
    for _ in range(n):
        new.append(out.logits[:, -1].argmax(-1))
        out = decoder(input_ids=new[-1][:, None], attention_mask=mask,
                      past_key_values=out.past_key_values, use_cache=True)  # fmt: skip
    return torch.stack(new, 1)


def one_prompt_at_a_time(decoder, prompts, n, eot_id, pad_id):
    rows = [solution.greedy_generate_batch(decoder, [p], n, eot_id, pad_id)[0] for p in prompts]
    width = max(len(r) for r in rows)
    return torch.stack([torch.cat([r, torch.full((width - len(r),), pad_id)]) for r in rows])


@pytest.mark.parametrize(
    "wrong, mentions, hint_mentions",
    [
        (right_padded, ["padded on the right", "last position"], ["before each shorter prompt"]),
        (no_mask, ["no attention mask", "padding was read"], ["mask of ones"]),
        (mask_in_prefill_only, ["after the prefill ran without the attention mask"], ["grown"]),
        (drops_eot, ["end token is missing", "keeps it"], ["step after the end token"]),
        (never_pads, ["went on writing tokens", "padding token"], ["flag per row"]),
        (
            stops_at_first_eot,
            ["stopped the whole batch when the first row finished"],
            ["every row"],
        ),
        (never_ends_early, ["went on after every row had finished"], ["stop there"]),
        (trims_after_the_fact, ["Your tokens are right", "nobody read"], ["before calling"]),
        (mask_not_grown, ["Your code raised", "attention_mask has shape"], []),
        (one_prompt_at_a_time, ["Your tokens are right", "one batch"], ["one prefill call"]),
    ],
)
def test_greedy_generate_batch_rejects(rejects, wrong, mentions, hint_mentions):
    rejects("ch10.greedy_generate_batch", wrong, mentions=mentions, hint_mentions=hint_mentions)


def test_greedy_generate_batch_agrees_with_library_generate():
    torch.manual_seed(0)
    config = DecoderConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2,
                           num_kv_heads=1, intermediate_size=64, max_seq_len=64)  # fmt: skip
    decoder = Decoder(config).eval()
    prompts = [torch.randint(1, 40, (n,)).tolist() for n in (6, 2, 9, 4)]
    ids, mask = _padded(prompts, 0)
    free = generate(decoder, ids, attention_mask=mask, max_new_tokens=12, temperature=0.0)
    eot_id = int(free[0, 3])  # row 0 stops at its 4th token at the latest
    expected = generate(decoder, ids, attention_mask=mask, max_new_tokens=12, temperature=0.0,
                        stop_token_ids=(eot_id,), pad_token_id=0)  # fmt: skip
    got = solution.greedy_generate_batch(decoder, prompts, 12, eot_id, 0)
    torch.testing.assert_close(got, expected)
    for i, prompt in enumerate(prompts):  # each row as the prompt would get it alone
        alone = generate(decoder, torch.tensor([prompt]), max_new_tokens=12, temperature=0.0,
                         stop_token_ids=(eot_id,), pad_token_id=0)[0]  # fmt: skip
        torch.testing.assert_close(got[i, : len(alone)], alone)
        assert bool((got[i, len(alone) :] == 0).all())
