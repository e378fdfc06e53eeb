"""Chapter 6 graders: CLIP (exercises/ch06_clip.py).

Each check compares the learner's function with minillava.clip's arithmetic on small random
inputs, then tests a property every right answer has (scale invariance, log B for a blind model,
padding that changes nothing, probabilities that sum to 1).
"""

import math

import torch
import torch.nn.functional as F

from minillava import clip as ref
from minillava.grading import (
    GradingFailure,
    assert_close,
    assert_equal,
    assert_shape,
    assert_tensor,
    diagnose,
    fmt,
    grader,
    step,
)

TITLE = "CLIP"
MODULE = "ch06_clip"


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


@grader("similarity_matrix", points=2)
def check_similarity_matrix(similarity_matrix):
    """A 2 x 3 hand example, then random (3, E) x (5, E); longer vectors must not score higher."""
    images = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-6.0, -8.0]])
    step("calling similarity_matrix(images (2, 2), texts (3, 2), logit_scale=10.0)")
    got = similarity_matrix(images, texts, 10.0)
    expected = 10.0 * _cosines(images, texts)
    assert_close(
        got,
        expected,
        "similarity_matrix(images, texts, logit_scale=10) for images [[3, 4], [0, 2]] and texts "
        "[[1, 0], [0, 5], [-6, -8]]",
        why_shape="one row per image (2), one column per text (3)",
        hint=diagnose(
            got,
            {
                "It looks like you did not normalise: divide each row by its L2 norm first, so "
                "every entry is a cosine in [-1, 1] before scaling.": 10.0 * images @ texts.T,
                "It looks like you forgot to multiply by logit_scale.": _cosines(images, texts),
                "Normalise each ROW (each vector, dim=-1), not each column (dim=0).": 10.0
                * F.normalize(images, dim=0)
                @ F.normalize(texts, dim=0).T,
                "Divide by the norm, do not multiply: x / x.norm(dim=-1, keepdim=True).": 10.0
                * (images * images.norm(dim=-1, keepdim=True))
                @ (texts * texts.norm(dim=-1, keepdim=True)).T,
            },
            "entry [i, j] = logit_scale * (image_i / |image_i|) · (text_j / |text_j|).",
        ),
    )
    images, texts = torch.randn(3, 8), torch.randn(5, 8)
    step("calling similarity_matrix on random images (3, 8) and texts (5, 8), logit_scale=14.3")
    got = assert_close(
        similarity_matrix(images, texts, 14.3),
        14.3 * _cosines(images, texts),
        "similarity_matrix(images (3, 8), texts (5, 8), 14.3)",
        why_shape="(B_img, B_txt) = (3, 5): every image against every text",
        hint="Normalise both inputs along the last dimension, then images @ texts.T.",
    )
    step("calling similarity_matrix with the images made 7 times longer")
    assert_close(
        similarity_matrix(7.0 * images, texts, 14.3),
        got,
        "similarity_matrix(7 * images, texts)",
        hint="A cosine depends only on directions: scaling a vector must change nothing.",
    )


SUMMED = "Average the two directions, (image_to_text + text_to_image) / 2, not their sum."


@grader("contrastive_loss", points=2)
def check_contrastive_loss(contrastive_loss):
    """Random unit embeddings against clip_loss; identical embeddings give log B; gradients flow."""
    B, E, temperature = 4, 6, 0.07
    image, text = F.normalize(torch.randn(B, E), dim=-1), F.normalize(torch.randn(B, E), dim=-1)
    text = F.normalize(text + image, dim=-1)  # a half-trained model: pairs somewhat aligned
    logits = image @ text.T / temperature
    targets = torch.arange(B)
    expected = ref.clip_loss(logits)
    step(f"calling contrastive_loss(image (4, 6), text (4, 6), temperature={temperature})")
    got = contrastive_loss(image, text, temperature)
    got = assert_tensor(got, "contrastive_loss(...)")
    if got.numel() != 1:
        raise GradingFailure(
            f"contrastive_loss returned a tensor of shape {tuple(got.shape)}, expected a single "
            "number (a 0-d tensor).",
            "F.cross_entropy already averages over the batch: add the two directions and halve.",
        )
    assert_close(
        got.reshape(()),
        expected,
        "contrastive_loss(image, text, temperature=0.07)",
        hint=diagnose(
            got.reshape(()),
            {
                "You only have the image -> text direction: add the text -> image term, "
                "cross_entropy(logits.T, targets), and average the two.": F.cross_entropy(
                    logits, targets
                ),
                "You only have the text -> image direction: add the image -> text term, "
                "cross_entropy(logits, targets), and average the two.": F.cross_entropy(
                    logits.T, targets
                ),
                "It looks like the temperature is missing: divide the cosines by it before the "
                "softmax (logits = image @ text.T / temperature).": ref.clip_loss(image @ text.T),
                "Divide by the temperature, do not multiply: 1/0.07 = 14.3 sharpens the "
                "softmax.": ref.clip_loss(image @ text.T * temperature),
                SUMMED: 2 * expected,
            },
            "loss = (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2 with "
            "logits = image @ text.T / temperature.",
        ),
    )
    same = F.normalize(torch.randn(1, E), dim=-1).expand(5, E)
    step("calling contrastive_loss with 5 identical images and 5 identical texts")
    assert_close(
        assert_tensor(contrastive_loss(same, same, 0.5), "contrastive_loss(...)").reshape(()),
        torch.tensor(math.log(5)),
        "contrastive_loss when every similarity is equal (an image cannot tell its caption)",
        hint="With all logits equal each softmax is uniform over B = 5 candidates: "
        "cross-entropy = log 5 in both directions.",
    )
    step("backpropagating through contrastive_loss")
    image = image.clone().requires_grad_(True)
    loss = contrastive_loss(image, text, temperature)
    if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
        raise GradingFailure(
            "The loss is not connected to the embeddings: nothing to train.",
            "Use torch operations only (no .item(), .detach() or numpy inside).",
        )


def _ref_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return states[torch.arange(states.shape[0]), ref.last_token_index(mask)]


@grader("pool_at_eot", points=2)
def check_pool_at_eot(pool_at_eot):
    """Three right-padded captions of lengths 6, 3 and 1; junk in the padding changes nothing."""
    B, T, C = 3, 6, 4
    states = torch.randn(B, T, C)
    mask = torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    expected = _ref_pool(states, mask)
    step("calling pool_at_eot(states (3, 6, 4), mask) with caption lengths 6, 3 and 1")
    got = pool_at_eot(states, mask)
    assert_close(
        got,
        expected,
        "pool_at_eot(states, mask) for lengths [6, 3, 1]",
        why_shape="one vector of C = 4 per caption",
        hint=diagnose(
            got,
            {
                "states[:, -1] is padding for every caption shorter than the longest: take, "
                "in each row, the position of its LAST REAL token (mask.sum(dim=1) - 1).": states[
                    :, -1
                ],
                "states[:, 0] is the first token: in a causal encoder it has read nothing but "
                "itself. Take each row's last real token (mask.sum(dim=1) - 1).": states[:, 0],
                "Averaging over real tokens is a different pooling; CLIP takes the state of "
                "the last real token.": (states * mask[..., None]).sum(1)
                / mask.sum(1, keepdim=True),
                "Off by one: the last real token of a row with n ones is at index n - 1.": states[
                    torch.arange(B), (mask.sum(1)).clamp(max=T - 1)
                ],
            },
            "Row b's answer is states[b, n_b - 1] where n_b is the number of ones in mask[b].",
        ),
    )
    step("calling pool_at_eot again with random junk written into the padded positions")
    junk = torch.where(mask[..., None].bool(), states, torch.randn(B, T, C) * 10)
    assert_close(
        pool_at_eot(junk, mask),
        expected,
        "pool_at_eot with junk in the padding",
        hint="Padding positions are not part of the caption: they must never reach the output.",
    )


@grader("zero_shot_predict", points=2)
def check_zero_shot_predict(zero_shot_predict):
    """5 images, 3 classes of very different lengths: probabilities over the classes, argmax."""
    images = torch.randn(5, 8) * torch.tensor([[1.0], [3.0], [0.5], [2.0], [1.0]])
    classes = torch.randn(3, 8)
    classes = classes + 0.2 * images[[0, 1, 2]]  # images 0, 1, 2 lean to classes 0, 1, 2
    classes = classes * torch.tensor([[8.0], [1.0], [0.2]])  # lengths must not matter
    scale = 20.0
    probs = (scale * _cosines(images, classes)).softmax(dim=-1)
    step("calling zero_shot_predict(images (5, 8), classes (3, 8), logit_scale=20.0)")
    out = zero_shot_predict(images, classes, scale)
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise GradingFailure(
            f"zero_shot_predict should return a pair (predicted, probs), got {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple | list) else "")
            + "."
        )
    predicted, got_probs = out
    unnormalised = (scale * images @ classes.T).softmax(dim=-1)
    assert_close(
        got_probs,
        probs,
        "probs from zero_shot_predict",
        why_shape="one row per image (5), one column per class (3)",
        hint=diagnose(
            got_probs,
            {
                "The softmax must run over the classes (dim=-1): each IMAGE gets a distribution "
                "over the K classes.": (scale * _cosines(images, classes)).softmax(dim=0),
                "Normalise the embeddings first: a class whose embedding is long would otherwise "
                "win for every image.": unnormalised,
                "Multiply the cosines by logit_scale before the softmax.": _cosines(
                    images, classes
                ).softmax(dim=-1),
            },
            "probs = softmax(logit_scale * cos(image, class), over the classes).",
        ),
    )
    predicted = assert_shape(predicted, (5,), "predicted", why="one class index per image")
    if predicted.is_floating_point():
        raise GradingFailure(
            f"predicted has dtype {predicted.dtype}; class indices should be integers.",
            "probs.argmax(dim=-1) returns a LongTensor.",
        )
    assert_equal(
        predicted.long(),
        probs.argmax(dim=-1),
        "predicted",
        hint="predicted[b] is the class with the highest probability for image b: "
        f"argmax over dim=-1 of probs = {fmt(probs, precision=3)}.",
    )
