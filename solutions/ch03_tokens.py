"""Chapter 3, Tokens: reference solutions. Same names and signatures as exercises/ch03_tokens.py.

The library versions are minillava/bpe.py (training, with pre-tokenisation and incremental
counts) and minillava/tokenizer.py (the tiktoken Encoding and the chat template). These are the
plain versions: one text, one loop, easy to follow. The stretch, train_merges_on_words, is
train_bpe's algorithm on words, without its incremental counts.
"""

from __future__ import annotations

from collections import Counter


def count_pairs(ids: list[int]) -> dict[tuple[int, int], int]:
    """How often each pair of *adjacent* ids occurs: [1, 2, 1, 2] -> {(1, 2): 2, (2, 1): 1}."""
    return dict(Counter(zip(ids, ids[1:], strict=False)))


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` by `new_id`, scanning left to right."""
    merged, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            merged.append(new_id)
            i += 2  # both ids of the pair are consumed
        else:
            merged.append(ids[i])
            i += 1
    return merged


def train_merges(text: str, num_merges: int) -> dict[tuple[int, int], int]:
    """Learn up to `num_merges` BPE merges from `text`; return {pair: new_id} in learned order."""
    ids = list(text.encode("utf-8"))
    merges: dict[tuple[int, int], int] = {}
    for i in range(num_merges):
        counts = count_pairs(ids)
        if not counts:
            break  # the whole text is one token already
        # Most frequent pair; ties go to the smallest pair, so training is deterministic.
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        new_id = 256 + i
        ids = merge_pair(ids, best, new_id)
        merges[best] = new_id
    return merges


def encode(text: str, merges: dict[tuple[int, int], int]) -> list[int]:
    """Text -> ids by replaying `merges`: always merge the pair that was learned first."""
    ids = list(text.encode("utf-8"))
    while len(ids) >= 2:
        pairs = set(zip(ids, ids[1:], strict=False))
        # The earliest-learned pair present (smallest new id); others may be built on top of it.
        pair = min(pairs, key=lambda p: merges.get(p, float("inf")))
        if pair not in merges:
            break  # no learned merge applies any more
        ids = merge_pair(ids, pair, merges[pair])
    return ids


def assistant_mask(ids: list[int], assistant_id: int, eot_id: int) -> list[bool]:
    """True on the assistant's answer tokens and the <|endoftext|> closing each answer."""
    mask, answering = [], False
    for token in ids:
        if answering:
            mask.append(True)
            if token == eot_id:  # the answer's end is trained on too: the model learns to stop
                answering = False
        else:
            mask.append(False)  # system line, user turns, role tokens
            if token == assistant_id:
                answering = True  # the answer starts at the *next* token
    return mask


def train_merges_on_words(
    word_counts: dict[str, int], num_merges: int
) -> dict[tuple[int, int], int]:
    """BPE on pre-tokenised words: {word: count} -> {pair: new_id}, merges never cross words."""
    kept = {word: n for word, n in word_counts.items() if n > 0}  # a word seen 0 times: no pairs
    words = [list(word.encode("utf-8")) for word in kept]  # each word as its current ids
    freqs = list(kept.values())
    merges: dict[tuple[int, int], int] = {}
    for i in range(num_merges):
        # A pair inside a word occurs as often as the word does; no pair spans two words.
        counts: Counter[tuple[int, int]] = Counter()
        for symbols, freq in zip(words, freqs, strict=True):
            for pair in zip(symbols, symbols[1:], strict=False):
                counts[pair] += freq
        if not counts:
            break  # every word is a single token
        best = min(counts, key=lambda pair: (-counts[pair], pair))  # the tie rule of train_merges
        new_id = 256 + i
        words = [merge_pair(symbols, best, new_id) for symbols in words]
        merges[best] = new_id
    return merges
