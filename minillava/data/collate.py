"""Collation: turn a list of samples of different lengths into one batch of rectangular tensors.

A batch needs every row to have the same length T, so shorter rows are padded with ``<|pad|>``:

* ``attention_mask`` is 1 on real tokens and 0 on padding, so no token attends to padding.
* ``labels`` are the targets of the loss, aligned with ``input_ids`` (the model shifts them by
  one). They are -100 (PyTorch's ``ignore_index``) wherever we do not want a loss: padding, and,
  for conversations, everything but the assistant's answers (the system line, the user's
  questions, the ``<image>`` placeholder, the role tokens).

Padding side: right padding (``[tok tok tok pad pad]``) is the usual choice for training. For
batched generation use left padding (``[pad pad tok tok tok]``): every row then ends at the same
position, where the next token is generated. The decoder computes positions from the attention
mask, so left padding does not change the result.

Truncation (``max_len``): a conversation longer than ``max_len`` token ids keeps its first
``max_len`` ids (the system line, the image and the first turns; a cut answer is still trained on
up to the cut). ``max_len`` counts token ids before the model expands each ``<image>`` into the
image's patch positions. A cut that would drop an ``<image>`` token raises an error, because its
image would no longer have a place in the sequence.

Example, batch of 2 with right padding (P = pad id, A = answer tokens, ? = question tokens)::

    input_ids       [S S U I ? ? A' A A E]      S: system, U: <|user|>, I: <image>
                    [S S U I ? A' A E P P]      A': <|assistant|>, E: <|endoftext|>
    attention_mask  [1 1 1 1 1 1 1  1 1 1]
                    [1 1 1 1 1 1 1  1 0 0]
    labels          [- - - - - - -  A A E]      - : -100
                    [- - - - - - A  E - -]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100  # cross_entropy(ignore_index=-100): no loss on these positions


def _pad(rows: list[list[int]], value: int, length: int, padding_side: str) -> Tensor:
    """Pad each row to `length` with `value`, on the given side -> (B, length) long tensor."""
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for b, row in enumerate(rows):
        if padding_side == "right":
            out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        else:
            out[b, length - len(row) :] = torch.tensor(row, dtype=torch.long)
    return out


def left_pad(rows: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts of different lengths -> (input_ids, attention_mask), each (B, T), left-padded:
    every row ends at the last position, where generation continues it."""
    if not rows:
        raise ValueError("left_pad got no rows")
    length = max(len(row) for row in rows)
    input_ids = _pad(list(rows), pad_id, length, "left")
    attention_mask = _pad([[1] * len(row) for row in rows], 0, length, "left")
    return input_ids, attention_mask


def _check_padding_side(padding_side: str) -> None:
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")


def _images_of(sample: dict, index: int) -> list[Tensor]:
    """The images of one sample as a list of (3, H, W) tensors: none, one, or several."""
    pixel_values = sample.get("pixel_values")
    if pixel_values is None:
        return []
    if not isinstance(pixel_values, Tensor) or pixel_values.dim() not in (3, 4):
        raise ValueError(
            f"sample {index}: 'pixel_values' must be a tensor (3, H, W) (or (N, 3, H, W) for N "
            f"images) or None, got {getattr(pixel_values, 'shape', type(pixel_values))}"
        )
    return [pixel_values] if pixel_values.dim() == 3 else list(pixel_values)


def collate_conversations(
    samples: Sequence[dict],
    tokenizer,
    padding_side: str = "right",
    max_len: int | None = None,
) -> dict[str, Tensor | None]:
    """Render LLaVA conversations with the chat template and batch them.

    Each sample is ``{"pixel_values": Tensor (3, H, W) | None, "conversations": [LLaVA turns]}``
    (extra keys are ignored). Returns ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long,
    ``labels`` (B, T) long (-100 except the assistant's tokens), and ``pixel_values``
    (N_img, 3, H, W) float, the images of all samples stacked in order (None if no sample has one).
    T is the longest rendered conversation, capped at ``max_len``.
    """
    _check_padding_side(padding_side)
    if not samples:
        raise ValueError("collate_conversations got an empty list of samples")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be a positive number of tokens or None, got {max_len}")

    all_ids, all_labels, images = [], [], []
    for index, sample in enumerate(samples):
        if "conversations" not in sample:
            raise ValueError(f"sample {index} has no 'conversations' (keys: {sorted(sample)})")
        ids, mask = tokenizer.render(sample["conversations"])
        sample_images = _images_of(sample, index)
        n_image_tokens = ids.count(tokenizer.image_id)
        if n_image_tokens != len(sample_images):
            raise ValueError(
                f"sample {index}: its conversation has {n_image_tokens} {tokenizer.IMAGE} "
                f"token(s) but {len(sample_images)} image(s) were given in 'pixel_values'; "
                "each image needs exactly one <image> in the text"
            )
        if max_len is not None and len(ids) > max_len:
            if ids[max_len:].count(tokenizer.image_id):
                raise ValueError(
                    f"sample {index}: truncating to max_len={max_len} would cut an "
                    f"{tokenizer.IMAGE} token (the conversation has {len(ids)} tokens); "
                    "raise max_len"
                )
            ids, mask = ids[:max_len], mask[:max_len]
        all_ids.append(ids)
        all_labels.append(
            [tok if keep else IGNORE_INDEX for tok, keep in zip(ids, mask, strict=True)]
        )
        images.extend(sample_images)

    length = max(len(ids) for ids in all_ids)
    pixel_values = None
    if images:
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise ValueError(
                f"all images in a batch must have the same shape, got {sorted(shapes)}"
            )
        pixel_values = torch.stack(images).float()  # (N_img, 3, H, W)
    return {
        "input_ids": _pad(all_ids, tokenizer.pad_id, length, padding_side),
        "attention_mask": _pad([[1] * len(ids) for ids in all_ids], 0, length, padding_side),
        "labels": _pad(all_labels, IGNORE_INDEX, length, padding_side),
        "pixel_values": pixel_values,
    }


def collate_text(
    texts: Sequence[str],
    tokenizer,
    max_len: int | None,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Batch plain texts for language-model pretraining: every token is a target.

    Each text is encoded and closed with ``<|endoftext|>`` (so the model learns where a text
    ends), cut to its first ``max_len`` ids (None: no cut), and padded to the longest row.
    ``labels`` = ``input_ids`` with -100 on the padding.
    """
    _check_padding_side(padding_side)
    if not texts:
        raise ValueError("collate_text got an empty list of texts")
    if max_len is not None and max_len < 1:
        raise ValueError(f"max_len must be a positive number of tokens or None, got {max_len}")
    rows = []
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"text {index} must be a str, got {type(text).__name__}")
        rows.append((tokenizer.encode(text) + [tokenizer.eot_id])[:max_len])
    length = max(len(row) for row in rows)
    return {
        "input_ids": _pad(rows, tokenizer.pad_id, length, padding_side),
        "attention_mask": _pad([[1] * len(row) for row in rows], 0, length, padding_side),
        "labels": _pad(rows, IGNORE_INDEX, length, padding_side),
    }
