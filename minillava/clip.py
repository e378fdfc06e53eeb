"""CLIP: teaching the Eyes with captions (chapter 6).

Two encoders map their inputs into one shared embedding space of E dimensions:

    images (B, 3, S, S) -> VisionTransformer -> [CLS] token (B, C_v) -> visual_projection -> (B, E)
    texts  (B, T)       -> TextEncoder       -> last token  (B, C_t) -> text_projection   -> (B, E)

Both embeddings are L2-normalised, so `image_i . text_j` is a cosine similarity in [-1, 1]. For a
batch of B matching (image, caption) pairs we want the B x B similarity matrix to be large on the
diagonal (the true pairs) and small everywhere else. CLIP turns this into classification in both
directions: each image must pick its own caption among the B captions of the batch, and each
caption its own image among the B images. That is cross-entropy with targets 0, 1, ..., B-1 over
the rows and over the columns of the matrix, averaged (`clip_loss`). Every other pair in the batch
serves as a negative example, which is why CLIP likes large batches.

Before the softmax the cosines are multiplied by a learned scale, exp(logit_scale) = 1/temperature:
cosines only span [-1, 1], far too flat for a confident choice among B candidates. CLIP starts at
temperature 0.07 (scale 14.3) and caps the scale at 100 so training cannot make it explode.

Several processes (DDP): each holds a share of the batch, and a loss over its own share alone
would give each image B / N captions to choose from instead of B. So in training the embeddings
are gathered from every process first (`gather_batch`), and each one computes the loss of the
whole batch, exactly as a single process would.

Once trained, the text encoder turns class names into a classifier with no further training: embed
"a red circle", "a blue square", ... once, then label each image by its most similar text
(`zero_shot_classify`).

With `minillava train --parts exercises` your chapter 6 contrastive_loss computes the loss
instead of `clip_loss` (minillava/parts.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minillava import parts
from minillava.attention import causal_mask, padding_mask
from minillava.vit import EncoderBlock, VisionTransformer, ViTConfig, init_clip_weights

MAX_LOGIT_SCALE = math.log(100.0)  # the cap on exp(logit_scale): temperature never below 0.01


# ---------------------------------------------------------------------------------------------
# The text encoder
# ---------------------------------------------------------------------------------------------


@dataclass
class TextEncoderConfig:
    vocab_size: int = 1024
    max_len: int = 64  # longest caption, in tokens (one learned position embedding per slot)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    dropout: float = 0.0
    use_sdpa: bool = True

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"TextEncoderConfig: hidden_size={self.hidden_size} must be divisible by "
                f"num_heads={self.num_heads}"
            )


def last_token_index(attention_mask: Tensor) -> Tensor:
    """(B, T) 1/0 mask -> (B,) index of each row's last real token (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    # Real tokens keep their position, padding becomes 0: the largest value is the last real one.
    return (attention_mask.long() * positions).argmax(dim=1)


class TextEncoder(nn.Module):
    """A small causal transformer over token ids: (B, T) -> one embedding per text, (B, C).

    As in GPT, each token attends only to itself and the tokens before it (a causal mask), and
    never to padding. So the last real token of a caption, the end-of-text token when the tokenizer
    appends one, is the only position that has read the whole caption: CLIP takes its final hidden
    state (after a last LayerNorm) as the caption's embedding. Whatever comes after it, padding or
    anything else, cannot change the result.
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_len, config.hidden_size)
        self.blocks = nn.ModuleList(
            EncoderBlock(
                config.hidden_size,
                config.num_heads,
                config.intermediate_size,
                eps=config.layer_norm_eps,
                act=config.hidden_act,
                dropout=config.dropout,
                use_sdpa=config.use_sdpa,
            )
            for _ in range(config.num_layers)
        )
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        init_clip_weights(self, config.num_layers)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """input_ids (B, T), attention_mask (B, T) 1 = token, 0 = padding -> (B, C)."""
        states = self.token_states(input_ids, attention_mask)  # (B, T, C)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        last = last_token_index(attention_mask)  # (B,)
        return states[torch.arange(states.shape[0], device=states.device), last]  # (B, C)

    def token_states(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Every token's final state, (B, T, C): state t has read tokens 0..t only."""
        self._check_inputs(input_ids, attention_mask)
        length = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # Positions count real tokens only, so left padding does not shift a caption's positions.
        position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        x = self.token_embedding(input_ids) + self.position_embedding(position_ids)  # (B, T, C)
        # Query i may look at key j when j <= i (causal) and j is a real token (not padding).
        mask = causal_mask(length, device=input_ids.device) & padding_mask(attention_mask)
        for block in self.blocks:
            x = block(x, mask=mask)  # mask (B, 1, T, T) broadcasts over the heads
        return self.final_layer_norm(x)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> None:
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_len:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens per row, more than "
                f"TextEncoderConfig.max_len={self.config.max_len}"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )


# ---------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------


@dataclass
class CLIPConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    embed_dim: int = 128  # E: the shared image-text space
    init_temperature: float = 0.07


@dataclass
class CLIPOutput:
    loss: Tensor | None  # clip_loss of the logits; None when the image and text counts differ
    logits_per_image: Tensor  # (B_img, B_txt): row i scores image i against every text
    logits_per_text: Tensor  # (B_txt, B_img) = logits_per_image.T
    image_embeds: Tensor  # (B_img, E), L2-normalised
    text_embeds: Tensor  # (B_txt, E), L2-normalised


class _GatherBatch(torch.autograd.Function):
    """all_gather along the batch, with a backward that sends each process its rows' gradient.

    Every process computes the same loss from the gathered batch, so the gradient on process
    r's rows is the sum of what every process's loss sends them (all_reduce), N times the
    gradient of the one loss; DDP's average over the N processes then makes it exact.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)  # (N * B_local, ...), process 0's rows first

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over processes (gloo and NCCL both have it)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def gather_batch(x: Tensor) -> Tensor:
    """(B_local, E) -> (B, E): this process's rows and every other's (itself when alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherBatch.apply(x)


def clip_loss(logits_per_image: Tensor) -> Tensor:
    """Symmetric cross-entropy: image i should pick text i, and text i should pick image i.

    logits_per_image (B, B) with the matching pairs on the diagonal. For uniform logits (an
    untrained model) the loss is log(B): each choice is a guess among B.
    """
    if logits_per_image.ndim != 2 or logits_per_image.shape[0] != logits_per_image.shape[1]:
        raise ValueError(
            f"logits_per_image must be square (B, B), got {tuple(logits_per_image.shape)}"
        )
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    image_to_text = F.cross_entropy(logits_per_image, targets)  # each row picks a text
    text_to_image = F.cross_entropy(logits_per_image.T, targets)  # each column picks an image
    return (image_to_text + text_to_image) / 2


class CLIP(nn.Module):
    """An image encoder and a text encoder trained to agree on which caption fits which image."""

    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config.vision)
        self.text_model = TextEncoder(config.text)
        # No bias: the embeddings are normalised next, only their direction matters.
        self.visual_projection = nn.Linear(config.vision.hidden_size, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.text.hidden_size, config.embed_dim, bias=False)
        nn.init.normal_(self.visual_projection.weight, std=config.vision.hidden_size**-0.5)
        nn.init.normal_(self.text_projection.weight, std=config.text.hidden_size**-0.5)
        # Learn log(1 / temperature), not the temperature itself: it stays positive for free and
        # gradient steps act on it multiplicatively.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))

    def scale(self) -> Tensor:
        """exp(logit_scale) = 1 / temperature, clamped to [1, 100] as in CLIP."""
        return self.logit_scale.clamp(0.0, MAX_LOGIT_SCALE).exp()

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, E), unit length."""
        pooled = self.vision_model(pixel_values).pooled_output  # (B, C_v)
        return F.normalize(self.visual_projection(pooled), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """(B, T) -> (B, E), unit length."""
        pooled = self.text_model(input_ids, attention_mask)  # (B, C_t)
        return F.normalize(self.text_projection(pooled), dim=-1)

    def forward(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> CLIPOutput:
        image_embeds = self.encode_image(pixel_values)  # (B_img, E)
        text_embeds = self.encode_text(input_ids, attention_mask)  # (B_txt, E)
        if self.training:  # under DDP: contrast against the whole batch, not this share of it
            image_embeds, text_embeds = gather_batch(image_embeds), gather_batch(text_embeds)
        scale = self.scale()
        logits_per_image = scale * image_embeds @ text_embeds.T  # scaled cosines
        loss = None
        if logits_per_image.shape[0] == logits_per_image.shape[1]:  # B matching pairs
            yours = parts.get("contrastive_loss")  # a learner's, if chosen (parts.py)
            if yours is None:
                loss = clip_loss(logits_per_image)
            else:  # the temperature as a tensor, so that the learned scale still learns
                loss = yours(image_embeds, text_embeds, 1.0 / scale)
        return CLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
        )


@torch.no_grad()
def zero_shot_classify(
    model: CLIP,
    pixel_values: Tensor,
    class_input_ids: Tensor,
    class_attention_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Classify images by their most similar class description, with no classifier training.

    pixel_values (B, 3, S, S); class_input_ids (K, T), one tokenised prompt per class, e.g.
    "a photo of a red circle". Returns (predicted class (B,), probabilities (B, K)).
    """
    was_training = model.training
    model.eval()
    image_embeds = model.encode_image(pixel_values)  # (B, E)
    class_embeds = model.encode_text(class_input_ids, class_attention_mask)  # (K, E)
    model.train(was_training)
    probs = (model.scale() * image_embeds @ class_embeds.T).softmax(dim=-1)  # (B, K)
    return probs.argmax(dim=-1), probs


# ---------------------------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------------------------


def _to_displayable(image) -> object:
    """A PIL image passes through; a (3, H, W) tensor is min-max scaled to [0, 1] as (H, W, 3)."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu()
        image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-8)
        return image.permute(1, 2, 0).numpy()
    return image


def similarity_heatmap(
    logits: Tensor,
    image_labels: Sequence[str] | None = None,
    text_labels: Sequence[str] | None = None,
    images: Sequence | Tensor | None = None,
    title: str = "image-text similarity",
    annotate: bool | None = None,
    ax=None,
):
    """Plot a (N_images, N_texts) similarity matrix, e.g. `CLIPOutput.logits_per_image`.

    Rows are images, columns texts; after CLIP training the matching pairs light up. `images`
    (PIL images or (3, H, W) tensors) are drawn as thumbnails left of their rows. Values are
    written in the cells when `annotate` is True (default: when the matrix is at most 10 x 10).
    Returns the matplotlib Figure.
    """
    import matplotlib.pyplot as plt  # imported here: training never needs matplotlib

    values = logits.detach().float().cpu().numpy()
    if values.ndim != 2:
        raise ValueError(f"logits must have shape (N_images, N_texts), got {values.shape}")
    n_images, n_texts = values.shape
    if ax is None:
        width = 2.5 + 0.8 * n_texts + (0.8 if images is not None else 0.0)
        fig, ax = plt.subplots(figsize=(width, 2.0 + 0.6 * n_images), layout="constrained")
    else:
        fig = ax.figure
    mesh = ax.imshow(values, cmap="viridis", aspect="auto")
    fig.colorbar(mesh, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n_texts))
    ax.set_xticklabels(text_labels or range(n_texts), rotation=45, ha="right")
    ax.set_yticks(range(n_images))
    ax.set_yticklabels(image_labels or range(n_images))
    if annotate is None:
        annotate = n_images <= 10 and n_texts <= 10
    if annotate:
        middle = (values.max() + values.min()) / 2
        for i in range(n_images):
            for j in range(n_texts):
                colour = "black" if values[i, j] > middle else "white"
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color=colour)
    if images is not None:
        # Thumbnails in a strip left of the matrix, one per row (the trick from CLIP's notebook).
        for i, image in enumerate(images):
            ax.imshow(_to_displayable(image), extent=(-1.6, -0.6, i + 0.5, i - 0.5))
        ax.set_xlim(-1.6, n_texts - 0.5)
        ax.set_ylim(n_images - 0.5, -0.5)
        if image_labels is None:
            ax.set_yticks([])
    ax.set_title(title)
    return fig
