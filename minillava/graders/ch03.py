"""Chapter 3 graders: tokens (exercises/ch03_tokens.py).

BPE is checked against the library: minillava.bpe (the merge step, and train_bpe run on one
text with a pre-tokenisation pattern that keeps the whole text in one piece) and tiktoken (which
encodes by replaying the same merges). The loss mask is checked against Tokenizer.render.
"""

import random
from collections import Counter

import tiktoken

from minillava import bpe
from minillava.data.instruct import make_conversations, world_text
from minillava.data.shapes import ShapesWorld
from minillava.grading import GradingFailure, fail, grader, step
from minillava.tokenizer import get_tokenizer

TITLE = "Tokens"
MODULE = "ch03_tokens"

WHOLE_TEXT = r"(?s).+"  # one pre-token = the whole text: plain BPE, as in the exercises


def _as_list(got, what: str) -> list:
    if got is None:
        fail(f"{what} returned None: is a `return` statement missing?")
    if hasattr(got, "tolist") and not isinstance(got, list):
        got = got.tolist()
    if not isinstance(got, list | tuple):
        fail(f"{what} returned a {type(got).__name__}, expected a list.")
    return list(got)


def _corpus(n_texts: int = 12) -> str:
    texts = []
    for text in world_text("val", n=3):
        texts.append(text)
        if len(texts) == n_texts:
            break
    return "\n".join(texts)


# --- count_pairs --------------------------------------------------------------------------------


def _as_counts(got, what: str) -> dict:
    if got is None:
        fail(f"{what} returned None: is a `return` statement missing?")
    if not isinstance(got, dict):
        fail(f"{what} returned a {type(got).__name__}, expected a dict {{(a, b): count}}.")
    counts = {}
    for key, value in got.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            fail(f"{what}: keys must be pairs (a, b) of ids, got the key {key!r}.")
        counts[tuple(int(k) for k in key)] = int(value)
    return {k: v for k, v in counts.items() if v != 0}  # a Counter may keep zero counts


def _compare_counts(got: dict, expected: dict, ids: list[int], what: str) -> None:
    if got == expected:
        return
    wrong = sorted(set(got) | set(expected), key=lambda p: (-expected.get(p, 0), p))
    first = next(p for p in wrong if got.get(p, 0) != expected.get(p, 0))
    message = (
        f"{what} is wrong: the pair {first} occurs {expected.get(first, 0)} time(s), "
        f"you counted {got.get(first, 0)}."
    )
    if got == dict(Counter(zip(ids[::2], ids[1::2], strict=False))):
        hint = (
            "You counted pairs in non-overlapping steps of two. Pairs overlap: every position i "
            "starts the pair (ids[i], ids[i + 1]), so [7, 7, 7] has (7, 7) twice."
        )
    elif sum(got.values()) == max(len(ids) - 2, 0):
        hint = "One pair is missing: there are len(ids) - 1 adjacent pairs, the last one too."
    else:
        hint = "Count (ids[i], ids[i + 1]) for every i: Counter(zip(ids, ids[1:]))."
    raise GradingFailure(message, hint)


@grader("count_pairs", points=1)
def check_count_pairs(count_pairs):
    """Small hand examples (overlapping pairs, empty input), then 200 random ids."""
    rng = random.Random(0)
    cases = [[1, 2, 1, 2], [7, 7, 7], [5], [], [rng.randrange(6) for _ in range(200)]]
    for ids in cases:
        shown = ids if len(ids) < 10 else "200 random ids in 0..5"
        step(f"calling count_pairs({shown})")
        got = _as_counts(count_pairs(list(ids)), f"count_pairs({shown})")
        _compare_counts(
            got, dict(Counter(zip(ids, ids[1:], strict=False))), ids, f"count_pairs({shown})"
        )


# --- merge_pair ---------------------------------------------------------------------------------


@grader("merge_pair", points=1)
def check_merge_pair(merge_pair):
    """Hand examples (several and overlapping occurrences), then random ids, against bpe._merge."""
    rng = random.Random(1)
    cases = [
        ([1, 2, 3, 1, 2], (1, 2), 256),
        ([7, 7, 7], (7, 7), 256),
        ([7, 7, 7, 7], (7, 7), 300),
        ([4, 5, 6], (5, 4), 256),
    ]
    cases += [([rng.randrange(3) for _ in range(60)], (1, 1), 999) for _ in range(3)]
    for ids, pair, new_id in cases:
        shown = f"merge_pair({ids if len(ids) < 10 else '60 random ids'}, {pair}, {new_id})"
        step(f"calling {shown}")
        original = list(ids)
        got = _as_list(merge_pair(ids, pair, new_id), shown)
        if ids != original:
            fail(f"{shown} changed its input list `ids`: build and return a new list instead.")
        expected = bpe._merge(ids, pair, new_id)
        if got == expected:
            continue
        first_only = list(ids)
        for i in range(len(ids) - 1):
            if (ids[i], ids[i + 1]) == pair:
                first_only = ids[:i] + [new_id] + ids[i + 2 :]
                break
        if got == first_only:
            hint = "You merged only the first occurrence: keep scanning to the end of the list."
        elif len(got) < len(expected):
            hint = (
                "Your result is too short: after merging at i, jump to i + 2 (both ids of the "
                "pair are used up), so overlapping occurrences like [7, 7, 7] merge only once."
            )
        else:
            hint = (
                "Scan left to right: if (ids[i], ids[i + 1]) == pair, append new_id and skip "
                "two; otherwise append ids[i] and move one."
            )
        fail(f"{shown} is wrong.\n  expected {expected}\n  got      {got}", hint)


# --- train_merges -------------------------------------------------------------------------------


def _vocab_of(merges: dict) -> list[tuple[bytes, int]]:
    """Learner merges -> [(token bytes, id)] in learned order."""
    vocab = {i: bytes([i]) for i in range(256)}
    tokens = []
    for (a, b), new_id in merges.items():
        if a not in vocab or b not in vocab:
            fail(
                f"the merge ({a}, {b}) -> {new_id} uses an id that is neither a byte (0-255) "
                "nor an earlier merge's new id."
            )
        vocab[new_id] = vocab[a] + vocab[b]
        tokens.append((vocab[new_id], new_id))
    return tokens


@grader("train_merges", points=2)
def check_train_merges(train_merges):
    """Merges learned from ShapesWorld text must equal minillava.bpe.train_bpe's, in order."""
    step('calling train_merges("ab", 5)  (one pair only: training must stop early)')
    got = train_merges("ab", 5)
    if not isinstance(got, dict):
        fail(f'train_merges("ab", 5) returned a {type(got).__name__}, expected a dict.')
    if {tuple(k): v for k, v in got.items()} != {(97, 98): 256}:
        fail(
            f'train_merges("ab", 5) should be {{(97, 98): 256}} (b"a" + b"b", then nothing '
            f"is left to merge), got {got}.",
            "The first merge gets the new id 256 (the next 257, ...): ids 0-255 are the bytes."
            if list(got) == [(97, 98)]
            else "Stop as soon as the text has no pair left (one token).",
        )

    text, num_merges = _corpus(), 40
    step(f"calling train_merges(text, {num_merges}) on {len(text)} characters of world_text")
    got = train_merges(text, num_merges)
    if not isinstance(got, dict):
        fail(f"train_merges returned a {type(got).__name__}, expected a dict {{pair: new_id}}.")
    ids = list(got.values())
    if ids != list(range(256, 256 + len(ids))):
        fail(
            f"the new ids must be 256, 257, ... in the order the merges were learned, got "
            f"{ids[:8]}{' ...' if len(ids) > 8 else ''}.",
            "The i-th merge (i = 0, 1, ...) gets new_id = 256 + i; insert into the dict in order.",
        )
    learned = _vocab_of(got)
    ranks = bpe.train_bpe([text], 256 + num_merges, pat_str=WHOLE_TEXT)
    expected = sorted((t for t in ranks if ranks[t] >= 256), key=ranks.get)
    if len(learned) != len(expected):
        fail(
            f"train_merges(text, {num_merges}) learned {len(learned)} merges, expected "
            f"{len(expected)}."
        )
    for i, ((token, _), want) in enumerate(zip(learned, expected, strict=True)):
        if token == want:
            continue
        message = (
            f"merge number {i} (new id {256 + i}) should make {want!r}, yours makes {token!r}."
        )
        if all(a < 256 and b < 256 for a, b in got) and any(len(t) > 2 for t in expected):
            hint = (
                "All your merges join two single bytes: count the pairs again after each "
                "merge, on the merged ids, so merged tokens can be merged further "
                '(b" t" + b"he" -> b" the").'
            )
        else:
            hint = (
                "Take the most frequent pair of the *current* ids; on a tie the smallest pair: "
                "min(counts, key=lambda p: (-counts[p], p))."
            )
        fail(message, hint)


# --- encode -------------------------------------------------------------------------------------


def _reference_merges(text: str, num_merges: int) -> tuple[dict, dict]:
    """{pair: id} and tiktoken's {bytes: rank} for the same merges (no id collisions here)."""
    ids, merges, vocab = list(text.encode()), {}, {i: bytes([i]) for i in range(256)}
    for i in range(num_merges):
        counts = Counter(zip(ids, ids[1:], strict=False))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges[best] = 256 + i
        vocab[256 + i] = vocab[best[0]] + vocab[best[1]]
        ids = bpe._merge(ids, best, 256 + i)
    return merges, {token: i for i, token in vocab.items()}


def _most_frequent_encode(text: str, merges: dict) -> list[int]:
    ids = list(text.encode())
    while True:
        counts = Counter(p for p in zip(ids, ids[1:], strict=False) if p in merges)
        if not counts:
            return ids
        pair = min(counts, key=lambda p: (-counts[p], p))
        ids = bpe._merge(ids, pair, merges[pair])


@grader("encode", points=2)
def check_encode(encode):
    """Encoding with 60 merges learned on world text must match tiktoken's, byte-exact."""
    corpus = _corpus()
    merges, ranks = _reference_merges(corpus, 60)
    encoding = tiktoken.Encoding(
        "ch03", pat_str=WHOLE_TEXT, mergeable_ranks=ranks, special_tokens={}
    )
    texts = ["xyz!", "a", "the large red circle is above the small blue square."]
    texts += [t for t in corpus.split("\n")[:6]]
    for text in texts:
        shown = f"encode({text[:40]!r}{'...' if len(text) > 40 else ''}, merges)"
        step(f"calling {shown} with 60 merges")
        got = _as_list(encode(text, dict(merges)), shown)
        expected = encoding.encode_ordinary(text)
        if got == expected:
            continue
        if got == _most_frequent_encode(text, merges):
            hint = (
                "You merged the pair most frequent in *this* text. Merge the pair that was "
                "learned first (smallest new id) instead: that replays training in order."
            )
        elif got == list(text.encode()):
            hint = "No merge was applied: look up each adjacent pair in `merges`."
        else:
            hint = (
                "Repeat: among the adjacent pairs, take the one with the smallest id in merges, "
                "merge it everywhere; stop when no adjacent pair is in merges."
            )
        fail(f"{shown} is wrong.\n  expected {expected}\n  got      {got}", hint)


# --- assistant_mask -----------------------------------------------------------------------------


@grader("assistant_mask", points=2)
def check_assistant_mask(assistant_mask):
    """A hand example, then rendered ShapesWorld conversations against Tokenizer.render's mask."""
    tok = get_tokenizer()
    A, E = tok.assistant_id, tok.eot_id
    step(f"calling assistant_mask([5, A, 7, 8, E, 9], A, E) with A = {A}, E = {E}")
    cases = [([5, A, 7, 8, E, 9], [False, False, True, True, True, False])]
    world = ShapesWorld("val", size=4)
    for index in range(3):
        sample = world[index]
        for record in make_conversations(sample.scene, sample.captions, random.Random(index)):
            ids, mask = tok.render(record["conversations"])
            cases.append((ids, mask))
    first_question = make_conversations(world[3].scene, world[3].captions, random.Random(3))
    ids, mask = tok.render(first_question[0]["conversations"][:1])
    cases.append((ids, mask))  # a prompt that ends with <|assistant|>: nothing to train on

    for n, (ids, expected) in enumerate(cases):
        what = (
            "assistant_mask([5, A, 7, 8, E, 9], A, E)"
            if n == 0
            else (f"assistant_mask(ids, ...) on rendered conversation {n} ({len(ids)} tokens)")
        )
        if n:
            step(f"calling {what}")
        got = [bool(x) for x in _as_list(assistant_mask(list(ids), A, E), what)]
        if len(got) != len(ids):
            fail(f"{what} returned {len(got)} values, expected one per id: {len(ids)}.")
        if got == expected:
            continue
        i = next(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e)
        token = tok.decode([ids[i]])
        message = (
            f"{what} is wrong at position {i} (token {token!r}): expected {expected[i]}, "
            f"got {got[i]}."
        )
        if ids[i] == A and got[i]:
            hint = (
                "<|assistant|> itself is part of the prompt (the template writes it), not of "
                "the answer: start the mask at the token after it."
            )
        elif ids[i] == E and not got[i]:
            hint = (
                "Include the <|endoftext|> that closes each answer: that is how the model "
                "learns to stop talking."
            )
        elif got[i] and not expected[i]:
            hint = "The answer ends at its <|endoftext|>: switch the mask off after that token."
        else:
            hint = "True from the token after <|assistant|> through the next <|endoftext|>."
        fail(message, hint)
