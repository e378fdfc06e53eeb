"""The tokenizer: text <-> token ids, and the chat template that teaches the model to answer.

Two layers:

1. **Vocabulary.** A ``tiktoken.Encoding`` built from BPE merges we trained ourselves on ShapesWorld
   text (``minillava/bpe.py``; shipped as ``minillava/assets/shapesworld.tiktoken``, loaded from
   disk, never downloaded). Byte-level, so ANY string round-trips: ``decode(encode(x)) == x``.
   Five special tokens are appended after the merges (one id each, never split by BPE):

       <|endoftext|>   end of a document, and end of the assistant's turn (LLaVA v1 uses </s>)
       <image>         placeholder that the model replaces by the image's patch embeddings
       <|pad|>         padding in batches (never attended to, never trained on)
       <|user|>        the user's turn starts (LLaVA v1 writes "USER:")
       <|assistant|>   the assistant's turn starts (LLaVA v1 writes "ASSISTANT:")

   ``get_tokenizer("gpt2")`` / ``get_tokenizer("cl100k_base")`` give OpenAI's vocabularies with the
   same special tokens added, but only if tiktoken already has their files in its local cache.

2. **Chat template** (LLaVA v1 style). LLaVA v1 renders a conversation as

       {system} USER: <image>\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: ...

   Ours is the same with the roles as special tokens, so a role can never be confused with text::

       {system}<|user|><image>\\n{question}<|assistant|>{answer}<|endoftext|><|user|>{question}...

   For example ``[{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
   {"from": "gpt", "value": "The circle is red."}]`` renders (system line elided) as::

       ...<|user|><image>\\nWhat colour is the circle?<|assistant|>The circle is red.<|endoftext|>
                                                                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
                                                                  the only tokens with mask True

   ``render`` returns the ids and a boolean mask that is True exactly on the assistant's answer
   tokens and the ``<|endoftext|>`` that closes each answer: the training loss is computed only
   there (the model learns to answer and to stop, not to predict the user's questions).
   ``render_prompt`` returns the same ids up to and including the last ``<|assistant|>``: feed it
   to ``generate`` and stop at ``stop_ids``.

Each piece (system line, a turn's text) is encoded on its own and the ids are concatenated, as LLaVA
does. So the prompt is a token-for-token prefix of the full conversation, and each answer's tokens
are exactly ``encode(answer)``, whatever comes before it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import tiktoken

from minillava.bpe import PAT_STR, load_ranks

ASSETS = Path(__file__).parent / "assets"
SHAPESWORLD_FILE = ASSETS / "shapesworld.tiktoken"

EOT = "<|endoftext|>"
IMAGE = "<image>"
PAD = "<|pad|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
SPECIAL_TOKENS = (EOT, IMAGE, PAD, USER, ASSISTANT)  # appended after the merges, in this order

# The system line opens every sequence the model reads, in training and in chat, so each of its
# tokens is paid for in every sequence, and on a CPU every position costs time. Short on purpose:
# two sentences in LLaVA v1's style ("A chat between a curious user and an assistant ...") took 29
# tokens; this one takes 8 and says the same to a model that only ever talks about one image.
SYSTEM = "The assistant answers questions about the image."

HUMAN_ROLES = ("human", "user")  # LLaVA JSON says "human"/"gpt"; accept the OpenAI names too
GPT_ROLES = ("gpt", "assistant")


class Tokenizer:
    """A tiktoken Encoding plus the ids of the special tokens and the chat template.

    Attributes: ``encoding`` (the tiktoken.Encoding), ``vocab_size`` (number of ids, special tokens
    included: use it as the model's vocab_size), ``eot_id``, ``pad_id``, ``image_id``, ``user_id``,
    ``assistant_id``, ``stop_ids`` (generation stops at any of them), ``system`` (the system line),
    ``path`` (the .tiktoken file it came from, or None).
    """

    IMAGE: str = IMAGE

    def __init__(
        self, encoding: tiktoken.Encoding, system: str = SYSTEM, path: Path | None = None
    ) -> None:
        missing = [tok for tok in SPECIAL_TOKENS if tok not in encoding._special_tokens]
        if missing:
            raise ValueError(f"encoding {encoding.name!r} lacks the special tokens {missing}")
        self.encoding = encoding
        self.name = encoding.name
        self.path = path  # the .tiktoken file it was loaded from (None for OpenAI encodings)
        self.system = system
        self.vocab_size: int = encoding.n_vocab
        self.eot_id: int = encoding.encode_single_token(EOT)
        self.image_id: int = encoding.encode_single_token(IMAGE)
        self.pad_id: int = encoding.encode_single_token(PAD)
        self.user_id: int = encoding.encode_single_token(USER)
        self.assistant_id: int = encoding.encode_single_token(ASSISTANT)
        # End of answer; <|user|> too, in case a model skips the <|endoftext|> and starts a turn.
        self.stop_ids: tuple[int, ...] = (self.eot_id, self.user_id)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    # -- plain text --------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Text -> ids. Special tokens written in the text ("<image>", ...) become their ids."""
        return self.encoding.encode(text, allowed_special="all")

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, special-token strings treated as ordinary text (for untrusted answers)."""
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        """Ids (list, tuple or 1-D tensor) -> text. Special tokens are written out as text."""
        if hasattr(ids, "tolist"):  # torch tensor / numpy array
            ids = ids.tolist()
        return self.encoding.decode([int(i) for i in ids])

    # -- chat template -----------------------------------------------------------------------
    def _encode_human(self, text: str) -> list[int]:
        # Only <image> is special in a user's message; "<|endoftext|>" typed by a user stays text.
        return self.encoding.encode(text, allowed_special={IMAGE}, disallowed_special=())

    def render(
        self, conversation: Sequence[dict], add_system: bool = True
    ) -> tuple[list[int], list[bool]]:
        """LLaVA turns -> (ids, mask). mask[i] is True iff ids[i] is an answer token or its EOT.

        `conversation` is ``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
        "value": ...}, ...]``: it starts with a human turn and roles alternate.
        """
        turns = _check_turns(conversation)
        ids: list[int] = self.encode_ordinary(self.system) if add_system else []
        mask: list[bool] = [False] * len(ids)
        for role, text in turns:
            if role == "human":
                part = [self.user_id] + self._encode_human(text) + [self.assistant_id]
                ids += part
                mask += [False] * len(part)
            else:
                part = self.encode_ordinary(text) + [self.eot_id]
                ids += part
                mask += [True] * len(part)
        return ids, mask

    def render_prompt(self, conversation: Sequence[dict], add_system: bool = True) -> list[int]:
        """Ids of the conversation up to where the assistant starts answering.

        The conversation should end with a human turn. If it ends with a gpt turn, that last answer
        is left out (handy to ask a model the last question of a reference conversation). The
        result is always a prefix of ``render(conversation)[0]``.
        """
        conversation = list(conversation)
        if conversation and _role(conversation[-1], len(conversation) - 1) == "gpt":
            conversation = conversation[:-1]
        if not conversation:
            raise ValueError("render_prompt needs at least one human turn, got none")
        ids, _ = self.render(conversation, add_system=add_system)
        return ids


def _role(turn: dict, index: int) -> str:
    """Normalise a turn's role to "human" or "gpt", with a clear error otherwise."""
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise ValueError(f"turn {index} must be a dict with 'from' and 'value', got {turn!r}")
    role = turn["from"]
    if role in HUMAN_ROLES:
        return "human"
    if role in GPT_ROLES:
        return "gpt"
    raise ValueError(f"turn {index}: 'from' must be one of {HUMAN_ROLES + GPT_ROLES}, got {role!r}")


def _check_turns(conversation: Sequence[dict]) -> list[tuple[str, str]]:
    """Validate LLaVA turns: human first, roles alternating, string values."""
    turns = []
    for index, turn in enumerate(conversation):
        role = _role(turn, index)
        expected = "human" if index % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(
                f"turn {index} is from {role!r} but should be from {expected!r}: a conversation "
                "starts with the human and roles alternate"
            )
        if not isinstance(turn["value"], str):
            raise ValueError(f"turn {index}: 'value' must be a str, got {type(turn['value'])}")
        turns.append((role, turn["value"]))
    return turns


# -- loading ---------------------------------------------------------------------------------


def build_encoding(name: str, mergeable_ranks: dict[bytes, int], pat_str: str = PAT_STR):
    """tiktoken.Encoding from merge ranks, with SPECIAL_TOKENS appended after the merges."""
    first = max(mergeable_ranks.values()) + 1
    special = {token: first + i for i, token in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special
    )


@lru_cache(maxsize=4)
def _load_encoding(name: str, path: str, mtime: float) -> tiktoken.Encoding:
    # mtime is part of the cache key so a regenerated file is picked up.
    return build_encoding(name, load_ranks(path))


# OpenAI's files, as tiktoken_ext.openai_public names them: URL and sha256. tiktoken caches each
# download in its cache dir under sha1(url); we only ever read that cache, never the network.
_OPENAI_FILES = {
    "gpt2": [
        (
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        ),
        (
            "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        ),
    ],
    "cl100k_base": [
        (
            "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
            "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        ),
    ],
}


def tiktoken_cache_dir() -> str:
    """The directory tiktoken caches downloads in (same rule as tiktoken.load.read_file_cached)."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        return os.environ["TIKTOKEN_CACHE_DIR"]
    if "DATA_GYM_CACHE_DIR" in os.environ:
        return os.environ["DATA_GYM_CACHE_DIR"]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _check_openai_cached(name: str) -> None:
    """Raise a clear error unless every file of `name` is in tiktoken's cache, intact."""
    cache_dir = tiktoken_cache_dir()
    how = (
        f'On a machine with internet, run: python -c "import tiktoken; '
        f"tiktoken.get_encoding('{name}')\" with TIKTOKEN_CACHE_DIR set to a folder, then copy "
        f"that folder here and point TIKTOKEN_CACHE_DIR at it. Or use get_tokenizer('shapesworld'),"
        " which ships with minillava."
    )
    if not cache_dir:
        raise RuntimeError(
            f"tiktoken encoding {name!r} is not cached: TIKTOKEN_CACHE_DIR is empty (caching off), "
            f"and minillava never downloads. {how}"
        )
    for url, sha256 in _OPENAI_FILES[name]:
        path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
        if not os.path.isfile(path):
            raise RuntimeError(
                f"tiktoken encoding {name!r} is not cached: {path} (the cache of {url}) does not "
                f"exist, and minillava never downloads. {how}"
            )
        with open(path, "rb") as f:
            if hashlib.sha256(f.read()).hexdigest() != sha256:
                # tiktoken would silently try to re-download a file that fails its hash.
                raise RuntimeError(
                    f"tiktoken encoding {name!r}: cached file {path} (from {url}) is corrupt "
                    f"(sha256 mismatch). Delete it. {how}"
                )


def get_tokenizer(name: str = "shapesworld") -> Tokenizer:
    """Load a tokenizer: "shapesworld" (shipped), or "gpt2" / "cl100k_base" if cached locally.

    A path to a ``.tiktoken`` file also works (trained with ``python -m minillava.vocabulary
    train``); the tokenizer is then named after the file.
    """
    if name == "shapesworld" or name.endswith(".tiktoken"):
        path = SHAPESWORLD_FILE if name == "shapesworld" else Path(name)
        if not path.is_file():
            raise FileNotFoundError(
                f"tokenizer file {path} not found. Regenerate it with: "
                f"python -m minillava.vocabulary train --out {path}"
            )
        name = "shapesworld" if name == "shapesworld" else path.stem
        return Tokenizer(_load_encoding(name, str(path), path.stat().st_mtime), path=path)
    if name in _OPENAI_FILES:
        _check_openai_cached(name)
        base = tiktoken.get_encoding(name)  # reads the cache only: we just checked it is there
        first = base.n_vocab  # append our special tokens after the base vocabulary
        special = dict(base._special_tokens)
        for token in SPECIAL_TOKENS:
            if token not in special:
                special[token] = first
                first += 1
        encoding = tiktoken.Encoding(
            f"{name}_chat",
            pat_str=base._pat_str,
            mergeable_ranks=base._mergeable_ranks,
            special_tokens=special,
        )
        return Tokenizer(encoding)
    raise ValueError(
        f"unknown tokenizer {name!r}: expected 'shapesworld', 'gpt2', 'cl100k_base' or a path to "
        "a .tiktoken file"
    )
