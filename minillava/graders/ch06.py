"""Chapter 6 graders: CLIP (exercises/ch06_clip.py).

Each check compares the learner's function with minillava.clip's arithmetic on small random
inputs, then tests a property every right answer has (scale invariance, log B for a blind model,
padding that changes nothing, probabilities that sum to 1, hard captions whose order does not
matter).
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


# --- similarity_matrix --------------------------------------------------------------------------


def _similarity_diagnosis(got, images, texts, scale) -> str | None:
    """The usual mistake `got` reproduces, if any."""
    by_column = F.normalize(images, dim=0) @ F.normalize(texts, dim=0).T
    times_norm = (images * images.norm(dim=-1, keepdim=True)) @ (
        texts * texts.norm(dim=-1, keepdim=True)
    ).T
    return diagnose(
        got,
        {
            "It looks like you did not normalise: your entries are raw dot products, which "
            "grow with the vectors' lengths, not cosines in [-1, 1].": scale * images @ texts.T,
            "It looks like you forgot to multiply by logit_scale: your entries are bare "
            "cosines in [-1, 1].": _cosines(images, texts),
            "You normalised each column (one feature across the batch), not each ROW (each "
            "vector, along the last dimension).": scale * by_column,
            "You multiplied by the norm instead of dividing by it: long vectors now score even "
            "higher.": scale * times_norm,
        },
    )


SIMILARITY_HINT = (
    "Entry [i, j] is logit_scale times the cosine of image i and text j: divide every row of "
    "both inputs by its L2 norm, compare every image with every text in one matrix product, "
    "then scale."
)


@grader("similarity_matrix", points=2)
def check_similarity_matrix(similarity_matrix):
    """A 2 x 3 hand example, then random (3, E) x (5, E); longer vectors must not score higher."""
    images = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 5.0], [-6.0, -8.0]])
    step("calling similarity_matrix(images (2, 2), texts (3, 2), logit_scale=10.0)")
    got = similarity_matrix(images, texts, 10.0)
    assert_close(
        got,
        10.0 * _cosines(images, texts),
        "similarity_matrix(images, texts, logit_scale=10) for images [[3, 4], [0, 2]] and texts "
        "[[1, 0], [0, 5], [-6, -8]]",
        why_shape="one row per image (2), one column per text (3)",
        diagnosis=_similarity_diagnosis(got, images, texts, 10.0),
        hint=SIMILARITY_HINT,
    )
    images, texts = torch.randn(3, 8), torch.randn(5, 8)
    step("calling similarity_matrix on random images (3, 8) and texts (5, 8), logit_scale=14.3")
    got = similarity_matrix(images, texts, 14.3)
    got = assert_close(
        got,
        14.3 * _cosines(images, texts),
        "similarity_matrix(images (3, 8), texts (5, 8), 14.3)",
        why_shape="(B_img, B_txt) = (3, 5): every image against every text",
        diagnosis=_similarity_diagnosis(got, images, texts, 14.3),
        hint=SIMILARITY_HINT,
    )
    step("calling similarity_matrix with the images made 7 times longer")
    assert_close(
        similarity_matrix(7.0 * images, texts, 14.3),
        got,
        "similarity_matrix(7 * images, texts)",
        diagnosis="Your result changed when the images were made 7 times longer: a cosine "
        "depends only on directions, so lengths still leak into yours.",
        hint="Every vector must be divided by its own length before any product.",
    )


# --- contrastive_loss ---------------------------------------------------------------------------


def _as_scalar(got, what: str) -> torch.Tensor:
    """A loss must be one number: a 0-d tensor (or one element)."""
    got = assert_tensor(got, what)
    if got.numel() != 1:
        raise GradingFailure(
            f"{what} returned a tensor of shape {tuple(got.shape)}, expected a single number "
            "(a 0-d tensor).",
            "Cross-entropy averages over the rows by default: each direction is already one "
            "number, and the loss averages the two.",
        )
    return got.reshape(())


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
    got = _as_scalar(contrastive_loss(image, text, temperature), "contrastive_loss(...)")
    assert_close(
        got,
        expected,
        "contrastive_loss(image, text, temperature=0.07)",
        diagnosis=diagnose(
            got,
            {
                "You only have the image-to-text direction (each image picks its caption): the "
                "text-to-image term, each caption picking its image, is missing; CLIP averages "
                "the two.": F.cross_entropy(logits, targets),
                "You only have the text-to-image direction (each caption picks its image): the "
                "image-to-text term is missing; CLIP averages the two.": F.cross_entropy(
                    logits.T, targets
                ),
                "It looks like the temperature is missing: your logits are bare cosines in "
                "[-1, 1], too flat for a confident softmax.": ref.clip_loss(image @ text.T),
                "You multiplied by the temperature instead of dividing by it: 0.07 flattens the "
                "logits, while its inverse, about 14.3, sharpens them.": ref.clip_loss(
                    image @ text.T * temperature
                ),
                "Your loss is exactly twice the reference: the two directions were added, not "
                "averaged.": 2 * expected,
                "Your loss is 4 times the reference, once per pair of the batch: the "
                "cross-entropies were summed over the batch, not averaged, so the loss would "
                "grow with the batch size.": B * expected,
            },
        ),
        hint="Divide the cosines by the temperature: a B x B table of logits with the true "
        "pairs on the diagonal. Take the cross-entropy of each row (an image picks its caption) "
        "and of each column (a caption picks its image), the diagonal as the targets, and "
        "average the two.",
    )
    same = F.normalize(torch.randn(1, E), dim=-1).expand(5, E)
    step("calling contrastive_loss with 5 identical images and 5 identical texts")
    assert_close(
        _as_scalar(contrastive_loss(same, same, 0.5), "contrastive_loss(...)"),
        torch.tensor(math.log(5)),
        "contrastive_loss when every similarity is equal (an image cannot tell its caption)",
        hint="With every logit equal each softmax is uniform over the 5 candidates, so each "
        "direction's cross-entropy is log 5: the loss is a mean over the batch, not a sum.",
    )
    step("backpropagating through contrastive_loss")
    image = image.clone().requires_grad_(True)
    loss = contrastive_loss(image, text, temperature)
    if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
        raise GradingFailure(
            "The loss is not connected to the embeddings: nothing to train.",
            "Keep the whole computation in torch operations: a Python number, a numpy array or "
            "a detached tensor cuts the graph the gradient flows back through.",
        )


# --- pool_at_eot --------------------------------------------------------------------------------


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
        diagnosis=diagnose(
            got,
            {
                "You took the last position of every row: for each caption shorter than the "
                "longest that is padding, not its last real token.": states[:, -1],
                "You took the first token: in a causal encoder it has read nothing but itself, "
                "while the last real token has read the whole caption.": states[:, 0],
                "You averaged over the real tokens: a different pooling; CLIP reads the state "
                "of the last real token.": (states * mask[..., None]).sum(1)
                / mask.sum(1, keepdim=True),
                "Off by one: you took the position just after the last real token (the first "
                "padding slot); a row with n ones ends at index n - 1.": states[
                    torch.arange(B), (mask.sum(1)).clamp(max=T - 1)
                ],
            },
        ),
        hint="Count the ones in each row of the mask to find where that caption ends, then "
        "take, row by row, the state at its last real token: each row has its own index.",
    )
    step("calling pool_at_eot again with random junk written into the padded positions")
    junk = torch.where(mask[..., None].bool(), states, torch.randn(B, T, C) * 10)
    assert_close(
        pool_at_eot(junk, mask),
        expected,
        "pool_at_eot with junk in the padding",
        diagnosis="Your result changed when only the padding changed: padded positions reach "
        "your output, though they are not part of any caption.",
        hint="Read one position per row, its last real token (count the ones in its row of "
        "the mask to find it); nothing from the padding may enter.",
    )


# --- zero_shot_predict --------------------------------------------------------------------------


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
            + ".",
            "Return two things: each image's predicted class first, then the probabilities.",
        )
    predicted, got_probs = out
    assert_close(
        got_probs,
        probs,
        "probs from zero_shot_predict",
        why_shape="one row per image (5), one column per class (3)",
        diagnosis=diagnose(
            got_probs,
            {
                "Your softmax ran over the images, not over the classes: each column sums to "
                "1, but each IMAGE needs a distribution over the K classes (each row should sum "
                "to 1).": (scale * _cosines(images, classes)).softmax(dim=0),
                "It looks like you did not normalise the embeddings: a class whose embedding is "
                "long wins for every image.": (scale * images @ classes.T).softmax(dim=-1),
                "It looks like you forgot to multiply the cosines by logit_scale: your "
                "probabilities are nearly flat.": _cosines(images, classes).softmax(dim=-1),
            },
        ),
        hint="The scaled cosines of every image with every class are the similarity matrix you "
        "already wrote; then a softmax over the classes, for each image.",
    )
    predicted = assert_shape(
        predicted,
        (5,),
        "predicted",
        why="one class index per image",
        hint="Each image gets one prediction: the position of the largest probability in its "
        "row, searched over the classes, not over the images.",
    )
    if predicted.is_floating_point():
        raise GradingFailure(
            f"predicted has dtype {predicted.dtype}; class indices should be integers.",
            "The position of the largest probability in each row is already an integer (long) "
            "tensor: no conversion is needed.",
        )
    assert_equal(
        predicted.long(),
        probs.argmax(dim=-1),
        "predicted",
        diagnosis=f"Your probabilities were right: {fmt(probs, precision=3, indent=2)}",
        hint="Each image's prediction is the class with the highest probability in that image's "
        "row, the last dimension of probs.",
    )


# --- contrastive_loss_with_hard_negatives (stretch) ---------------------------------------------


def _hard_negative_loss(image, text, hard, scale, hard_first=False, hard_in_t2i=False):
    """The reference, on raw embeddings (and, with a flag, a known mistake)."""
    image, text, hard = (F.normalize(x, dim=-1) for x in (image, text, hard))
    B = image.shape[0]
    targets = torch.arange(B)
    columns = torch.cat([hard, text] if hard_first else [text, hard])  # (B + M, E)
    logits = scale * image @ columns.T  # (B, B + M)
    image_to_text = F.cross_entropy(logits, targets)
    if hard_in_t2i:  # hard caption j made to pick image j, as if it described it
        text_to_image = F.cross_entropy(logits.T, torch.cat([targets, targets]))
    else:
        text_to_image = F.cross_entropy(scale * text @ image.T, targets)
    return (image_to_text + text_to_image) / 2


def _raw_hard_negative_loss(image, text, hard, scale):
    """The loss on embeddings taken as they are, not normalised."""
    B = image.shape[0]
    targets = torch.arange(B)
    logits = scale * image @ torch.cat([text, hard]).T
    text_to_image = F.cross_entropy(scale * text @ image.T, targets)
    return (F.cross_entropy(logits, targets) + text_to_image) / 2


def _hard_negative_diagnosis(got, image, text, hard, scale) -> str | None:
    """The known mistake `got` reproduces, if any (the twin one only when M = B)."""
    loss = _hard_negative_loss
    unit = [F.normalize(x, dim=-1) for x in (image, text, hard)]
    twice = [x / x.norm(dim=-1, keepdim=True) ** 2 for x in (image, text, hard)]
    logits = scale * unit[0] @ torch.cat(unit[1:]).T
    targets = torch.arange(image.shape[0])
    twins = hard.shape[0] == image.shape[0]
    return diagnose(
        got,
        {
            "Your loss ignores the hard captions: it is the plain in-batch loss. Each image must "
            "also be scored against the M hard captions, extra columns it has to rank below its "
            "own caption.": ref.clip_loss(scale * unit[0] @ unit[1].T),
            "Your text-to-image direction includes the hard captions, each made to pick its "
            "twin's image. A hard caption describes no image of the batch (its scene was "
            "changed): it has no right answer there, and belongs to the image-to-text direction "
            "only, as a negative.": loss(image, text, hard, scale, hard_in_t2i=True)
            if twins
            else None,
            "It looks like the logit scale is missing: your logits are bare cosines in [-1, 1], "
            "too flat for a confident softmax.": loss(image, text, hard, 1.0),
            "You divided by the logit scale: it is 1 / temperature, a factor that sharpens the "
            "logits, and dividing by it flattens them.": loss(image, text, hard, 1.0 / scale),
            "It looks like you did not normalise the embeddings: these are raw projections, not "
            "unit vectors, so a long vector wins by its length alone.": _raw_hard_negative_loss(
                image, text, hard, scale
            ),
            "It looks like you divided each embedding by its squared length (by its norm "
            "twice): your vectors have length one over their norm, not 1.": (
                _raw_hard_negative_loss(*twice, scale)
            ),
            "Your targets point at the hard captions: with the hard captions placed before the "
            "batch's own, column i is no longer image i's caption.": loss(
                image, text, hard, scale, hard_first=True
            ),
            "Your loss is exactly twice the reference: the two directions were added, not "
            "averaged.": 2 * loss(image, text, hard, scale),
            "You only have the image-to-text direction: the text-to-image term, each caption "
            "picking its image among the B images, is missing.": F.cross_entropy(logits, targets),
            "You only have the text-to-image direction: the image-to-text term, the only one in "
            "which the hard captions take part, is missing.": F.cross_entropy(
                scale * unit[1] @ unit[0].T, targets
            ),
        },
    )


HARD_NEGATIVES_HINT = (
    "Normalise all three sets of embeddings. Score each image against the batch's B captions "
    "followed by the M hard captions, times logit_scale: image i's target is its own caption, "
    "column i. In the other direction each of the B captions picks its image among the B images "
    "only. Average the two cross-entropies."
)


@grader("contrastive_loss_with_hard_negatives", points=3)
def check_contrastive_loss_with_hard_negatives(contrastive_loss_with_hard_negatives):
    """Stretch: raw embeddings with one twin caption per image, with none (the plain loss), and
    with more hard captions than images; their order does not matter; they get a gradient."""
    fn = contrastive_loss_with_hard_negatives
    what = "contrastive_loss_with_hard_negatives"
    B, E, scale = 4, 8, 10.0
    lengths = torch.tensor([[0.5], [2.0], [1.0], [4.0]])
    image = torch.randn(B, E) * lengths
    text = (F.normalize(image, dim=-1) + 0.8 * torch.randn(B, E)) * lengths.flip(0)
    hard = (F.normalize(text, dim=-1) + 0.5 * torch.randn(B, E)) * 3.0  # twins: near the captions
    step(f"calling {what}(image (4, 8), text (4, 8), hard_text (4, 8), logit_scale=10.0)")
    got = _as_scalar(fn(image, text, hard, scale), what)
    assert_close(
        got,
        _hard_negative_loss(image, text, hard, scale),
        f"{what} with B = 4 pairs and one twin caption per image",
        diagnosis=_hard_negative_diagnosis(got, image, text, hard, scale),
        hint=HARD_NEGATIVES_HINT,
    )

    step(f"calling {what} with no hard captions: hard_text_emb of shape (0, 8)")
    none = torch.zeros(0, E)
    got = _as_scalar(fn(image, text, none, scale), what)
    assert_close(
        got,
        ref.clip_loss(scale * _cosines(image, text)),
        f"{what} with no hard captions (it should be CLIP's plain contrastive loss)",
        hint="With no hard captions there are only the B batch captions, and the loss is the "
        "chapter's contrastive loss. Build the columns so that an empty set of hard captions "
        "adds none.",
    )

    B, M = 3, 7
    image, text, hard = torch.randn(B, E) * 2, torch.randn(B, E), torch.randn(M, E) * 0.3
    step(f"calling {what} with B = {B} pairs and M = {M} hard captions, logit_scale=14.3")
    got = _as_scalar(fn(image, text, hard, 14.3), what)
    reference = assert_close(
        got,
        _hard_negative_loss(image, text, hard, 14.3),
        f"{what} with B = {B} pairs and M = {M} hard captions",
        diagnosis=_hard_negative_diagnosis(got, image, text, hard, 14.3),
        hint=HARD_NEGATIVES_HINT,
    )
    step(f"calling {what} with the same {M} hard captions in another order")
    assert_close(
        _as_scalar(fn(image, text, hard.flip(0), 14.3), what),
        reference,
        f"{what} with the hard captions reversed",
        diagnosis="Reordering the hard captions changed your loss, but they are only "
        "negatives: no target may point at one of them.",
        hint="The targets are the batch captions' columns, whatever comes after them.",
    )

    step(f"backpropagating through {what} to the hard captions")
    hard = hard.clone().requires_grad_(True)
    loss = fn(image, text, hard, torch.tensor(14.3))
    if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
        raise GradingFailure(
            "The loss is not connected to the hard captions' embeddings: they cannot be pushed "
            "away from the images.",
            "Keep the whole computation in torch operations, on the tensors you were given, "
            "and accept a logit scale that is a tensor (the learned one is).",
        )
    (grad,) = torch.autograd.grad(loss.sum(), hard, allow_unused=True)
    if grad is None or not bool(grad.abs().sum() > 0):
        raise GradingFailure(
            "The hard captions get no gradient from your loss: they take no part in it.",
            HARD_NEGATIVES_HINT,
        )
