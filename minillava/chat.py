"""Chat with a trained minillava about an image.

    minillava chat IMAGE "What colour is the circle?"     one question, one answer
    minillava chat IMAGE                                  interactive, multi-turn
    minillava chat --sample-image scene.png               draw a ShapesWorld scene to ask about

A chat is a conversation rendered with the tokenizer's chat template. Every question is
followed by the image (``{question}\\n<image>``; `data.instruct.question_with_image` says why),
as in our training data; the model sees the whole history each time, its own earlier answers
included:

    {system}<|user|>What is this?\\n<image><|assistant|> a red circle<|endoftext|><|user|>...

`reply` writes the next turn of a batch of conversations; `ChatSession` is a conversation of
one, and `minillava eval` asks its questions through `reply` too, with the same prompts.

Decoding is greedy by default (the most likely token each step: repeatable, best for short
factual answers). `--temperature 0.8 --top-p 0.9` samples instead: more varied, sometimes wrong.
The answer is the new tokens up to the first end-of-turn (`decode_answer`); `minillava eval`
reads its answers with the same function, so what it scores is what the chat would say.

Interactive commands: `/image PATH` switches image (and starts a new conversation), `/reset`
forgets the conversation, `/quit` (or end of input) leaves. It reads stdin line by line, so
`printf 'what colour?\\n/quit\\n' | minillava chat IMAGE` works as well as a terminal.

A mistake on the command line (an image that cannot be read, --top-p 5, an empty question, an
answer budget larger than the model's context) is one line on stderr and a non-zero exit code;
in the interactive loop a bad image or a question too long is one line, and the chat goes on.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from minillava.checkpoint import (
    DEFAULT_CHECKPOINT,
    load_llava,
    require_checkpoint,
    world_config_from_dict,
)
from minillava.cli import (
    ArgumentParser,
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
)
from minillava.data.collate import left_pad
from minillava.data.image_processor import ImageProcessor, ImageReadError, read_image
from minillava.data.instruct import IMAGE, count_images, question_with_image
from minillava.data.shapes import ShapesWorld
from minillava.device import autocast, device_from_flag
from minillava.presets import ModelSizes

# The longest answer a chat writes unless told otherwise: room for a whole description of four
# objects (73 tokens of the course's tokenizer, the longest of 2,000 test scenes; half of them
# take 50). A shorter limit cut the longest descriptions off mid-sentence.
ANSWER_TOKENS = 96


def decode_answer(tokenizer, ids: Sequence[int], strip: bool = True) -> str:
    """New token ids -> the answer's text, cut at the first stop (or padding) token.

    `generate` keeps the stop token and fills a finished row with padding until every row of
    the batch has stopped; the answer is what comes before. A row that never stopped (it ran
    out of `max_new_tokens`) is kept whole. `strip=False` keeps the text as the model wrote it,
    leading space included, which is how it goes back into the conversation's history: the
    training data writes every answer so (" red", `data.mixture.space_answers`).
    """
    ends = set(tokenizer.stop_ids) | {tokenizer.pad_id}
    kept = []
    for token in ids:
        if token in ends:
            break
        kept.append(token)
    text = tokenizer.decode(kept)
    return text.strip() if strip else text


def next_question(
    history: list[dict], question: str, with_image: bool, every_question: bool = True
) -> list[dict]:
    """The conversation the model answers: `history` (alternating turns, possibly empty) and
    `question` as the next human turn, the image after it (`data.instruct.question_with_image`).

    every_question=False: the image only with the first question, as LLaVA-1.5 was trained (a
    pretrained checkpoint's tokenizer says so: `hf_tokenizer.CheckpointTokenizer`)."""
    show = with_image and (every_question or count_images(history) == 0)
    turn = question_with_image(question, IMAGE if show else "")
    return [*history, {"from": "human", "value": turn}]


def prompt_positions(model, tokenizer, turns: list[dict]) -> int:
    """How many positions of the model's context the prompt for `turns` takes: its tokens, each
    `<image>` counted as the image's P tokens (the sum `fit_to_context` compares)."""
    per_image = model.config.num_image_tokens - 1  # the <image> id itself is already counted
    return len(tokenizer.render_prompt(turns)) + count_images(turns) * per_image


def fit_to_context(
    model, tokenizer, turns: list[dict], with_image: bool, max_new_tokens: int
) -> list[dict]:
    """Drop the oldest question-answer pairs until prompt + answer fit the context window.

    Every question carries its own copy of the image, so what remains still shows it (where the
    image is shown once, it moves to the oldest question kept). Raises ValueError if the last
    question alone does not fit.
    """
    config = model.config
    budget = config.text.max_seq_len - max_new_tokens
    while prompt_positions(model, tokenizer, turns) > budget and len(turns) > 1:
        turns = turns[2:]
        if with_image and count_images(turns) == 0:  # the image was shown once, and dropped:
            first = question_with_image(turns[0]["value"])  # it goes with the oldest question
            turns = [{**turns[0], "value": first}, *turns[1:]]
    if prompt_positions(model, tokenizer, turns) > budget:
        raise ValueError(
            f"the question is too long: the model reads at most {config.text.max_seq_len} "
            f"tokens, {config.num_image_tokens} of them image and {max_new_tokens} for the answer"
        )
    return turns


@torch.inference_mode()
def reply(
    model,
    tokenizer,
    conversations: Sequence[list[dict]],
    pixel_values: torch.Tensor | None,
    max_new_tokens: int = ANSWER_TOKENS,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> list[str]:
    """The assistant's next turn in each conversation, as the model writes it (not stripped).

    `conversations` end with a human turn (`next_question`); `pixel_values` is (B, 3, H, W),
    one image per conversation, or None for text-only ones. The prompts are left-padded: every
    row then ends where its answer begins, and the attention mask keeps the padding out of
    attention and positions. Greedy by default; `temperature`, `top_k`, `top_p` sample.
    """
    if pixel_values is not None and pixel_values.shape[0] != len(conversations):
        raise ValueError(
            f"pixel_values has {pixel_values.shape[0]} images for {len(conversations)} "
            "conversations"
        )
    prompts = [tokenizer.render_prompt(turns) for turns in conversations]
    input_ids, attention_mask = left_pad(prompts, tokenizer.pad_id)  # (B, T) each
    if pixel_values is not None:  # one copy of its image for each <image> of a conversation
        copies = [count_images(turns) for turns in conversations]
        pixel_values = pixel_values.repeat_interleave(torch.tensor(copies), dim=0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with autocast(device):
            new_ids = model.generate(
                input_ids.to(device),
                pixel_values=None if pixel_values is None else pixel_values.to(device),
                attention_mask=attention_mask.to(device),
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                stop_token_ids=tokenizer.stop_ids,
                pad_token_id=tokenizer.pad_id,
                generator=generator,
            )
    finally:
        model.train(was_training)
    return [decode_answer(tokenizer, row, strip=False) for row in new_ids.tolist()]


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
        max_new_tokens: int = ANSWER_TOKENS,
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

    def _fit(self, turns: list[dict]) -> list[dict]:
        return fit_to_context(
            self.model, self.tokenizer, turns, self.pixel_values is not None, self.max_new_tokens
        )

    def ask(self, question: str) -> str:
        """Add the question to the conversation, generate the answer, remember it, return it."""
        every = getattr(self.tokenizer, "image_every_question", True)
        turns = next_question(self.turns, question.strip(), self.pixel_values is not None, every)
        turns = self._fit(turns)
        pixel_values = None if self.pixel_values is None else self.pixel_values.unsqueeze(0)
        options = {"max_new_tokens": self.max_new_tokens, "generator": self.generator}
        answer = reply(
            self.model, self.tokenizer, [turns], pixel_values, **options, **self.sampling
        )
        self.turns = turns + [{"from": "gpt", "value": answer[0]}]
        return answer[0].strip()


def ask(model, tokenizer, pixel_values: torch.Tensor | None, question: str, **options) -> str:
    """One question about one image (3, H, W) -> the answer (a fresh single-turn conversation)."""
    return ChatSession(model, tokenizer, pixel_values, **options).ask(question)


def interactive(session: ChatSession, prepare, stdin=None, stdout=None) -> None:
    """Read questions line by line until /quit or end of input; answer each. `prepare(path)`
    turns an image file into the model's (3, S, S) input (for `/image PATH`)."""
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
            if not path:
                say("(which image? /image PATH)")
                continue
            try:
                session.set_image(prepare(path))
            except ImageReadError as error:  # the session goes on with the image it had
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


def trained_world(checkpoint: str | Path) -> tuple[int, dict | None] | None:
    """(image size, ShapesWorld config dict) the model in `checkpoint` was trained on; None if
    there is no file there.

    Read from the stored configs without building the model (mmap leaves the weights on disk).
    The dict is the run's "world" (noise, objects, ...); None for a checkpoint that has none.
    """
    path = Path(checkpoint)
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    world = (ckpt.get("config") or {}).get("world")
    return int(ckpt["model_config"]["vision"]["image_size"]), world


def draw_sample_image(
    out: str | Path,
    index: int = 0,
    split: str = "test",
    size: int | None = None,
    checkpoint: str | Path | None = DEFAULT_CHECKPOINT,
) -> int:
    """Save ShapesWorld scene `index` of `split` as a PNG, print what it shows; return its size.

    Drawn as the model in `checkpoint` saw its training images: at its image size, in its world.
    The chat would resize any other size, and a resized scene is not what training drew
    (docs/results.md, "Chatting about images of other sizes"). Without a checkpoint: the cpu
    preset's size, what `make train` trains. `size` overrides either.
    """
    run, why = None, f"no checkpoint at {checkpoint}"
    if checkpoint is not None:
        try:
            run = trained_world(checkpoint)
        except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError,
                pickle.UnpicklingError) as error:  # fmt: skip
            why = f"could not read {checkpoint} ({type(error).__name__})"
    if size is not None:
        why = "--image-size"
        if run is not None and run[0] != size:
            why += f"; the model in {checkpoint} reads {run[0]} px: the chat will resize it"
    elif run is not None:
        size, why = run[0], f"the image size of the model in {checkpoint}"
    else:
        size, why = ModelSizes().image_size, f"{why}: the cpu preset's image size"
    config = world_config_from_dict(run[1] if run else None, size)
    sample = ShapesWorld(split, size=index + 1, config=config)[index]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sample.image.save(out)
    print(f"wrote {out} ({split} scene {index}): {sample.captions[0]}")
    print(f"drawn at {size}x{size} pixels: {why}")
    print(f'try: minillava chat {out} "What shapes do you see?"')
    return size


def answer_budget_problem(
    model, tokenizer, question: str | None, with_image: bool, max_new_tokens: int
) -> str | None:
    """Why --max-new-tokens cannot be honoured (None if it can), said before any answer.

    Prompt and answer share the context window, so the answer gets at most what the first
    prompt leaves: `max_seq_len` minus the system line, the question and its image. A larger
    value is refused rather than clamped: it would also leave no room for earlier turns, which
    `fit_to_context` would then drop, so a chat with it would forget each answer at once. The
    message gives the largest value that fits; the default (64) leaves room for a conversation.
    Without a question (interactive), the shortest possible question is counted.
    """
    turns = next_question([], (question or "").strip(), with_image)  # as `ask` will see it
    context = model.config.text.max_seq_len
    prompt = prompt_positions(model, tokenizer, turns)
    room = context - prompt
    if room < 1 or max_new_tokens <= room:  # (a question that alone fills it: `ask` says so)
        return None
    what = "this question" if question else "the shortest question"
    image = " and the image" if with_image else ""
    return (
        f"--max-new-tokens {max_new_tokens} does not fit the model's context: it reads "
        f"{context} positions, {what}{image} take {prompt}, so the answer can have at most "
        f"{room} tokens (pass --max-new-tokens {room} or less)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="minillava chat",
        description="Ask a trained minillava about an image. Without a question: interactive.",
    )
    parser.add_argument("image", nargs="?", help="image file (PNG, JPEG, ...)")
    parser.add_argument("question", nargs="?", help="one question; omit it to chat interactively")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument(
        "--hf",
        metavar="DIR_OR_ID",
        default=None,
        help="a pretrained LLaVA-1.5 checkpoint (transformers' layout: config.json, "
        "*.safetensors, tokenizer.json) run by minillava's own code instead of --checkpoint; "
        "needs pip install 'minillava[hf]'",
    )
    parser.add_argument(
        "--dtype", default=None, help="with --hf: float32 | bfloat16 | float16 (default: "
        "bfloat16 or float16 on a GPU, float32 on a CPU)"
    )  # fmt: skip
    parser.add_argument(
        "--temperature", type=non_negative_float, default=0.0, help="0 = greedy (default)"
    )
    parser.add_argument(
        "--top-k", type=positive_int, default=None, help="sample from the k likeliest tokens"
    )
    parser.add_argument(
        "--top-p",
        type=probability,
        default=None,
        help="sample from the likeliest tokens that hold this share of probability, in (0, 1]",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=ANSWER_TOKENS,
        help=f"longest answer, in tokens (default {ANSWER_TOKENS}; prompt and answer share the "
        "model's context)",
    )
    parser.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--sample-image",
        metavar="OUT.png",
        default=None,
        help="draw a ShapesWorld test scene to OUT.png, as the --checkpoint model's training "
        "images were drawn (its size, its world), and exit (no checkpoint needed)",
    )
    parser.add_argument(
        "--index", type=non_negative_int, default=0, help="which scene --sample-image draws"
    )
    parser.add_argument(
        "--image-size",
        type=positive_int,
        default=None,
        help="size --sample-image draws (default: the --checkpoint model's image size, without "
        f"one the cpu preset's {ModelSizes().image_size})",
    )
    args = parser.parse_args(argv)

    if args.sample_image:
        try:
            draw_sample_image(
                args.sample_image, args.index, size=args.image_size, checkpoint=args.checkpoint
            )
        except ValueError as error:  # e.g. an --image-size ShapesWorld cannot draw
            parser.error(str(error))
        return 0

    def fail(message: str, code: int = 2) -> int:  # one line, no traceback
        # 2: the command line asks for what cannot be done (argparse's code); 1: a bad file
        print(f"minillava chat: {message}", file=sys.stderr)
        return code

    # What can be checked without the model is checked first, the image included: a mistake
    # should cost a second, not a model load. A missing checkpoint is said first of all: without
    # one nothing else matters (require_checkpoint raises, `minillava` says how to train one).
    if args.question is not None and not args.question.strip():
        # (an empty question is a mistake, e.g. an unset shell variable: not a wish to chat)
        return fail(
            'the question is empty; ask one (minillava chat IMAGE "What is it?"), or leave '
            "it out to chat interactively"
        )
    if args.hf is None:
        require_checkpoint(args.checkpoint)
    image = None
    if args.image:
        try:
            image, _ = read_image(args.image)
        except ImageReadError as error:
            return fail(str(error), code=1)
    try:
        device = device_from_flag(args.device)
    except ValueError as error:  # no such device here, or a name torch does not know
        return fail(str(error))
    if args.hf is not None:  # a real LLaVA: its weights, its tokenizer, its preprocessing
        from minillava.pretrained import load_pretrained  # needs the optional `hf` extra

        model, tokenizer, preprocess = load_pretrained(args.hf, device=device, dtype=args.dtype)
    else:
        # No checkpoint, or one for another vocabulary: load_llava raises, `minillava` says so.
        model, tokenizer, _ = load_llava(args.checkpoint, device=device)
        preprocess = ImageProcessor(image_size=model.config.vision.image_size)
    pixel_values = None if image is None else preprocess(image)
    problem = answer_budget_problem(
        model, tokenizer, args.question, pixel_values is not None, args.max_new_tokens
    )
    if problem:
        return fail(problem)
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
    if args.question is not None:
        try:
            print(session.ask(args.question))
        except ValueError as error:  # the question alone does not fit the context
            return fail(str(error))
    else:
        interactive(session, lambda path: preprocess(read_image(path)[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
