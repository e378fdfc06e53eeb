"""`minillava data`: write ShapesWorld to disk as PNG + LLaVA JSON, or check a LLaVA data set.

    minillava data export DIR [--split train] [--n 100] [--seed 0] [--image-size 64]
                              [--kinds conversation,detail,reasoning]
        -> DIR/images/<split>_<index>.png   the images
           DIR/data.json                    LLaVA records (with "kind" and per-turn "type")
           DIR/scenes.json                  annotation, captions and description per image

    minillava data check JSON IMAGE_DIR [--skip-bad] [--allow-outside-images]
        -> loads the data set as training would and reports every problem by record
           (image paths that lead outside IMAGE_DIR are one, unless --allow-outside-images)

The exported set is the same data the trainer generates on the fly, written so that it can be
looked at, shared, or reused by any LLaVA training code; `LlavaJsonDataset` reads it back.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from minillava.data.instruct import ALL_KINDS, KINDS, make_conversations
from minillava.data.llava_json import DataError, LlavaJsonDataset
from minillava.data.shapes import SPLITS, ShapesWorld, WorldConfig, sample_rng


def export(
    out_dir: str | Path,
    split: str = "train",
    n: int = 100,
    seed: int = 0,
    config: WorldConfig | None = None,
    kinds: tuple[str, ...] = KINDS,
) -> Path:
    """Write `n` samples of `split` to `out_dir`; returns the path of data.json."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    world = ShapesWorld(split, n, config, seed)
    records, scenes = [], {}
    for sample in world:
        name = f"{split}_{sample.index:06d}"
        sample.image.save(image_dir / f"{name}.png")  # PNG: lossless, the pixels round-trip
        rng = sample_rng(seed, split, sample.index, stream="instruct")
        records += make_conversations(
            sample.scene,
            sample.captions,
            rng,
            kinds=kinds,
            image_file=f"{name}.png",
            record_id=name,
            config=world.config,
        )
        scenes[f"{name}.png"] = {
            "scene": dataclasses.asdict(sample.scene),
            "captions": sample.captions,
            "description": sample.description,
        }
    json_path = out_dir / "data.json"
    json_path.write_text(json.dumps(records, indent=1, ensure_ascii=False), encoding="utf-8")
    (out_dir / "scenes.json").write_text(json.dumps(scenes, indent=1), encoding="utf-8")
    return json_path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillava data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exp = commands.add_parser("export", help="write ShapesWorld as PNG + LLaVA JSON")
    exp.add_argument("dir", type=Path, help="output folder (created if needed)")
    exp.add_argument("--split", default="train", choices=SPLITS)
    exp.add_argument("--n", type=int, default=100, help="number of images")
    exp.add_argument("--seed", type=int, default=0)
    exp.add_argument("--image-size", type=int, default=64)
    exp.add_argument(
        "--kinds",
        default=",".join(KINDS),
        help=f"comma-separated record kinds, from {','.join(ALL_KINDS)}",
    )
    check = commands.add_parser("check", help="check a LLaVA-format JSON + image folder")
    check.add_argument("json", type=Path, help="the JSON list of records")
    check.add_argument("image_dir", type=Path, help="folder the 'image' paths start from")
    check.add_argument("--skip-bad", action="store_true", help="skip and count bad records")
    check.add_argument(
        "--allow-outside-images",
        action="store_true",
        help="read 'image' paths that lead outside IMAGE_DIR (../, absolute paths, symlinks "
        "that point out); refused by default: a data set should not open any file you can read",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in ("export", "check") and not argv[0].startswith("-"):
        argv = ["export", *argv]  # `python -m minillava.data.export DIR` exports
    args = _parser().parse_args(argv)
    if args.command == "export":
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
        unknown = [k for k in kinds if k not in ALL_KINDS]
        if unknown or not kinds:
            print(f"minillava data export: unknown kinds {unknown}; choose from {ALL_KINDS}",
                  file=sys.stderr)  # fmt: skip
            return 2
        if args.n < 1:
            print(f"minillava data export: --n must be at least 1, got {args.n}", file=sys.stderr)
            return 2
        try:
            config = WorldConfig(image_size=args.image_size)
        except ValueError as error:
            print(f"minillava data export: {error}", file=sys.stderr)
            return 2
        try:
            json_path = export(args.dir, args.split, args.n, args.seed, config, kinds)
        except OSError as error:  # DIR is a file, lies under one, is not ours to write, disk full
            why = "a file, not a folder" if args.dir.is_file() else (error.strerror or error)
            print(f"minillava data export: cannot write to {args.dir} ({why}); choose another "
                  "folder", file=sys.stderr)  # fmt: skip
            return 2
        print(f"wrote {args.n} images to {args.dir / 'images'} and records to {json_path}")
        return 0
    # Always collect every problem (not just the first); without --skip-bad any is a failure.
    try:
        dataset = LlavaJsonDataset(
            args.json, args.image_dir, skip_bad=True, allow_outside=args.allow_outside_images
        )
    except DataError as error:  # the file itself: missing, not JSON, not a list
        print(f"minillava data check: {error}", file=sys.stderr)
        return 1
    print(dataset.summary())
    if dataset.skipped and not args.skip_bad:
        print(
            f"minillava data check: {len(dataset.skipped)} bad records; fix them, or pass "
            "--skip-bad to train on the good ones",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
