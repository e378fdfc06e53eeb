"""How fast does ShapesWorld make data? Images per second on one CPU core.

    python bench/bench_shapes.py            # all sizes, ~20 s
    python bench/bench_shapes.py --quick    # 64 px only

A training step of the tiny model on a GPU takes a few milliseconds for a batch of 64-128
images, so the generator must make thousands of images a second per worker for the GPU never to
wait. Measured single-threaded (torch.set_num_threads(1)), best of `--repeats` runs, so the
figure is a lower bound on a machine shared with other work.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from minillava.data.instruct import InstructDataset, VQADataset, world_text  # noqa: E402
from minillava.data.shapes import ShapesWorld, WorldConfig  # noqa: E402


def rate(make_one, count: int, repeats: int) -> tuple[float, float]:
    """(items per wall-clock second, items per CPU second), best of `repeats` passes.

    On a machine shared with other work the wall-clock rate drops with the load; the rate per
    second of CPU time this process got is what one dedicated core would do.
    """
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(count):
            make_one(i)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return count / best_wall, count / best_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="items per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="64 px only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    machine = f"{platform.machine()} {platform.processor()}".strip()
    print(f"machine: {machine}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    print(f"{'what':<46} {'items/s':>9} {'items/cpu-s':>12}")

    def report(what: str, make_one, count: int) -> None:
        wall, cpu = rate(make_one, count, args.repeats)
        print(f"{what:<46} {wall:>9.0f} {cpu:>12.0f}", flush=True)

    for size in (64,) if args.quick else (32, 64, 128, 224):
        count = args.count if size <= 64 else args.count // 4
        world = ShapesWorld("train", count, WorldConfig(image_size=size))
        world[0]  # warm the caches (glyphs, noise field)
        report(f"ShapesWorld train {size}px (image+tensor+words)", world.__getitem__, count)
    config, count = WorldConfig(image_size=64), args.count
    for split in ("test", "heldout"):
        report(f"ShapesWorld {split} 64px", ShapesWorld(split, count, config).__getitem__, count)
    report("scene annotation only (no pixels)", ShapesWorld("train", count, config).scene, count)
    report("VQADataset item 64px", VQADataset("train", count, config).__getitem__, count)
    report("InstructDataset item 64px", InstructDataset("train", count, config).__getitem__, count)
    start, cpu = time.perf_counter(), time.process_time()
    strings = sum(1 for _ in world_text("train", n=count))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"{'world_text scenes':<46} {count / elapsed:>9.0f} {count / cpu:>12.0f}"
          f"  ({strings / elapsed:.0f} strings/s)")  # fmt: skip
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
