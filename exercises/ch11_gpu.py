"""Chapter 11, Training on one GPU: your exercises. Fill each function, then run
`minillava grade ch11` (or the `check(...)` cells of notebooks/11_gpu.ipynb).

The arithmetic of a training run (how many FLOPs a token costs, how much of the GPU you use)
and three pieces of the training loop in minillava/train.py: the learning-rate schedule,
gradient accumulation and the weight-decay parameter groups. The stretch exercise averages the
gradients of several GPUs as DistributedDataParallel does, with a ring all-reduce simulated in
one process. None needs a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn


def flops_per_token(n_params: int, num_layers: int, hidden_size: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder: forward + backward, weights and attention.

    Weights: each parameter does one multiply and one add per token in the forward pass
    (2 FLOPs), and twice that in the backward pass (the gradient with respect to the input *and*
    to the weight): 2 + 4 = 6 FLOPs per parameter per token, so 6 * n_params.

    Attention: the scores Q Kᵀ and the weighted sum A V have no parameters, but cost
    2 * seq_len * hidden_size FLOPs each per token per layer in the forward pass; times 3 for
    forward + backward that is 12 * num_layers * hidden_size * seq_len.

        flops_per_token = 6 * n_params + 12 * num_layers * hidden_size * seq_len

    (The estimate of the PaLM paper's appendix B, used by nanoGPT's estimate_mfu.)
    Returns a float.
    """
    raise NotImplementedError("flops_per_token: your code here (chapter 11)")


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the fraction of the hardware's peak the training run achieves.

        achieved FLOP/s = tokens_per_second * flops_per_token
        mfu = achieved / peak_flops               a fraction: 0.4 means 40 %

    peak_flops is the accelerator's dense peak in FLOP/s for the precision you train in (an
    H100 SXM: about 989e12 for bf16). Counting only the model's FLOPs (not recomputation, not
    padding) makes MFU comparable across implementations: a faster kernel raises it, work
    done twice does not.
    """
    raise NotImplementedError("mfu: your code here (chapter 11)")


def cosine_lr(
    step: int, max_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1
) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay.

    Warm-up, for step < warmup_steps: max_lr * (step + 1) / warmup_steps. The `+ 1` makes the
    first step already learn (lr = max_lr / warmup_steps, not 0) and the last warm-up step reach
    max_lr exactly.
    Decay, for step >= warmup_steps: with min_lr = max_lr * min_lr_ratio and
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1),
        clamped to at most 1,
        lr = min_lr + 0.5 * (1 + cos(pi * progress)) * (max_lr - min_lr)
    so the first decay step is at max_lr and the *last* step (total_steps - 1) lands exactly on
    the floor min_lr. The schedule never goes below min_lr (not even for steps past the end).
    """
    raise NotImplementedError("cosine_lr: your code here (chapter 11)")


def accumulate_gradients(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], Tensor],
    micro_batches: Sequence,
) -> float:
    """One optimizer step's gradients, computed in pieces: a big batch that does not fit at once.

    The gradients start at zero (the caller ran optimizer.zero_grad()). For each micro-batch,
    loss_fn(model, micro_batch) returns the *mean* loss over that micro-batch (a scalar tensor).
    All micro-batches have the same size. Afterwards every parameter's .grad must equal the
    gradient of the mean loss over the whole batch, exactly as if it had been one batch.

    Call backward once per micro-batch (so only one micro-batch's activations are in memory at a
    time) and scale each loss first: the mean over the whole batch is the average of the
    micro-batch means. Return that mean loss of the whole batch as a Python float.
    Hint: backward *adds* into each parameter's .grad instead of overwriting it, which is what
    makes accumulation work; item turns a one-element tensor into a Python float.
    """
    raise NotImplementedError("accumulate_gradients: your code here (chapter 11)")


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay for the weight matrices, none for the rest.

    Weight decay pulls weights towards 0 at every step. That regularises the big matrices
    (Linear, Embedding, Conv weights: 2 or more dimensions), but pulling a bias or a norm's gain
    (1 dimension) towards 0 only hurts. Frozen parameters (requires_grad=False) are not trained
    at all: leave them out.

    Returns [{"params": [matrices...], "weight_decay": weight_decay},
             {"params": [vectors...], "weight_decay": 0.0}]
    with the parameters in model.parameters() order; the second group only if it is non-empty.
    torch.optim.AdamW takes this list where it would take the parameters.
    """
    raise NotImplementedError("decay_groups: your code here (chapter 11)")


def ring_all_reduce(
    grads: Sequence[Tensor], send: Callable[[int, int, Tensor], Tensor]
) -> list[Tensor]:
    """Stretch exercise: average N ranks' gradients with a ring all-reduce, in one process.

    Data parallelism (DDP, section 8 of the chapter) runs one copy of the model per GPU, a
    *rank*, each on its own share of the batch. After backward every rank holds its own
    gradients; before the optimizer step all of them must hold the same average, or the copies
    drift apart. That averaging is an *all-reduce*, and how it moves the data decides whether
    more GPUs pay off.

    grads[r] is rank r's gradient: N tensors of one shape (any shape, M values each; DDP
    flattens its gradients into 1-D buckets first). Rank r talks only to its right neighbour,
    rank (r + 1) % N (the last rank's neighbour is rank 0), and only through send(src, dst,
    chunk): it carries a tensor from rank src to rank dst and returns what dst receives, a copy.
    Return a list of N new tensors, one per rank in rank order, each the *mean* of the N
    gradients in their shape. Leave the inputs unchanged (a real all-reduce works in place on
    each rank's buffer; here the grader compares your inputs after the call).

    The ring. Flatten each rank's tensor and cut it into N chunks (M need not be a multiple of
    N: torch.tensor_split makes exactly N chunks whose sizes differ by at most one).
      1. Reduce-scatter, N - 1 steps. At each step every rank sends one chunk to its neighbour,
         which adds it into its own copy of that chunk. Choose the indices so that each chunk
         travels one hop per step and picks up one more rank's share at each hop: after N - 1
         steps every rank holds one chunk summed over all N ranks, each rank a different one.
      2. All-gather, N - 1 steps. The same round again, but a rank passes on a complete chunk
         and the receiver replaces its copy with it: after N - 1 steps every rank has them all.
    Then divide by N: the ring sums, and DDP wants the mean (it divides each gradient by the
    number of ranks, then sums).

    The point is the traffic. Each rank sends 2(N - 1) chunks of about M / N values, 2(N - 1)/N
    of its tensor: less than twice the tensor however many ranks there are, and every link of
    the ring is busy at every step. A naive all-to-all (each rank sends its whole tensor to
    every other) gets the same mean for (N - 1) M values per rank, a cost that grows with N.
    The grader counts the values each rank sends, and to whom.

        copy = lambda src, dst, chunk: chunk.clone()   # a network that only carries data
        ring_all_reduce([torch.tensor([1., 2.]), torch.tensor([3., 6.])], copy)
        -> [tensor([2., 4.]), tensor([2., 4.])]
    """
    raise NotImplementedError("ring_all_reduce: your code here (chapter 11, stretch)")
