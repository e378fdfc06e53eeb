"""Chapter 6, CLIP: your exercises.

Fill in each function, then grade it: `minillava grade ch06` (or the `check(...)` cells of
notebooks/06_clip.ipynb). Replace each `raise NotImplementedError(...)` line with your code.
Only torch is needed; `torch.nn.functional` is imported as F.
"""

from __future__ import annotations

import torch  # noqa: F401 - you will need it
import torch.nn.functional as F  # noqa: F401
from torch import Tensor


def similarity_matrix(image_features: Tensor, text_features: Tensor, logit_scale: float) -> Tensor:
    """The image-text similarity matrix CLIP's loss is computed from.

    image_features (B_img, E) and text_features (B_txt, E) come straight out of the two encoders'
    projections: they are NOT unit length yet. Return (B_img, B_txt), entry [i, j] =
    logit_scale * cos(image i, text j).

    Steps:
      1. divide every row of each input by its L2 norm (taken over the last dimension and kept
         as a dimension of size 1, so the division broadcasts), so that a dot product between
         rows is a cosine in [-1, 1];
      2. one matrix product gives all B_img x B_txt cosines at once;
      3. multiply by logit_scale (= 1 / temperature; CLIP learns it, starting at 1 / 0.07).

    Hint: without step 1, a long vector would win every comparison just by being long.
    """
    raise NotImplementedError("similarity_matrix: your code here (chapter 6)")


def contrastive_loss(image_embeds: Tensor, text_embeds: Tensor, temperature: float) -> Tensor:
    """CLIP's symmetric contrastive loss for a batch of B matching (image, caption) pairs.

    image_embeds (B, E) and text_embeds (B, E) are already unit length; row i of one belongs with
    row i of the other. Return a scalar:

      logits = image_embeds text_embedsᵀ / temperature      (B, B), true pairs on the diagonal
      loss   = ( cross_entropy(logits, targets)               each image picks its caption
               + cross_entropy(logitsᵀ, targets) ) / 2        each caption picks its image

    with targets = [0, 1, ..., B-1]: "the right answer for row i is column i".

    Hint: both directions matter. One direction alone lets several captions collapse onto one
    image. And the temperature is not optional: cosines only span [-1, 1], so without dividing by
    a small temperature the softmax can never become confident.
    """
    raise NotImplementedError("contrastive_loss: your code here (chapter 6)")


def pool_at_eot(token_states: Tensor, attention_mask: Tensor) -> Tensor:
    """One vector per caption: the text encoder's state at the caption's last real token.

    token_states (B, T, C): the causal text encoder's output for every position.
    attention_mask (B, T): 1 for a real token, 0 for padding; captions are RIGHT-padded, e.g.
        [1, 1, 1, 1, 0, 0]  -> the last real token (the end-of-text token) is at index 3.
    Return (B, C): row b is token_states[b, last_b].

    Hint: in a causal encoder only the last real token has read the whole caption, and its
    position differs from row to row. The last position of every row is padding for every
    caption but the longest. The count of ones in a row tells you where it ends; then pick one
    position per row with two index tensors side by side: the row numbers 0 .. B-1, and each
    row's last position.
    """
    raise NotImplementedError("pool_at_eot: your code here (chapter 6)")


def zero_shot_predict(
    image_embeds: Tensor, class_embeds: Tensor, logit_scale: float = 100.0
) -> tuple[Tensor, Tensor]:
    """Zero-shot classification: label each image with its most similar class prompt.

    image_embeds (B, E): one per image. class_embeds (K, E): one per class, the text encoder's
    embedding of a prompt such as "a red circle.". Neither is guaranteed to be unit length (an
    average of several prompts' embeddings, for instance, is shorter than 1).
    Return (predicted (B,) long, probs (B, K)): probs[b] is a softmax over the K classes of
    logit_scale * cos(image b, class k), predicted[b] its argmax.

    Hint: similarity_matrix above does most of the work. Which dimension does the softmax run
    over: the classes or the images?
    """
    raise NotImplementedError("zero_shot_predict: your code here (chapter 6)")


def contrastive_loss_with_hard_negatives(
    image_emb: Tensor, text_emb: Tensor, hard_text_emb: Tensor, logit_scale: float | Tensor
) -> Tensor:
    """Stretch: CLIP's contrastive loss, with extra captions that match no image of the batch.

    In a random batch, colour and count nearly always tell two captions apart, so CLIP never
    has to look at shape: it learns what the batch asks of it, and a batch of easy negatives asks
    little ("bag of words", Yuksekgonul et al., 2023). A *hard negative* caption is almost right:
    the twin of a true caption with one shape swapped ("a red square" for a red circle's image).
    NegCLIP (same paper) fine-tunes CLIP with such swapped captions as extra negatives.

    image_emb (B, E), text_emb (B, E): B matching pairs, row i with row i, straight out of the
        projections: NOT unit length yet.
    hard_text_emb (M, E): M captions that describe no image of the batch (M may be 0; in the
        cpu preset's clip stage, one shape-swapped twin per image: M = B). Not unit length.
    logit_scale: 1 / temperature, a float or a 0-d tensor (CLIP learns it: keep it in the graph).
    Return a scalar, the average of two cross-entropies:

      image to text: each image scored against the B batch captions followed by the M hard
          captions, (B, B + M) scaled cosines; image i's target is column i, its own caption;
      text to image: each batch caption scored against the B images, (B, B); caption i's
          target is image i. The hard captions take no part: they have no image to pick.

    With M = 0 this is exactly contrastive_loss above (on normalised embeddings, with the
    temperature 1 / logit_scale). The hard captions can only add to the loss: every one of them
    is another wrong answer the image has to rank below its own caption.
    """
    raise NotImplementedError(
        "contrastive_loss_with_hard_negatives: your code here (chapter 6, stretch)"
    )
