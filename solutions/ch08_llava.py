"""Chapter 8, LLaVA: reference solutions. Same names and signatures as exercises/ch08_llava.py.

The library versions live in minillava/llava.py: `splice_image_tokens` (a whole batch, any number
of images per row, padding), `Llava.encode_images` (the penultimate layer without [CLS]) and
`Llava.freeze_vision` / `freeze_language` (the stages).
"""

from __future__ import annotations

import torch
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
