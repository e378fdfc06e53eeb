"""Chapter 3 graders: tokens (exercises/ch03_tokens.py).

BPE is checked against the library: minillava.bpe (the merge step, and train_bpe run on one
text with a pre-tokenisation pattern that keeps the whole text in one piece) and tiktoken (which
encodes by replaying the same merges). The loss mask is checked against Tokenizer.render. The
stretch, BPE on pre-tokenised words, is checked against train_bpe with GPT-2's pattern.

Where a wrong answer equals what a known mistake returns on the same input, the message names
the mistake (the diagnosis); the hint, shown with --hint, says where to look, in words.
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


def _fail(message: str, hint: str | None = None, diagnosis: str | None = None) -> None:
    """Fail; the diagnosis (when the mistake was recognised) ends the message, shown at once."""
    raise GradingFailure(f"{message}\n{diagnosis}" if diagnosis else message, hint)


def _matching(got, mistakes: dict[str, object]) -> str | None:
    """The diagnosis of the first mistake that returns exactly `got` (lists, dicts), else None."""
    return next((text for text, wrong in mistakes.items() if got == wrong), None)


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
    _fail(
        f"{what} is wrong: the pair {first} occurs {expected.get(first, 0)} time(s), "
        f"you counted {got.get(first, 0)}.",
        diagnosis=_matching(
            got,
            {
                "You counted the pairs in non-overlapping steps of two, but pairs overlap: every "
                "id but the last starts a pair with its right-hand neighbour, so three 7s in a "
                "row hold the pair (7, 7) twice.": dict(
                    Counter(zip(ids[::2], ids[1::2], strict=False))
                ),
                "The last pair is missing: n ids hold n - 1 adjacent pairs, and you counted "
                "n - 2 of them.": dict(Counter(zip(ids, ids[1:-1], strict=False))),
            },
        ),
        hint="Walk along the ids once and count each id together with its right-hand neighbour, "
        "up to and including the last two ids.",
    )


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


def _merge_mistakes(ids: list[int], pair: tuple[int, int], new_id: int) -> dict[str, list[int]]:
    """What three wrong scans return: {name: ids}."""
    first_only = list(ids)
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            first_only = ids[:i] + [new_id] + ids[i + 2 :]
            break
    no_skip = [new_id if (a, b) == pair else a for a, b in zip(ids, ids[1:], strict=False)]
    no_skip += ids[-1:]
    no_last, i = [], 0
    while i < len(ids) - 1:  # the scan that stops one short and never copies the last id
        if (ids[i], ids[i + 1]) == pair:
            no_last.append(new_id)
            i += 2
        else:
            no_last.append(ids[i])
            i += 1
    return {"first_only": first_only, "no_skip": no_skip, "no_last": no_last}


@grader("merge_pair", points=1)
def check_merge_pair(merge_pair):
    """Hand examples (several and overlapping occurrences), then random ids, against bpe._merge."""
    rng = random.Random(1)
    cases = [
        ([1, 2, 3, 1, 2], (1, 2), 256),
        ([7, 7, 7], (7, 7), 256),
        ([7, 7, 7, 7], (7, 7), 300),
        ([4, 5, 6], (5, 4), 256),
        ([4, 5, 6], (4, 5), 256),
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
        wrong = _merge_mistakes(ids, pair, new_id)
        _fail(
            f"{shown} is wrong.\n  expected {expected}\n  got      {got}",
            diagnosis=_matching(
                got,
                {
                    "You merged only the first occurrence of the pair; every occurrence must "
                    "become the new id.": wrong["first_only"],
                    "After a merge you moved on by one position, so the pair's second id was "
                    "read again: both ids of a merged pair are used up.": wrong["no_skip"],
                    "The last id is missing: when the scan reaches it, it has no right-hand "
                    "neighbour to pair with, but it still belongs in the result.": wrong["no_last"],
                },
            ),
            hint="Scan left to right: where the pair starts, write the new id and jump over both "
            "of its ids; anywhere else copy the id and move one step. Three 7s in a row "
            "therefore merge once, on the left.",
        )


# --- train_merges -------------------------------------------------------------------------------


def _vocab_of(merges: dict) -> list[tuple[bytes, int]]:
    """Learner merges -> [(token bytes, id)] in learned order."""
    vocab = {i: bytes([i]) for i in range(256)}
    tokens = []
    for (a, b), new_id in merges.items():
        if a not in vocab or b not in vocab:
            _fail(
                f"the merge ({a}, {b}) -> {new_id} uses an id that is neither a byte (0-255) "
                "nor an earlier merge's new id.",
                hint="A merge joins two ids that exist when it is learned: the bytes, and the "
                "new ids of the merges before it.",
            )
        vocab[new_id] = vocab[a] + vocab[b]
        tokens.append((vocab[new_id], new_id))
    return tokens


def _as_merges(got, what: str) -> dict[tuple[int, int], int]:
    if not isinstance(got, dict):
        fail(f"{what} returned a {type(got).__name__}, expected a dict {{pair: new_id}}.")
    return {tuple(pair): new_id for pair, new_id in got.items()}


def _compare_with_library(
    got: dict, expected: list[bytes], what: str, words: list[bytes] | None = None
) -> None:
    """The learner's merges must make the library's tokens, in the library's order.

    `words`: the pre-tokens, when merges must stay inside them (the stretch).
    """
    ids = list(got.values())
    if ids != list(range(256, 256 + len(ids))):
        _fail(
            f"{what}: the new ids must be 256, 257, ... in the order the merges were learned, "
            f"got {ids[:8]}{' ...' if len(ids) > 8 else ''}.",
            hint="The merges are numbered in the order they are learned, from 256 upwards (0 to "
            "255 are the bytes); a dict keeps the order of insertion, so record each merge as "
            "soon as it is learned.",
        )
    learned = [token for token, _ in _vocab_of(got)]
    outside = [t for t in learned if not any(t in word for word in words)] if words else []
    single_bytes = all(a < 256 and b < 256 for a, b in got) and any(len(t) > 2 for t in expected)
    for i, (token, want) in enumerate(zip(learned, expected, strict=False)):
        if token == want:
            continue
        _fail(
            f"{what}: merge number {i} (new id {256 + i}) should make {want!r}, yours makes "
            f"{token!r}.",
            diagnosis=(
                f"Your merges make {outside[0]!r}, which is inside no word: it crosses a word "
                "boundary, and pre-tokenisation exists to forbid exactly that."
                if outside
                else "All your merges join two single bytes, so no merged token was ever merged "
                "further: the pairs were counted once, on the bytes."
                if single_bytes
                else None
            ),
            hint=(
                "Count the pairs again after each merge, on the merged ids: the token for "
                '" the" can only be built once "he" exists.'
                if single_bytes
                else "Each merge takes the most frequent pair of the current ids (ties go to the "
                "smallest pair), merges it everywhere, and the pairs are counted again."
            ),
        )
    if len(learned) != len(expected):
        _fail(
            f"{what} learned {len(learned)} merges, expected {len(expected)}.",
            hint="Learn as many merges as asked, unless no pair is left: then stop early."
            if len(learned) < len(expected)
            else "Stop as soon as no pair is left to merge: every word is one token by then.",
        )


@grader("train_merges", points=2)
def check_train_merges(train_merges):
    """Merges learned from ShapesWorld text must equal minillava.bpe.train_bpe's, in order."""
    step('calling train_merges("ab", 5)  (one pair only: training must stop early)')
    got = _as_merges(train_merges("ab", 5), 'train_merges("ab", 5)')
    if got != {(97, 98): 256}:
        _fail(
            f'train_merges("ab", 5) should be {{(97, 98): 256}} (b"a" + b"b", then nothing '
            f"is left to merge), got {got}.",
            diagnosis=(
                f"Your merge got the id {got[(97, 98)]}: the ids 0 to 255 are the single bytes, "
                "so the first merge gets the new id 256."
                if list(got) == [(97, 98)]
                else 'After the first merge "ab" is a single token and no pair is left: '
                "training must stop early, with fewer merges than asked."
                if len(got) > 1 and next(iter(got)) == (97, 98)
                else None
            ),
            hint="Number the merges from 256 upwards, and stop as soon as the ids hold no pair.",
        )

    step('calling train_merges("cdab", 1)  (three pairs, each seen once: the tie rule decides)')
    got = _as_merges(train_merges("cdab", 1), 'train_merges("cdab", 1)')
    if got != {(97, 98): 256}:
        _fail(
            f'train_merges("cdab", 1) should be {{(97, 98): 256}}: the pairs (99, 100), '
            f"(100, 97) and (97, 98) each occur once, and the tie goes to the smallest, "
            f'b"ab". Got {got}.',
            diagnosis=_matching(
                got,
                {
                    'On a tie you kept the pair that appears first in the text, b"cd". The rule '
                    "must not depend on where a pair happens to appear: the smallest pair wins, "
                    "so that training is deterministic and agrees with the library.": {
                        (99, 100): 256
                    },
                    'On a tie you kept the largest pair, b"da": the smallest wins.': {
                        (100, 97): 256
                    },
                },
            ),
            hint="Compare tied pairs as a dictionary orders words: by their first ids, and on "
            "equal first ids by their second ids; the smaller pair wins.",
        )

    text, num_merges = _corpus(), 40
    step(f"calling train_merges(text, {num_merges}) on {len(text)} characters of world_text")
    what = f"train_merges(text, {num_merges})"
    got = _as_merges(train_merges(text, num_merges), what)
    ranks = bpe.train_bpe([text], 256 + num_merges, pat_str=WHOLE_TEXT)
    expected = sorted((t for t in ranks if ranks[t] >= 256), key=ranks.get)
    _compare_with_library(got, expected, what)


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
    """The mistake: merge the pair most frequent in this text (ties: the smallest pair)."""
    ids = list(text.encode())
    while True:
        counts = Counter(p for p in zip(ids, ids[1:], strict=False) if p in merges)
        if not counts:
            return ids
        pair = min(counts, key=lambda p: (-counts[p], p))
        ids = bpe._merge(ids, pair, merges[pair])


def _leftmost_encode(text: str, merges: dict) -> list[int]:
    """The mistake: merge the leftmost adjacent pair that has a merge, whichever was learned."""
    ids = list(text.encode())
    while True:
        i = next((i for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) in merges), None)
        if i is None:
            return ids
        ids = ids[:i] + [merges[ids[i], ids[i + 1]]] + ids[i + 2 :]


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
        _fail(
            f"{shown} is wrong.\n  expected {expected}\n  got      {got}",
            diagnosis=_matching(
                got,
                {
                    "You merged the pair most frequent in this text. Frequencies in a new text "
                    "say nothing about how the merges were learned, so the tokens differ from "
                    "training's.": _most_frequent_encode(text, merges),
                    "You merged the leftmost pair that has a merge, whichever was learned: a "
                    "merge learned late then takes ids that an earlier merge should have "
                    "paired first.": _leftmost_encode(text, merges),
                    "No merge was applied: your ids are the text's bytes.": list(text.encode()),
                },
            ),
            hint="Replay training in order: among the adjacent pairs of the current ids, merge "
            "the one that was learned first (the smallest new id), everywhere, and repeat until "
            "no adjacent pair is a learned merge.",
        )


# --- train_merges_on_words (stretch) ------------------------------------------------------------

WORDS_HINT = (
    "Keep each word as its own list of ids, next to its count. A pair inside a word counts as "
    "many times as the word occurs, pairs are never formed across two words, and after each "
    "merge every word is merged and the pairs are counted again."
)


def _expect_word_merges(
    got: dict,
    expected: dict,
    word_counts: dict,
    num_merges: int,
    why: str,
    diagnosis: str | None,
    hint: str,
) -> None:
    """A hand case: the merges must be exactly `expected`; a merge across words is named."""
    if got == expected:
        return
    words = [word.encode("utf-8") for word in word_counts]
    vocab = {i: bytes([i]) for i in range(256)}
    made = []
    for (a, b), new_id in got.items():
        if a in vocab and b in vocab:
            vocab[new_id] = vocab[a] + vocab[b]
            made.append(vocab[new_id])
    outside = [token for token in made if not any(token in word for word in words)]
    _fail(
        f"train_merges_on_words({word_counts}, {num_merges}) should be {expected} ({why}), got "
        f"{got}.",
        diagnosis=(
            f"Your merges make {outside[0]!r}, which is inside no word: the pair ran across a "
            "word boundary (or from one copy of a word into the next)."
            if outside
            else diagnosis
        ),
        hint=hint,
    )


def _on_words(train_merges_on_words, word_counts: dict, num_merges: int) -> dict:
    what = f"train_merges_on_words({word_counts}, {num_merges})"
    step(f"calling {what}")
    return _as_merges(train_merges_on_words(dict(word_counts), num_merges), what)


@grader("train_merges_on_words", points=3)
def check_train_merges_on_words(train_merges_on_words):
    """Stretch: hand cases (counts, ties, words of one byte, recounting, stopping early), then
    the words of world text against minillava.bpe.train_bpe with GPT-2's pattern, in order."""
    words = {"ab": 1, "cd": 3}
    got = _on_words(train_merges_on_words, words, 1)
    _expect_word_merges(
        got,
        {(99, 100): 256},
        words,
        1,
        'the pair of "cd" occurs 3 times, that of "ab" once',
        diagnosis=_matching(
            got,
            {
                "You counted each word once: a pair inside a word occurs as many times as the "
                'word does, so "cd" (3 times) beats "ab" (once).': {(97, 98): 256},
            },
        ),
        hint="Add the word's count, not 1, for every pair in the word.",
    )

    words = {"cd": 2, "ab": 2}
    got = _on_words(train_merges_on_words, words, 1)
    _expect_word_merges(
        got,
        {(97, 98): 256},
        words,
        1,
        "a tie: the smallest pair wins, as in train_merges and the library",
        diagnosis=_matching(
            got,
            {
                'On a tie you kept the pair seen first, that of "cd". The rule must not depend '
                "on the order of the words: the smallest pair wins.": {(99, 100): 256},
            },
        ),
        hint="The tie rule of train_merges, unchanged: the smallest pair, compared as a "
        "dictionary orders words.",
    )

    words = {"a": 3, "b": 3}
    got = _on_words(train_merges_on_words, words, 2)
    _expect_word_merges(
        got,
        {},
        words,
        2,
        "a word of one byte holds no pair, so there is nothing to merge",
        diagnosis=None,
        hint=WORDS_HINT,
    )

    words = {"ab": 2, "c": 5}
    got = _on_words(train_merges_on_words, words, 3)
    _expect_word_merges(
        got,
        {(97, 98): 256},
        words,
        3,
        "after one merge every word is a single token: stop early",
        diagnosis=None,
        hint="Stop as soon as no word holds a pair, even with merges left to learn.",
    )

    words = {"abc": 3, "bc": 1}
    got = _on_words(train_merges_on_words, words, 2)
    _expect_word_merges(
        got,
        {(98, 99): 256, (97, 256): 257},
        words,
        2,
        'first "bc" (4 times), then "a" with the new token "bc" (3 times)',
        diagnosis=_matching(
            got,
            {
                'Your second merge joins the bytes "a" and "b", counted before the first merge: '
                'after it, "abc" is the byte "a" followed by the token "bc", so the pairs must '
                "be counted again on the merged words.": {(98, 99): 256, (97, 98): 257},
            },
        ),
        hint=WORDS_HINT,
    )

    texts = list(world_text("val", n=3))
    pieces = bpe.pretokenize(texts)
    word_counts = {piece.decode("utf-8"): count for piece, count in pieces.items()}
    for num_merges in (120, 400):
        what = f"train_merges_on_words(word_counts, {num_merges})"
        step(
            f"calling {what} on the {len(word_counts)} distinct words of {len(texts)} world "
            "texts" + (" (enough merges to make every word one token)" if num_merges > 200 else "")
        )
        got = _as_merges(train_merges_on_words(dict(word_counts), num_merges), what)
        ranks = bpe.train_bpe(texts, 256 + num_merges)
        expected = sorted((t for t in ranks if ranks[t] >= 256), key=ranks.get)
        _compare_with_library(got, expected, what, words=list(pieces))


# --- assistant_mask -----------------------------------------------------------------------------


def _mask_mistakes(ids: list[int], mask: list[bool], A: int, E: int) -> dict[str, list[bool]]:
    """What three wrong masks look like, built from the right one: {name: mask}."""
    first = ids.index(A) + 1 if A in ids else len(ids)
    return {
        "with_assistant": [m or t == A for m, t in zip(mask, ids, strict=True)],
        "without_eot": [m and t != E for m, t in zip(mask, ids, strict=True)],
        "never_off": [i >= first for i in range(len(ids))],
    }


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
            _fail(
                f"{what} returned {len(got)} values, expected one per id: {len(ids)}.",
                hint="Return one True or False for every id, in the same order.",
            )
        if got == expected:
            continue
        i = next(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e)
        token = tok.decode([ids[i]])
        wrong = _mask_mistakes(ids, expected, A, E)
        _fail(
            f"{what} is wrong at position {i} (token {token!r}): expected {expected[i]}, "
            f"got {got[i]}.",
            diagnosis=_matching(
                got,
                {
                    "Your mask is True on <|assistant|> itself, but the template writes that "
                    "token: it is part of the prompt, and the answer starts at the token after "
                    "it.": wrong["with_assistant"],
                    "Your mask is False on the <|endoftext|> that closes each answer, but the "
                    "model must be trained on it: that is how it learns to stop talking.": wrong[
                        "without_eot"
                    ],
                    "Your mask never switches off: after the first answer's <|endoftext|> come "
                    "the user's turns, which are given, not predicted.": wrong["never_off"],
                },
            ),
            hint="An answer runs from the token after <|assistant|> through the next "
            "<|endoftext|>, that one included; everything else (the system line, the user's "
            "turns, the role tokens) is given, not predicted.",
        )
