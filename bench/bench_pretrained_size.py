"""What running a real LLaVA costs on this machine: memory, image + prompt time, tokens/s.

Builds minillava's `Llava` at the sizes of a LLaVA-1.5 checkpoint's config.json (default: the
TinyLlama-1.1B-based LLaVA, CLIP ViT-L/14 at 336 px into TinyLlama's 22 layers of 2048 with
grouped-query attention) with RANDOM weights: speed and memory do not depend on the values, and
no download is needed. Times one 336-pixel image with a short question (the prefill: 576 image
tokens plus the prompt) and greedy decoding of --new-tokens tokens with the KV cache.

    .venv/bin/python bench/bench_pretrained_size.py                  # TinyLlama-1.1B LLaVA
    .venv/bin/python bench/bench_pretrained_size.py --config DIR/config.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from minillava.llava import Llava
from minillava.pretrained import llava_config_from_hf

# The sizes of a LLaVA-1.5-format TinyLlama checkpoint (e.g. bczhou/tiny-llava-v1-hf).
TINYLLAMA_LLAVA = {
    "model_type": "llava",
    "image_token_index": 32000,
    "vision_feature_layer": -2,
    "vision_config": {
        "model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
        "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
        "hidden_act": "quick_gelu",
    },
    "text_config": {
        "model_type": "llama", "vocab_size": 32064, "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
    },
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a LLaVA-1.5 config.json (default: TinyLlama-1.1B's)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=40, help="the question's tokens")
    args = parser.parse_args()
    settings = json.load(open(args.config)) if args.config else TINYLLAMA_LLAVA
    config = llava_config_from_hf(settings)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = Llava(config).to(dtype).eval()
    n = sum(p.numel() for p in model.parameters())
    parts = {k: v["total"] for k, v in model.parameter_summary().items()}
    ids = torch.randint(0, 32000, (1, args.prompt_tokens))
    ids[0, 1] = config.image_token_id
    size = config.vision.image_size
    pixels = torch.randn(1, 3, size, size, dtype=dtype)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, pixels, max_new_tokens=1)  # the prefill and one token
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, pixels, max_new_tokens=args.new_tokens + 1)
        total = time.perf_counter() - start
    per_token = (total - prefill) / args.new_tokens
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    each = ", ".join(f"{k} {v / 1e6:.0f}M" for k, v in parts.items())
    print(f"parameters: {n / 1e9:.2f} B ({each})")
    weights = n * dtype.itemsize / 2**30
    print(f"dtype {args.dtype}, {torch.get_num_threads()} threads, weights {weights:.1f} GiB")
    print(
        f"image + {args.prompt_tokens}-token prompt ({config.num_image_tokens} image tokens) and "
        f"the first token: {prefill:.1f} s"
    )
    print(f"then {1 / per_token:.2f} tokens/s ({per_token * 1000:.0f} ms a token, KV cache)")
    print(f"peak resident memory: {peak:.1f} GiB")


if __name__ == "__main__":
    main()
