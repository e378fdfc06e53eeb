"""Chapter 11 graders: training on one GPU (exercises/ch11_gpu.py).

FLOP counting and MFU are checked against the formulas of the chapter; the schedule and the
parameter groups against the training loop itself (minillava.train.lr_at, param_groups), so the
exercise and the loop that trains your model cannot drift apart; gradient accumulation against
the gradient of the whole batch computed in one piece; the ring all-reduce (stretch) against the
mean of the ranks' tensors, with the data each rank sends counted.
"""

from __future__ import annotations

import copy
import math
import operator

import torch
from torch import nn

from minillava.grading import assert_close, assert_shape, diagnose, fail, grader, step
from minillava.presets import StageConfig
from minillava.train import lr_at, param_groups

TITLE = "Training on one GPU"
MODULE = "ch11_gpu"


def _number(got, what: str) -> float:
    """`got` as a float, or a clear failure (None, a tensor of many values, a string...)."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        return float(got)
    if isinstance(got, bool) or not isinstance(got, int | float):
        kind = "None: is a return statement missing?" if got is None else f"a {type(got).__name__}"
        fail(f"{what} returned {kind}, expected a number.")
    return float(got)


def _close(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-12)


def _recognise(got: float, mistakes: dict[str, float], rel: float = 1e-9) -> str | None:
    """`diagnose` for a number: the diagnosis of the first mistake that returns `got`, or None."""
    return next((text for text, value in mistakes.items() if _close(got, value, rel)), None)


def _fail(message: str, diagnosis: str | None = None, hint: str | None = None) -> None:
    """Fail with the diagnosis ending the message (shown at once), the hint shown on request."""
    fail(f"{message}\n{diagnosis}" if diagnosis else message, hint)


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
        _fail(
            f"{what} returned {got:,.0f}, expected {expected:,.0f} = 6 x {n:,} + "
            f"12 x {layers} x {hidden} x {seq}.",
            diagnosis=_recognise(
                got,
                {
                    "It looks like you counted the forward pass only (2 N, and a third of the "
                    "attention term): training also runs the backward pass, which costs twice "
                    "the forward.": 2 * n + attention / 3,
                    "It looks like you counted the forward pass only (2 N): training also runs "
                    "the backward pass, which costs twice the forward.": 2 * n,
                    "The weights are counted (6 N), but attention is missing: the scores Q Kᵀ "
                    "and the weighted sum A V have no parameters, yet cost FLOPs.": 6 * n,
                    "Your attention term is half of 12 L C T: Q Kᵀ and A V each cost 2 C T "
                    "FLOPs per token and layer in the forward pass, and forward plus backward "
                    "costs three times the forward.": 6 * n + attention / 2,
                    "Your attention term grows with T² per token: a token attends to T others, "
                    "so its own cost grows with T (T² is the cost of the whole sequence).": 6 * n
                    + attention * seq,
                },
            ),
            hint="Two parts. The weights: 6 FLOPs per parameter per token, 2 in the forward pass "
            "and 4 in the backward. Attention, which has no parameters: per layer and token, the "
            "scores and the weighted sum each cost 2 C T in the forward pass, and training "
            "triples the forward.",
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
        _fail(
            f"{what} returned {got:.6g}, expected {expected:.6g}.",
            diagnosis=_recognise(
                got,
                {
                    "Your result is 100 times too large: a percentage (48.5) where a fraction "
                    "(0.485) is expected.": 100 * expected,
                    "Your result is upside down: the peak over the achieved rate, above 1. MFU "
                    "is the share of the peak the run achieves.": 1 / expected,
                    "Your result leaves out the FLOPs per token: tokens per second are not "
                    "FLOP/s until each token is weighed by the work it costs.": tokens_s / peak,
                    "Your result leaves out the tokens per second: FLOPs per token are a cost, "
                    "not a rate.": per_token / peak,
                },
            ),
            hint="MFU compares two rates in FLOP/s: the one the run achieves (so many tokens per "
            "second, each costing so many FLOPs) and the hardware's peak. The result is a "
            "fraction, below 1.",
        )


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
    if name == "no_warmup":
        warmup = 0
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


def _schedule_mistake(got: list[float], steps: list[int], *schedule) -> str | None:
    """The name of the known mistake (see _variant) that reproduces every step of `got`."""
    for name in ("warmup_off_by_one", "no_warmup", "no_floor", "no_minus_one", "no_clamp"):
        variant = [_variant(name, s, *schedule) for s in steps]
        if all(
            math.isclose(g, v, rel_tol=1e-6, abs_tol=1e-12)
            for g, v in zip(got, variant, strict=True)
        ):
            return name
    return None


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
        mistake = _schedule_mistake(got, steps, max_lr, warmup, total, ratio)
        # Show the last step if it is wrong (where a missing floor shows best), else the first.
        i = next((j for j in wrong if steps[j] == total - 1), wrong[0])
        args = f"{steps[i]}, max_lr={max_lr:g}, warmup_steps={warmup}, total_steps={total}"
        _fail(
            f"cosine_lr({args}, min_lr_ratio={ratio:g}) returned {got[i]:.6g}, expected "
            f"{expected[i]:.6g} (the schedule of minillava.train.lr_at); {len(wrong)} of the "
            f"{len(steps)} steps of this schedule differ.",
            diagnosis={
                "warmup_off_by_one": "It looks like your warm-up is off by one: step 0 gets a "
                "learning rate of 0, so the first step learns nothing, and the warm-up ends one "
                "step short of max_lr.",
                "no_warmup": "Your schedule has no warm-up: it starts at max_lr, while Adam's "
                "estimates of the gradients' moments are still noise.",
                "no_floor": "Your schedule ends at 0, not at the floor min_lr (max_lr times "
                "min_lr_ratio): the cosine must come down from max_lr to the floor, never below.",
                "no_minus_one": "Your last step (total_steps - 1) ends above min_lr: the decay is "
                "spread over one step too many, so its progress never reaches 1 within the run.",
                "no_clamp": "Past the last step your learning rate climbs back up: the progress "
                "of the cosine went beyond 1, and past half a period a cosine rises again.",
            }.get(mistake),
            hint={
                "warmup_off_by_one": "Count the warm-up from the first step as one, not zero: "
                "the first step already learns, at max_lr divided by warmup_steps, and the last "
                "warm-up step reaches max_lr exactly.",
                "no_warmup": "For the first warmup_steps steps the rate climbs linearly up to "
                "max_lr; the cosine starts only after them, and spans the steps that are left.",
                "no_floor": "Shift and scale the cosine so that it runs between the two rates: "
                "from max_lr at the first decay step down to min_lr at the last step.",
                "no_minus_one": "The progress must be 0 at the first step after the warm-up and "
                "exactly 1 at the last step of the run: count how many intervals lie between "
                "those two steps.",
                "no_clamp": "Steps past the end of the run stay at min_lr: never let the "
                "progress exceed 1.",
            }.get(
                mistake,
                "Two pieces: a linear warm-up whose first step already learns and whose last "
                "step reaches max_lr; then half a cosine period from max_lr down to min_lr, its "
                "progress going from 0 at the first decay step to 1 at the last step of the run, "
                "and staying at 1 after it.",
            ),
        )


# ---------------------------------------------------------------------------------------------
# accumulate_gradients


def _tiny_net() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _mse(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def _gradients(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """The gradient of the mean loss over `batch`, computed in one piece on a copy of `model`."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    _mse(model, batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@grader("accumulate_gradients", points=2)
def check_accumulate_gradients(accumulate_gradients):
    """Gradients and loss equal the whole batch's; one backward per micro-batch."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 5), torch.randn(12, 3)
    reference = _tiny_net()
    with torch.no_grad():
        full = _mse(reference, (x, y)).item()
    expected = _gradients(reference, (x, y))

    model = _tiny_net()
    model.load_state_dict(reference.state_dict())
    n = 3
    micro_batches = [(x[i::n], y[i::n]) for i in range(n)]  # 3 micro-batches of 4 samples
    last = _gradients(reference, micro_batches[-1])
    with torch.no_grad():
        last_loss = _mse(reference, micro_batches[-1]).item()
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
        _fail(
            f"loss_fn was called {len(calls)} times for {n} micro-batches.",
            diagnosis="It looks like every loss was computed twice, once more for the value to "
            "return: each extra call runs the forward pass again."
            if len(calls) == 2 * n
            else None,
            hint="Call the loss function once per micro-batch: the loss it returns is both what "
            "you run backward on and what you add up for the value you return.",
        )
    for name, p in model.named_parameters():
        if p.grad is None:
            _fail(
                f"After accumulate_gradients, {name}.grad is None: no gradient reached it.",
                hint="Run the backward pass once for every micro-batch: it fills the gradient "
                "of every parameter the loss depends on.",
            )
        want = expected[name]
        if torch.allclose(p.grad, want, rtol=1e-4, atol=1e-6):
            continue
        diagnosis = diagnose(
            p.grad,
            {
                f"Your gradients are {n}x too large: backward adds every micro-batch's gradient "
                f"into the parameters' gradients, so {n} micro-batch means add up to {n} times "
                "the gradient of the whole batch's mean.": n * want,
                f"Your gradients are those of the last micro-batch alone (divided by {n}): the "
                "gradients of the earlier micro-batches were cleared before it ran, yet adding "
                "them up is the whole point.": last[name] / n,
                "Your gradients are those of the last micro-batch alone: the gradients of the "
                "earlier micro-batches were cleared before it ran, yet adding them up is the "
                "whole point.": last[name],
            },
        )
        if diagnosis and "too large" in diagnosis:
            hint = (
                "The whole batch's mean loss is the average of the micro-batch means: scale "
                "each micro-batch's loss by its share in that average before its backward."
            )
        elif diagnosis:
            hint = (
                "Clear the gradients once per optimizer step (the caller did, before calling "
                "you), never between micro-batches."
            )
        else:
            hint = (
                "Backward adds into each parameter's gradient: run it once per micro-batch, on "
                "that micro-batch's loss scaled so that the gradients add up to the gradient of "
                "the whole batch's mean."
            )
        _fail(
            f"{name}.grad differs from the gradient of the mean loss over the whole batch: "
            f"largest difference {float((p.grad - want).abs().max()):.3g} "
            f"(entries are about {float(want.abs().mean()):.3g}).",
            diagnosis=diagnosis,
            hint=hint,
        )
    if len(accumulations) != n:
        _fail(
            f"The gradients are right, but backward ran {len(accumulations)} time(s) for {n} "
            "micro-batches: adding the losses first and calling backward once keeps every "
            "micro-batch's activations in memory at the same time, which is what gradient "
            "accumulation avoids.",
            hint="Run backward inside the loop, once per micro-batch, on that micro-batch's "
            "scaled loss: its activations are freed before the next micro-batch runs.",
        )
    got = _number(returned, "accumulate_gradients(...)")
    if not math.isclose(got, full, rel_tol=1e-5):
        _fail(
            f"accumulate_gradients returned {got:.6g}, expected the whole batch's mean loss "
            f"{full:.6g}.",
            diagnosis=_recognise(
                got,
                {
                    f"You returned the sum of the {n} micro-batch means, {n} times the mean.": n
                    * full,
                    "You returned the mean loss of the last micro-batch alone.": last_loss,
                    f"You returned the last micro-batch's loss divided by {n}, not the sum of "
                    "the scaled losses of all of them.": last_loss / n,
                },
                rel=1e-5,
            ),
            hint="Return the whole batch's mean loss as a number: the average of the "
            "micro-batch means, which is the sum of the scaled losses you ran backward on.",
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
    groups_hint = (
        "Return a list with one dictionary per group: its parameters under the key params, its "
        "weight decay under the key weight_decay."
    )
    if not isinstance(got, list | tuple) or not all(isinstance(g, dict) for g in got):
        _fail(
            f"decay_groups returned {type(got).__name__}, expected a list of dicts "
            '[{"params": [...], "weight_decay": ...}, ...].',
            hint=groups_hint,
        )
    if any("params" not in g for g in got):
        _fail('Every group needs a "params" key with its list of parameters.', hint=groups_hint)
    decayed, not_decayed = [], []
    for g in got:
        params = list(g["params"])
        wd = g.get("weight_decay")
        if wd is None:
            _fail(
                'Every group needs its own "weight_decay": without it AdamW gives the group its '
                "default decay (0.01), to the vectors too.",
                hint="Give each group its own decay: the value passed in for the matrices, zero "
                "for the rest.",
            )
        if wd > 0 and not _close(wd, 0.1):
            _fail(
                f"A group decays with weight_decay {wd:g}, but decay_groups was called with "
                "weight_decay 0.1.",
                hint="The decaying group takes the weight decay it was asked for: the training "
                "loop passes in its stage's value.",
            )
        (decayed if wd > 0 else not_decayed).extend(params)
    want_decay = _names(model, expected[0]["params"])
    want_none = _names(model, expected[1]["params"])
    got_decay, got_none = _names(model, decayed), _names(model, not_decayed)
    frozen = [n for n in got_decay + got_none if n.startswith("frozen.")]
    if frozen:
        _fail(
            f"The frozen parameters {frozen} (requires_grad=False) are in your groups.",
            hint="Leave out the parameters that do not require gradients: that is how a stage "
            "freezes a part of the model, and the optimizer must never touch them.",
        )
    if sorted(got_decay) != sorted(want_decay) or sorted(got_none) != sorted(want_none):
        wrongly_decayed = sorted(set(got_decay) - set(want_decay))
        wrongly_spared = sorted(set(got_none) & set(want_decay))
        missing = sorted((set(want_decay) | set(want_none)) - set(got_decay) - set(got_none))
        message = (
            f"With weight decay: {sorted(got_decay)}\n  expected {sorted(want_decay)}.\n"
            f"Without: {sorted(got_none)}\n  expected {sorted(want_none)}."
        )
        dimensions_hint = (
            "Decide by the number of dimensions of each tensor, not by its name: matrices (two "
            "dimensions or more) decay, vectors (one dimension) do not."
        )
        if missing:
            _fail(
                message,
                diagnosis=f"Every trainable parameter belongs to one group; {missing} are in none.",
                hint="Put every trainable parameter in exactly one of the two groups: the "
                "matrices in one, everything else in the other.",
            )
        if wrongly_decayed:
            by_name = all(not n.endswith("bias") for n in wrongly_decayed)
            _fail(
                message,
                diagnosis=f"{wrongly_decayed} are 1-D (biases, norm gains) and must not be "
                "decayed."
                + (
                    " It looks like you chose by name: 'gain' and 'norm.weight' are vectors "
                    "too, though neither is called bias."
                    if by_name
                    else ""
                ),
                hint=dimensions_hint,
            )
        _fail(
            message,
            diagnosis=f"{wrongly_spared} have two dimensions or more (weight matrices, an "
            "embedding) and must be decayed."
            if wrongly_spared
            else None,
            hint=dimensions_hint,
        )
    for label, got_names, want_names in (
        ("decaying", got_decay, want_decay),
        ("non-decaying", got_none, want_none),
    ):
        if got_names != want_names:
            _fail(
                f"Your {label} group holds the right parameters in another order: {got_names}, "
                f"expected {want_names} (the order of the model's parameters).",
                hint="Walk the model's parameters once, in their own order, and put each in its "
                "group: the optimizer's state follows that order, and so does a checkpoint of it.",
            )


# ---------------------------------------------------------------------------------------------
# ring_all_reduce (stretch)


class _Ring:
    """The grader's network: `send` carries a chunk between two ranks and counts what it carries.

    It checks each transfer as it happens (ranks that exist, a tensor) and keeps, per rank, how
    many values it sent, how many sends it made, the largest single send and who it sent to.
    """

    def __init__(self, n: int):
        self.n = n
        self.values = [0] * n
        self.sends = [0] * n
        self.largest = [0] * n
        self.targets: list[set[int]] = [set() for _ in range(n)]

    def _rank(self, rank, role: str) -> int:
        try:
            rank = operator.index(rank)
        except TypeError:
            fail(
                f"send was given {rank!r} as the {role} rank; ranks are whole numbers from 0 "
                f"to {self.n - 1}."
            )
        if not 0 <= rank < self.n:
            fail(f"send was given rank {rank} as the {role}; there are ranks 0 to {self.n - 1}.")
        return rank

    def send(self, src, dst, chunk):
        src, dst = self._rank(src, "sending"), self._rank(dst, "receiving")
        if src == dst:
            fail(f"Rank {src} sent a chunk to itself: what a rank holds needs no sending.")
        if not isinstance(chunk, torch.Tensor):
            fail(f"Rank {src} sent a {type(chunk).__name__} to rank {dst}; send carries a tensor.")
        self.values[src] += chunk.numel()
        self.sends[src] += 1
        self.largest[src] = max(self.largest[src], chunk.numel())
        self.targets[src].add(dst)
        return chunk.detach().clone()  # what arrives is a copy, never the sender's memory


RING_HINT = (
    "Follow one chunk round the ring. In the reduce-scatter it must visit every rank, N - 1 hops "
    "one step at a time, each rank adding its own share before passing it on: at each step a "
    "rank sends the chunk it has just added to. The rank it ends on holds its complete sum. The "
    "all-gather then carries each complete chunk N - 1 hops further, replacing instead of adding."
)


def _ring_call(ring_all_reduce, grads: list[torch.Tensor], label: str):
    """Call the learner's ring_all_reduce on a fresh network; (the N results, the network)."""
    n = len(grads)
    ring = _Ring(n)
    step(f"calling ring_all_reduce with {label}")
    results = ring_all_reduce(grads, ring.send)
    if not isinstance(results, list | tuple) or len(results) != n:
        kind = (
            f"{len(results)} items"
            if isinstance(results, list | tuple)
            else "a " + type(results).__name__
        )
        _fail(
            f"ring_all_reduce with {n} ranks returned {kind}, expected a list of {n} tensors: "
            "each rank's result.",
            hint="Every rank ends with its own tensor: return them in rank order.",
        )
    return list(results), ring


def _contributors(got: torch.Tensor, rank: int, n: int) -> str | None:
    """For the input where rank i holds 2 to the power i, who reached `got`'s first wrong value.

    A sum over any set of ranks is a different number (its binary digits are the ranks), so a
    value that is not the mean says which ranks' gradients reached that position, and which not.
    """
    full = 2**n - 1
    flat = got.detach().double().reshape(-1)
    summed = bool(torch.isclose(flat, torch.tensor(float(full), dtype=flat.dtype)).any())
    scale = 1 if summed else n  # the learner's results, times scale, are sums over ranks
    wrong = (~torch.isclose(flat * scale, torch.tensor(float(full), dtype=flat.dtype))).nonzero()
    if len(wrong) == 0:
        return None
    j = int(wrong[0])
    value = float(flat[j]) * scale
    if not math.isfinite(value):
        return None
    mask = round(value)
    if abs(value - mask) > 1e-6 or not 0 <= mask < full:
        return None
    if mask == 0:
        held = "nothing (0)"
    else:
        ranks = [str(i) for i in range(n) if mask >> i & 1]
        names = ranks[0] if len(ranks) == 1 else ", ".join(ranks[:-1]) + " and " + ranks[-1]
        plural = "s" if len(ranks) > 1 else ""
        held = f"the gradient{plural} of rank{plural} {names} only"
    text = (
        f"Position {j} of rank {rank}'s result holds {held}, not the gradients of all {n} "
        f"ranks ({len(wrong)} of its {flat.numel()} values are incomplete): a chunk was not "
        "carried round the whole ring, so a chunk index or a number of steps is off."
    )
    if summed:
        text += f" (Its complete values hold the sum of the {n} ranks, not their mean.)"
    return text


def _check_results(results, grads, label: str, contributors: bool = False) -> None:
    """Every rank's result is the mean of all ranks' tensors, in the gradients' shape."""
    n = len(grads)
    stacked = torch.stack(grads)
    mean, total = stacked.mean(0), stacked.sum(0)
    for r, got in enumerate(results):
        what = f"rank {r}'s result ({label})"
        got = assert_shape(
            got,
            mean.shape,
            what,
            why="each rank ends with the mean of the gradients, in their shape",
            hint="Flatten to split into chunks, and give the result the shape of the gradients "
            "before returning it.",
        )
        if torch.allclose(got.detach().double(), mean.double(), rtol=1e-4, atol=1e-5):
            continue
        diagnosis = diagnose(
            got,
            {
                f"Rank {r} holds the sum of the {n} tensors, {n} times their mean: the ring adds "
                "up, and the average is one more step.": total,
            },
        )
        if diagnosis:
            hint = (
                "Divide by the number of ranks once, before the ring or after it (DDP divides "
                "each gradient by the world size, then sums)."
            )
        else:
            diagnosis = _contributors(got, r, n) if contributors else None
            hint = RING_HINT
        assert_close(got, mean, what, diagnosis=diagnosis, hint=hint)


def _check_traffic(ring: _Ring, n: int, size: int, label: str) -> None:
    """Only right neighbours, chunks no larger than an N-th, 2 (N - 1) chunks' worth per rank."""
    if n == 1:
        return
    chunk = -(-size // n)  # the largest chunk when `size` values are cut into n near-equal ones
    per_rank = 2 * (n - 1) * size / n
    total = sum(ring.values)
    if total == 0 and sum(ring.sends) == 0:
        _fail(
            f"With {label}, every rank ended with the mean, but no rank sent anything: ranks on "
            "different GPUs see each other's gradients only through what they send.",
            hint="Every value a rank learns about another rank's gradient must arrive through "
            "the send function: compute the mean by passing chunks round the ring.",
        )
    for r in range(n):
        others = sorted(ring.targets[r] - {(r + 1) % n})
        if others:
            everyone = ring.targets[r] == set(range(n)) - {r}
            _fail(
                f"With {label}, rank {r} sent to rank(s) {others}: in a ring a rank sends only to "
                f"its right neighbour, rank {(r + 1) % n} (the last rank's neighbour is rank 0).",
                diagnosis=f"It looks like an all-to-all: rank {r} sent to every other rank, "
                f"{ring.values[r]} values, where the ring sends {per_rank:g} (2 (N - 1) / N of the "
                f"{size} values). All-to-all traffic per rank grows with N; the ring's stays "
                "under twice the tensor, however many ranks."
                if everyone
                else None,
                hint="Each rank talks to one neighbour only; the data of a rank further away "
                "reaches it in several hops, one per step, added up on the way.",
            )
    sends = ", ".join(str(v) for v in ring.values)
    message = (
        f"With {label}, the ranks sent {sends} values (rank 0 first), {total} in all; a ring "
        f"all-reduce sends 2 (N - 1) chunks of about M / N values from each rank: about "
        f"{per_rank:g} each, {2 * (n - 1) * size} in all."
    )
    if max(ring.largest) > chunk:
        r = max(range(n), key=lambda i: ring.largest[i])
        if ring.largest[r] < size:
            why = f"more than one chunk ({chunk} values at most, for {size} values cut into {n})."
        elif total == 2 * (n - 1) * size:
            why = (
                "the whole tensor, not a chunk. It went along the ring one rank after another: "
                "while one link carried it the others stood idle, and the run took 2 (N - 1) "
                "transfers of the whole tensor in a row, where the ring's steps move an N-th of "
                "it on every link at once."
            )
        else:
            why = (
                "the whole tensor, not a chunk. Passing whole tensors round the ring gives the "
                "right mean, but each step moves N times more than it needs, and the traffic "
                "per rank grows with the number of ranks."
            )
        _fail(
            message,
            diagnosis=f"Rank {r} sent {ring.largest[r]} values at once: {why}",
            hint="Cut each rank's tensor into N chunks, and send exactly one chunk per rank per "
            "step.",
        )
    if total != 2 * (n - 1) * size or max(ring.values) > 2 * (n - 1) * chunk:
        _fail(
            message,
            diagnosis=f"Rank {max(range(n), key=lambda i: ring.sends[i])} made "
            f"{max(ring.sends)} sends; the ring takes N - 1 steps to reduce and N - 1 to gather, "
            f"{2 * (n - 1)} sends per rank."
            if max(ring.sends) != 2 * (n - 1) or min(ring.sends) != 2 * (n - 1)
            else None,
            hint="Count the steps of each phase: after N - 1 steps of reduce-scatter every rank "
            "holds one complete chunk, and after N - 1 steps of all-gather every rank holds all "
            "of them. Each step, each rank sends one chunk.",
        )


RING_CASES = [  # (ranks, shape of each rank's gradient)
    (3, (2, 5)),  # 10 values do not split evenly into 3 chunks
    (5, (7,)),  # nor 7 into 5
    (2, (6,)),
    (1, (4,)),  # one rank: nothing to send, the mean is its own gradient
]


@grader("ring_all_reduce", points=3)
def check_ring_all_reduce(ring_all_reduce):
    """Stretch: 4 ranks whose values say who contributed, then 1 to 5 ranks and uneven sizes:
    every rank ends with the mean, sending only to its neighbour, 2 (N - 1) / N of the tensor each;
    then 3 replicas' gradients, averaged, equal the whole batch's."""
    n, size = 4, 12
    grads = [torch.full((size,), float(2**r)) for r in range(n)]
    label = "4 ranks of 12 values, rank r holding 2 to the power r"
    results, ring = _ring_call(ring_all_reduce, grads, label)
    _check_results(results, grads, label, contributors=True)
    _check_traffic(ring, n, size, label)

    for n, shape in RING_CASES:
        size = math.prod(shape)
        grads = [torch.randn(shape) for _ in range(n)]
        label = f"{n} rank{'s' if n > 1 else ''} of shape {shape}"
        note = f" ({size} values do not split evenly into {n} chunks)" if size % n else ""
        results, ring = _ring_call(ring_all_reduce, grads, f"{label}{note}")
        _check_results(results, grads, f"{label}, random values")
        _check_traffic(ring, n, size, label)

    # Data parallelism: 3 replicas of one network, each on a third of the batch. Their gradients,
    # flattened into one bucket each (as DDP does) and averaged, are the whole batch's gradient,
    # because the loss is a mean and the shards are of equal size.
    x, y = torch.randn(12, 5), torch.randn(12, 3)
    net = _tiny_net()
    whole = torch.cat([g.reshape(-1) for g in _gradients(net, (x, y)).values()])
    buckets = [
        torch.cat([g.reshape(-1) for g in _gradients(net, (x[r::3], y[r::3])).values()])
        for r in range(3)
    ]
    label = f"3 replicas' gradient buckets of {whole.numel()} values (a batch of 12, 4 rows each)"
    results, ring = _ring_call(ring_all_reduce, buckets, label)
    for r, got in enumerate(results):
        assert_close(
            got,
            whole,
            f"rank {r}'s averaged gradients, against the gradient of the whole batch of 12",
            hint="For a mean loss and shards of equal size, the mean of the replicas' gradients "
            "is the whole batch's gradient: the earlier cases passed, so compare what differs "
            "here (a longer tensor, three ranks).",
        )
    _check_traffic(ring, 3, whole.numel(), label)
