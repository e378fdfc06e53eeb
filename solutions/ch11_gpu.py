"""Chapter 11, Training on one GPU: reference solutions. Same names and signatures as
exercises/ch11_gpu.py.

The library versions of cosine_lr, accumulate_gradients and decay_groups live in
minillava/train.py (lr_at, the gradient accumulation inside train_stage, param_groups); the
all-reduce that ring_all_reduce simulates is torch.distributed's, which DDP calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from torch import Tensor, nn


def flops_per_token(n_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """6 N (weights, forward + backward) + 12 L C T (attention scores and weighted sum)."""
    return float(6 * n_params + 12 * num_layers * hidden_size * seq_len)


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Achieved model FLOP/s as a fraction of the hardware's peak."""
    return tokens_per_second * flops_per_token / peak_flops


def cosine_lr(
    step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> float:
    """Linear warm-up to max_lr, then a cosine down to max_lr * min_lr_ratio at the last step."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    min_lr = max_lr * min_lr_ratio
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def accumulate_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], Tensor],
    micro_batches: Sequence,
) -> float:
    """Backward each micro-batch's loss / n: the summed gradients are those of the full batch."""
    n = len(micro_batches)
    total = 0.0
    for batch in micro_batches:
        loss = loss_fn(model, batch) / n  # the full-batch mean is the mean of the n means
        loss.backward()  # adds into .grad; this micro-batch's activations are freed
        total += loss.item()
    return total


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable matrices (dim >= 2) decay; trainable vectors (biases, norm gains) do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def ring_all_reduce(
    grads: Sequence[Tensor], send: Callable[[int, int, Tensor], Tensor]
) -> list[Tensor]:
    """Reduce-scatter then all-gather round the ring, one chunk per rank per step; then / N."""
    n = len(grads)
    flat = [g.detach().reshape(-1).clone() for g in grads]  # each rank's own buffer
    chunks = [list(f.tensor_split(n)) for f in flat]  # views: writing a chunk writes the buffer
    right = [(r + 1) % n for r in range(n)]

    # Reduce-scatter: at step s rank r passes on chunk (r - s) % n, the one it has just added to
    # (at step 0, its own), and its neighbour adds it in. After n - 1 steps chunk c is complete
    # on rank (c - 1) % n, that is rank r holds the complete chunk (r + 1) % n.
    for s in range(n - 1):
        index = [(r - s) % n for r in range(n)]
        arriving = [send(r, right[r], chunks[r][index[r]]) for r in range(n)]  # all at once
        for r in range(n):
            chunks[right[r]][index[r]].add_(arriving[r])

    # All-gather: at step s rank r passes on the complete chunk (r + 1 - s) % n (at step 0 its
    # own, then the one it has just received), and its neighbour replaces its copy with it.
    for s in range(n - 1):
        index = [(r + 1 - s) % n for r in range(n)]
        arriving = [send(r, right[r], chunks[r][index[r]]) for r in range(n)]
        for r in range(n):
            chunks[right[r]][index[r]].copy_(arriving[r])

    return [f.div_(n).reshape(g.shape) for f, g in zip(flat, grads, strict=True)]
