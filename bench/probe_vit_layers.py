"""Which ViT layer should the projector read? Probe what each layer's patch tokens know.

In ShapesWorld one patch is one grid cell (the cpu preset: 48 px images, 16 px patches), so the
token of a cell should say what is in *that* cell. For every layer of a CLIP-trained ViT
(`hidden_states[0]` = the patch embeddings, `[i]` = the output of block i), this script fits two
probes on the token of each cell that holds an object:

* own shape: a small MLP (one hidden layer) predicts the object's shape (5-way);
* leak: a linear probe predicts which colours the *other* objects of the image have (one yes/no
  per colour, balanced accuracy: 0.5 = the token says nothing about the other cells).

A token that also describes the rest of the image is hard to select by its content: asked "What
colour is the circle?", the decoder must find the circle's token, and if every token carries
"red" because a red square sits elsewhere, matching by content fails. LLaVA-1.5 reads the
penultimate layer (`vision_feature_layer=-2`); docs/results.md measures what the
choice does to VQA.

    python bench/probe_vit_layers.py --checkpoint runs/cpu/clip.pt
    python bench/probe_vit_layers.py --checkpoint runs/cpu/clip.pt --out bench/results/probe.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from minillava.data.shapes import SHAPES, ShapesWorld, WorldConfig  # noqa: E402
from minillava.report import load_clip_for_eval  # noqa: E402


def cell_tokens(clip, world: ShapesWorld, batch: int = 250):
    """Per layer, the token of every cell that holds an object: list of (N_obj, C), + labels."""
    samples = [world[i] for i in range(len(world))]
    colours = sorted({o.colour for s in samples for o in s.scene.objects})
    patches = clip.vision_model.embeddings.position_embedding.weight.shape[0] - 1  # - [CLS]
    if patches != 9:
        raise ValueError(f"the probe expects 3x3 patches (one per cell); this ViT has {patches}")
    states = []
    with torch.no_grad():
        for start in range(0, len(samples), batch):
            px = torch.stack([s.pixel_values for s in samples[start : start + batch]])
            states.append(clip.vision_model(px).hidden_states)  # L+1 tensors (B, 1 + 9, C)
    per_layer = [torch.cat([h[layer][:, 1:] for h in states]) for layer in range(len(states[0]))]
    rows, shapes, others = [], [], []
    for n, sample in enumerate(samples):
        for obj in sample.scene.objects:
            rows.append((n, obj.row * 3 + obj.col))
            shapes.append(SHAPES.index(obj.shape))
            other = torch.zeros(len(colours))
            for o in sample.scene.objects:
                if o is not obj and o.colour != obj.colour:
                    other[colours.index(o.colour)] = 1
            others.append(other)
    index_n, index_cell = map(torch.tensor, zip(*rows, strict=True))
    tokens = [layer[index_n, index_cell] for layer in per_layer]  # each (N_obj, C)
    return tokens, torch.tensor(shapes), torch.stack(others)


def mlp_probe(x, y, classes: int, train: int, steps: int = 1000) -> float:
    torch.manual_seed(0)
    probe = nn.Sequential(nn.Linear(x.shape[1], 256), nn.GELU(), nn.Linear(256, classes))
    optimizer = torch.optim.Adam(probe.parameters(), 1e-3)
    for _ in range(steps):
        idx = torch.randint(0, train, (256,))
        loss = nn.functional.cross_entropy(probe(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(x[train:]).argmax(1) == y[train:]).float().mean().item()


def leak_probe(x, targets, train: int) -> float:
    """Ridge regression to +-1 per colour, balanced accuracy over all (token, colour) pairs."""
    xt, yt = x[:train], targets[:train] * 2 - 1
    w = torch.linalg.solve(xt.T @ xt + torch.eye(x.shape[1]), xt.T @ yt)
    pred, truth = (x[train:] @ w) > 0, targets[train:] > 0.5
    hit_rate = (pred & truth).sum() / truth.sum()
    correct_rejection_rate = (~pred & ~truth).sum() / (~truth).sum()
    return 0.5 * (hit_rate + correct_rejection_rate).item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="clip.pt of a run (the clip stage)")
    parser.add_argument("--images", type=int, default=1500, help="train images to probe on")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    clip = load_clip_for_eval(args.checkpoint, torch.device("cpu"))
    world = ShapesWorld("train", args.images, WorldConfig(image_size=args.image_size))
    tokens, shapes, others = cell_tokens(clip, world)
    train = int(0.8 * len(shapes))  # the last 20% of the objects are the probes' test set
    result = {"checkpoint": str(args.checkpoint), "objects": len(shapes), "layers": []}
    for layer, x in enumerate(tokens):
        x = (x - x[:train].mean(0)) / (x[:train].std(0) + 1e-6)
        row = {
            "layer": layer,
            "own_shape_mlp": round(mlp_probe(x, shapes, len(SHAPES), train), 3),
            "other_colours_leak": round(leak_probe(x, others, train), 3),
        }
        result["layers"].append(row)
        print(
            f"hidden_states[{layer}]: own shape {row['own_shape_mlp']:.3f} (MLP probe)   "
            f"other objects' colours {row['other_colours_leak']:.3f} (0.5: no leak)"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
