"""Chapter 11: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the training loop (minillava.train.lr_at, param_groups, the accumulation in train_stage)
agrees with solutions/ch11_gpu.py, and torch.distributed's all-reduce (what DDP and
train._mean_over_ranks call) agrees with the ring all-reduce of the stretch exercise.
"""

import math
import os

import pytest
import torch
from torch import nn

from minillava.presets import StageConfig
from minillava.train import lr_at, param_groups, train_stage
from solutions import ch11_gpu as solution

# --- flops_per_token ------------------------------------------------------------------------


def forward_only(n_params, num_layers, hidden_size, seq_len):
    return 2 * n_params + 4 * num_layers * hidden_size * seq_len


def no_attention(n_params, num_layers, hidden_size, seq_len):
    return 6 * n_params


def attention_squared(n_params, num_layers, hidden_size, seq_len):
    return 6 * n_params + 12 * num_layers * hidden_size * seq_len**2


def half_attention(n_params, num_layers, hidden_size, seq_len):
    return 6 * n_params + 6 * num_layers * hidden_size * seq_len


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (forward_only, ["forward pass only", "twice the forward"]),
        (no_attention, ["attention is missing", "no parameters"]),
        (attention_squared, ["grows with T²", "grows with T "]),
        (half_attention, ["half of 12 L C T", "three times the forward"]),
    ],
)
def test_flops_per_token_rejects(rejects, wrong, mentions):
    rejects(
        "ch11.flops_per_token",
        wrong,
        mentions=["expected 7,572,864"] + mentions,
        hint_mentions=["6 FLOPs per parameter per token", "2 C T"],
    )


# --- mfu ------------------------------------------------------------------------------------


def as_percent(tokens_per_second, flops_per_token, peak_flops):
    return 100 * tokens_per_second * flops_per_token / peak_flops


def upside_down(tokens_per_second, flops_per_token, peak_flops):
    return peak_flops / (tokens_per_second * flops_per_token)


def forgets_flops(tokens_per_second, flops_per_token, peak_flops):
    return tokens_per_second / peak_flops


def forgets_tokens(tokens_per_second, flops_per_token, peak_flops):
    return flops_per_token / peak_flops


def test_mfu_rejects(rejects):
    rejects("ch11.mfu", as_percent, mentions=["100 times too large", "a percentage"])
    rejects("ch11.mfu", upside_down, mentions=["upside down", "above 1"])
    rejects(
        "ch11.mfu",
        forgets_flops,
        mentions=["expected 0.485", "leaves out the FLOPs per token"],
        hint_mentions=["fraction", "peak"],
    )
    rejects("ch11.mfu", forgets_tokens, mentions=["leaves out the tokens per second"])


# --- cosine_lr ------------------------------------------------------------------------------


def warmup_off_by_one(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    return solution.cosine_lr(step, max_lr, warmup_steps, total_steps, min_lr_ratio)


def no_floor(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    return solution.cosine_lr(step, max_lr, warmup_steps, total_steps, 0.0)


def ends_above_floor(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    min_lr = max_lr * min_lr_ratio
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def no_clamp(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    min_lr = max_lr * min_lr_ratio
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps - 1)
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def cosine_without_warmup(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    return solution.cosine_lr(step, max_lr, 0, total_steps, min_lr_ratio)


def linear_decay(step, max_lr, warmup_steps, total_steps, min_lr_ratio=0.1):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps - 1))
    return max_lr - progress * (max_lr - max_lr * min_lr_ratio)


def test_cosine_lr_rejects(rejects):
    rejects(
        "ch11.cosine_lr",
        warmup_off_by_one,
        mentions=["cosine_lr(0, max_lr=0.001", "returned 0, expected 0.0001", "off by one"],
        hint_mentions=["first step already learns"],
    )
    rejects(
        "ch11.cosine_lr",
        no_floor,
        mentions=["cosine_lr(99, max_lr=0.001", "returned 0, expected 0.0001", "not at the floor"],
        hint_mentions=["down to min_lr"],
    )
    rejects(
        "ch11.cosine_lr",
        ends_above_floor,
        mentions=["ends above min_lr", "one step too many"],
        hint_mentions=["exactly 1 at the last step"],
    )
    rejects(
        "ch11.cosine_lr",
        no_clamp,
        mentions=["past the last step", "climbs back up"],
        hint_mentions=["never let the progress exceed 1"],
    )
    rejects(
        "ch11.cosine_lr",
        cosine_without_warmup,
        mentions=["returned 0.001, expected 0.0001", "no warm-up"],
        hint_mentions=["climbs linearly"],
    )
    result = rejects("ch11.cosine_lr", linear_decay, mentions=["88 of the 102 steps"])
    assert "half a cosine period" in result.hint  # an unknown mistake: the general hint


# --- accumulate_gradients -------------------------------------------------------------------


def not_divided(model, loss_fn, micro_batches):
    total = 0.0
    for batch in micro_batches:
        loss = loss_fn(model, batch)
        loss.backward()
        total += loss.item()
    return total / len(micro_batches)


def zeroes_each_time(model, loss_fn, micro_batches):
    total = 0.0
    for batch in micro_batches:
        model.zero_grad()
        loss = loss_fn(model, batch) / len(micro_batches)
        loss.backward()
        total += loss.item()
    return total


def one_big_backward(model, loss_fn, micro_batches):
    loss = sum(loss_fn(model, b) for b in micro_batches) / len(micro_batches)
    loss.backward()
    return loss.item()


def returns_sum_of_means(model, loss_fn, micro_batches):
    solution.accumulate_gradients(model, loss_fn, micro_batches)
    return sum(loss_fn(model, b).item() for b in micro_batches)


def zeroes_unscaled(model, loss_fn, micro_batches):
    total = 0.0
    for batch in micro_batches:
        model.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        total += loss.item() / len(micro_batches)
    return total


def test_accumulate_gradients_rejects(rejects):
    rejects(
        "ch11.accumulate_gradients",
        not_divided,
        mentions=["3x too large", "adds every micro-batch's gradient"],
        hint_mentions=["average of the micro-batch means", "before its backward"],
    )
    rejects(
        "ch11.accumulate_gradients",
        zeroes_each_time,
        mentions=["last micro-batch alone (divided by 3)", "cleared"],
        hint_mentions=["never between micro-batches"],
    )
    rejects(
        "ch11.accumulate_gradients",
        zeroes_unscaled,
        mentions=["last micro-batch alone:", "cleared"],
        hint_mentions=["never between micro-batches"],
    )
    rejects(
        "ch11.accumulate_gradients",
        one_big_backward,
        mentions=["backward ran 1 time(s) for 3", "in memory"],
        hint_mentions=["inside the loop"],
    )
    rejects(
        "ch11.accumulate_gradients",
        returns_sum_of_means,
        mentions=["called 6 times", "computed twice"],
        hint_mentions=["once per micro-batch"],
    )


def test_accumulate_gradients_return_value(rejects):
    def sum_of_means(model, loss_fn, micro_batches):
        total = 0.0
        for batch in micro_batches:
            loss = loss_fn(model, batch)
            (loss / len(micro_batches)).backward()
            total += loss.item()
        return total

    def last_loss(model, loss_fn, micro_batches):
        for batch in micro_batches:
            loss = loss_fn(model, batch)
            (loss / len(micro_batches)).backward()
        return loss.item()

    rejects(
        "ch11.accumulate_gradients",
        sum_of_means,
        mentions=["sum of the 3 micro-batch means", "3 times the mean"],
        hint_mentions=["average of the micro-batch means"],
    )
    rejects("ch11.accumulate_gradients", last_loss, mentions=["last micro-batch alone"])


# --- decay_groups ---------------------------------------------------------------------------


def decays_everything(model, weight_decay):
    return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.1}]


def by_name(model, weight_decay):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not n.endswith("bias")]
    no_decay = [p for n, p in named if n.endswith("bias")]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]


def keeps_frozen(model, weight_decay):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]


def forgets_vectors(model, weight_decay):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    return [{"params": decay, "weight_decay": weight_decay}]


def no_weight_decay_key(model, weight_decay):
    groups = solution.decay_groups(model, weight_decay)
    return [{"params": g["params"]} for g in groups]


def spares_the_embedding(model, weight_decay):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if p.dim() < 2 or "embed" in n]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def fixed_decay(model, weight_decay):
    groups = solution.decay_groups(model, weight_decay)
    groups[0]["weight_decay"] = 0.01
    return groups


def vectors_first(model, weight_decay):
    trainable = [p for p in model.parameters() if p.requires_grad]
    no_decay = [p for p in trainable if p.dim() < 2]
    decay = [p for p in trainable if p.dim() >= 2][::-1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def test_decay_groups_rejects(rejects):
    rejects(
        "ch11.decay_groups",
        decays_everything,
        mentions=["must not be decayed", "norm.bias"],
        hint_mentions=["number of dimensions"],
    )
    rejects(
        "ch11.decay_groups",
        by_name,
        mentions=["'gain'", "chose by name"],
        hint_mentions=["not by its name"],
    )
    rejects(
        "ch11.decay_groups",
        keeps_frozen,
        mentions=["frozen", "requires_grad=False"],
        hint_mentions=["do not require gradients"],
    )
    rejects(
        "ch11.decay_groups",
        forgets_vectors,
        mentions=["are in none"],
        hint_mentions=["exactly one of the two groups"],
    )
    rejects(
        "ch11.decay_groups",
        no_weight_decay_key,
        mentions=['its own "weight_decay"', "default decay"],
        hint_mentions=["zero for the rest"],
    )
    rejects(
        "ch11.decay_groups",
        spares_the_embedding,
        mentions=["['embed.weight'] have two dimensions or more", "must be decayed"],
        hint_mentions=["number of dimensions"],
    )
    rejects("ch11.decay_groups", fixed_decay, mentions=["weight_decay 0.01", "weight_decay 0.1"])
    rejects(
        "ch11.decay_groups",
        vectors_first,
        mentions=["decaying group holds the right parameters in another order"],
        hint_mentions=["in their own order"],
    )


# --- the training loop agrees with the solutions --------------------------------------------


@pytest.mark.parametrize("warmup, total, ratio", [(10, 100, 0.1), (0, 5, 0.0), (3, 4, 0.5)])
def test_cosine_lr_agrees_with_train_lr_at(warmup, total, ratio):
    config = StageConfig(steps=total, lr=3e-4, warmup_steps=warmup, min_lr_ratio=ratio)
    for step in range(total + 3):
        assert solution.cosine_lr(step, 3e-4, warmup, total, ratio) == pytest.approx(
            lr_at(step, config), rel=1e-12
        )


def test_decay_groups_agree_with_train_param_groups():
    from minillava.decoder import Decoder, DecoderConfig

    model = Decoder(DecoderConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2))
    model.layers[0].requires_grad_(False)
    ours, theirs = solution.decay_groups(model, 0.05), param_groups(model, 0.05)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a["weight_decay"] == b["weight_decay"]
        assert [id(p) for p in a["params"]] == [id(p) for p in b["params"]]


class _Regression(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x, y):
        return type("Out", (), {"loss": ((self.linear(x) - y) ** 2).mean()})()


@pytest.mark.slow  # the first AdamW of a process imports torch._dynamo: seconds on a busy CPU
def test_accumulation_matches_train_stage():
    """One train_stage step with grad_accum=3 moves the weights as the solution's gradients do."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 4), torch.randn(12, 2)
    micro = [{"x": x[i::3], "y": y[i::3]} for i in range(3)]
    config = StageConfig(steps=1, batch_size=12, lr=0.1, warmup_steps=1, weight_decay=0.0,
                         grad_accum=3, grad_clip=0.0)  # fmt: skip
    trained, ours = _Regression(), _Regression()
    ours.load_state_dict(trained.state_dict())
    train_stage(trained, micro, config, device="cpu", progress=False)

    optimizer = torch.optim.AdamW(ours.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.0)
    with torch.no_grad():
        full_batch_loss = float(ours(x, y).loss)
    loss = solution.accumulate_gradients(ours, lambda model, batch: model(**batch).loss, micro)
    optimizer.step()
    assert loss == pytest.approx(full_batch_loss, rel=1e-5)
    for a, b in zip(trained.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b)


# --- ring_all_reduce (stretch) ---------------------------------------------------------------


def _ring(grads, send, reduce_steps=None, gather_steps=None, gather_start=1, divide=True,
          split=torch.tensor_split):  # fmt: skip
    """The solution's ring, with knobs to put one mistake into it."""
    n = len(grads)
    flat = [g.detach().reshape(-1).clone() for g in grads]
    chunks = [list(split(f, n)) for f in flat]
    right = [(r + 1) % n for r in range(n)]
    for s in range(n - 1 if reduce_steps is None else reduce_steps):
        index = [(r - s) % n for r in range(n)]
        arriving = [send(r, right[r], chunks[r][index[r]]) for r in range(n)]
        for r in range(n):
            chunks[right[r]][index[r]].add_(arriving[r])
    for s in range(n - 1 if gather_steps is None else gather_steps):
        index = [(r + gather_start - s) % n for r in range(n)]
        arriving = [send(r, right[r], chunks[r][index[r]]) for r in range(n)]
        for r in range(n):
            chunks[right[r]][index[r]].copy_(arriving[r])
    return [(f / n if divide else f).reshape(g.shape) for f, g in zip(flat, grads, strict=True)]


def ring_sum(grads, send):
    return _ring(grads, send, divide=False)


def reduce_one_step_short(grads, send):
    return _ring(grads, send, reduce_steps=len(grads) - 2)


def gathers_the_wrong_chunks(grads, send):
    return _ring(grads, send, gather_start=0)  # passes on chunks it has not completed


def gathers_one_step_too_many(grads, send):
    return _ring(grads, send, gather_steps=len(grads))


def chunks_with_torch_chunk(grads, send):
    return _ring(grads, send, split=torch.chunk)  # 7 values in 5: only 4 chunks of 2, 2, 2, 1


def all_to_all(grads, send):
    n = len(grads)
    results = []
    for r in range(n):
        total = grads[r].clone()
        for other in range(n):
            if other != r:
                total += send(other, r, grads[other])
        results.append(total / n)
    return results


def whole_tensors_round_the_ring(grads, send):
    n = len(grads)
    totals, passing = [g.clone() for g in grads], [g.clone() for g in grads]
    for _ in range(n - 1):
        passing = [send((r - 1) % n, r, passing[(r - 1) % n]) for r in range(n)]
        for r in range(n):
            totals[r] += passing[r]
    return [t / n for t in totals]


def chain(grads, send):
    """Sum along the ring from rank 0 to the last, then hand the mean on round it."""
    n = len(grads)
    total = grads[0].clone()
    for r in range(1, n):
        total = send(r - 1, r, total) + grads[r]
    results = [None] * n
    results[n - 1] = total / n
    for k in range(n - 1):
        src = (n - 1 + k) % n
        results[(src + 1) % n] = send(src, (src + 1) % n, results[src])
    return results


def no_sends(grads, send):
    mean = torch.stack(list(grads)).mean(0)
    return [mean.clone() for _ in grads]


def works_in_the_inputs(grads, send):
    """The ring, its results written back into the inputs: a real all-reduce works in place."""
    for g, result in zip(grads, _ring(grads, send), strict=True):
        g.copy_(result)
    return list(grads)


def test_ring_all_reduce_rejects(rejects):
    rejects(
        "ch11.ring_all_reduce",
        ring_sum,
        mentions=["expected [3.75", "got      [15.", "sum of the 4 tensors, 4 times their mean"],
        hint_mentions=["divide by the number of ranks"],
    )
    rejects(
        "ch11.ring_all_reduce",
        reduce_one_step_short,
        mentions=["holds the gradient of rank 3 only, not the gradients of all 4 ranks"],
        hint_mentions=["n - 1 hops"],
    )
    rejects(
        "ch11.ring_all_reduce",
        gathers_the_wrong_chunks,
        mentions=["holds the gradient of rank 0 only", "a chunk index or a number of steps"],
        hint_mentions=["the all-gather then carries each complete chunk"],
    )
    rejects(
        "ch11.ring_all_reduce",
        gathers_one_step_too_many,
        mentions=["sent 21, 21, 21, 21 values", "about 18 each", "made 7 sends", "6 sends per"],
        hint_mentions=["count the steps"],
    )
    rejects(
        "ch11.ring_all_reduce",
        chunks_with_torch_chunk,
        mentions=["IndexError", "5 ranks of shape (7,) (7 values do not split evenly"],
    )
    rejects(
        "ch11.ring_all_reduce",
        all_to_all,
        mentions=["rank 0 sent to rank(s) [2, 3]", "right neighbour", "all-to-all", "36 values"],
        hint_mentions=["several hops"],
    )
    rejects(
        "ch11.ring_all_reduce",
        whole_tensors_round_the_ring,
        mentions=["144 in all", "72 in all", "the whole tensor, not a chunk", "grows with"],
        hint_mentions=["one chunk per rank per step"],
    )
    rejects(
        "ch11.ring_all_reduce",
        chain,
        mentions=["sent 24, 24, 12, 12 values", "one rank after another", "stood idle"],
        hint_mentions=["into N chunks"],
    )
    rejects(
        "ch11.ring_all_reduce",
        works_in_the_inputs,
        mentions=["changed its argument `grads`", "in place"],
    )
    rejects(
        "ch11.ring_all_reduce",
        no_sends,
        mentions=["no rank sent anything"],
        hint_mentions=["through the send function"],
    )


def test_ring_all_reduce_sends_what_the_docstring_promises():
    """Only to the right neighbour, 2(N - 1) sends per rank, 2(N - 1) M values in all."""
    sent = []
    grads = [torch.randn(3, 7) for _ in range(4)]
    before = [g.clone() for g in grads]
    results = solution.ring_all_reduce(grads, lambda s, d, c: sent.append((s, d, c.numel())) or c)
    mean = torch.stack(grads).mean(0)
    for got in results:
        torch.testing.assert_close(got, mean)
    assert all(d == (s + 1) % 4 for s, d, _ in sent)
    assert [sum(1 for s, _, _ in sent if s == r) for r in range(4)] == [6] * 4
    assert sum(k for _, _, k in sent) == 2 * 3 * 21
    assert all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))  # left unchanged


def _all_reduce_worker(rank, world_size, init_file, tensors, out_dir):
    import torch.distributed as dist

    from minillava.train import DistInfo, _mean_over_ranks

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    torch.save(_mean_over_ranks(tensors[rank], DistInfo(rank, rank, world_size)),
               os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.slow  # three processes join a gloo group: a few seconds on a busy CPU
def test_ring_all_reduce_agrees_with_torch_distributed(tmp_path):
    """What the training loop's all-reduce (torch.distributed over gloo, as DDP uses it)
    leaves on every rank is what the ring of the stretch exercise leaves."""
    world_size = 3
    tensors = [torch.randn(2, 5) for _ in range(world_size)]  # 10 values: uneven chunks
    init_file = str(tmp_path / "store")  # the group's rendezvous: a file the processes share
    torch.multiprocessing.start_processes(
        _all_reduce_worker,
        args=(world_size, init_file, tensors, str(tmp_path)),
        nprocs=world_size,
        start_method="fork",
    )
    ours = solution.ring_all_reduce(tensors, lambda src, dst, chunk: chunk.clone())
    for rank in range(world_size):
        theirs = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(ours[rank], theirs)
