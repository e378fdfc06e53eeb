"""Chapter 10 graders: inference and evaluation (exercises/ch10_eval.py).

Each check compares the learner's function with the library (minillava.eval, minillava.generate)
on fixed cases chosen to expose one mistake each, then on random inputs. The decoding check also
watches *how* the model is called, so a right answer computed without the KV cache is caught.
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from minillava import eval as ref
from minillava.decoder import Decoder, DecoderConfig
from minillava.generate import generate
from minillava.grading import assert_equal, assert_tensor, fail, grader, step

TITLE = "Inference and evaluation"
MODULE = "ch10_eval"

# ---------------------------------------------------------------------------------------------
# normalise_answer

LOWER = 'Lower-case the answer first: "Red" and "red" are the same answer.'
SPACES = (
    "Collapse every run of whitespace to one space and drop it at both ends: "
    '" ".join(text.split()) does both.'
)
TRAILING = 'Strip the punctuation . ! ? , ; : from the end of the answer: text.rstrip(".!?,;:").'
UNCOVERED = "After stripping the final punctuation, strip the space it uncovers (.strip())."
INSIDE = (
    "Keep punctuation inside the answer: strip it from the end only (rstrip), so that "
    '"top-left" stays "top-left".'
)

NORMALISE_CASES = [
    ("red", "red", None),
    ("Red", "red", LOWER),
    ("TOP LEFT", "top left", LOWER),
    ("  top   left ", "top left", SPACES),
    ("two\n", "two", SPACES),
    ("bottom\tright", "bottom right", SPACES),
    ("Yes.", "yes", TRAILING),
    ("no!", "no", TRAILING),
    ("yes?!", "yes", TRAILING),
    ("circle ;", "circle", UNCOVERED),
    ("top-left", "top-left", INSIDE),
    ("e.g. red", "e.g. red", INSIDE),
    ("3", "3", None),
]


@grader("normalise_answer", points=2)
def check_normalise_answer(normalise_answer):
    """Case, whitespace and trailing punctuation go; inner punctuation stays; as eval.py does."""
    for text, expected, hint in NORMALISE_CASES:
        assert ref.normalise_answer(text) == expected  # the cases agree with the library
        step(f"calling normalise_answer({text!r})")
        got = normalise_answer(text)
        if not isinstance(got, str):
            what = "None: is a `return` missing?" if got is None else f"a {type(got).__name__}"
            fail(f"normalise_answer({text!r}) returned {what}, expected the string {expected!r}.")
        if got != expected:
            fail(
                f"normalise_answer({text!r}) returned {got!r}, expected {expected!r}.",
                hint or "Lower-case, collapse whitespace, then strip . ! ? , ; : from the end.",
            )


# ---------------------------------------------------------------------------------------------
# accuracy_by_type

MACRO = (
    "Your overall accuracy is the mean of the per-type accuracies. Overall counts every "
    "question once: (number correct) / (number of records), so a type with many questions "
    "weighs more."
)


def _reference_scores(records: list[dict]):
    """(overall, per_type, counts) from the library's eval.score, with a replaying answerer."""
    items = [
        {"question": f"q{i}", "answer": "yes", "type": r["type"]} for i, r in enumerate(records)
    ]
    correct = {f"q{i}": bool(r["correct"]) for i, r in enumerate(records)}

    def answer_fn(batch):
        return ["yes" if correct[item["question"]] else "no" for item in batch]

    result = ref.score(items, answer_fn, batch_size=7)
    return result.accuracy, result.per_type, result.counts


def _compare_scores(got, records: list[dict], described: str) -> None:
    overall, per_type, counts = _reference_scores(records)
    if not isinstance(got, tuple | list) or len(got) != 3:
        kind = type(got).__name__
        fail(
            f"accuracy_by_type({described}) returned a {kind}"
            + (f" of length {len(got)}" if isinstance(got, tuple | list) else "")
            + ", expected a tuple (overall, per_type, counts).",
            "return overall, per_type, counts",
        )
    got_overall, got_per_type, got_counts = got
    for name, value in (("per_type", got_per_type), ("counts", got_counts)):
        if not isinstance(value, dict):
            fail(
                f"accuracy_by_type({described}): {name} is a {type(value).__name__}, "
                "expected a dict {type: value}."
            )
    if set(got_counts) != set(counts) or any(got_counts[k] != counts[k] for k in counts):
        fail(
            f"accuracy_by_type({described}): counts is wrong.\n  expected {counts}\n"
            f"  got      {got_counts}",
            "counts[type] is the number of records of that type.",
        )
    if set(got_per_type) != set(per_type) or any(
        abs(float(got_per_type[k]) - per_type[k]) > 1e-9 for k in per_type
    ):
        fail(
            f"accuracy_by_type({described}): per_type is wrong.\n  expected {per_type}\n"
            f"  got      {got_per_type}",
            "per_type[type] = (correct records of that type) / (records of that type).",
        )
    if list(got_per_type) != sorted(per_type) or list(got_counts) != sorted(counts):
        fail(
            f"accuracy_by_type({described}): the keys are in the order {list(got_per_type)}, "
            f"expected sorted order {sorted(per_type)}.",
            "Build the dicts by iterating over sorted(types).",
        )
    try:
        got_overall = float(got_overall)
    except (TypeError, ValueError):
        fail(f"accuracy_by_type({described}): overall is {got_overall!r}, expected a number.")
    if abs(got_overall - overall) > 1e-9:
        macro = sum(per_type.values()) / len(per_type)
        hint = MACRO if abs(got_overall - macro) < 1e-9 else None
        fail(
            f"accuracy_by_type({described}): overall is {got_overall:.4f}, expected "
            f"{overall:.4f} ({sum(bool(r['correct']) for r in records)} correct of "
            f"{len(records)}).",
            hint or "overall = (number of correct records) / (number of records).",
        )


@grader("accuracy_by_type", points=2)
def check_accuracy_by_type(accuracy_by_type):
    """Unbalanced types (overall is not the mean of per-type), random records, empty input."""
    records = (
        [{"type": "colour", "correct": True}] * 8
        + [{"type": "count", "correct": False}] * 2
        + [{"type": "shape", "correct": c} for c in (True, False, True, True, False)]
    )
    records = random.Random(0).sample(records, len(records))  # types interleaved
    step("scoring 8 colour (all right), 2 count (both wrong) and 5 shape (3 right) records")
    _compare_scores(accuracy_by_type(records), records, "8 colour, 2 count, 5 shape records")

    rng = random.Random(1)
    types = ["colour", "count", "position", "text", "reasoning"]
    records = [{"type": rng.choice(types), "correct": rng.random() < 0.6} for _ in range(57)]
    step("scoring 57 random records of 5 types")
    _compare_scores(accuracy_by_type(records), records, "57 random records")

    step("calling accuracy_by_type([]) (no records)")
    try:
        got = accuracy_by_type([])
    except ValueError:
        return
    except Exception as error:  # noqa: BLE001 - any other exception is the mistake to report
        fail(
            f"accuracy_by_type([]) raised {type(error).__name__}: {error}; expected ValueError.",
            'Check for an empty list first: if not records: raise ValueError("no records").',
        )
    fail(
        f"accuracy_by_type([]) returned {got!r}; expected it to raise ValueError (an accuracy "
        "over zero questions means nothing).",
        'if not records: raise ValueError("no records")',
    )


# ---------------------------------------------------------------------------------------------
# greedy_generate


class _Spy:
    """Wraps a Decoder and records every call: how many positions, cache or not, positions."""

    def __init__(self, decoder: Decoder):
        self.decoder = decoder
        self.calls: list[dict] = []

    def forward(self, *args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        length = (input_ids if input_ids is not None else embeds).shape[1]
        self.calls.append(
            {
                "length": int(length),
                "ids": input_ids.detach().clone() if input_ids is not None else None,
                "cache": kwargs.get("past_key_values", args[4] if len(args) > 4 else None)
                is not None,
                "position_ids": kwargs.get("position_ids") is not None,
            }
        )
        return self.decoder(*args, **kwargs)

    __call__ = forward

    def __getattr__(self, name):  # config, embed_tokens, ... of the real decoder
        return getattr(self.decoder, name)


def _decisive_decoder(seed: int = 0) -> Decoder:
    """A tiny random decoder with large weights: its argmax depends strongly on the context."""
    torch.manual_seed(seed)
    config = DecoderConfig(
        vocab_size=61, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
        max_seq_len=64,
    )  # fmt: skip
    decoder = Decoder(config).eval()
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.5)
    return decoder


def _explain_calls(spy: _Spy, got: torch.Tensor | None) -> str:
    """The hint for wrong tokens, read from how the decoder was called."""
    later = spy.calls[1:]
    if any(c["position_ids"] for c in spy.calls):
        return (
            "Do not pass position_ids: the decoder numbers the new token from the cache length "
            "(T, T + 1, ...). A new token placed at the wrong position gets the wrong rotation "
            "(RoPE) and the model reads it as if it came elsewhere in the sentence."
        )
    if any(not c["cache"] and c["length"] == 1 for c in later):
        return (
            "After the prefill you ran the model on the new token without the cache: it then "
            "sees one token and has forgotten the prompt. Pass "
            "past_key_values=out.past_key_values (and use_cache=True)."
        )
    if any(c["cache"] and c["length"] > 1 for c in later):
        return (
            "With the cache, feed only the new token, shape (B, 1): the cache already holds "
            "every earlier position, so feeding them again counts them twice."
        )
    if got is not None and got.dim() == 2:
        for i, call in enumerate(later):
            if call["ids"] is None or i >= got.shape[1]:
                continue
            fed = call["ids"][:, -1]
            if fed.shape == got[:, i].shape and not torch.equal(fed, got[:, i].to(fed.dtype)):
                return (
                    f"Step {i + 2} fed the model the token(s) {fed.tolist()}, but the token just "
                    f"chosen was {got[:, i].tolist()}: feed each new token back in (that is "
                    "what makes generation autoregressive)."
                )
    return (
        "The next token is the argmax of the logits at the last position: "
        "out.logits[:, -1].argmax(dim=-1), one per row."
    )


@grader("greedy_generate", points=3)
def check_greedy_generate(greedy_generate):
    """Same tokens as minillava.generate (greedy); one position per step after the prefill."""
    decoder = _decisive_decoder()
    for batch, prompt_len, n_new in ((2, 5, 6), (3, 1, 4), (1, 7, 1)):
        input_ids = torch.randint(0, decoder.config.vocab_size, (batch, prompt_len))
        expected = generate(decoder, input_ids, max_new_tokens=n_new, temperature=0.0)
        spy = _Spy(decoder)
        step(
            f"calling greedy_generate(decoder, input_ids of shape ({batch}, {prompt_len}), "
            f"max_new_tokens={n_new})"
        )
        got = greedy_generate(spy, input_ids, n_new)
        got = assert_tensor(got, "greedy_generate(...)")
        if not spy.calls:
            fail("greedy_generate never called the decoder.")
        if got.shape == expected.shape and not got.dtype.is_floating_point:
            got = got.long()
        hint = _explain_calls(spy, got) if got.shape == expected.shape else None
        assert_equal(
            got,
            expected,
            f"greedy_generate on a prompt of shape ({batch}, {prompt_len})",
            hint=hint,
            why_shape=f"one column per new token: (B, max_new_tokens) = ({batch}, {n_new})",
        )
        later = spy.calls[1:]
        if spy.calls[0]["length"] != prompt_len:
            fail(
                f"The first call ran the model on {spy.calls[0]['length']} positions; the "
                f"prefill should run the whole prompt ({prompt_len} positions) once."
            )
        slow = [c["length"] for c in later if c["length"] != 1 or not c["cache"]]
        if slow:
            fail(
                f"Your tokens are right, but after the prefill the model ran on {slow} "
                "positions per step (or without the cache): that recomputes the whole sequence "
                "every step.",
                "Pass past_key_values=out.past_key_values with only the new token, shape "
                "(B, 1): each step then costs one position instead of T + t.",
            )
        if len(spy.calls) > n_new:
            fail(
                f"For {n_new} new tokens the decoder was called {len(spy.calls)} times; one "
                f"prefill plus at most {n_new - 1} single-token steps are needed."
            )


# ---------------------------------------------------------------------------------------------
# majority_baseline


def _majority_reference(
    train_records, test_records, norm_train=True, norm_test=True, per_type=True
) -> dict[str, float]:
    """The right baseline; the flags switch off one step each, to name a learner's mistake."""
    train_norm = ref.normalise_answer if norm_train else str
    test_norm = ref.normalise_answer if norm_test else str
    by_type: dict[str, Counter] = {}
    for r in train_records:
        key = r["type"] if per_type else "all"
        by_type.setdefault(key, Counter())[train_norm(r["answer"])] += 1
    guess = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    counts, right = Counter(), Counter()
    for r in test_records:
        counts[r["type"]] += 1
        predicted = guess.get(r["type"] if per_type else "all")
        right[r["type"]] += int(predicted == test_norm(r["answer"]))
    return {t: right[t] / counts[t] for t in sorted(counts)}


NORM_TRAIN = (
    'In training, "Red", "red." and "RED" are one answer ("red", 3 times) once normalised; '
    '"blue" comes only twice. Normalise the training answers before counting.'
)
NORM_TEST = 'Normalise the test answers too before comparing: "Top Left" is "top left".'
MAJORITY_MISTAKES = [  # (the flags switched off, the hint)
    (
        {"per_type": False},
        (
            "You used one most common answer for all types. Find the most common answer of each "
            'type separately: for count questions it is "2", for colour questions "red".'
        ),
    ),
    ({"norm_train": False, "norm_test": False}, NORM_TRAIN + " " + NORM_TEST),
    ({"norm_train": False}, NORM_TRAIN),
    ({"norm_test": False}, NORM_TEST),
]


def _records(pairs):
    return [{"type": t, "answer": a, "question": f"a {t} question"} for t, a in pairs]


@grader("majority_baseline", points=2)
def check_majority_baseline(majority_baseline):
    """Per-type majority of normalised training answers, scored on test; unseen types score 0."""
    train = _records(
        [("colour", "Red"), ("colour", "red."), ("colour", "RED"), ("colour", "blue")]
        + [("colour", "blue"), ("count", "2"), ("count", "2"), ("count", "3")]
        + [("count", "3"), ("count", "2"), ("text", "A")] * 1
        + [("position", "top left")] * 3
    )
    test = _records(
        [("colour", "red"), ("colour", "blue"), ("colour", "red"), ("count", "2")]
        + [("count", "3"), ("count", "2"), ("count", "1"), ("shape", "circle")]
        + [("position", "Top Left"), ("position", "bottom right")]
    )
    expected = _majority_reference(train, test)
    step("calling majority_baseline(train, test) on 14 training and 10 test records")
    got = majority_baseline(train, test)
    if not isinstance(got, dict):
        fail(f"majority_baseline returned a {type(got).__name__}, expected a dict {{type: acc}}.")
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        fail(
            f"majority_baseline returned the types {sorted(got)}, expected {sorted(expected)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (not in the test records: {extra})" if extra else "")
            + ".",
            "One entry per type in test_records; a type never seen in training scores 0.0.",
        )
    wrong = {t: got[t] for t in expected if abs(float(got[t]) - expected[t]) > 1e-9}
    if wrong:
        hint = "Find the most common normalised answer of each type, then score it on test."
        for flags, mistake in MAJORITY_MISTAKES:
            variant = _majority_reference(train, test, **flags)
            if all(abs(float(got[t]) - variant[t]) < 1e-9 for t in variant):
                hint = mistake
                break
        fail(
            f"majority_baseline is wrong for {sorted(wrong)}.\n  expected {expected}\n"
            f"  got      {got}",
            hint,
        )
    if list(got) != sorted(got):
        fail(f"The keys are in the order {list(got)}; expected sorted order {sorted(got)}.")

    rng = random.Random(3)
    answers = {"colour": ["red", "blue", "green"], "count": ["1", "2", "3", "4"]}
    answers["existence"] = ["yes", "no"]

    def sample(n):
        pairs = []
        for _ in range(n):
            t = rng.choice(sorted(answers))
            weights = [len(answers[t]) - i for i in range(len(answers[t]))]  # skewed: a prior
            pairs.append((t, rng.choices(answers[t], weights)[0]))
        return _records(pairs)

    train, test = sample(200), sample(60)
    step("calling majority_baseline on 200 random training and 60 test records")
    got = majority_baseline(train, test)
    expected = _majority_reference(train, test)
    if not isinstance(got, dict) or set(got) != set(expected):
        fail(f"On random records majority_baseline returned {got!r}, expected {expected}.")
    if any(abs(float(got[t]) - expected[t]) > 1e-9 for t in expected):
        fail(f"On random records:\n  expected {expected}\n  got      {got}")
