"""Training-step throughput: minillava's Llava against transformers' LlavaForConditionalGeneration.

    python bench/bench_train.py --threads 1                     # a VQA batch of the instruct stage
    python bench/bench_train.py --threads 1 --data conversation # a batch of long conversations
    python bench/bench_train.py --steps 20 --batch-size 16 --out bench/results/train.json

The comparison is kept fair on purpose:

- the same architecture and the same weights: the transformers model is built by
  `minillava.interop.to_hf` from the minillava model, at the cpu preset's sizes (what `make
  train` trains: ViT 4x128 on 48x48 images in 16x16 patches = 9 image tokens, decoder 4x128,
  MLP projector, the tokenizer's vocabulary);
- the same batch: one batch exactly as the instruct stage builds it (`stages.ConversationBatches`:
  short-answer VQA, one question per image, or the data engine's conversations), collated once.
  transformers wants each `<image>` expanded to P placeholder ids beforehand (its processor's
  job), minillava expands it inside forward, so both see the same sequence;
- the same work per step: forward, loss on the assistant's tokens, backward, AdamW step, both in
  train mode, both fp32, both with PyTorch's SDPA attention, same thread count, same process.
  Each model is called the way its training loop calls it: minillava as `minillava.train` does
  (`return_logits=False`: the loss alone), transformers with its defaults;
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


def tiny_llava_config(
    tokenizer, max_seq_len: int | None = None, vision_feature_layer: int | None = None
):
    """The LlavaConfig that `make train` (the cpu preset) trains, built by minillava.stages."""
    from minillava.presets import get_preset
    from minillava.stages import llava_config

    config = llava_config(get_preset("cpu"), tokenizer)
    if max_seq_len is not None:
        config.text = dataclasses.replace(config.text, max_seq_len=max_seq_len)
    if vision_feature_layer is not None:  # e.g. -2, LLaVA's, to compare with older figures
        config.vision_feature_layer = vision_feature_layer
    return config


def make_batch(tokenizer, batch_size: int, data: str = "vqa", seed: int = 0) -> dict:
    """One batch of the cpu preset's instruct stage, built by the stage's own code.

    data="vqa": one short-answer question per image (85% of instruct batches);
    "conversation": the data engine's conversations, descriptions and reasoning (the other 15%).
    """
    from minillava.data.shapes import ShapesWorld
    from minillava.presets import get_preset
    from minillava.stages import ConversationBatches, world_config

    preset = get_preset("cpu")
    stage = dataclasses.replace(preset.instruct, batch_size=batch_size, grad_accum=1)
    images = ShapesWorld("train", batch_size, world_config(preset), seed=seed)
    batches = ConversationBatches(
        "instruct", images, tokenizer, stage, seed, preset.data.max_len,
        vqa_fraction=1.0 if data == "vqa" else 0.0,
    )  # fmt: skip
    return batches[0]


# Where minillava's training step saves work over transformers' (same loss, same gradients).
# `--disable` switches them off one by one, to measure what each is worth.
SAVINGS = {
    "loss-only": "return_logits=False: the loss alone, no (B, T, V) logits (this also turns "
    "off last-layer and padding-mlp, which live in that path)",
    "last-layer": "the last decoder layer only at the scored positions (all the loss reads)",
    "padding-mlp": "the other decoder layers' MLPs only at the real (non-padding) tokens",
    "causal-mask": "right-padded batches: plain is_causal attention, no (B, 1, T, T) mask",
    "shared-prefix": "the positions every row shares (system line, user tag) computed once "
    "(decoder.SharedPrefix)",
    "vit-early-exit": "the ViT stops at vision_feature_layer (the cpu preset's 0: no block runs; "
    "-2: the last block does not)",
}


def disable_savings(names: list[str]) -> None:
    """Put back the work a saving avoids, by patching minillava in this process only."""
    from minillava import decoder
    from minillava.llava import Llava

    if "causal-mask" in names:  # build the explicit mask as for left padding
        decoder.is_right_padded = lambda attention_mask: False
    if "padding-mlp" in names:  # every layer's MLP at every position
        layer_forward = decoder.DecoderLayer.forward

        def every_position(self, x, cos, sin, mask, cache=None, keep=None, positions=None):
            return layer_forward(self, x, cos, sin, mask, cache, positions=positions)

        decoder.DecoderLayer.forward = every_position
    if "last-layer" in names:  # the whole last layer, then pick the scored positions
        built = {}
        build_mask = decoder.build_attention_mask

        def recording_build_mask(*args, **kwargs):
            built["mask"] = build_mask(*args, **kwargs)
            return built["mask"]

        def whole_layer_at(self, x, cos, sin, mask, queries, cache=None, positions=None):
            whole = self(x, cos, sin, built["mask"], cache, positions=positions)
            return decoder.gather_positions(whole, queries)

        decoder.build_attention_mask = recording_build_mask
        decoder.DecoderLayer.forward_at = whole_layer_at
    if "vit-early-exit" in names:  # every ViT block, as transformers' LLaVA runs them

        def encode_images(self, pixel_values):
            hidden_states = self.vision_tower(pixel_values).hidden_states
            return self.projector(hidden_states[self.config.vision_feature_layer][:, 1:])

        Llava.encode_images = encode_images


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
    parser.add_argument(
        "--data",
        choices=["vqa", "conversation"],
        default="vqa",
        help="which kind of instruct-stage batch (see make_batch)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--freeze-vision",
        action="store_true",
        help="train only projector + decoder (the instruct stage); default: every parameter",
    )
    parser.add_argument(
        "--disable",
        default="",
        help="comma-separated savings of minillava to switch off ('all', or any of: "
        + ", ".join(SAVINGS)
        + "), to measure what each is worth",
    )
    parser.add_argument("--out", default="bench/results/train.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vision-feature-layer",
        type=int,
        help="ViT layer the projector reads (default: the cpu preset's, 0; LLaVA's is -2)",
    )
    args = parser.parse_args(argv)
    disabled = list(SAVINGS) if args.disable == "all" else [s for s in args.disable.split(",") if s]
    unknown = set(disabled) - set(SAVINGS)
    if unknown:
        parser.error(f"--disable: unknown saving(s) {sorted(unknown)}; known: {list(SAVINGS)}")
    disable_savings(disabled)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from minillava.export import expand_image_tokens
    from minillava.interop import to_hf
    from minillava.llava import Llava
    from minillava.tokenizer import get_tokenizer
    from minillava.train import loss_only_kwargs

    tokenizer = get_tokenizer()
    config = tiny_llava_config(tokenizer, vision_feature_layer=args.vision_feature_layer)
    ours = Llava(config).train()
    # The decoder's own switch (the other savings are patched in by disable_savings).
    ours.language_model.share_prefix = "shared-prefix" not in disabled
    theirs = to_hf(ours).train()  # same weights, copied
    theirs.config.use_cache = False
    batch = make_batch(tokenizer, args.batch_size, args.data, args.seed)
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
    n_scored = int((hf_batch["labels"][:, 1:] != -100).sum())
    n_positions = hf_batch["input_ids"].numel()
    # minillava is called as its training loop calls it (the loss alone, no (B, T, V) logits).
    ours_kwargs = {} if "loss-only" in disabled else loss_only_kwargs(ours)

    def trainable(model: torch.nn.Module, vision_prefix: str):
        for name, param in model.named_parameters():
            param.requires_grad_(not (args.freeze_vision and name.startswith(vision_prefix)))
        return [p for p in model.parameters() if p.requires_grad]

    runs = {
        "minillava": (ours, {**batch, **ours_kwargs}, trainable(ours, "vision_tower")),
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
        f"train step: {args.data} batch of {args.batch_size}, {n_positions} positions, "
        f"{n_tokens} real tokens ({config.num_image_tokens} image tokens per image), {n_scored} "
        f"scored, {args.threads} threads, "
        f"{'vision frozen' if args.freeze_vision else 'all parameters'}"
        + (f"; minillava savings disabled: {', '.join(disabled)}" if disabled else "")
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
        "data": args.data,
        "batch_size": args.batch_size,
        "positions_per_batch": n_positions,
        "tokens_per_batch": n_tokens,
        "scored_per_batch": n_scored,
        "image_tokens_per_image": config.num_image_tokens,
        "vision_feature_layer": config.vision_feature_layer,
        "minillava_forward_kwargs": ours_kwargs,
        "minillava_savings_disabled": disabled,
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
