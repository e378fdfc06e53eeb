"""Chapter 4 graders: the Brain (exercises/ch04_brain.py).

Each check compares the learner's function with minillava.decoder / minillava.generate on small
random inputs, then tests a property every right answer has (RMSNorm's unit RMS, RoPE keeping
lengths and depending only on relative positions, probabilities that sum to 1, a cache that
changes nothing).
"""

import math

import torch
import torch.nn.functional as F

from minillava import decoder as ref
from minillava import generate as gen
from minillava.attention import causal_mask, manual_attention
from minillava.grading import GradingFailure, assert_close, assert_tensor, diagnose, grader, step

TITLE = "The Brain"
MODULE = "ch04_brain"


# --- rms_norm -----------------------------------------------------------------------------------


@grader("rms_norm", points=1)
def check_rms_norm(rms_norm):
    """Random (2, 5, 16) inputs against decoder.RMSNorm; an all-zero vector must stay finite."""
    x, weight = torch.randn(2, 5, 16) * 3 + 1, torch.rand(16) + 0.5
    module = ref.RMSNorm(16, eps=1e-5)
    module.weight.data.copy_(weight)
    step("calling rms_norm(x, weight) with x (2, 5, 16), weight (16,)")
    got = rms_norm(x, weight)
    mean_sq = x.pow(2).mean(-1, keepdim=True)
    centred = x - x.mean(-1, keepdim=True)
    assert_close(
        got,
        module(x).detach(),
        "rms_norm(x, weight)",
        why_shape="the output has the shape of x",
        hint=diagnose(
            got,
            {
                "You subtracted the mean: that is LayerNorm. RMSNorm only divides by the root "
                "mean square, x / sqrt(mean(x²) + eps).": centred
                * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)
                * weight,
                "Take the square root: divide by sqrt(mean(x²) + eps), not by mean(x²).": x
                / (mean_sq + 1e-5)
                * weight,
                "Multiply by `weight` at the end.": x * torch.rsqrt(mean_sq + 1e-5),
                "Average over the last dim (the C features of each vector), dim=-1, with "
                "keepdim=True.": x * torch.rsqrt(x.pow(2).mean(0, keepdim=True) + 1e-5) * weight,
            },
            "out = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight",
        ),
    )
    step("calling rms_norm on a vector of zeros")
    zeros = rms_norm(torch.zeros(1, 4), torch.ones(4))
    zeros = assert_tensor(zeros, "rms_norm(zeros)")
    if not torch.isfinite(zeros).all():
        raise GradingFailure(
            "rms_norm of a zero vector gave NaN/inf.",
            "Add eps *inside* the square root, sqrt(mean(x²) + eps), so it never divides by 0.",
        )


# --- apply_rotary -------------------------------------------------------------------------------


def _library_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    cos, sin = ref.RotaryEmbedding(x.shape[-1], theta)(positions[None])
    return ref.apply_rotary(x, cos, sin)


def _interleaved(x, positions, theta):
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2).float() / D)
    angles = positions.float()[:, None] * inv_freq
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.stack(
        [a * angles.cos() - b * angles.sin(), a * angles.sin() + b * angles.cos()], -1
    )
    return out.flatten(-2)


def _rotate(x, angles):
    D = x.shape[-1]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


@grader("apply_rotary", points=2)
def check_apply_rotary(apply_rotary):
    """Against decoder.apply_rotary (rotate_half pairing); lengths kept; scores depend on m - n."""
    x = torch.randn(2, 3, 5, 8)
    positions = torch.arange(5) + 2
    for theta in (10000.0, 100.0):
        step(f"calling apply_rotary(x (2, 3, 5, 8), positions = [2..6], theta={theta})")
        got = apply_rotary(x, positions, theta)
        D = 8
        half = torch.arange(0, D, 2).float()
        angles = positions.float()[:, None]
        assert_close(
            got,
            _library_rotary(x, positions, theta),
            f"apply_rotary(x, positions, theta={theta})",
            why_shape="RoPE rotates x in place: the output has x's shape (B, H, T, D)",
            hint=diagnose(
                got,
                {
                    "You paired neighbours (x[2i], x[2i+1]): that is the original RoFormer "
                    "layout. Hugging Face Llama pairs x[i] with x[i + D/2], the two halves of "
                    "the last dim.": _interleaved(x, positions, theta),
                    "Wrong frequencies: theta ** (-2i / D) for i = 0 .. D/2 - 1, i.e. "
                    "theta ** (-torch.arange(0, D, 2) / D).": _rotate(
                        x, angles * theta ** (-half / 2 / D)
                    ),
                    "Wrong frequencies: they must *decrease*, theta ** (-2i / D) (a negative "
                    "exponent), pair 0 turning one radian per position.": _rotate(
                        x, angles * theta ** (half / D)
                    ),
                    "You rotated the wrong way: (a, b) -> (a cos - b sin, a sin + b cos).": _rotate(
                        x, -angles * theta ** (-half / D)
                    ),
                    "No rotation happened: the angle is position * frequency.": x,
                },
                "Rotate pair i = (x[..., i], x[..., i + D/2]) by positions * theta ** (-2i / D).",
            ),
        )
    step("checking that the rotation keeps every vector's length")
    q = torch.randn(1, 1, 6, 16)
    rotated = assert_tensor(apply_rotary(q, torch.arange(6), 10000.0), "apply_rotary(q, ...)")
    if not torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-4):
        raise GradingFailure(
            "apply_rotary changed the length of the vectors; a rotation never does.",
            "Each pair (a, b) becomes (a cos - b sin, a sin + b cos): same length.",
        )
    step("checking that q·k depends only on the distance between the two positions")
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    scores = []
    for m, n in ((3, 1), (10, 8), (50, 48)):
        qm = apply_rotary(q, torch.tensor([m]), 10000.0)
        kn = apply_rotary(k, torch.tensor([n]), 10000.0)
        scores.append(float((qm * kn).sum()))
    if max(scores) - min(scores) > 1e-3 * (1 + abs(scores[0])):
        raise GradingFailure(
            f"q at position m and k at position n should give the same score whenever m - n is "
            f"the same; for (3, 1), (10, 8), (50, 48) you give {[round(s, 4) for s in scores]}.",
            "Rotate by position * frequency, with the same frequencies for every position.",
        )


# --- swiglu -------------------------------------------------------------------------------------


@grader("swiglu", points=1)
def check_swiglu(swiglu):
    """Random weights against decoder.MLP (down(silu(gate(x)) * up(x)))."""
    C, I = 8, 12
    config = ref.DecoderConfig(hidden_size=C, intermediate_size=I, num_heads=2)
    mlp = ref.MLP(config)
    x = torch.randn(2, 5, C)
    w_gate, w_up, w_down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    step(f"calling swiglu(x (2, 5, {C}), w_gate ({I}, {C}), w_up ({I}, {C}), w_down ({C}, {I}))")
    with torch.no_grad():
        got = swiglu(x, w_gate, w_up, w_down)
        gate, up = x @ w_gate.T, x @ w_up.T
        assert_close(
            got,
            mlp(x),
            "swiglu(x, w_gate, w_up, w_down)",
            why_shape="the MLP maps each C-vector back to C",
            hint=diagnose(
                got,
                {
                    "silu goes on the *gate* projection, not on up: down(silu(gate(x)) * up(x)).": (
                        gate * F.silu(up)
                    )
                    @ w_down.T,
                    "Apply silu to gate(x) alone, then multiply by up(x); not silu of the "
                    "product.": F.silu(gate * up) @ w_down.T,
                    "You forgot the silu: down(silu(gate(x)) * up(x)).": (gate * up) @ w_down.T,
                },
                "down(silu(x @ w_gate.T) * (x @ w_up.T)): weights are (out, in), so transpose.",
            ),
        )


# --- next_token_probs ---------------------------------------------------------------------------


def _reference_probs(logits, temperature=1.0, top_k=None, top_p=None):
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits.float() / temperature
    if top_k is not None:
        logits = gen.keep_top_k(logits, min(top_k, logits.shape[-1]))
    if top_p is not None:
        logits = gen.keep_top_p(logits, top_p)
    return logits.softmax(-1)


def _renormalised(logits, keep):
    return logits.masked_fill(~keep, float("-inf")).softmax(-1)


def _exclusive_top_p_keep(logits, temperature, top_k, top_p):
    """Tokens kept by the mistake "drop the token whose cumulative mass reaches top_p"."""
    probs = _reference_probs(logits, temperature, top_k)
    sorted_probs, order = probs.sort(-1, descending=True)
    keep_sorted = sorted_probs.cumsum(-1) < top_p
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _softmax_then_filter(logits, temperature, top_k, top_p):
    probs = (logits / temperature).softmax(-1)
    keep = _reference_probs(logits, temperature, top_k, top_p) > 0
    return probs * keep


@grader("next_token_probs", points=2)
def check_next_token_probs(next_token_probs):
    """Temperature, top-k, top-p and greedy against minillava.generate's filters."""
    logits = torch.randn(3, 20) * 2
    settings = [
        dict(temperature=1.0),
        dict(temperature=0.0),
        dict(temperature=0.5),
        dict(temperature=1.0, top_k=4),
        dict(temperature=2.0, top_p=0.6),
        dict(temperature=0.7, top_k=8, top_p=0.9),
    ]
    for kwargs in settings:
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
        what = f"next_token_probs(logits (3, 20), {args})"
        step(f"calling {what}")
        got = next_token_probs(logits.clone(), **kwargs)
        expected = _reference_probs(logits, **kwargs)
        T, k, p = kwargs["temperature"], kwargs.get("top_k"), kwargs.get("top_p")
        mistakes = {}
        if T > 0:
            mistakes = {
                "You took the softmax before filtering and then zeroed tokens: the kept "
                "probabilities no longer sum to 1. Filter the logits (-inf), softmax last.": (
                    _softmax_then_filter(logits, T, k, p)
                ),
                "Divide the logits by the temperature (you multiplied).": _reference_probs(
                    logits * T * T, T, k, p
                ),
                "Apply the temperature to the logits *before* the softmax (and before top-p).": (
                    _reference_probs(logits, 1.0, k, p)
                ),
            }
            if p is not None:
                mistakes[
                    "Top-p must use the probabilities *after* the temperature (and top-k)."
                ] = _renormalised(logits / T, _reference_probs(logits, 1.0, k, p) > 0)
                mistakes[
                    "Keep the token that crosses top_p too: a token stays when the mass *before* "
                    "it is < top_p (cumsum - its own probability)."
                ] = _renormalised(logits / T, _exclusive_top_p_keep(logits, T, k, p))
        if T == 0:
            mistakes = {
                "temperature 0 means greedy: all the probability on the argmax (a one-hot "
                "row), not a softmax.": logits.softmax(-1)
            }
        assert_close(
            got,
            expected,
            what,
            why_shape="one probability per token of the vocabulary, per row",
            hint=diagnose(got, mistakes, "Order: temperature, top-k, top-p on logits, softmax."),
        )
        sums = got.sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-4):
            raise GradingFailure(f"{what}: rows must sum to 1, got {sums.tolist()}.")


# --- attend_with_cache --------------------------------------------------------------------------


@grader("attend_with_cache", points=2)
def check_attend_with_cache(attend_with_cache):
    """Prefill 3 positions, then 3 one-token steps: outputs == full causal attention."""
    B, H, T, D = 2, 2, 6, 4
    q, k, v = torch.randn(3, B, H, T, D).unbind(0)
    expected, _ = manual_attention(q, k, v, mask=causal_mask(T))
    step("calling attend_with_cache(q, k, v) on a prefill of 3 positions, no cache")
    result = attend_with_cache(q[:, :, :3], k[:, :, :3], v[:, :, :3], None, None)
    if not isinstance(result, tuple) or len(result) != 3:
        raise GradingFailure(
            "attend_with_cache must return a tuple (out, keys, values): the output and the "
            "updated cache."
        )
    out, keys, values = result
    no_mask = manual_attention(q[:, :, :3], k[:, :, :3], v[:, :, :3])[0]
    assert_close(
        out,
        expected[:, :, :3],
        "the prefill output (3 new positions, empty cache)",
        why_shape="one output per new query: (B, H, T_new, D)",
        hint=diagnose(
            out,
            {
                "The prefill needs the causal mask: position t may not see positions after "
                "it. Use causal_mask(T_new, T_total).": no_mask
            },
            "scores = q @ keys^T / sqrt(D), masked with causal_mask(T_new, T_total), softmax.",
        ),
    )
    for t in range(3, T):
        step(f"calling attend_with_cache for position {t}, with {t} cached positions")
        out, keys, values = attend_with_cache(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], keys, values
        )
        assert_close(
            keys,
            k[:, :, : t + 1],
            f"the returned keys after position {t}",
            why_shape="the cache grows by the new positions along dim 2: (B, H, T_past + 1, D)",
            hint="Append the new keys *after* the cached ones: torch.cat([past_k, k], dim=2).",
        )
        assert_close(
            values,
            v[:, :, : t + 1],
            f"the returned values after position {t}",
            hint="Append the new values after the cached ones: torch.cat([past_v, v], dim=2).",
        )
        scale_free = manual_attention(q[:, :, t : t + 1] * math.sqrt(D), keys, values)[0]
        assert_close(
            out,
            expected[:, :, t : t + 1],
            f"the output at position {t} (one new token, {t} cached)",
            hint=diagnose(
                out,
                {
                    "The new token only looked at itself: attend over all the keys, cached "
                    "and new (T_past + 1 of them).": v[:, :, t : t + 1],
                    "Divide the scores by sqrt(D).": scale_free,
                },
                "A single new query is the last position: it may see every cached key and "
                "itself. causal_mask(1, T_total) is all True.",
            ),
        )
