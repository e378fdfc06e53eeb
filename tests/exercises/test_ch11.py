"""Chapter 11: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the training loop (minillava.train.lr_at, param_groups, the accumulation in train_stage)
agrees with solutions/ch11_gpu.py.
"""

import math

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
        (forward_only, ["forward pass only", "6 FLOPs per parameter"]),
        (no_attention, ["attention is missing", "12 L C T"]),
        (attention_squared, ["not T²"]),
        (half_attention, ["times 3 for forward + backward"]),
    ],
)
def test_flops_per_token_rejects(rejects, wrong, mentions):
    rejects("ch11.flops_per_token", wrong, mentions=["expected 7,572,864"] + mentions)


# --- mfu ------------------------------------------------------------------------------------


def as_percent(tokens_per_second, flops_per_token, peak_flops):
    return 100 * tokens_per_second * flops_per_token / peak_flops


def upside_down(tokens_per_second, flops_per_token, peak_flops):
    return peak_flops / (tokens_per_second * flops_per_token)


def forgets_flops(tokens_per_second, flops_per_token, peak_flops):
    return tokens_per_second / peak_flops


def test_mfu_rejects(rejects):
    rejects("ch11.mfu", as_percent, mentions=["not a percentage"])
    rejects("ch11.mfu", upside_down, mentions=["upside down"])
    rejects("ch11.mfu", forgets_flops, mentions=["tokens_per_second * flops_per_token"])


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


def test_cosine_lr_rejects(rejects):
    rejects(
        "ch11.cosine_lr",
        warmup_off_by_one,
        mentions=["cosine_lr(0, max_lr=0.001", "returned 0, expected 0.0001", "off by one"],
    )
    rejects(
        "ch11.cosine_lr",
        no_floor,
        mentions=["cosine_lr(99, max_lr=0.001", "returned 0, expected 0.0001", "not at 0"],
    )
    rejects("ch11.cosine_lr", ends_above_floor, mentions=["must land exactly on min_lr"])
    rejects("ch11.cosine_lr", no_clamp, mentions=["clamp progress"])


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


def test_accumulate_gradients_rejects(rejects):
    rejects("ch11.accumulate_gradients", not_divided, mentions=["3x too large", "divide"])
    rejects("ch11.accumulate_gradients", zeroes_each_time, mentions=["Do not zero the gradients"])
    rejects(
        "ch11.accumulate_gradients",
        one_big_backward,
        mentions=["backward ran 1 time(s) for 3", "in memory"],
    )
    rejects("ch11.accumulate_gradients", returns_sum_of_means, mentions=["called 6 times"])


def test_accumulate_gradients_return_value(rejects):
    def sum_of_means(model, loss_fn, micro_batches):
        total = 0.0
        for batch in micro_batches:
            loss = loss_fn(model, batch)
            (loss / len(micro_batches)).backward()
            total += loss.item()
        return total

    rejects("ch11.accumulate_gradients", sum_of_means, mentions=["sum of the 3 micro-batch means"])


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


def test_decay_groups_rejects(rejects):
    rejects("ch11.decay_groups", decays_everything, mentions=["must not be decayed", "p.dim()"])
    rejects("ch11.decay_groups", by_name, mentions=["'gain'", "not by the name"])
    rejects("ch11.decay_groups", keeps_frozen, mentions=["frozen", "requires_grad=False"])
    rejects("ch11.decay_groups", forgets_vectors, mentions=["are in none"])
    rejects("ch11.decay_groups", no_weight_decay_key, mentions=['its own "weight_decay"'])


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
