"""What each training stage trains, on what data: the LLaVA recipe, shrunk to ShapesWorld.

    lm        Decoder                 packed ShapesWorld text (captions, descriptions, Q&A)
    clip      CLIP (ViT + text enc.)  image-caption pairs, contrastive loss
    align     Llava: projector only   "<image> Write a short caption." -> caption
    instruct  Llava: projector + LM   conversations, detailed descriptions, reasoning, and
                                      short-answer VQA in the eval convention

Each stage starts from the previous stages' checkpoints: the `clip` stage's ViT becomes LLaVA's
vision tower, the `lm` stage's decoder its language model, `align`'s projector is where
`instruct` starts. A stage whose inputs are missing starts those parts from random weights, with
a warning (an ablation worth trying: how much does each pretraining stage buy?).

Batches are built so that batch k depends only on (seed, stage, k): `batch_generator` seeds a
fresh generator from that triple. A resumed run therefore sees exactly the batches the
uninterrupted run would have seen, whatever the number of workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from minillava.checkpoint import CheckpointMismatchError, load_checkpoint, weights_mismatch
from minillava.clip import CLIP, CLIPConfig, TextEncoderConfig
from minillava.data.collate import collate_conversations, collate_text
from minillava.data.instruct import (
    IMAGE,
    MAX_TURNS,
    count_images,
    image_once,
    image_with_every_question,
)
from minillava.data.mixture import curriculum_phases, scene_turns
from minillava.data.shapes import (
    ShapesWorld,
    WorldConfig,
    make_captions,
    make_description,
    swap_one_shape,
)
from minillava.decoder import Decoder, DecoderConfig
from minillava.llava import Llava, LlavaConfig
from minillava.lora import apply_lora
from minillava.presets import DataSizes, Preset, StageConfig
from minillava.vit import ViTConfig

CLIP_TEXT_LEN = 64  # tokens: the longest caption (with its end-of-text token) the CLIP text
# encoder reads; ShapesWorld captions are at most ~45 tokens.


# ----------------------------------------------------------------------------------------------
# Configs of the three networks, from a preset


def world_config(preset: Preset) -> WorldConfig:
    """The ShapesWorld every stage (and the final evaluation) draws images from."""
    return WorldConfig(
        image_size=preset.model.image_size,
        max_objects=preset.data.max_objects,
        text_prob=preset.data.text_prob,
    )


def vit_config(preset: Preset) -> ViTConfig:
    m = preset.model
    return ViTConfig(
        image_size=m.image_size,
        patch_size=m.patch_size,
        hidden_size=m.vision_hidden,
        num_layers=m.vision_layers,
        num_heads=m.vision_heads,
        intermediate_size=m.vision_intermediate,
    )


def decoder_config(preset: Preset, vocab_size: int) -> DecoderConfig:
    m = preset.model
    return DecoderConfig(
        vocab_size=vocab_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        num_kv_heads=m.num_kv_heads,
        intermediate_size=m.intermediate_size,
        max_seq_len=m.max_seq_len,
        dropout=m.dropout,
        gradient_checkpointing=preset.gradient_checkpointing,
    )


def clip_config(preset: Preset, vocab_size: int) -> CLIPConfig:
    m = preset.model
    text = TextEncoderConfig(
        vocab_size=vocab_size,
        max_len=CLIP_TEXT_LEN,
        hidden_size=m.text_encoder_hidden,
        num_layers=m.text_encoder_layers,
        num_heads=m.text_encoder_heads,
        intermediate_size=4 * m.text_encoder_hidden,
    )
    return CLIPConfig(vision=vit_config(preset), text=text, embed_dim=m.clip_embed_dim)


def llava_config(preset: Preset, tokenizer) -> LlavaConfig:
    return LlavaConfig(
        vision=vit_config(preset),
        text=decoder_config(preset, tokenizer.vocab_size),
        projector=preset.model.projector,
        vision_feature_layer=preset.model.vision_feature_layer,
        image_token_id=tokenizer.image_id,
    )


# ----------------------------------------------------------------------------------------------
# Reproducible batches


def hash_seed(*parts: object) -> int:
    """A 63-bit seed from any values, the same in every process (unlike Python's `hash`)."""
    text = ":".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def batch_generator(seed: int, stage: str, k: int) -> torch.Generator:
    """A torch generator that depends only on (seed, stage, k), stable across runs and machines."""
    return torch.Generator().manual_seed(hash_seed(seed, stage, k))


class StageBatches(Dataset):
    """Item m is micro-batch m of a stage: this process's share of part of a global batch.

    A global batch (one optimizer step, `config.batch_size` samples) is cut into `grad_accum`
    micro-batches, each split over the `world_size` processes (rank r takes every world_size-th
    sample). Subclasses turn a list of sample indices into tensors (`make_batch`).
    """

    def __init__(
        self,
        stage: str,
        num_items: int,
        config: StageConfig,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        per_process = config.grad_accum * world_size
        if config.batch_size % per_process:
            raise ValueError(
                f"{stage}.batch_size={config.batch_size} must be divisible by grad_accum x "
                f"processes = {config.grad_accum} x {world_size}"
            )
        if num_items < config.batch_size:
            raise ValueError(
                f"stage {stage}: {num_items} samples is fewer than one batch of "
                f"{config.batch_size}; raise the data size or lower {stage}.batch_size"
            )
        self.stage, self.num_items, self.seed = stage, num_items, seed
        self.batch_size, self.accum = config.batch_size, config.grad_accum
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return 2**62  # any micro-batch index is valid: epochs repeat with fresh shuffles

    def global_indices(self, step: int) -> list[int]:
        """Sample indices of optimizer step `step`: each epoch walks a fresh permutation."""
        per_epoch = self.num_items // self.batch_size
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(
            self.num_items, generator=batch_generator(self.seed, self.stage, epoch)
        )
        return order[position * self.batch_size : (position + 1) * self.batch_size].tolist()

    def indices(self, m: int) -> list[int]:
        """This process's sample indices in micro-batch m."""
        step, part = divmod(m, self.accum)
        micro = self.batch_size // self.accum
        chunk = self.global_indices(step)[part * micro : (part + 1) * micro]
        return chunk[self.rank :: self.world_size]

    def __getitem__(self, m: int) -> dict:
        # A per-sample random stream (caption choice, question types), also a function of m only.
        rng = random.Random(f"{self.seed}:{self.stage}:{m}:{self.rank}")
        return self.make_batch(self.indices(m), rng, step=m // self.accum)

    def make_batch(self, indices: list[int], rng: random.Random, step: int = 0) -> dict:
        """The micro-batch of these samples; `step` is the optimizer step it belongs to."""
        raise NotImplementedError


class CaptionBatches(StageBatches):
    """`clip` stage: images with one of their captions, as CLIP's (pixel_values, input_ids).

    `hard_negatives=True`: every second image is a *twin* of the one before it, the same scene
    with one object's shape changed (`shapes.swap_one_shape`), with its own caption. CLIP
    learns what tells the images of its batch apart, and in a random batch colour and count
    nearly always do: shape is left out ("CLIP behaves like a bag of words", Yuksekgonul et
    al., 2023, fixed the same way with hard negatives). Beside its twin, only the shape tells
    an image from its neighbour. The batch keeps its size: half of it are twins.
    """

    def __init__(
        self, world, tokenizer, config: StageConfig, seed: int, hard_negatives=False, **dist
    ):
        self.world, self.tokenizer, self.hard_negatives = world, tokenizer, hard_negatives
        super().__init__("clip", len(world), config, seed, **dist)

    def with_twins(self, indices: list[int], rng: random.Random) -> list:
        """The samples of `indices`, every second one replaced by a shape-swapped twin of the
        one before it (only the samples kept are drawn)."""
        samples = []
        for j, index in enumerate(indices):
            if j % 2 == 1:
                original = samples[-1]
                twin = swap_one_shape(original.scene, rng, self.world.config, self.world.split)
                if twin is not None:  # else the ordinary sample: rare (8 tries)
                    samples.append(self.world.draw(original.index, twin, rng))
                    continue
            samples.append(self.world[index])
        return samples

    def make_batch(self, indices: list[int], rng: random.Random, step: int = 0) -> dict:
        if self.hard_negatives:
            samples = self.with_twins(indices, rng)
        else:
            samples = [self.world[i] for i in indices]
        captions = [rng.choice(s.captions) for s in samples]
        text = collate_text(captions, self.tokenizer, max_len=CLIP_TEXT_LEN)
        return {
            "pixel_values": torch.stack([s.pixel_values for s in samples]),
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
        }


def check_instruct_mix(preset: Preset) -> list[tuple[int, dict]]:
    """data.curriculum's phases (`curriculum_phases`), after checking the fields that shape the
    instruct stage's batches; `minillava train` calls it before any stage, so that a bad value
    fails before lm, clip and align spend their minutes.

    Raises ValueError if the phases are malformed or leave no step of instruct for the whole
    mix, or if data.read_text_weight, data.questions_per_image or one of the data shares
    (false premises, follow-ups, descriptions later) is out of range.
    """
    data = preset.data
    if data.questions_per_image < 1:
        raise ValueError(f"data.questions_per_image must be >= 1; got {data.questions_per_image}")
    for name in ("false_premise_share", "follow_up_share", "describe_later_share"):
        if not 0.0 <= getattr(data, name) <= 1.0:
            raise ValueError(f"data.{name} must be in [0, 1]; got {getattr(data, name)}")
    if data.read_text_weight is not None and data.read_text_weight < 0:
        raise ValueError(f"data.read_text_weight must be >= 0 or None; got {data.read_text_weight}")
    phases = curriculum_phases(data.curriculum, data.vqa_type_weights)
    if phases and phases[-1][0] >= preset.instruct.steps:
        raise ValueError(
            f"data.curriculum takes {phases[-1][0]} instruct steps and instruct.steps is "
            f"{preset.instruct.steps}: the whole question mix would never be trained; shorten "
            f"the phases or --set 'data.curriculum=()'"
        )
    return phases


def _choose_vqa(rng: random.Random, mix: dict) -> dict:
    """Whole batches are VQA or not (with probability vqa_fraction): rows of one batch then have
    similar lengths, and little compute goes to padding."""
    mix = dict(mix)
    mix["vqa"] = rng.random() < mix.pop("vqa_fraction", 0.0)
    return mix


class SceneTextBatches(StageBatches):
    """`lm` stage: the instruct conversations, with the image replaced by the scene in words.

        <system><|user|>What colour is the circle?\nThe image shows two shapes ... In the top
        left there is a large red circle. ...<|assistant|> red<|endoftext|><|user|>...

    Before it ever sees a pixel, the decoder learns the world's language, the chat template, to
    answer tersely, and (the hard part for a tiny model) to look an answer up in the
    description, which stands where the image will (after the question: `data.instruct.
    question_with_image`; later questions of the row read the same description back). The
    projector's job in the later stages is then to make the image tokens readable like that
    description. Every token is a target, as in pretraining.
    """

    def __init__(self, world, tokenizer, config: StageConfig, seed: int, max_len: int, **mix):
        self.world, self.tokenizer, self.max_len = world, tokenizer, max_len
        dist = {key: mix.pop(key) for key in ("rank", "world_size") if key in mix}
        self.mix = mix  # vqa_fraction, kinds (see scene_turns)
        super().__init__("lm", len(world), config, seed, **dist)

    def text_ids(self, index: int, rng: random.Random, mix: dict) -> list[int]:
        scene = self.world.scene(index)  # the annotation only: no pixels are drawn
        turns = scene_turns(scene, make_captions(scene, rng), rng, self.world.config, **mix)
        description = make_description(scene)  # in the first question's image's place, once
        for k, turn in enumerate(turns[0::2]):
            turn["value"] = turn["value"].replace(
                f"\n{IMAGE}", f"\n{description}" if k == 0 else ""
            )
        ids, _ = self.tokenizer.render(turns)
        return ids[: self.max_len]

    def make_batch(self, indices: list[int], rng: random.Random, step: int = 0) -> dict:
        mix = _choose_vqa(rng, self.mix)
        rows = [self.text_ids(i, rng, mix) for i in indices]
        length = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row)
            attention_mask[r, : len(row)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)  # no loss on the padding
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class ConversationBatches(StageBatches):
    """`align` and `instruct`: one conversation per image (`scene_turns`), chat-templated.

    `align` uses the "caption" kind only; `instruct` the mix of VQA and the data engine's kinds,
    whose short-answer batches ask only the current phase's question types while the phases of
    data.curriculum (`phases`, from `check_instruct_mix`) run.
    """

    def __init__(
        self,
        stage: str,
        world,
        tokenizer,
        config: StageConfig,
        seed: int,
        max_len: int,
        phases: list[tuple[int, dict]] | None = None,
        **mix,
    ):
        self.world, self.tokenizer, self.max_len = world, tokenizer, max_len
        dist = {key: mix.pop(key) for key in ("rank", "world_size") if key in mix}
        self.mix = mix
        # Checked by the caller (check_instruct_mix).
        self.phases = phases or []
        super().__init__(stage, len(world), config, seed, **dist)

    def make_batch(self, indices: list[int], rng: random.Random, step: int = 0) -> dict:
        mix = dict(self.mix)
        for last_step, weights in self.phases:  # a curriculum phase: only its question types
            if step < last_step:
                mix["type_weights"] = weights
                break
        mix = _choose_vqa(rng, mix)
        samples = []
        for i in indices:
            sample = self.world[i]
            turns = scene_turns(sample.scene, sample.captions, rng, self.world.config, **mix)
            if not getattr(self.tokenizer, "image_every_question", True):
                turns = image_once(turns)  # a pretrained LLaVA's tokenizer: LLaVA-1.5's way
            copies = sample.pixel_values.expand(count_images(turns), -1, -1, -1)  # one a question
            samples.append({"pixel_values": copies, "conversations": turns})
        return collate_conversations(samples, self.tokenizer, max_len=self.max_len)


class LlavaJsonBatches(StageBatches):
    """`align` or `instruct` on any LLaVA-format data set (data/llava_json.py's
    `LlavaJsonDataset`: a JSON of conversations and a folder of images), chat-templated by
    `tokenizer`. Its records write the image once, before the first question (LLaVA's format);
    for a model that reads it after every question (ours, `image_every_question` not False) each
    conversation is rewritten so (`data.instruct.image_with_every_question`)."""

    def __init__(self, stage: str, dataset, tokenizer, config: StageConfig, seed: int,
                 max_len: int, rank: int = 0, world_size: int = 1):  # fmt: skip
        self.dataset, self.tokenizer, self.max_len = dataset, tokenizer, max_len
        super().__init__(stage, len(dataset), config, seed, rank, world_size)

    def make_batch(self, indices: list[int], rng: random.Random, step: int = 0) -> dict:
        samples = []
        for i in indices:
            item = self.dataset[i]
            turns = item["conversations"]
            if item["pixel_values"] is not None and getattr(
                self.tokenizer, "image_every_question", True
            ):
                turns = image_with_every_question(turns)
            pixels = item["pixel_values"]
            if pixels is not None:  # one copy of the image for each <image> in the prompt
                pixels = pixels.expand(count_images(turns), -1, -1, -1)
            samples.append({"pixel_values": pixels, "conversations": turns})
        return collate_conversations(samples, self.tokenizer, max_len=self.max_len)


# ----------------------------------------------------------------------------------------------
# Loading the previous stages' weights


def load_part(module: nn.Module, path: Path, prefix: str = "", what: str = "") -> bool:
    """Load the weights under `prefix` in checkpoint `path` into `module`; warn if absent."""
    if not path.is_file():
        print(f"  ! {path} not found: the {what} starts from random weights (run its stage first)")
        return False
    state = load_checkpoint(path)["model"]
    part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    problem = weights_mismatch(module, part)
    if problem:  # e.g. an lm.pt left by a run of another size in the same run dir
        raise CheckpointMismatchError(
            f"{path} does not fit this run's {what or 'model'}: {problem}. It was written by a "
            "run with other settings: pass another --out-dir, or delete it and train its stage "
            "again"
        )
    module.load_state_dict(part)
    print(f"  {what}: loaded from {path}")
    return True


def stage_config_dict(config) -> dict:
    """A model config dataclass as the plain dict checkpoints store."""
    return asdict(config) if dataclasses.is_dataclass(config) else dict(config)


# ----------------------------------------------------------------------------------------------
# The four stages: model (with the right parts frozen) + batches


@dataclasses.dataclass
class StagePlan:
    """Everything `train_stage` needs for one stage, plus the config to rebuild the model."""

    model: nn.Module
    batches: Dataset
    model_config: dict


def build_stage(name: str, preset: Preset, tokenizer, out_dir: Path, rank=0, world_size=1):
    """Model, batches and model config of stage `name` (lm | clip | align | instruct)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown stage {name!r}; expected one of {Preset.STAGES}")
    # Each stage seeds its own initialisation: `--stage align` alone builds the same model as
    # the align stage of a full run.
    torch.manual_seed(hash_seed(preset.seed, name))
    return BUILDERS[name](preset, tokenizer, out_dir, {"rank": rank, "world_size": world_size})


def build_lm(preset: Preset, tokenizer, out_dir: Path, dist: dict) -> StagePlan:
    """Stage 0a: the decoder alone, on the world's text (we have no Vicuna: we make one)."""
    cfg = decoder_config(preset, tokenizer.vocab_size)
    if preset.data.lm_seq_len > cfg.max_seq_len:
        raise ValueError(
            f"data.lm_seq_len={preset.data.lm_seq_len} is longer than model.max_seq_len="
            f"{cfg.max_seq_len}"
        )
    scenes = ShapesWorld("train", preset.data.lm_scenes, world_config(preset), seed=preset.seed)
    batches = SceneTextBatches(
        scenes, tokenizer, preset.lm, preset.seed, preset.data.lm_seq_len,
        vqa_fraction=preset.data.vqa_fraction, questions=preset.data.questions_per_image,
        false_premise_share=preset.data.false_premise_share,
        follow_up_share=preset.data.follow_up_share,
        kinds=("conversation", "detail", "reasoning", "caption"), **dist,
    )  # fmt: skip
    return StagePlan(Decoder(cfg), batches, asdict(cfg))


def training_images(preset: Preset) -> ShapesWorld:
    """The training split's images every image stage draws its batches from."""
    return ShapesWorld(
        "train",
        preset.data.train_images,
        world_config(preset),
        seed=preset.seed,
        cache=preset.data.cache_images,
    )


def build_clip(preset: Preset, tokenizer, out_dir: Path, dist: dict) -> StagePlan:
    """Stage 0b: the ViT and a text encoder, contrastive on image-caption pairs."""
    cfg = clip_config(preset, tokenizer.vocab_size)
    batches = CaptionBatches(
        training_images(preset), tokenizer, preset.clip, preset.seed,
        hard_negatives=preset.data.clip_hard_negatives, **dist,
    )  # fmt: skip
    return StagePlan(CLIP(cfg), batches, asdict(cfg))


def new_llava(preset: Preset, tokenizer) -> tuple[Llava, LlavaConfig]:
    """A LLaVA of the preset's sizes, after checking that its longest sequence fits."""
    cfg = llava_config(preset, tokenizer)
    images = max(preset.data.questions_per_image, MAX_TURNS)  # a copy of the image a question
    longest = preset.data.max_len + images * (cfg.num_image_tokens - 1)  # <image>: P positions
    if longest > cfg.text.max_seq_len:
        raise ValueError(
            f"data.max_len={preset.data.max_len} text tokens with {images} images of "
            f"{cfg.num_image_tokens} tokens make {longest} positions, more than "
            f"model.max_seq_len={cfg.text.max_seq_len}: raise max_seq_len or lower max_len"
        )
    return Llava(cfg), cfg


def build_align(preset: Preset, tokenizer, out_dir: Path, dist: dict) -> StagePlan:
    """Stage 1: CLIP's ViT and the lm stage's decoder, frozen; the projector learns to caption."""
    model, cfg = new_llava(preset, tokenizer)
    load_part(model.vision_tower, out_dir / "clip.pt", "vision_model.", "vision tower (ViT)")
    load_part(model.language_model, out_dir / "lm.pt", "", "language model")
    model.freeze_vision()
    model.freeze_language()  # stage 1: only the projector learns
    batches = ConversationBatches(
        "align", training_images(preset), tokenizer, preset.align, preset.seed, preset.data.max_len,
        kinds=("caption",), **dist,
    )  # fmt: skip
    return StagePlan(model, batches, asdict(cfg))


def instruct_mix(data: DataSizes) -> dict:
    """The instruct stage's mixture, as `ConversationBatches` takes it: the share of short-answer
    rows, questions a row, false premises, follow-ups, question-type weights, how often text is
    read, how often a description comes second."""
    return {
        "vqa_fraction": data.vqa_fraction, "questions": data.questions_per_image,
        "false_premise_share": data.false_premise_share, "type_weights": data.vqa_type_weights,
        "text_weight": data.read_text_weight, "follow_up_share": data.follow_up_share,
        "describe_later_share": data.describe_later_share,
    }  # fmt: skip


def build_instruct(preset: Preset, tokenizer, out_dir: Path, dist: dict) -> StagePlan:
    """Stage 2: from align's LLaVA, the projector and the decoder (or its LoRA) learn the mix."""
    model, cfg = new_llava(preset, tokenizer)
    if not load_part(model, out_dir / "align.pt", "", "LLaVA after align"):
        load_part(model.vision_tower, out_dir / "clip.pt", "vision_model.", "vision tower")
        load_part(model.language_model, out_dir / "lm.pt", "", "language model")
    model.freeze_vision()  # stage 2: projector + decoder learn, the eyes stay as they are
    if preset.lora:
        wrapped = apply_lora(
            model.language_model,
            preset.lora_targets,
            rank=preset.lora_rank,
            alpha=preset.lora_alpha,
            dropout=preset.lora_dropout,
        )
        print(f"  LoRA rank {preset.lora_rank} on {len(wrapped)} layers of the decoder")
    batches = ConversationBatches(
        "instruct", training_images(preset), tokenizer, preset.instruct, preset.seed,
        preset.data.max_len, **instruct_mix(preset.data), phases=check_instruct_mix(preset),
        **dist,
    )  # fmt: skip
    return StagePlan(model, batches, asdict(cfg))


BUILDERS = {"lm": build_lm, "clip": build_clip, "align": build_align, "instruct": build_instruct}
