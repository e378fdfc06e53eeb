"""Chapter 3: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.bpe, tiktoken through minillava.tokenizer) agrees with
solutions/ch03_tokens.py, so the chapter, the notebook and the reference cannot drift apart.
"""

from collections import Counter

import tiktoken

from minillava import bpe
from minillava.data.instruct import make_conversations
from minillava.data.shapes import ShapesWorld
from minillava.tokenizer import get_tokenizer
from solutions import ch03_tokens as solution

# --- wrong versions -----------------------------------------------------------------------------


def non_overlapping_pairs(ids):
    return dict(Counter(zip(ids[::2], ids[1::2], strict=False)))


def test_count_pairs_rejects(rejects):
    rejects("ch03.count_pairs", non_overlapping_pairs, mentions=["non-overlapping", "overlap"])


def merges_first_only(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            return ids[:i] + [new_id] + ids[i + 2 :]
    return list(ids)


def test_merge_pair_rejects(rejects):
    rejects("ch03.merge_pair", merges_first_only, mentions=["only the first occurrence"])


def never_recounts(text, num_merges):
    """Counts the pairs once, on the bytes, and takes the most frequent ones."""
    ids = list(text.encode("utf-8"))
    counts = solution.count_pairs(ids)
    ranked = sorted(counts, key=lambda p: (-counts[p], p))[:num_merges]
    return {pair: 256 + i for i, pair in enumerate(ranked)}


def ids_from_zero(text, num_merges):
    merges = solution.train_merges(text, num_merges)
    return {pair: i for i, pair in enumerate(merges)}


def test_train_merges_rejects(rejects):
    rejects("ch03.train_merges", never_recounts, mentions=["count the pairs again"])
    rejects("ch03.train_merges", ids_from_zero, mentions=["new id 256"])


def most_frequent_first(text, merges):
    ids = list(text.encode("utf-8"))
    while True:
        counts = Counter(p for p in zip(ids, ids[1:], strict=False) if p in merges)
        if not counts:
            return ids
        pair = max(counts, key=lambda p: (counts[p], -merges[p]))
        ids = solution.merge_pair(ids, pair, merges[pair])


def test_encode_rejects(rejects):
    rejects("ch03.encode", most_frequent_first, mentions=["learned first"])


def without_eot(ids, assistant_id, eot_id):
    mask = solution.assistant_mask(ids, assistant_id, eot_id)
    return [m and token != eot_id for m, token in zip(mask, ids, strict=True)]


def with_assistant_token(ids, assistant_id, eot_id):
    mask = solution.assistant_mask(ids, assistant_id, eot_id)
    return [m or token == assistant_id for m, token in zip(mask, ids, strict=True)]


def test_assistant_mask_rejects(rejects):
    rejects("ch03.assistant_mask", without_eot, mentions=["learns to stop"])
    rejects("ch03.assistant_mask", with_assistant_token, mentions=["token after it"])


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


def test_tokenizer_render_mask_matches_solution():
    tok = get_tokenizer()
    sample = ShapesWorld("train", size=2)[1]
    import random

    for record in make_conversations(sample.scene, sample.captions, random.Random(0)):
        ids, mask = tok.render(record["conversations"])
        assert solution.assistant_mask(ids, tok.assistant_id, tok.eot_id) == mask
        assert any(mask)
