"""Tests of minillava.clip: text masking and pooling, the loss, the temperature, learning."""

import math

import matplotlib
import pytest
import torch

from minillava.clip import (
    CLIP,
    MAX_LOGIT_SCALE,
    CLIPConfig,
    TextEncoder,
    TextEncoderConfig,
    clip_loss,
    last_token_index,
    similarity_heatmap,
    zero_shot_classify,
)
from minillava.vit import ViTConfig

matplotlib.use("Agg")

PAD = 0


def tiny_text_config(**overrides) -> TextEncoderConfig:
    settings = dict(
        vocab_size=32, max_len=8, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64
    )
    settings.update(overrides)
    return TextEncoderConfig(**settings)


def tiny_clip_config() -> CLIPConfig:
    vision = ViTConfig(
        image_size=8, patch_size=4, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64
    )
    text = tiny_text_config(num_layers=1)
    return CLIPConfig(vision=vision, text=text, embed_dim=16)


# --- the text encoder ------------------------------------------------------------------------


def test_text_encoder_output_shape():
    torch.manual_seed(0)
    encoder = TextEncoder(tiny_text_config())
    ids = torch.randint(1, 32, (3, 6))
    assert encoder(ids).shape == (3, 32)


def test_last_token_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 3, 0]


def test_text_pooling_ignores_everything_after_the_last_real_token():
    torch.manual_seed(0)
    encoder = TextEncoder(tiny_text_config()).eval()
    ids = torch.tensor([[5, 6, 7, 2, PAD, PAD], [8, 9, 2, PAD, PAD, PAD]])
    mask = (ids != PAD).long()
    pooled = encoder(ids, mask)
    # Same captions, different junk in the padded slots: the embedding must not move.
    junk = ids.clone()
    junk[mask == 0] = torch.randint(1, 32, (int((mask == 0).sum()),))
    torch.testing.assert_close(encoder(junk, mask), pooled)
    # ... nor when the padding is cut off entirely.
    torch.testing.assert_close(encoder(ids[:1, :4]), pooled[:1])
    # ... nor when it moves to the left.
    left = torch.tensor([[PAD, PAD, PAD, 8, 9, 2]])
    torch.testing.assert_close(encoder(left, (left != PAD).long()), pooled[1:], atol=1e-5, rtol=0)
    # Changing a real token does move it.
    changed = ids.clone()
    changed[0, 1] = 11
    assert not torch.allclose(encoder(changed, mask)[0], pooled[0])


def test_text_encoder_is_causal():
    """Token t's state depends on tokens 0..t only: changing later tokens leaves it unchanged."""
    torch.manual_seed(0)
    encoder = TextEncoder(tiny_text_config()).eval()
    ids = torch.randint(1, 32, (2, 7))
    states = encoder.token_states(ids)  # no padding: only the causal mask hides the future
    assert states.shape == (2, 7, 32)
    later_changed = ids.clone()
    later_changed[:, 5:] = (ids[:, 5:] % 31) + 1
    changed_states = encoder.token_states(later_changed)
    torch.testing.assert_close(changed_states[:, :5], states[:, :5])
    assert not torch.allclose(changed_states[:, 5:], states[:, 5:])
    # and the pooled embedding of the full text is the last token's state
    torch.testing.assert_close(encoder(ids), states[:, -1])


def test_manual_and_sdpa_attention_agree_with_masks():
    torch.manual_seed(0)
    fast = TextEncoder(tiny_text_config(use_sdpa=True)).eval()
    slow = TextEncoder(tiny_text_config(use_sdpa=False)).eval()
    slow.load_state_dict(fast.state_dict())
    ids = torch.tensor([[PAD, PAD, 3, 4, 2], [5, 6, 7, 8, 2]])
    mask = (ids != PAD).long()
    torch.testing.assert_close(fast(ids, mask), slow(ids, mask), atol=1e-5, rtol=1e-5)


def test_text_encoder_bad_inputs():
    encoder = TextEncoder(tiny_text_config())
    with pytest.raises(ValueError, match="max_len=8"):
        encoder(torch.ones(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        encoder(torch.ones(9, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        encoder(torch.ones(2, 4, dtype=torch.long), torch.ones(2, 5, dtype=torch.long))


# --- the loss and the temperature -----------------------------------------------------------


def test_clip_loss_is_log_b_for_uniform_logits():
    for batch in (1, 4, 7):
        loss = clip_loss(torch.full((batch, batch), 3.0))
        assert loss.item() == pytest.approx(math.log(batch), abs=1e-6)


def test_clip_loss_is_symmetric_and_averages_both_directions():
    torch.manual_seed(0)
    logits = torch.randn(5, 5)
    assert clip_loss(logits).item() == pytest.approx(clip_loss(logits.T).item(), abs=1e-6)
    targets = torch.arange(5)
    rows = torch.nn.functional.cross_entropy(logits, targets)
    cols = torch.nn.functional.cross_entropy(logits.T, targets)
    assert clip_loss(logits).item() == pytest.approx(((rows + cols) / 2).item(), abs=1e-6)
    assert rows.item() != pytest.approx(cols.item())  # so averaging both directions matters
    # a confident, correct diagonal gives a loss near 0
    assert clip_loss(100 * torch.eye(5)).item() < 1e-6
    with pytest.raises(ValueError, match="square"):
        clip_loss(torch.randn(3, 4))


def test_temperature_starts_at_0_07_and_is_clamped_at_100():
    torch.manual_seed(0)
    model = CLIP(tiny_clip_config())
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    images, ids = torch.randn(3, 3, 8, 8), torch.randint(1, 32, (3, 5))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)  # exp(10) ~ 22026, far above the cap
    out = model(images, ids)
    assert model.scale().item() == pytest.approx(100.0, rel=1e-5)
    cosines = out.image_embeds @ out.text_embeds.T
    torch.testing.assert_close(out.logits_per_image, 100.0 * cosines)
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100))


def test_clip_forward_shapes_and_normalised_embeddings():
    torch.manual_seed(0)
    model = CLIP(tiny_clip_config())
    out = model(torch.randn(4, 3, 8, 8), torch.randint(1, 32, (4, 5)))
    assert out.logits_per_image.shape == (4, 4)
    torch.testing.assert_close(out.logits_per_text, out.logits_per_image.T)
    assert out.image_embeds.shape == out.text_embeds.shape == (4, 16)
    torch.testing.assert_close(out.image_embeds.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(out.text_embeds.norm(dim=-1), torch.ones(4))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    # 4 images against 3 texts: logits, but no pairing, so no loss
    uneven = model(torch.randn(4, 3, 8, 8), torch.randint(1, 32, (3, 5)))
    assert uneven.logits_per_image.shape == (4, 3) and uneven.loss is None
    # the projections have no bias (the embeddings are normalised anyway)
    assert model.visual_projection.bias is None and model.text_projection.bias is None


# --- learning --------------------------------------------------------------------------------


NUM_CLASSES = 6
EOT = 2
# Each class is a colour; its caption is two tokens + end-of-text, some shorter (padded).
PALETTE = torch.tensor(
    [[1, -1, -1], [-1, 1, -1], [-1, -1, 1], [1, 1, -1], [-1, 1, 1], [1, -1, 1]], dtype=torch.float
)
CAPTIONS = torch.tensor(
    [[10 + k, 20 + k, EOT] if k % 2 else [10 + k, EOT, PAD] for k in range(NUM_CLASSES)]
)


def synthetic_pairs(labels: torch.Tensor, generator: torch.Generator):
    """Noisy flat-colour images (B, 3, 8, 8) and their class captions (B, 3)."""
    noise = 0.5 * torch.randn(len(labels), 3, 8, 8, generator=generator)
    images = PALETTE[labels][:, :, None, None] + noise
    ids = CAPTIONS[labels]
    return images, ids, (ids != PAD).long()


@pytest.fixture
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a busy machine the threads wait for each
    other: 100 steps take ~1.5 s on one thread, up to 10 s on two shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tiny_clip_learns_separable_pairs_and_classifies_zero_shot(one_thread):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = CLIP(tiny_clip_config())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    test_labels = torch.arange(NUM_CLASSES).repeat(10)
    test_images, _, _ = synthetic_pairs(test_labels, generator)
    class_ids = CAPTIONS
    class_mask = (class_ids != PAD).long()

    def accuracy() -> float:
        predicted, probs = zero_shot_classify(model, test_images, class_ids, class_mask)
        assert probs.shape == (len(test_labels), NUM_CLASSES)
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(test_labels)))
        return (predicted == test_labels).float().mean().item()

    accuracy_before = accuracy()
    losses = []
    for _ in range(100):
        # one pair per class, so every off-diagonal pair really is a non-match
        labels = torch.randperm(NUM_CLASSES, generator=generator)
        images, ids, mask = synthetic_pairs(labels, generator)
        loss = model(images, ids, mask).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    accuracy_after = accuracy()

    # chance is log(6) = 1.79; the untrained model starts around there (1.4 to 3.3 over seeds)
    final_loss = sum(losses[-10:]) / 10
    assert final_loss < 0.1 * math.log(NUM_CLASSES), f"loss {losses[0]:.3f} -> {final_loss:.3f}"
    assert final_loss < 0.1 * losses[0]
    assert accuracy_after >= 0.95
    assert accuracy_after > accuracy_before
    assert model.training  # zero_shot_classify put the mode back


def test_similarity_heatmap_returns_a_figure():
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    logits = torch.randn(3, 4)
    fig = similarity_heatmap(
        logits,
        image_labels=["a", "b", "c"],
        text_labels=["w", "x", "y", "z"],
        images=torch.randn(3, 3, 8, 8),
    )
    assert isinstance(fig, matplotlib.figure.Figure)
    assert len(fig.axes[0].texts) == 12  # one annotation per cell
    plt.close(fig)
    with pytest.raises(ValueError, match="N_images, N_texts"):
        similarity_heatmap(torch.randn(3))
