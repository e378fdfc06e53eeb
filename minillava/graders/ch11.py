"""Chapter 11 graders: training on one GPU (exercises/ch11_gpu.py).

FLOP counting and MFU are checked against the formulas of the chapter; the schedule and the
parameter groups against the training loop itself (minillava.train.lr_at, param_groups), so the
exercise and the loop that trains your model cannot drift apart; gradient accumulation against
the gradient of the whole batch computed in one piece.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minillava.grading import fail, grader, step
from minillava.presets import StageConfig
from minillava.train import lr_at, param_groups

TITLE = "Training on one GPU"
MODULE = "ch11_gpu"


def _number(got, what: str) -> float:
    """`got` as a float, or a clear failure (None, a tensor of many values, a string...)."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        return float(got)
    if isinstance(got, bool) or not isinstance(got, int | float):
        kind = "None: is a `return` missing?" if got is None else f"a {type(got).__name__}"
        fail(f"{what} returned {kind}, expected a number.")
    return float(got)


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


# ---------------------------------------------------------------------------------------------
# flops_per_token

FLOP_CASES = [  # (n_params, num_layers, hidden_size, seq_len)
    (1_000_000, 4, 128, 256),
    (124_000_000, 12, 768, 1024),  # GPT-2 small
    (3_500_000, 8, 384, 512),
]


@grader("flops_per_token", points=2)
def check_flops_per_token(flops_per_token):
    """6 N + 12 L C T on three model sizes (GPT-2 small among them)."""
    for n, layers, hidden, seq in FLOP_CASES:
        expected = 6 * n + 12 * layers * hidden * seq
        step(f"calling flops_per_token({n}, {layers}, {hidden}, {seq})")
        what = f"flops_per_token(n_params={n:,}, num_layers={layers}, hidden={hidden}, T={seq})"
        got = _number(flops_per_token(n, layers, hidden, seq), what)
        if _close(got, expected):
            continue
        attention = 12 * layers * hidden * seq
        mistakes = {
            "You counted the forward pass only (2 N): training also runs the backward pass, "
            "which costs twice the forward, so 6 FLOPs per parameter per token.": 2 * n
            + attention / 3,
            "Forward only, 2 N: training also runs the backward pass (6 N in total).": 2 * n,
            "The weights are right (6 N), but attention is missing: add 12 L C T for Q Kᵀ and "
            "A V, which have no parameters yet cost FLOPs.": 6 * n,
            "The attention term is 12 L C T: 2 C T FLOPs for Q Kᵀ plus 2 C T for A V per layer "
            "in the forward pass, times 3 for forward + backward.": 6 * n + attention / 2,
            "Attention costs grow with T per token (each token attends to T others), not T²: "
            "12 L C T.": 6 * n + attention * seq,
        }
        hint = next((h for h, v in mistakes.items() if _close(got, v)), None)
        fail(
            f"{what} returned {got:,.0f}, expected {expected:,.0f} = 6 x {n:,} + "
            f"12 x {layers} x {hidden} x {seq}.",
            hint or "flops_per_token = 6 * n_params + 12 * num_layers * hidden_size * seq_len",
        )


# ---------------------------------------------------------------------------------------------
# mfu


@grader("mfu", points=1)
def check_mfu(mfu):
    """Achieved FLOP/s over peak, as a fraction, on an H100-sized and a laptop-sized example."""
    for tokens_s, per_token, peak in ((400_000.0, 1.2e9, 989e12), (5_000.0, 6.0e7, 1.0e12)):
        expected = tokens_s * per_token / peak
        step(f"calling mfu({tokens_s:g}, {per_token:g}, {peak:g})")
        what = f"mfu(tokens_per_second={tokens_s:g}, flops_per_token={per_token:g}, peak={peak:g})"
        got = _number(mfu(tokens_s, per_token, peak), what)
        if _close(got, expected):
            continue
        if _close(got, 100 * expected):
            hint = "Return a fraction (0.485), not a percentage (48.5)."
        elif _close(got, 1 / expected):
            hint = "Upside down: achieved FLOP/s divided by the peak, so a result below 1."
        else:
            hint = "mfu = tokens_per_second * flops_per_token / peak_flops"
        fail(f"{what} returned {got:.6g}, expected {expected:.6g}.", hint)


# ---------------------------------------------------------------------------------------------
# cosine_lr

SCHEDULES = [  # (max_lr, warmup_steps, total_steps, min_lr_ratio)
    (1e-3, 10, 100, 0.1),
    (3e-4, 200, 5000, 0.1),
    (2e-3, 1, 7, 0.0),
    (5e-4, 0, 12, 0.2),
]


def _variant(name: str, step_: int, max_lr, warmup, total, ratio) -> float:
    """The schedule with one known mistake, to recognise it in a learner's numbers."""
    if step_ < warmup:
        if name == "warmup_off_by_one":
            return max_lr * step_ / warmup
        return max_lr * (step_ + 1) / warmup
    min_lr = 0.0 if name == "no_floor" else max_lr * ratio
    span = total - warmup if name == "no_minus_one" else max(1, total - warmup - 1)
    progress = (step_ - warmup) / max(1, span)
    if name != "no_clamp":
        progress = min(1.0, progress)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


SCHEDULE_MISTAKES = {
    "warmup_off_by_one": (
        "Off by one in the warm-up: step s < warmup_steps gets max_lr * (s + 1) / warmup_steps. "
        "With s / warmup_steps the first step has lr 0 (it learns nothing) and the warm-up "
        "never reaches max_lr."
    ),
    "no_floor": (
        "The cosine must end at the floor min_lr = max_lr * min_lr_ratio, not at 0: "
        "lr = min_lr + 0.5 * (1 + cos(pi * progress)) * (max_lr - min_lr)."
    ),
    "no_minus_one": (
        "The last step (total_steps - 1) must land exactly on min_lr: divide by "
        "max(1, total_steps - warmup_steps - 1) so that progress reaches 1 there."
    ),
    "no_clamp": (
        "Past the last step the schedule must stay at min_lr: clamp progress to at most 1 "
        "(else the cosine climbs back up)."
    ),
}


@grader("cosine_lr", points=2)
def check_cosine_lr(cosine_lr):
    """Every step of four schedules (and steps past the end) against train.lr_at."""
    for max_lr, warmup, total, ratio in SCHEDULES:
        config = StageConfig(steps=total, lr=max_lr, warmup_steps=warmup, min_lr_ratio=ratio)
        steps = list(range(total)) + [total, total + 5]
        got = []
        for s in steps:
            args = f"{s}, max_lr={max_lr:g}, warmup_steps={warmup}, total_steps={total}"
            step(f"calling cosine_lr({args}, min_lr_ratio={ratio:g})")
            got.append(_number(cosine_lr(s, max_lr, warmup, total, ratio), f"cosine_lr({args})"))
        expected = [lr_at(s, config) for s in steps]
        wrong = [
            i
            for i, (g, e) in enumerate(zip(got, expected, strict=True))
            if not math.isclose(g, e, rel_tol=1e-6, abs_tol=1e-12)
        ]
        if not wrong:
            continue
        hint = (
            "Warm-up: max_lr * (step + 1) / warmup_steps; then progress = (step - warmup_steps) "
            "/ max(1, total_steps - warmup_steps - 1) clamped to 1, and "
            "lr = min_lr + 0.5 * (1 + cos(pi * progress)) * (max_lr - min_lr)."
        )
        for name, mistake in SCHEDULE_MISTAKES.items():
            variant = [_variant(name, s, max_lr, warmup, total, ratio) for s in steps]
            if all(
                math.isclose(g, v, rel_tol=1e-6, abs_tol=1e-12)
                for g, v in zip(got, variant, strict=True)
            ):
                hint = mistake
                break
        # Show the last step if it is wrong (where a missing floor shows best), else the first.
        i = next((j for j in wrong if steps[j] == total - 1), wrong[0])
        args = f"{steps[i]}, max_lr={max_lr:g}, warmup_steps={warmup}, total_steps={total}"
        fail(
            f"cosine_lr({args}, min_lr_ratio={ratio:g}) returned {got[i]:.6g}, expected "
            f"{expected[i]:.6g} (the schedule of minillava.train.lr_at); {len(wrong)} of the "
            f"{len(steps)} steps of this schedule differ.",
            hint,
        )


# ---------------------------------------------------------------------------------------------
# accumulate_gradients


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


@grader("accumulate_gradients", points=2)
def check_accumulate_gradients(accumulate_gradients):
    """Gradients and loss equal the whole batch's; one backward per micro-batch."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 5), torch.randn(12, 3)
    reference = _tiny_net()
    full_loss = _mse(reference, (x, y))
    full_loss.backward()
    expected = {name: p.grad.clone() for name, p in reference.named_parameters()}

    model = _tiny_net()
    model.load_state_dict(reference.state_dict())
    n = 3
    micro_batches = [(x[i::n], y[i::n]) for i in range(n)]  # 3 micro-batches of 4 samples
    accumulations = []
    first = next(model.parameters())
    first.register_post_accumulate_grad_hook(lambda p: accumulations.append(1))
    calls = []

    def loss_fn(m, batch):
        calls.append(1)
        return _mse(m, batch)

    step("calling accumulate_gradients(model, loss_fn, 3 micro-batches of 4 samples)")
    returned = accumulate_gradients(model, loss_fn, micro_batches)
    if len(calls) != n:
        fail(
            f"loss_fn was called {len(calls)} times for {n} micro-batches; call it once per "
            "micro-batch."
        )
    for name, p in model.named_parameters():
        if p.grad is None:
            fail(
                f"After accumulate_gradients, {name}.grad is None: call loss.backward() for "
                "each micro-batch."
            )
        want = expected[name]
        if torch.allclose(p.grad, want, rtol=1e-4, atol=1e-6):
            continue
        if torch.allclose(p.grad, n * want, rtol=1e-4, atol=1e-6):
            hint = (
                f"Your gradients are {n}x too large: backward adds the gradient of every "
                f"micro-batch into .grad, so divide each micro-batch's loss by the number of "
                f"micro-batches ({n}) before backward."
            )
        else:
            hint = (
                "Do not zero the gradients between micro-batches: backward *adds* into .grad, "
                "and that sum (of the scaled losses) is the whole batch's gradient."
            )
        fail(
            f"{name}.grad differs from the gradient of the mean loss over the whole batch: "
            f"largest difference {float((p.grad - want).abs().max()):.3g} "
            f"(entries are about {float(want.abs().mean()):.3g}).",
            hint,
        )
    if len(accumulations) != n:
        fail(
            f"The gradients are right, but backward ran {len(accumulations)} time(s) for {n} "
            "micro-batches: adding the losses first and calling backward once keeps every "
            "micro-batch's activations in memory at the same time, which is what gradient "
            "accumulation avoids.",
            "Call (loss / n).backward() inside the loop, once per micro-batch.",
        )
    got = _number(returned, "accumulate_gradients(...)")
    full = full_loss.item() if isinstance(full_loss, torch.Tensor) else float(full_loss)
    if not math.isclose(got, full, rel_tol=1e-5):
        hint = "Return the mean loss of the whole batch: the sum of the scaled losses."
        if math.isclose(got, n * full, rel_tol=1e-5):
            hint = f"You returned the sum of the {n} micro-batch means: divide by {n}."
        fail(
            f"accumulate_gradients returned {got:.6g}, expected the whole batch's mean loss "
            f"{full:.6g}.",
            hint,
        )


# ---------------------------------------------------------------------------------------------
# decay_groups


class _Block(nn.Module):
    """Linears with biases, a LayerNorm, an embedding, an RMSNorm-like gain, a frozen Linear."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.proj = nn.Linear(6, 6)
        self.gain = nn.Parameter(torch.ones(6))  # like RMSNorm.weight: 1-D, named "gain"
        self.head = nn.Linear(6, 4, bias=False)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)


def _names(model: nn.Module, params) -> list[str]:
    by_id = {id(p): name for name, p in model.named_parameters()}
    return [by_id.get(id(p), "<not a parameter of the model>") for p in params]


@grader("decay_groups", points=2)
def check_decay_groups(decay_groups):
    """The same two groups as train.param_groups: matrices decay; vectors and frozen ones not."""
    model = _Block()
    step("calling decay_groups(model, weight_decay=0.1)")
    got = decay_groups(model, 0.1)
    expected = param_groups(model, 0.1)
    if not isinstance(got, list | tuple) or not all(isinstance(g, dict) for g in got):
        fail(
            f"decay_groups returned {type(got).__name__}, expected a list of dicts "
            '[{"params": [...], "weight_decay": ...}, ...].'
        )
    if any("params" not in g for g in got):
        fail('Every group needs a "params" key with its list of parameters.')
    decayed, not_decayed = [], []
    for g in got:
        params = list(g["params"])
        wd = g.get("weight_decay")
        if wd is None:
            fail(
                'Every group needs its own "weight_decay" (0.1 for the matrices, 0.0 for the '
                "rest); without it AdamW would apply its default to every group."
            )
        (decayed if wd > 0 else not_decayed).extend(params)
    want_decay = _names(model, expected[0]["params"])
    want_none = _names(model, expected[1]["params"])
    got_decay, got_none = _names(model, decayed), _names(model, not_decayed)
    frozen = [n for n in got_decay + got_none if n.startswith("frozen.")]
    if frozen:
        fail(
            f"The frozen parameters {frozen} (requires_grad=False) are in your groups.",
            "Leave out parameters with requires_grad=False: that is how a stage freezes a part "
            "of the model (the optimizer never touches them).",
        )
    if sorted(got_decay) != sorted(want_decay) or sorted(got_none) != sorted(want_none):
        wrongly_decayed = sorted(set(got_decay) - set(want_decay))
        missing = sorted((set(want_decay) | set(want_none)) - set(got_decay) - set(got_none))
        message = (
            f"With weight decay: {sorted(got_decay)}\n  expected {sorted(want_decay)}.\n"
            f"Without: {sorted(got_none)}\n  expected {sorted(want_none)}."
        )
        if missing:
            hint = f"Every trainable parameter belongs to one group; {missing} are in none."
        elif wrongly_decayed:
            hint = (
                f"{wrongly_decayed} are 1-D (biases, norm gains) and must not be decayed. "
                "Decide by the number of dimensions, p.dim() >= 2, not by the name: "
                '"gain" and "norm.weight" are vectors too.'
            )
        else:
            hint = "Matrices (p.dim() >= 2) decay, vectors (p.dim() < 2) do not."
        fail(message, hint)
    if _names(model, expected[0]["params"]) != got_decay:
        fail(
            f"Keep model.parameters() order within a group: got {got_decay}, expected {want_decay}."
        )
