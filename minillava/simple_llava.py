"""SimpleLLaVA: a LLaVA of your own from two pretrained towers and a new projector.

`pretrained.py` loads a LLaVA someone else finished. This file does what the LLaVA authors did
first: take a pretrained CLIP vision tower and a pretrained Llama-family language model, which
have never seen each other, join them with a NEW, randomly initialised projector, and train:

    vision_dir/   config.json + *.safetensors    CLIPVisionModel, or a whole CLIPModel (its
                  (preprocessor_config.json)     text half is skipped)          -> vision_tower
    (new)         mlp2x_gelu, random              Linear -> GELU -> Linear       -> projector
    language_dir/ config.json + *.safetensors    LlamaForCausalLM (GQA allowed) -> language_model
                  tokenizer.json (+ generation_config.json)                      -> tokenizer

    model, tokenizer, processor = simple_llava("clip-vit-large-patch14-336/", "vicuna-7b/")
    train_simple_llava(model, tokenizer, processor, "align", StageConfig(steps=500, lr=1e-3))
    train_simple_llava(model, tokenizer, processor, "instruct", StageConfig(steps=500, lr=2e-5))

Both towers go through minillava's own classes (VisionTransformer, Decoder) and the same name
rules as a LLaVA checkpoint (`interop.llava_file_name_to_hf`, `from_hf_names`): a CLIP file's
`vision_model.*` is LLaVA's `vision_tower.vision_model.*`, a Llama file's `model.*` and
`lm_head.*` are LLaVA's `language_model.model.*` and `language_model.lm_head.*`. No new map.

A plain Llama tokenizer has no `<image>` token: one is added at the end of the vocabulary, and
the embedding table and the LM head grow by one row. The stages then train exactly as the
course's own model does (`stages.ConversationBatches`, `train.train_stage`): `align` the
projector alone, `instruct` the projector and the language model (or LoRA adapters on it), in
LLaVA-1.5's USER/ASSISTANT format (`CheckpointTokenizer.render`), the image once per
conversation, pixels through CLIP's own preprocessing (`CLIPPreprocess`).

`safetensors` and `tokenizers` form the optional `hf` extra.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minillava.checkpoint import CheckpointMismatchError, CheckpointNotFoundError
from minillava.data.clip_preprocess import CLIPPreprocess
from minillava.data.shapes import ShapesWorld, WorldConfig
from minillava.device import pick_device
from minillava.hf_tokenizer import CheckpointTokenizer, _tokenizers
from minillava.interop import from_hf_names, llava_file_name_to_hf
from minillava.llava import Llava, LlavaConfig
from minillava.lora import apply_lora
from minillava.presets import DataSizes, StageConfig
from minillava.pretrained import (
    LLAMA_DEFAULTS,
    UnsupportedCheckpointError,
    _safetensors,
    llava_config_from_hf,
    materialise,
    read_json,
    resolve_dtype,
    text_settings,
    weight_files,
)
from minillava.projector import build_projector

IMAGE_TOKEN = "<image>"

# transformers' CLIPVisionConfig() (ViT-B/32 at 224 px): what a CLIP config.json leaves out.
# (pretrained.CLIP_VISION_DEFAULTS are LLaVA's, whose vision_config defaults to ViT-L/14.)
CLIP_DEFAULTS = {
    "model_type": "clip_vision_model",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


class SimpleLlavaError(CheckpointMismatchError):
    """A tower minillava's Llava cannot run; one line naming the directory, field and value."""


def _fail(directory: Path, message: str):
    raise SimpleLlavaError(f"{directory}: {message}") from None


# ---------------------------------------------------------------------------------------------
# The two config.json files -> one LlavaConfig
# ---------------------------------------------------------------------------------------------


def vision_settings(vision_dir: Path) -> dict:
    """The CLIP vision config (CLIPVisionModel's, or a CLIPModel's `vision_config`), defaults
    filled in."""
    config = read_json(vision_dir / "config.json")
    kind = config.get("model_type")
    if kind == "clip":
        config = config.get("vision_config") or {}
    elif kind != "clip_vision_model":
        _fail(
            vision_dir,
            f"config.json model_type={kind!r} is not a CLIP vision tower (expected "
            "'clip_vision_model' or 'clip')",
        )
    return CLIP_DEFAULTS | config | {"model_type": "clip_vision_model"}


def language_settings(language_dir: Path) -> dict:
    """The Llama config, defaults filled in (`pretrained.text_settings`, RoPE included)."""
    config = read_json(language_dir / "config.json")
    if config.get("model_type") != "llama":
        _fail(
            language_dir,
            f"config.json model_type={config.get('model_type')!r} is not supported (expected "
            "'llama': a LlamaForCausalLM, e.g. Vicuna, TinyLlama, Llama 2/3)",
        )
    return text_settings({"text_config": LLAMA_DEFAULTS | config})


def build_config(
    vision: dict, text: dict, vocab_size: int, image_token_id: int, vision_feature_layer: int
) -> LlavaConfig:
    """One LLaVA config.json (as a dict) made of the two, read by `llava_config_from_hf`: the
    same checks (and one-line errors) as a finished LLaVA's."""
    settings = {
        "model_type": "llava",
        "vision_config": vision,
        "text_config": text | {"vocab_size": vocab_size},
        "image_token_index": image_token_id,
        "vision_feature_layer": vision_feature_layer,
        "tie_word_embeddings": text["tie_word_embeddings"],
    }
    try:
        return llava_config_from_hf(settings)
    except UnsupportedCheckpointError as error:
        message = str(error).split(": minillava reads")[0]  # drop the LLaVA-1.5 sentence
        raise SimpleLlavaError(f"simple_llava: {message}") from None


# ---------------------------------------------------------------------------------------------
# tokenizer.json, with an <image> token
# ---------------------------------------------------------------------------------------------


def read_tokenizer(language_dir: Path, text: dict) -> tuple[CheckpointTokenizer, int]:
    """(the tokenizer, with `<image>` added if it had none; the model's vocabulary size, one
    row more when the new id lies past the embedding table)."""
    path = language_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} not found: simple_llava reads tokenizer.json")
    tokenizer = _tokenizers().Tokenizer.from_file(str(path))
    vocab_size = text["vocab_size"]
    if tokenizer.get_vocab_size(with_added_tokens=True) > vocab_size:
        _fail(language_dir, f"tokenizer.json has more tokens than vocab_size={vocab_size}")
    if tokenizer.token_to_id(IMAGE_TOKEN) is None:
        tokenizer.add_special_tokens([IMAGE_TOKEN])  # the next free id
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    generation = read_json(language_dir / "generation_config.json")
    eos = generation.get("eos_token_id", text["eos_token_id"])
    eos = eos[0] if isinstance(eos, list) else eos  # several: the first ends a turn
    try:
        checkpoint_tokenizer = CheckpointTokenizer(tokenizer, image_id, eos, text["pad_token_id"])
    except ValueError as error:
        _fail(language_dir, str(error))
    return checkpoint_tokenizer, max(vocab_size, image_id + 1)


# ---------------------------------------------------------------------------------------------
# The weights of each tower
# ---------------------------------------------------------------------------------------------


def read_tower(
    model: Llava,
    directory: Path,
    prefix: str,
    device: torch.device,
    dtype: torch.dtype,
    keep=lambda name: True,
) -> dict[str, torch.Tensor]:
    """The weights of one tower's files under our names. A file's name, with `prefix` in front,
    is a name of a LLaVA file ("vision_tower." + "vision_model.embeddings...", "language_model."
    + "model.layers..."), read as `pretrained.read_weights` reads those. The embedding table and
    LM head may hold one row fewer than `model` (the <image> row, added by `grow_vocabulary`)."""
    safe_open = _safetensors()
    ours_for = from_hf_names(model)
    expected = {name: tensor.shape for name, tensor in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt", device="cpu") as file:
            for stored in file.keys():
                if not keep(stored):
                    continue
                hf_name = llava_file_name_to_hf(prefix + stored)
                if hf_name is None:  # a saved buffer
                    continue
                ours = ours_for.get(hf_name)
                if ours is None:
                    _fail(directory, f"{path.name}: weight {stored!r} has no place in the model")
                tensor = file.get_tensor(stored)
                shape = tuple(expected[ours])
                allowed = [shape]
                if ours.endswith(("embed_tokens.weight", "lm_head.weight")):
                    allowed.append((shape[0] - 1, *shape[1:]))  # no <image> row yet
                if tuple(tensor.shape) not in allowed:
                    _fail(
                        directory,
                        f"{path.name}: weight {stored!r} has shape {tuple(tensor.shape)}, but "
                        f"config.json makes it {shape}",
                    )
                state[ours] = tensor.to(dtype if tensor.is_floating_point() else tensor.dtype)
    return {name: tensor.to(device) for name, tensor in state.items()}


def grow_vocabulary(state: dict[str, torch.Tensor], vocab_size: int, tied: bool) -> None:
    """Give the embedding table and the LM head their <image> row, if the file lacks it.

    The new row is the MEAN of the others, not random: a random lm_head row would give the new
    token a logit unlike any other, and the pretrained model's next-token distribution would
    change on every text (its softmax sums over the new row too); the mean row gives it an
    ordinary logit, so the model predicts text as before (Hewitt, "Initializing New Word
    Embeddings for Pretrained Language Models", 2021). In the input, the <image> embedding is
    never read: `splice_image_tokens` puts the image's features in its place.
    """
    embed, head = "language_model.embed_tokens.weight", "language_model.lm_head.weight"
    names = [embed] if tied else [embed, head]
    for name in names:
        table = state[name]
        if table.shape[0] < vocab_size:
            mean = table.float().mean(0, keepdim=True).to(table.dtype)
            state[name] = torch.cat([table, mean])
    if tied:
        state[head] = state[embed]  # one matrix, whether or not the file stored it twice


# ---------------------------------------------------------------------------------------------
# The whole model
# ---------------------------------------------------------------------------------------------


def simple_llava(
    vision_dir: str | Path,
    language_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    vision_feature_layer: int = -2,
) -> tuple[Llava, CheckpointTokenizer, CLIPPreprocess]:
    """A pretrained CLIP vision tower + a new random mlp2x_gelu projector + a pretrained Llama
    -> (our Llava in eval mode, the Llama tokenizer with `<image>`, CLIP's preprocessing).

    vision_dir: a CLIPVisionModel or CLIPModel directory (config.json, *.safetensors).
    language_dir: a LlamaForCausalLM directory (config.json, *.safetensors, tokenizer.json).
    device, dtype: as `pretrained.load_pretrained` ("auto": bf16/fp16 on a GPU, fp32 on a CPU).
    vision_feature_layer: the CLIP hidden state the projector reads (-2: the penultimate).
    The projector is drawn from torch's global generator: seed it (`torch.manual_seed`) first
    for a reproducible start. Raises SimpleLlavaError (one line) for a tower it cannot run.
    """
    vision_dir, language_dir = Path(vision_dir), Path(language_dir)
    for directory in (vision_dir, language_dir):
        if not (directory / "config.json").is_file():
            raise CheckpointNotFoundError(f"{directory} holds no config.json: not a checkpoint")
    device = pick_device(str(device))
    dtype = resolve_dtype(dtype, device)
    vision, text = vision_settings(vision_dir), language_settings(language_dir)
    tokenizer, vocab_size = read_tokenizer(language_dir, text)
    config = build_config(vision, text, vocab_size, tokenizer.image_id, vision_feature_layer)

    with torch.device("meta"):  # shapes only: each weight gets its memory once, when read
        model = Llava(config)
    is_clip_model = read_json(vision_dir / "config.json").get("model_type") == "clip"
    state = read_tower(
        model, vision_dir, "vision_tower.", device, dtype,
        keep=lambda name: not is_clip_model or name.startswith("vision_model."),
    )  # fmt: skip
    state |= read_tower(model, language_dir, "language_model.", device, dtype)
    grow_vocabulary(state, vocab_size, config.text.tie_embeddings)
    with torch.device(device):  # the new bridge, randomly initialised
        projector = build_projector(
            config.projector, config.vision.hidden_size, config.text.hidden_size
        )
    state |= {f"projector.{k}": v.to(dtype) for k, v in projector.state_dict().items()}
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise SimpleLlavaError(
            f"simple_llava: {len(missing)} weights missing from the towers' files, e.g. "
            f"{missing[0]!r}"
        )
    model = materialise(model, state, device)

    preprocessor = read_json(vision_dir / "preprocessor_config.json")
    processor = CLIPPreprocess.from_config(preprocessor, image_size=config.vision.image_size)
    if processor.crop_size != (config.vision.image_size,) * 2:
        _fail(vision_dir, f"preprocessor_config.json crop_size={processor.crop_size} is not "
              f"the tower's image_size={config.vision.image_size}")  # fmt: skip
    return model, tokenizer, processor


# ---------------------------------------------------------------------------------------------
# Training: the align and instruct stages on ShapesWorld
# ---------------------------------------------------------------------------------------------


def prepare_stage(model: Llava, stage: str, lora_rank: int = 0) -> None:
    """Freeze what the stage does not train: `align` trains the projector alone, `instruct`
    the projector and the language model (with lora_rank > 0: LoRA adapters on it instead)."""
    if stage not in ("align", "instruct"):
        raise ValueError(f"stage must be 'align' or 'instruct', got {stage!r}")
    model.freeze_vision()
    model.freeze_projector(False)
    model.freeze_language(stage == "align")
    if stage == "instruct" and lora_rank:
        apply_lora(model.language_model, ("q_proj", "v_proj"), rank=lora_rank)


def shapes_batches(
    stage: str,
    tokenizer: CheckpointTokenizer,
    processor: CLIPPreprocess,
    config: StageConfig,
    images: int = 1000,
    max_len: int = 256,
    seed: int = 0,
):
    """ShapesWorld's `align` (captions) or `instruct` (the course's mix) batches, drawn as the
    course's own stages draw them, but in this tokenizer's format and CLIP's pixels."""
    from minillava.stages import ConversationBatches, instruct_mix

    world = ShapesWorld("train", images, WorldConfig(), seed=seed, processor=processor)
    if stage == "align":
        mix = {"kinds": ("caption",)}
    else:
        mix = instruct_mix(DataSizes())
    return ConversationBatches(stage, world, tokenizer, config, seed, max_len, **mix)


def train_simple_llava(
    model: Llava,
    tokenizer: CheckpointTokenizer,
    processor: CLIPPreprocess,
    stage: str,
    config: StageConfig,
    batches=None,
    lora_rank: int = 0,
    images: int = 1000,
    max_len: int = 256,
    seed: int = 0,
    **train_options,
):
    """Run stage `align` or `instruct` on `model` with `train.train_stage`; its StageResult.

    batches: any `StageBatches`, e.g. `stages.LlavaJsonBatches(stage, LlavaJsonDataset(json,
    processor=processor), tokenizer, config, seed, max_len)` for a LLaVA-format data set; None:
    ShapesWorld's (`shapes_batches`). train_options go to
    `train_stage` (out_dir, device, dtype, progress, ...).
    """
    from minillava.train import train_stage

    longest = max_len + model.config.num_image_tokens - 1  # one image per conversation
    if longest > model.config.text.max_seq_len:
        raise ValueError(
            f"max_len={max_len} text tokens and one image of {model.config.num_image_tokens} "
            f"positions make {longest}, more than the language model's "
            f"{model.config.text.max_seq_len}: lower max_len"
        )
    prepare_stage(model, stage, lora_rank)
    if batches is None:
        batches = shapes_batches(stage, tokenizer, processor, config, images, max_len, seed)
    return train_stage(model, batches, config, name=stage, **train_options)
