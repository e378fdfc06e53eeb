"""Chapter 6, CLIP: reference solutions (same names and signatures as exercises/ch06_clip.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def similarity_matrix(image_features: Tensor, text_features: Tensor, logit_scale: float) -> Tensor:
    """(B_img, E), (B_txt, E) -> (B_img, B_txt) scaled cosine similarities."""
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return logit_scale * image_features @ text_features.T


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, temperature: float) -> Tensor:
    """Symmetric InfoNCE over a batch of B matching pairs; a scalar."""
    logits = image_embeds @ text_embeds.T / temperature  # (B, B): row i = image i vs all texts
    targets = torch.arange(logits.shape[0], device=logits.device)
    image_to_text = F.cross_entropy(logits, targets)  # each image picks its caption
    text_to_image = F.cross_entropy(logits.T, targets)  # each caption picks its image
    return (image_to_text + text_to_image) / 2


def pool_at_eot(token_states: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T, C) states, (B, T) 1/0 mask (right padding) -> (B, C) states of the last real token."""
    last = attention_mask.long().sum(dim=1) - 1  # (B,) index of the last 1 in each row
    return token_states[torch.arange(token_states.shape[0], device=token_states.device), last]


def zero_shot_predict(
    image_embeds: Tensor, class_embeds: Tensor, logit_scale: float = 100.0
) -> tuple[Tensor, Tensor]:
    """(B, E) images, (K, E) class prompts -> (predicted class (B,), probabilities (B, K))."""
    logits = similarity_matrix(image_embeds, class_embeds, logit_scale)  # (B, K)
    probs = logits.softmax(dim=-1)  # each image: a distribution over the K classes
    return probs.argmax(dim=-1), probs


def contrastive_loss_with_hard_negatives(
    image_emb: Tensor, text_emb: Tensor, hard_text_emb: Tensor, logit_scale: float | Tensor
) -> Tensor:
    """(B, E) images, (B, E) captions, (M, E) hard captions (none unit length) -> a scalar."""
    image = F.normalize(image_emb, dim=-1)
    text = F.normalize(text_emb, dim=-1)
    hard = F.normalize(hard_text_emb, dim=-1)
    B = image.shape[0]
    targets = torch.arange(B, device=image.device)
    # Image to text: the batch's captions first, so image i's own caption stays column i.
    logits = logit_scale * image @ torch.cat([text, hard]).T  # (B, B + M)
    image_to_text = F.cross_entropy(logits, targets)
    # Text to image: only the B batch captions have an image to pick.
    text_to_image = F.cross_entropy(logits[:, :B].T, targets)  # (B, B)
    return (image_to_text + text_to_image) / 2
