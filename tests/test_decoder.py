"""minillava.decoder: shapes, causality, padding, KV cache, GQA, RoPE, loss, init, checkpointing;
and minillava.decoder_loss_only, the training path that computes the loss alone."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import loss_and_grads

from minillava import decoder as decoder_module
from minillava.decoder import (
    Decoder,
    DecoderConfig,
    KVCache,
    RMSNorm,
    apply_rotary,
    build_attention_mask,
    causal_lm_loss,
)
from minillava.decoder_loss_only import (
    positions_where,
    query_attention_mask,
    shared_prefix_length,
)

V = 61


def tiny(**overrides) -> DecoderConfig:
    kw = dict(
        vocab_size=V,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=48,
        max_seq_len=64,
    )
    kw.update(overrides)
    return DecoderConfig(**kw)


def make(seed=0, **overrides) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(tiny(**overrides)).eval()


def ids(B=2, T=9, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_shapes_and_dtypes():
    model = make()
    x = ids()
    out = model(x, labels=x)
    assert out.logits.shape == (2, 9, V) and out.logits.dtype == torch.float32
    assert out.hidden_states.shape == (2, 9, 32)
    assert out.loss.shape == () and out.loss.dtype == torch.float32
    assert out.past_key_values is None
    # A freshly initialised model is close to uniform: loss near log(V).
    assert abs(out.loss.item() - math.log(V)) < 0.5


def test_inputs_embeds_equals_input_ids():
    model = make()
    x = ids()
    a = model(input_ids=x).logits
    b = model(inputs_embeds=model.embed_tokens(x)).logits
    torch.testing.assert_close(a, b)


def test_bad_inputs_raise_clear_errors():
    model = make()
    x = ids()
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="exactly one"):
        model(input_ids=x, inputs_embeds=model.embed_tokens(x))
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(ids(T=65))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderConfig(num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_causality(use_sdpa):
    model = make(use_sdpa=use_sdpa)
    x = ids(B=1, T=10)
    j = 6
    changed = x.clone()
    changed[0, j] = (x[0, j] + 1) % V
    a, b = model(x).logits, model(changed).logits
    torch.testing.assert_close(a[:, :j], b[:, :j], atol=0, rtol=0)  # the past never sees j
    assert (a[:, j:] - b[:, j:]).abs().amax(-1).min() > 1e-6  # j and later positions do


@pytest.mark.parametrize("use_sdpa", [False, True])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_invariance(side, use_sdpa):
    model = make(use_sdpa=use_sdpa)
    lengths = [4, 9, 6]
    T = max(lengths)
    rows = [ids(B=1, T=n, seed=i)[0] for i, n in enumerate(lengths)]
    batch = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        batch[i, span], mask[i, span] = row, 1
    out = model(batch, attention_mask=mask).logits
    for i, row in enumerate(rows):
        alone = model(row[None]).logits[0]
        padded = out[i][mask[i].bool()]
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_left_padding_gradients_are_finite():
    model = make().train()
    x = ids(T=6)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    labels = x.masked_fill(mask == 0, -100)
    model(x, attention_mask=mask, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_kv_cache_matches_full_forward(num_kv_heads):
    model = make(num_kv_heads=num_kv_heads)
    x = ids(T=10)
    full = model(x).logits
    # Prefill 4 positions, then 3 at once, then one at a time.
    out = model(x[:, :4], use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, KVCache) and cache.length == 4
    # The cache holds only the kv heads: that is the memory GQA saves.
    assert cache.keys[0].shape == (2, num_kv_heads, 4, 32 // 4)
    pieces = [out.logits]
    out = model(x[:, 4:7], past_key_values=cache, use_cache=True)
    pieces.append(out.logits)
    for t in range(7, 10):
        out = model(x[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        pieces.append(out.logits)
    assert out.past_key_values.length == 10
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


def test_preallocated_kv_cache_grows_in_place_over_steps():
    """The buffers are allocated once; each update writes the next slots and returns the
    filled part, exactly what concatenating would have given."""
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 2, 7, 4).unbind(0)  # (B, H_kv, T, D) each
    cache = KVCache(num_layers=2, max_len=7)
    assert cache.length == 0 and cache.keys == [None, None]
    buffer = None
    for start, end in [(0, 3), (3, 4), (4, 5), (5, 7)]:  # a prefill of 3, then steps
        for layer in range(2):
            got_k, got_v = cache.update(layer, k[:, :, start:end], v[:, :, start:end])
            assert torch.equal(got_k, k[:, :, :end]) and torch.equal(got_v, v[:, :, :end])
        assert cache.length == end
        assert cache.keys[1].shape == (3, 2, end, 4) and torch.equal(cache.values[1], v[:, :, :end])
        # The same storage every step: nothing is reallocated or copied as the cache grows.
        assert buffer is None or got_k.data_ptr() == buffer
        buffer = got_k.data_ptr()


def test_kv_cache_refuses_to_overflow_its_capacity():
    cache = KVCache(num_layers=1, max_len=5)
    cache.update(0, torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))
    with pytest.raises(ValueError, match=r"max_len=5 .* would hold 6 \(4 cached \+ 2 new\)"):
        cache.update(0, torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    assert cache.length == 4  # the failed update changed nothing
    with pytest.raises(ValueError, match="max_len must be >= 1"):
        KVCache(num_layers=1, max_len=0)


def test_decoder_cache_holds_max_seq_len_positions():
    model = make()
    cache = model(ids(T=3), use_cache=True).past_key_values
    assert cache.max_len == model.config.max_seq_len


def test_rope_table_equals_angles_computed_on_the_fly():
    model = make()
    D = model.config.head_dim
    positions = torch.tensor([[0, 1, 5, 63], [2, 2, 7, 40]])
    inv_freq = 1.0 / (model.config.rope_theta ** (torch.arange(0, D, 2).float() / D))
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, D)
    cos, sin = model.rotary(positions)
    assert cos.shape == sin.shape == (2, 4, D)
    torch.testing.assert_close(cos, angles.cos(), atol=0, rtol=0)
    torch.testing.assert_close(sin, angles.sin(), atol=0, rtol=0)


def test_kv_cache_with_left_padding():
    model = make()
    x = ids(T=8)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [1] * 8])
    full = model(x, attention_mask=mask).logits
    out = model(x[:, :5], attention_mask=mask[:, :5], use_cache=True)
    step = model(x[:, 5:], attention_mask=mask, past_key_values=out.past_key_values, use_cache=True)
    real = mask.bool()
    got = torch.cat([out.logits, step.logits], dim=1)
    torch.testing.assert_close(got[real], full[real], atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_mha_with_shared_heads():
    """GQA with 2 kv heads for 4 query heads is MHA whose k/v heads come in identical pairs."""
    gqa = make(num_kv_heads=2)
    mha = make(num_kv_heads=4)
    # Same weights everywhere; k_proj/v_proj have different shapes and are copied below.
    shared = {n: w for n, w in gqa.state_dict().items() if "k_proj" not in n and "v_proj" not in n}
    mha.load_state_dict(shared, strict=False)
    D = 8
    with torch.no_grad():
        for lg, lm in zip(gqa.layers, mha.layers, strict=True):
            for name in ("k_proj", "v_proj"):
                w = getattr(lg.self_attn, name).weight  # (2 * D, C): kv head 0 rows, head 1 rows
                heads = w.view(2, D, -1)
                repeated = heads.repeat_interleave(2, dim=0).reshape(4 * D, -1)  # 0, 0, 1, 1
                getattr(lm.self_attn, name).weight.copy_(repeated)
    assert sum(p.numel() for p in gqa.parameters()) < sum(p.numel() for p in mha.parameters())
    x = ids()
    torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-5, rtol=1e-5)


def test_sdpa_and_manual_paths_agree():
    a = make(use_sdpa=True)
    b = make(use_sdpa=False)
    b.load_state_dict(a.state_dict())
    x = ids()
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9])
    torch.testing.assert_close(
        a(x, attention_mask=mask).logits, b(x, attention_mask=mask).logits, atol=1e-5, rtol=1e-5
    )


def test_rope_scores_depend_only_on_relative_position():
    model = make()
    D = model.config.head_dim
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def score(m, n):
        cos_m, sin_m = model.rotary(torch.tensor([[m]]))
        cos_n, sin_n = model.rotary(torch.tensor([[n]]))
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score(0, 0), (q * k).sum(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3))
    # A rotation keeps lengths.
    cos, sin = model.rotary(torch.tensor([[7]]))
    torch.testing.assert_close(apply_rotary(q, cos, sin).norm(), q.norm())


def test_rmsnorm():
    norm = RMSNorm(6, eps=0.0)
    x = torch.randn(3, 6) * 5
    y = norm(x)
    torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(3))
    torch.testing.assert_close(norm(x * 10), y)  # scale-invariant


def test_loss_is_shifted_and_ignores_minus_100():
    model = make()
    x = ids()
    labels = x.clone()
    labels[0, :4] = -100
    labels[1, 7] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, V)
    targets = labels[:, 1:].reshape(-1)
    keep = targets != -100
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(out.loss, expected)
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(out.logits, labels[:, :3])


def test_tied_and_untied_heads():
    tied = make(tie_embeddings=True)
    untied = make(tie_embeddings=False)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert untied.lm_head.weight is not untied.embed_tokens.weight
    assert untied.count_parameters() - tied.count_parameters() == V * 32


def test_gpt2_style_init():
    model = make(hidden_size=128, num_layers=8, num_heads=4, intermediate_size=384)
    std_q = model.layers[0].self_attn.q_proj.weight.std().item()
    std_o = torch.cat([layer.self_attn.o_proj.weight.flatten() for layer in model.layers]).std()
    assert abs(std_q - 0.02) < 0.002
    assert abs(std_o.item() - 0.02 / math.sqrt(16)) < 0.001
    assert (model.norm.weight == 1).all()


def test_gradient_checkpointing_gives_same_gradients():
    x = ids()
    grads = []
    for ckpt in (False, True):
        model = make(gradient_checkpointing=ckpt).train()
        model(x, labels=x).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_dropout_only_in_training():
    model = make(dropout=0.5)
    x = ids()
    torch.testing.assert_close(model(x).logits, model(x).logits)
    model.train()
    assert not torch.allclose(model(x).logits, model(x).logits)


# ---------------------------------------------------------------------------------------------
# Training shortcuts: the same loss and gradients for less work
# ---------------------------------------------------------------------------------------------


def padded_batch(side="right"):
    """Three rows of lengths 9, 5, 7 padded on `side`; labels as collate makes them: -100 on
    padding and on a 'prompt', the whole of row 1 ignored (a row with no answer)."""
    x = ids(B=3, T=9, seed=3)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate([9, 5, 7]):
        mask[row, slice(9 - n, 9) if side == "left" else slice(0, n)] = 1
    labels = x.masked_fill(mask == 0, -100)
    labels[0, :4] = -100  # a prompt
    labels[1] = -100  # nothing to learn in this row
    labels[2, 2:4] = -100
    return x, mask, labels


@pytest.mark.parametrize("side", ["right", "left", None])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_only_equals_the_full_logits_loss_and_gradients(side, checkpointing):
    model = make(num_kv_heads=2, gradient_checkpointing=checkpointing).train()
    x, mask, labels = padded_batch(side or "right")
    mask = None if side is None else mask
    full, full_grads = loss_and_grads(model, input_ids=x, attention_mask=mask, labels=labels)
    cheap, cheap_grads = loss_and_grads(
        model, input_ids=x, attention_mask=mask, labels=labels, return_logits=False
    )
    assert full.logits.shape == (3, 9, V)
    assert cheap.logits is None and cheap.hidden_states is None
    torch.testing.assert_close(cheap.loss, full.loss, atol=1e-6, rtol=0)
    every_weight = dict(model.named_parameters()).keys()
    assert full_grads.keys() == cheap_grads.keys() == every_weight  # all get a gradient
    for name, grad in full_grads.items():
        torch.testing.assert_close(cheap_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_loss_only_computes_the_last_layer_and_head_at_the_scored_positions_only():
    model = make().train()
    x, mask, labels = padded_batch()
    rows_seen = {}

    def count(name):
        def hook(module, args, output):
            rows_seen[name] = output.shape[:-1].numel()

        return hook

    model.lm_head.register_forward_hook(count("lm_head"))
    model.layers[-1].mlp.register_forward_hook(count("last mlp"))
    model.layers[0].mlp.register_forward_hook(count("first mlp"))
    model(x, attention_mask=mask, labels=labels, return_logits=False).loss.backward()
    n_scored = int((labels[:, 1:] != -100).sum())
    assert rows_seen["lm_head"] == n_scored  # not 3 * 9 positions
    assert rows_seen["first mlp"] == int(mask.sum())  # the real tokens, not the padding
    # The last layer runs on each row's scored positions, padded to the longest such row.
    assert rows_seen["last mlp"] == 3 * int((labels[:, 1:] != -100).sum(-1).max())


def test_loss_only_with_nothing_to_score_is_nan_like_the_full_loss():
    model = make()
    x = ids()
    labels = torch.full_like(x, -100)
    assert model(x, labels=labels).loss.isnan()
    assert model(x, labels=labels, return_logits=False).loss.isnan()


def test_loss_only_needs_no_cache_and_checks_labels():
    model = make()
    x = ids()
    cache = model(x[:, :4], use_cache=True).past_key_values
    with pytest.raises(ValueError, match="cache"):
        model(x[:, 4:], past_key_values=cache, labels=x[:, 4:], return_logits=False)
    with pytest.raises(ValueError, match="labels"):
        model(x, labels=x[:, :3], return_logits=False)


def prefixed_batch(n=4, side="right"):
    """padded_batch whose rows all start with the same n tokens (a system line), none scored."""
    x, mask, labels = padded_batch(side)
    x[:, :n] = ids(B=1, T=n, seed=9)
    labels[:, : n + 1] = -100  # position n - 1 predicts token n: unscored as well
    return x, mask, labels


def shared_length(model, x, mask, labels, position_ids=None):
    queries, valid = positions_where(F.pad(labels[:, 1:], (0, 1), value=-100) != -100)
    return shared_prefix_length(model, model.embed_tokens(x), mask, position_ids, valid, queries)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_a_shared_prefix_computed_once_gives_the_same_loss_and_gradients(masked, kv_heads):
    model = make(num_kv_heads=kv_heads).train()
    x, mask, labels = prefixed_batch(n=4)
    mask = mask if masked else None
    assert shared_length(model, x, mask, labels) == 4
    results = []
    for share in (False, True):
        model.share_prefix = share
        inputs = dict(input_ids=x, attention_mask=mask, labels=labels, return_logits=False)
        results.append(loss_and_grads(model, **inputs))
    (full, full_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared.loss, full.loss, atol=1e-6, rtol=0)
    every_weight = dict(model.named_parameters()).keys()
    assert full_grads.keys() == shared_grads.keys() == every_weight  # all get a gradient
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_shared_prefix_runs_once_then_the_rest_of_each_row():
    model = make().train()
    x, mask, labels = prefixed_batch(n=4)
    rows_seen = []
    model.layers[0].mlp.register_forward_hook(
        lambda module, args, out: rows_seen.append(out.shape[:-1].numel())
    )
    model(x, attention_mask=mask, labels=labels, return_logits=False).loss.backward()
    assert rows_seen == [4, int(mask.sum()) - 3 * 4]  # the prefix once, then the real rest


def test_shared_prefix_length_stops_where_rows_differ_or_may_not_share():
    model = make()
    x, mask, labels = prefixed_batch(n=4)
    assert shared_length(model, x, mask, labels) == 4  # the rows differ at position 4
    scored = labels.clone()
    scored[0, 3] = x[0, 3]  # position 2 is scored in row 0: it needs that row's own output
    assert shared_length(model, x, mask, scored) == 2
    short = mask.clone()
    short[1, 2:] = 0  # a row whose padding starts inside the prefix
    assert shared_length(model, x, short, labels) == 2
    positions = torch.arange(9).repeat(3, 1)
    positions[2] += 1  # row 2 at other positions: its rotations differ
    assert shared_length(model, x, mask, labels, positions) == 0
    assert shared_length(model, x[:1], mask[:1], labels[:1]) == 0  # one row: nothing to share
    model.share_prefix = False
    assert shared_length(model, x, mask, labels) == 0
    for overrides in ({"dropout": 0.1}, {"gradient_checkpointing": True}):
        other = make(**overrides)
        assert shared_length(other, x, mask, labels) == 4  # in eval mode they change nothing
        assert shared_length(other.train(), x, mask, labels) == 0


def test_positions_where_lists_each_rows_positions_in_order():
    keep = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0]]).bool()
    positions, valid = positions_where(keep)
    assert valid.tolist() == [[True, True], [True, False], [False, False]]
    assert positions[valid].tolist() == [1, 3, 0]
    positions, valid = positions_where(torch.zeros(2, 5, dtype=torch.bool))
    assert positions.shape == valid.shape == (2, 1) and not valid.any()  # never empty


def test_query_attention_mask_is_the_causal_padding_mask_at_those_rows():
    x, mask, _ = padded_batch("left")
    queries = torch.tensor([[8, 2], [8, 6], [5, 0]])  # (B, Q): some real, some padding
    full = build_attention_mask(mask, 9, 9, None)  # (B, 1, T, T)
    expected = torch.stack([full[b, 0, queries[b]] for b in range(3)])[:, None]
    assert torch.equal(query_attention_mask(queries, mask, 9), expected)


def test_last_layer_at_some_positions_equals_the_full_layer_there():
    model = make()
    layer = model.layers[-1]
    x = torch.randn(3, 9, 32)
    _, mask, _ = padded_batch("left")
    cos, sin = model.rotary(decoder_module.default_position_ids(mask, 0, 9, None))
    full = layer(x, cos, sin, build_attention_mask(mask, 9, 9, None))
    queries = torch.tensor([[8, 3], [8, 6], [4, 7]])
    part = layer.forward_at(x, cos, sin, query_attention_mask(queries, mask, 9), queries)
    expected = torch.stack([full[b, queries[b]] for b in range(3)])
    torch.testing.assert_close(part, expected, atol=1e-6, rtol=1e-5)


def test_right_padding_needs_no_mask_and_left_padding_keeps_it():
    _, right, _ = padded_batch("right")
    _, left, _ = padded_batch("left")
    assert build_attention_mask(right, 9, 9, None) is None  # plain causal attention
    assert build_attention_mask(torch.ones(3, 9), 9, 9, None) is None
    assert build_attention_mask(left, 9, 9, None).shape == (3, 1, 9, 9)
    holes = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1, 1]])  # a 0 between real tokens
    assert build_attention_mask(holes, 9, 9, None) is not None
    # With a cache: a single new token and no padding sees every key, so no mask either; with
    # left padding, or several new tokens, the mask is needed.
    assert build_attention_mask(torch.ones(3, 10), 1, 10, None) is None
    assert build_attention_mask(F.pad(left, (0, 1), value=1), 1, 10, None).shape == (3, 1, 1, 10)
    assert build_attention_mask(torch.ones(3, 10), 2, 10, None).shape == (3, 1, 2, 10)


@pytest.mark.parametrize("use_sdpa", [False, True])
def test_right_padding_shortcut_gives_the_masked_outputs_at_real_positions(use_sdpa, monkeypatch):
    model = make(use_sdpa=use_sdpa)
    x, mask, _ = padded_batch("right")
    fast = model(x, attention_mask=mask).logits
    monkeypatch.setattr(decoder_module, "is_right_padded", lambda attention_mask: False)
    masked = model(x, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(fast[real], masked[real], atol=1e-6, rtol=1e-5)
