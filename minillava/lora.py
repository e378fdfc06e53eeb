"""LoRA: fine-tune a big frozen matrix through a small low-rank update.

Full fine-tuning changes every weight W (out x in) of the decoder. LoRA (Hu et al., 2021) freezes
W and learns a low-rank correction instead:

    y = x Wᵀ + b  +  (alpha / r) · x Aᵀ Bᵀ        A: (r, in), B: (out, r), r << min(in, out)

so a layer trains r·(in + out) numbers instead of in·out. B starts at zero, hence the adapted
model starts *exactly* equal to the pretrained one and training moves it away gently. The factor
alpha / r keeps the update's size comparable when you change r.

After training, the update can be folded into the weight, W' = W + (alpha / r) B A (`merge`), so
inference costs nothing extra and the checkpoint has the plain layer names again (`merge_lora`).

With `minillava train --parts exercises --lora` your chapter 9 lora_forward computes every LoRA
layer's output (minillava/parts.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minillava import parts


class LoRALinear(nn.Module):
    """An `nn.Linear` with a frozen weight plus a trainable low-rank update `B @ A`."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"LoRALinear: rank must be >= 1, got {rank}")
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))  # (out, r)
        # A gets nn.Linear's default init, B is zero: B @ A = 0, the output is unchanged at start.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        for p in self.base.parameters():
            p.requires_grad_(False)

    def delta_weight(self) -> torch.Tensor:
        """The update LoRA adds to the base weight: (alpha / r) · B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        yours = parts.get("lora_forward")  # a learner's, if chosen (parts.py)
        no_dropout = isinstance(self.dropout, nn.Identity) or not self.training
        if yours is not None and not self.merged and no_dropout:  # (the exercise has none)
            base = self.base
            return yours(x, base.weight, base.bias, self.lora_A, self.lora_B, self.alpha)
        out = self.base(x)
        if not self.merged:
            # Two thin matmuls, (.., in) -> (.., r) -> (.., out): never build the (out, in) delta.
            out = out + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
        return out

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight (same outputs, no extra cost at inference)."""
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`: subtract the update again, e.g. to keep training the adapters."""
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, merged={self.merged}"


def apply_lora(
    model: nn.Module,
    target_names: tuple[str, ...] | list[str] = ("q_proj", "v_proj"),
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Freeze `model` and wrap each `nn.Linear` whose attribute name is in `target_names`.

    Example: `apply_lora(decoder, ("q_proj", "v_proj"))` adapts every attention layer's query and
    value projections, the choice of the LoRA paper. Afterwards only the `lora_A`/`lora_B`
    parameters require gradients. Returns the qualified names of the wrapped layers.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    targets = set(target_names)
    # Collect first, then replace: changing modules while iterating over them is unsafe.
    to_wrap = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if not to_wrap:
        raise ValueError(
            f"apply_lora: no nn.Linear named any of {sorted(targets)} in {type(model).__name__}"
        )
    for name, module in to_wrap:
        _refuse_shared_weight(model, name, module)
    for name, module in to_wrap:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank=rank, alpha=alpha, dropout=dropout))
    return [name for name, _ in to_wrap]


def _refuse_shared_weight(model: nn.Module, name: str, module: nn.Linear) -> None:
    """Raise if the layer's weight is also another module's parameter (tied weights).

    The usual case: a decoder with tied embeddings, whose `lm_head.weight` *is*
    `embed_tokens.weight`. LoRA on `lm_head` trains an update meant for the output scores, but
    `merge` adds it to that one shared matrix, so it changes the input embeddings as well, and
    the merged model no longer computes what was trained (on a tiny tied decoder the logits
    moved by about 5). Untying silently would change the model instead; refusing says why.
    """
    sharing = [
        other
        for other, parameter in model.named_parameters(remove_duplicate=False)
        if parameter is module.weight and other != f"{name}.weight"
    ]
    if sharing:
        raise ValueError(
            f"apply_lora: {name}.weight is shared with {', '.join(sharing)} (tied weights): "
            f"merging an update into {name} would change {sharing[0]} too. Leave "
            f"{name.rsplit('.', 1)[-1]!r} out of target_names, or build the model untied "
            "(DecoderConfig(tie_embeddings=False))"
        )


def merge_lora(model: nn.Module) -> nn.Module:
    """Merge every LoRALinear and put the plain `nn.Linear` back (in place; returns `model`).

    The state_dict then has exactly the names of the un-adapted model, so the merged model loads
    anywhere the original did (checkpoint.load_llava, transformers export).
    """
    lora_layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in lora_layers:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (what the optimizer trains in a LoRA run)."""
    return [p for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))]
