"""SimpleLLaVA: a pretrained CLIP and a pretrained Llama, joined by a new projector, trained.

The towers are tiny and random, written here by transformers (save_pretrained) with a tokenizer
built by `tokenizers`, without an <image> token, as a plain Llama's: offline, in seconds.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import write_llama_tokenizer

pytest.importorskip("safetensors", reason="reading checkpoints needs the `hf` extra")
pytest.importorskip("tokenizers", reason="reading checkpoints needs the `hf` extra")
transformers = pytest.importorskip("transformers")

from minillava.data.collate import IGNORE_INDEX, collate_conversations  # noqa: E402
from minillava.presets import StageConfig  # noqa: E402
from minillava.simple_llava import (  # noqa: E402
    CLIP_DEFAULTS,
    SimpleLlavaError,
    simple_llava,
    train_simple_llava,
)

BOS, EOS, PAD = 1, 2, 3


def write_tokenizer(directory) -> int:
    """The tiny Llama tokenizer, with no <image> token."""
    return write_llama_tokenizer(directory)


def lively(model):
    """Random weights far from the initialisation, so that no mapping error hides in noise."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if p.dim() == 1 else 0.3) + (p.dim() == 1))
    return model.eval()


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """(vision_dir, language_dir, CLIPVisionModel, LlamaForCausalLM)."""
    root = tmp_path_factory.mktemp("towers")
    vision_dir, language_dir = root / "clip", root / "llama"
    language_dir.mkdir()
    vision_config = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=28, patch_size=7, hidden_act="quick_gelu",
    )  # fmt: skip
    vision = transformers.CLIPVisionModel(vision_config)
    lively(vision).save_pretrained(vision_dir)
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    ).save_pretrained(vision_dir)
    vocab_size = write_tokenizer(language_dir)
    llama_config = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=500.0, rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD,
    )  # fmt: skip
    llama = transformers.LlamaForCausalLM(llama_config)
    lively(llama).save_pretrained(language_dir)
    return vision_dir, language_dir, vision, llama


@pytest.fixture(scope="module")
def loaded(towers):
    torch.manual_seed(0)
    return simple_llava(towers[0], towers[1])


def test_clip_defaults_are_transformers_own():
    config = transformers.CLIPVisionConfig()
    for key, value in CLIP_DEFAULTS.items():
        assert getattr(config, key) == value, key


def test_vision_tower_equals_clip_vision_model(towers, loaded):
    _, _, theirs, _ = towers
    model, _, processor = loaded
    pixel_values = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = theirs(pixel_values, output_hidden_states=True).hidden_states
        ours = model.vision_tower.patch_features(pixel_values, layer=-2)
    torch.testing.assert_close(ours, expected[-2][:, 1:], atol=1e-5, rtol=0)
    assert processor.crop_size == (28, 28)


def test_language_model_equals_llama_and_image_row_is_the_mean(towers, loaded):
    _, _, _, theirs = towers
    model, tokenizer, _ = loaded
    vocab = theirs.config.vocab_size
    assert tokenizer.image_id == vocab and model.config.text.vocab_size == vocab + 1
    ids = torch.tensor([tokenizer.render_prompt([{"from": "human", "value": "how many ?"}])])
    with torch.no_grad():
        ours = model(ids).logits
        expected = theirs(ids).logits
    torch.testing.assert_close(ours[..., :vocab], expected, atol=1e-4, rtol=0)
    table = model.language_model.embed_tokens.weight
    torch.testing.assert_close(table[-1], table[:-1].mean(0))


def test_render_masks_exactly_the_answers_and_their_eos(loaded):
    _, tokenizer, _ = loaded
    conversation = [
        {"from": "human", "value": "what is this ?\n<image>"},
        {"from": "gpt", "value": "a photo ."},
        {"from": "human", "value": "how many shapes are there ?"},
        {"from": "gpt", "value": "three shapes"},
    ]
    ids, mask = tokenizer.render(conversation)
    answers = [i for i, m in zip(ids, mask, strict=True) if m]
    expected = tokenizer.encode(" a photo .") + [EOS] + tokenizer.encode(" three shapes") + [EOS]
    assert answers == expected
    assert ids[0] == BOS and ids.count(tokenizer.image_id) == 1
    prompt = tokenizer.render_prompt(conversation[:1])
    assert ids[: len(prompt)] == prompt and not any(mask[: len(prompt)])
    batch = collate_conversations(
        [{"pixel_values": torch.zeros(3, 28, 28), "conversations": conversation}], tokenizer
    )
    labels = batch["labels"][0]
    assert labels[labels != IGNORE_INDEX].tolist() == expected
    with pytest.raises(ValueError, match="ends with the assistant"):
        tokenizer.render(conversation[:3])


def test_align_trains_the_projector_only_then_instruct_the_language_model(towers):
    torch.manual_seed(0)
    model, tokenizer, processor = simple_llava(towers[0], towers[1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = StageConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0)
    options = {"images": 8, "max_len": 200, "device": "cpu", "progress": False}
    result = train_simple_llava(model, tokenizer, processor, "align", config, **options)
    assert result.steps == 2 and all(map(torch.isfinite, torch.tensor(result.losses)))
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector"}  # the towers' weights are exactly as loaded

    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_simple_llava(model, tokenizer, processor, "instruct", config, **options)
    assert result.steps == 2 and all(map(torch.isfinite, torch.tensor(result.losses)))
    after = model.state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"projector", "language_model"}
    assert all(torch.isfinite(v).all() for v in after.values())


def test_a_tower_of_another_kind_is_one_clear_error(towers, tmp_path):
    import json
    import shutil

    other = tmp_path / "mistral"
    shutil.copytree(towers[1], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"model_type": "mistral"}))
    with pytest.raises(SimpleLlavaError, match="model_type='mistral'"):
        simple_llava(towers[0], other)
    with pytest.raises(SimpleLlavaError, match="not a CLIP vision tower"):
        simple_llava(towers[1], towers[1])


def test_a_whole_clip_model_gives_its_vision_half(towers, tmp_path):
    """A CLIPModel directory (text encoder and projections beside the ViT): the vision half."""
    vision = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=28, patch_size=14,
    )  # fmt: skip
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision)
    clip = lively(transformers.CLIPModel(config))
    clip.save_pretrained(tmp_path)
    model, _, processor = simple_llava(tmp_path, towers[1], vision_feature_layer=-1)
    pixel_values = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = clip.vision_model(pixel_values).last_hidden_state[:, 1:]
        ours = model.vision_tower.patch_features(pixel_values, layer=-1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert model.config.num_image_tokens == 4 and processor.crop_size == (28, 28)


def test_instruct_with_lora_trains_the_adapters(towers):
    torch.manual_seed(0)
    model, tokenizer, processor = simple_llava(towers[0], towers[1])
    config = StageConfig(steps=1, batch_size=2, lr=1e-2, warmup_steps=0)
    options = {"images": 4, "max_len": 200, "device": "cpu", "progress": False}
    train_simple_llava(model, tokenizer, processor, "instruct", config, lora_rank=2, **options)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector", "language_model"}
    assert all("lora_" in n for n, p in model.language_model.named_parameters() if p.requires_grad)


def test_training_on_a_llava_json_data_set(towers, tmp_path):
    """Any LLaVA-format JSON and image folder: here ShapesWorld exported as one."""
    from minillava.data.export import export
    from minillava.data.llava_json import LlavaJsonDataset
    from minillava.stages import LlavaJsonBatches

    torch.manual_seed(0)
    model, tokenizer, processor = simple_llava(towers[0], towers[1])
    dataset = LlavaJsonDataset(export(tmp_path / "data", n=4), processor=processor)
    config = StageConfig(steps=2, batch_size=2, lr=1e-2, warmup_steps=0)
    batches = LlavaJsonBatches("instruct", dataset, tokenizer, config, seed=0, max_len=200)
    batch = batches[0]
    assert (batch["input_ids"] == tokenizer.image_id).sum() == batch["pixel_values"].shape[0]
    result = train_simple_llava(model, tokenizer, processor, "instruct", config, batches=batches,
                                max_len=200, device="cpu", progress=False)  # fmt: skip
    assert result.steps == 2 and all(map(torch.isfinite, torch.tensor(result.losses)))


def test_llava_json_batches_give_the_course_model_the_image_after_every_question(tmp_path):
    from minillava.data.export import export
    from minillava.data.llava_json import LlavaJsonDataset
    from minillava.stages import LlavaJsonBatches
    from minillava.tokenizer import get_tokenizer

    tok = get_tokenizer()
    dataset = LlavaJsonDataset(export(tmp_path / "data", n=4))
    config = StageConfig(steps=1, batch_size=4, lr=1e-3)
    batches = LlavaJsonBatches("instruct", dataset, tok, config, seed=0, max_len=512)
    batch = batches[0]
    images = int((batch["input_ids"] == tok.image_id).sum())
    questions = sum(len(dataset[i]["conversations"]) // 2 for i in batches.indices(0))
    assert images == batch["pixel_values"].shape[0] == questions  # one copy a question
