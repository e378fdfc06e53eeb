"""The instruct stage's learning curve, per question type, from a finished run's earlier stages.

Trains only stage 2 (`instruct`), starting from the lm / clip / align checkpoints of a run
directory (e.g. `runs/cpu` after `make train`), with any `--set` override of the preset, and
every `--eval-every` steps measures accuracy on a fixed set of validation questions, 60 of each
type by default: teacher-forced (an answer counts when every one of its tokens, and the end of
the turn, is the argmax), which is close to the greedy exact match of `minillava eval` and much
cheaper, so a curve costs little beside the training itself.

    python bench/instruct_curve.py --from runs/cpu --out-dir /tmp/curve
    python bench/instruct_curve.py --from runs/cpu --out-dir /tmp/c0 --realign \\
        --set model.vision_feature_layer=0 --set "data.curriculum=()"

`--realign` re-trains the align stage first (needed when the projector's input changes, e.g.
another `vision_feature_layer`). Writes `{out-dir}/curve.json` (one entry per evaluation) beside
the stage's own checkpoint, metrics and loss plot. Session-4 experiments in docs/results.md
were run this way (one thread each, two at a time on the 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from minillava import stages  # noqa: E402
from minillava.data.collate import collate_conversations  # noqa: E402
from minillava.data.instruct import QUESTION_TYPES, ask, vqa_prompt  # noqa: E402
from minillava.data.shapes import ShapesWorld  # noqa: E402
from minillava.presets import apply_overrides, get_preset  # noqa: E402
from minillava.tokenizer import get_tokenizer  # noqa: E402
from minillava.train import train_stage  # noqa: E402


def val_batches(preset, tokenizer, per_type: int, batch_size: int = 96, seed: int = 123):
    """per_type questions of every type on val images, in the eval's prompt, as collated batches."""
    n = per_type * len(QUESTION_TYPES)
    world = ShapesWorld("val", n, stages.world_config(preset), seed=preset.seed)
    rng = random.Random(seed)
    samples, types = [], []
    for i in range(n):
        sample, kind = world[i], QUESTION_TYPES[i % len(QUESTION_TYPES)]
        qa = ask(sample.scene, kind, rng, world.config)
        turns = [
            {"from": "human", "value": vqa_prompt(qa.question)},
            {"from": "gpt", "value": " " + qa.answer},  # as the stage trains (space_answers)
        ]
        samples.append({"pixel_values": sample.pixel_values, "conversations": turns})
        types.append(kind)
    batches = [
        collate_conversations(samples[i : i + batch_size], tokenizer)
        for i in range(0, n, batch_size)
    ]
    return batches, types


def teacher_forced_accuracy(model, batches, types) -> dict[str, float]:
    right = dict.fromkeys(QUESTION_TYPES, 0)
    count = dict.fromkeys(QUESTION_TYPES, 0)
    k = 0
    for batch in batches:
        out = model(**batch)
        predicted, labels = out.logits[:, :-1].argmax(-1), out.labels[:, 1:]
        correct = ((predicted == labels) | (labels == -100)).all(dim=1)  # (B,)
        for ok in correct.tolist():
            right[types[k]] += ok
            count[types[k]] += 1
            k += 1
    accuracy = {t: right[t] / count[t] for t in QUESTION_TYPES}
    accuracy["overall"] = sum(right.values()) / sum(count.values())
    return accuracy


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--from", dest="source", required=True, help="run dir with lm/clip/align")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--per-type", type=int, default=60, help="val questions per type")
    parser.add_argument("--realign", action="store_true", help="re-train the align stage first")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    source, out = Path(args.source), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("lm.pt", "clip.pt") + (() if args.realign else ("align.pt",)):
        if not (source / name).is_file():
            raise SystemExit(f"{source / name} not found: run its stage first (or --realign)")
        shutil.copy(source / name, out / name)
    if args.realign:
        (out / "align.pt").unlink(missing_ok=True)
    (out / "instruct.pt").unlink(missing_ok=True)  # always a fresh stage, never a resume
    preset = apply_overrides(get_preset(args.preset), args.set)
    tokenizer = get_tokenizer()
    names = ("align", "instruct") if args.realign else ("instruct",)
    batches, types = val_batches(preset, tokenizer, args.per_type)

    def evaluate(model) -> dict:
        accuracy = teacher_forced_accuracy(model, batches, types)
        print(" ".join(f"{t} {a:.3f}" for t, a in accuracy.items()), flush=True)
        return {f"val_{t}": a for t, a in accuracy.items()}

    for name in names:
        plan = stages.build_stage(name, preset, tokenizer, out)
        train_stage(
            plan.model, plan.batches, preset.stage(name), name=name, out_dir=out, device="cpu",
            model_config=plan.model_config, run_config=preset.to_dict(), progress=False,
            eval_fn=evaluate if name == "instruct" else None, eval_every=args.eval_every,
        )  # fmt: skip
    # train_stage logs each evaluation with its step in the stage's metrics: read them back.
    logged = [json.loads(line) for line in (out / "instruct.jsonl").read_text().splitlines()]
    records = [
        {"step": r["step"], **{k[len("val_") :]: v for k, v in r.items() if k.startswith("val_")}}
        for r in logged
        if "val_overall" in r
    ]
    (out / "curve.json").write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
