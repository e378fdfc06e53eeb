"""Chapter 3, Tokens: your exercises. Fill each function, then run `minillava grade ch03`.

You build byte-pair encoding (BPE) from scratch, the way minillava/bpe.py trains the course's
vocabulary, then the loss mask of the chat template (minillava/tokenizer.py). Ids are plain
Python ints: 0-255 are the single bytes of the UTF-8 text, 256, 257, ... are merged tokens.
"""

from __future__ import annotations


def count_pairs(ids: list[int]) -> dict[tuple[int, int], int]:
    """Count how often each pair of *adjacent* ids occurs.

    Example: [1, 2, 1, 2] -> {(1, 2): 2, (2, 1): 1}. Pairs overlap: [7, 7, 7] has the pair
    (7, 7) twice (positions 0-1 and 1-2). A list with fewer than two ids has no pairs: {}.

    Hint: pair each id with the one after it (zip, given the list and the list shifted by one,
    walks over the adjacent pairs); collections.Counter then counts them.
    """
    raise NotImplementedError("count_pairs: your code here (chapter 3)")


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` by the single id `new_id`; return a new list.

    Scan left to right. When the id at position i and the next one form the pair, emit new_id
    and jump over both ids; otherwise emit ids[i] and move one step.
    Example: merge_pair([1, 2, 3, 1, 2], (1, 2), 256) -> [256, 3, 256];
    merge_pair([7, 7, 7], (7, 7), 256) -> [256, 7] (the left pair wins).
    """
    raise NotImplementedError("merge_pair: your code here (chapter 3)")


def train_merges(text: str, num_merges: int) -> dict[tuple[int, int], int]:
    """Learn up to `num_merges` BPE merges from `text`. Returns {pair: new_id}, in learned order.

    1. start from the text's UTF-8 bytes, as a list of ints (every id is in 0..255);
    2. repeat num_merges times:
         count the pairs of the *current* ids; stop early if there are none;
         take the most frequent pair; on a tie, the smaller pair wins, comparing first ids
                then second ids (as tuples compare), so that the result is deterministic;
         the i-th merge (i = 0, 1, ...) gets the id 256 + i;
         merge that pair everywhere with merge_pair, and record it with its new id.

    Counting again after each merge matters: merged tokens form new pairs ((b"t", b"he") can only
    be counted once b"he" exists).
    """
    raise NotImplementedError("train_merges: your code here (chapter 3)")


def encode(text: str, merges: dict[tuple[int, int], int]) -> list[int]:
    """Encode `text` with learned `merges` (as returned by train_merges) -> list of ids.

    Start from the UTF-8 bytes. Repeatedly find, among the adjacent pairs present, the one that
    was learned *first* (smallest new id in `merges`) and merge it everywhere; stop when no pair
    present is in `merges`. This replays training in order, so the same text gives the same
    tokens as during training. (tiktoken does the same thing, in Rust.)

    Hint: give every pair present a rank, its new id in the merges, and a pair that was never
    learned a rank larger than any; the pair of smallest rank is the one learned first (min,
    with a key function, finds it in one pass). Do not pick the pair most frequent in *this*
    text: that is not how the merges were learned.
    """
    raise NotImplementedError("encode: your code here (chapter 3)")


def assistant_mask(ids: list[int], assistant_id: int, eot_id: int) -> list[bool]:
    """The loss mask of a rendered conversation: True exactly where the model is trained.

    A conversation rendered with the chat template looks like
        {system}<|user|>{question}<|assistant|>{answer}<|endoftext|><|user|>{question}...
    Return one bool per id: True on every answer token *and* on the <|endoftext|> that closes
    the answer (so the model learns to stop), False everywhere else: the system line, the user's
    turns, and the role tokens themselves (<|assistant|> is given, never predicted by the model).
    An answer starts right after an <|assistant|> token and ends at the next <|endoftext|>.

    Example (A = assistant_id, E = eot_id): [5, A, 7, 8, E, 9] -> [F, F, T, T, T, F].
    """
    raise NotImplementedError("assistant_mask: your code here (chapter 3)")


def train_merges_on_words(
    word_counts: dict[str, int], num_merges: int
) -> dict[tuple[int, int], int]:
    """Stretch: BPE on pre-tokenised words. {word: count} -> {pair: new_id}, in learned order.

    Real tokenizers never run BPE on raw text. GPT-2's regex (PAT_STR in minillava/bpe.py) first
    cuts the text into words, numbers, punctuation and spaces, and merges never cross those
    cuts: " red" can become one token, "red." never swallows the full stop. The input here is
    what that cut leaves, counted: word_counts = {" red": 812, " circle": 540, ":": 97, ...}
    (a word keeps its leading space). Text repeats itself, so a few megabytes of ShapesWorld hold
    only a few hundred distinct words: training on the distinct words is also much faster than
    training on the text.

    The same loop as train_merges, over many short sequences instead of one long one:
      - each word is its own list of ids (its UTF-8 bytes at first), next to its count;
      - a pair inside a word counts as many times as the word occurs ({"ab": 1, "cd": 3}: the
        pair of "cd" counts 3, that of "ab" 1), and no pair spans the end of one word and the
        start of the next;
      - the most frequent pair wins, ties to the smallest pair (as in train_merges); the i-th
        merge gets the id 256 + i and is applied inside every word; then count again;
      - stop early once no word holds a pair (every word is one token).

    The result must be exactly the merges minillava.bpe.train_bpe learns from the texts those
    words came from. The library goes one step further, which you may too: after a merge only
    the words that contain the pair change, so it keeps, for every pair, the set of words it
    occurs in, and updates the counts of those words alone instead of counting everything again.
    """
    raise NotImplementedError("train_merges_on_words: your code here (chapter 3, stretch)")
