"""Parity with Hugging Face transformers: same weights, same numbers (fp32, atol 1e-4).

The transformers models are built from tiny configs; nothing is downloaded.
"""

import pytest
import torch
import torch.nn as nn

from minillava.decoder import Decoder, DecoderConfig
from minillava.interop import (
    expand_image_tokens_for_hf,
    hf_config,
    hf_names,
    hf_state_dict,
    to_hf,
)
from minillava.llava import Llava, LlavaConfig
from minillava.vit import VisionTransformer, ViTConfig

pytest.importorskip("transformers", reason="parity tests need the dev extra `transformers`")

ATOL = 1e-4
IMAGE = 5  # the <image> token id in these tests


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every weight (norms and biases included) a random value, so no mapping error hides
    behind an init of ones or zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def tiny_vit(**kw) -> ViTConfig:
    base = dict(
        image_size=16, patch_size=4, hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64
    )
    return ViTConfig(**(base | kw))


def tiny_decoder(**kw) -> DecoderConfig:
    base = dict(
        vocab_size=53, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
        max_seq_len=128, rope_theta=500.0,
    )  # fmt: skip
    return DecoderConfig(**(base | kw))


# ---------------------------------------------------------------------------------------------
# ViT vs CLIPVisionModel
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_vit_matches_clip_vision_model(act):
    torch.manual_seed(0)
    ours = randomise(VisionTransformer(tiny_vit(hidden_act=act)))
    theirs = to_hf(ours)
    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        a = ours(pixels)
        b = theirs(pixel_values=pixels, output_hidden_states=True)
    assert len(a.hidden_states) == len(b.hidden_states) == 4
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states, strict=True)):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0, msg=f"hidden_states[{i}]")
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.pooled_output, b.pooler_output, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# Decoder vs LlamaForCausalLM
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("tie", [True, False])
def test_decoder_matches_llama(num_kv_heads, tie):
    torch.manual_seed(0)
    ours = randomise(Decoder(tiny_decoder(num_kv_heads=num_kv_heads, tie_embeddings=tie)))
    theirs = to_hf(ours)
    assert (theirs.lm_head.weight is theirs.model.embed_tokens.weight) == tie
    input_ids = torch.randint(0, 53, (2, 11))
    with torch.no_grad():
        a = ours(input_ids, labels=input_ids)
        b = theirs(input_ids=input_ids, labels=input_ids)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_matches_llama_with_padding_mask(side):
    torch.manual_seed(0)
    ours = randomise(Decoder(tiny_decoder(num_kv_heads=2)))
    theirs = to_hf(ours)
    input_ids = torch.randint(0, 53, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    mask[1, :2] = 0
    if side == "right":
        mask = mask.flip(-1)
    # Hugging Face's forward counts positions 0..T-1 whatever the mask (its generate() derives
    # them from the mask, as our forward does by default): pass the same positions to both.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(input_ids, attention_mask=mask).logits
        b = theirs(input_ids=input_ids, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)


def test_decoder_greedy_generation_matches_llama_generate():
    from minillava.generate import generate

    torch.manual_seed(0)
    ours = randomise(Decoder(tiny_decoder(num_kv_heads=2)))
    with torch.no_grad():  # larger weights: a lively model whose greedy output varies
        for p in ours.parameters():
            if p.dim() == 2:
                p.mul_(3)
    theirs = to_hf(ours)
    input_ids = torch.randint(0, 53, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    new = generate(ours, input_ids, attention_mask=mask, max_new_tokens=8)
    hf = theirs.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
        pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    assert torch.equal(new, hf[:, 6:])
    assert len(set(new.flatten().tolist())) > 4, "test model too dull: greedy repeats itself"


# ---------------------------------------------------------------------------------------------
# Llava vs LlavaForConditionalGeneration
# ---------------------------------------------------------------------------------------------


def tiny_llava(**kw) -> LlavaConfig:
    return LlavaConfig(
        vision=tiny_vit(), text=tiny_decoder(num_kv_heads=2), image_token_id=IMAGE, **kw
    )


def llava_batch(seed=0):
    """Two prompts: row 0 holds two images and is short, row 1 one image; right padded."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(6, 53, (n,), generator=g).tolist()  # noqa: E731
    rows = [text(2) + [IMAGE] + text(3) + [IMAGE] + text(1), text(4) + [IMAGE] + text(6)]
    T = max(map(len, rows))
    input_ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    pixels = torch.randn(3, 3, 16, 16, generator=g)
    return input_ids, mask, pixels


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("feature_layer", [-2, -1, 0])
def test_llava_matches_hf_llava(side, feature_layer):
    torch.manual_seed(0)
    ours = randomise(Llava(tiny_llava(vision_feature_layer=feature_layer)))
    theirs = to_hf(ours)
    input_ids, mask, pixels = llava_batch()
    P = ours.config.num_image_tokens
    hf_ids, hf_mask = expand_image_tokens_for_hf(input_ids, P, IMAGE, mask, padding_side=side)
    with torch.no_grad():
        a = ours(input_ids, pixels, attention_mask=mask, padding_side=side)
        b = theirs(
            input_ids=hf_ids,
            pixel_values=pixels,
            attention_mask=hf_mask,
            position_ids=(hf_mask.cumsum(-1) - 1).clamp(min=0),
        )
    assert torch.equal(a.attention_mask, hf_mask)
    assert a.logits.shape == b.logits.shape
    real = hf_mask.bool()
    is_image = (hf_ids == IMAGE) & real
    assert is_image.sum() == 3 * P
    # Image positions and text positions both match.
    torch.testing.assert_close(a.logits[is_image], b.logits[is_image], atol=ATOL, rtol=0)
    text = real & ~is_image
    torch.testing.assert_close(a.logits[text], b.logits[text], atol=ATOL, rtol=0)
    # The image features themselves, as the projector hands them to the decoder.
    features = theirs.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(
        ours.encode_images(pixels), torch.stack(list(features)), atol=ATOL, rtol=0
    )


def test_expand_image_tokens_for_hf():
    ids = torch.tensor([[7, IMAGE, 8, 0], [IMAGE, 9, IMAGE, 10]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    new_ids, new_mask = expand_image_tokens_for_hf(ids, 3, IMAGE, mask)
    assert new_ids.shape == (2, 8)
    assert new_ids[0].tolist() == [7, IMAGE, IMAGE, IMAGE, 8, 0, 0, 0]
    assert new_ids[1].tolist() == [IMAGE, IMAGE, IMAGE, 9, IMAGE, IMAGE, IMAGE, 10]
    assert new_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8]
    left_ids, left_mask = expand_image_tokens_for_hf(ids, 3, IMAGE, mask, padding_side="left")
    assert left_ids[0].tolist() == [0, 0, 0, 7, IMAGE, IMAGE, IMAGE, 8]
    assert left_mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]


# ---------------------------------------------------------------------------------------------
# The name mapping itself
# ---------------------------------------------------------------------------------------------


def test_mapping_covers_every_weight_one_to_one():
    from transformers import CLIPVisionModel, LlamaForCausalLM, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cases = [
        (VisionTransformer(tiny_vit()), CLIPVisionModel),
        (Decoder(tiny_decoder(tie_embeddings=False)), LlamaForCausalLM),
        (Llava(tiny_llava()), LlavaForConditionalGeneration),
    ]
    for ours, hf_class in cases:
        names = hf_names(ours)
        assert len(set(names.values())) == len(names), "two of our weights map to one HF name"
        expected = set(hf_class(hf_config(ours)).state_dict())
        assert set(hf_state_dict(ours)) == expected


def test_unsupported_models_raise_clear_errors():
    with pytest.raises(TypeError, match="VisionTransformer, Decoder or Llava"):
        hf_state_dict(nn.Linear(2, 2))
    linear = Llava(tiny_llava(projector="linear"))
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        to_hf(linear)


def test_checkpoint_file_names_of_every_layout_map_back_to_ours():
    """A LLaVA checkpoint file may name its weights in transformers 4.x's layout, in the one
    transformers 5 writes by default, or in today's; each reads back to our own names."""
    from minillava.interop import from_hf_names, llava_file_name_to_hf

    ours = Llava(tiny_llava())
    inverse = from_hf_names(ours)
    assert len(inverse) == len(hf_names(ours))
    legacy = {  # today's prefix -> the prefix of older files (vision: both older ones)
        "model.language_model.": ["language_model.model."],
        "lm_head.": ["language_model.lm_head."],
        "model.multi_modal_projector.": ["multi_modal_projector."],
        "model.vision_tower.": [
            "vision_tower.vision_model.",
            "vision_tower.",
            "model.vision_tower.vision_model.",
        ],
    }
    for our_name, hf_name in hf_names(ours).items():
        prefix = next(p for p in legacy if hf_name.startswith(p))
        for old_prefix in [prefix, *legacy[prefix]]:
            stored = old_prefix + hf_name[len(prefix) :]
            assert inverse[llava_file_name_to_hf(stored)] == our_name, stored
    for buffer in ("vision_tower.vision_model.embeddings.position_ids",
                   "language_model.model.layers.0.self_attn.rotary_emb.inv_freq"):  # fmt: skip
        assert llava_file_name_to_hf(buffer) is None


# ---------------------------------------------------------------------------------------------
# The transformers versions these name maps hold for
# ---------------------------------------------------------------------------------------------


def declared_transformers_bound() -> str:
    """The lower bound on transformers that pyproject.toml's dev extra declares."""
    import re
    import tomllib
    from pathlib import Path

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    dev = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["dev"]
    spec = next(s for s in dev if s.replace(" ", "").startswith("transformers"))
    return re.search(r">=\s*([\w.]+)", spec).group(1)


def test_installed_transformers_meets_the_declared_lower_bound():
    """The maps use transformers' current names (CLIP without its `vision_model.` level).
    Older versions (4.x, 5.0-5.x before the bound) name the vision tower differently: to_hf
    fails there, and an exported directory loads with a random vision tower and a mere
    warning. Say so loudly instead of testing against a version the maps do not fit."""
    import transformers
    from packaging.version import Version

    bound = declared_transformers_bound()
    assert Version(transformers.__version__) >= Version(bound), (
        f"transformers {transformers.__version__} is installed, but minillava's name maps need "
        f">= {bound} (pyproject.toml): pip install -U 'transformers>={bound}'"
    )


def test_an_exported_directory_reloads_every_weight_unchanged(tmp_path):
    """save_pretrained then from_pretrained gives back our weights, the vision tower's
    included: none left at its random initialisation."""
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    ours = randomise(Llava(tiny_llava()))
    to_hf(ours).save_pretrained(tmp_path)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    expected = hf_state_dict(ours)
    assert set(reloaded) == set(expected)
    changed = [name for name in expected if not torch.equal(reloaded[name], expected[name])]
    assert not changed, f"reloaded with other values (random init?): {changed[:3]}"
