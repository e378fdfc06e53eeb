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


def texts_by_images(image_features, text_features, logit_scale):
    return solution.similarity_matrix(text_features, image_features, logit_scale)


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (no_normalise, ["did not normalise", "L2 norm"]),
        (no_scale, ["forgot to multiply by logit_scale"]),
        (normalise_columns, ["each ROW", "dim=-1"]),
        (texts_by_images, ["shape (3, 2), expected (2, 3)", "transposed"]),
    ],
)
def test_similarity_matrix_rejects(rejects, wrong, mentions):
    rejects("ch06.similarity_matrix", wrong, mentions=mentions)


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


def detached(image_embeds, text_embeds, temperature):
    loss = solution.contrastive_loss(image_embeds, text_embeds, temperature)
    return torch.tensor(loss.item())


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (image_to_text_only, ["only have the image -> text direction", "average"]),
        (no_temperature, ["temperature is missing"]),
        (times_temperature, ["do not multiply"]),
        (summed_directions, ["not their sum"]),
        (per_sample, ["shape (4,)", "single number"]),
        (detached, ["not connected"]),
    ],
)
def test_contrastive_loss_rejects(rejects, wrong, mentions):
    rejects("ch06.contrastive_loss", wrong, mentions=mentions)


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


@pytest.mark.parametrize(
    "wrong, mentions",
    [
        (last_position, ["states[:, -1] is padding", "last real token"]),
        (first_position, ["first token"]),
        (mean_pool, ["averaging"]),
        (off_by_one, ["off by one", "n - 1"]),
    ],
)
def test_pool_at_eot_rejects(rejects, wrong, mentions):
    rejects("ch06.pool_at_eot", wrong, mentions=mentions)


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
        (softmax_over_images, ["over the classes", "dim=-1"]),
        (unnormalised, ["normalise the embeddings first"]),
        (probs_only, ["pair (predicted, probs)"]),
        (argmax_over_images, ["shape (3,), expected (5,)", "one class index per image"]),
        (float_predictions, ["integers"]),
    ],
)
def test_zero_shot_predict_rejects(rejects, wrong, mentions):
    rejects("ch06.zero_shot_predict", wrong, mentions=mentions)


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
