"""Export a trained minillava as a Hugging Face `transformers` LLaVA directory.

    minillava export --format hf exported/ [--checkpoint runs/cpu/llava.pt]

minillava's parameter names were chosen to follow transformers' CLIP and Llama, so the whole
model maps onto `LlavaForConditionalGeneration` one tensor at a time (`minillava/interop.py`
holds that one mapping). The exported directory loads with

    from transformers import LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained("exported/")

and gives the same logits as minillava (the tests check this to 1e-4). Two differences to know:

- The tokenizer is ours (tiktoken BPE trained on ShapesWorld), not a transformers tokenizer.
  It is copied next to the weights; encode with `minillava.tokenizer`, or tiktoken directly.
- transformers' LLaVA expects each `<image>` already expanded to one token per image patch in
  `input_ids` (its processor does that); minillava's model expands it itself.

transformers is a dev extra: `interop` imports it only when exporting.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from minillava.checkpoint import DEFAULT_CHECKPOINT, load_llava
from minillava.cli import ArgumentParser, output_dir_problem
from minillava.interop import expand_image_tokens_for_hf, to_hf
from minillava.tokenizer import ASSETS

FORMATS = ("hf",)

README = """# minillava, exported for transformers

Written by `minillava export --format hf` from `{checkpoint}`.

```python
from transformers import LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained("{directory}")
```

- Vision: CLIP-style ViT, {image_size}x{image_size} pixels, patch {patch_size}, so {num_patches}
  image tokens per image (penultimate layer, CLS dropped).
- Projector: `{projector}`. Language model: Llama, {num_layers} layers, hidden
  {hidden_size}, vocabulary {vocab_size}.
- Image token id: {image_token_id}. transformers' LLaVA wants it repeated {num_patches} times in
  `input_ids` for each image (minillava expands a single `<image>` itself).
- Pixel values: RGB resized/padded to {image_size}x{image_size}, then (x / 255 - 0.5) / 0.5.
- Tokenizer: `tokenizer/` holds minillava's tiktoken file; load it with
  `minillava.tokenizer.get_tokenizer()` (same vocabulary) and use its chat template
  (`render_prompt`). There is no transformers tokenizer for it.
- Logits equal minillava's to 1e-4 (tests/test_export.py).
"""


def expand_image_tokens(
    input_ids: torch.Tensor,
    num_image_tokens: int,
    image_token_id: int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    pad_token_id: int = 0,
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """Repeat every `<image>` id `num_image_tokens` times, as transformers' LLaVA processor does.

    minillava's model takes one `<image>` per image and splices in the P patch embeddings itself;
    transformers' `LlavaForConditionalGeneration` wants the P placeholders already in `input_ids`:
    (B, T) -> (B, T + (P - 1) * images per row), re-padded (`interop.expand_image_tokens_for_hf`).
    `labels` (B, T), if given, are expanded the same way with -100 on image positions and padding.
    Returns {"input_ids", "attention_mask"} (+ "labels"), ready for `hf_model(**batch)`.
    """
    expand = dict(num_patches=num_image_tokens, image_token_id=image_token_id)
    ids, mask = expand_image_tokens_for_hf(
        input_ids,
        attention_mask=attention_mask,
        padding_side=padding_side,
        pad_token_id=pad_token_id,
        **expand,
    )
    out = {"input_ids": ids, "attention_mask": mask}
    if labels is not None:
        # Mark image positions in the labels with the image id, so they expand like input_ids,
        # then turn every expanded image position into -100 (no loss on image tokens).
        marked = torch.where(input_ids == image_token_id, image_token_id, labels)
        expanded, _ = expand_image_tokens_for_hf(
            marked,
            attention_mask=attention_mask,
            padding_side=padding_side,
            pad_token_id=-100,
            **expand,
        )
        out["labels"] = expanded.masked_fill(ids == image_token_id, -100)
    return out


def export_hf(model, out_dir: str | Path, tokenizer=None, checkpoint: str = "(in memory)") -> Path:
    """Write `model` (a minillava Llava) as a transformers LLaVA directory; returns the directory.

    The directory gets config.json + model.safetensors (`save_pretrained`), a README.md and, when
    a tokenizer is given, its tiktoken vocabulary under tokenizer/.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_model = to_hf(model)
    hf_model.save_pretrained(out_dir)
    config = model.config
    (out_dir / "README.md").write_text(
        README.format(
            checkpoint=checkpoint,
            directory=out_dir,
            image_size=config.vision.image_size,
            patch_size=config.vision.patch_size,
            num_patches=config.vision.num_patches,
            projector=config.projector,
            num_layers=config.text.num_layers,
            hidden_size=config.text.hidden_size,
            vocab_size=config.text.vocab_size,
            image_token_id=config.image_token_id,
        )
    )
    if tokenizer is not None:
        _copy_tokenizer(tokenizer, out_dir / "tokenizer")
    return out_dir


def _copy_tokenizer(tokenizer, out_dir: Path) -> None:
    """Copy the tokenizer's vocabulary file (when it has one) and its special-token ids."""
    out_dir.mkdir(parents=True, exist_ok=True)
    vocabulary = ASSETS / f"{tokenizer.name}.tiktoken"
    if vocabulary.is_file():
        shutil.copy(vocabulary, out_dir / vocabulary.name)
    special = {
        "name": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "pad_id": tokenizer.pad_id,
        "image_id": tokenizer.image_id,
        "stop_ids": list(tokenizer.stop_ids),
    }
    (out_dir / "special_tokens.json").write_text(json.dumps(special, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="minillava export",
        description="Write a trained checkpoint as a directory that "
        "transformers.LlavaForConditionalGeneration.from_pretrained loads.",
    )
    parser.add_argument("out_dir", help="output directory (created if missing)")
    parser.add_argument("--format", choices=FORMATS, default="hf")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    args = parser.parse_args(argv)

    problem = output_dir_problem(args.out_dir)  # before the model loads, not after
    if problem:
        print(f"minillava export: {problem}; choose another output folder", file=sys.stderr)
        return 2
    # No checkpoint, or one for another vocabulary: load_llava raises, `minillava` says so.
    model, tokenizer, _ = load_llava(args.checkpoint, device="cpu")
    try:
        out_dir = export_hf(model, args.out_dir, tokenizer, checkpoint=str(Path(args.checkpoint)))
    except (ImportError, ValueError) as error:  # no transformers, or a layout HF cannot hold
        print(f"minillava export: {error}", file=sys.stderr)
        return 1
    print(f"wrote {out_dir}/ (transformers LlavaForConditionalGeneration; see its README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
