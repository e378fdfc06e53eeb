"""Chapter 3: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.bpe, tiktoken through minillava.tokenizer) agrees with
solutions/ch03_tokens.py, so the chapter, the notebook and the reference cannot drift apart.
"""

from collections import Counter

import tiktoken

from minillava import bpe
from minillava.data.instruct import make_conversations, world_text
from minillava.data.shapes import ShapesWorld
from minillava.tokenizer import get_tokenizer
from solutions import ch03_tokens as solution

# --- wrong versions -----------------------------------------------------------------------------


def non_overlapping_pairs(ids):
    return dict(Counter(zip(ids[::2], ids[1::2], strict=False)))


def misses_last_pair(ids):
    return dict(Counter(zip(ids[:-2], ids[1:-1], strict=False)))


def test_count_pairs_rejects(rejects):
    rejects(
        "ch03.count_pairs",
        non_overlapping_pairs,
        mentions=["non-overlapping", "pairs overlap"],
        hint_mentions=["right-hand neighbour"],
    )
    rejects("ch03.count_pairs", misses_last_pair, mentions=["last pair is missing"])


def merges_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            return ids[:i] + [new_id] + ids[i + 2 :]
    return list(ids)


def merges_without_skipping(ids, pair, new_id):
    """Moves on by one after a merge: the pair's second id is read again."""
    merged = []
    for i, token in enumerate(ids):
        merged.append(new_id if tuple(ids[i : i + 2]) == pair else token)
    return merged


def drops_last_id(ids, pair, new_id):
    merged, i = [], 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == pair:
            merged.append(new_id)
            i += 2
        else:
            merged.append(ids[i])
            i += 1
    return merged


def test_merge_pair_rejects(rejects):
    rejects(
        "ch03.merge_pair",
        merges_first_only,
        mentions=["only the first occurrence"],
        hint_mentions=["jump over both"],
    )
    rejects("ch03.merge_pair", merges_without_skipping, mentions=["moved on by one"])
    rejects("ch03.merge_pair", drops_last_id, mentions=["last id is missing"])


def never_recounts(text, num_merges):
    """Counts the pairs once, on the bytes, and takes the most frequent ones."""
    ids = list(text.encode("utf-8"))
    counts = solution.count_pairs(ids)
    ranked = sorted(counts, key=lambda p: (-counts[p], p))[:num_merges]
    return {pair: 256 + i for i, pair in enumerate(ranked)}


def ids_from_zero(text, num_merges):
    merges = solution.train_merges(text, num_merges)
    return {pair: i for i, pair in enumerate(merges)}


def ties_to_first_seen(text, num_merges):
    """max over a Counter: a tie goes to the pair that appears first in the text."""
    ids, merges = list(text.encode("utf-8")), {}
    for i in range(num_merges):
        counts = Counter(zip(ids, ids[1:], strict=False))
        if not counts:
            break
        best = max(counts, key=counts.get)
        ids = solution.merge_pair(ids, best, 256 + i)
        merges[best] = 256 + i
    return merges


def test_train_merges_rejects(rejects):
    rejects(
        "ch03.train_merges",
        never_recounts,
        mentions=["single bytes", "counted once"],
        hint_mentions=["again after each merge"],
    )
    rejects("ch03.train_merges", ids_from_zero, mentions=["got the id 0", "new id 256"])
    rejects(
        "ch03.train_merges",
        ties_to_first_seen,
        mentions=["appears first in the text", "smallest pair wins"],
        hint_mentions=["dictionary orders words"],
    )


def most_frequent_first(text, merges):
    ids = list(text.encode("utf-8"))
    while True:
        counts = Counter(p for p in zip(ids, ids[1:], strict=False) if p in merges)
        if not counts:
            return ids
        pair = max(counts, key=lambda p: (counts[p], -merges[p]))
        ids = solution.merge_pair(ids, pair, merges[pair])


def leftmost_first(text, merges):
    ids = list(text.encode("utf-8"))
    while True:
        found = [i for i in range(len(ids) - 1) if (ids[i], ids[i + 1]) in merges]
        if not found:
            return ids
        i = found[0]
        ids = ids[:i] + [merges[ids[i], ids[i + 1]]] + ids[i + 2 :]


def test_encode_rejects(rejects):
    rejects(
        "ch03.encode",
        most_frequent_first,
        mentions=["most frequent in this text"],
        hint_mentions=["learned first"],
    )
    rejects("ch03.encode", leftmost_first, mentions=["leftmost pair"])


def without_eot(ids, assistant_id, eot_id):
    mask = solution.assistant_mask(ids, assistant_id, eot_id)
    return [m and token != eot_id for m, token in zip(mask, ids, strict=True)]


def with_assistant_token(ids, assistant_id, eot_id):
    mask = solution.assistant_mask(ids, assistant_id, eot_id)
    return [m or token == assistant_id for m, token in zip(mask, ids, strict=True)]


def never_switches_off(ids, assistant_id, eot_id):
    first = ids.index(assistant_id) + 1 if assistant_id in ids else len(ids)
    return [i >= first for i in range(len(ids))]


def test_assistant_mask_rejects(rejects):
    rejects(
        "ch03.assistant_mask",
        without_eot,
        mentions=["learns to stop"],
        hint_mentions=["that one included"],
    )
    rejects("ch03.assistant_mask", with_assistant_token, mentions=["token after it"])
    rejects("ch03.assistant_mask", never_switches_off, mentions=["never switches off"])


# --- train_merges_on_words (stretch) ------------------------------------------------------------


def joins_the_words(word_counts, num_merges):
    """Writes every word out as often as it occurs, one text, and trains on that."""
    text = "".join(word * count for word, count in word_counts.items())
    return solution.train_merges(text, num_merges)


def each_word_once(word_counts, num_merges):
    return solution.train_merges_on_words(dict.fromkeys(word_counts, 1), num_merges)


def counts_pairs_once(word_counts, num_merges):
    """Counts the pairs of the words once, on the bytes, and takes the most frequent ones."""
    counts = Counter()
    for word, count in word_counts.items():
        ids = list(word.encode("utf-8"))
        for pair in zip(ids, ids[1:], strict=False):
            counts[pair] += count
    ranked = sorted(counts, key=lambda p: (-counts[p], p))[:num_merges]
    return {pair: 256 + i for i, pair in enumerate(ranked)}


def word_ties_to_first_seen(word_counts, num_merges):
    words = [list(word.encode("utf-8")) for word in word_counts]
    merges = {}
    for i in range(num_merges):
        counts = Counter()
        for ids, count in zip(words, word_counts.values(), strict=True):
            for pair in zip(ids, ids[1:], strict=False):
                counts[pair] += count
        if not counts:
            break
        best = max(counts, key=counts.get)
        words = [solution.merge_pair(ids, best, 256 + i) for ids in words]
        merges[best] = 256 + i
    return merges


def test_train_merges_on_words_rejects(rejects):
    rejects(
        "ch03.train_merges_on_words",
        joins_the_words,
        mentions=["inside no word", "word boundary"],
        hint_mentions=["its own list of ids"],
    )
    rejects(
        "ch03.train_merges_on_words",
        each_word_once,
        mentions=["counted each word once"],
        hint_mentions=["word's count"],
    )
    rejects(
        "ch03.train_merges_on_words", counts_pairs_once, mentions=["counted again", "merged words"]
    )
    rejects("ch03.train_merges_on_words", word_ties_to_first_seen, mentions=["tie", "seen first"])


# --- library == solutions -----------------------------------------------------------------------

TEXT = (
    "a large red circle and a small blue square. the red circle is left of the blue square. "
    "there are two shapes: a red circle and a blue square, and the letter A."
)


def _ranks_of(merges: dict) -> dict[bytes, int]:
    vocab = {i: bytes([i]) for i in range(256)}
    for (a, b), new_id in merges.items():
        vocab[new_id] = vocab[a] + vocab[b]
    return {token: i for i, token in vocab.items()}


def test_library_bpe_matches_solution():
    merges = solution.train_merges(TEXT, 40)
    assert len(merges) == 40
    ranks = bpe.train_bpe([TEXT], 256 + 40, pat_str=r"(?s).+")
    assert _ranks_of(merges) == ranks
    assert bpe._merge([7, 7, 7, 1, 7, 7], (7, 7), 256) == solution.merge_pair(
        [7, 7, 7, 1, 7, 7], (7, 7), 256
    )


def test_tiktoken_encodes_like_solution():
    merges = solution.train_merges(TEXT, 40)
    encoding = tiktoken.Encoding(
        "t", pat_str=r"(?s).+", mergeable_ranks=_ranks_of(merges), special_tokens={}
    )
    for text in ["the red circle", "a small blue square and the letter A.", "zzz", ""]:
        assert solution.encode(text, merges) == encoding.encode_ordinary(text)


def test_library_bpe_on_words_matches_solution():
    """train_bpe (GPT-2's pre-tokenisation, incremental counts) == the stretch, merge for merge."""
    texts = list(world_text("train", n=20)) + [TEXT]
    word_counts = {piece.decode("utf-8"): n for piece, n in bpe.pretokenize(texts).items()}
    for num_merges in (60, 1000):  # 1000: more than there is to learn, both stop early
        merges = solution.train_merges_on_words(word_counts, num_merges)
        assert _ranks_of(merges) == bpe.train_bpe(texts, 256 + num_merges)
    assert len(merges) < 1000


def test_tokenizer_render_mask_matches_solution():
    tok = get_tokenizer()
    sample = ShapesWorld("train", size=2)[1]
    import random

    for record in make_conversations(sample.scene, sample.captions, random.Random(0)):
        ids, mask = tok.render(record["conversations"])
        assert solution.assistant_mask(ids, tok.assistant_id, tok.eot_id) == mask
        assert any(mask)
