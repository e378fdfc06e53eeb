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


def no_weight(x, weight, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize(
    "wrong, mentions, hint_mentions",
    [
        (layer_norm_style, ["subtracted the mean", "LayerNorm"], ["nothing is subtracted"]),
        (no_sqrt, ["not by its square root"], ["root mean square"]),
        (no_weight, ["weight is missing"], []),
        (eps_outside, ["divided by 0"], ["inside* the square root"]),
    ],
)
def test_rms_norm_rejects(rejects, wrong, mentions, hint_mentions):
    rejects("ch04.rms_norm", wrong, mentions=mentions, hint_mentions=hint_mentions)


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


def rotates_backwards(x, positions, theta=10000.0):
    return solution.apply_rotary(x, -positions, theta)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (interleaved, ["paired neighbours", "feature i with feature i + D/2"]),
        (frequencies_without_two, ["frequencies fall too slowly"]),
        (rotates_backwards, ["wrong way"]),
    ],
)
def test_apply_rotary_rejects(rejects, wrong, mentions):
    rejects("ch04.apply_rotary", wrong, mentions=mentions, hint_mentions=["two halves"])


# --- swiglu -------------------------------------------------------------------------------------


def silu_on_up(x, w_gate, w_up, w_down):
    return ((x @ w_gate.T) * F.silu(x @ w_up.T)) @ w_down.T


def silu_of_product(x, w_gate, w_up, w_down):
    return F.silu((x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def no_silu(x, w_gate, w_up, w_down):
    return ((x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (silu_on_up, ["silu to the up projection", "*gate*"]),
        (silu_of_product, ["silu to the product"]),
        (no_silu, ["silu is missing"]),
    ],
)
def test_swiglu_rejects(rejects, wrong, mentions):
    rejects("ch04.swiglu", wrong, mentions=mentions, hint_mentions=["(out, in)"])


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


def top_p_before_temperature(logits, temperature=1.0, top_k=None, top_p=None):
    """Chooses the nucleus at temperature 1, then applies the temperature to what is kept."""
    if temperature == 0 or top_p is None:
        return solution.next_token_probs(logits, temperature, top_k, top_p)
    keep = solution.next_token_probs(logits, 1.0, top_k, top_p) > 0
    return (logits / temperature).masked_fill(~keep, float("-inf")).softmax(-1)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (softmax_then_filter, ["softmax before filtering", "sum to 1"]),
        (times_temperature, ["you multiplied"]),
        (drops_crossing_token, ["crosses top_p"]),
        (greedy_as_softmax, ["greedy", "one-hot"]),
        (top_p_before_temperature, ["before the temperature"]),
    ],
)
def test_next_token_probs_rejects(rejects, wrong, mentions):
    rejects("ch04.next_token_probs", wrong, mentions=mentions, hint_mentions=["softmax comes last"])


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


def returns_new_keys_only(q, k, v, past_k=None, past_v=None):
    out, keys, values = solution.attend_with_cache(q, k, v, past_k, past_v)
    return out, k, values


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (cache_never_read, ["only looked at itself"]),
        (no_causal_mask, ["no causal mask"]),
        (new_first, ["in front of the cached ones", "*after* the cached ones"]),
        (returns_new_keys_only, ["only the new position"]),
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


# --- generate_with_cache (stretch) --------------------------------------------------------------


def _greedy_loop(model, input_ids, max_new_tokens, stop_token_id, pad_token_id, step_fn):
    """The solution's loop with one piece swapped: step_fn(model, ids so far, token, cache,
    step) runs a step and returns (logits, cache)."""
    out = model(input_ids=input_ids, use_cache=True)
    logits, cache, ids = out.logits, out.past_key_values, input_ids
    finished = torch.zeros(len(input_ids), dtype=torch.bool)
    new = []
    for step in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        new.append(token.masked_fill(finished, pad_token_id))
        if stop_token_id is not None:
            finished |= token == stop_token_id
        if finished.all() or step == max_new_tokens - 1:
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        logits, cache = step_fn(model, ids, token, cache, step)
    return torch.stack(new, dim=1)


@torch.no_grad()
def refeeds_everything(model, input_ids, max_new_tokens, stop_token_id=None, pad_token_id=0):
    """No cache: the whole sequence again at every step (right tokens, quadratic work)."""

    def whole(model, ids, token, cache, step):
        return model(input_ids=ids).logits, None

    return _greedy_loop(model, input_ids, max_new_tokens, stop_token_id, pad_token_id, whole)


@torch.no_grad()
def refeeds_into_the_cache(model, input_ids, max_new_tokens, stop_token_id=None, pad_token_id=0):
    def whole(model, ids, token, cache, step):
        out = model(input_ids=ids, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    return _greedy_loop(model, input_ids, max_new_tokens, stop_token_id, pad_token_id, whole)


@torch.no_grad()
def cache_not_passed_back(model, input_ids, max_new_tokens, stop_token_id=None, pad_token_id=0):
    def fresh(model, ids, token, cache, step):
        out = model(input_ids=token[:, None], use_cache=True)
        return out.logits, out.past_key_values

    return _greedy_loop(model, input_ids, max_new_tokens, stop_token_id, pad_token_id, fresh)


@torch.no_grad()
def positions_off_by_one(model, input_ids, max_new_tokens, stop_token_id=None, pad_token_id=0):
    """Counts the token being fed among those already placed: one position too far."""

    def shifted(model, ids, token, cache, step):
        positions = torch.full((len(ids), 1), ids.shape[1])  # T + step + 1
        out = model(token[:, None], position_ids=positions, past_key_values=cache, use_cache=True)
        return out.logits, out.past_key_values

    return _greedy_loop(model, input_ids, max_new_tokens, stop_token_id, pad_token_id, shifted)


@torch.no_grad()
def prompt_from_one(model, input_ids, max_new_tokens, stop_token_id=None, pad_token_id=0):
    """Numbers the prompt from 1, like a person counting tokens."""
    T = input_ids.shape[1]
    out = model(input_ids, position_ids=torch.arange(1, T + 1)[None], use_cache=True)
    new = [out.logits[:, -1].argmax(-1)]
    for _ in range(max_new_tokens - 1):
        out = model(new[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
        new.append(out.logits[:, -1].argmax(-1))
    return torch.stack(new, dim=1)


def ignores_the_stop_token(model, input_ids, max_new_tokens, stop_token_id=None, pad_token_id=0):
    return solution.generate_with_cache(model, input_ids, max_new_tokens)


@torch.no_grad()
def drops_the_stop_token(model, input_ids, max_new_tokens, stop_token_id=None, pad_token_id=0):
    """Marks a row finished before writing its token, so the stop token becomes padding."""
    out = model(input_ids=input_ids, use_cache=True)
    finished = torch.zeros(len(input_ids), dtype=torch.bool)
    new = []
    for _ in range(max_new_tokens):
        token = out.logits[:, -1].argmax(-1)
        if stop_token_id is not None:
            finished |= token == stop_token_id
        if finished.all():
            break
        new.append(token.masked_fill(finished, pad_token_id))
        out = model(token[:, None], past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(new, dim=1)


def stops_with_the_first_row(model, input_ids, max_new_tokens, stop_token_id=None, pad_token_id=0):
    new = solution.generate_with_cache(model, input_ids, max_new_tokens, stop_token_id, 0)
    if stop_token_id is None:
        return new
    hits = [i for i in range(new.shape[1]) if bool((new[:, i] == stop_token_id).any())]
    return new[:, : hits[0] + 1] if hits else new


def calls_the_library(model, input_ids, max_new_tokens, stop_token_id=None, pad_token_id=0):
    stops = () if stop_token_id is None else (stop_token_id,)
    return generate.generate(
        model,
        input_ids,
        max_new_tokens=max_new_tokens,
        stop_token_ids=stops,
        pad_token_id=pad_token_id,
    )


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (refeeds_everything, ["call 2 fed 6 tokens per row", "whole sequence again"]),
        (refeeds_into_the_cache, ["whole sequence again"]),
        (cache_not_passed_back, ["handed no cache", "did not pass the cache back"]),
        (positions_off_by_one, ["sits at position 5", "off by +1"]),
        (prompt_from_one, ["the prompt's are [0, 1, 2, 3, 4]", "start at 1, not 0"]),
        (ignores_the_stop_token, ["stopped kept getting real tokens"]),
        (drops_the_stop_token, ["stop token is missing"]),
        (stops_with_the_first_row, ["as soon as one row", "every row has stopped"]),
        (calls_the_library, ["library's generate"]),
    ],
)
def test_generate_with_cache_rejects(rejects, wrong, mentions):
    rejects("ch04.generate_with_cache", wrong, mentions=mentions)


def test_generate_with_cache_names_the_learners_line(rejects):
    result = rejects(
        "ch04.generate_with_cache", cache_not_passed_back, hint_mentions=["same cache"]
    )
    assert "test_ch04.py, line" in result.message


def test_generate_with_cache_matches_library():
    """The stretch's loop == minillava.generate.generate (greedy, with and without its cache)."""
    torch.manual_seed(0)
    config = decoder.DecoderConfig(
        vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=48, max_seq_len=64,
    )  # fmt: skip
    model = decoder.Decoder(config).eval()
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0.0, 0.4)  # tokens that depend on the context, not one repeated
    prompt = torch.randint(0, 40, (3, 6))
    free = solution.generate_with_cache(model, prompt, 12)
    assert len(set(free.flatten().tolist())) > 4
    stop = int(free[0, 2])
    for kwargs in ({}, {"stop_token_ids": (stop,), "pad_token_id": 39}):
        own = {"stop_token_id": stop, "pad_token_id": 39} if kwargs else {}
        got = solution.generate_with_cache(model, prompt, 12, **own)
        for use_cache in (True, False):
            expected = generate.generate(
                model, prompt, max_new_tokens=12, temperature=0.0, use_cache=use_cache, **kwargs
            )
            assert torch.equal(got, expected)
    assert torch.equal(solution.generate_with_cache(model, prompt, 1), free[:, :1])
