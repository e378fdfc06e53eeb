"""A pretrained LLaVA-1.5 checkpoint through minillava's own code equals transformers' LLaVA.

The checkpoints are tiny and random, written here by transformers itself (save_pretrained) with
a tokenizer built here by `tokenizers`: the same files a real llava-hf checkpoint has, offline.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import write_llama_tokenizer

pytest.importorskip("safetensors", reason="reading checkpoints needs the `hf` extra")
pytest.importorskip("tokenizers", reason="reading checkpoints needs the `hf` extra")

from minillava.chat import ask  # noqa: E402
from minillava.checkpoint import CheckpointMismatchError, CheckpointNotFoundError  # noqa: E402
from minillava.data.clip_preprocess import CLIPPreprocess  # noqa: E402
from minillava.interop import expand_image_tokens_for_hf  # noqa: E402
from minillava.pretrained import (  # noqa: E402
    CLIP_VISION_DEFAULTS,
    LLAMA_DEFAULTS,
    LLAVA_DEFAULTS,
    UnsupportedCheckpointError,
    llava_config_from_hf,
    load_pretrained,
)

ATOL = 1e-4
BOS, EOS, PAD, IMAGE = 1, 2, 3, 4


def write_tokenizer(directory) -> int:
    """The tiny Llama tokenizer, with LLaVA's <image> (id 4)."""
    return write_llama_tokenizer(directory, ("<image>",))


def hf_llava(vocab_size: int, tie: bool = False, **llava):
    """A tiny random LlavaForConditionalGeneration: CLIP with quick GELU, Llama with GQA."""
    transformers = pytest.importorskip("transformers")
    vision = transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=28, patch_size=7, hidden_act="quick_gelu",
    )  # fmt: skip
    text = transformers.LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=500.0, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
    )  # fmt: skip
    config = transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE,
        tie_word_embeddings=tie, **llava,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    with torch.no_grad():  # lively random weights, so that no mapping error hides in noise
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) * (0.1 if p.dim() == 1 else 0.3) + (p.dim() == 1))
    return model.eval()


def write_checkpoint(directory, tie: bool = False, **save):
    """config.json, *.safetensors, tokenizer.json, preprocessor_config.json; -> the HF model."""
    transformers = pytest.importorskip("transformers")
    directory.mkdir(parents=True, exist_ok=True)
    model = hf_llava(write_tokenizer(directory), tie=tie)
    model.save_pretrained(directory, **save)
    transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}
    ).save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llava-tiny")
    write_checkpoint(directory)
    return directory


@pytest.fixture(scope="module")
def loaded(checkpoint):
    """(our model, tokenizer, processor) and transformers' model, both from the directory."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    return load_pretrained(checkpoint), theirs


def photo(width=45, height=31, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_logits(theirs, input_ids, pixel_values, num_patches):
    ids, mask = expand_image_tokens_for_hf(input_ids, num_patches, IMAGE)
    with torch.no_grad():
        return theirs(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).logits


# ---------------------------------------------------------------------------------------------
# Same numbers as transformers
# ---------------------------------------------------------------------------------------------


def test_logits_match_transformers_llava(checkpoint, loaded):
    transformers = pytest.importorskip("transformers")
    (model, tokenizer, processor), theirs = loaded
    assert model.config.text.num_kv_heads == 2 < model.config.text.num_heads  # GQA
    image = photo()
    pixel_values = processor(image)[None]  # (1, 3, 28, 28)
    reference = transformers.CLIPImageProcessorPil.from_pretrained(checkpoint)
    expected = reference(image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixel_values, expected, atol=1e-5, rtol=0)

    turn = {"from": "human", "value": "<image>\nwhat is in the picture ?"}
    input_ids = torch.tensor([tokenizer.render_prompt([turn])])
    with torch.no_grad():
        ours = model(input_ids, pixel_values).logits
    expected = hf_logits(theirs, input_ids, pixel_values, model.config.num_image_tokens)
    assert ours.shape == expected.shape == (1, input_ids.shape[1] - 1 + 16, len(tokenizer))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_greedy_answer_matches_transformers_generate(loaded):
    (model, tokenizer, processor), theirs = loaded
    image, question = photo(60, 40, seed=1), "how many shapes are there ?"
    turn = {"from": "human", "value": f"<image>\n{question}"}
    input_ids = torch.tensor([tokenizer.render_prompt([turn])])
    pixel_values = processor(image)[None]
    ours = model.generate(input_ids, pixel_values, max_new_tokens=10, stop_token_ids=[EOS])
    ids, mask = expand_image_tokens_for_hf(input_ids, model.config.num_image_tokens, IMAGE)
    hf = theirs.generate(
        input_ids=ids, attention_mask=mask, pixel_values=pixel_values, max_new_tokens=10,
        do_sample=False, eos_token_id=EOS, pad_token_id=PAD,
    )[:, ids.shape[1]:]  # fmt: skip
    assert ours.tolist() == hf.tolist()
    assert len(set(ours[0].tolist())) > 3, "test model too dull: greedy repeats itself"
    # The chat's own code asks the same prompt and gives that answer, up to the end of the turn.
    expected = ours[0].tolist()
    expected = expected[: expected.index(EOS)] if EOS in expected else expected
    text = ask(model, tokenizer, pixel_values[0], question, max_new_tokens=10)
    assert text == tokenizer.decode(expected).strip()


def test_sharded_tied_checkpoint_in_the_current_layout_loads(tmp_path):
    """Several shards and an index; lm_head tied to the embeddings (not stored); and, where
    transformers can write it, the layout it keeps in memory (model.language_model.*)."""
    import inspect

    transformers = pytest.importorskip("transformers")
    save = {"max_shard_size": "40KB"}
    parameters = inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters
    if "save_original_format" in parameters:
        save["save_original_format"] = False
    theirs = write_checkpoint(tmp_path, tie=True, **save)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model, tokenizer, processor = load_pretrained(tmp_path)
    decoder = model.language_model
    assert decoder.lm_head.weight is decoder.embed_tokens.weight
    input_ids = torch.tensor([tokenizer.render_prompt([{"from": "human", "value": "<image>\na"}])])
    pixel_values = processor(photo())[None]
    with torch.no_grad():
        ours = model(input_ids, pixel_values).logits
    expected = hf_logits(theirs, input_ids, pixel_values, model.config.num_image_tokens)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_half_precision_loads_in_that_dtype(checkpoint, loaded):
    (model, tokenizer, processor), _ = loaded
    half, _, _ = load_pretrained(checkpoint, dtype="bfloat16")
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    input_ids = torch.tensor([tokenizer.render_prompt([{"from": "human", "value": "<image>\na"}])])
    pixel_values = processor(photo())[None]
    with torch.no_grad():
        full, low = model(input_ids, pixel_values).logits, half(input_ids, pixel_values).logits
    assert low.dtype == torch.bfloat16
    assert torch.equal(full.argmax(-1), low.float().argmax(-1)) or (full - low).abs().max() < 0.5


# ---------------------------------------------------------------------------------------------
# The tokenizer and the prompt
# ---------------------------------------------------------------------------------------------


def test_tokenizer_and_prompt_match_transformers_tokenizer(checkpoint, loaded):
    transformers = pytest.importorskip("transformers")
    (model, tokenizer, _), _ = loaded
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(checkpoint / "tokenizer.json")
    )
    question = "what is in the picture ?"
    # minillava's chat writes the image after the question; LLaVA-1.5 wants it first.
    for value in (f"<image>\n{question}", f"{question}\n<image>"):
        prompt = tokenizer.prompt_text([{"from": "human", "value": value}])
        assert prompt == f"USER: <image>\n{question} ASSISTANT:"
        ids = tokenizer.render_prompt([{"from": "human", "value": value}])
        assert ids == reference(prompt)["input_ids"]
        assert ids[0] == BOS and ids.count(IMAGE) == 1 == ids.count(model.config.image_token_id)
    conversation = [
        {"from": "human", "value": "<image>\nwhat is in the picture ?"},
        {"from": "gpt", "value": "a red circle ."},
        {"from": "human", "value": "how many shapes ?"},
    ]
    assert tokenizer.prompt_text(conversation) == (
        "USER: <image>\nwhat is in the picture ? ASSISTANT: a red circle .</s>"
        "USER: how many shapes ? ASSISTANT:"
    )
    assert tokenizer.decode(tokenizer.encode("a red circle .")) == "a red circle ."
    assert (tokenizer.image_id, tokenizer.eos_id, tokenizer.pad_id) == (IMAGE, EOS, PAD)
    assert tokenizer.stop_ids == [EOS] and len(tokenizer) == model.config.text.vocab_size
    with pytest.raises(ValueError, match="end with a human turn"):
        tokenizer.prompt_text(conversation[:2])


# ---------------------------------------------------------------------------------------------
# Image preprocessing: CLIPImageProcessor, by hand
# ---------------------------------------------------------------------------------------------


def odd_images() -> dict[str, Image.Image]:
    rgba = np.asarray(photo(50, 60, seed=2).convert("RGBA")).copy()
    rgba[..., 3] = np.random.default_rng(3).integers(0, 256, rgba.shape[:2])
    keyed = photo(40, 30, seed=4).convert("P")
    keyed.info["transparency"] = 3  # a transparent palette entry (PNG tRNS)
    return {
        "333x517": photo(333, 517),
        "517x333": photo(517, 333, seed=1),
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "L": photo(100, 90, seed=5).convert("L"),
        "P": photo(200, 251, seed=6).convert("P"),
        "P+transparency": keyed,
        "CMYK": photo(64, 48, seed=7).convert("CMYK"),
        "1x120": photo(1, 120, seed=8),
        "120x1": photo(120, 1, seed=9),
        "7x5": photo(7, 5, seed=10),
        "336x336": photo(336, 336, seed=11),
    }


def test_preprocessing_matches_clip_image_processor():
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    ours = CLIPPreprocess.from_config(reference.to_dict())
    assert (ours.shortest_edge, ours.crop_size) == (336, (336, 336))
    # Newer transformers lay transparent pixels over white; older ones (4.x, early 5.x) dropped the
    # alpha channel (convert("RGB")). minillava does the former: compare images with transparency
    # only against a transformers that does too.
    clear_red = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    over_white = reference(clear_red, return_tensors="pt")["pixel_values"][0, 1].mean() > 0
    for name, image in odd_images().items():
        if name in ("RGBA", "P+transparency") and not over_white:
            continue
        expected = reference(image, return_tensors="pt")["pixel_values"][0]
        got = ours(image)
        assert got.shape == (3, 336, 336) and got.dtype == torch.float32, name
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=name)


def test_preprocessing_refuses_a_strip_too_thin_to_resize():
    with pytest.raises(ValueError, match="crop it closer to square"):
        CLIPPreprocess()(photo(1, 5000))


def test_preprocessing_reads_both_config_layouts():
    old = CLIPPreprocess.from_config({"size": 224, "crop_size": 224, "resample": 3})
    new = CLIPPreprocess.from_config(
        {"size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224}}
    )
    assert old == new == CLIPPreprocess(shortest_edge=224, crop_size=(224, 224))
    assert CLIPPreprocess.from_config({}, image_size=28).crop_size == (28, 28)


# ---------------------------------------------------------------------------------------------
# What it does not cover: one clear line
# ---------------------------------------------------------------------------------------------


def llava_json(**changes) -> dict:
    """A small LLaVA-1.5 config.json as transformers writes it; `changes` in dotted paths."""
    config = {
        "model_type": "llava",
        "image_token_index": IMAGE,
        "text_config": {"model_type": "llama", "vocab_size": 90, "hidden_size": 32,
                        "intermediate_size": 48, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32,
                          "intermediate_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 4, "image_size": 28, "patch_size": 7},
    }  # fmt: skip
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        node[key] = value
    return config


@pytest.mark.parametrize(
    "field, value",
    [
        ("model_type", "llava_next"),
        ("text_config__model_type", "mistral"),
        ("vision_config__model_type", "siglip_vision_model"),
        ("vision_config__hidden_act", "gelu_pytorch_tanh"),
        ("projector_hidden_act", "relu"),
        ("vision_feature_select_strategy", "full"),
        ("vision_feature_layer", [-2, -5]),
        ("text_config__rope_scaling", {"rope_type": "linear", "factor": 2.0}),
        ("text_config__head_dim", 16),
        ("text_config__attention_bias", True),
    ],
)
def test_unsupported_architecture_is_one_clear_line(field, value):
    with pytest.raises(UnsupportedCheckpointError) as error:
        llava_config_from_hf(llava_json(**{field: value}))
    message = str(error.value)
    assert "\n" not in message
    assert field.split("__")[-1].replace("rope_scaling", "rope_type") in message
    assert repr(value.get("rope_type") if isinstance(value, dict) else value) in message
    assert isinstance(error.value, CheckpointMismatchError)  # the CLI prints it in one line
    assert isinstance(error.value, ValueError)


def test_the_tiny_config_reads_as_expected():
    config = llava_config_from_hf(llava_json())
    assert (config.text.num_kv_heads, config.text.rope_theta, config.text.tie_embeddings) == (
        2,
        10000.0,
        False,
    )
    assert (config.vision.hidden_act, config.vision_feature_layer, config.projector) == (
        "quick_gelu",
        -2,
        "mlp2x_gelu",
    )
    assert config.num_image_tokens == 16 and config.image_token_id == IMAGE


def test_defaults_are_transformers_defaults():
    """A config.json leaves out what equals the defaults, so ours must be transformers'."""
    transformers = pytest.importorskip("transformers")
    llama, llava = transformers.LlamaConfig(), transformers.LlavaConfig()
    for key, value in LLAMA_DEFAULTS.items():
        if key == "rope_theta":
            theta = getattr(llama, "rope_theta", None) or llama.rope_parameters["rope_theta"]
            assert theta == value
        elif key != "num_key_value_heads":
            assert getattr(llama, key) == value, key
    for key, value in CLIP_VISION_DEFAULTS.items():
        assert getattr(llava.vision_config, key) == value, key
    for key, value in LLAVA_DEFAULTS.items():
        assert getattr(llava, key) == value, key


def test_missing_or_misshapen_weights_are_named(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "tokenizer.json"):
        shutil.copy(checkpoint / name, tmp_path / name)
    weights = load_file(checkpoint / "model.safetensors")
    dropped = next(name for name in weights if "layer_norm2" in name)
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="1 weights missing") as error:
        load_pretrained(tmp_path)
    assert dropped.split("vision_tower.")[-1] in str(error.value)

    misshapen = dict(weights, **{dropped: weights[dropped][:-1]})
    save_file(misshapen, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="has shape"):
        load_pretrained(tmp_path)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UnsupportedCheckpointError, match="no \\*.safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()  # checked before any weight is read
    with pytest.raises(UnsupportedCheckpointError, match="tokenizer.json not found"):
        load_pretrained(tmp_path)


def test_a_model_id_that_is_not_here_needs_the_network(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to the Hub.\nCheck your internet connection.")

    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(CheckpointNotFoundError, match="needs the network") as error:
        load_pretrained("llava-hf/llava-1.5-7b-hf")
    assert "\n" not in str(error.value)
    monkeypatch.setitem(__import__("sys").modules, "huggingface_hub", None)  # not installed
    with pytest.raises(CheckpointNotFoundError, match="install huggingface_hub"):
        load_pretrained("llava-hf/llava-1.5-7b-hf")
    with pytest.raises(CheckpointNotFoundError, match="not a checkpoint directory"):
        load_pretrained(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# `minillava chat --hf`
# ---------------------------------------------------------------------------------------------


def test_chat_hf_answers_with_the_loaders_greedy_tokens(checkpoint, loaded, tmp_path, capsys):
    from minillava.chat import main as chat_main

    (model, tokenizer, processor), _ = loaded
    path = tmp_path / "photo.png"
    photo(60, 40, seed=1).save(path)
    question = "how many shapes are there ?"
    pixels = processor(Image.open(path))
    expected = ask(model, tokenizer, pixels, question, max_new_tokens=10)
    code = chat_main(["--hf", str(checkpoint), str(path), question, "--max-new-tokens", "10"])
    assert code == 0
    assert capsys.readouterr().out.strip() == expected


def test_a_pretrained_chat_shows_the_image_once_as_llava_was_trained(loaded):
    from minillava.chat import ChatSession
    from minillava.data.instruct import count_images

    (model, tokenizer, processor), _ = loaded
    session = ChatSession(model, tokenizer, processor(photo()), max_new_tokens=3)
    session.ask("what is in the picture ?")
    session.ask("how many shapes are there ?")
    assert count_images(session.turns) == 1
    assert session.turns[0]["value"].count("<image>") == 1
    prompt = tokenizer.render_prompt(session.turns[:3])
    assert prompt.count(tokenizer.image_id) == 1


def test_chat_hf_without_a_checkpoint_there_is_one_line(tmp_path, capsys):
    from minillava.cli import main as cli_main

    path = tmp_path / "photo.png"
    photo().save(path)
    code = cli_main(["chat", "--hf", str(tmp_path / "nowhere"), str(path), "hi"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "nowhere" in err


def test_a_model_you_export_comes_back_through_chat_hf(tmp_path, capsys):
    """minillava export -> chat --hf: the course tokenizer and image processing come back with
    it, and the answers are the ones the original model gives."""
    pytest.importorskip("transformers")
    from tiny_models import tiny_llava_config

    from minillava.chat import ChatSession
    from minillava.chat import main as chat_main
    from minillava.data.image_processor import ImageProcessor
    from minillava.export import export_hf
    from minillava.llava import Llava
    from minillava.tokenizer import get_tokenizer

    tok = get_tokenizer()
    torch.manual_seed(0)
    original = Llava(tiny_llava_config(tok)).eval()
    directory = export_hf(original, tmp_path / "exported", tok)
    model, tokenizer, processor = load_pretrained(directory)
    assert tokenizer.name == tok.name and isinstance(processor, ImageProcessor)
    for name, weight in original.state_dict().items():
        assert torch.equal(model.state_dict()[name], weight), name
    path = tmp_path / "photo.png"
    photo(40, 40).save(path)
    pixels = ImageProcessor(image_size=original.config.vision.image_size)(Image.open(path))
    expected = ChatSession(original, tok, pixels, max_new_tokens=8).ask("What colour is it?")
    assert chat_main(["--hf", str(directory), str(path), "What colour is it?",
                      "--max-new-tokens", "8"]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == expected
