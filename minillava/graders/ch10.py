"""Chapter 10 graders: inference and evaluation (exercises/ch10_eval.py).

Each check compares the learner's function with the library (minillava.eval, minillava.generate)
on fixed cases chosen to expose one mistake each, then on random inputs. The decoding check also
watches *how* the model is called, so a right answer computed without the KV cache is caught.
A failure says what is wrong (and, where the check recognises the mistake, why); the hint,
shown on request, says where to look next, in words.
"""

from __future__ import annotations

import random
from collections import Counter

import torch

from minillava import eval as ref
from minillava.decoder import Decoder, DecoderConfig
from minillava.generate import generate
from minillava.grading import assert_equal, assert_tensor, diagnose, fail, grader, step

TITLE = "Inference and evaluation"
MODULE = "ch10_eval"

# ---------------------------------------------------------------------------------------------
# normalise_answer

# What each case tests (said in the message when it fails), and where to look (its hint).
RULE_HINTS = {
    "lower": (
        'This case tests rule 1: lower-case the answer first, so that "Red" and "red" are the '
        "same answer.",
        "Lower-case the whole answer before the other two rules.",
    ),
    "spaces": (
        "This case tests rule 2: collapse every run of whitespace (spaces, tabs, newlines) to "
        "one space and drop the whitespace at both ends.",
        "Cutting the text into words at any whitespace, then joining the words with single "
        "spaces, does both at once.",
    ),
    "trailing": (
        "This case tests rule 3: strip the punctuation . ! ? , ; : from the end of the answer, "
        "several marks in a row too.",
        "Strip a whole set of characters from the right end, not a single one.",
    ),
    "uncovered": (
        "This case tests the end of rule 3: after the final punctuation goes, the space it "
        "uncovers goes too.",
        "Strip whitespace once more after stripping the punctuation.",
    ),
    "inside": (
        "This case tests that punctuation inside the answer is kept: only the end is "
        'stripped, so "top-left" stays "top-left".',
        "Remove punctuation from the right end of the text only, not everywhere in it.",
    ),
    None: (
        "",
        "Three rules, in order: lower-case, collapse whitespace, then strip the punctuation "
        "marks . ! ? , ; : from the end.",
    ),
}

NORMALISE_CASES = [
    ("red", "red", None),
    ("Red", "red", "lower"),
    ("TOP LEFT", "top left", "lower"),
    ("  top   left ", "top left", "spaces"),
    ("two\n", "two", "spaces"),
    ("bottom\tright", "bottom right", "spaces"),
    ("Yes.", "yes", "trailing"),
    ("no!", "no", "trailing"),
    ("yes?!", "yes", "trailing"),
    ("circle ;", "circle", "uncovered"),
    ("top-left", "top-left", "inside"),
    ("e.g. red", "e.g. red", "inside"),
    ("3", "3", None),
]


@grader("normalise_answer", points=2)
def check_normalise_answer(normalise_answer):
    """Case, whitespace and trailing punctuation go; inner punctuation stays; as eval.py does."""
    for text, expected, rule in NORMALISE_CASES:
        assert ref.normalise_answer(text) == expected  # the cases agree with the library
        step(f"calling normalise_answer({text!r})")
        got = normalise_answer(text)
        if not isinstance(got, str):
            what = "None (is a return statement missing?)" if got is None else "a "
            what += "" if got is None else type(got).__name__
            fail(
                f"normalise_answer({text!r}) returned {what}; expected the string {expected!r}.",
                "Return the normalised text, a string; printing it is not returning it.",
            )
        if got != expected:
            tests, hint = RULE_HINTS[rule]
            message = f"normalise_answer({text!r}) returned {got!r}, expected {expected!r}."
            fail(message + (f"\n{tests}" if tests else ""), hint)


# ---------------------------------------------------------------------------------------------
# accuracy_by_type

MACRO = (
    "Your overall accuracy is the mean of the per-type accuracies: that weighs a type of 2 "
    "questions as much as one of 8. Overall counts every question once, so a type with many "
    "questions weighs more."
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
            "Return three things, in this order: the overall accuracy, the dict of accuracies "
            "per type, the dict of counts per type.",
        )
    got_overall, got_per_type, got_counts = got
    for name, value in (("per_type", got_per_type), ("counts", got_counts)):
        if not isinstance(value, dict):
            fail(
                f"accuracy_by_type({described}): {name} is a {type(value).__name__}, "
                "expected a dict {type: value}.",
                "Both per_type and counts map each type (a string) to its number.",
            )
    if set(got_counts) != set(counts) or any(got_counts[k] != counts[k] for k in counts):
        fail(
            f"accuracy_by_type({described}): counts is wrong.\n  expected {counts}\n"
            f"  got      {got_counts}",
            "A type's count is how many records have that type, whether they are right or wrong.",
        )
    if set(got_per_type) != set(per_type) or any(
        abs(float(got_per_type[k]) - per_type[k]) > 1e-9 for k in per_type
    ):
        right = {k: round(per_type[k] * counts[k]) for k in per_type}
        diagnosis = ""
        if set(got_per_type) == set(right) and all(got_per_type[k] == right[k] for k in right):
            diagnosis = (
                "\nYour per-type values are numbers of correct records, not fractions: an "
                "accuracy is between 0 and 1."
            )
        fail(
            f"accuracy_by_type({described}): per_type is wrong.\n  expected {per_type}\n"
            f"  got      {got_per_type}" + diagnosis,
            "A type's accuracy is the share of that type's records that are correct: its "
            "right records divided by its records.",
        )
    if list(got_per_type) != sorted(per_type) or list(got_counts) != sorted(counts):
        fail(
            f"accuracy_by_type({described}): the keys are in the order {list(got_per_type)}, "
            f"expected sorted order {sorted(per_type)}.",
            "A dict keeps its keys in the order they were inserted: insert the types in "
            "sorted order.",
        )
    try:
        got_overall = float(got_overall)
    except (TypeError, ValueError):
        fail(
            f"accuracy_by_type({described}): overall is {got_overall!r}, expected a number.",
            "Overall is one number, a fraction between 0 and 1.",
        )
    if abs(got_overall - overall) > 1e-9:
        macro = sum(per_type.values()) / len(per_type)
        diagnosis = f"\n{MACRO}" if abs(got_overall - macro) < 1e-9 else ""
        fail(
            f"accuracy_by_type({described}): overall is {got_overall:.4f}, expected "
            f"{overall:.4f} ({sum(bool(r['correct']) for r in records)} correct of "
            f"{len(records)})." + diagnosis,
            "Count the correct records over all types together, and divide by the number of "
            "records.",
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
            "Check for an empty list before computing anything, and raise a ValueError there "
            "yourself, with a message that says why.",
        )
    fail(
        f"accuracy_by_type([]) returned {got!r}; expected it to raise ValueError (an accuracy "
        "over zero questions means nothing).",
        "Check for an empty list before computing anything, and raise a ValueError there.",
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
        shown = input_ids if input_ids is not None else embeds
        mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        self.calls.append(
            {
                "length": int(shown.shape[1]),
                "batch": int(shown.shape[0]),
                "ids": input_ids.detach().clone() if input_ids is not None else None,
                "cache": kwargs.get("past_key_values", args[4] if len(args) > 4 else None)
                is not None,
                "position_ids": kwargs.get("position_ids", args[3] if len(args) > 3 else None)
                is not None,
                "mask": mask.detach().clone() if isinstance(mask, torch.Tensor) else None,
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


ARGMAX_HINT = (
    "Each new token is the most likely one at the last position of what the model just read: "
    "the largest logit over the vocabulary, one per row."
)


def _explain_calls(spy: _Spy, got: torch.Tensor | None) -> tuple[str | None, str]:
    """(diagnosis, hint) for wrong tokens, read from how the decoder was called."""
    later = spy.calls[1:]
    if any(c["position_ids"] for c in spy.calls):
        return (
            "You passed position ids: the decoder numbers each new token itself from the cache "
            "length (T, T + 1, ...). A new token placed at the wrong position gets the wrong "
            "rotation (RoPE), and the model reads it as if it came elsewhere in the sentence.",
            "Leave the positions to the decoder: hand it the new token and the cache, nothing "
            "about where the token sits.",
        )
    if any(not c["cache"] and c["length"] == 1 for c in later):
        return (
            "After the prefill you ran the model on the new token without the cache: it then "
            "sees one token and has forgotten the prompt.",
            "Each call returns the cache; hand it back into the next call, and ask the model to "
            "keep using it.",
        )
    if any(c["cache"] and c["length"] > 1 for c in later):
        return (
            "You fed the model more than the new token while passing the cache: the cache "
            "already holds every earlier position, so feeding them again counts them twice.",
            "With the cache, each step feeds only the token just chosen, shape (B, 1).",
        )
    if got is not None and got.dim() == 2:
        for i, call in enumerate(later):
            if call["ids"] is None or i >= got.shape[1]:
                continue
            fed = call["ids"][:, -1]
            if fed.shape == got[:, i].shape and not torch.equal(fed, got[:, i].to(fed.dtype)):
                return (
                    f"Step {i + 2} fed the model the token(s) {fed.tolist()}, but the token just "
                    f"chosen was {got[:, i].tolist()}: each new token must be fed back in (that "
                    "is what makes generation autoregressive).",
                    "What goes into the model at each step is the token it chose at the step "
                    "before.",
                )
    return None, ARGMAX_HINT


@torch.no_grad()
def _first_position_tokens(decoder, input_ids: torch.Tensor, n_new: int) -> torch.Tensor:
    """What a loop that reads the logits of the first position instead of the last returns."""
    out, new = decoder(input_ids=input_ids, use_cache=True), []
    for _ in range(n_new):
        new.append(out.logits[:, 0].argmax(-1))
        out = decoder(input_ids=new[-1][:, None], past_key_values=out.past_key_values,
                      use_cache=True)  # fmt: skip
    return torch.stack(new, 1)


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
        got = assert_tensor(
            got,
            "greedy_generate(...)",
            hint="Stack the new tokens into one tensor: one row per prompt, one column per step.",
        )
        if not spy.calls:
            fail(
                "greedy_generate never called the decoder.",
                "Run the whole prompt through the decoder once first, then one token per step.",
            )
        if got.shape == expected.shape and not got.dtype.is_floating_point:
            got = got.long()
        diagnosis, hint = (
            _explain_calls(spy, got)
            if got.shape == expected.shape
            else (None, "Return the new tokens only: one row per prompt, one column per step.")
        )
        if diagnosis is None and prompt_len > 1:
            diagnosis = diagnose(
                got,
                {
                    "It looks like you took each next token from the logits of the first "
                    "position; the prediction of what follows the sequence is in the logits at "
                    "the last position.": _first_position_tokens(decoder, input_ids, n_new),
                },
            )
        assert_equal(
            got,
            expected,
            f"greedy_generate on a prompt of shape ({batch}, {prompt_len})",
            hint=hint or ARGMAX_HINT,
            diagnosis=diagnosis,
            why_shape=f"one column per new token: (B, max_new_tokens) = ({batch}, {n_new})",
        )
        later = spy.calls[1:]
        if spy.calls[0]["length"] != prompt_len:
            fail(
                f"The first call ran the model on {spy.calls[0]['length']} positions; the "
                f"prefill should run the whole prompt ({prompt_len} positions) once.",
                "The first call reads the whole prompt and fills the cache; only the calls "
                "after it take one token.",
            )
        slow = [c["length"] for c in later if c["length"] != 1 or not c["cache"]]
        if slow:
            fail(
                f"Your tokens are right, but after the prefill the model ran on {slow} "
                "positions per step (or without the cache): that recomputes the whole sequence "
                "every step.",
                "Hand the cache from each call to the next and feed only the new token, shape "
                "(B, 1): each step then costs one position instead of T + t.",
            )
        if len(spy.calls) > n_new:
            fail(
                f"For {n_new} new tokens the decoder was called {len(spy.calls)} times; one "
                f"prefill plus at most {n_new - 1} single-token steps are needed.",
                "The prefill's logits already give the first new token; the call after the last "
                "token is one too many (nothing would read its logits).",
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
    'You counted the training answers without normalising them: "Red", "red." and "RED" '
    'are one answer ("red", 3 times) once normalised, and "blue" comes only twice.'
)
NORM_TEST = 'You compared with the test answers without normalising them: "Top Left" is "top left".'
NORM_HINT = "Normalise every answer, training and test, with your normalise_answer."
MAJORITY_HINT = (
    "Normalise every answer, training and test, with your normalise_answer; group the training "
    "answers by type and find the most common of each group; then score that guess on each "
    "test question of the type."
)
MAJORITY_MISTAKES = [  # (the flags switched off, the diagnosis, the hint)
    (
        {"per_type": False},
        (
            "You used one most common answer for all types, where each type has its own: for "
            'count questions it is "2", for colour questions "red".'
        ),
        "Group the training answers by type, and find the most common answer of each group "
        "on its own.",
    ),
    ({"norm_train": False, "norm_test": False}, NORM_TRAIN + " " + NORM_TEST, NORM_HINT),
    ({"norm_train": False}, NORM_TRAIN, NORM_HINT),
    ({"norm_test": False}, NORM_TEST, NORM_HINT),
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
        fail(
            f"majority_baseline returned a {type(got).__name__}, expected a dict {{type: acc}}.",
            "Return a dict mapping each test type to its accuracy, a number between 0 and 1.",
        )
    if set(got) != set(expected):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        fail(
            f"majority_baseline returned the types {sorted(got)}, expected {sorted(expected)}"
            + (f" (missing {missing})" if missing else "")
            + (f" (not in the test records: {extra})" if extra else "")
            + ".",
            "One entry per type in the test records, and only those; a type never seen in "
            "training has no guess, and scores 0.0.",
        )
    wrong = {t: got[t] for t in expected if abs(float(got[t]) - expected[t]) > 1e-9}
    if wrong:
        diagnosis, hint = "", MAJORITY_HINT
        for flags, mistake, mistake_hint in MAJORITY_MISTAKES:
            variant = _majority_reference(train, test, **flags)
            if all(abs(float(got[t]) - variant[t]) < 1e-9 for t in variant):
                diagnosis, hint = f"\n{mistake}", mistake_hint
                break
        fail(
            f"majority_baseline is wrong for {sorted(wrong)}.\n  expected {expected}\n"
            f"  got      {got}" + diagnosis,
            hint,
        )
    if list(got) != sorted(got):
        fail(
            f"The keys are in the order {list(got)}; expected sorted order {sorted(got)}.",
            "A dict keeps its keys in the order they were inserted: insert the types in "
            "sorted order.",
        )

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
        fail(
            f"On random records majority_baseline returned {got!r}, expected {expected}.",
            "One entry per type present in the test records.",
        )
    if any(abs(float(got[t]) - expected[t]) > 1e-9 for t in expected):
        fail(
            f"On random records:\n  expected {expected}\n  got      {got}",
            "Here the answers are already normalised and the counts are skewed: check which "
            "answer wins a tie (the one seen first in training) and that each type is counted "
            "on its own.",
        )


# ---------------------------------------------------------------------------------------------
# greedy_generate_batch (stretch)


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, T): the prompts padded on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, T - len(prompt) :] = torch.tensor(prompt)
        mask[i, T - len(prompt) :] = 1
    return ids, mask


def _stop_case(decoder: Decoder, lengths, n_new: int, every_row_stops: bool, seed: int):
    """Prompts and an end token that make the rows stop where the case needs them to.

    every_row_stops: each row writes the end token before the last step, not all at the same
    step (the loop must end early, the result is shorter than n_new). Otherwise at least two
    rows stop at different steps and one never does (the finished rows must be padded until the
    last step). Returns (prompts, eot_id, pad_id, tokens without stopping (B, n_new)).
    """
    rng = torch.Generator().manual_seed(seed)
    vocab = decoder.config.vocab_size
    for _ in range(200):
        prompts = [torch.randint(0, vocab, (n,), generator=rng).tolist() for n in lengths]
        ids, mask = _left_padded(prompts, 0)
        free = generate(decoder, ids, attention_mask=mask, max_new_tokens=n_new, temperature=0.0)
        rows, seen = free.tolist(), set(free.flatten().tolist())
        unused = [t for t in range(vocab) if t not in seen]
        for token in sorted(seen):
            first = [row.index(token) if token in row else None for row in rows]
            early = [c for c in first if c is not None and c < n_new - 1]
            if every_row_stops:
                fits = len(early) == len(rows) and len(set(early)) > 1
            else:
                fits = len(rows) == 1 or (None in first and len(set(early)) > 1)
                fits = fits and len(early) >= 1 and (len(rows) > 1 or early[0] > 0)
            if fits and unused:
                return prompts, token, unused[0], free
    raise AssertionError("no prompts found for this case: the grader needs a new seed")


def _explain_batch_calls(spy: _Spy, prompts, padded_mask: torch.Tensor) -> tuple[str, str] | None:
    """(diagnosis, hint) read from how the decoder was called, or None."""
    first, later = spy.calls[0], spy.calls[1:]
    ragged = len({len(p) for p in prompts}) > 1
    if any(c["position_ids"] for c in spy.calls):
        return (
            "You passed position ids: the decoder numbers the positions itself, from the "
            "attention mask (a left-padded prompt starts at 0 at its first real token) and the "
            "cache length. Positions of your own put some tokens where they are not.",
            "Give the decoder the mask and the cache, and let it number the positions.",
        )
    if first["ids"] is not None and first["ids"].shape == padded_mask.shape:
        for i, prompt in enumerate(prompts):
            row, n = first["ids"][i].tolist(), len(prompt)
            if n < len(row) and row[:n] == prompt and row[-n:] != prompt:
                return (
                    f"Prompt {i} ({n} tokens) was padded on the right: the last position of "
                    "its row is then padding, and the logits there do not predict the prompt's "
                    "next token. The new tokens also land after the padding, at a different "
                    "place in each row.",
                    "Put the padding before each shorter prompt, so that every row ends with "
                    "its own last token.",
                )
    if ragged and first["mask"] is None:
        return (
            "The prefill had no attention mask: the padding was read as if it were part of the "
            "shorter prompts (and counted in their positions), so their answers change.",
            "Build a mask of ones on the real tokens and zeros on the padding, and pass it "
            "with the prompts.",
        )
    if first["mask"] is not None and first["mask"].shape == padded_mask.shape:
        if not torch.equal(first["mask"].long(), padded_mask):
            return (
                "The prefill's attention mask is not 1 on every real token and 0 on every "
                "padding token, so some padding is read or some real tokens are ignored.",
                "The mask has the padded batch's shape: zero exactly where you put padding, "
                "one on every prompt token.",
            )
    if ragged and any(c["mask"] is None for c in later):
        return (
            "The steps after the prefill ran without the attention mask: the new token then "
            "looks at the cached padding of the shorter prompts, and its position is counted "
            "from the padded length, so their answers drift.",
            "Pass the mask at every step, grown by a column of ones for the new tokens: it "
            "covers the cached keys as well as the new one.",
        )
    if any(not c["cache"] and c["length"] == 1 for c in later):
        return (
            "After the prefill you ran the model on the new tokens without the cache: it then "
            "sees one token and has forgotten the prompts.",
            "Each call returns the cache; hand it back into the next call.",
        )
    if any(c["cache"] and c["length"] > 1 for c in later):
        return (
            "You fed the model more than the new tokens while passing the cache: the cache "
            "already holds every earlier position, so feeding them again counts them twice.",
            "With the cache, each step feeds only the tokens just chosen, shape (B, 1).",
        )
    return None


def _stop_mistakes(expected, free, eot_id, pad_id, n_new) -> list[tuple[dict, str]]:
    """The likely stopping mistakes: ({diagnosis: what the mistake returns}, hint) each."""
    B, n = expected.shape
    stops = [(row == eot_id).nonzero().flatten() for row in expected]
    first_stop = min(int(c[0]) for c in stops if len(c))
    dropped = expected.masked_fill(expected == eot_id, pad_id)
    padded_to_max = torch.cat([expected, torch.full((B, n_new - n), pad_id)], dim=1)
    flag = (
        "Keep a flag per row, set when the row writes the end token; from the next step on, a "
        "flagged row's new token is replaced by the padding token."
    )
    return [
        (
            {
                "The end token is missing: a row that writes it keeps it, as its last token, "
                "and only the steps after it are padding.": dropped,
            },
            "Record each step's tokens before you replace anything: the padding starts at the "
            "step after the end token.",
        ),
        (
            {
                "A row that has finished went on writing tokens: after its end token, each row "
                "gets the padding token until the batch stops.": free[:, :n],
            },
            flag,
        ),
        (
            {
                "A row that has finished went on writing tokens, and the loop did not end when "
                "every row had finished.": free,
            },
            flag,
        ),
        (
            {
                f"Your loop stopped the whole batch when the first row finished (after step "
                f"{first_stop + 1}): the other rows had not written their end token yet.": expected[
                    :, : first_stop + 1
                ],
            },
            "Stop when every row has finished, not when one has.",
        ),
        (
            {
                "The loop went on after every row had finished, adding columns of padding: it "
                "should stop there, so the result can be shorter than max_new_tokens.": (
                    padded_to_max
                ),
            },
            "After each step, check whether every row has finished, and stop there.",
        ),
    ]


BATCH_HINT = (
    "Pad the prompts on the left to the longest, with a mask of ones on the real tokens; prefill "
    "once with the mask; then at each step take each row's most likely token, give the rows "
    "already finished the padding token instead, note which rows just wrote the end token, and "
    "stop once every row has. Feed the new tokens back with the cache and the mask grown by one "
    "column."
)


@grader("greedy_generate_batch", points=3)
def check_greedy_generate_batch(greedy_generate_batch):
    """Stretch: prompts of different lengths in one batch, each row stopping at its own end.

    Against minillava.generate (greedy, stop_token_ids, pad_token_id) on three cases: rows that
    stop at different steps while one never does, rows that all stop before the limit (the
    result is shorter), a single prompt. The calls are watched too: one prefill for the whole
    left-padded batch with its mask, then one position per step with the cache and the grown
    mask, and no call once every row has finished.
    """
    decoder = _decisive_decoder()
    cases = (
        ("4 prompts of 5, 2, 7 and 3 tokens; 2 rows stop early, 1 never", (5, 2, 7, 3), False),
        ("3 prompts of 4, 1 and 6 tokens; every row stops before the limit", (4, 1, 6), True),
        ("1 prompt of 4 tokens that stops early", (4,), False),
    )
    for k, (described, lengths, every_row_stops) in enumerate(cases):
        n_new = 8
        prompts, eot_id, pad_id, free = _stop_case(decoder, lengths, n_new, every_row_stops, k)
        ids, mask = _left_padded(prompts, pad_id)
        expected = generate(
            decoder, ids, attention_mask=mask, max_new_tokens=n_new, temperature=0.0,
            stop_token_ids=(eot_id,), pad_token_id=pad_id,
        )  # fmt: skip
        spy = _Spy(decoder)
        step(
            f"calling greedy_generate_batch on {described} (max_new_tokens={n_new}, "
            f"eot_id={eot_id}, pad_id={pad_id})"
        )
        got = greedy_generate_batch(spy, prompts, n_new, eot_id, pad_id)
        got = assert_tensor(
            got,
            "greedy_generate_batch(...)",
            hint="Stack the new tokens into one tensor: one row per prompt, one column per step.",
        )
        if not spy.calls:
            fail(
                "greedy_generate_batch never called the decoder.",
                "Run the padded batch through the decoder once first, then one token per step.",
            )
        if not got.dtype.is_floating_point and got.dtype != torch.long:
            got = got.long()
        diagnosis, hint = _explain_batch_calls(spy, prompts, mask) or (None, BATCH_HINT)
        if diagnosis is None:
            for mistakes, mistake_hint in _stop_mistakes(expected, free, eot_id, pad_id, n_new):
                diagnosis = diagnose(got, mistakes)
                if diagnosis:
                    hint = mistake_hint
                    break
        assert_equal(
            got,
            expected,
            f"greedy_generate_batch on {described}",
            why_shape=f"one row per prompt, one column per step until every row has finished: "
            f"({len(prompts)}, {expected.shape[1]}) here",
            diagnosis=diagnosis,
            hint=hint,
        )
        first, later = spy.calls[0], spy.calls[1:]
        if first["batch"] != len(prompts):
            fail(
                f"Your tokens are right, but the prompts did not go through the model as one "
                f"batch ({len(spy.calls)} calls, the first on {first['batch']} row(s)): "
                "batching is the point of the padding.",
                "Pad all the prompts into one tensor and make one prefill call for them all.",
            )
        if first["length"] != ids.shape[1]:
            fail(
                f"The first call ran the model on {first['length']} positions; the prefill "
                f"should run the padded prompts ({ids.shape[1]} positions, the longest prompt) "
                "once.",
                "Pad on the left to the longest prompt, no further, and prefill once.",
            )
        slow = [c["length"] for c in later if c["length"] != 1 or not c["cache"]]
        if slow:
            fail(
                f"Your tokens are right, but after the prefill the model ran on {slow} "
                "positions per step (or without the cache): that recomputes the whole sequence "
                "every step.",
                "Hand the cache from each call to the next and feed only the new tokens, shape "
                "(B, 1), with the mask grown by one column.",
            )
        if len(spy.calls) > expected.shape[1]:
            fail(
                f"Your tokens are right, but the result has {expected.shape[1]} column(s) and the "
                f"decoder was called {len(spy.calls)} times: one prefill and "
                f"{expected.shape[1] - 1} step(s) are enough. The calls after every row had "
                "finished (or after the last step) computed logits nobody read.",
                "Decide whether to stop right after choosing the tokens of a step, before "
                "calling the model again.",
            )
