"""The hand-written byte-level BPE trainer (minillava/bpe.py)."""

import base64
import random

import pytest
import regex
import tiktoken
import tiktoken.load

from minillava.bpe import PAT_STR, load_ranks, pretokenize, save_ranks, train_bpe

TOY = ["hug hug hug pug pun"]

SENTENCES = [
    "There is a small red circle in the top left.",
    "A large blue square is below the green triangle.",
    "The red circle is to the left of the blue square.",
    "How many shapes are there? There are three shapes.",
    "What colour is the triangle? The triangle is green.",
] * 20


def encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    return tiktoken.Encoding("test", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})


def test_pretokenize_keeps_leading_space_with_word():
    counts = pretokenize(TOY)
    assert counts == {b"hug": 1, b" hug": 2, b" pug": 1, b" pun": 1}


def test_first_merges_on_toy_corpus_computed_by_hand():
    # Pre-tokens: "hug" x1, " hug" x2, " pug" x1, " pun" x1. Pair counts (weighted):
    #   (u,g)=4  (h,u)=3  (" ",h)=2  (" ",p)=2  (p,u)=2  (u,n)=1   -> merge 1: "ug"
    # Now (h,ug)=3 is the most frequent                           -> merge 2: "hug"
    # Words: [hug], [" ",hug] x2, [" ",p,ug], [" ",p,u,n]: (" ",hug)=2 and (" ",p)=2 tie;
    # ties go to the smaller ids: (32,112) = " p" before (32,257) = " hug"  -> merges 3, 4.
    ranks = train_bpe(TOY, 256 + 4)
    merges = sorted((r, t) for t, r in ranks.items() if r >= 256)
    assert [t for _, t in merges] == [b"ug", b"hug", b" p", b" hug"]


def test_single_bytes_come_first_so_any_text_round_trips():
    ranks = train_bpe(SENTENCES, 300)
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert sorted(ranks.values()) == list(range(len(ranks)))  # contiguous, no duplicates
    enc = encoding(ranks)
    for text in [
        "naïve café 🙂 ✓",
        "日本語のテキスト",
        "\x00\x1f\t\r\n",
        "  spaces  ",
        "ü" * 50,
        "",
    ]:
        assert enc.decode(enc.encode(text)) == text


def test_merges_reduce_token_count_monotonically():
    text = " ".join(SENTENCES)
    counts = [len(encoding(train_bpe(SENTENCES, n)).encode(text)) for n in (256, 280, 320, 400)]
    assert counts[0] == len(text.encode("utf-8"))  # no merges: one token per byte
    assert all(a > b for a, b in zip(counts, counts[1:], strict=False)), counts
    assert counts[-1] < counts[0] / 3


def test_frequent_words_become_single_tokens_in_tiktoken():
    enc = encoding(train_bpe(SENTENCES, 400))
    for word in [" circle", " triangle", " square", "There"]:
        assert len(enc.encode(word)) == 1, word


def test_training_is_deterministic():
    assert train_bpe(SENTENCES, 350) == train_bpe(list(SENTENCES), 350)


def test_stops_when_nothing_left_to_merge():
    ranks = train_bpe(["ab ab"], 1000)
    # "ab", " ab" -> merges: "ab" (count 2), then " ab" (" ", "ab"). Nothing else.
    assert len(ranks) == 258
    assert set(ranks) - {bytes([b]) for b in range(256)} == {b"ab", b" ab"}


def test_ranks_unique_and_contiguous_on_random_corpora():
    # tiktoken needs one rank per token bytes and ranks 0..n-1; repetitive corpora over a tiny
    # alphabet are where two different pairs could spell the same bytes ("ab"+"c", "a"+"bc").
    rng = random.Random(0)
    for _ in range(50):
        alphabet = rng.choice(["a", "ab", "abc", "aab"])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9))) for _ in range(6)]
        ranks = train_bpe(texts, 300)
        assert sorted(ranks.values()) == list(range(len(ranks)))
        enc = encoding(ranks)
        assert all(enc.decode(enc.encode(t)) == t for t in texts)


def test_vocab_size_below_256_is_an_error():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(TOY, 100)


def test_saved_file_loads_back_identically(tmp_path, monkeypatch):
    ranks = train_bpe(SENTENCES, 320)
    path = tmp_path / "toy.tiktoken"
    save_ranks(ranks, path)
    first = path.read_text().splitlines()[0]
    assert first == base64.b64encode(b"\x00").decode() + " 0"
    assert load_ranks(path) == ranks
    # tiktoken's own reader agrees (cache disabled so it reads the file itself, nothing else).
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    assert tiktoken.load.load_tiktoken_bpe(str(path)) == ranks


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        load_ranks(tmp_path / "missing.tiktoken")
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("AA== 0\nnot-a-line\n")
    with pytest.raises(ValueError, match="bad.tiktoken:2"):
        load_ranks(bad)


def test_cli_trains_on_the_fixed_prompts_too(tmp_path, capsys):
    # `python -m minillava.vocabulary train` adds the system line and the data engine's fixed
    # prompts to world_text: the short-answer suffix (in no world_text string) must come out one
    # token a word.
    from minillava.data.instruct import ANSWER_SUFFIX, FIXED_PROMPTS
    from minillava.tokenizer import SYSTEM, get_tokenizer
    from minillava.vocabulary import main

    path = tmp_path / "small.tiktoken"
    main(["train", "--vocab-size", "768", "--n-scenes", "20", "--out", str(path)])
    assert f"-> {path}" in capsys.readouterr().out
    tok = get_tokenizer(str(path))
    pattern = regex.compile(PAT_STR)
    for text in (SYSTEM, *FIXED_PROMPTS):
        assert len(tok.encode_ordinary(text)) == len(pattern.findall(text)), text
    assert [tok.decode([i]) for i in tok.encode_ordinary(ANSWER_SUFFIX)][:2] == ["\n", "Answer"]
