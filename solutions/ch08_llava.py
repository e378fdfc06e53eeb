"""Chapter 8, LLaVA: reference solutions. Same names and signatures as exercises/ch08_llava.py.

The library versions live in minillava/llava.py: `splice_image_tokens` (a whole batch, any number
of images per row, padding: what the stretch `splice_batch` does), `Llava.encode_images` (the
penultimate layer without [CLS]) and `Llava.freeze_vision` / `freeze_language` (the stages).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def splice_image(
    input_ids: Tensor, token_embeds: Tensor, image_features: Tensor, image_token_id: int
) -> Tensor:
    """Replace the one <image> token by the image's P vectors: (T, C) -> (T - 1 + P, C)."""
    positions = (input_ids == image_token_id).nonzero().flatten()
    if len(positions) != 1:
        raise ValueError(f"expected exactly one <image> token, found {len(positions)}")
    pos = int(positions[0])
    # Text before the placeholder, the image, text after it: the placeholder itself is dropped.
    return torch.cat([token_embeds[:pos], image_features, token_embeds[pos + 1 :]])


def build_labels(
    input_ids: Tensor,
    answer_mask: Tensor,
    image_token_id: int,
    num_image_tokens: int,
    ignore_index: int = -100,
) -> Tensor:
    """Labels of the spliced sequence: (T,) ids + (T,) mask -> (T + (P - 1) * n_images,)."""
    labels = []
    for token, is_answer in zip(input_ids.tolist(), answer_mask.tolist(), strict=True):
        if token == image_token_id:
            labels += [ignore_index] * num_image_tokens  # P image positions: never scored
        else:
            labels.append(token if is_answer else ignore_index)  # answers only
    return torch.tensor(labels, dtype=torch.long)


def select_patch_features(hidden_states: tuple[Tensor, ...], layer: int = -2) -> Tensor:
    """The patch features of ViT layer `layer`, [CLS] dropped: (B, 1 + N, C) each -> (B, N, C)."""
    return hidden_states[layer][:, 1:]


def freeze_for_alignment(model: nn.Module) -> None:
    """Stage 1: only `model.projector` learns; the vision tower and language model are frozen."""
    model.vision_tower.requires_grad_(False)
    model.language_model.requires_grad_(False)
    model.projector.requires_grad_(True)


def splice_batch(
    input_ids: Tensor,
    token_embeds: Tensor,
    image_features: Tensor,
    image_token_id: int,
    attention_mask: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    """A batch, any number of images a row: (B, T) ids, (B, T, C) embeds, (N_img, P, C) images,
    (B, T) mask and labels -> embeds (B, T', C), mask (B, T'), labels (B, T'), right-padded."""
    real = attention_mask.bool()
    n_tokens = int(((input_ids == image_token_id) & real).sum())
    if n_tokens != len(image_features):
        raise ValueError(
            f"the batch holds {n_tokens} <image> tokens but {len(image_features)} images were "
            "given: each image needs exactly one <image>"
        )
    P = image_features.shape[1]
    rows_embeds, rows_labels, next_image = [], [], 0
    for b in range(input_ids.shape[0]):
        ids = input_ids[b][real[b]]  # (T_b,): the padding is dropped, and added back below
        embeds, targets = token_embeds[b][real[b]], labels[b][real[b]]
        pieces, label_pieces, start = [], [], 0
        for pos in (ids == image_token_id).nonzero().flatten().tolist():
            pieces += [embeds[start:pos], image_features[next_image]]  # the text, then the image
            label_pieces += [targets[start:pos], targets.new_full((P,), ignore_index)]
            next_image += 1  # images are consumed in order over the whole batch
            start = pos + 1  # the placeholder itself is dropped
        rows_embeds.append(torch.cat(pieces + [embeds[start:]]))  # (T_b + n_b (P - 1), C)
        rows_labels.append(torch.cat(label_pieces + [targets[start:]]))
    length = max(len(row) for row in rows_embeds)
    out_embeds, out_mask, out_labels = [], [], []
    for row_embeds, row_labels in zip(rows_embeds, rows_labels, strict=True):
        n_pad = length - len(row_embeds)  # padding on the right: rows start at position 0
        out_embeds.append(F.pad(row_embeds, (0, 0, 0, n_pad)))  # zero vectors
        out_mask.append(F.pad(input_ids.new_ones(len(row_embeds)), (0, n_pad)))
        out_labels.append(F.pad(row_labels, (0, n_pad), value=ignore_index))
    return torch.stack(out_embeds), torch.stack(out_mask), torch.stack(out_labels)
