"""minillava.generate: the sampler's filters, and the generation loop with and without KV cache."""

import pytest
import torch
import torch.nn as nn

from minillava.decoder import Decoder, DecoderConfig
from minillava.generate import generate, keep_top_k, keep_top_p, sample_next_token

V = 37


def lively_decoder(seed=0, **overrides) -> Decoder:
    """A tiny random decoder with large weights, so greedy decoding does not repeat one token."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48)
    kw.update(overrides)
    model = Decoder(DecoderConfig(**kw)).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, 0.3)
    return model


def left_padded_prompts(lengths=(3, 6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    input_ids = torch.zeros(len(lengths), T, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        input_ids[i, T - n :] = torch.randint(1, V, (n,), generator=g)
        attention_mask[i, T - n :] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# sample_next_token
# ---------------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = torch.randn(5, V)
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))
    # top_k=1 and a tiny top_p also leave only the argmax.
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits, top_k=1, generator=g), logits.argmax(-1))
    assert torch.equal(sample_next_token(logits, top_p=1e-6, generator=g), logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_top_k_never_samples_outside_the_k_best(temperature):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(1))
    allowed = logits.topk(5, dim=-1).indices  # (4, 5)
    g = torch.Generator().manual_seed(2)
    draws = 300  # all at once: the 4 rows repeated 300 times
    tokens = sample_next_token(
        logits.repeat(draws, 1), temperature=temperature, top_k=5, generator=g
    ).view(draws, 4)
    assert (allowed[None] == tokens[..., None]).any(-1).all()
    # And every one of the k tokens does get drawn (300 draws; a miss is very unlikely).
    if temperature >= 1.0:
        for row in range(4):
            assert set(tokens[:, row].tolist()) == set(allowed[row].tolist())


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_never_samples_outside_the_nucleus(top_p):
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3)) * 2
    probs = logits.softmax(-1)
    # The nucleus, by hand: most likely tokens first, until their mass reaches top_p.
    allowed = []
    for row in probs:
        order = row.argsort(descending=True).tolist()
        kept, mass = [], 0.0
        for token in order:
            kept.append(token)
            mass += row[token].item()
            if mass >= top_p:
                break
        allowed.append(set(kept))
    g = torch.Generator().manual_seed(4)
    draws = 400
    tokens = sample_next_token(logits.repeat(draws, 1), top_p=top_p, generator=g).view(draws, 4)
    seen = [set(tokens[:, i].tolist()) for i in range(4)]
    for i in range(4):
        assert seen[i] <= allowed[i], f"row {i}: {seen[i] - allowed[i]} outside the nucleus"
    # And it samples the whole nucleus, not just its top token.
    assert seen == allowed


def test_top_k_and_top_p_together():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(5))
    top3 = logits.topk(3, dim=-1).indices
    g = torch.Generator().manual_seed(6)
    tokens = sample_next_token(logits.repeat(200, 1), top_k=3, top_p=0.95, generator=g)
    assert (top3.repeat(200, 1) == tokens[:, None]).any(-1).all()


def test_filters_keep_exactly_what_they_should():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    assert torch.isfinite(keep_top_k(logits, 2)).sum() == 2  # exactly k, even with a tie
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = torch.isfinite(keep_top_p(probs.log(), 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(keep_top_p(probs.log(), 0.81))
    assert kept.tolist() == [[True, True, True, False]]


def test_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(7)
    draws = sample_next_token(logits.expand(4000, 4), generator=g)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(freq, logits.softmax(-1)[0], atol=0.03, rtol=0)


def test_sampler_rejects_bad_arguments():
    logits = torch.randn(2, V)
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        sample_next_token(logits, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(logits, top_p=1.5)
    with pytest.raises(ValueError, match="logits"):
        sample_next_token(torch.randn(V))


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


def test_greedy_generation_is_the_argmax_continuation():
    model = lively_decoder()
    prompt = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(0))
    new = generate(model, prompt, max_new_tokens=6)
    assert new.shape == (1, 6) and new.dtype == torch.long
    seq = prompt
    for t in range(6):  # by hand: run the whole sequence, take the argmax, append
        token = model(seq).logits[:, -1].argmax(-1)
        assert token.item() == new[0, t].item()
        seq = torch.cat([seq, token[:, None]], dim=1)
    assert len(set(new[0].tolist())) > 1, "test model too dull: greedy repeats one token"


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_cached_greedy_equals_uncached(num_kv_heads):
    model = lively_decoder(num_kv_heads=num_kv_heads)
    input_ids, mask = left_padded_prompts()
    cached = generate(model, input_ids, attention_mask=mask, max_new_tokens=12)
    uncached = generate(model, input_ids, attention_mask=mask, max_new_tokens=12, use_cache=False)
    assert torch.equal(cached, uncached)


def test_cached_generation_fills_the_whole_context():
    """The preallocated cache is sized for the prompt and the new tokens, capped at max_seq_len:
    a generation that feeds exactly max_seq_len positions fits, and equals the uncached one."""
    model = lively_decoder(max_seq_len=24)
    input_ids, mask = left_padded_prompts(lengths=(4, 7))
    n_new = 24 - 7 + 1  # the last new token is sampled, never fed back
    cached = generate(model, input_ids, attention_mask=mask, max_new_tokens=n_new)
    uncached = generate(
        model, input_ids, attention_mask=mask, max_new_tokens=n_new, use_cache=False
    )
    assert cached.shape == (2, n_new) and torch.equal(cached, uncached)
    with pytest.raises(ValueError, match="max_seq_len=24"):  # one more is the decoder's limit
        generate(model, input_ids, attention_mask=mask, max_new_tokens=n_new + 1)


def test_cached_sampling_equals_uncached_with_same_generator():
    model = lively_decoder()
    input_ids, mask = left_padded_prompts()
    runs = []
    for use_cache in (True, False):
        g = torch.Generator().manual_seed(123)
        runs.append(
            generate(
                model,
                input_ids,
                attention_mask=mask,
                max_new_tokens=12,
                temperature=1.0,
                top_k=10,
                top_p=0.9,
                use_cache=use_cache,
                generator=g,
            )
        )
    assert torch.equal(runs[0], runs[1])


def test_inputs_embeds_prompt_equals_input_ids_prompt():
    model = lively_decoder()
    input_ids, mask = left_padded_prompts()
    expected = generate(model, input_ids, attention_mask=mask, max_new_tokens=8)
    embeds = model.embed_tokens(input_ids).detach()
    for use_cache in (True, False):
        got = generate(
            model, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=8, use_cache=use_cache
        )
        assert torch.equal(got, expected)


def test_batched_left_padded_generation_equals_each_prompt_alone():
    model = lively_decoder()
    input_ids, mask = left_padded_prompts()
    batched = generate(model, input_ids, attention_mask=mask, max_new_tokens=10)
    for i in range(len(input_ids)):
        alone = generate(model, input_ids[i : i + 1, mask[i].bool()], max_new_tokens=10)
        assert torch.equal(batched[i], alone[0])


def test_stop_tokens_end_rows_and_pad_after():
    model = lively_decoder()
    input_ids, mask = left_padded_prompts()
    free = generate(model, input_ids, attention_mask=mask, max_new_tokens=10)
    stop = free[0, 3].item()  # row 0 produces this token at step 3 (perhaps earlier too)
    stopped = generate(
        model,
        input_ids,
        attention_mask=mask,
        max_new_tokens=10,
        stop_token_ids=[stop],
        pad_token_id=-1,
    )
    for row_free, row in zip(free, stopped, strict=True):
        hits = (row_free == stop).nonzero()
        if len(hits) == 0:  # never stops: identical to free generation
            assert torch.equal(row, row_free[: len(row)])
            continue
        end = hits[0].item()
        assert torch.equal(row[: end + 1], row_free[: end + 1])  # stop token kept
        assert (row[end + 1 :] == -1).all()  # padding after it
    # Every row stopped: the loop ends early, with fewer than max_new_tokens columns.
    all_stop = generate(
        model, input_ids, attention_mask=mask, max_new_tokens=10, stop_token_ids=range(V)
    )
    assert all_stop.shape == (3, 1)


def test_generate_rejects_right_padding_and_restores_training_mode():
    model = lively_decoder().train()
    input_ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, input_ids, attention_mask=mask.flip(-1))
    generate(model, input_ids, attention_mask=mask, max_new_tokens=2)
    assert model.training
    assert generate(model, input_ids, attention_mask=mask, max_new_tokens=0).shape == (3, 0)
