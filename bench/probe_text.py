"""Can the decoder read the letter or digit from the image tokens? Probe what the tokens know.

A ShapesWorld image shows a character (one of `WorldConfig.characters`) in a quarter of the
scenes, alone in its cell. Asked "What is written in the image?", the trained model must map the
image token of that cell to the character's word. This script takes a trained LLaVA and fits,
on the token of the text cell, a linear probe and a small MLP that predict the character:

* at the patch features the projector reads (`vision_feature_layer` of the frozen ViT);
* at the projector's output, the image token exactly as the decoder receives it.

Probes fit on training images and are scored on val images. If they read the character and the
model does not, the eyes are not what fails: the decoder has not learnt the mapping
(docs/results.md). `--read N` measures the second half: the model is asked "What is
written in the image?" (the eval's reading questions) about the first N test images that show a
character, greedy, and the script prints its accuracy and commonest misreadings. (The eval's
`text by question form: text` line mixes these with images that show none, answered "nothing".)

    python bench/probe_text.py --checkpoint runs/cpu/llava.pt
    python bench/probe_text.py --checkpoint runs/cpu/llava.pt --read 1000 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from minillava.checkpoint import load_llava, world_config_from_dict  # noqa: E402
from minillava.data.instruct import make_question  # noqa: E402
from minillava.data.shapes import ShapesWorld  # noqa: E402
from minillava.eval import model_answerer, normalise_answer  # noqa: E402


@torch.no_grad()
def text_cell_tokens(model, world: ShapesWorld, n: int, batch: int = 200):
    """The first `n` scenes of `world` that show a character: the text cell's patch feature
    (n, C_vision), its projected image token (n, C_text), and the character's index (n,)."""
    chars = world.config.characters
    grid = int(model.config.num_image_tokens**0.5)
    if grid != 3:
        raise ValueError(f"the probe expects 3x3 image tokens (one a cell); this model has {grid}")
    chosen, index = [], 0
    while len(chosen) < n:
        if index >= len(world):
            raise ValueError(f"only {len(chosen)} of {len(world)} scenes show a character")
        scene = world.scene(index)  # the annotation alone: cheap, no pixels
        if scene.text is not None:
            chosen.append((index, scene.text_row * 3 + scene.text_col, chars.index(scene.text)))
        index += 1
    features, tokens = [], []
    layer = model.config.vision_feature_layer
    for start in range(0, n, batch):
        part = chosen[start : start + batch]
        pixels = torch.stack([world[i].pixel_values for i, _, _ in part])  # (B, 3, H, W)
        patch = model.vision_tower.patch_features(pixels, layer=layer)  # (B, 9, C_vision)
        cells = torch.tensor([cell for _, cell, _ in part])
        rows = torch.arange(len(part))
        features.append(patch[rows, cells])
        tokens.append(model.projector(patch)[rows, cells])  # (B, C_text)
    labels = torch.tensor([label for _, _, label in chosen])
    return torch.cat(features), torch.cat(tokens), labels


def fit_probe(x_train, y_train, x_test, y_test, classes: int, hidden: int = 0, steps: int = 1500):
    """Val accuracy of a linear probe (hidden=0) or a one-hidden-layer MLP on standardised x."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-5
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch.manual_seed(0)
    width = x_train.shape[1]
    if hidden:
        probe = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, classes))
    else:
        probe = nn.Linear(width, classes)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(steps):
        rows = torch.randint(0, len(x_train), (256,))
        loss = nn.functional.cross_entropy(probe(x_train[rows]), y_train[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(x_test).argmax(-1) == y_test).float().mean().item()


def reading_items(world: ShapesWorld, n: int, seed: int = 0) -> list[dict]:
    """The first `n` scenes of `world` that show a character, each with one of the eval's
    questions that ask to read it (`text_question`'s op "text"), as eval items."""
    rng, items = random.Random(seed), []
    for index in range(len(world)):
        if len(items) == n:
            return items
        scene = world.scene(index)
        if scene.text is None:
            continue
        qa = make_question(scene, "text", rng, world.config)
        while qa.query["op"] != "text":  # "Is there any text?" and "Where is ...?" are not read
            qa = make_question(scene, "text", rng, world.config)
        items.append({"pixel_values": world[index].pixel_values, "question": qa.question,
                      "answer": qa.answer})  # fmt: skip
    raise ValueError(f"only {len(items)} of {len(world)} scenes show a character; asked for {n}")


def read_characters(model, tokenizer, items: list[dict], batch: int = 50) -> dict:
    """Greedy answers to `reading_items`: accuracy and the commonest (truth, answer) misreads."""
    answer = model_answerer(model, tokenizer)
    said = []
    for start in range(0, len(items), batch):
        said += [normalise_answer(a) for a in answer(items[start : start + batch])]
    truth = [normalise_answer(item["answer"]) for item in items]
    wrong = Counter((t, s) for t, s in zip(truth, said, strict=True) if t != s)
    return {
        "n": len(items),
        "accuracy": sum(t == s for t, s in zip(truth, said, strict=True)) / len(items),
        "misreads": [[t, s, k] for (t, s), k in wrong.most_common(8)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/cpu/llava.pt", help="a trained llava.pt")
    parser.add_argument(
        "--train", type=int, default=4000, help="probe-training characters (0: no probes)"
    )
    parser.add_argument("--val", type=int, default=800, help="val characters to score on")
    parser.add_argument("--read", type=int, default=0, help="also ask N test images to be read")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model, tokenizer, info = load_llava(args.checkpoint, device="cpu")
    config = world_config_from_dict(info["config"]["world"], model.config.vision.image_size)
    classes = len(config.characters)
    if (args.train > 0) != (args.val > 0) or args.read < 0:
        parser.error("--train and --val are both 0 (reading only) or both positive; --read >= 0")
    results = {}
    if args.train:
        train = text_cell_tokens(model, ShapesWorld("train", 10**6, config, seed=5), args.train)
        val = text_cell_tokens(model, ShapesWorld("val", 10**6, config, seed=5), args.val)
        for name, k in (("patch_features", 0), ("image_token", 1)):
            for kind, hidden in (("linear", 0), ("mlp", 256)):
                accuracy = fit_probe(train[k], train[2], val[k], val[2], classes, hidden)
                results[f"{name}/{kind}"] = round(accuracy, 4)
                print(f"{name:15s} {kind:6s} probe: {accuracy:.1%} of {args.val} val characters")
        print(f"(chance: {1 / classes:.1%}; {classes} characters)")
    reading = None
    if args.read:
        test = ShapesWorld("test", 10**6, config)
        reading = read_characters(model, tokenizer, reading_items(test, args.read))
        misreads = ", ".join(f"{t} as {s} ({k})" for t, s, k in reading["misreads"])
        print(f"the model reads {reading['accuracy']:.1%} of {args.read} test characters")
        print(f"  commonest misreads: {misreads or 'none'}")
    if args.out:
        record = {
            "command": "python bench/probe_text.py " + " ".join(argv or sys.argv[1:]),
            "checkpoint": args.checkpoint,
            "characters": classes,
            "train": args.train,
            "val": args.val,
            "val_accuracy": results,
            "model_reads_test": reading,
        }
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
