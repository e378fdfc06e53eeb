"""The Brain: a LLaMA-style decoder-only language model, written by hand.

A decoder reads tokens left to right and predicts the next one. Compared with GPT-2 (and
nanoGPT), LLaMA changes four things, all kept here:

1. RMSNorm instead of LayerNorm: rescale by the root-mean-square, no mean subtraction, no bias.
2. Rotary position embeddings (RoPE) instead of a learned position table: each query and key is
   *rotated* by an angle proportional to its position, so the score q·k depends only on the
   distance between the two tokens.
3. A SwiGLU MLP instead of GELU: down(silu(gate(x)) * up(x)).
4. Optional grouped-query attention (GQA): several query heads share one key/value head, which
   shrinks the KV cache.

Data flows like this (B = batch, T = tokens, C = hidden size, H = heads, D = head size, V = vocab):

    input_ids (B, T) --embed_tokens--> x (B, T, C)
    for each layer:   x = x + attention(RMSNorm(x))      # tokens talk to earlier tokens
                      x = x + mlp(RMSNorm(x))            # each token thinks on its own
    RMSNorm -> lm_head -> logits (B, T, V)

Parameter names follow Hugging Face's `LlamaForCausalLM` (minus its `model.` prefix) so that
`minillava.interop` can copy our weights into it and check that both give the same logits.

The model also takes:
- `inputs_embeds` instead of token ids: LLaVA feeds image features this way;
- an `attention_mask` (1 = real token, 0 = padding), with padding on the left or the right;
- a `KVCache`, so that generating one more token costs one position, not the whole sequence;
- `return_logits=False` when training: the loss alone, computed only where it is read (the
  scored positions for the last layer and the LM head, the real tokens for the other MLPs), and
  a prefix that every row shares (the system line) computed once (`SharedPrefix`). That path
  has a file of its own, decoder_loss_only.py; `Decoder.forward` hands it the work.

With `minillava train --parts exercises` your chapter 4 functions run here instead of the
library's: rms_norm in every RMSNorm, apply_rotary on the queries and keys, swiglu in the MLPs
(minillava/parts.py says where, and when not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minillava import parts
from minillava.attention import attention, causal_mask
from minillava.decoder_loss_only import SharedPrefix, gather_positions, loss_only_forward

IGNORE_INDEX = -100  # labels equal to this are not predicted (prompt, image and padding tokens)


@dataclass
class DecoderConfig:
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads; fewer = grouped-query attention
    intermediate_size: int = 384  # SwiGLU hidden width
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True  # lm_head shares its weight with embed_tokens
    dropout: float = 0.0
    use_sdpa: bool = True  # False: the hand-written attention path
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory

    def __post_init__(self) -> None:
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"DecoderConfig: hidden_size={self.hidden_size} must be divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"DecoderConfig: num_heads={self.num_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (each key/value head serves a whole group)"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"DecoderConfig: head size {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class KVCache:
    """The keys and values every layer has computed so far, so they are never recomputed.

    When generating, token t attends to the keys and values of tokens 0..t. Those of 0..t-1 do
    not change (the model is causal), so we keep them: each step then only runs the model on the
    one new token. `keys[i]` and `values[i]` are (B, H_kv, T_cached, D) for layer i.

    The cache is *preallocated*: the first `update` of a layer allocates buffers of
    (B, H_kv, max_len, D), and every later step writes its new positions into the next free
    slots, in place. The simple alternative, `torch.cat([cached, new], dim=2)`, copies every
    cached key and value at every step (O(T) work and a fresh allocation per layer per token,
    O(T²) over a generation); here a step copies only its own new positions. Hugging Face's
    `StaticCache` works the same way, and inference servers likewise reserve KV memory ahead
    rather than reallocating it per token: fixed shapes, no allocator churn, and (on a GPU) steps
    that can be captured once and replayed. `length` tracks how much of the buffers is filled;
    attention reads only that part, `buffer[:, :, :length]`, a view that costs no copy.

    max_len (default 2048): the most positions the cache can hold (prompt + new tokens);
    `update` raises ValueError rather than run past it. The decoder makes its own cache of
    `max_seq_len` positions; `generate` passes one sized for the prompt and `max_new_tokens`.
    Writes are in place, so a cache is one sequence's history: it cannot be forked to continue
    the same prefix two ways (prefill twice instead).
    """

    def __init__(self, num_layers: int, max_len: int = 2048):
        if max_len < 1:
            raise ValueError(f"KVCache: max_len must be >= 1, got {max_len}")
        self.max_len = max_len
        # Per layer: the (B, H_kv, max_len, D) buffers, None until the layer's first update, and
        # how many positions of them are filled.
        self._key_buffers: list[torch.Tensor | None] = [None] * num_layers
        self._value_buffers: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers

    @property
    def length(self) -> int:
        """Number of positions cached (those of layer 0; all layers agree after a forward)."""
        return self._lengths[0]

    @property
    def keys(self) -> list[torch.Tensor | None]:
        """Per layer, the cached keys (B, H_kv, T_cached, D): views of the filled part."""
        return [self._filled(self._key_buffers, i) for i in range(len(self._lengths))]

    @property
    def values(self) -> list[torch.Tensor | None]:
        """Per layer, the cached values (B, H_kv, T_cached, D): views of the filled part."""
        return [self._filled(self._value_buffers, i) for i in range(len(self._lengths))]

    def _filled(self, buffers: list[torch.Tensor | None], i: int) -> torch.Tensor | None:
        return None if buffers[i] is None else buffers[i][:, :, : self._lengths[i]]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions' k, v (B, H_kv, T_new, D) after the cached ones; return all
        of them so far, (B, H_kv, T_cached + T_new, D), as views of the buffers."""
        start = self._lengths[layer_idx]
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(
                f"KVCache: capacity is max_len={self.max_len} positions, but layer {layer_idx} "
                f"would hold {end} ({start} cached + {k.shape[2]} new); make the cache with a "
                f"larger max_len"
            )
        if self._key_buffers[layer_idx] is None:  # first call: reserve the whole generation
            B, H_kv, _, D = k.shape
            self._key_buffers[layer_idx] = k.new_empty(B, H_kv, self.max_len, D)
            self._value_buffers[layer_idx] = v.new_empty(B, H_kv, self.max_len, D)
        keys, values = self._key_buffers[layer_idx], self._value_buffers[layer_idx]
        keys[:, :, start:end] = k  # in place: only the new positions are copied
        values[:, :, start:end] = v
        self._lengths[layer_idx] = end
        return keys[:, :, :end], values[:, :, :end]


@dataclass
class DecoderOutput:
    logits: torch.Tensor | None  # (B, T, V); None when return_logits=False
    loss: torch.Tensor | None  # mean next-token cross-entropy, when labels are given
    past_key_values: KVCache | None  # when use_cache=True
    hidden_states: torch.Tensor | None  # (B, T, C) after the final norm; None if loss only


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) * weight over the last dim: x (..., C), weight (C,) -> (..., C).

    Computed in float32 even under bf16 autocast, because squaring small numbers in low precision
    loses them.
    """
    x_float = x.float()
    normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) * weight: LayerNorm without the mean and the bias."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The library's rms_norm, or a learner's (parts.py).
        return parts.get("rms_norm", rms_norm)(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """cos and sin of the rotation angles `position * frequency`, one frequency per pair of dims.

    Frequencies go from 1 (fast: neighbouring tokens differ a lot) down to 1/theta (slow: tells
    far-apart tokens apart), as in sinusoidal position encodings.

    The angles depend only on the position, so the cos and sin of every position the model can
    see (0 .. max_positions - 1) are computed once, here, and each forward just looks its
    positions up in the table: a decoding step then costs one indexing op instead of
    recomputing angles, cos and sin for its one position (Hugging Face precomputes them too).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0, max_positions: int = 2048):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        angles = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq  # (P, D/2)
        # Hugging Face Llama pairs dim i with dim i + D/2 (not 2i with 2i+1), so each angle is
        # used twice: once for the first half of the dims and once for the second half.
        angles = torch.cat([angles, angles], dim=-1)  # (P, D)
        # Not learned weights and not saved: they are recomputed from the config.
        self.register_buffer("cos_table", angles.cos(), persistent=False)
        self.register_buffer("sin_table", angles.sin(), persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T), each < max_positions -> cos, sin, each (B, T, D)."""
        return self.cos_table[position_ids], self.sin_table[position_ids]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90° turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_i, x_{i+D/2}) of x (B, H, T, D) by its angle; cos, sin are (B, T, D).

    This is the 2-D rotation [[cos, -sin], [sin, cos]] applied to every pair at once.
    """
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, H * D) -> (B, H, T, D): einops' "b t (h d) -> b h t d", a view (no copy).

    Written with view ops rather than `einops.rearrange` because it runs three times per layer
    on every decoding step, where einops' own Python bookkeeping costs more than the view.
    """
    return x.unflatten(-1, (-1, head_dim)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H * D): "b h t d -> b t (h d)", the heads side by side again."""
    return x.transpose(1, 2).flatten(2)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D): each key/value head serves n_rep query heads.

    Query heads 0..n_rep-1 share kv head 0, the next n_rep share kv head 1, and so on.
    """
    if n_rep == 1:
        return x
    return x.repeat_interleave(n_rep, dim=1)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE and optional grouped-query heads."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of the KV cache is ours
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.use_sdpa = config.use_sdpa
        self.rope_theta = config.rope_theta
        C, D = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(C, self.num_heads * D, bias=False)
        self.k_proj = nn.Linear(C, self.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(C, self.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(self.num_heads * D, C, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | SharedPrefix | None = None,
        queries: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C); mask (B, 1, T, T_total) True where allowed, or None for plain causal
        (no padding, no cache) -> (B, T, C).

        queries (B, Q), optional: the only positions whose output is wanted, so the only ones
        that ask (every position is still a key and a value). The result is then (B, Q, C), and
        `mask` (B, 1, Q, T_total) must say what each of them may see (`query_attention_mask`).
        positions (B, T), optional: the positions cos and sin were looked up for. The library
        rotates with cos and sin; a learner's apply_rotary (parts.py) takes the positions.
        """
        pos_q = positions
        if queries is None:
            x_q, cos_q, sin_q = x, cos, sin
        elif mask is None:
            raise ValueError("Attention: `queries` needs a mask of shape (B, 1, Q, T_total)")
        else:  # the asking positions' inputs and rotation angles
            x_q, cos_q, sin_q = (gather_positions(t, queries) for t in (x, cos, sin))
            pos_q = None if positions is None else gather_positions(positions, queries)
        q = split_heads(self.q_proj(x_q), self.head_dim)  # (B, H, T, D)
        k = split_heads(self.k_proj(x), self.head_dim)  # (B, H_kv, T, D)
        v = split_heads(self.v_proj(x), self.head_dim)

        # Position enters only here: queries and keys are rotated, values are not.
        yours = parts.get("apply_rotary")  # a learner's RoPE, if chosen (parts.py)
        if yours is None or positions is None:
            q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos, sin)
        else:  # it computes the angles from the positions itself
            q, k = yours(q, pos_q, self.rope_theta), yours(k, positions, self.rope_theta)

        if cache is not None:
            # Cache the rotated keys and the *un-repeated* kv heads: that is what GQA saves.
            k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, T_total, D)

        n_rep = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, T_total, D)

        dropout_p = self.dropout if self.training else 0.0
        # No mask: plain causal attention, or one new query (a decoding step) that sees every key.
        is_causal = mask is None and q.shape[-2] > 1
        out = attention(
            q, k, v, mask=mask, dropout_p=dropout_p, use_sdpa=self.use_sdpa, is_causal=is_causal
        )
        return self.o_proj(merge_heads(out))  # (B, T, C)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The gate decides, per unit, how much of `up` passes."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        C, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(C, I, bias=False)
        self.up_proj = nn.Linear(C, I, bias=False)
        self.down_proj = nn.Linear(I, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        yours = parts.get("swiglu")  # a learner's, if chosen (parts.py)
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        if yours is not None and all(type(layer) is nn.Linear for layer in layers):
            # (Layers that LoRA wraps compute their own outputs: then the line below runs.)
            return yours(x, *(layer.weight for layer in layers))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self,
        x,
        cos,
        sin,
        mask,
        cache: KVCache | None = None,
        keep: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C); positions (B, T) as in `Attention.forward`.

        keep (B, T) bool, optional: the only positions whose output will be read (the real
        tokens, when training). Attention still runs at every position, but the MLP, which works
        on each token alone, runs only at `keep`. The other positions come out half-done
        (attention added, MLP skipped): fine for padding, which no real token ever attends to.
        """
        attended = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, cache, positions=positions
        )
        x = x + self.dropout(attended)
        if keep is None:
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        kept = x[keep]  # (N, C): the N positions to finish
        kept = kept + self.dropout(self.mlp(self.post_attention_layernorm(kept)))
        return x.index_put((keep,), kept)  # a copy of x with those N positions replaced

    def forward_at(
        self,
        x,
        cos,
        sin,
        mask,
        queries: torch.Tensor,
        cache: SharedPrefix | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer's output at some positions only: x (B, T, C), queries (B, Q) -> (B, Q, C).

        Every position of x is read (as a key and a value), but only the Q asking positions
        are computed; mask (B, 1, Q, T) from `query_attention_mask`. The last layer, when only
        the loss is wanted, needs nothing more: its other outputs would never be read
        (decoder_loss_only.py).
        """
        attended = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, cache, queries=queries, positions=positions
        )
        x = gather_positions(x, queries) + self.dropout(attended)  # (B, Q, C)
        return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))


class Decoder(nn.Module):
    """A LLaMA-style causal language model. See the module docstring for the picture."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_seq_len)
        self._init_weights()
        if config.tie_embeddings:
            # One matrix both reads tokens in and scores them out: fewer parameters, and a
            # token's input and output representations are learned together.
            self.lm_head.weight = self.embed_tokens.weight
        # The loss-only path computes a prefix that every row shares once (SharedPrefix, in
        # decoder_loss_only.py). Exact, so always on; False only to compare against (tests,
        # benchmarks).
        self.share_prefix = True

    def _init_weights(self) -> None:
        """GPT-2 init: every weight matrix N(0, 0.02), norms at 1. The two projections per layer
        that write into the residual stream get std 0.02 / sqrt(2 * num_layers): 2 * num_layers
        of them add up along the stream, and this keeps its variance from growing with depth."""
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.num_layers)
        for layer in self.layers:
            nn.init.normal_(layer.self_attn.o_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(layer.mlp.down_proj.weight, mean=0.0, std=residual_std)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> DecoderOutput:
        """Run the model on T new positions (after any already in `past_key_values`).

        input_ids (B, T) or inputs_embeds (B, T, C): exactly one.
        attention_mask (B, T_total): 1 = real token, 0 = padding; T_total = cached + T.
        position_ids (B, T): default counts real tokens only, so padding never shifts positions.
        labels (B, T): the token each position *is*; the model shifts them itself so position t
            is scored on predicting labels[t + 1] (Hugging Face convention). -100 = not scored.
        return_logits: False when only the loss is wanted (the training loop; needs labels, no
            cache): the same loss and gradients, for less work. The last layer and the LM head
            then run only at the scored positions (10-30% of them in instruction data, where
            prompts and images are not scored), the other layers' MLPs only at the real
            (non-padding) tokens, and leading positions that are the same in every row only
            once (`SharedPrefix`); `logits` and `hidden_states` are None. That path is
            `decoder_loss_only.loss_only_forward`.
        """
        x = self._embed(input_ids, inputs_embeds)  # (B, T, C)
        B, T, _ = x.shape
        cache = past_key_values
        if use_cache and cache is None:
            cache = KVCache(self.config.num_layers, max_len=self.config.max_seq_len)
        past_len = cache.length if cache is not None else 0
        self._check_inputs(B, T, past_len, attention_mask, labels, cache, return_logits)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, past_len, T, x.device)
        positions = position_ids.expand(B, T)  # (B, T): each token's position
        cos, sin = self.rotary(positions)  # (B, T, D) each
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)

        if labels is not None and not return_logits:  # training: the loss alone, for less work
            loss = loss_only_forward(
                self, x, cos, sin, labels, attention_mask, position_ids, build_attention_mask
            )
            return DecoderOutput(logits=None, loss=loss, past_key_values=None, hidden_states=None)

        mask = build_attention_mask(attention_mask, T, past_len + T, x.device)
        for layer in self.layers:
            x = self.run_layer(layer, x, cos, sin, mask, cache=cache, positions=positions)
        hidden_states = self.norm(x)  # (B, T, C)
        logits = self.lm_head(hidden_states) if return_logits else None  # (B, T, V)
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return DecoderOutput(
            logits=logits,
            loss=loss,
            past_key_values=cache if use_cache else None,
            hidden_states=hidden_states,
        )

    def run_layer(self, layer_fn, *args, cache=None, **kwargs) -> torch.Tensor:
        """layer_fn(*args, cache=cache, **kwargs): a layer, or its `forward_at`.

        With gradient checkpointing on (config) and the model training, only the layer's input
        is kept, and its insides are recomputed in backward: less memory for more compute. Not
        with a KV cache, though: it is written in place, and the recomputation would write it
        a second time.
        """
        if self.config.gradient_checkpointing and self.training and cache is None:
            return checkpoint(layer_fn, *args, cache=cache, **kwargs, use_reentrant=False)
        return layer_fn(*args, cache=cache, **kwargs)

    def _embed(self, input_ids, inputs_embeds) -> torch.Tensor:
        """input_ids (B, T) -> their embeddings (B, T, C); or inputs_embeds (B, T, C) as given."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "Decoder: pass exactly one of input_ids (B, T) or inputs_embeds (B, T, C)"
            )
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
            return self.embed_tokens(input_ids)
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must be (B, T, {self.config.hidden_size}), "
                f"got shape {tuple(inputs_embeds.shape)}"
            )
        return inputs_embeds

    def _check_inputs(self, B, T, past_len, attention_mask, labels, cache, return_logits) -> None:
        """Raise a clear ValueError where the arguments of `forward` do not fit together."""
        total_len = past_len + T
        if total_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {total_len} positions is longer than max_seq_len="
                f"{self.config.max_seq_len}"
            )
        if attention_mask is not None and attention_mask.shape != (B, total_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (B, T_total) = "
                f"({B}, {total_len}): cached ({past_len}) + new ({T}) positions"
            )
        if labels is not None and labels.shape != (B, T):
            raise ValueError(f"labels must be (B, T) = {(B, T)}, got {tuple(labels.shape)}")
        if not return_logits and labels is not None and cache is not None:
            raise ValueError("return_logits=False (the loss alone) cannot be used with a KV cache")

    def count_parameters(self, trainable_only: bool = False) -> int:
        """Parameter count (a tied embedding/head matrix is counted once): `count_parameters`."""
        return count_parameters(self, trainable_only)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalars in a module's parameters; only those that will receive gradients if
    trainable_only. A tensor shared by two modules (a tied embedding/head matrix) counts once:
    `parameters()` yields it once. Buffers (RoPE's cos/sin tables) are not parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def default_position_ids(
    attention_mask: torch.Tensor | None, past_len: int, T: int, device
) -> torch.Tensor:
    """Positions of the T new tokens: (B, T) from the mask, or (1, T) = past_len..past_len+T-1.

    With a mask, a token's position is the number of real tokens before it, so a left-padded
    prompt gets positions 0, 1, 2, ... on its real tokens, exactly as if it were alone.
    """
    if attention_mask is None:
        return torch.arange(past_len, past_len + T, device=device)[None]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T_total)
    return positions[:, past_len:]


def build_attention_mask(
    attention_mask: torch.Tensor | None, T: int, total_len: int, device
) -> torch.Tensor | None:
    """Boolean (B or 1, 1, T, T_total), True where query t may look at key s.

    Causal: the new queries are the last T of T_total positions, so query t sees keys up to
    past_len + t. Padding: no query looks at a padding key. Each query may always look at itself,
    so even a padding query has one key left (a row with no key at all gives softmax NaN); the
    outputs at padding positions are meaningless and never scored.

    Returns None when no mask is needed, so none has to be built or read:
    - no cache, and no padding or only padding on the right (training batches): plain causal
      attention gives the same outputs at every real position. A real token never looks right
      of itself, so it never sees the padding; only the padding positions' own (unused) outputs
      change. Attention then runs with `is_causal=True`, which also lets SDPA pick
      FlashAttention on a GPU;
    - one new position and no padding (a decoding step with the cache): it may see every key.
    """
    if T == total_len and (attention_mask is None or is_right_padded(attention_mask)):
        return None
    if T == 1 and (attention_mask is None or bool(attention_mask.all())):
        return None
    allowed = causal_mask(T, total_len, device=device)[None, None]  # (1, 1, T, T_total)
    if attention_mask is None:
        return allowed
    is_real_key = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T_total)
    own_key = torch.arange(total_len - T, total_len, device=device)[:, None]  # (T, 1)
    itself = own_key == torch.arange(total_len, device=device)  # (T, T_total): key = the query
    return allowed & (is_real_key | itself)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True if every row of the (B, T) mask is ones then zeros (1 1 1 0 0): no 1 after a 0."""
    real = attention_mask.bool()
    return not bool((real[:, 1:] & ~real[:, :-1]).any())


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits at position t are scored against labels[t + 1].

    Positions whose next label is -100 (prompt, image, padding) do not count; the mean is over
    the tokens that do.
    """
    if labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels must be (B, T) = {tuple(logits.shape[:2])}, got {tuple(labels.shape)}"
        )
    predictions = logits[:, :-1].float()  # (B, T-1, V), float32 for a stable log-softmax
    targets = labels[:, 1:]  # (B, T-1)
    return F.cross_entropy(
        predictions.reshape(-1, predictions.size(-1)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
