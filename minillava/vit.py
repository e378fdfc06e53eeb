"""The Eyes: a CLIP-style Vision Transformer, written to be read (chapter 5).

A Vision Transformer reads an image as a sentence whose words are patches:

    pixel_values                                                        (B, 3, H, W)
      -> cut into a grid of p x p patches, each flattened and multiplied
         by one learned matrix (PatchEmbedding, a stride-p convolution)  (B, N, C)   N = (H/p)(W/p)
      -> put a learned [CLS] token in front                             (B, 1 + N, C)
      -> add a learned position embedding to every slot                 (B, 1 + N, C)
      -> pre_layernorm (CLIP's extra LayerNorm before the first block)
      -> num_layers x EncoderBlock:  x = x + Attention(LN(x))
                                     x = x + MLP(LN(x))                 (B, 1 + N, C)
      -> post_layernorm of the [CLS] token = pooled_output              (B, C)

CLIP uses `pooled_output` (after a projection, see clip.py) as the embedding of the whole image.
LLaVA uses something else: the *patch* tokens of the *penultimate* layer,
`hidden_states[-2][:, 1:]`, one feature vector per image region, taken before the last layer
specialised them for CLIP's image-vs-caption objective (`VisionTransformer.patch_features`).

Parameter names follow Hugging Face's `CLIPVisionModel` one to one (minillava.interop maps them),
and so does the arithmetic: the same weights give the same numbers in both.

With `minillava train --parts exercises` your chapter 5 patchify and add_cls_and_positions run
in the embeddings below instead of the library's (minillava/parts.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange
from torch import Tensor

from minillava import parts
from minillava.attention import attention, manual_attention

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass
class ViTConfig:
    image_size: int = 64  # images are image_size x image_size pixels
    patch_size: int = 8  # each token covers a patch_size x patch_size square
    num_channels: int = 3  # RGB
    hidden_size: int = 128  # C: the width of every token
    num_layers: int = 4
    num_heads: int = 4  # hidden_size is split into num_heads heads of hidden_size // num_heads
    intermediate_size: int = 512  # the MLP's hidden width (4 x hidden_size, as in CLIP)
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"  # CLIP's activation; "gelu" also accepted
    dropout: float = 0.0  # on attention weights and on each residual branch, training only
    use_sdpa: bool = True  # False: the hand-written attention path

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"ViTConfig: image_size={self.image_size} must be a multiple of "
                f"patch_size={self.patch_size}, so the patches tile the image exactly"
            )
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"ViTConfig: hidden_size={self.hidden_size} must be divisible by "
                f"num_heads={self.num_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"ViTConfig: hidden_act={self.hidden_act!r}, expected one of {ACTIVATIONS}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ViTOutput:
    last_hidden_state: Tensor  # (B, 1 + N, C), [CLS] first
    pooled_output: Tensor  # (B, C) = post_layernorm(last_hidden_state[:, 0])
    hidden_states: tuple[Tensor, ...]  # num_layers + 1 tensors (B, 1 + N, C): [0] = embeddings
    # after pre_layernorm, [i] = output of block i (Hugging Face CLIP's convention)
    attentions: tuple[Tensor, ...] | None = None  # (B, H, 1 + N, 1 + N) per layer, on request


# ---------------------------------------------------------------------------------------------
# From pixels to tokens
# ---------------------------------------------------------------------------------------------


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """Cut images into non-overlapping patches and flatten each one: (B, C, H, W) -> (B, N, p*p*C).

    Patches are numbered row by row (left to right, then top to bottom), N = (H/p) * (W/p). Each
    patch vector lists the patch's pixels row by row, with the channels innermost, (p1, p2, c), as
    in the ViT paper. Handy for pictures: `patchify(x, 8)[0, 5]` is patch 5 of image 0.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"image height and width ({height}, {width}) must be multiples of "
            f"patch_size={patch_size}"
        )
    return rearrange(
        images, "b c (gh p1) (gw p2) -> b (gh gw) (p1 p2 c)", p1=patch_size, p2=patch_size
    )


def unpatchify(patches: Tensor, patch_size: int, num_channels: int = 3) -> Tensor:
    """The inverse of `patchify` for square images: (B, N, p*p*C) -> (B, C, H, W)."""
    if patches.ndim != 3 or patches.shape[-1] != patch_size * patch_size * num_channels:
        raise ValueError(
            f"patches must have shape (B, N, {patch_size * patch_size * num_channels}) for "
            f"patch_size={patch_size}, num_channels={num_channels}; got {tuple(patches.shape)}"
        )
    grid = math.isqrt(patches.shape[1])
    if grid * grid != patches.shape[1]:
        raise ValueError(f"unpatchify needs a square grid of patches, got N={patches.shape[1]}")
    return rearrange(
        patches,
        "b (gh gw) (p1 p2 c) -> b c (gh p1) (gw p2)",
        gh=grid,
        p1=patch_size,
        p2=patch_size,
        c=num_channels,
    )


class PatchEmbedding(nn.Conv2d):
    """Patches to tokens, as one strided convolution: (B, C_in, H, W) -> (B, N, C).

    The textbook recipe: cut the image into p x p patches, flatten each into a vector of p*p*C_in
    numbers (`patchify`), and multiply every vector by the same learned (C, p*p*C_in) matrix W.
    A Conv2d with kernel_size = stride = p computes exactly that: its kernel visits each patch
    once, never overlapping, and each output channel is a dot product between one kernel (one row
    of W, reshaped) and the patch's pixels. So "unfold + linear" and "stride-p conv" are the same
    map, with the same weights:

        PatchEmbedding(images) == patchify(images, p) @ patch_embedding.linear_weight().T

    (tests/test_vit.py checks it). We write it as a conv because that is faster and is what CLIP
    does, so CLIP's weights load unchanged. No bias, as in CLIP: the position embedding added next
    already gives every token a learned offset.
    """

    def __init__(self, num_channels: int, hidden_size: int, patch_size: int):
        super().__init__(
            num_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=False
        )

    def forward(self, images: Tensor) -> Tensor:
        yours = parts.get("patchify")  # a learner's, if chosen (parts.py)
        if yours is not None:  # the textbook recipe, with the learner's patches: the same map
            return yours(images, self.stride[0]) @ self.linear_weight().T  # (B, N, C)
        grid = super().forward(images)  # (B, C, H/p, W/p): one C-vector per patch
        return rearrange(grid, "b c gh gw -> b (gh gw) c")  # (B, N, C), patches row by row

    def linear_weight(self) -> Tensor:
        """The same weights as a (C, p*p*C_in) matrix acting on `patchify`'s patch vectors."""
        return rearrange(self.weight, "c_out c_in p1 p2 -> c_out (p1 p2 c_in)")


def add_cls_and_positions(
    patch_tokens: Tensor, cls_token: Tensor, position_embeddings: Tensor
) -> Tensor:
    """[CLS, patch_1, ..., patch_N] + positions: (B, N, C), (C,), (1 + N, C) -> (B, 1 + N, C)."""
    cls = cls_token.expand(patch_tokens.shape[0], 1, -1)  # (B, 1, C): the same for every image
    tokens = torch.cat([cls, patch_tokens], dim=1)  # (B, 1 + N, C)
    return tokens + position_embeddings  # (1 + N, C) broadcast over the batch


class VisionEmbeddings(nn.Module):
    """Pixels -> the sequence the transformer reads: [CLS, patch_1, ..., patch_N] + positions."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.patch_embedding = PatchEmbedding(
            config.num_channels, config.hidden_size, config.patch_size
        )
        # A learned token that sees no pixels of its own: after the blocks it holds whatever its
        # attention gathered from the patches, a summary of the whole image.
        self.class_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        # Attention treats its input as a *set*: shuffle the patches and the outputs are merely
        # shuffled (tests/test_vit.py shows it). One learned vector per slot tells each token where
        # in the image it came from. Slot 0 is the [CLS] token's.
        self.position_embedding = nn.Embedding(config.num_patches + 1, config.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        patches = self.patch_embedding(pixel_values)  # (B, N, C)
        cls = self.class_embedding.to(patches.dtype)  # (C,)
        # The library's add_cls_and_positions, or a learner's (parts.py).
        add = parts.get("add_cls_and_positions", add_cls_and_positions)
        return add(patches, cls, self.position_embedding.weight)  # (B, 1 + N, C)


# ---------------------------------------------------------------------------------------------
# The transformer block
# ---------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the cheap approximation of GELU that OpenAI's CLIP was trained with.

    Keep it to reproduce CLIP's numbers; exact GELU (`nn.GELU`) differs by up to ~0.02.
    """

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def get_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"activation {name!r} not known, expected one of {ACTIVATIONS}")


class SelfAttention(nn.Module):
    """Multi-head self-attention: every token builds a weighted average of all tokens' values.

    Each of the H heads gets its own D = C / H dimensional slice of the queries, keys and values,
    so different heads can look for different things (colour, an edge, the same object).
    """

    def __init__(
        self, hidden_size: int, num_heads: int, dropout: float = 0.0, use_sdpa: bool = True
    ):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.use_sdpa = use_sdpa
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, output_attentions: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """x (B, T, C) -> (output (B, T, C), weights (B, H, T, T) if output_attentions else None).

        `mask` is boolean, broadcastable to (B, H, T, T), True where a query may attend to a key.
        """
        # (B, T, C) -> (B, H, T, D): split the channels into heads
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", h=self.num_heads)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", h=self.num_heads)
        dropout_p = self.dropout if self.training else 0.0
        if output_attentions:
            # Fused kernels never materialise the (T, T) weights: take the path that does.
            out, weights = manual_attention(q, k, v, mask=mask, dropout_p=dropout_p)
        else:
            out = attention(q, k, v, mask=mask, dropout_p=dropout_p, use_sdpa=self.use_sdpa)
            weights = None
        out = rearrange(out, "b h t d -> b t (h d)")  # heads side by side again: (B, T, C)
        return self.out_proj(out), weights


class MLP(nn.Module):
    """The per-token feed-forward network: C -> intermediate_size -> C."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "quick_gelu"):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.act = get_activation(act)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderBlock(nn.Module):
    """One pre-LayerNorm transformer block: attention mixes tokens, the MLP transforms each one.

        x = x + Attention(norm1(x))     tokens exchange information
        x = x + MLP(norm2(x))           each token is processed on its own

    "Pre-norm" means the LayerNorm sits inside each residual branch, so the residual stream x
    itself is never normalised: gradients flow straight through the additions, which keeps deep
    stacks trainable without a careful warm-up. The ViT uses it with no mask (every patch sees
    every patch); the CLIP text encoder reuses it with a causal mask.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        eps: float = 1e-5,
        act: str = "quick_gelu",
        dropout: float = 0.0,
        use_sdpa: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.attn = SelfAttention(hidden_size, num_heads, dropout=dropout, use_sdpa=use_sdpa)
        self.norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = MLP(hidden_size, intermediate_size, act=act)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: Tensor, mask: Tensor | None = None, output_attentions: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, T, C) -> (B, T, C); with output_attentions, also the weights (B, H, T, T)."""
        attn_out, weights = self.attn(self.norm1(x), mask=mask, output_attentions=output_attentions)
        x = x + self.dropout(attn_out)
        x = x + self.dropout(self.mlp(self.norm2(x)))
        return (x, weights) if output_attentions else x


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def init_clip_weights(model: nn.Module, num_layers: int) -> None:
    """Initialise like OpenAI's CLIP: small normal weights, scaled so signals keep their size.

    Embeddings (patch, position, token) and plain Linear layers: N(0, 0.02); biases 0; LayerNorms
    start as the identity; the [CLS] vector N(0, 1/C). Inside the blocks a weight reading a
    C-dimensional input gets std 1/sqrt(C) (1/sqrt(2C) for fc1), so its outputs have about unit
    variance; the two layers that write back into the residual stream (out_proj, fc2) are further
    shrunk by 1/sqrt(2 * num_layers): the stream sums 2 * num_layers branches, and this keeps its
    variance from growing with depth.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, nn.Conv2d)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    residual_scale = (2 * num_layers) ** -0.5
    for module in model.modules():  # the block-specific scales override the defaults above
        if isinstance(module, SelfAttention):
            width = module.q_proj.in_features
            for proj in (module.q_proj, module.k_proj, module.v_proj):
                nn.init.normal_(proj.weight, std=width**-0.5)
            nn.init.normal_(module.out_proj.weight, std=width**-0.5 * residual_scale)
        elif isinstance(module, MLP):
            width = module.fc1.in_features
            nn.init.normal_(module.fc1.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(module.fc2.weight, std=width**-0.5 * residual_scale)
        elif isinstance(module, VisionEmbeddings):
            nn.init.normal_(module.class_embedding, std=module.class_embedding.numel() ** -0.5)


class VisionTransformer(nn.Module):
    """CLIP's image encoder: pixel_values (B, 3, S, S) -> ViTOutput (see the top of this file)."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.pre_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
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
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        init_clip_weights(self, config.num_layers)

    def embed(self, pixel_values: Tensor) -> Tensor:
        """Pixels (B, 3, S, S) -> what the first block reads, hidden_states[0] (B, 1 + N, C)."""
        self._check_pixel_values(pixel_values)
        pixel_values = pixel_values.to(self.embeddings.patch_embedding.weight.dtype)
        return self.pre_layernorm(self.embeddings(pixel_values))

    def forward(self, pixel_values: Tensor, output_attentions: bool = False) -> ViTOutput:
        x = self.embed(pixel_values)  # (B, 1 + N, C)
        hidden_states = [x]
        attentions = []
        for block in self.blocks:
            if output_attentions:
                x, weights = block(x, output_attentions=True)
                attentions.append(weights)  # (B, H, 1 + N, 1 + N)
            else:
                x = block(x)
            hidden_states.append(x)
        pooled_output = self.post_layernorm(x[:, 0])  # the [CLS] token: (B, C)
        return ViTOutput(
            last_hidden_state=x,
            pooled_output=pooled_output,
            hidden_states=tuple(hidden_states),
            attentions=tuple(attentions) if output_attentions else None,
        )

    def patch_features(self, pixel_values: Tensor, layer: int = -2) -> Tensor:
        """What LLaVA feeds its projector: hidden_states[layer] without [CLS], (B, N, C).

        Only the blocks up to `layer` run: with the default -2, the last block's output would be
        thrown away, so it is not computed (a 1 / num_layers saving of the ViT's work).
        """
        num_states = self.config.num_layers + 1  # the embeddings, then one per block
        if not -num_states <= layer < num_states:
            raise ValueError(
                f"layer={layer} is not one of the ViT's {num_states} hidden states "
                f"(-{num_states} .. {num_states - 1})"
            )
        x = self.embed(pixel_values)  # hidden_states[0]
        for block in self.blocks[: layer % num_states]:  # hidden_states[i] = output of block i
            x = block(x)
        return x[:, 1:]  # drop [CLS]

    def _check_pixel_values(self, pixel_values: Tensor) -> None:
        c, s = self.config.num_channels, self.config.image_size
        expected = f"(B, {c}, {s}, {s}) (ViTConfig num_channels={c}, image_size={s})"
        if not isinstance(pixel_values, Tensor):
            raise TypeError(f"pixel_values must be a tensor of shape {expected}")
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, s, s):
            raise ValueError(
                f"pixel_values must have shape {expected}, got {tuple(pixel_values.shape)}"
            )
        if not pixel_values.is_floating_point():
            raise TypeError(
                f"pixel_values must be a float tensor (normalised images, see "
                f"minillava.data.image_processor), got dtype {pixel_values.dtype}"
            )


class ViTClassifier(nn.Module):
    """A ViT with a linear head on its pooled [CLS] output: (B, 3, S, S) -> logits (B, K).

    Chapter 5 trains one from scratch to recognise scene attributes (e.g. the colour of the only
    shape in the picture), to see that the [CLS] token learns to summarise the image.
    """

    def __init__(self, config: ViTConfig, num_classes: int):
        super().__init__()
        self.vit = VisionTransformer(config)
        self.head = nn.Linear(config.hidden_size, num_classes)
        nn.init.normal_(self.head.weight, std=config.hidden_size**-0.5)
        nn.init.zeros_(self.head.bias)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.head(self.vit(pixel_values).pooled_output)  # (B, num_classes)
