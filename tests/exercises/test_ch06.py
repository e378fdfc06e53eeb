"""Chapter 6: the graders reject plausible wrong versions, with a message that names the mistake.

Also: the library (minillava.clip) agrees with solutions/ch06_clip.py, so the chapter text, the
notebook and the reference cannot drift apart.
"""

import pytest
import torch
import torch.nn.functional as F

from minillava import clip
from minillava.vit import ViTConfig
from solutions import ch06_clip as solution

# --- similarity_matrix ----------------------------------------------------------------------


def no_normalise(image_features, text_features, logit_scale):
    return logit_scale * image_features @ text_features.T


def no_scale(image_features, text_features, logit_scale):
    return F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T


def normalise_columns(image_features, text_features, logit_scale):
    image = image_features / image_features.norm(dim=0, keepdim=True)
    text = text_features / text_features.norm(dim=0, keepdim=True)
    return logit_scale * image @ text.T


def times_norm(image_features, text_features, logit_scale):
    image = image_features * image_features.norm(dim=-1, keepdim=True)
    text = text_features * text_features.norm(dim=-1, keepdim=True)
    return logit_scale * image @ text.T


def longer_wins(image_features, text_features, logit_scale):
    # Right while every vector is shorter than 10, so only the 7 times longer images show it.
    scores = solution.similarity_matrix(image_features, text_features, logit_scale)
    return scores * image_features.norm(dim=-1, keepdim=True).clamp(min=10.0) / 10.0


def texts_by_images(image_features, text_features, logit_scale):
    return solution.similarity_matrix(text_features, image_features, logit_scale)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (no_normalise, ["did not normalise", "raw dot products"]),
        (no_scale, ["forgot to multiply by logit_scale"]),
        (normalise_columns, ["normalised each column", "each ROW"]),
        (times_norm, ["multiplied by the norm"]),
        (texts_by_images, ["shape (3, 2), expected (2, 3)", "transposed"]),
    ],
)
def test_similarity_matrix_rejects(rejects, wrong, mentions):
    rejects("ch06.similarity_matrix", wrong, mentions=mentions, hint_mentions=["L2 norm"])


def test_similarity_matrix_length_leak_is_named(rejects):
    rejects("ch06.similarity_matrix", longer_wins, mentions=["7 times longer", "lengths"])


# --- contrastive_loss -----------------------------------------------------------------------


def image_to_text_only(image_embeds, text_embeds, temperature):
    logits = image_embeds @ text_embeds.T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits)))


def no_temperature(image_embeds, text_embeds, temperature):
    logits = image_embeds @ text_embeds.T
    targets = torch.arange(len(logits))
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def times_temperature(image_embeds, text_embeds, temperature):
    return solution.contrastive_loss(image_embeds, text_embeds, 1 / temperature)


def summed_directions(image_embeds, text_embeds, temperature):
    return 2 * solution.contrastive_loss(image_embeds, text_embeds, temperature)


def per_sample(image_embeds, text_embeds, temperature):
    logits = image_embeds @ text_embeds.T / temperature
    return F.cross_entropy(logits, torch.arange(len(logits)), reduction="none")


def summed_over_the_batch(image_embeds, text_embeds, temperature):
    logits = image_embeds @ text_embeds.T / temperature
    targets = torch.arange(len(logits))
    terms = F.cross_entropy(logits, targets, reduction="sum")
    return (terms + F.cross_entropy(logits.T, targets, reduction="sum")) / 2


def detached(image_embeds, text_embeds, temperature):
    loss = solution.contrastive_loss(image_embeds, text_embeds, temperature)
    return torch.tensor(loss.item())


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (image_to_text_only, ["only have the image-to-text direction", "averages the two"]),
        (no_temperature, ["temperature is missing", "too flat"]),
        (times_temperature, ["multiplied by the temperature instead of dividing"]),
        (summed_directions, ["twice the reference", "not averaged"]),
        (per_sample, ["shape (4,)", "single number"]),
        (summed_over_the_batch, ["4 times the reference", "summed over the batch"]),
        (detached, ["not connected"]),
    ],
)
def test_contrastive_loss_rejects(rejects, wrong, mentions):
    rejects("ch06.contrastive_loss", wrong, mentions=mentions)


def test_contrastive_loss_hint_waits_for_hint(rejects):
    result = rejects("ch06.contrastive_loss", no_temperature, hint_mentions=["each column"])
    assert result.hint not in result.message


# --- pool_at_eot ----------------------------------------------------------------------------


def last_position(token_states, attention_mask):
    return token_states[:, -1]


def first_position(token_states, attention_mask):
    return token_states[:, 0]


def mean_pool(token_states, attention_mask):
    mask = attention_mask[..., None].float()
    return (token_states * mask).sum(1) / mask.sum(1)


def off_by_one(token_states, attention_mask):
    last = attention_mask.sum(dim=1).clamp(max=token_states.shape[1] - 1)
    return token_states[torch.arange(len(token_states)), last]


def reads_the_padding(token_states, attention_mask):
    # Right while the padding holds small values, so only the junk in the padding shows it.
    pooled = solution.pool_at_eot(token_states, attention_mask)
    padding = token_states * (1 - attention_mask[..., None].float())
    return pooled + (padding.abs() > 5).float().sum(1)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (last_position, ["last position of every row", "padding", "last real token"]),
        (first_position, ["first token"]),
        (mean_pool, ["averaged over the real tokens"]),
        (off_by_one, ["off by one", "n - 1"]),
        (reads_the_padding, ["junk in the padding", "only the padding changed"]),
    ],
)
def test_pool_at_eot_rejects(rejects, wrong, mentions):
    rejects("ch06.pool_at_eot", wrong, mentions=mentions, hint_mentions=["count the ones"])


# --- zero_shot_predict ----------------------------------------------------------------------


def softmax_over_images(image_embeds, class_embeds, logit_scale=100.0):
    probs = solution.similarity_matrix(image_embeds, class_embeds, logit_scale).softmax(dim=0)
    return probs.argmax(dim=-1), probs


def unnormalised(image_embeds, class_embeds, logit_scale=100.0):
    probs = (logit_scale * image_embeds @ class_embeds.T).softmax(dim=-1)
    return probs.argmax(dim=-1), probs


def probs_only(image_embeds, class_embeds, logit_scale=100.0):
    return solution.zero_shot_predict(image_embeds, class_embeds, logit_scale)[1]


def argmax_over_images(image_embeds, class_embeds, logit_scale=100.0):
    _, probs = solution.zero_shot_predict(image_embeds, class_embeds, logit_scale)
    return probs.argmax(dim=0), probs


def float_predictions(image_embeds, class_embeds, logit_scale=100.0):
    predicted, probs = solution.zero_shot_predict(image_embeds, class_embeds, logit_scale)
    return predicted.float(), probs


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (softmax_over_images, ["over the classes", "each row should sum to 1"]),
        (unnormalised, ["did not normalise the embeddings"]),
        (probs_only, ["pair (predicted, probs)"]),
        (argmax_over_images, ["shape (3,), expected (5,)", "one class index per image"]),
        (float_predictions, ["integers"]),
    ],
)
def test_zero_shot_predict_rejects(rejects, wrong, mentions):
    rejects("ch06.zero_shot_predict", wrong, mentions=mentions)


def test_zero_shot_predict_hint_points_at_the_classes(rejects):
    rejects("ch06.zero_shot_predict", argmax_over_images, hint_mentions=["over the classes"])


# --- contrastive_loss_with_hard_negatives (stretch) -----------------------------------------


def _unit(*tensors):
    return [F.normalize(t, dim=-1) for t in tensors]


def ignores_hard(image_emb, text_emb, hard_text_emb, logit_scale):
    image, text = _unit(image_emb, text_emb)
    return solution.contrastive_loss(image, text, 1 / logit_scale)


def hard_in_both_directions(image_emb, text_emb, hard_text_emb, logit_scale):
    image, text, hard = _unit(image_emb, text_emb, hard_text_emb)
    logits = logit_scale * image @ torch.cat([text, hard]).T  # (B, 2B)
    targets = torch.arange(len(image))
    # Each twin caption is made to pick the image of its original: it describes another scene.
    twins_pick = torch.cat([targets, targets])
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, twins_pick)) / 2


def no_logit_scale(image_emb, text_emb, hard_text_emb, logit_scale):
    return solution.contrastive_loss_with_hard_negatives(image_emb, text_emb, hard_text_emb, 1.0)


def divides_by_logit_scale(image_emb, text_emb, hard_text_emb, logit_scale):
    return solution.contrastive_loss_with_hard_negatives(
        image_emb, text_emb, hard_text_emb, 1 / logit_scale
    )


def _hard_loss_as_given(image, text, hard, logit_scale):
    targets = torch.arange(len(image))
    logits = logit_scale * image @ torch.cat([text, hard]).T
    text_to_image = F.cross_entropy(logit_scale * text @ image.T, targets)
    return (F.cross_entropy(logits, targets) + text_to_image) / 2


def unnormalised(image_emb, text_emb, hard_text_emb, logit_scale):
    return _hard_loss_as_given(image_emb, text_emb, hard_text_emb, logit_scale)


def divided_by_the_norm_twice(image_emb, text_emb, hard_text_emb, logit_scale):
    twice = [t / t.norm(dim=-1, keepdim=True) / t.norm(dim=-1, keepdim=True) for t in
             (image_emb, text_emb, hard_text_emb)]  # fmt: skip
    return _hard_loss_as_given(*twice, logit_scale)


def hard_captions_first(image_emb, text_emb, hard_text_emb, logit_scale):
    image, text, hard = _unit(image_emb, text_emb, hard_text_emb)
    logits = logit_scale * image @ torch.cat([hard, text]).T
    targets = torch.arange(len(image))
    text_to_image = F.cross_entropy(logit_scale * text @ image.T, targets)
    return (F.cross_entropy(logits, targets) + text_to_image) / 2


def hard_captions_detached(image_emb, text_emb, hard_text_emb, logit_scale):
    return solution.contrastive_loss_with_hard_negatives(
        image_emb, text_emb, hard_text_emb.detach(), logit_scale
    )


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (ignores_hard, ["ignores the hard captions", "plain in-batch loss"]),
        (hard_in_both_directions, ["text-to-image direction includes the hard captions"]),
        (no_logit_scale, ["logit scale is missing"]),
        (divides_by_logit_scale, ["divided by the logit scale"]),
        (unnormalised, ["did not normalise"]),
        (divided_by_the_norm_twice, ["squared length", "norm twice"]),
        (hard_captions_first, ["targets point at the hard captions", "column i"]),
        (hard_captions_detached, ["not connected to the hard captions"]),
    ],
)
def test_contrastive_loss_with_hard_negatives_rejects(rejects, wrong, mentions):
    rejects("ch06.contrastive_loss_with_hard_negatives", wrong, mentions=mentions)


def test_contrastive_loss_with_hard_negatives_hint_in_words(rejects):
    result = rejects(
        "ch06.contrastive_loss_with_hard_negatives",
        hard_in_both_directions,
        hint_mentions=["followed by the M hard captions", "among the B images only"],
    )
    assert result.hint not in result.message


def test_hard_negatives_without_any_is_the_chapters_loss():
    image, text = torch.randn(5, 8) * 3, torch.randn(5, 8)
    ours = solution.contrastive_loss_with_hard_negatives(image, text, torch.zeros(0, 8), 20.0)
    unit_image, unit_text = _unit(image, text)
    torch.testing.assert_close(ours, solution.contrastive_loss(unit_image, unit_text, 1 / 20.0))
    torch.testing.assert_close(ours, clip.clip_loss(20.0 * unit_image @ unit_text.T))
    # Hard captions are extra wrong answers: they can only raise the loss.
    with_hard = solution.contrastive_loss_with_hard_negatives(image, text, torch.randn(5, 8), 20.0)
    assert with_hard > ours


def test_hard_negatives_relate_to_the_librarys_twins_in_the_batch(tiny_clip):
    """The library puts each twin in the batch with its image (stages.CaptionBatches, every
    second sample). Each original image's row of that (2B, 2B) matrix is exactly this loss's
    image-to-text row: the same B + B captions, its own as the target."""
    B = 3
    pixels = torch.randn(2 * B, 3, 8, 8)  # originals at even places, their twins at odd ones
    ids = torch.randint(2, 20, (2 * B, 5))
    out = tiny_clip(pixels, ids)
    scale = tiny_clip.scale().item()
    image, text = out.image_embeds.detach(), out.text_embeds.detach()
    rows = F.cross_entropy(out.logits_per_image.detach(), torch.arange(2 * B), reduction="none")
    originals, twin_captions, captions = image[0::2], text[1::2], text[0::2]
    text_to_image = F.cross_entropy(scale * captions @ originals.T, torch.arange(B))
    ours = solution.contrastive_loss_with_hard_negatives(originals, captions, twin_captions, scale)
    torch.testing.assert_close(ours, (rows[0::2].mean() + text_to_image) / 2)


# --- the library and the solutions agree ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    vision = ViTConfig(
        image_size=8, patch_size=4, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    )
    text = clip.TextEncoderConfig(
        vocab_size=20, max_len=8, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    )
    return clip.CLIP(clip.CLIPConfig(vision=vision, text=text, embed_dim=12)).eval()


def test_library_logits_and_loss_match_the_solutions(tiny_clip):
    pixels = torch.randn(3, 3, 8, 8)
    ids = torch.randint(2, 20, (3, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    out = tiny_clip(pixels, ids, mask)
    with torch.no_grad():
        image_features = tiny_clip.visual_projection(tiny_clip.vision_model(pixels).pooled_output)
        states = tiny_clip.text_model.token_states(ids, mask)
        text_features = tiny_clip.text_projection(solution.pool_at_eot(states, mask))
        scale = tiny_clip.scale().item()
        logits = solution.similarity_matrix(image_features, text_features, scale)
        loss = solution.contrastive_loss(out.image_embeds, out.text_embeds, 1 / scale)
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)


def test_library_pooling_matches_the_solution():
    states = torch.randn(4, 7, 5)
    mask = (torch.arange(7) < torch.tensor([[7], [4], [1], [2]])).long()
    expected = states[torch.arange(4), clip.last_token_index(mask)]
    torch.testing.assert_close(solution.pool_at_eot(states, mask), expected)


def test_library_zero_shot_matches_the_solution(tiny_clip):
    pixels = torch.randn(6, 3, 8, 8)
    class_ids = torch.randint(2, 20, (4, 5))
    predicted, probs = clip.zero_shot_classify(tiny_clip, pixels, class_ids)
    with torch.no_grad():
        image_embeds = tiny_clip.encode_image(pixels)
        class_embeds = tiny_clip.encode_text(class_ids)
        expected = solution.zero_shot_predict(image_embeds, class_embeds, tiny_clip.scale().item())
    torch.testing.assert_close(probs, expected[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(predicted, expected[0])
