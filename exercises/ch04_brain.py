"""Chapter 4, The Brain: your exercises. Fill each function, then run `minillava grade ch04`.

The four pieces that make a LLaMA-style decoder different from GPT-2, plus how it picks a word:
RMSNorm, rotary position embeddings (RoPE), the SwiGLU MLP, the sampling distribution
(temperature, top-k, top-p) and one step of attention with a KV cache; the stretch drives the
library's decoder through a whole generation with its KV cache. Compare your code with
minillava/decoder.py and minillava/generate.py once it passes.

Shapes: B batch, H heads, T positions, D head size, C hidden size, I MLP width, V vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from minillava.decoder import Decoder


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-5) -> Tensor:
    """Root-mean-square normalisation of the last dim: x (..., C), weight (C,) -> (..., C).

        rms = sqrt(mean(x², over the last dim) + eps)        one number per vector
        out = x / rms * weight

    Unlike LayerNorm there is no mean subtracted and no bias: only the vector's length is fixed.
    Hint: take the mean over the last dimension but keep that dimension, of size 1, so that the
    division broadcasts over the C features of each vector; torch.rsqrt gives one over the square
    root in one step.
    """
    raise NotImplementedError("rms_norm: your code here (chapter 4)")


def apply_rotary(x: Tensor, positions: Tensor, theta: float = 10000.0) -> Tensor:
    """Rotary position embedding (RoPE), Hugging Face Llama's convention. x (B, H, T, D) -> same.

    positions (T,) holds each of the T rows' position (0, 1, 2, ... or offset, e.g. 7, 8, 9).
    Dimension i is paired with dimension i + D/2 (the two halves of the last dim, NOT neighbours
    2i and 2i+1). Pair i of the token at position m is rotated by the angle

        angle[m, i] = m · theta^(-2i / D)             i = 0 .. D/2 - 1

    so pair 0 turns fastest (one radian per position) and the last pair slowest. Rotating the
    pair (a, b) by angle t gives (a cos t - b sin t, a sin t + b cos t).

    Hint: compute the D/2 frequencies once, as a vector over i (torch.arange counts the even
    numbers 0, 2, ... below D for you). An outer product of the positions with the frequencies
    is a (T, D/2) table of angles, and it broadcasts against the two halves of x's last
    dimension, each (B, H, T, D/2). Work in float: integer positions would round the angles.
    """
    raise NotImplementedError("apply_rotary: your code here (chapter 4)")


def swiglu(x: Tensor, w_gate: Tensor, w_up: Tensor, w_down: Tensor) -> Tensor:
    """The LLaMA MLP: down(silu(gate(x)) * up(x)), with bias-free linear maps.

    x (..., C); w_gate and w_up (I, C); w_down (C, I): nn.Linear's (out, in) layout, so gate
    multiplies x by the transpose of w_gate. The silu of the *gate* multiplies the *up*
    projection elementwise: the gate decides how much of each of the I hidden units passes.
    Returns (..., C).
    Hint: torch.nn.functional.silu is SiLU, its input times the sigmoid of that input: no need
    to write it yourself.
    """
    raise NotImplementedError("swiglu: your code here (chapter 4)")


def next_token_probs(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """The distribution the next token is drawn from: logits (B, V) -> probabilities (B, V).

    In this order:
      1. a temperature of 0: greedy. Return a one-hot row: 1.0 at the argmax, 0 elsewhere.
      2. divide the logits by the temperature (< 1 sharpens, > 1 flattens);
      3. top_k (if not None): keep the k largest logits per row, set the others to -inf;
      4. top_p (if not None): sort the (filtered) probabilities in decreasing order and keep
         the most likely tokens until their total reaches top_p: a token is kept when the mass
         of the tokens *before* it in that order is still < top_p (so the top token always stays);
      5. softmax over what is left. Each row sums to 1, removed tokens get exactly 0.

    Filter the *logits* and take the softmax last. (Softmax first, then zeroing tokens, leaves
    rows that no longer sum to 1.) torch.multinomial then draws one token from each row.
    Hint: masked_fill sets the removed logits to minus infinity. For top-p, sort each row in
    decreasing order: sort returns the sorted values and the indices they came from, and
    scatter, given those indices, puts what you computed in sorted order back where each
    token was.
    """
    raise NotImplementedError("next_token_probs: your code here (chapter 4)")


def attend_with_cache(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    past_k: Tensor | None = None,
    past_v: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention for T_new new positions, reusing the keys/values cached for earlier ones.

    q, k, v: (B, H, T_new, D), the new positions' queries, keys and values.
    past_k, past_v: (B, H, T_past, D) from earlier calls, or None for the first call.
    Returns (out (B, H, T_new, D), keys (B, H, T_past + T_new, D), values (same shape)): keys and
    values are the cache to pass to the next call.

    1. Append the new keys/values after the cached ones (torch.cat along dim 2, the positions).
    2. scores = q keysᵀ / sqrt(D), shape (B, H, T_new, T_total).
    3. Causal mask: the new queries are the *last* T_new positions, so new query t may see keys
       0 .. T_past + t. minillava.attention.causal_mask, given the number of queries and the
       number of keys, builds exactly that (True = allowed); masked scores become -inf.
    4. out = softmax(scores) values.
    Generating one token at a time (T_new = 1) must give the same outputs as attending over the
    whole sequence at once with a causal mask.
    """
    raise NotImplementedError("attend_with_cache: your code here (chapter 4)")


def generate_with_cache(
    model: Decoder,
    input_ids: Tensor,
    max_new_tokens: int,
    stop_token_id: int | None = None,
    pad_token_id: int = 0,
) -> Tensor:
    """Stretch: greedy generation with the library's KV cache. Returns the new tokens (B, n_new).

    model: a minillava.decoder.Decoder; input_ids (B, T): B prompts of T tokens, no padding.
    Without a cache, generating n tokens runs the model on T, T + 1, ..., T + n - 1 positions:
    every step redoes the work of all the steps before it. With the cache, the model runs once
    on the prompt (the *prefill*), and then on ONE position per step. This is how every real
    model generates (Hugging Face's generate, vLLM, llama.cpp); attend_with_cache above is the
    inside of one layer's step, here you drive the whole model:

      1. Prefill: run the model once on the whole prompt, with use_cache on. Its output's
         logits are (B, T, V) and its past_key_values is the KVCache, now holding the T prompt
         positions of every layer. (Or make the cache yourself, a minillava.decoder.KVCache
         with the model's number of layers and room for T + max_new_tokens positions, and pass
         it in as past_key_values.)
      2. The next token of each row is the argmax of the logits at the LAST position (greedy).
      3. Step: feed only that token, input_ids of shape (B, 1), with past_key_values set to the
         same cache and use_cache on. The cache grows by one position per call.
      4. Positions: RoPE rotates each query and key by its position, and the cached keys keep
         theirs. The prompt sits at 0 .. T - 1, the first new token is fed at position T, the
         next at T + 1, and so on. The decoder counts this from the cache's length; if you pass
         position_ids (B, 1) yourself, they must say the same (the grader checks them).
      5. Stopping: if stop_token_id is given, a row stops after producing it (the stop token is
         kept in the output); its later columns are pad_token_id. Stop the loop when every row
         has stopped, or after max_new_tokens tokens. No forward call is needed after the last.

    The result must be exactly the tokens that minillava.generate.generate gives for the same
    model, prompts, number of tokens, stop token and pad token, greedy (temperature 0) and
    without the cache. You may compare against it, but not call it: the grader watches every
    forward call (how many tokens it was fed, which cache, which positions). Run the loop under
    torch.no_grad: nothing here needs gradients.
    """
    raise NotImplementedError("generate_with_cache: your code here (chapter 4, stretch)")
