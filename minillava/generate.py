"""Text generation: pick a next token, append it, repeat.

Two pieces:

- `sample_next_token` turns the last position's logits into one token per row: greedy
  (temperature 0), or a draw from the softmax after optional temperature, top-k and top-p
  (nucleus) filtering.
- `generate` runs the loop. It first feeds the whole prompt (the *prefill*), then one token at a
  time. With `use_cache=True` the decoder keeps every layer's keys and values (`KVCache`), so a
  step runs the model on one position; with `use_cache=False` it re-runs the whole sequence each
  step: same tokens, quadratically more work (bench/ measures the gap).

Prompts in a batch have different lengths, so they are padded on the *left*: then every row's
last position is its last real token, and the new tokens line up in one column per step.
The decoder's default position ids count only real tokens, so padding does not shift positions.

Both the text-only `Decoder` and `Llava` (which prefills with image features spliced into the
embeddings) use this same loop.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minillava.decoder import Decoder, KVCache


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Choose one token per row from logits (B, V) -> LongTensor (B,).

    temperature 0: argmax (greedy, deterministic). Otherwise the logits are divided by the
    temperature (below 1 sharpens the distribution, above 1 flattens it), then
    - top_k keeps only the k most likely tokens,
    - top_p keeps the smallest set of most likely tokens whose probabilities add up to >= top_p,
    and one token is drawn from what is left (renormalised).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)

    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        logits = keep_top_k(logits, min(top_k, logits.size(-1)))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        logits = keep_top_p(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit outside each row's k largest to -inf (exactly k survive, even on ties)."""
    top_values, top_indices = logits.topk(k, dim=-1)
    filtered = torch.full_like(logits, float("-inf"))
    return filtered.scatter(-1, top_indices, top_values)


def keep_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their probability mass reaches p."""
    sorted_logits, sorted_indices = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Mass of the tokens strictly more likely than each one. A token is kept while that mass is
    # still below p; the most likely token (mass before it = 0) is therefore always kept.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    # Undo the sort: put each filtered logit back at its token's index.
    return torch.empty_like(logits).scatter(-1, sorted_indices, sorted_logits)


@torch.no_grad()
def generate(
    decoder: Decoder,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Sequence[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    pad_token_id: int = 0,
) -> torch.Tensor:
    """Continue left-padded prompts; return only the new tokens, (B, n_new), n_new <= max.

    input_ids (B, T) or inputs_embeds (B, T, C) is the prompt; attention_mask (B, T) marks its
    real tokens (1) and left padding (0). A row stops after producing any of `stop_token_ids`
    (the stop token is kept); after that it is filled with `pad_token_id`. The loop ends early
    when every row has stopped.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(
            "generate: pass exactly one of input_ids (B, T) or inputs_embeds (B, T, C)"
        )
    prompt = input_ids if input_ids is not None else inputs_embeds
    B, T = prompt.shape[:2]
    device = prompt.device
    if attention_mask is not None:
        if attention_mask.shape != (B, T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({B}, {T})"
            )
        if not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "generate needs left-padded prompts: attention_mask[:, -1] must be 1 in every "
                "row (pad on the left so that each row's last position is its last real token)"
            )
        # Without padding the mask says nothing the decoder does not assume anyway (every key
        # is real, positions count 0, 1, 2, ...): drop it, so that no step extends, counts or
        # checks it. On one-token steps that bookkeeping is a sizeable share of the work.
        if bool(attention_mask.all()):
            attention_mask = None

    was_training = decoder.training
    decoder.eval()  # no dropout while generating
    stop_ids = torch.tensor(list(stop_token_ids), dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)

    # Prefill: run the whole prompt once (and fill the cache). The cache reserves room for the
    # prompt and every new token now, so that no step has to grow it (see `KVCache`).
    capacity = min(T + max_new_tokens, decoder.config.max_seq_len)
    out = decoder(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        past_key_values=KVCache(decoder.config.num_layers, max_len=capacity) if use_cache else None,
        use_cache=use_cache,
    )
    for step in range(max_new_tokens):
        next_token = sample_next_token(out.logits[:, -1], **sampling)  # (B,)
        # Rows already done get padding in the output (the model still sees the sampled token,
        # which is always a valid id, whatever pad_token_id is; its output is ignored).
        new_tokens.append(next_token.masked_fill(finished, pad_token_id))
        finished |= torch.isin(next_token, stop_ids)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break

        if attention_mask is not None:  # the new token is real: extend the mask by a column
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
        if use_cache:
            # Only the new position goes through the model; earlier keys/values are cached.
            out = decoder(
                input_ids=next_token[:, None],
                attention_mask=attention_mask,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        elif input_ids is not None:
            # No cache: run the whole sequence again, prompt and all tokens so far.
            input_ids = torch.cat([input_ids, next_token[:, None]], dim=1)
            out = decoder(input_ids=input_ids, attention_mask=attention_mask)
        else:
            next_embeds = decoder.embed_tokens(next_token[:, None])  # (B, 1, C)
            inputs_embeds = torch.cat([inputs_embeds, next_embeds.to(inputs_embeds.dtype)], dim=1)
            out = decoder(inputs_embeds=inputs_embeds, attention_mask=attention_mask)

    decoder.train(was_training)
    if not new_tokens:
        return torch.empty(B, 0, dtype=torch.long, device=device)
    return torch.stack(new_tokens, dim=1)  # (B, n_new)
