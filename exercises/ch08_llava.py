"""Chapter 8, LLaVA: your exercises. Fill each function, then run `minillava grade ch08`.

You wire the eyes (ViT), the bridge (projector) and the brain (decoder) together: put an image's
P vectors where its <image> token stands, build the labels of that longer sequence, pick the
right ViT features, and freeze the parts that stage 1 must not change. Compare with
minillava/llava.py (splice_image_tokens, Llava.encode_images, Llava.freeze_*).

Shapes: T tokens in the prompt, C the decoder's hidden size, P image positions (one per patch),
B batch, N patches, L ViT layers.
"""

from __future__ import annotations

from torch import Tensor, nn


def splice_image(
    input_ids: Tensor, token_embeds: Tensor, image_features: Tensor, image_token_id: int
) -> Tensor:
    """Replace the single <image> token of one sample by the image's P feature vectors.

    input_ids (T,): token ids with exactly one `image_token_id` somewhere.
    token_embeds (T, C): their embeddings (what embed_tokens made of input_ids).
    image_features (P, C): the projected image, one vector per patch.
    Returns (T - 1 + P, C): the text before the placeholder, then the P image vectors, then the
    text after it. The placeholder itself disappears: its embedding is a meaningless vector.

        ids     [s0 s1 <image> q0 q1]        P = 3
        out     [s0 s1 i0 i1 i2 q0 q1]       5 - 1 + 3 = 7 rows

    Hint: first find the placeholder's position (compare the ids with image_token_id, then ask
    where that comparison holds: nonzero). Then torch.cat three pieces: the rows before the
    placeholder, the image, the rows after it. Watch the bounds: the placeholder's own row
    belongs to neither piece of text.
    """
    raise NotImplementedError


def build_labels(
    input_ids: Tensor,
    answer_mask: Tensor,
    image_token_id: int,
    num_image_tokens: int,
    ignore_index: int = -100,
) -> Tensor:
    """The labels of the spliced sequence: a token id where the loss is computed, else -100.

    input_ids (T,): one row of a batch (it may end in padding, and may hold several <image>s).
    answer_mask (T,) bool: True on the assistant's answer tokens (what tokenizer.render's mask
        says); False on the system line, the user's turns, the <image> token and the padding.
    Returns (T + (P - 1) * n_images,) long, aligned with the spliced sequence (splice_image):
        - each <image> token becomes P positions, all `ignore_index`: nobody asks the model to
          predict pixels, and there is no "correct" vector to predict there anyway;
        - every other position keeps its token id where answer_mask is True, else ignore_index.

        ids     [s0 <image> q0 A0 A1 pad]    mask [F F F T T F]     P = 3
        labels  [-100 -100 -100 -100 -100 A0 A1 -100]

    The decoder shifts labels by one itself (position t is scored on predicting labels[t + 1]).
    """
    raise NotImplementedError


def select_patch_features(hidden_states: tuple[Tensor, ...], layer: int = -2) -> Tensor:
    """The image features LLaVA-1.5 feeds its projector.

    hidden_states: the ViT's L + 1 hidden states, each (B, 1 + N, C): index 0 is the embedding
        output, index i the output of block i; position 0 of every state is the [CLS] token.
    layer: which hidden state; -2 = the penultimate one (LLaVA-1.5's choice: the last layer is
        specialised for CLIP's contrastive objective, the one before is more general).
    Returns (B, N, C): the N patch tokens of that layer, without [CLS] (one global summary token
    would carry no position in the image; the projector wants one vector per patch).
    """
    raise NotImplementedError


def freeze_for_alignment(model: nn.Module) -> None:
    """Set up stage 1 (alignment): only the projector learns.

    model: a minillava Llava, with parts `model.vision_tower`, `model.projector` and
    `model.language_model`. Afterwards every parameter of the projector has requires_grad=True
    and every parameter of the other two parts requires_grad=False (whatever they were before).
    Return nothing: change the model in place.

    Careful: model.eval does not freeze anything (it switches dropout and the like), and
    torch.no_grad only lasts as long as its `with` block.
    Hint: a module's requires_grad_ method sets the flag of every parameter it holds at once,
    its submodules' included.
    """
    raise NotImplementedError


def splice_batch(
    input_ids: Tensor,
    token_embeds: Tensor,
    image_features: Tensor,
    image_token_id: int,
    attention_mask: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
) -> tuple[Tensor, Tensor, Tensor]:
    """Stretch exercise: splice a whole batch, rows with any number of images (0, 1, 2, ...).

    Multi-image LLaVA variants (LLaVA-NeXT-Interleave, LLaVA-OneVision) train on conversations
    like "<image> and <image>: which one has more circles?", and a batch mixes them with
    text-only rows. This is what the library's splice_image_tokens does for training:

    input_ids (B, T), token_embeds (B, T, C): the prompts, right-padded to the longest.
    image_features (N_img, P, C): every image of the batch, in the order their <image> tokens
        appear, row 0 first: row 0's images, then row 1's, and so on (a row without an
        <image> takes none).
    attention_mask (B, T): 1 on real tokens, 0 on padding.
    labels (B, T): each token's target, ignore_index where it is not scored.

    Returns (inputs_embeds (B, T', C), attention_mask (B, T'), labels (B, T')):
        - in each row, every <image> replaced by its image's P vectors, as splice_image does;
        - each row then padded on the RIGHT to T', the longest spliced row: zero vectors,
          attention mask 0 (long), label ignore_index;
        - labels: a text position keeps its token's label; each image position and each
          padding position gets ignore_index, whatever the incoming labels held at the
          <image> token or at the padding (labels copied from the ids hold ids there).

        row 0  [s0 <image> q0 A0]        ->  [s0 i0 i0 q0 A0 ·]    mask [1 1 1 1 1 0]
        row 1  [s0 q0 A0 pad]            ->  [s0 q0 A0 · · ·]      mask [1 1 1 0 0 0]
        row 2  [<image> q0 <image> A0]   ->  [i1 i1 q0 i2 i2 A0]   mask [1 1 1 1 1 1]
        (P = 2; iN: a vector of image N; ·: padding; T' = 6, the longest spliced row)

    Raise a ValueError naming both numbers when the <image> tokens of the real positions and
    the images do not match in number. Keep gradients flowing to image_features: the projector
    learns through them.
    """
    raise NotImplementedError("splice_batch: your code here (chapter 8, stretch)")
