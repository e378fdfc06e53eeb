"""LLaVA: eyes + bridge + brain. A language model that reads images as if they were words.

    pixel_values (N_img, 3, H, W)
      -> vision_tower (a ViT)       hidden_states[-2], [CLS] dropped     (N_img, P, C_vision)
      -> projector (linear or MLP)  into the decoder's embedding space  (N_img, P, C_text)
    input_ids (B, T) with one <image> token where each picture goes
      -> embed_tokens                                                  (B, T, C_text)
      -> splice: every <image> token is replaced by its image's P vectors
                                                                       (B, T', C_text)
      -> language_model (the decoder) -> logits                        (B, T', V)

That is the whole trick of LLaVA: the decoder never knows which of its inputs came from a
tokenizer and which from a camera. The projector is the only new part; training it alone, with
both the ViT and the decoder frozen, is stage 1 ("alignment"); stage 2 also trains the decoder
on conversations ("instruction tuning"), with the loss on the assistant's answers only.

Which features, as in LLaVA-1.5: the *penultimate* ViT layer (`vision_feature_layer=-2`), whose
patch features are more general than the last layer's, and only the P patch tokens, not [CLS]
(Hugging Face calls this `vision_feature_select_strategy="default"`).

With `minillava train --parts exercises` your chapter 8 splice_image and build_labels splice each
prompt instead of `splice_row` and `splice_row_labels` (minillava/parts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from minillava import parts
from minillava.decoder import Decoder, DecoderConfig, count_parameters
from minillava.generate import generate
from minillava.projector import build_projector
from minillava.vit import VisionTransformer, ViTConfig


@dataclass
class LlavaConfig:
    vision: ViTConfig = field(default_factory=ViTConfig)
    text: DecoderConfig = field(default_factory=DecoderConfig)
    projector: str = "mlp2x_gelu"  # or "linear" (LLaVA-1.0)
    image_token_id: int = 1  # set from the tokenizer: tokenizer.image_id
    vision_feature_layer: int = -2  # penultimate layer, as LLaVA-1.5
    ignore_index: int = -100  # label of positions the loss skips (image, prompt, padding)

    def __post_init__(self) -> None:
        # Accept plain dicts too (configs read back from a checkpoint's JSON).
        if isinstance(self.vision, dict):
            self.vision = ViTConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = DecoderConfig(**self.text)
        if not 0 <= self.image_token_id < self.text.vocab_size:
            raise ValueError(
                f"LlavaConfig: image_token_id={self.image_token_id} is not a token of the "
                f"decoder's vocabulary (vocab_size={self.text.vocab_size})"
            )
        if not -(self.vision.num_layers + 1) <= self.vision_feature_layer <= self.vision.num_layers:
            raise ValueError(
                f"LlavaConfig: vision_feature_layer={self.vision_feature_layer} is not one of the "
                f"ViT's {self.vision.num_layers + 1} hidden states"
            )

    @property
    def num_image_tokens(self) -> int:
        """P: how many positions each image takes in the decoder's sequence."""
        return self.vision.num_patches


@dataclass
class LlavaOutput:
    loss: torch.Tensor | None  # next-token loss on the positions whose label is not -100
    logits: torch.Tensor | None  # (B, T', V), T' = length after splicing; None if not asked for
    attention_mask: torch.Tensor  # (B, T') 1 = real position (text or image), 0 = padding
    labels: torch.Tensor | None  # (B, T') after splicing: -100 on images and padding


def splice_row(
    ids: torch.Tensor, embeds: torch.Tensor, images: torch.Tensor, image_token_id: int
) -> torch.Tensor:
    """One prompt: ids (T,), embeds (T, C), images (n, P, C) -> (T + n (P - 1), C).

    Each of the n <image> tokens is replaced by its image's P vectors, in order: the text
    before it, the image, the text after it. The placeholder's own embedding is dropped.
    """
    pieces, start = [], 0
    at = (ids == image_token_id).nonzero().flatten().tolist()
    for image, pos in zip(images, at, strict=True):
        pieces += [embeds[start:pos], image]
        start = pos + 1
    return torch.cat(pieces + [embeds[start:]])


def splice_row_labels(
    ids: torch.Tensor,
    labels: torch.Tensor,
    image_token_id: int,
    num_image_tokens: int,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The labels of that prompt, aligned with `splice_row`: (T,) -> (T + n (P - 1),).

    Each <image> becomes P positions labelled `ignore_index`: the model is never asked to
    predict pixels. The other labels are kept.
    """
    pieces, start = [], 0
    for pos in (ids == image_token_id).nonzero().flatten().tolist():
        pieces += [labels[start:pos], labels.new_full((num_image_tokens,), ignore_index)]
        start = pos + 1
    return torch.cat(pieces + [labels[start:]])


def splice_image_tokens(
    input_ids: torch.Tensor,
    inputs_embeds: torch.Tensor,
    image_features: torch.Tensor,
    image_token_id: int,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    padding_side: str = "right",
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Replace every <image> token by the P feature vectors of its image.

    input_ids (B, T), inputs_embeds (B, T, C): the prompt, as ids and as embeddings.
    image_features (N_img, P, C): the projected images, consumed in the order their <image>
        tokens appear, row 0 first (a row may hold zero, one or several images).
    attention_mask (B, T): 1 = real token, 0 = padding (either side); None = no padding.
    labels (B, T): targets, -100 where not scored.

    Returns (inputs_embeds (B, T', C), attention_mask (B, T'), labels (B, T') or None,
    position_ids (B, T')), re-padded on `padding_side` (left for generation, so every row ends
    on its last real token). Image positions get label -100: the model is never asked to predict
    pixels. Padding positions get -100 too.
    """
    if input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} "
            "must agree on (B, T)"
        )
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    per_row = ((input_ids == image_token_id) & attention_mask.bool()).sum(-1).tolist()
    num_image_tokens = sum(per_row)
    if num_image_tokens != image_features.shape[0]:
        raise ValueError(
            f"the prompts hold {num_image_tokens} <image> tokens (id {image_token_id}) but "
            f"{image_features.shape[0]} images were given: each image needs exactly one <image>"
        )
    image_features = image_features.to(inputs_embeds.dtype)
    P = image_features.shape[1]

    # 1. Row by row, cut the text at each <image> and put the image's P vectors in its place;
    #    the labels likewise. The library's splice_row(_labels), or a learner's (parts.py).
    splice = parts.get("splice_image", splice_row)
    splice_labels = parts.get("build_labels", splice_row_labels)
    rows_embeds, rows_labels, first = [], [], 0
    for b, n in enumerate(per_row):
        real = attention_mask[b].bool()  # drop the padding; rows are re-padded in step 2
        ids = input_ids[b][real]
        row_images = image_features[first : first + n]  # (n, P, C): this row's, in order
        first += n
        rows_embeds.append(splice(ids, inputs_embeds[b][real], row_images, image_token_id))
        if labels is not None:  # (T_b,), as the row's embeddings (T_b, C)
            row_labels = splice_labels(ids, labels[b][real], image_token_id, P, ignore_index)
            rows_labels.append(row_labels)

    # 2. Rows now differ in length: pad them all to the longest, on the side asked for.
    new_len = max(len(row) for row in rows_embeds)
    out_embeds, out_mask, out_labels = [], [], []
    for b, row_embeds in enumerate(rows_embeds):
        n_pad = new_len - len(row_embeds)
        before, after = (n_pad, 0) if padding_side == "left" else (0, n_pad)
        out_embeds.append(F.pad(row_embeds, (0, 0, before, after)))  # zero vectors as padding
        out_mask.append(F.pad(input_ids.new_ones(len(row_embeds)), (before, after)))
        if labels is not None:
            out_labels.append(F.pad(rows_labels[b], (before, after), value=ignore_index))
    new_mask = torch.stack(out_mask)  # (B, T')
    # Each position counts the real tokens before it, so padding never shifts positions.
    position_ids = (new_mask.cumsum(-1) - 1).clamp(min=0)
    return (
        torch.stack(out_embeds),
        new_mask,
        torch.stack(out_labels) if labels is not None else None,
        position_ids,
    )


class Llava(nn.Module):
    """A vision tower, a projector and a language model, glued by `splice_image_tokens`."""

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = VisionTransformer(config.vision)
        self.projector = build_projector(
            config.projector, config.vision.hidden_size, config.text.hidden_size
        )
        self.language_model = Decoder(config.text)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_img, 3, H, W) -> (N_img, P, C_text): one decoder-sized vector per image patch.

        The features are hidden_states[vision_feature_layer] without [CLS]; the ViT stops at that
        layer (with -2, its last block never runs: its output would be thrown away).
        """
        patch_features = self.vision_tower.patch_features(
            pixel_values, layer=self.config.vision_feature_layer
        )  # (N_img, P, C_vision)
        return self.projector(patch_features)

    def embed_multimodal(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Token ids (+ images) -> (inputs_embeds, attention_mask, labels, position_ids), all
        (B, T', ...) after splicing, as `splice_image_tokens` returns them."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        inputs_embeds = self.language_model.embed_tokens(input_ids)  # (B, T, C)
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values)  # (N_img, P, C)
        else:  # text only: no image to splice in, but still re-padded on `padding_side`
            P, C = self.config.num_image_tokens, inputs_embeds.shape[-1]
            image_features = inputs_embeds.new_zeros(0, P, C)
        return splice_image_tokens(
            input_ids,
            inputs_embeds,
            image_features,
            self.config.image_token_id,
            attention_mask=attention_mask,
            labels=labels,
            padding_side=padding_side,
            ignore_index=self.config.ignore_index,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        padding_side: str = "right",
        return_logits: bool = True,
    ) -> LlavaOutput:
        """input_ids (B, T) with <image> tokens, pixel_values (N_img, 3, H, W) -> LlavaOutput.

        labels (B, T) are aligned with input_ids (-100 where not scored; the decoder shifts them).
        The logits, mask and labels returned are those of the spliced sequence (B, T').
        return_logits=False: the loss alone, computed at the scored positions only (training);
        `logits` is then None (see `Decoder.forward`).
        """
        embeds, mask, labels, position_ids = self.embed_multimodal(
            input_ids, pixel_values, attention_mask, labels, padding_side
        )
        out = self.language_model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=position_ids,
            labels=labels,
            return_logits=return_logits,
        )
        return LlavaOutput(loss=out.loss, logits=out.logits, attention_mask=mask, labels=labels)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **sampling,
    ) -> torch.Tensor:
        """Answer the prompts: the new tokens only, (B, n_new). `sampling` goes to
        `minillava.generate.generate` (max_new_tokens, temperature, top_k, top_p,
        stop_token_ids, use_cache, generator, pad_token_id). Prompts may be padded on either
        side: after splicing they are re-padded on the left, as generation needs."""
        was_training = self.training
        self.eval()
        embeds, mask, _, _ = self.embed_multimodal(
            input_ids, pixel_values, attention_mask, padding_side="left"
        )
        new_tokens = generate(
            self.language_model, inputs_embeds=embeds, attention_mask=mask, **sampling
        )
        self.train(was_training)
        return new_tokens

    # -- which parts learn: the training stages -------------------------------------------------

    def freeze_vision(self, frozen: bool = True) -> None:
        """Stop (or restart) training the ViT. LLaVA keeps it frozen in both stages."""
        self.vision_tower.requires_grad_(not frozen)

    def freeze_projector(self, frozen: bool = True) -> None:
        self.projector.requires_grad_(not frozen)

    def freeze_language(self, frozen: bool = True) -> None:
        """Stop (or restart) training the decoder: frozen in stage 1, trained in stage 2."""
        self.language_model.requires_grad_(not frozen)

    def count_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those that will receive gradients, if trainable_only)."""
        return count_parameters(self, trainable_only)

    def parameter_summary(self) -> dict[str, dict[str, int]]:
        """{part: {"total": n, "trainable": n}} for vision_tower, projector, language_model."""
        summary = {}
        for name in ("vision_tower", "projector", "language_model"):
            part = getattr(self, name)
            summary[name] = {
                "total": count_parameters(part),
                "trainable": count_parameters(part, trainable_only=True),
            }
        return summary
