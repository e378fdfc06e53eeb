"""Training-step throughput: minillava's Llava against transformers' LlavaForConditionalGeneration.

    python bench/bench_train.py                       # cpu preset sizes, batch 32, 2 threads
    python bench/bench_train.py --steps 20 --batch-size 16 --out bench/results/train.json

The comparison is kept fair on purpose:

- the same architecture and the same weights: the transformers model is built by
  `minillava.interop.to_hf` from the minillava model (cpu preset sizes: ViT 4x128 on 48x48
  images = 36 image tokens, decoder 4x128, MLP projector, tokenizer vocabulary);
- the same batch: ShapesWorld instruction conversations collated once. transformers wants each
  `<image>` expanded to 36 placeholder ids beforehand (its processor's job), minillava expands it
  inside forward, so both see the same sequence;
- the same work per step: forward, loss on the assistant's tokens, backward, AdamW step, both in
  train mode, both fp32, both with PyTorch's SDPA attention, same thread count, same process;
- interleaved timing: after warm-up, the two models take turns step by step, so a noisy
  neighbour slows both alike; we report the median step time of each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere in the repo


def tiny_llava_config(tokenizer, max_seq_len: int | None = None):
    """The LlavaConfig that `make train` (the cpu preset) trains, built by minillava.stages."""
    from minillava.presets import get_preset
    from minillava.stages import llava_config

    config = llava_config(get_preset("cpu"), tokenizer)
    if max_seq_len is not None:
        config.text = dataclasses.replace(config.text, max_seq_len=max_seq_len)
    return config


def make_batch(tokenizer, image_size: int, batch_size: int, max_len: int = 160, seed: int = 0):
    """One batch of ShapesWorld instruction conversations, as the instruct stage sees them."""
    from minillava.data.collate import collate_conversations
    from minillava.data.instruct import InstructDataset
    from minillava.data.shapes import WorldConfig

    dataset = InstructDataset("train", size=batch_size, config=WorldConfig(image_size), seed=seed)
    samples = [dataset[i] for i in range(batch_size)]
    return collate_conversations(samples, tokenizer, max_len=max_len)


def machine() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=160, help="token cap per conversation")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--freeze-vision",
        action="store_true",
        help="train only projector + decoder (the instruct stage); default: every parameter",
    )
    parser.add_argument("--out", default="bench/results/train.json")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from minillava.export import expand_image_tokens
    from minillava.interop import to_hf
    from minillava.llava import Llava
    from minillava.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    config = tiny_llava_config(tokenizer)
    ours = Llava(config).train()
    theirs = to_hf(ours).train()  # same weights, copied
    theirs.config.use_cache = False
    batch = make_batch(tokenizer, config.vision.image_size, args.batch_size, args.max_len)
    hf_batch = expand_image_tokens(
        batch["input_ids"],
        config.vision.num_patches,
        tokenizer.image_id,
        batch["attention_mask"],
        batch["labels"],
        pad_token_id=tokenizer.pad_id,
    )
    hf_batch["pixel_values"] = batch["pixel_values"]
    n_tokens = int(hf_batch["attention_mask"].sum())

    def trainable(model: torch.nn.Module, vision_prefix: str):
        for name, param in model.named_parameters():
            param.requires_grad_(not (args.freeze_vision and name.startswith(vision_prefix)))
        return [p for p in model.parameters() if p.requires_grad]

    runs = {
        "minillava": (ours, batch, trainable(ours, "vision_tower")),
        "transformers": (theirs, hf_batch, trainable(theirs, "model.vision_tower")),
    }
    optimizers = {name: torch.optim.AdamW(params, lr=1e-4) for name, (_, _, params) in runs.items()}

    def step(name: str) -> tuple[float, float, float]:
        """One training step: (wall seconds, CPU seconds of this process, loss)."""
        model, inputs, _ = runs[name]
        start, start_cpu = time.perf_counter(), time.process_time()
        loss = model(**inputs).loss
        loss.backward()
        optimizers[name].step()
        optimizers[name].zero_grad(set_to_none=True)
        return time.perf_counter() - start, time.process_time() - start_cpu, loss.item()

    # Same weights, same batch: the first losses must agree, or the comparison is meaningless.
    first = {name: step(name)[2] for name in runs}
    if abs(first["minillava"] - first["transformers"]) > 1e-3:
        raise SystemExit(f"the two models disagree on the first loss: {first}")
    for _ in range(args.warmup - 1):
        for name in runs:
            step(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu_times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.steps):
        for name in runs:
            wall, cpu, _ = step(name)
            times[name].append(wall)
            cpu_times[name].append(cpu)

    medians = {name: statistics.median(t) for name, t in times.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu_times.items()}
    speedup = medians["transformers"] / medians["minillava"]
    cpu_speedup = cpu_medians["transformers"] / cpu_medians["minillava"]
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else []
    attn = getattr(theirs.config, "_attn_implementation", "?")
    print(
        f"train step: batch {args.batch_size}, {n_tokens} tokens (36 image tokens per row), "
        f"{args.threads} threads, {'vision frozen' if args.freeze_vision else 'all parameters'}"
    )
    print(f"{'model':<13} {'median s/step':>13} {'tokens/s':>9} {'CPU s/step':>10}")
    for name, median in medians.items():
        print(f"{name:<13} {median:>13.4f} {n_tokens / median:>9.0f} {cpu_medians[name]:>10.4f}")
    print(
        f"minillava is {speedup:.2f}x the speed of transformers by wall time, {cpu_speedup:.2f}x "
        f"by CPU time (transformers attention: {attn}; load average {' '.join(load)})"
    )

    result = {
        "command": "python bench/bench_train.py " + " ".join(argv or sys.argv[1:]),
        "machine": machine(),
        "load_average": load,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "tokens_per_batch": n_tokens,
        "freeze_vision": args.freeze_vision,
        "transformers_attn_implementation": attn,
        "first_loss": first,
        "median_step_s": medians,
        "median_step_cpu_s": cpu_medians,
        "step_times_s": times,
        "speedup": speedup,
        "cpu_speedup": cpu_speedup,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
