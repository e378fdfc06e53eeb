"""minillava.llava: splicing images into the text, labels, freezing, generation."""

import pytest
import torch
import torch.nn as nn
from tiny_models import loss_and_grads

from minillava.decoder import DecoderConfig
from minillava.llava import Llava, LlavaConfig, splice_image_tokens
from minillava.vit import ViTConfig

IMAGE = 3
V = 41
P = 4  # image 8x8, patches 4x4 -> 4 image positions


def tiny_config(**kw) -> LlavaConfig:
    vision = ViTConfig(
        image_size=8, patch_size=4, hidden_size=24, num_layers=2, num_heads=2, intermediate_size=48
    )
    text = DecoderConfig(
        vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=48, max_seq_len=64,
    )  # fmt: skip
    return LlavaConfig(vision=vision, text=text, **({"image_token_id": IMAGE} | kw))


def make(seed=0, **kw) -> Llava:
    torch.manual_seed(seed)
    return Llava(tiny_config(**kw)).eval()


def pad_rows(rows, side="right", pad=0):
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(T - len(row), T) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row)
        mask[i, span] = 1
    return ids, mask


# Row 0: two images; row 1: none; row 2: one image, first. Text tokens are 10, 11, ...
ROWS = [[10, IMAGE, 11, 12, IMAGE, 13], [14, 15, 16], [IMAGE, 17, 18, 19, 20]]


# ---------------------------------------------------------------------------------------------
# splice_image_tokens
# ---------------------------------------------------------------------------------------------


def embed_as_ids(ids):
    """Embeddings that spell the token id, so the spliced sequence can be read back."""
    return ids[..., None].float().expand(*ids.shape, 2).clone()


@pytest.mark.parametrize("side", ["right", "left"])
def test_splice_puts_each_image_at_its_token(side):
    ids, mask = pad_rows(ROWS, side="right")
    # Image k's features are all -(k + 1), so we can see which image went where.
    features = -torch.arange(1, 4).float()[:, None, None].expand(3, P, 2)
    labels = ids.clone()
    labels[mask == 0] = -100
    embeds, new_mask, new_labels, pos = splice_image_tokens(
        ids, embed_as_ids(ids), features, IMAGE, mask, labels, padding_side=side
    )
    expected_rows = [
        [10] + [-1] * P + [11, 12] + [-2] * P + [13],
        [14, 15, 16],
        [-3] * P + [17, 18, 19, 20],
    ]
    T_new = max(map(len, expected_rows))
    assert embeds.shape == (3, T_new, 2) and new_mask.shape == pos.shape == (3, T_new)
    for b, expected in enumerate(expected_rows):
        real = new_mask[b].bool()
        assert real.sum() == len(expected)
        assert embeds[b, real, 0].tolist() == expected
        # Padding sits on the side asked for.
        first_real = real.nonzero()[0].item()
        assert first_real == (T_new - len(expected) if side == "left" else 0)
        # Positions count real tokens only: 0, 1, 2, ... on the real tokens.
        assert pos[b, real].tolist() == list(range(len(expected)))
        # Labels: the text's labels kept, -100 on image positions and padding.
        expected_labels = [t if t >= 0 else -100 for t in expected]
        assert new_labels[b, real].tolist() == expected_labels
        assert (new_labels[b, ~real] == -100).all()
        assert (embeds[b, ~real] == 0).all()


def test_splice_keeps_minus_100_labels_and_accepts_left_padded_input():
    ids, mask = pad_rows(ROWS, side="left")
    labels = ids.clone()
    labels[mask == 0] = -100
    labels[0, :] = -100  # a prompt: nothing to learn in row 0
    features = torch.randn(3, P, 2)
    _, new_mask, new_labels, _ = splice_image_tokens(
        ids, embed_as_ids(ids), features, IMAGE, mask, labels
    )
    assert (new_labels[0] == -100).all()
    assert new_labels[1, new_mask[1].bool()].tolist() == [14, 15, 16]
    assert new_labels[2, new_mask[2].bool()].tolist() == [-100] * P + [17, 18, 19, 20]


def test_splice_is_differentiable_wrt_features():
    ids, mask = pad_rows(ROWS)
    features = torch.randn(3, P, 2, requires_grad=True)
    embeds, *_ = splice_image_tokens(ids, embed_as_ids(ids), features, IMAGE, mask)
    embeds.sum().backward()
    assert torch.equal(features.grad, torch.ones_like(features))  # each used exactly once


def test_splice_errors():
    ids, mask = pad_rows(ROWS)
    with pytest.raises(ValueError, match="3 <image> tokens.*2 images"):
        splice_image_tokens(ids, embed_as_ids(ids), torch.zeros(2, P, 2), IMAGE, mask)
    with pytest.raises(ValueError, match="padding_side"):
        splice_image_tokens(ids, embed_as_ids(ids), torch.zeros(3, P, 2), IMAGE, mask, None, "top")


# ---------------------------------------------------------------------------------------------
# Llava
# ---------------------------------------------------------------------------------------------


def batch(seed=0, side="right"):
    ids, mask = pad_rows(ROWS, side=side)
    pixels = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    return ids, mask, pixels


@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_encode_images_drops_cls_and_projects(feature_layer):
    model = make(vision_feature_layer=feature_layer)
    pixels = torch.randn(2, 3, 8, 8)
    hidden = model.vision_tower(pixels).hidden_states[feature_layer]  # (2, 1 + P, 24)
    blocks_run = []
    for i, block in enumerate(model.vision_tower.blocks):
        block.register_forward_hook(lambda module, args, out, i=i: blocks_run.append(i))
    features = model.encode_images(pixels)
    assert features.shape == (2, P, 32)
    torch.testing.assert_close(features, model.projector(hidden[:, 1:]), atol=0, rtol=0)
    # The ViT stops at the layer it is read from: with -2, its last block never runs.
    assert blocks_run == list(range(feature_layer % 3))


def test_forward_shapes_and_loss():
    model = make()
    ids, mask, pixels = batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, pixels, attention_mask=mask, labels=labels)
    T_new = 6 - 2 + 2 * P
    assert out.logits.shape == (3, T_new, V)
    assert out.attention_mask.shape == out.labels.shape == (3, T_new)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert model(ids, pixels, attention_mask=mask).loss is None


def test_loss_only_equals_the_full_logits_loss_and_gradients():
    """return_logits=False (what the training loop asks for): same loss, same gradients."""
    model = make().train()
    ids, mask, pixels = batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, :3] = -100  # a prompt
    labels[1] = -100  # a row with nothing to learn
    full, full_grads = loss_and_grads(model, ids, pixels, mask, labels, return_logits=True)
    cheap, cheap_grads = loss_and_grads(model, ids, pixels, mask, labels, return_logits=False)
    assert cheap.logits is None and full.logits.shape[:2] == cheap.labels.shape
    torch.testing.assert_close(cheap.loss, full.loss, atol=1e-6, rtol=0)
    assert full_grads.keys() == cheap_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(cheap_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_a_system_line_every_row_shares_is_computed_once_with_the_same_gradients():
    """The decoder's loss-only path runs the rows' common prefix once (SharedPrefix);
    spliced image features differ per row, so the prefix ends at the first image."""
    model = make().train()
    system = [21, 22, 23]
    rows = [system + [10, IMAGE, 11, 12], system + [IMAGE, 13, 14], system + [15, 16, IMAGE, 17]]
    ids, mask = pad_rows(rows)
    pixels = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :-2] = -100  # the answer: the last two tokens of the longest rows
    seen = []
    model.language_model.layers[0].mlp.register_forward_hook(
        lambda module, args, out: seen.append(out.shape[:-1].numel())
    )
    results = []
    for share in (False, True):
        model.language_model.share_prefix = share
        results.append(loss_and_grads(model, ids, pixels, mask, labels, return_logits=False))
    (full, full_grads), (shared, shared_grads) = results
    real = int(shared.attention_mask.sum())
    assert seen == [real, 3, real - 3 * 3]  # unshared; then the prefix once, and the rest
    torch.testing.assert_close(shared.loss, full.loss, atol=1e-6, rtol=0)
    assert "projector" in " ".join(shared_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_each_sample_alone_gives_the_same_logits_as_in_the_batch():
    model = make()
    ids, mask, pixels = batch()
    out = model(ids, pixels, attention_mask=mask)
    image_of_row = [[0, 1], [], [2]]
    for b, row in enumerate(ROWS):
        alone = model(
            torch.tensor([row]), pixels[image_of_row[b]] if image_of_row[b] else None
        ).logits[0]
        in_batch = out.logits[b][out.attention_mask[b].bool()]
        torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)


def test_text_only_forward_is_the_decoder():
    model = make()
    ids = torch.tensor([[10, 11, 12, 13]])
    torch.testing.assert_close(model(ids).logits, model.language_model(ids).logits)
    with pytest.raises(ValueError, match="<image>"):
        model(torch.tensor([[10, IMAGE, 11]]))


def test_labels_are_minus_100_on_image_prompt_and_padding_positions():
    """Through the real tokenizer and collate: only the assistant's answer is scored."""
    from minillava.data.collate import collate_conversations
    from minillava.tokenizer import get_tokenizer

    tok = get_tokenizer()
    vision = ViTConfig(
        image_size=16, patch_size=8, hidden_size=24, num_layers=2, num_heads=2, intermediate_size=48
    )
    text = DecoderConfig(vocab_size=tok.vocab_size, hidden_size=32, num_layers=1, num_heads=4)
    torch.manual_seed(0)
    model = Llava(LlavaConfig(vision=vision, text=text, image_token_id=tok.image_id))
    samples = [
        {
            "pixel_values": torch.randn(3, 16, 16),
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is the circle?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {
            "pixel_values": None,
            "conversations": [
                {"from": "human", "value": "Name a shape."},
                {"from": "gpt", "value": "a large blue square"},
            ],
        },
    ]
    b = collate_conversations(samples, tok)
    out = model(b["input_ids"], b["pixel_values"], b["attention_mask"], b["labels"])
    answers = [tok.encode("red"), tok.encode("a large blue square")]
    for row, answer in enumerate(answers):
        scored = out.labels[row][out.labels[row] != -100].tolist()
        assert scored[: len(answer)] == answer  # the answer ...
        assert scored[len(answer) :] == [tok.eot_id]  # ... and its end-of-turn token, only
    # Row 0: the 4 image positions (2x2 patches) are there and carry -100.
    assert out.attention_mask[0].sum() == b["attention_mask"][0].sum() - 1 + 4
    assert (out.labels[~out.attention_mask.bool()] == -100).all()


# ---------------------------------------------------------------------------------------------
# Freezing: which parts learn in which stage
# ---------------------------------------------------------------------------------------------


def grads_of(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def backward_once(model: Llava) -> None:
    ids, mask, pixels = batch()
    labels = ids.masked_fill(mask == 0, -100)
    model.train()
    model(ids, pixels, attention_mask=mask, labels=labels).loss.backward()


def test_frozen_vision_tower_gets_no_gradients():
    model = make()
    model.freeze_vision()
    backward_once(model)
    assert all(g is None for g in grads_of(model.vision_tower))
    assert all(g is not None and g.abs().sum() > 0 for g in grads_of(model.projector))
    assert all(g is not None for g in grads_of(model.language_model))
    summary = model.parameter_summary()
    assert summary["vision_tower"]["trainable"] == 0
    assert summary["language_model"]["trainable"] == summary["language_model"]["total"]


def test_stage_1_trains_only_the_projector():
    model = make()
    model.freeze_vision()
    model.freeze_language()
    n_projector = sum(p.numel() for p in model.projector.parameters())
    assert model.count_parameters(trainable_only=True) == n_projector
    assert model.count_parameters() > n_projector
    summary = model.parameter_summary()  # the three parts make up the model
    assert sum(part["total"] for part in summary.values()) == model.count_parameters()
    backward_once(model)
    assert all(g is None for g in grads_of(model.vision_tower))
    assert all(g is None for g in grads_of(model.language_model))
    assert all(g is not None and g.abs().sum() > 0 for g in grads_of(model.projector))
    model.freeze_language(False)  # stage 2: the decoder learns again
    assert model.count_parameters(trainable_only=True) == n_projector + sum(
        p.numel() for p in model.language_model.parameters()
    )


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


def lively(model: Llava) -> Llava:
    with torch.no_grad():
        for p in model.language_model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("side", ["right", "left"])
def test_generate_cached_equals_uncached_and_each_sample_alone(side):
    model = lively(make())
    ids, mask, pixels = batch(side=side)
    cached = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=6)
    uncached = model.generate(ids, pixels, attention_mask=mask, max_new_tokens=6, use_cache=False)
    assert cached.shape == (3, 6)
    assert torch.equal(cached, uncached)
    assert len(set(cached.flatten().tolist())) > 3, "test model too dull"
    image_of_row = [[0, 1], [], [2]]
    for b, row in enumerate(ROWS):
        images = pixels[image_of_row[b]] if image_of_row[b] else None
        alone = model.generate(torch.tensor([row]), images, max_new_tokens=6)
        assert torch.equal(alone[0], cached[b])


def test_generate_sampling_with_generator_is_reproducible_and_cache_independent():
    model = lively(make())
    ids, mask, pixels = batch()
    runs = [
        model.generate(
            ids,
            pixels,
            attention_mask=mask,
            max_new_tokens=6,
            temperature=1.0,
            top_k=8,
            use_cache=use_cache,
            generator=torch.Generator().manual_seed(9),
        )  # fmt: skip
        for use_cache in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


def test_linear_projector_and_config_checks():
    model = make(projector="linear")
    ids, mask, pixels = batch()
    assert model(ids, pixels, attention_mask=mask).logits.shape[0] == 3
    with pytest.raises(ValueError, match="image_token_id"):
        tiny_config(image_token_id=V)
