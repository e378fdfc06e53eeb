"""Training presets: every number that decides how big the model is and how long it trains.

A preset is a plain dataclass, so it reads like a table and every field can be overridden from
the command line:

    minillava train --preset cpu --set instruct.steps=600 --set model.hidden_size=192

Three presets ship with the course:

    tiny   a few seconds, for tests: proves every code path runs, learns nothing
    cpu    the default of `make train`: all four stages in under 15 minutes on a 2-core CPU
    gpu    a larger model and image for one GPU: bf16 autocast, fused AdamW, torch.compile

The four stages (see train.py) each get a `StageConfig`: how many optimizer steps, the batch,
the learning rate and its schedule.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
from dataclasses import dataclass, field


@dataclass
class ModelSizes:
    """Widths and depths of the three networks (ViT + CLIP text encoder, projector, decoder)."""

    # The Eyes: image_size // patch_size squared patches become the image tokens.
    image_size: int = 48
    patch_size: int = 16  # 48 / 16 = 3: one token per cell of ShapesWorld's 3x3 grid
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 512
    # The CLIP text encoder: only used by the `clip` stage, then thrown away (as in LLaVA).
    text_encoder_hidden: int = 128
    text_encoder_layers: int = 2
    text_encoder_heads: int = 4
    clip_embed_dim: int = 128
    # The Bridge: which ViT layer's patch features it reads (-2: the penultimate, as LLaVA-1.5).
    vision_feature_layer: int = -2
    projector: str = "mlp2x_gelu"
    # The Brain: a LLaMA-style decoder.
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 384
    max_seq_len: int = 320
    dropout: float = 0.0


@dataclass
class DataSizes:
    """How much ShapesWorld each stage sees, and how the instruction mix is made."""

    train_images: int = 20_000  # distinct training images (stages draw batches from them)
    # Keep each training image in memory once drawn (ShapesWorld(cache=True)): `instruct` reads
    # every one of them a dozen times in the cpu preset, and drawing its batch costs a tenth of
    # a training step. ~35 KB an image at 48 px (0.7 GB for 20,000), in every process.
    cache_images: bool = False
    lm_scenes: int = 20_000  # scenes the `lm` stage reads about (as text: no pixels)
    lm_seq_len: int = 320  # longest `lm` text, in tokens (longer ones are cut)
    max_len: int = 256  # longest conversation kept, in tokens before the image is spliced in
    max_objects: int = 4
    text_prob: float = 0.25  # share of images with a rendered letter or digit
    # Share of `instruct` (and `lm`) batches that are short-answer questions, as LLaVA-1.5 mixed
    # VQAv2/GQA into its data; the others are the data engine's conversations, descriptions and
    # reasoning.
    vqa_fraction: float = 0.85
    # Questions per short-answer row, one a turn, the image before the first (data.mixture.
    # vqa_turns): every answer is trained on, and the later ones teach what a chat's later turns
    # need, an answer found after the image was read.
    questions_per_image: int = 3
    # Share of short-answer questions about an object that is not there ("What colour is the
    # circle?" without a circle), answered "There is no circle in the image.": without them the
    # model names a colour for any circle it is asked about.
    false_premise_share: float = 0.1
    # Share of short-answer questions, after one about a single object, that ask about the same
    # object by pronoun ("What colour is the circle?" then "Where is it?"): a person chats this
    # way, and only the conversation says what "it" is.
    follow_up_share: float = 0.2
    # Share of `instruct`'s detailed descriptions asked after a short question about the same
    # image: trained only as a first turn, "Describe the image." asked second got an F1 of
    # 0.33 against 0.73 first (docs/results.md). Instruct only: `lm` keeps its text as it was.
    describe_later_share: float = 0.5
    # `clip` stage: half of each batch are shape-swapped twins of the other half (hard
    # negatives, stages.CaptionBatches), so that CLIP must see shape, not only colour.
    clip_hard_negatives: bool = True
    # How often `instruct` asks each question type, relative (a type not named: 1). The types
    # that need one object found in the image (colour, shape, position) are asked more: the
    # others reach their answer priors within a few dozen steps, and with a uniform mix the
    # decoder learns to look an object up late or not at all in a CPU budget (docs/results.md).
    vqa_type_weights: dict[str, float] = field(
        default_factory=lambda: {"colour": 3.0, "shape": 3.0, "position": 2.0}
    )
    # On an image that shows a letter or digit, the text type weighs this much instead (None:
    # as vqa_type_weights says). Only such images teach reading the character (a quarter of
    # them; on the others the answer is "nothing" or "no"), and the image tokens carry it
    # (a linear probe reads it at 99.8%: bench/probe_text.py), but at weight 1 the cpu preset's
    # instruct stage asks some 1,100 rows to read one, and the model read one in ten
    # (docs/results.md). Instruct only; the evaluation's questions do not change.
    read_text_weight: float | None = None
    # `instruct` may open with a curriculum: phases of (question types, steps) whose short-answer
    # batches ask only those types (same weights; conversations keep their share), then the mix.
    # E.g. ((("colour",), 500),): finding the object a question names forms within a few hundred
    # steps of one type alone, not in the mixture (docs/results.md).
    curriculum: tuple[tuple[tuple[str, ...], int], ...] = ()


@dataclass
class StageConfig:
    """One stage's optimisation: steps, batch, and the learning-rate schedule."""

    steps: int = 100
    batch_size: int = 32  # per optimizer step, over all processes (split across DDP ranks)
    lr: float = 1e-3  # peak learning rate, reached after the warm-up
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size is split among them)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ckpt_every: int = 0  # also checkpoint every N steps (0: only at the end of the stage)
    log_every: int = 1  # metrics line + progress-bar update every N steps


@dataclass
class Preset:
    """Everything `minillava train` needs. Field names are the keys of `--set`."""

    name: str = "cpu"
    model: ModelSizes = field(default_factory=ModelSizes)
    data: DataSizes = field(default_factory=DataSizes)
    lm: StageConfig = field(default_factory=StageConfig)
    clip: StageConfig = field(default_factory=StageConfig)
    align: StageConfig = field(default_factory=StageConfig)
    instruct: StageConfig = field(default_factory=StageConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"  # auto = bf16 autocast on CUDA, fp32 elsewhere
    compile: bool = False  # torch.compile the model (worth it on GPU for long runs)
    # Whose functions run at the model's seams (minillava/parts.py): "library", "exercises"
    # (yours, where done and passing their checks) or "solutions". `minillava train --parts`.
    parts: str = "library"
    gradient_checkpointing: bool = False  # recompute decoder activations in backward
    num_workers: int = 0  # DataLoader worker processes
    num_threads: int = 0  # torch CPU threads, of all processes together (0: torch's default)
    # On a CPU: train as this many data-parallel processes (DDP over gloo, started as torchrun
    # would), num_threads shared out among them. A small model's matrix products keep two threads
    # of one process partly idle; two processes of one thread each, each on half of the batch,
    # do not (docs/results.md). Ignored on CUDA and MPS, and under torchrun.
    cpu_processes: int = 1
    # Instruct stage: full fine-tuning of the decoder, or LoRA adapters (lora.py).
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    # After training: how many test questions `minillava train` evaluates (0: skip the eval).
    eval_samples: int = 400
    chat_samples: int = 4

    STAGES = ("lm", "clip", "align", "instruct")

    def stage(self, name: str) -> StageConfig:
        if name not in self.STAGES:
            raise ValueError(f"unknown stage {name!r}; expected one of {self.STAGES}")
        return getattr(self, name)

    def to_dict(self) -> dict:
        """Plain nested dict (what checkpoints store: no dataclass objects, loadable safely)."""
        return dataclasses.asdict(self)


def measured_question_mix() -> dict:
    """Which questions `instruct` asks, and when: the DataSizes fields the cpu preset measured.

    A fresh dict each call (the presets must not share one mutable weights dict).
    """
    return dict(
        # Finding the object a question names forms in a few hundred steps of one look-up type
        # alone, never within the cpu budget in the whole mixture: so instruct opens with
        # colour, then position, then shape, then size questions only, then the whole mixture
        # (docs/results.md). Size in the mixture alone formed in one seed of two.
        curriculum=((("colour",), 400), (("position",), 300), (("shape",), 300), (("size",), 200)),
        # The mixture finishes what the phases began (colour, position and shape end near 100%)
        # and must teach the slower types as well: count, relation and reasoning are asked twice
        # as often as in the default mix, and size too, which descriptions need: without it
        # the model called almost every object it described "small" (docs/results.md).
        vqa_type_weights={
            "colour": 3.0,
            "shape": 3.0,
            "position": 2.0,
            "count": 2.0,
            "relation": 2.0,
            "reasoning": 2.0,
            "size": 2.0,
        },
        # Images that show a letter or digit are asked text questions 6 times as often: the
        # model read 5 of the 52 characters of 4,000 test questions, then 41.
        read_text_weight=6.0,
    )


def tiny_preset() -> Preset:
    """Seconds on a CPU: two steps per stage, a model a few thousand parameters wide."""
    stage = StageConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=1)
    return Preset(
        name="tiny",
        model=ModelSizes(
            image_size=16,
            patch_size=8,
            vision_hidden=32,
            vision_layers=2,
            vision_heads=2,
            vision_intermediate=64,
            text_encoder_hidden=32,
            text_encoder_layers=1,
            text_encoder_heads=2,
            clip_embed_dim=32,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            max_seq_len=256,
        ),
        data=DataSizes(train_images=32, lm_scenes=8, lm_seq_len=256, max_len=128),
        lm=copy.deepcopy(stage),
        clip=copy.deepcopy(stage),
        align=copy.deepcopy(stage),
        instruct=copy.deepcopy(stage),
        eval_samples=8,
        chat_samples=1,
    )


def cpu_preset() -> Preset:
    """The default of `make train`: all stages, eval included, sized for 15 minutes on 2 cores.

    Where the minutes go (per stage in docs/results.md, two processes of one thread on a 2-core
    CPU): instruct, the stage that teaches the model to use the image, gets most of them; the
    decoder stays small (4 x 128) and images small (48 px, 9 image tokens), because on a CPU
    every position of every sequence costs time.
    """
    return Preset(
        name="cpu",
        # One patch is one grid cell, and the ViT's blocks mix the cells: the patch embeddings
        # (layer 0) tell the decoder what is in *this* cell, the penultimate layer also what is
        # elsewhere (bench/probe_vit_layers.py), which makes the object a question names harder
        # to find. LLaVA's -2 stays the default elsewhere (the gpu preset: 4 x 4 patches a cell).
        model=ModelSizes(vision_feature_layer=0),
        data=DataSizes(
            **measured_question_mix(),
            # Three in ten batches are the data engine's conversations, descriptions and
            # reasoning: "Describe the image." is a chat's first question as often as any.
            vqa_fraction=0.7,
            # Drawn once, read a dozen times: 0.7 GB of memory for about a minute of drawing.
            cache_images=True,
        ),
        lm=StageConfig(steps=150, batch_size=32, lr=2e-3, warmup_steps=15, ckpt_every=50),
        clip=StageConfig(steps=400, batch_size=64, lr=1e-3, warmup_steps=20, ckpt_every=100),
        align=StageConfig(
            steps=100, batch_size=32, lr=2e-3, warmup_steps=10, weight_decay=0.0, ckpt_every=50
        ),
        # As many steps as fit in `make train`'s 15 minutes on 2 cores: a row of three questions,
        # each followed by the image's 9 tokens, is about 80 positions (docs/results.md).
        instruct=StageConfig(steps=2800, batch_size=32, lr=1e-3, warmup_steps=20, ckpt_every=100),
        num_threads=2,
        cpu_processes=2,
        # 250 questions a type: the overall accuracy to +-0.7 points (500 left +-1.3: one run's
        # 89.8% on 500 was 88.5% on 4,000).
        eval_samples=2000,
    )


def gpu_preset() -> Preset:
    """One GPU: a wider, deeper model on larger images, more steps; bf16 + fused AdamW + compile.

    Not measured yet (docs/results.md, "GPU preset": `bench/device_check.py` is the command
    that measures it on one GPU). Its instruct stage asks the
    questions the cpu preset measured (`measured_question_mix`): they are about what the
    decoder learns first and how often it sees each type, not about the model's size.
    """
    return Preset(
        name="gpu",
        model=ModelSizes(
            image_size=96,
            patch_size=8,
            vision_hidden=256,
            vision_layers=6,
            vision_heads=8,
            vision_intermediate=1024,
            text_encoder_hidden=256,
            text_encoder_layers=4,
            text_encoder_heads=8,
            clip_embed_dim=256,
            hidden_size=384,
            num_layers=8,
            num_heads=6,
            num_kv_heads=2,
            intermediate_size=1024,
            # Every question brings the image's 144 tokens: five questions and 256 text tokens.
            max_seq_len=1024,
        ),
        data=DataSizes(
            train_images=100_000,
            lm_scenes=100_000,
            lm_seq_len=512,
            max_len=256,
            **measured_question_mix(),
        ),
        lm=StageConfig(steps=3000, batch_size=128, lr=1e-3, warmup_steps=200, log_every=10),
        clip=StageConfig(steps=3000, batch_size=256, lr=5e-4, warmup_steps=200, log_every=10),
        align=StageConfig(
            steps=1000, batch_size=128, lr=1e-3, warmup_steps=50, weight_decay=0.0, log_every=10
        ),
        instruct=StageConfig(steps=5000, batch_size=64, lr=3e-4, warmup_steps=200, log_every=10),
        compile=True,
        num_workers=4,
        eval_samples=2000,
    )


PRESETS = {"tiny": tiny_preset, "cpu": cpu_preset, "gpu": gpu_preset}


def get_preset(name: str) -> Preset:
    """A fresh copy of a named preset (mutating it never changes the defaults)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name]()


def _parse_value(text: str, current: object, key: str) -> object:
    """Turn the command-line string `text` into a value of the same kind as `current`."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={text}: expected true/false")
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        raise ValueError(
            f"--set {key}={text}: expected a {type(current).__name__} like {current!r}"
        ) from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list | str):
        value = (value,) if isinstance(value, str) else tuple(value)
    if current is not None and not isinstance(value, type(current)):
        raise ValueError(
            f"--set {key}={text}: expected a {type(current).__name__} like {current!r}, "
            f"got {type(value).__name__}"
        )
    return value


def apply_overrides(preset: Preset, overrides: list[str]) -> Preset:
    """Apply `key=value` strings (`instruct.lr=3e-4`, `model.hidden_size=192`, `seed=1`).

    Returns the same preset, changed in place. Unknown keys raise with the list of valid ones.
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. instruct.lr=3e-4")
        key, text = item.split("=", 1)
        *parents, leaf = key.strip().split(".")
        target = preset
        for part in parents:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise ValueError(f"--set {key}: {part!r} is not a section of the preset")
            target = getattr(target, part)
        fields = {f.name: f for f in dataclasses.fields(target)}
        if leaf not in fields:
            raise ValueError(f"--set {key}: unknown field {leaf!r}; expected one of {list(fields)}")
        current = getattr(target, leaf)
        if dataclasses.is_dataclass(current):
            raise ValueError(f"--set {key}: {leaf!r} is a section; set one of its fields")
        if text.strip() == "None" and str(fields[leaf].type).endswith("| None"):
            setattr(target, leaf, None)  # an optional field back to "not given"
            continue
        setattr(target, leaf, _parse_value(text, current, key))
    return preset
