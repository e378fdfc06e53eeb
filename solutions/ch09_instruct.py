"""Chapter 9, visual instruction tuning: reference solutions. Same names and signatures as
exercises/ch09_instruct.py.

The library versions live in minillava/lora.py (LoRALinear: its init, forward and merge),
minillava/tokenizer.py (Tokenizer.render's answer mask) and minillava/llava.py
(Llava.count_parameters).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def init_lora_factors(in_features: int, out_features: int, rank: int) -> tuple[Tensor, Tensor]:
    """LoRA's two factors at the start of training: A (rank, in) random, B (out, rank) zero."""
    lora_A = torch.empty(rank, in_features)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))  # what nn.Linear does with its weight
    lora_B = torch.zeros(out_features, rank)  # B A = 0: the layer starts as the pretrained one
    return lora_A, lora_B


def lora_forward(
    x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor, alpha: float
) -> Tensor:
    """y = x Wᵀ + b + (alpha / r) x Aᵀ Bᵀ: (..., in) -> (..., out)."""
    rank = lora_A.shape[0]
    out = x @ weight.T
    if bias is not None:
        out = out + bias
    return out + (x @ lora_A.T @ lora_B.T) * (alpha / rank)  # (.., in) -> (.., r) -> (.., out)


def merge_lora_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, alpha: float) -> Tensor:
    """W' = W + (alpha / r) B A, shape (out, in): one plain matrix, same outputs."""
    return weight + (alpha / lora_A.shape[0]) * (lora_B @ lora_A)


def assistant_labels(
    input_ids: Tensor, assistant_id: int, eot_id: int, ignore_index: int = -100
) -> Tensor:
    """Labels of a rendered conversation: the id on every answer token and its <|endoftext|>."""
    labels = torch.full_like(input_ids, ignore_index)
    inside_answer = False
    for t, token in enumerate(input_ids.tolist()):
        if inside_answer:
            labels[t] = token
            if token == eot_id:  # the answer's end is scored too: the model learns to stop
                inside_answer = False
        elif token == assistant_id:  # the role token itself is given, not predicted
            inside_answer = True
    return labels


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) numbers of parameters; a tensor shared by two modules counts once."""
    params = list(model.parameters())  # parameters() yields a shared (tied) tensor once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params)
