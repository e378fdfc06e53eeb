"""The course's vocabulary, from the command line: train it on the world's text, and measure it.

    python -m minillava.vocabulary train    # regenerate minillava/assets/shapesworld.tiktoken
    python -m minillava.vocabulary stats    # how compactly the tokenizer writes ShapesWorld

The BPE trainer (`bpe.py`) and the tokenizer (`tokenizer.py`) are libraries that know nothing
of the world they tokenize. Training the shipped vocabulary needs the world's text (the data
engine) and the chat template's fixed strings (the tokenizer): this file sits above all three,
so that neither library has to import upward.
"""

from __future__ import annotations

import argparse
import time

from minillava.bpe import save_ranks, train_bpe
from minillava.data.instruct import (
    ALL_KINDS,
    ANSWER_SUFFIX,
    FIXED_PROMPTS,
    make_conversation,
    world_text,
)
from minillava.data.mixture import scene_turns
from minillava.data.shapes import ShapesWorld, make_captions, make_description, sample_rng
from minillava.tokenizer import SHAPESWORLD_FILE, SPECIAL_TOKENS, SYSTEM, get_tokenizer


def train(vocab_size: int, out: str, n_scenes: int, seed: int, verbose: bool = False) -> None:
    """Train the ShapesWorld BPE vocabulary on `world_text` and save it to `out`."""
    start = time.perf_counter()
    texts = list(world_text(split="train", n=n_scenes, seed=seed))
    # world_text has the questions, captions and answers, but not the fixed strings around them:
    # the chat template's system line (in every sequence), the short-answer suffix (in every VQA
    # sequence), the caption prompts. Once per scene each, so their words become single tokens.
    texts += [SYSTEM, *FIXED_PROMPTS] * n_scenes
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    text_seconds = time.perf_counter() - start
    # The special tokens are appended after the merges, so they take part of the vocabulary.
    ranks = train_bpe(texts, vocab_size - len(SPECIAL_TOKENS), verbose=verbose)
    save_ranks(ranks, out)
    train_seconds = time.perf_counter() - start - text_seconds
    print(
        f"trained {len(ranks)} mergeable tokens (+{len(SPECIAL_TOKENS)} special) on "
        f"{len(texts)} texts ({n_bytes / 1e6:.2f} MB) -> {out}\n"
        f"time: {text_seconds:.1f} s generating the text, {train_seconds:.1f} s training BPE"
    )
    if len(ranks) + len(SPECIAL_TOKENS) < vocab_size:
        print(
            f"stopped before --vocab-size {vocab_size}: every distinct word of the text is "
            f"already one token (vocabulary {len(ranks) + len(SPECIAL_TOKENS)} with the specials)"
        )


def stats(name: str, split: str, n_scenes: int) -> None:
    """How compactly tokenizer `name` writes ShapesWorld: tokens per word, sequence lengths."""
    tok = get_tokenizer(name)
    texts = list(world_text(split=split, n=n_scenes))
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_words = sum(len(t.split()) for t in texts)
    n_tokens = sum(len(tok.encode(t)) for t in texts)
    print(f"{tok!r}: {len(texts)} world_text strings of {split!r}")
    print(
        f"  {n_tokens / n_words:.3f} tokens/word, {n_bytes / n_tokens:.2f} bytes/token "
        f"(raw bytes: 1 token per byte -> {n_bytes / n_tokens:.1f}x fewer tokens)"
    )

    world = ShapesWorld(split, n_scenes)
    lengths: dict[str, list[int]] = {"caption": [], "description": []}
    lengths.update({f"conversation ({kind})": [] for kind in ALL_KINDS})
    lengths["VQA training (1 Q/A)"] = []
    answer_tokens = []
    for index in range(n_scenes):
        scene = world.scene(index)
        rng = sample_rng(world.seed, world.split, index, stream="text")
        captions = make_captions(scene, rng)
        lengths["caption"] += [len(tok.encode(c)) for c in captions]
        lengths["description"].append(len(tok.encode(make_description(scene))))
        for kind in ALL_KINDS:
            ids, mask = tok.render(make_conversation(scene, captions, rng, kind))
            lengths[f"conversation ({kind})"].append(len(ids))
            answer_tokens.append(sum(mask))
        turns = scene_turns(scene, captions, rng, world.config, vqa=True)
        lengths["VQA training (1 Q/A)"].append(len(tok.render(turns)[0]))
    for what, values in lengths.items():
        print(f"  {what:28s} mean {sum(values) / len(values):6.1f} tokens, max {max(values)}")
    n_system = len(tok.encode_ordinary(tok.system))
    n_suffix = len(tok.encode_ordinary(ANSWER_SUFFIX))
    print(f"  (conversations include the {n_system}-token system line, <image> counts as 1;")
    print(f"   a VQA conversation's question ends with the {n_suffix}-token answer suffix)")
    mean_answer = sum(answer_tokens) / len(answer_tokens)
    print(f"  trained-on (answer) tokens per conversation: {mean_answer:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m minillava.vocabulary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    p_train = commands.add_parser("train", help="train the BPE vocabulary on world_text, save it")
    p_train.add_argument(
        "--vocab-size",
        type=int,
        default=768,
        help="largest total vocabulary, special tokens included (default 768); training stops "
        "earlier once every distinct pre-token is a single token",
    )
    p_train.add_argument("--out", default=str(SHAPESWORLD_FILE))
    p_train.add_argument(
        "--n-scenes", type=int, default=5000, help="scenes of world_text (about 10 texts each)"
    )
    p_train.add_argument("--seed", type=int, default=0)
    p_train.add_argument("--verbose", action="store_true", help="print every merge")
    p_stats = commands.add_parser("stats", help="how compactly the tokenizer writes ShapesWorld")
    p_stats.add_argument("--name", default="shapesworld", help="tokenizer to measure")
    p_stats.add_argument("--split", default="val", help="ShapesWorld split (not the BPE's train)")
    p_stats.add_argument("--n-scenes", type=int, default=1000)
    args = parser.parse_args(argv)
    if args.command == "train":
        train(args.vocab_size, args.out, args.n_scenes, args.seed, args.verbose)
    else:
        stats(args.name, args.split, args.n_scenes)


if __name__ == "__main__":
    main()
