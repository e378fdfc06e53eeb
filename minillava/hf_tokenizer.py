"""A pretrained checkpoint's own tokenizer, with the interface minillava's chat code calls.

minillava's models read ids from minillava's tokenizer (tokenizer.py: tiktoken BPE trained on
ShapesWorld). A pretrained LLaVA reads ids from *its* tokenizer: the same text must become the
same ids it was trained on, or its embeddings mean nothing. A LLaVA-1.5 checkpoint directory
ships that tokenizer as `tokenizer.json`, which the `tokenizers` package (Rust, no transformers
needed) runs as is: normaliser, pre-tokeniser, BPE, special tokens, and the post-processor that
puts `<s>` (BOS) in front.

`CheckpointTokenizer` wraps it with the names minillava's generation and chat code use:

    encode(text) / decode(ids)      text <-> ids (no BOS added; special tokens dropped on decode)
    image_id                        the <image> placeholder's id (Llava splices the image there)
    eos_id, stop_ids, pad_id        when an answer ends; what fills a finished row
    render_prompt(conversation)     the prompt in LLaVA-1.5's format, BOS included
    render(conversation)            a whole conversation and its loss mask, for training

LLaVA-1.5's prompt (Vicuna v1 style, the one its `llava-hf` chat template writes):

    USER: <image>\\n{question} ASSISTANT:

and for a longer conversation every answer ends with the end-of-sequence token:

    USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:

The image goes *before* the question, as LLaVA was trained; minillava's own models read it after
(data/instruct.py, `question_with_image`), so `render_prompt` moves every `<image>` of a turn to
its front: the chat code can hand either model the same conversation.

`tokenizers` is an optional dependency (the `hf` extra): imported only when a tokenizer is made.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from minillava.tokenizer import GPT_ROLES, HUMAN_ROLES

USER, ASSISTANT = "USER:", "ASSISTANT:"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading a checkpoint's tokenizer.json needs the `tokenizers` package: "
            "pip install 'minillava[hf]'"
        ) from error
    return tokenizers


class CheckpointTokenizer:
    """A `tokenizers.Tokenizer` plus the special ids and the LLaVA-1.5 prompt format.

    tokenizer: the checkpoint's tokenizer.json, loaded by `tokenizers`.
    image_token_id: the model's image token (config.json `image_token_index`).
    eos_token_id: where an answer ends (the text model's `eos_token_id`).
    pad_token_id: what fills a row that has stopped; the EOS if the checkpoint names none.
    """

    # LLaVA-1.5 was trained with the image once, before the first question; `chat.ChatSession`
    # reads this and does not repeat it with later questions (576 positions each).
    image_every_question = False

    def __init__(self, tokenizer, image_token_id: int, eos_token_id: int, pad_token_id=None):
        self.tokenizer = tokenizer
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, token_id in (("image_token_id", image_token_id), ("eos_token_id", eos_token_id)):
            if tokenizer.id_to_token(token_id) is None:
                raise ValueError(
                    f"CheckpointTokenizer: {name}={token_id} is not a token of tokenizer.json "
                    f"({vocab_size} tokens)"
                )
        self.image_id = image_token_id
        self.image_token = tokenizer.id_to_token(image_token_id)  # "<image>" in LLaVA-1.5
        self.eos_id = self.eot_id = eos_token_id
        self.eos_token = tokenizer.id_to_token(eos_token_id)  # "</s>" in Llama's vocabulary
        self.pad_id = eos_token_id if pad_token_id is None else pad_token_id

    @classmethod
    def from_directory(
        cls, directory: str | Path, image_token_id: int, eos_token_id: int, pad_token_id=None
    ) -> CheckpointTokenizer:
        """The tokenizer.json of a checkpoint directory (the ids come from its config.json)."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: minillava reads a checkpoint's tokenizer from tokenizer.json "
                "(the 'fast' tokenizer file; a sentencepiece tokenizer.model alone is not read)"
            )
        tokenizer = _tokenizers().Tokenizer.from_file(str(path))
        return cls(tokenizer, image_token_id, eos_token_id, pad_token_id)

    def __len__(self) -> int:
        """The vocabulary size, added special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return (
            f"CheckpointTokenizer({len(self)} tokens, image {self.image_token!r}={self.image_id}, "
            f"eos {self.eos_token!r}={self.eos_id})"
        )

    @property
    def stop_ids(self) -> list[int]:
        """Generation stops after any of these: the end-of-sequence token."""
        return [self.eos_id]

    def encode(self, text: str) -> list[int]:
        """Text -> ids, special tokens written in the text (`<image>`, `</s>`) included as
        themselves, but no BOS added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text, special tokens (BOS, EOS, padding, <image>) left out."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def segments(self, conversation: Sequence[dict]) -> list[tuple[str, bool]]:
        """A conversation -> its LLaVA-1.5 text in pieces, (text, is_answer), in order.

        Turns are {"from": "human" | "gpt", "value": text} (LLaVA JSON; "user" and "assistant"
        are accepted too); they alternate, the human first. The images of a human turn go to
        its front, one `<image>\\n` each. An answer piece is ` {answer}</s>`: what follows
        `ASSISTANT:`, the end-of-sequence token included (the model must learn to stop).
        """
        pieces = []
        for index, turn in enumerate(conversation):
            role, text = turn.get("from", turn.get("role")), str(turn.get("value", ""))
            expected = HUMAN_ROLES if index % 2 == 0 else GPT_ROLES
            if role not in expected:
                raise ValueError(
                    f"turn {index} is from {role!r}, expected one of {expected}: a conversation "
                    "alternates human and assistant turns, starting with the human"
                )
            if role in HUMAN_ROLES:
                images = text.count(self.image_token)
                question = text.replace(self.image_token, "").strip()
                pieces.append(
                    (f"{USER} " + f"{self.image_token}\n" * images + f"{question} ", False)
                )
            else:
                pieces.append((ASSISTANT, False))
                pieces.append((f" {text.strip()}{self.eos_token}", True))
        return pieces

    def prompt_text(self, conversation: Sequence[dict]) -> str:
        """A conversation ending on a human turn -> LLaVA-1.5's prompt text, up to `ASSISTANT:`."""
        text = "".join(piece for piece, _ in self.segments(conversation))
        if not conversation or len(conversation) % 2 == 0:
            raise ValueError("the conversation must end with a human turn, the one to answer")
        return text + ASSISTANT

    def render_prompt(self, conversation: Sequence[dict]) -> list[int]:
        """The ids of `prompt_text(conversation)`, BOS first when tokenizer.json adds one (its
        post-processor decides, exactly as transformers' tokenizer would)."""
        return self.tokenizer.encode(self.prompt_text(conversation)).ids

    def render(self, conversation: Sequence[dict]) -> tuple[list[int], list[bool]]:
        """A whole conversation (ending on an answer) -> (ids, mask), as training needs it:
        mask[i] is True iff ids[i] belongs to an assistant's answer or to the end-of-sequence
        token that closes it (the loss is taken there only: `data.collate`).

        The text is tokenised in one piece, BOS first, exactly as `render_prompt` tokenises a
        prompt: encoding each turn apart would split words differently at the seams (a
        sentencepiece-style tokenizer writes a space as part of the next word). Which token
        belongs to an answer is read from the character offsets `tokenizers` returns: a token
        is an answer token if its characters overlap an answer's.
        """
        if not conversation or len(conversation) % 2:
            raise ValueError(
                "render needs a conversation that ends with the assistant's answer, the one to "
                "learn; render_prompt asks a question"
            )
        text, spans, position = "", [], 0
        for piece, is_answer in self.segments(conversation):
            if is_answer:
                spans.append((position, position + len(piece)))
            text += piece
            position += len(piece)
        encoding = self.tokenizer.encode(text)
        mask = [
            any(start < end_ and begin < end for begin, end_ in spans)
            for start, end in encoding.offsets
        ]
        return list(encoding.ids), mask

    @property
    def IMAGE(self) -> str:  # noqa: N802 - the name minillava's Tokenizer gives it
        """The image placeholder's text, as minillava's Tokenizer names it."""
        return self.image_token

    @property
    def vocab_size(self) -> int:
        """The number of ids, added tokens included (minillava's Tokenizer's name)."""
        return len(self)
