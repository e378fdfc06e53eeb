"""Chat with a trained minillava about an image.

    minillava chat IMAGE "What colour is the circle?"     one question, one answer
    minillava chat IMAGE                                  interactive, multi-turn
    minillava chat --sample-image scene.png               draw a ShapesWorld scene to ask about

A chat is a LLaVA conversation rendered with the tokenizer's chat template. The image goes with
the first question only (``<image>\\n{question}``), as in LLaVA's training data; later turns are
plain text and the model sees the whole history each time:

    {system}<|user|><image>\\nWhat is this?<|assistant|>A red circle.<|endoftext|><|user|>...

Decoding is greedy by default (the most likely token each step: repeatable, best for short
factual answers). `--temperature 0.8 --top-p 0.9` samples instead: more varied, sometimes wrong.
The answer is the new tokens up to the first end-of-turn (`decode_answer`); `minillava eval`
reads its answers with the same function, so what it scores is what the chat would say.

Interactive commands: `/image PATH` switches image (and starts a new conversation), `/reset`
forgets the conversation, `/quit` (or end of input) leaves. It reads stdin line by line, so
`printf 'what colour?\\n/quit\\n' | minillava chat IMAGE` works as well as a terminal.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from minillava.checkpoint import DEFAULT_CHECKPOINT, load_llava
from minillava.data.image_processor import ImageProcessor
from minillava.data.shapes import ShapesWorld, WorldConfig


def load_image(path: str | Path, image_size: int) -> torch.Tensor:
    """An image file -> normalised (3, S, S) tensor, with a clear error if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} not found")
    try:
        with Image.open(path) as image:
            image.load()
            return ImageProcessor(image_size=image_size)(image)
    except UnidentifiedImageError as error:
        raise ValueError(f"{str(path)!r} is not an image PIL can read") from error


def decode_answer(tokenizer, ids: Sequence[int]) -> str:
    """New token ids -> the answer's text, cut at the first stop (or padding) token.

    `generate` keeps the stop token and fills a finished row with padding until every row of
    the batch has stopped; the answer is what comes before. A row that never stopped (it ran
    out of `max_new_tokens`) is kept whole.
    """
    ends = set(tokenizer.stop_ids) | {tokenizer.pad_id}
    kept = []
    for token in ids:
        if token in ends:
            break
        kept.append(token)
    return tokenizer.decode(kept).strip()


class ChatSession:
    """A multi-turn conversation about one image (or none).

    >>> session = ChatSession(model, tokenizer, pixel_values)   # doctest: +SKIP
    >>> session.ask("What shapes do you see?")                 # doctest: +SKIP
    'a red circle and a blue square.'
    """

    def __init__(
        self,
        model,
        tokenizer,
        pixel_values: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=next(model.parameters()).device)
            self.generator.manual_seed(seed)
        self.turns: list[dict] = []
        self.set_image(pixel_values)

    def set_image(self, pixel_values: torch.Tensor | None) -> None:
        """Look at a new image (3, H, W), or none; the conversation starts over."""
        if pixel_values is not None and pixel_values.dim() != 3:
            raise ValueError(f"pixel_values must be (3, H, W), got {tuple(pixel_values.shape)}")
        self.pixel_values = pixel_values
        self.turns = []

    def reset(self) -> None:
        self.turns = []

    def _prompt_ids(self, turns: list[dict]) -> list[int]:
        return self.tokenizer.render_prompt(turns)

    def _fit(self, turns: list[dict]) -> list[dict]:
        """Drop the oldest question-answer pairs until prompt + answer fit the context window.

        The image token moves to the new first question: the model always sees the image.
        """
        config = self.model.config
        image_tokens = config.vision.num_patches if self.pixel_values is not None else 0
        budget = config.text.max_seq_len - self.max_new_tokens
        while len(self._prompt_ids(turns)) - 1 + image_tokens > budget and len(turns) > 1:
            turns = [dict(turn) for turn in turns[2:]]
            if self.pixel_values is not None:
                turns[0]["value"] = f"{self.tokenizer.IMAGE}\n{turns[0]['value']}"
        if len(self._prompt_ids(turns)) - 1 + image_tokens > budget:
            raise ValueError(
                f"the question is too long: the model reads at most {config.text.max_seq_len} "
                f"tokens, {image_tokens} of them image and {self.max_new_tokens} for the answer"
            )
        return turns

    @torch.inference_mode()
    def ask(self, question: str) -> str:
        """Add the question to the conversation, generate the answer, remember it, return it."""
        question = question.strip()
        if not self.turns and self.pixel_values is not None:
            question = f"{self.tokenizer.IMAGE}\n{question}"
        turns = self._fit(self.turns + [{"from": "human", "value": question}])
        device = next(self.model.parameters()).device
        input_ids = torch.tensor([self._prompt_ids(turns)], device=device)  # (1, T)
        pixel_values = None
        if self.pixel_values is not None:
            pixel_values = self.pixel_values.unsqueeze(0).to(device)  # (1, 3, H, W)
        was_training = self.model.training
        self.model.eval()
        try:
            new_ids = self.model.generate(
                input_ids,
                pixel_values=pixel_values,
                max_new_tokens=self.max_new_tokens,
                stop_token_ids=self.tokenizer.stop_ids,
                pad_token_id=self.tokenizer.pad_id,
                generator=self.generator,
                **self.sampling,
            )
        finally:
            self.model.train(was_training)
        answer = decode_answer(self.tokenizer, new_ids[0].tolist())
        self.turns = turns + [{"from": "gpt", "value": answer}]
        return answer


def ask(model, tokenizer, pixel_values: torch.Tensor | None, question: str, **options) -> str:
    """One question about one image (3, H, W) -> the answer (a fresh single-turn conversation)."""
    return ChatSession(model, tokenizer, pixel_values, **options).ask(question)


def interactive(session: ChatSession, image_size: int, stdin=None, stdout=None) -> None:
    """Read questions line by line until /quit or end of input; answer each."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    tty = stdin.isatty()

    def say(text: str) -> None:
        print(text, file=stdout, flush=True)

    if tty:
        say("Ask about the image. Commands: /image PATH, /reset, /quit.")
    while True:
        if tty:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input (Ctrl-D, or the end of a pipe)
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit", "/q"):
            break
        if line == "/reset":
            session.reset()
            say("(conversation reset)")
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            try:
                session.set_image(load_image(path, image_size))
            except (FileNotFoundError, ValueError) as error:
                say(f"(cannot use that image: {error})")
                continue
            say(f"(now looking at {path}; new conversation)")
            continue
        if line.startswith("/"):
            say(f"(unknown command {line.split()[0]!r}; try /image PATH, /reset, /quit)")
            continue
        try:
            say(f"minillava> {session.ask(line)}")
        except ValueError as error:
            say(f"({error}; /reset to start over)")


def draw_sample_image(out: str | Path, index: int = 0, split: str = "test", size: int = 64) -> None:
    """Save ShapesWorld scene `index` of `split` as a PNG and print what it shows."""
    sample = ShapesWorld(split, size=index + 1, config=WorldConfig(image_size=size))[index]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sample.image.save(out)
    print(f"wrote {out} ({split} scene {index}, {size}x{size}): {sample.captions[0]}")
    print(f'try: minillava chat {out} "What shapes do you see?"')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="minillava chat",
        description="Ask a trained minillava about an image. Without a question: interactive.",
    )
    parser.add_argument("image", nargs="?", help="image file (PNG, JPEG, ...)")
    parser.add_argument("question", nargs="?", help="one question; omit it to chat interactively")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--sample-image",
        metavar="OUT.png",
        default=None,
        help="draw a ShapesWorld test scene to OUT.png and exit (no checkpoint needed)",
    )
    parser.add_argument("--index", type=int, default=0, help="which scene --sample-image draws")
    parser.add_argument("--image-size", type=int, default=64, help="size --sample-image draws")
    args = parser.parse_args(argv)

    if args.sample_image:
        draw_sample_image(args.sample_image, args.index, size=args.image_size)
        return 0
    if args.temperature < 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    # No checkpoint, or one for another vocabulary: load_llava raises, `minillava` says so.
    model, tokenizer, _ = load_llava(args.checkpoint, device=args.device)
    image_size = model.config.vision.image_size
    pixel_values = None
    if args.image:
        try:
            pixel_values = load_image(args.image, image_size)
        except (FileNotFoundError, ValueError) as error:
            print(f"minillava chat: {error}", file=sys.stderr)
            return 1
    session = ChatSession(
        model,
        tokenizer,
        pixel_values,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if args.question:
        print(session.ask(args.question))
    else:
        interactive(session, image_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
