"""Chapter 4: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.decoder, minillava.generate) agrees with solutions/ch04_brain.py,
so the chapter, the notebook and the reference cannot drift apart.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minillava import decoder, generate
from minillava.attention import causal_mask, manual_attention
from solutions import ch04_brain as solution

# --- rms_norm -----------------------------------------------------------------------------------


def layer_norm_style(x, weight, eps=1e-5):
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps) * weight


def no_sqrt(x, weight, eps=1e-5):
    return x / (x.pow(2).mean(-1, keepdim=True) + eps) * weight


def eps_outside(x, weight, eps=1e-5):
    return x / x.pow(2).mean(-1, keepdim=True).sqrt() * weight + 0 * eps


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (layer_norm_style, ["LayerNorm"]),
        (no_sqrt, ["square root"]),
        (eps_outside, ["inside* the square root"]),
    ],
)
def test_rms_norm_rejects(rejects, wrong, mentions):
    rejects("ch04.rms_norm", wrong, mentions=mentions)


# --- apply_rotary -------------------------------------------------------------------------------


def interleaved(x, positions, theta=10000.0):
    D = x.shape[-1]
    angles = positions.float()[:, None] * theta ** (-torch.arange(0, D, 2).float() / D)
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def frequencies_without_two(x, positions, theta=10000.0):
    D = x.shape[-1]
    angles = positions.float()[:, None] * theta ** (-torch.arange(D // 2).float() / D)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat(
        [x1 * angles.cos() - x2 * angles.sin(), x1 * angles.sin() + x2 * angles.cos()], -1
    )


@pytest.mark.parametrize(
    "wrong, mentions",
    [(interleaved, ["pairs x[i] with x[i + D/2]"]), (frequencies_without_two, ["frequencies"])],
)
def test_apply_rotary_rejects(rejects, wrong, mentions):
    rejects("ch04.apply_rotary", wrong, mentions=mentions)


# --- swiglu -------------------------------------------------------------------------------------


def silu_on_up(x, w_gate, w_up, w_down):
    return ((x @ w_gate.T) * F.silu(x @ w_up.T)) @ w_down.T


def silu_of_product(x, w_gate, w_up, w_down):
    return F.silu((x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


@pytest.mark.parametrize(
    "wrong, mentions",
    [(silu_on_up, ["on the *gate*"]), (silu_of_product, ["not silu of the product"])],
)
def test_swiglu_rejects(rejects, wrong, mentions):
    rejects("ch04.swiglu", wrong, mentions=mentions)


# --- next_token_probs ---------------------------------------------------------------------------


def softmax_then_filter(logits, temperature=1.0, top_k=None, top_p=None):
    if temperature == 0:
        return solution.next_token_probs(logits, 0)
    probs = (logits / temperature).softmax(-1)
    keep = solution.next_token_probs(logits, temperature, top_k, top_p) > 0
    return probs * keep


def times_temperature(logits, temperature=1.0, top_k=None, top_p=None):
    if temperature == 0:
        return solution.next_token_probs(logits, 0)
    return solution.next_token_probs(logits * temperature * temperature, temperature, top_k, top_p)


def drops_crossing_token(logits, temperature=1.0, top_k=None, top_p=None):
    if temperature == 0 or top_p is None:
        return solution.next_token_probs(logits, temperature, top_k, top_p)
    logits = solution.next_token_probs(logits, temperature, top_k).log()
    sorted_logits, order = logits.sort(-1, descending=True)
    cut = sorted_logits.softmax(-1).cumsum(-1) >= top_p
    sorted_logits = sorted_logits.masked_fill(cut, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits).softmax(-1)


def greedy_as_softmax(logits, temperature=1.0, top_k=None, top_p=None):
    return solution.next_token_probs(logits, max(temperature, 1.0), top_k, top_p)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (softmax_then_filter, ["softmax before filtering", "sum to 1"]),
        (times_temperature, ["you multiplied"]),
        (drops_crossing_token, ["crosses top_p"]),
        (greedy_as_softmax, ["greedy"]),
    ],
)
def test_next_token_probs_rejects(rejects, wrong, mentions):
    rejects("ch04.next_token_probs", wrong, mentions=mentions)


# --- attend_with_cache --------------------------------------------------------------------------


def cache_never_read(q, k, v, past_k=None, past_v=None):
    keys = k if past_k is None else torch.cat([past_k, k], dim=2)
    values = v if past_v is None else torch.cat([past_v, v], dim=2)
    mask = causal_mask(q.shape[2], k.shape[2])
    return manual_attention(q, k, v, mask=mask)[0], keys, values


def no_causal_mask(q, k, v, past_k=None, past_v=None):
    keys = k if past_k is None else torch.cat([past_k, k], dim=2)
    values = v if past_v is None else torch.cat([past_v, v], dim=2)
    return manual_attention(q, keys, values)[0], keys, values


def new_first(q, k, v, past_k=None, past_v=None):
    keys = k if past_k is None else torch.cat([k, past_k], dim=2)
    values = v if past_v is None else torch.cat([v, past_v], dim=2)
    return solution.attend_with_cache(q, k, v, past_k, past_v)[0], keys, values


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (cache_never_read, ["only looked at itself"]),
        (no_causal_mask, ["causal mask"]),
        (new_first, ["*after* the cached ones"]),
    ],
)
def test_attend_with_cache_rejects(rejects, wrong, mentions):
    rejects("ch04.attend_with_cache", wrong, mentions=mentions)


# --- library == solutions -----------------------------------------------------------------------


def test_library_matches_solution():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16)
    norm = decoder.RMSNorm(16)
    norm.weight.data.uniform_(0.5, 1.5)
    assert torch.allclose(norm(x), solution.rms_norm(x, norm.weight), atol=1e-6)

    positions = torch.arange(7) + 5
    cos, sin = decoder.RotaryEmbedding(16, 500.0)(positions[None])
    assert torch.allclose(
        decoder.apply_rotary(x, cos, sin), solution.apply_rotary(x, positions, 500.0), atol=1e-5
    )

    mlp = decoder.MLP(decoder.DecoderConfig(hidden_size=16, intermediate_size=24, num_heads=2))
    h = torch.randn(2, 7, 16)
    w = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    assert torch.allclose(mlp(h), solution.swiglu(h, *w), atol=1e-6)

    logits = torch.randn(4, 30)
    for T, k, p in [(1.0, None, None), (0.6, 5, None), (1.3, None, 0.7), (0.8, 10, 0.9)]:
        lib = generate.keep_top_k(logits / T, k) if k else logits / T
        lib = generate.keep_top_p(lib, p) if p else lib
        assert torch.allclose(lib.softmax(-1), solution.next_token_probs(logits, T, k, p))
    greedy = generate.sample_next_token(logits, temperature=0)
    assert torch.equal(solution.next_token_probs(logits, 0).argmax(-1), greedy)


def test_cache_matches_decoder_kv_cache():
    """The decoder's cached generation step == full recompute, like attend_with_cache."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 5, 8).unbind(0)
    full = manual_attention(q, k, v, mask=causal_mask(5))[0]
    out, keys, values = solution.attend_with_cache(q[:, :, :2], k[:, :, :2], v[:, :, :2])
    outs = [out]
    for t in range(2, 5):
        out, keys, values = solution.attend_with_cache(
            q[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1], keys, values
        )
        outs.append(out)
    assert torch.allclose(torch.cat(outs, dim=2), full, atol=1e-6)
    cache = decoder.KVCache(1)
    cache.update(0, k[:, :, :2], v[:, :, :2])
    lib_k, lib_v = cache.update(0, k[:, :, 2:3], v[:, :, 2:3])
    assert torch.equal(lib_k, k[:, :, :3]) and torch.equal(lib_v, v[:, :, :3])
    assert math.isclose(float(keys.shape[2]), 5.0)
