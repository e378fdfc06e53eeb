"""Chapter 4, The Brain: reference solutions. Same names and signatures as exercises/ch04_brain.py.

The library versions live in minillava/decoder.py (RMSNorm, RotaryEmbedding + apply_rotary, MLP,
KVCache) and minillava/generate.py (sample_next_token, keep_top_k, keep_top_p, and generate, whose
greedy path with use_cache=True is the stretch, generate_with_cache).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from minillava.attention import causal_mask
from minillava.decoder import Decoder, KVCache


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """x / sqrt(mean(x², last dim) + eps) * weight. x (..., C), weight (C,) -> (..., C)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * weight


def apply_rotary(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotate the pairs (x_i, x_{i+D/2}) of x (B, H, T, D) by angle position * theta^(-2i/D)."""
    D = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, D/2)
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]  # the two halves: pair i is (x1[i], x2[i])
    # 2-D rotation of each pair: (x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """down(silu(gate(x)) * up(x)). x (..., C); w_gate, w_up (I, C); w_down (C, I) -> (..., C)."""
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def next_token_probs(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """The distribution to sample the next token from: logits (B, V) -> probabilities (B, V)."""
    if temperature == 0:  # greedy: all the mass on the most likely token
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    logits = logits.float() / temperature  # temperature first: it changes what top-p keeps
    if top_k is not None:
        kth_largest = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of more likely tokens
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter(-1, order, sorted_logits)
    return logits.softmax(dim=-1)  # softmax last: only the surviving tokens share the mass


def attend_with_cache(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_k: Tensor | None = None,
    past_v: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention of T_new new positions, reusing the cached keys/values of earlier ones.

    q, k, v (B, H, T_new, D); past_k, past_v (B, H, T_past, D) or None.
    Returns (out (B, H, T_new, D), keys (B, H, T_past + T_new, D), values (same)).
    """
    if past_k is not None:
        k = torch.cat([past_k, k], dim=2)  # (B, H, T_total, D)
        v = torch.cat([past_v, v], dim=2)
    t_new, t_total = q.shape[2], k.shape[2]
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T_new, T_total)
    # The new queries are the last T_new positions: query t sees keys 0 .. T_past + t.
    scores = scores.masked_fill(~causal_mask(t_new, t_total, device=q.device), float("-inf"))
    return scores.softmax(dim=-1) @ v, k, v


@torch.no_grad()
def generate_with_cache(
    model: Decoder,
    input_ids: Tensor,
    max_new_tokens: int,
    stop_token_id: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:
    """Greedy decoding with a KV cache: the prompt once, then one token per forward call.

    model: a minillava Decoder; input_ids (B, T), no padding. Returns the new tokens (B, n_new).
    """
    B, T = input_ids.shape
    # Room for the prompt and every token that will be fed back (the last one never is).
    cache = KVCache(model.config.num_layers, max_len=T + max_new_tokens)
    logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits  # prefill
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        next_token = logits[:, -1].argmax(dim=-1)  # (B,): greedy, from the last position
        new_tokens.append(next_token.masked_fill(finished, pad_token_id))
        if stop_token_id is not None:
            finished |= next_token == stop_token_id  # the stop token itself is kept
        if bool(finished.all()) or step == max_new_tokens - 1:
            break  # no forward pass for a token nobody will read
        # The token fed now sits right after everything cached: prompt (0..T-1), then step 0 at
        # T, step 1 at T + 1, ... (the decoder would count the same from the cache's length).
        positions = torch.full((B, 1), T + step, device=input_ids.device)
        logits = model(
            input_ids=next_token[:, None],  # (B, 1): only the new token
            position_ids=positions,
            past_key_values=cache,  # the same cache, one position longer after this call
            use_cache=True,
        ).logits
    if not new_tokens:
        return input_ids.new_empty(B, 0)
    return torch.stack(new_tokens, dim=1)
