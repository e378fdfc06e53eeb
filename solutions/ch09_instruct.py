"""Chapter 9, visual instruction tuning: reference solutions. Same names and signatures as
exercises/ch09_instruct.py.

The library versions live in minillava/lora.py (LoRALinear: its init, forward and merge; and
merge_lora), minillava/tokenizer.py (Tokenizer.render's answer mask) and minillava/llava.py
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


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear of `model` by a plain nn.Linear with W + (alpha / r) B A and the
    same bias, in its parent module; the LoRA layers' tensors are left as they were."""
    from minillava.lora import LoRALinear

    # Collect first, then replace: replacing modules while walking them is asking for trouble.
    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, adapter in adapted:
        base = adapter.base
        merged = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        with torch.no_grad():  # fresh tensors: nothing the caller holds is written
            weight = merge_lora_weight(base.weight, adapter.lora_A, adapter.lora_B, adapter.alpha)
            merged.weight.copy_(weight)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        merged.requires_grad_(base.weight.requires_grad)  # as frozen as the layer it replaces
        parent_name, _, child = name.rpartition(".")  # "layers.0.self_attn", "q_proj"
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, merged)
    return model


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


SAMPLE_SCENES = (0, 1, 2)


def instruction_samples() -> list[dict]:
    """Three conversations written by hand from the scenes' annotations, each mixing question
    kinds the way LLaVA-Instruct mixes them: a look at the whole image, then details."""
    return [
        {
            "id": "sample_0",
            "image": "train_000000.png",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {
                    "from": "gpt",
                    "value": "The image shows two shapes on a dark background. In the middle "
                    "left there is a large purple diamond. In the center there is a small green "
                    "circle. The letter L is written in white in the middle right.",
                },
                {"from": "human", "value": "What is written in the image?"},
                {"from": "gpt", "value": "The letter L is written in the middle right."},
            ],
        },
        {
            "id": "sample_1",
            "image": "train_000001.png",
            "conversations": [
                {"from": "human", "value": "<image>\nHow many shapes are there?"},
                {"from": "gpt", "value": "There are two shapes."},
                {"from": "human", "value": "Where is the blue cross?"},
                {"from": "gpt", "value": "There is a large blue cross in the middle right."},
                {"from": "human", "value": "Is there an orange shape?"},
                {"from": "gpt", "value": "Yes, there is a small orange square in the bottom left."},
            ],
        },
        {
            "id": "sample_2",
            "image": "train_000002.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the triangle?"},
                {"from": "gpt", "value": "It is a small blue triangle, in the middle right."},
                {"from": "human", "value": "Which diamond is the largest one at the bottom?"},
                {"from": "gpt", "value": "There is a large red diamond in the bottom middle."},
                {"from": "human", "value": "Why might someone say the top row is crowded?"},
                {
                    "from": "gpt",
                    "value": "Two of the four shapes are in the top row: in the top middle there "
                    "is a small blue diamond, and in the top right there is a large purple "
                    "diamond.",
                },
            ],
        },
    ]
