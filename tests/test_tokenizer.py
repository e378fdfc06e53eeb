"""The tokenizer (shipped ShapesWorld BPE) and the LLaVA-v1-style chat template."""

import random

import pytest
import regex
import tiktoken.load
import torch

from minillava import tokenizer as tokenizer_module
from minillava.bpe import PAT_STR, load_ranks
from minillava.data.instruct import ANSWER_SUFFIX, FIXED_PROMPTS, make_conversations, world_text
from minillava.data.shapes import ShapesWorld, make_captions
from minillava.tokenizer import (
    ASSISTANT,
    EOT,
    IMAGE,
    PAD,
    SHAPESWORLD_FILE,
    SPECIAL_TOKENS,
    USER,
    Tokenizer,
    get_tokenizer,
)

ODD_TEXTS = [
    "",
    " ",
    "\n\n\t  \r\n",
    "naïve café, Ångström, straße",
    "日本語のテキストと한국어",
    "emoji 🙂🟥🔺 and ZWJ 👩‍👩‍👧 and flags 🇫🇷",
    "combining e\u0301 vs \u00e9, RTL \u05e9\u05dc\u05d5\u05dd",
    "\x00\x01\x7f control \u200b zero-width",
    "a red circle.a red circle!!!???",
    "'s 're 've 'll 'd CAPITALS MiXeD 12345 3.14159",
    "<image> <|endoftext|> <|pad|> <|user|> <|assistant|> <imag <|user",
    "x" * 1000,
]

CONVERSATION = [
    {"from": "human", "value": "<image>\nWhat colour is the circle?"},
    {"from": "gpt", "value": "The circle is red."},
    {"from": "human", "value": "How many shapes are there?"},
    {
        "from": "gpt",
        "value": "There are 3 shapes: a red circle, a blue square and a green triangle.",
    },
    {"from": "human", "value": "Is there a star?"},
    {"from": "gpt", "value": "No."},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer("shapesworld")


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    # held-out scenes (the BPE was trained on "train"); about ten strings per scene
    return list(world_text(split="val", n=300, seed=0))


def masked_text(tok: Tokenizer, ids: list[int], mask: list[bool]) -> str:
    return tok.decode([i for i, keep in zip(ids, mask, strict=True) if keep])


def answers_joined(conversation: list[dict]) -> str:
    return "".join(t["value"] + EOT for t in conversation if t["from"] == "gpt")


def test_vocabulary_size_and_special_token_ids(tok):
    ranks = load_ranks(SHAPESWORLD_FILE)
    assert sorted(ranks.values()) == list(range(len(ranks)))
    V = tok.vocab_size
    assert V == tok.encoding.n_vocab == len(ranks) + len(SPECIAL_TOKENS)
    assert 512 <= V <= 768  # trained with --vocab-size 768 (stops once every word is a token)
    ids = [tok.eot_id, tok.image_id, tok.pad_id, tok.user_id, tok.assistant_id]
    # appended after the merges, in SPECIAL_TOKENS order: the last five ids
    assert ids == list(range(V - len(SPECIAL_TOKENS), V))
    for token, token_id in zip(SPECIAL_TOKENS, ids, strict=True):
        assert tok.encode(token) == [token_id], token
        assert tok.decode([token_id]) == token
    assert tok.eot_id in tok.stop_ids
    assert Tokenizer.IMAGE == IMAGE == "<image>"


def test_special_tokens_inside_text_are_recognised(tok):
    ids = tok.encode("<image>\nWhat is this?")
    assert ids[0] == tok.image_id and ids.count(tok.image_id) == 1
    assert tok.image_id not in tok.encode_ordinary("<image>")  # ordinary: plain characters


def test_round_trip_on_world_text(tok, corpus):
    assert len(corpus) > 2500
    for text in corpus:
        assert tok.decode(tok.encode(text)) == text


def test_round_trip_on_odd_unicode(tok):
    for text in ODD_TEXTS:
        assert tok.decode(tok.encode(text)) == text, text
        assert tok.decode(tok.encode_ordinary(text)) == text, text


def test_vocabulary_compresses_world_text(tok, corpus):
    # A vocabulary trained on this text must do far better than one token per byte.
    n_bytes = sum(len(t.encode("utf-8")) for t in corpus)
    n_tokens = sum(len(tok.encode(t)) for t in corpus)
    assert n_bytes / n_tokens > 3.0, n_bytes / n_tokens


def test_fixed_strings_cost_one_token_per_word(tok):
    # The system line opens every sequence and the short-answer suffix ends every VQA prompt: the
    # BPE is trained on them (python -m minillava.vocabulary train), so each pre-token (a word
    # with its leading space, a punctuation run, the newline) is a single token. Fails if a
    # prompt is added or reworded without regenerating the vocabulary.
    pattern = regex.compile(PAT_STR)
    for text in (tok.system, *FIXED_PROMPTS):
        pieces = pattern.findall(text)
        tokens = [tok.decode([i]) for i in tok.encode_ordinary(text)]
        assert tokens == pieces, text
    assert len(tok.encode_ordinary(ANSWER_SUFFIX)) == 9  # "\n", "Answer", " with", ..., "."
    assert len(tok.encode_ordinary(tok.system)) <= 12  # paid in every sequence: keep it short


def test_cli_reports_the_lengths_the_model_pays_for(tok, capsys):
    from minillava.vocabulary import main

    main(["stats", "--n-scenes", "4"])
    out = capsys.readouterr().out
    assert f"vocab_size={tok.vocab_size}" in out
    assert "VQA training (1 Q/A)" in out and "conversation (caption)" in out
    assert f"the {len(tok.encode_ordinary(tok.system))}-token system line" in out
    assert f"the {len(tok.encode_ordinary(ANSWER_SUFFIX))}-token answer suffix" in out


def test_decode_accepts_tensors(tok):
    ids = tok.encode("a red circle")
    assert tok.decode(torch.tensor(ids)) == "a red circle"


def test_render_mask_is_exactly_the_answers(tok):
    ids, mask = tok.render(CONVERSATION)
    assert len(ids) == len(mask)
    assert masked_text(tok, ids, mask) == answers_joined(CONVERSATION)
    assert tok.decode(ids).startswith(tok.system + USER + IMAGE + "\n")
    # Unmasked: system, roles, questions, image. Each answer span starts right after <|assistant|>
    # and ends with <|endoftext|>.
    for i, keep in enumerate(mask):
        starts_answer = keep and not mask[i - 1]
        if starts_answer:
            assert ids[i - 1] == tok.assistant_id
        if keep and (i + 1 == len(mask) or not mask[i + 1]):
            assert ids[i] == tok.eot_id
    assert ids.count(tok.image_id) == 1 and not mask[ids.index(tok.image_id)]
    assert sum(i == tok.eot_id for i in ids) == 3


def test_render_without_system_and_answer_tokens_are_encode_of_answer(tok):
    ids, mask = tok.render(CONVERSATION[:2], add_system=False)
    question = tok.encode("<image>\nWhat colour is the circle?")
    answer = tok.encode("The circle is red.")
    assert ids == [tok.user_id, *question, tok.assistant_id, *answer, tok.eot_id]
    assert mask == [False] * (len(question) + 2) + [True] * (len(answer) + 1)


def test_render_mask_on_generated_conversations(tok):
    world = ShapesWorld(split="train", size=100, seed=0)
    rng = random.Random(0)
    n_multi_turn = 0
    for i in range(len(world)):
        scene = world.scene(i)  # annotation only, no pixels drawn
        for record in make_conversations(scene, make_captions(scene, rng), rng):
            conversation = record["conversations"]
            ids, mask = tok.render(conversation)
            assert masked_text(tok, ids, mask) == answers_joined(conversation)
            assert tok.decode(ids) == tok.system + "".join(
                (USER + t["value"] + ASSISTANT) if t["from"] == "human" else t["value"] + EOT
                for t in conversation
            )
            n_multi_turn += len(conversation) > 2
    assert n_multi_turn > 0


def test_special_strings_in_answers_and_questions_stay_text(tok):
    conversation = [
        {"from": "human", "value": "say <|endoftext|> please"},
        {"from": "gpt", "value": "<image> <|user|> done"},
    ]
    ids, mask = tok.render(conversation)
    # Only the template's own role/EOT tokens are special; a typed "<|endoftext|>" is text.
    assert ids.count(tok.eot_id) == 1 and ids[-1] == tok.eot_id
    assert tok.image_id not in ids and ids.count(tok.user_id) == 1
    assert masked_text(tok, ids, mask) == "<image> <|user|> done" + EOT


def test_render_prompt_is_prefix_of_render(tok):
    full, _ = tok.render(CONVERSATION)
    for n_turns in (1, 2, 3, 5, 6):
        prompt = tok.render_prompt(CONVERSATION[:n_turns])
        assert full[: len(prompt)] == prompt
        assert prompt[-1] == tok.assistant_id
    # A conversation ending with the assistant: its last answer is what the model should produce.
    prompt = tok.render_prompt(CONVERSATION)
    assert tok.decode(full[len(prompt) :]) == "No." + EOT


def test_bad_conversations_raise_clear_errors(tok):
    with pytest.raises(ValueError, match="turn 0"):
        tok.render([{"from": "gpt", "value": "hello"}])
    with pytest.raises(ValueError, match="turn 1"):
        tok.render([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])
    with pytest.raises(ValueError, match="'from' must be one of"):
        tok.render([{"from": "robot", "value": "a"}])
    with pytest.raises(ValueError, match="'value'"):
        tok.render([{"from": "human", "text": "a"}])
    with pytest.raises(ValueError, match="at least one human turn"):
        tok.render_prompt([])


def test_pad_token_is_not_eot(tok):
    assert tok.pad_id != tok.eot_id and tok.decode([tok.pad_id]) == PAD


# -- OpenAI encodings: only from tiktoken's local cache, never downloaded --------------------


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt by tiktoken to read a URL fails the test."""

    def refuse(path):
        raise AssertionError(f"tried to download {path}")

    monkeypatch.setattr(tiktoken.load, "read_file", refuse)


@pytest.mark.parametrize("name", ["gpt2", "cl100k_base"])
def test_openai_encoding_not_cached_is_a_clear_error(name, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match=f"{name}.*not cached.*TIKTOKEN_CACHE_DIR"):
        get_tokenizer(name)


def test_openai_encoding_with_caching_disabled_is_a_clear_error(monkeypatch, no_network):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(RuntimeError, match="not cached"):
        get_tokenizer("gpt2")


def test_openai_encoding_corrupt_cache_is_a_clear_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    url, _ = tokenizer_module._OPENAI_FILES["cl100k_base"][0]
    import hashlib

    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"not the real file")
    with pytest.raises(RuntimeError, match="corrupt"):
        get_tokenizer("cl100k_base")


def test_cache_dir_follows_tiktoken_rule(tmp_path, monkeypatch):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path / "gym"))
    assert tokenizer_module.tiktoken_cache_dir() == str(tmp_path / "gym")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tk"))
    assert tokenizer_module.tiktoken_cache_dir() == str(tmp_path / "tk")


def test_load_from_a_tiktoken_path(tmp_path, tok):
    path = tmp_path / "mine.tiktoken"
    path.write_bytes(SHAPESWORLD_FILE.read_bytes())
    mine = get_tokenizer(str(path))
    assert (mine.name, mine.path, tok.name, tok.path) == (
        "mine",
        path,
        "shapesworld",
        SHAPESWORLD_FILE,
    )
    assert mine.encode("<image>\na red circle") == tok.encode("<image>\na red circle")


def test_unknown_name_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'llama'"):
        get_tokenizer("llama")
    with pytest.raises(FileNotFoundError, match="python -m minillava.vocabulary train"):
        get_tokenizer(str(tmp_path / "nope.tiktoken"))
