"""Byte-level BPE, trained by hand: the tokenizer's vocabulary in ~100 lines.

A language model reads integers, not text. Byte-pair encoding (BPE) decides which integers:

    1. Start from the 256 single bytes. Every string is a sequence of UTF-8 bytes, so with these
       256 tokens ANY text can be encoded (emoji, accents, typos: nothing is "unknown").
    2. Count every pair of adjacent tokens in the training text.
    3. Merge the most frequent pair into a new token (b"t" + b"he" -> b"the"), everywhere.
    4. Repeat until the vocabulary has the size you asked for.

Frequent words end up as one token; rare words fall back to pieces, and in the worst case to bytes.

Two ideas make this practical, both taken from GPT-2 (and tiktoken):

* **Pre-tokenisation.** A regex first cuts the text into words, numbers, punctuation runs and
  spaces (``PAT_STR``), and merges never cross those cuts: " red" can become one token, but
  "red." never swallows the full stop. A leading space stays with its word, so " red" (mid-sentence)
  and "red" (start of a sentence) are different tokens.
* **Count over unique pre-tokens.** Text repeats itself: ShapesWorld's few MB hold only a few
  hundred distinct words. We count each distinct pre-token once, weighted by how often it occurs,
  and after a merge we only revisit the words that contain the merged pair.

The result is ``mergeable_ranks``, a dict ``{token bytes: rank}`` where rank = the order in which
the token was created (0-255 are the single bytes). That is exactly what
``tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=...)`` takes:
tiktoken then encodes fast (in Rust) by repeatedly merging the adjacent pair whose concatenation
has the lowest rank, which replays our merges in training order.

Regenerate the vocabulary shipped with minillava (deterministic, a few seconds)::

    python -m minillava.vocabulary train

The file format is tiktoken's ``.tiktoken``: one line per token, ``base64(token bytes) rank``.
"""

from __future__ import annotations

import base64
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex  # the `regex` package (a tiktoken dependency): `re` has no \p{L} (any letter)

# GPT-2's pre-tokenisation pattern: English contractions, a word with its leading space, a number,
# a run of punctuation, runs of whitespace. tiktoken runs the same pattern, so training and encoding
# cut the text at the same places.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def pretokenize(texts: Iterable[str], pat_str: str = PAT_STR) -> Counter[bytes]:
    """Cut every text with the regex and count each distinct piece (as UTF-8 bytes)."""
    pattern = regex.compile(pat_str)
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(piece.encode("utf-8") for piece in pattern.findall(text))
    return counts


def _pairs(symbols: list[int]) -> Iterable[tuple[int, int]]:
    """Adjacent pairs of a word: [a, b, c] -> (a, b), (b, c)."""
    return zip(symbols, symbols[1:], strict=False)


def _merge(symbols: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `symbols` by `new_id`, left to right."""
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def train_bpe(
    texts: Iterable[str], vocab_size: int, pat_str: str = PAT_STR, verbose: bool = False
) -> dict[bytes, int]:
    """Learn byte-level BPE merges from `texts` until there are `vocab_size` tokens.

    Returns mergeable ranks ``{token bytes: rank}``: the 256 single bytes first (ranks 0-255), then
    one token per merge in the order the merges were learned. Ties between equally frequent pairs go
    to the pair with the smaller token ids, so training is deterministic. Training stops early if
    no adjacent pair is left to merge (tiny corpora).
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be >= 256 (the single bytes), got {vocab_size}")

    vocab: list[bytes] = [bytes([b]) for b in range(256)]  # token id -> its bytes
    ranks: dict[bytes, int] = {token: i for i, token in enumerate(vocab)}

    # Each distinct pre-token is a "word": its current symbols (token ids) and how often it occurs.
    word_counts = pretokenize(texts, pat_str)
    words: list[list[int]] = [list(piece) for piece in word_counts]  # bytes -> list of byte ids
    freqs: list[int] = list(word_counts.values())

    # pair -> total count, and pair -> the words it occurs in (so a merge only revisits those).
    pair_counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for w, symbols in enumerate(words):
        for pair in _pairs(symbols):
            pair_counts[pair] += freqs[w]
            where[pair].add(w)

    while len(ranks) < vocab_size:
        candidates = [(count, pair) for pair, count in pair_counts.items() if count > 0]
        if not candidates:
            break  # every word is a single token already
        # Most frequent pair; ties -> smallest ids (min of (-count, pair)).
        count, best = min(candidates, key=lambda c: (-c[0], c[1]))
        token = vocab[best[0]] + vocab[best[1]]
        # Two different pairs can spell the same bytes (b"ab"+b"c" and b"a"+b"bc"): reuse the id.
        if token in ranks:
            new_id = ranks[token]
        else:
            new_id = len(vocab)
            vocab.append(token)
            ranks[token] = new_id
        if verbose:
            print(f"merge {len(ranks) - 256:4d}: {token!r} (count {count})")

        # Merge the pair in every word that contains it, updating the pair counts incrementally.
        for w in sorted(where.pop(best)):
            old = words[w]
            new = _merge(old, best, new_id)
            for pair in _pairs(old):
                pair_counts[pair] -= freqs[w]
            for pair in _pairs(new):
                pair_counts[pair] += freqs[w]
                where[pair].add(w)
            words[w] = new
        del pair_counts[best]
    return ranks


def save_ranks(ranks: dict[bytes, int], path: str | Path) -> None:
    """Write `ranks` in tiktoken's .tiktoken format: ``base64(token) rank`` per line, by rank."""
    lines = [
        base64.b64encode(token).decode("ascii") + f" {rank}"
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    ]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")


def load_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a .tiktoken file back into ``{token bytes: rank}`` (local file, never the network).

    Same format as ``tiktoken.load.load_tiktoken_bpe``; we read it ourselves because that function
    also copies the file into tiktoken's cache, keyed by the path, and would keep serving that
    stale copy after the asset is regenerated.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"BPE ranks file {path} does not exist. Regenerate the ShapesWorld vocabulary with: "
            "python -m minillava.vocabulary train"
        )
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(path.read_text(encoding="ascii").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise ValueError(
                f"{path}:{line_no}: expected 'base64token rank', got {line!r}"
            ) from err
    return ranks
