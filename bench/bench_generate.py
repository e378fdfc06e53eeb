"""Generation speed with and without the KV cache: tokens per second at 256 new tokens.

    python bench/bench_generate.py                    # cpu preset sizes, 256 new tokens, 2 threads
    python bench/bench_generate.py --new-tokens 128 --repeats 5

Without a cache, every new token re-runs the whole sequence (image tokens, prompt and all the
tokens generated so far) through the decoder: step t costs O(T0 + t), so n tokens cost O(n^2).
With the cache, the prompt is read once (prefill) and each step feeds one token, attending to the
stored keys and values: O(n) in total. The gap therefore grows with the number of new tokens.

The model is the `cpu` preset's LLaVA (randomly initialised: speed does not depend on the weights)
with max_seq_len raised to 512 so that the image tokens (9 at the cpu preset) + the prompt + 256
new tokens fit. No stop token is given, so every run generates exactly `--new-tokens` tokens.
Both runs produce the same tokens (greedy), which the script checks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_train import machine, tiny_llava_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="bench/results/generate.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from minillava.data.collate import collate_conversations
    from minillava.data.shapes import ShapesWorld, WorldConfig
    from minillava.llava import Llava
    from minillava.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    config = tiny_llava_config(tokenizer, max_seq_len=512)
    model = Llava(config).eval()
    world = ShapesWorld("test", size=args.batch_size, config=WorldConfig(config.vision.image_size))
    question = "<image>\nDescribe the image."
    samples = [
        {
            "pixel_values": world[i].pixel_values,
            "conversations": [{"from": "human", "value": question}],
        }
        for i in range(args.batch_size)
    ]
    batch = collate_conversations(samples, tokenizer, padding_side="left")
    prompt_len = batch["input_ids"].shape[1] - 1 + config.vision.num_patches

    def run(use_cache: bool) -> tuple[float, float, torch.Tensor]:
        """Generate once: (wall seconds, CPU seconds of this process, new tokens)."""
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            out = model.generate(
                batch["input_ids"],
                pixel_values=batch["pixel_values"],
                attention_mask=batch["attention_mask"],
                max_new_tokens=args.new_tokens,
                temperature=0.0,
                use_cache=use_cache,
            )
        return time.perf_counter() - start, time.process_time() - start_cpu, out

    run(True)  # warm-up (first calls allocate and pick kernels)
    times: dict[str, list[float]] = {"kv cache": [], "no cache": []}
    cpu_times: dict[str, list[float]] = {"kv cache": [], "no cache": []}
    outputs = {}
    for _ in range(args.repeats):
        for mode, use_cache in (("kv cache", True), ("no cache", False)):
            seconds, cpu_seconds, outputs[mode] = run(use_cache)
            times[mode].append(seconds)
            cpu_times[mode].append(cpu_seconds)
    if outputs["kv cache"].shape[1] != args.new_tokens:
        raise SystemExit(f"expected {args.new_tokens} new tokens, got {outputs['kv cache'].shape}")
    same = bool(torch.equal(outputs["kv cache"], outputs["no cache"]))

    n_new = args.new_tokens * args.batch_size
    medians = {mode: statistics.median(t) for mode, t in times.items()}
    tokens_per_s = {mode: n_new / median for mode, median in medians.items()}
    cpu_medians = {mode: statistics.median(t) for mode, t in cpu_times.items()}
    speedup = tokens_per_s["kv cache"] / tokens_per_s["no cache"]
    cpu_speedup = cpu_medians["no cache"] / cpu_medians["kv cache"]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    print(
        f"generate {args.new_tokens} new tokens, batch {args.batch_size}, prompt {prompt_len} "
        f"positions ({config.vision.num_patches} image), greedy, {args.threads} threads"
    )
    print(f"{'mode':<9} {'median s':>9} {'tokens/s':>9} {'CPU s':>7}")
    for mode in times:
        print(
            f"{mode:<9} {medians[mode]:>9.3f} {tokens_per_s[mode]:>9.1f} {cpu_medians[mode]:>7.3f}"
        )
    print(
        f"KV cache speed-up: {speedup:.1f}x by wall time, {cpu_speedup:.1f}x by CPU time; "
        f"same tokens with and without: {same}; load average {' '.join(load)}"
    )

    result = {
        "command": "python bench/bench_generate.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "load_average": load,
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "batch_size": args.batch_size,
        "prompt_positions": prompt_len,
        "median_s": medians,
        "tokens_per_s": tokens_per_s,
        "median_cpu_s": cpu_medians,
        "times_s": times,
        "speedup": speedup,
        "cpu_speedup": cpu_speedup,
        "same_tokens": same,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
