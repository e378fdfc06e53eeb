"""Does stage 1 teach the projector the picture, or only the caption's form?

Scores 64 validation captions twice, with their own images and with the next sample's, and
splits the loss into the words the image decides (colours, shapes, sizes, places) and the rest
(`eval.loss_by_word_kind`). Usage:

    .venv/bin/python bench/probe_caption_gain.py runs/cpu/align.pt

Chapter 8's notebook makes the same comparison on its own short stage 1.
"""

import argparse

import torch

from minillava.checkpoint import config_from_dict, load_checkpoint, world_config_from_dict
from minillava.data.collate import collate_conversations
from minillava.data.instruct import make_conversation
from minillava.data.shapes import ShapesWorld, sample_rng
from minillava.eval import content_word_ids, loss_by_word_kind
from minillava.llava import Llava, LlavaConfig
from minillava.tokenizer import get_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="an align.pt or llava.pt of `minillava train`")
    parser.add_argument("--n", type=int, default=64, help="validation captions")
    args = parser.parse_args()
    ckpt = load_checkpoint(args.checkpoint)
    config = config_from_dict(LlavaConfig, ckpt["model_config"])
    model = Llava(config)
    model.load_state_dict(ckpt["model"])
    tok = get_tokenizer()
    world = world_config_from_dict(ckpt["config"].get("world"), config.vision.image_size)
    val = ShapesWorld("val", args.n, world)
    rows = []
    for i in range(args.n):
        s, rng = val[i], sample_rng(0, "val", i, stream="notebook")
        conversation = make_conversation(s.scene, s.captions, rng, "caption")
        rows.append({"pixel_values": s.pixel_values, "conversations": conversation})
    batch = collate_conversations(rows, tok)
    content = content_word_ids(tok, world)
    own = loss_by_word_kind(model, batch, content)
    other = loss_by_word_kind(
        model, dict(batch, pixel_values=batch["pixel_values"].roll(1, 0)), content
    )
    print(f"{args.checkpoint}: caption loss on {args.n} validation captions (nats a token)")
    print(f"{'':22s} {'content words':>14s} {'other words':>12s}")
    print(f"{'its own image':22s} {own[0]:14.3f} {own[1]:12.3f}")
    print(f"{'another image':22s} {other[0]:14.3f} {other[1]:12.3f}")
    print(f"{'the image helps by':22s} {other[0] - own[0]:14.3f} {other[1] - own[1]:12.3f}")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
