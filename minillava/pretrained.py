"""Real weights through your own code: a pretrained LLaVA-1.5 checkpoint in minillava's `Llava`.

Everything this course builds by hand (the CLIP ViT, the projector, the Llama decoder, the
splicing of image features into the prompt) is the architecture of LLaVA-1.5. So a checkpoint
trained by others at full scale (`llava-hf/llava-1.5-7b-hf`, or a smaller model of the same
layout, Llama text model with grouped-query attention included) loads into our own classes and
answers questions about your photos, with no transformers code on the way:

    directory/
      config.json                       -> LlavaConfig (ViTConfig + DecoderConfig), checked
      model.safetensors                 -> the weights, renamed by minillava.interop's one
      (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)   name mapping
      tokenizer.json                    -> CheckpointTokenizer (hf_tokenizer.py)
      preprocessor_config.json          -> CLIPPreprocess (data/clip_preprocess.py)

    model, tokenizer, processor = load_pretrained("llava-1.5-7b-hf/", device="cuda")
    image, _ = read_image("photo.jpg")
    chat.ask(model, tokenizer, processor(image), "What is in this picture?")

The tokenizer has the interface of minillava's own (`render_prompt`, `stop_ids`, `pad_id`,
`decode`), so the chat's own code (`chat.ask`, `ChatSession`, `minillava chat --hf`) runs it:
one generation path for the course's model and a real one.

What maps onto what (transformers' name -> ours):

    CLIPVisionModel (quick GELU)           -> VisionTransformer
    vision_feature_layer = -2, "default"   -> Llava.encode_images: penultimate layer, no [CLS]
    multi_modal_projector (mlp2x_gelu)     -> MLPProjector: Linear -> GELU -> Linear
    LlamaForCausalLM (GQA, RoPE, RMSNorm)  -> Decoder (num_kv_heads, rope_theta, rms_norm_eps)
    the <image> token, P patches           -> splice_image_tokens: one id becomes P positions

The reading is strict: a checkpoint of another architecture (LLaVA-NeXT, a Mistral or Qwen text
model, a SigLIP vision tower, another projector, a layer selection we do not implement) or with a
weight missing, extra or of the wrong shape raises `UnsupportedCheckpointError`, whose one-line
message names the field and its value. Loading something almost right would give a model that
talks fluent nonsense about the image, which is much harder to notice than an error.

The weights are read with the `safetensors` package one tensor at a time, into a model built on
PyTorch's "meta" device (shapes without memory): a 7B model in fp16 then needs its 14 GB once,
not a random float32 copy first. `safetensors` and `tokenizers` form the optional `hf` extra.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from minillava.checkpoint import (
    CheckpointMismatchError,
    CheckpointNotFoundError,
    check_vocabulary,
)
from minillava.data.clip_preprocess import CLIPPreprocess
from minillava.data.image_processor import ImageProcessor
from minillava.decoder import DecoderConfig, RotaryEmbedding
from minillava.device import pick_device
from minillava.hf_tokenizer import CheckpointTokenizer
from minillava.interop import from_hf_names, llava_file_name_to_hf
from minillava.llava import Llava, LlavaConfig
from minillava.tokenizer import get_tokenizer
from minillava.vit import ViTConfig

SUPPORTED = (
    "minillava reads LLaVA-1.5 checkpoints: a CLIP vision tower, the 2-layer GELU projector and a "
    "Llama text model"
)

# A config.json writes only what differs from transformers' defaults (llava-1.5-7b-hf's
# text_config holds 7 keys), so the defaults are part of the format. These are transformers'
# own (LlamaConfig(), CLIPVisionConfig(), LlavaConfig()); tests/test_pretrained.py checks them.
LLAMA_DEFAULTS = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": None,  # None: as many as attention heads (no grouping)
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "eos_token_id": 2,
    "pad_token_id": None,
}
CLIP_VISION_DEFAULTS = {  # LLaVA's default tower is CLIP ViT-L/14 at 336 px, not CLIP's base
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
LLAVA_DEFAULTS = {
    "image_token_index": 32000,
    "projector_hidden_act": "gelu",
    "vision_feature_select_strategy": "default",
    "vision_feature_layer": -2,
    "multimodal_projector_bias": True,
}


class UnsupportedCheckpointError(CheckpointMismatchError):
    """A checkpoint minillava's Llava cannot run; the message names the field and its value.

    A `CheckpointMismatchError` (so a ValueError): the `minillava` command prints it in one line.
    """


# ---------------------------------------------------------------------------------------------
# config.json -> LlavaConfig
# ---------------------------------------------------------------------------------------------


def read_json(path: Path) -> dict:
    """A JSON file as a dict; {} when the file is absent (every file but config.json may be)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UnsupportedCheckpointError(f"{path} is not valid JSON: {error}") from None


def _require(where: str, field: str, value, allowed: tuple) -> None:
    if value not in allowed:
        wanted = " or ".join(repr(a) for a in allowed)
        raise UnsupportedCheckpointError(
            f"config.json {where}{field}={value!r} is not supported (expected {wanted}): "
            f"{SUPPORTED}"
        )


def text_settings(config: dict) -> dict:
    """config.json's text_config with transformers' Llama defaults filled in."""
    text = LLAMA_DEFAULTS | (config.get("text_config") or {})
    # transformers 5 writes RoPE as rope_parameters {"rope_type", "rope_theta"}; 4.x wrote
    # rope_theta and rope_scaling (None unless the positions are stretched).
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    text["rope_type"] = rope.get("rope_type", rope.get("type", "default"))
    text["rope_theta"] = rope.get("rope_theta", text["rope_theta"])
    if text["num_key_value_heads"] is None:
        text["num_key_value_heads"] = text["num_attention_heads"]
    return text


def llava_config_from_hf(config: dict) -> LlavaConfig:
    """A transformers LLaVA config.json (as a dict) -> minillava's LlavaConfig, or
    UnsupportedCheckpointError naming the first field minillava does not implement."""
    _require("", "model_type", config.get("model_type"), ("llava",))
    top = LLAVA_DEFAULTS | config
    text = text_settings(config)
    vision = CLIP_VISION_DEFAULTS | (config.get("vision_config") or {})

    _require("text_config.", "model_type", text["model_type"], ("llama",))
    _require("text_config.", "hidden_act", text["hidden_act"], ("silu",))
    _require("text_config.", "attention_bias", text["attention_bias"], (False,))
    _require("text_config.", "mlp_bias", text["mlp_bias"], (False,))
    _require("text_config.", "rope_type", text["rope_type"], ("default",))
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    _require("text_config.", "head_dim", text.get("head_dim", head_dim), (head_dim,))
    _require("vision_config.", "model_type", vision["model_type"], ("clip_vision_model",))
    _require("vision_config.", "hidden_act", vision["hidden_act"], ("quick_gelu", "gelu"))
    _require("", "projector_hidden_act", top["projector_hidden_act"], ("gelu",))
    _require("", "multimodal_projector_bias", top["multimodal_projector_bias"], (True,))
    strategy = top["vision_feature_select_strategy"]  # "default": the patches, [CLS] dropped
    _require("", "vision_feature_select_strategy", strategy, ("default",))
    if not isinstance(top["vision_feature_layer"], int):  # transformers also takes a list
        _require("", "vision_feature_layer", top["vision_feature_layer"], (-2,))

    # The head is tied to the embeddings if the top level says so (transformers 5 reads it
    # there), else if the text model does.
    tie = config.get("tie_word_embeddings", text["tie_word_embeddings"])
    try:
        return LlavaConfig(
            vision=ViTConfig(
                image_size=vision["image_size"],
                patch_size=vision["patch_size"],
                num_channels=vision["num_channels"],
                hidden_size=vision["hidden_size"],
                num_layers=vision["num_hidden_layers"],
                num_heads=vision["num_attention_heads"],
                intermediate_size=vision["intermediate_size"],
                layer_norm_eps=vision["layer_norm_eps"],
                hidden_act=vision["hidden_act"],
            ),
            text=DecoderConfig(
                vocab_size=text["vocab_size"],
                hidden_size=text["hidden_size"],
                num_layers=text["num_hidden_layers"],
                num_heads=text["num_attention_heads"],
                num_kv_heads=text["num_key_value_heads"],
                intermediate_size=text["intermediate_size"],
                max_seq_len=text["max_position_embeddings"],
                rope_theta=float(text["rope_theta"]),
                rms_norm_eps=text["rms_norm_eps"],
                tie_embeddings=bool(tie),
            ),
            projector="mlp2x_gelu",
            image_token_id=config.get("image_token_id", top["image_token_index"]),
            vision_feature_layer=top["vision_feature_layer"],
        )
    except ValueError as error:  # our configs' own checks (sizes that do not divide, ...)
        raise UnsupportedCheckpointError(f"config.json: {error}") from None


# ---------------------------------------------------------------------------------------------
# *.safetensors -> the model's weights
# ---------------------------------------------------------------------------------------------


def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's safetensors files: those its index lists when it is sharded."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(read_json(index).get("weight_map", {}).values()))
        files = [directory / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise UnsupportedCheckpointError(
                f"{index.name} lists shards that are not in {directory}: {', '.join(missing)}"
            )
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in directory.glob("*.bin")) or ["none"]
        raise UnsupportedCheckpointError(
            f"no *.safetensors weights in {directory} (PyTorch .bin files: {', '.join(others)}); "
            "minillava reads safetensors only, which cannot run code when loaded"
        )
    return files


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None or "auto": bfloat16 on a GPU that has it, else float16 on a GPU, float32 on a CPU
    (where half-precision matmuls are slow). Otherwise the dtype named."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or 'auto', got {dtype!r}")
    return names[dtype]


def _safetensors():
    try:
        from safetensors import safe_open
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "reading pretrained weights needs the `safetensors` package: pip install "
            "'minillava[hf]'"
        ) from error
    return safe_open


def read_weights(
    model: Llava, files: list[Path], device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Every weight of `files` under our name, as `dtype` on `device`, checked against `model`.

    One tensor at a time: each is read from the memory-mapped file, converted and moved, so the
    peak is the model itself plus one tensor.
    """
    safe_open = _safetensors()
    ours_for = from_hf_names(model)  # {transformers name: our name}
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            for stored in file.keys():
                hf_name = llava_file_name_to_hf(stored)
                if hf_name is None:  # a saved buffer (position ids, RoPE frequencies)
                    continue
                ours = ours_for.get(hf_name)
                if ours is None:
                    raise UnsupportedCheckpointError(
                        f"{path.name}: weight {stored!r} has no place in minillava's Llava "
                        f"(an architecture it does not implement?): {SUPPORTED}"
                    )
                tensor = file.get_tensor(stored)
                if tensor.shape != expected[ours]:
                    raise UnsupportedCheckpointError(
                        f"{path.name}: weight {stored!r} has shape {tuple(tensor.shape)}, but "
                        f"config.json makes it {tuple(expected[ours])}"
                    )
                if tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                state[ours] = tensor.to(device)
    tied = model.config.text.tie_embeddings
    head, embeddings = "language_model.lm_head.weight", "language_model.embed_tokens.weight"
    if tied and embeddings in state:
        state[head] = state[embeddings]  # one matrix, whether or not the file stored it twice
    missing = [name for name in expected if name not in state]
    if missing:
        hf_names = {ours: hf for hf, ours in ours_for.items()}
        shown = ", ".join(repr(hf_names[name]) for name in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UnsupportedCheckpointError(
            f"{len(missing)} weights missing from {files[0].parent}: {shown}{more}"
        )
    return state


def materialise(model: Llava, state: dict[str, torch.Tensor], device) -> Llava:
    """Put `state`'s tensors (no copy) into a Llava built on the "meta" device.

    On "meta", tensors have shapes but no storage, so building the model allocated nothing and
    its random initialisation did not really run; `load_state_dict(assign=True)` now makes the
    loaded tensors its parameters. What no file holds is computed on `device`: RoPE's cos/sin
    tables, kept in float32 (the decoder casts them to its own dtype at each use).
    """
    model.load_state_dict(state, strict=True, assign=True)
    decoder = model.language_model
    if model.config.text.tie_embeddings:  # assign=True set two Parameters; make them one again
        decoder.lm_head.weight = decoder.embed_tokens.weight
    text = model.config.text
    with torch.device(device):
        decoder.rotary = RotaryEmbedding(text.head_dim, text.rope_theta, text.max_seq_len)
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta:  # pragma: no cover - a new buffer in the model that this loader forgot
        raise RuntimeError(f"materialise: nothing loaded or computed for {left_on_meta}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The whole checkpoint: model, tokenizer, image preprocessing
# ---------------------------------------------------------------------------------------------


def checkpoint_directory(path_or_id: str | Path) -> Path:
    """A local checkpoint directory as is; a Hub model id ("llava-hf/llava-1.5-7b-hf") fetched
    with `huggingface_hub` when it is installed, which needs the network."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointNotFoundError(f"{path} holds no config.json: not a checkpoint")
        return path
    name = str(path_or_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointNotFoundError(
            f"{name} is not a checkpoint directory (nor a Hub model id such as "
            "'llava-hf/llava-1.5-7b-hf')"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointNotFoundError(
            f"{name} is not a local directory; to download it as a Hub model id, install "
            "huggingface_hub (pip install huggingface_hub) on a machine with network access"
        ) from None
    print(f"fetching {name} from the Hugging Face Hub (needs the network) ...", file=sys.stderr)
    patterns = ["*.json", "*.safetensors"]  # config, tokenizer, weights: no .bin, no .model
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as error:  # offline, unknown id, gated model: all say the same to a user
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointNotFoundError(
            f"{name} is not a local directory, and downloading it from the Hugging Face Hub "
            f"failed (it needs the network): {first_line}"
        ) from None


# What `minillava export` writes beside the weights: the course tokenizer's name and special ids.
EXPORTED_TOKENIZER = Path("tokenizer") / "special_tokens.json"


def read_tokenizer_and_processor(directory: Path, settings: dict, config: LlavaConfig):
    """tokenizer.json and preprocessor_config.json, checked against the model's config.json
    (before any weight is read: a mismatch is reported in seconds, not after loading 14 GB).

    A directory written by `minillava export` holds a course model instead: it gets the course
    tokenizer, chat template and image processing it was trained with, so that a model you
    trained goes out through `export` and comes back through `chat --hf` unchanged.
    """
    if (directory / EXPORTED_TOKENIZER).is_file():
        name = read_json(directory / EXPORTED_TOKENIZER)["name"]
        tokenizer = get_tokenizer(name)
        check_vocabulary(directory, config.text.vocab_size, config.image_token_id, tokenizer)
        return tokenizer, ImageProcessor(image_size=config.vision.image_size)
    text = text_settings(settings)
    generation = read_json(directory / "generation_config.json")
    eos = generation.get("eos_token_id", text["eos_token_id"])
    eos = eos[0] if isinstance(eos, list) else eos  # several: the first is the end of a turn
    pad = settings.get("pad_token_id", text["pad_token_id"])
    try:
        tokenizer = CheckpointTokenizer.from_directory(directory, config.image_token_id, eos, pad)
        processor = CLIPPreprocess.from_config(
            read_json(directory / "preprocessor_config.json"), image_size=config.vision.image_size
        )
    except (ValueError, FileNotFoundError) as error:  # a file that does not fit the model
        raise UnsupportedCheckpointError(str(error)) from None
    if len(tokenizer) > config.text.vocab_size:
        raise UnsupportedCheckpointError(
            f"tokenizer.json has {len(tokenizer)} tokens, more than the model's vocab_size="
            f"{config.text.vocab_size}: they are not the same model's"
        )
    if processor.crop_size != (config.vision.image_size,) * 2:
        raise UnsupportedCheckpointError(
            f"preprocessor_config.json crop_size={processor.crop_size} does not match the "
            f"vision tower's image_size={config.vision.image_size}"
        )
    return tokenizer, processor


def load_pretrained(
    path_or_id: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> tuple[Llava, CheckpointTokenizer, CLIPPreprocess]:
    """A LLaVA-1.5 checkpoint -> (our Llava in eval mode, its tokenizer, its image preprocessing);
    for a directory `minillava export` wrote, the course's tokenizer and ImageProcessor.

    path_or_id: a directory (config.json, *.safetensors, tokenizer.json), or a Hub model id.
    device: "cpu", "cuda", "mps" or "auto" (the best there is).
    dtype: None/"auto" (bfloat16 or float16 on a GPU, float32 on a CPU), or one by name.
    Raises UnsupportedCheckpointError (one line, naming the field) for what it cannot run.
    """
    directory = checkpoint_directory(path_or_id)
    device = pick_device(str(device))
    dtype = resolve_dtype(dtype, device)
    settings = read_json(directory / "config.json")
    config = llava_config_from_hf(settings)
    tokenizer, processor = read_tokenizer_and_processor(directory, settings, config)
    with torch.device("meta"):  # the shapes of every weight, and no memory for them yet
        model = Llava(config)
    state = read_weights(model, weight_files(directory), device, dtype)
    model = materialise(model, state, device)
    return model, tokenizer, processor
