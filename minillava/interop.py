"""Our models, Hugging Face's names: copy minillava weights into `transformers` models.

Why: the strongest test that a hand-written model is right is that a reference implementation
gives the same numbers with the same weights. It also lets a trained minillava be saved in a
format the whole ecosystem reads (`minillava export`).

    VisionTransformer  ->  transformers.CLIPVisionModel
    Decoder            ->  transformers.LlamaForCausalLM
    Llava              ->  transformers.LlavaForConditionalGeneration   (LLaVA-1.5 layout)

Everything goes through ONE name mapping, `hf_names`; `hf_state_dict` applies it and `to_hf`
builds the Hugging Face model from `hf_config` and loads the renamed weights. Nothing is
downloaded: the Hugging Face models are built from configs. The other way, a pretrained LLaVA
checkpoint read into our own `Llava` (minillava/pretrained.py), uses the same mapping inverted
(`from_hf_names`), after `llava_file_name_to_hf` has brought the file's names to today's layout.

The names are those of transformers 5.x (`model.vision_tower.embeddings...`, no `vision_model.`
level), hence the dev extra's lower bound on transformers (pyproject.toml).

One difference in *inputs*, not weights: our `Llava` replaces each `<image>` token by P image
positions itself, while Hugging Face's LLaVA expects the prompt to already hold the image token
P times (its processor does that expansion). `expand_image_tokens_for_hf` does it for us.

`transformers` is a dev extra: it is imported only inside the functions that need it.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from minillava.decoder import Decoder, DecoderConfig
from minillava.llava import Llava, LlavaConfig
from minillava.vit import VisionTransformer, ViTConfig

# (our name pattern, Hugging Face name): the first pattern that matches wins.
VIT_NAMES = [
    (r"^embeddings\.", "embeddings."),  # patch_embedding, class_embedding, position_embedding
    (r"^pre_layernorm\.", "pre_layrnorm."),  # sic: the attribute is spelled so in transformers
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.attn\.", r"encoder.layers.\1.self_attn."),  # q/k/v_proj, out_proj
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),  # fc1, fc2
    (r"^post_layernorm\.", "post_layernorm."),
]
# Our Decoder is LlamaModel and its head side by side; Hugging Face nests the body in `model.`.
DECODER_NAMES = [
    (r"^lm_head\.", "lm_head."),
    (r"^(embed_tokens|layers|norm)\.", r"model.\1."),
]
# LlamaModel alone (inside LLaVA the head sits outside the language model).
DECODER_BODY_NAMES = [(r"^(embed_tokens|layers|norm)\.", r"\1.")]
MLP_PROJECTOR_NAMES = [(r"^(linear_1|linear_2)\.", r"\1.")]  # the GELU between has no weights


# Checkpoint files name the same weights in older layouts than `hf_names` (which is transformers
# 5's in-memory one). Reading a file, each of its names is first brought to that layout, then
# looked up in the inverse of `hf_names` (`from_hf_names`): still one mapping, read backwards.
#   transformers 4.x files, and the files transformers 5 still writes by default:
#     language_model.model.* / language_model.lm_head.* / multi_modal_projector.* / vision_tower.*
#   CLIP's extra `vision_model.` level (CLIPVisionModel before transformers 5.x dropped it).
LLAVA_FILE_LAYOUTS = [
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^(model\.)?vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
]
# Buffers that some versions saved beside the weights; minillava recomputes them from the config.
HF_BUFFERS = re.compile(r"(\.position_ids|\.rotary_emb\.inv_freq)$")


def _rename(name: str, rules: list[tuple[str, str]], what: str) -> str:
    for pattern, replacement in rules:
        new_name, hits = re.subn(pattern, replacement, name)
        if hits:
            return new_name
    raise KeyError(
        f"{what} weight {name!r} has no Hugging Face name in minillava.interop: "
        "was a layer renamed or added? Update the mapping."
    )


def hf_names(model: nn.Module) -> dict[str, str]:
    """{our state_dict name: Hugging Face state_dict name} for a ViT, a Decoder or a Llava."""
    names = model.state_dict().keys()
    if isinstance(model, VisionTransformer):
        return {n: _rename(n, VIT_NAMES, "VisionTransformer") for n in names}
    if isinstance(model, Decoder):
        return {n: _rename(n, DECODER_NAMES, "Decoder") for n in names}
    if isinstance(model, Llava):
        _check_llava_projector(model.config)
        mapping = {}
        for n in names:
            part, rest = n.split(".", 1)
            if part == "vision_tower":
                mapping[n] = "model.vision_tower." + _rename(rest, VIT_NAMES, "vision_tower")
            elif part == "projector":
                hf = _rename(rest, MLP_PROJECTOR_NAMES, "projector")
                mapping[n] = "model.multi_modal_projector." + hf
            elif part == "language_model" and rest.startswith("lm_head."):
                mapping[n] = rest  # LLaVA keeps the LM head at the top level
            elif part == "language_model":
                hf = _rename(rest, DECODER_BODY_NAMES, "language_model")
                mapping[n] = "model.language_model." + hf
            else:
                raise KeyError(f"Llava weight {n!r} belongs to no known part")
        return mapping
    raise TypeError(
        f"hf_names: expected a VisionTransformer, Decoder or Llava, got {type(model).__name__}"
    )


def from_hf_names(model: nn.Module) -> dict[str, str]:
    """{Hugging Face name: our name}: `hf_names` inverted, for reading a checkpoint into `model`."""
    return {hf: ours for ours, hf in hf_names(model).items()}


def llava_file_name_to_hf(name: str) -> str | None:
    """A weight's name in a LLaVA checkpoint file, in any layout transformers has written ->
    the name `hf_names` uses; None for a saved buffer that is recomputed, not loaded."""
    if HF_BUFFERS.search(name):
        return None
    for pattern, replacement in LLAVA_FILE_LAYOUTS:
        new_name, hits = re.subn(pattern, replacement, name)
        if hits:
            return new_name
    return name  # already in the current layout


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face's names (same tensors, nothing copied)."""
    state = model.state_dict()
    return {hf: state[ours] for ours, hf in hf_names(model).items()}


def _check_llava_projector(config: LlavaConfig) -> None:
    if config.projector != "mlp2x_gelu":
        raise ValueError(
            f"Hugging Face's LlavaForConditionalGeneration only has LLaVA-1.5's 2-layer GELU MLP "
            f"projector (projector='mlp2x_gelu'); this model uses projector={config.projector!r}"
        )


def _transformers():
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "minillava.interop needs the `transformers` package, a development extra: "
            "pip install -e '.[dev]'"
        ) from error
    return transformers


def hf_config(model_or_config):
    """The Hugging Face config matching a minillava model or config.

    ViT(Config) -> CLIPVisionConfig, Decoder(Config) -> LlamaConfig, Llava(Config) -> LlavaConfig.
    """
    transformers = _transformers()
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(config, ViTConfig):
        return transformers.CLIPVisionConfig(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_channels=config.num_channels,
            image_size=config.image_size,
            patch_size=config.patch_size,
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
            attention_dropout=config.dropout,
        )
    if isinstance(config, DecoderConfig):
        return transformers.LlamaConfig(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_kv_heads,
            hidden_act="silu",  # SwiGLU's gate
            max_position_embeddings=config.max_seq_len,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=config.rope_theta,
            tie_word_embeddings=config.tie_embeddings,
            attention_bias=False,
            mlp_bias=False,
            attention_dropout=config.dropout,
        )
    if isinstance(config, LlavaConfig):
        _check_llava_projector(config)
        return transformers.LlavaConfig(
            vision_config=hf_config(config.vision),
            text_config=hf_config(config.text),
            image_token_index=config.image_token_id,
            projector_hidden_act="gelu",  # exact GELU, as our MLPProjector
            vision_feature_select_strategy="default",  # drop [CLS], keep the patch tokens
            # Counted from the end: transformers reads a layer of 0 as "not given" (falsy).
            vision_feature_layer=config.vision_feature_layer % (config.vision.num_layers + 1)
            - (config.vision.num_layers + 1),
            image_seq_length=config.num_image_tokens,
            multimodal_projector_bias=True,
            tie_word_embeddings=config.text.tie_embeddings,
        )
    raise TypeError(
        f"hf_config: expected a ViT, Decoder or Llava model or config, got {type(config).__name__}"
    )


def to_hf(model: nn.Module) -> nn.Module:
    """A Hugging Face model holding our weights, in eval mode, on the same device and dtype."""
    transformers = _transformers()
    classes = {
        VisionTransformer: transformers.CLIPVisionModel,
        Decoder: transformers.LlamaForCausalLM,
        Llava: transformers.LlavaForConditionalGeneration,
    }
    hf_class = next((c for t, c in classes.items() if isinstance(model, t)), None)
    if hf_class is None:
        raise TypeError(f"to_hf: expected a VisionTransformer, Decoder or Llava, got {type(model)}")
    hf_model = hf_class(hf_config(model))
    param = next(model.parameters())
    hf_model.to(device=param.device, dtype=param.dtype)
    hf_model.load_state_dict(hf_state_dict(model), strict=True)
    return hf_model.eval()


def expand_image_tokens_for_hf(
    input_ids: torch.Tensor,
    num_patches: int,
    image_token_id: int,
    attention_mask: torch.Tensor | None = None,
    padding_side: str = "right",
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat each <image> token num_patches times, as Hugging Face's LLaVA processor does.

    input_ids (B, T) as our Llava takes them (one <image> per picture) -> (input_ids (B, T'),
    attention_mask (B, T')) for LlavaForConditionalGeneration, whose forward writes the image
    features over those repeated tokens one for one. Rows are re-padded on `padding_side` with
    `pad_token_id`, exactly as `minillava.llava.splice_image_tokens` re-pads, so position t of
    our spliced sequence is position t of the expanded one.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    rows = []
    for ids, mask in zip(input_ids, attention_mask, strict=True):
        ids = ids[mask.bool()]  # padding dropped, added back below
        copies = torch.where(ids == image_token_id, num_patches, 1)
        rows.append(ids.repeat_interleave(copies))
    new_len = max(len(row) for row in rows)
    new_ids = input_ids.new_full((len(rows), new_len), pad_token_id)
    new_mask = torch.zeros_like(new_ids)
    for b, row in enumerate(rows):
        span = slice(new_len - len(row), new_len) if padding_side == "left" else slice(0, len(row))
        new_ids[b, span] = row
        new_mask[b, span] = 1
    return new_ids, new_mask
