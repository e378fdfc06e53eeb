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

from minillava.checkpoint import load_checkpoint
from minillava.presets import Preset, StageConfig

CLIP_TEXT_LEN = 64  # tokens: the longest caption (with its end-of-text token) the CLIP text
# encoder reads; ShapesWorld captions are at most ~45 tokens.


# ----------------------------------------------------------------------------------------------
# Configs of the three networks, from a preset


def world_config(preset: Preset):
    """The ShapesWorld every stage (and the final evaluation) draws images from."""
    from minillava.data.shapes import WorldConfig

    return WorldConfig(
        image_size=preset.model.image_size,
        max_objects=preset.data.max_objects,
        text_prob=preset.data.text_prob,
    )


def vit_config(preset: Preset):
    from minillava.vit import ViTConfig

    m = preset.model
    return ViTConfig(
        image_size=m.image_size,
        patch_size=m.patch_size,
        hidden_size=m.vision_hidden,
        num_layers=m.vision_layers,
        num_heads=m.vision_heads,
        intermediate_size=m.vision_intermediate,
    )


def decoder_config(preset: Preset, vocab_size: int):
    from minillava.decoder import DecoderConfig

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


def clip_config(preset: Preset, vocab_size: int):
    from minillava.clip import CLIPConfig, TextEncoderConfig

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


def llava_config(preset: Preset, tokenizer):
    from minillava.llava import LlavaConfig

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
        from minillava.data.shapes import swap_one_shape

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
        from minillava.data.collate import collate_text

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


def scene_turns(
    scene,
    captions: list[str],
    rng: random.Random,
    config,
    vqa: bool = False,
    vqa_questions: int = 1,
    kinds: tuple[str, ...] = ("conversation", "detail", "reasoning"),
    type_weights: dict[str, float] | None = None,
    text_weight: float | None = None,
    shortcut_weight: float | None = None,
    explain_share: float | None = None,
) -> list[dict]:
    """One training conversation about `scene`, "<image>" in its first human turn.

    `vqa=True`: `vqa_questions` short-answer questions (`vqa_turns`, with `type_weights`,
    `text_weight`, `shortcut_weight` and `explain_share`).
    Otherwise: a conversation of one of the data engine's `kinds` (conversation, detail,
    reasoning, caption).
    """
    from minillava.data.instruct import make_conversation

    if vqa:
        weights = (type_weights, text_weight, shortcut_weight, explain_share)
        return vqa_turns(scene, rng, config, vqa_questions, *weights)[0]
    return space_answers(make_conversation(scene, captions, rng, rng.choice(kinds), config=config))


SHORTCUT_REDRAWS = 10  # a scene where every question has the shortcut's answer keeps its 11th


def vqa_turns(
    scene,
    rng: random.Random,
    config,
    questions: int,
    type_weights: dict[str, float] | None = None,
    text_weight: float | None = None,
    shortcut_weight: float | None = None,
    explain_share: float | None = None,
) -> tuple[list[dict], list]:
    """`questions` short-answer questions about `scene` in the eval convention, and their `QA`s
    (type, answer and the query each question runs, e.g. {"op": "relation", ...}).

    As LLaVA-1.5 mixed VQAv2 and GQA into its data (without them the model answers in sentences
    and exact-match accuracy means nothing). The first question is exactly an eval prompt
    ("{question}\\n<image>\\nAnswer with a single word or phrase.", `vqa_prompt`: the question
    before the image); the others follow as more turns, without repeating the instruction: the
    image and the system line are paid for once, and the model gets `questions` answers instead
    of one (at the price of later questions that the image tokens cannot read).
    `type_weights` (e.g. {"colour": 3.0}) makes some question types more frequent; a type it
    does not name has weight 1 (all 1: the uniform mix). `text_weight`, if not None, is the
    text type's weight instead on a scene that shows a character (`DataSizes.read_text_weight`),
    unless `type_weights` gives text 0 (a curriculum phase without it). `shortcut_weight`, if
    not None, weighs the questions that a known shortcut gets wrong (`shortcut_answer`: two
    circles counted as one, say) that many times those it gets right, within their form: a
    question the shortcut answers is kept with probability 1 / shortcut_weight, else another
    of its form is drawn (at most SHORTCUT_REDRAWS times): the mix of types and of forms does
    not change, only the answers within a form. `explain_share`, if not None, asks that share
    of the first questions that are relation's "Is A left of B?" to explain instead of answering
    in a word (`vqa_prompt(explain=True)`), and answers them with their working first: "the
    square is bottom, the cross is middle, so no" (`DataSizes.explain_relation_share`).
    """
    from minillava.data.instruct import (
        QUESTION_TYPES,
        ask,
        shortcut_answer,
        vqa_prompt,
        with_working,
    )

    weights = question_type_weights(type_weights)
    text = QUESTION_TYPES.index("text")
    if text_weight is not None and scene.text is not None and weights[text] > 0:
        weights[text] = text_weight
    turns, asked, explain = [], [], False
    for k in range(questions):
        question_type = rng.choices(QUESTION_TYPES, weights)[0]
        qa = ask(scene, question_type, rng, config)
        for _ in range(SHORTCUT_REDRAWS if shortcut_weight is not None else 0):
            if shortcut_answer(qa, scene) != qa.answer or rng.random() * shortcut_weight < 1:
                break
            qa = ask_same_form(scene, qa, rng, config)
        answer = qa.answer
        # Only the first question carries the instruction, so only it can ask for the working.
        if k == 0 and explain_share is not None and qa.query.get("op") == "relation":
            explain = rng.random() < explain_share
            if explain:
                answer = with_working(qa.explanation, qa.answer)
        turns += [{"from": "human", "value": qa.question}, {"from": "gpt", "value": answer}]
        asked.append(qa)
    turns[0]["value"] = vqa_prompt(turns[0]["value"], explain=explain)
    return space_answers(turns), asked


def ask_same_form(scene, qa, rng: random.Random, config, tries: int = 100):
    """Another question about `scene` of `qa`'s type and form: same op, and a shortcut known
    (`shortcut_answer`) for both or neither; `qa` itself if `tries` draws find none."""
    from minillava.data.instruct import ask, shortcut_answer

    def form(q) -> tuple:
        return q.query.get("op"), shortcut_answer(q, scene) is None

    wanted = form(qa)
    for _ in range(tries):
        other = ask(scene, qa.type, rng, config)
        if form(other) == wanted:
            return other
    return qa


def space_answers(turns: list[dict]) -> list[dict]:
    """Start every answer with a space, as a word inside a sentence does (in place).

    Our BPE has one token for " blue" (in captions, descriptions, questions) and another for
    "blue", and the answer should be the word the model has read everywhere else. The eval
    strips the space.
    """
    for turn in turns[1::2]:
        turn["value"] = " " + turn["value"]
    return turns


def question_type_weights(type_weights: dict[str, float] | None) -> list[float]:
    """One weight per entry of QUESTION_TYPES (1 where `type_weights` is silent), checked."""
    from minillava.data.instruct import QUESTION_TYPES

    type_weights = type_weights or {}
    unknown = sorted(set(type_weights) - set(QUESTION_TYPES))
    if unknown:
        raise ValueError(
            f"data.vqa_type_weights: unknown question types {unknown}; expected some of "
            f"{QUESTION_TYPES}"
        )
    weights = [float(type_weights.get(t, 1.0)) for t in QUESTION_TYPES]
    if any(w < 0 for w in weights) or not any(weights):
        raise ValueError(f"data.vqa_type_weights must be >= 0, not all 0; got {type_weights}")
    return weights


def curriculum_phases(curriculum, type_weights: dict | None) -> list[tuple[int, dict]]:
    """data.curriculum ((types, steps), ...) -> [(first step after the phase, type weights)].

    Each phase keeps `type_weights` for its own types and 0 for the others: its short-answer
    batches ask only those types; the other batches (1 - vqa_fraction) stay conversations.
    """
    from minillava.data.instruct import QUESTION_TYPES

    weights = dict(zip(QUESTION_TYPES, question_type_weights(type_weights), strict=True))
    phases, end = [], 0
    for phase in curriculum:
        is_pair = isinstance(phase, tuple | list) and len(phase) == 2
        types, steps = phase if is_pair else (None, None)
        types = (types,) if isinstance(types, str) else tuple(types or ())
        unknown = sorted(set(types) - set(QUESTION_TYPES))
        if not types or unknown or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"data.curriculum: each phase is ((question types...), steps >= 1) with types "
                f"from {QUESTION_TYPES}; got {phase!r}"
            )
        phase_weights = {t: w if t in types else 0.0 for t, w in weights.items()}
        if not any(phase_weights.values()):
            raise ValueError(f"data.curriculum: {types} all weigh 0 in data.vqa_type_weights")
        end += steps
        phases.append((end, phase_weights))
    return phases


def check_instruct_mix(preset: Preset) -> list[tuple[int, dict]]:
    """data.curriculum's phases (`curriculum_phases`), after checking the fields that shape the
    instruct stage's batches; `minillava train` calls it before any stage, so that a bad value
    fails before lm, clip and align spend their minutes.

    Raises ValueError if the phases are malformed or leave no step of instruct for the whole
    mix, or if data.conversation_rows, data.curriculum_vqa_fraction, data.read_text_weight,
    data.shortcut_weight or data.explain_relation_share is out of range.
    """
    data = preset.data
    if data.read_text_weight is not None and data.read_text_weight < 0:
        raise ValueError(f"data.read_text_weight must be >= 0 or None; got {data.read_text_weight}")
    if data.shortcut_weight is not None and data.shortcut_weight < 1:
        raise ValueError(f"data.shortcut_weight must be >= 1 or None; got {data.shortcut_weight}")
    share = data.explain_relation_share
    if share is not None and not 0.0 <= share <= 1.0:
        raise ValueError(f"data.explain_relation_share must be in [0, 1] or None; got {share}")
    if not 0.0 < data.conversation_rows <= 1.0:
        raise ValueError(f"data.conversation_rows must be in (0, 1]; got {data.conversation_rows}")
    fraction = data.curriculum_vqa_fraction
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"data.curriculum_vqa_fraction must be in [0, 1] or None; got {fraction}")
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
        left there is a large red circle. ...\nAnswer with a single word or phrase.
        <|assistant|> red<|endoftext|>

    Before it ever sees a pixel, the decoder learns the world's language, the chat template, to
    answer tersely when asked to, and (the hard part for a tiny model) to look an answer up in
    the description, which stands where the image will (after the question: `vqa_prompt`).
    Within the cpu preset's 150 steps it learns the first three, not the look-up
    (docs/results.md, session 3). The projector's job in the later stages is then to make the
    image tokens readable like that description. Every token is a target, as in pretraining.
    """

    def __init__(self, world, tokenizer, config: StageConfig, seed: int, max_len: int, **mix):
        self.world, self.tokenizer, self.max_len = world, tokenizer, max_len
        dist = {key: mix.pop(key) for key in ("rank", "world_size") if key in mix}
        self.mix = mix  # vqa_fraction, vqa_questions, kinds (see scene_turns)
        super().__init__("lm", len(world), config, seed, **dist)

    def text_ids(self, index: int, rng: random.Random, mix: dict) -> list[int]:
        from minillava.data.shapes import make_captions, make_description

        scene = self.world.scene(index)  # the annotation only: no pixels are drawn
        turns = scene_turns(scene, make_captions(scene, rng), rng, self.world.config, **mix)
        turns[0]["value"] = turns[0]["value"].replace("<image>", make_description(scene, rng))
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
    data.curriculum (`phases`, from `check_instruct_mix`) run; `phase_vqa_fraction` (if not None)
    replaces vqa_fraction while they do. `conversation_rows`: the share of the rows that a batch
    of conversations keeps (they are longer than short-answer rows).
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
        phase_vqa_fraction: float | None = None,
        conversation_rows: float = 1.0,
        **mix,
    ):
        self.world, self.tokenizer, self.max_len = world, tokenizer, max_len
        dist = {key: mix.pop(key) for key in ("rank", "world_size") if key in mix}
        self.mix = mix
        # Checked by the caller (check_instruct_mix), with conversation_rows and the fraction.
        self.phases = phases or []
        self.phase_vqa_fraction = phase_vqa_fraction
        self.conversation_rows = conversation_rows
        super().__init__(stage, len(world), config, seed, **dist)

    def make_batch(self, indices: list[int], rng: random.Random, step: int = 0) -> dict:
        from minillava.data.collate import collate_conversations

        mix = dict(self.mix)
        for last_step, weights in self.phases:  # a curriculum phase: only its question types
            if step < last_step:
                mix["type_weights"] = weights
                if self.phase_vqa_fraction is not None:
                    mix["vqa_fraction"] = self.phase_vqa_fraction
                break
        mix = _choose_vqa(rng, mix)
        if not mix["vqa"]:  # a conversation is ~3x a one-question row: fewer rows, same tokens
            indices = indices[: max(1, round(len(indices) * self.conversation_rows))]
        samples = []
        for i in indices:
            sample = self.world[i]
            turns = scene_turns(sample.scene, sample.captions, rng, self.world.config, **mix)
            samples.append({"pixel_values": sample.pixel_values, "conversations": turns})
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
    from minillava.data.shapes import ShapesWorld

    dist = {"rank": rank, "world_size": world_size}
    world = world_config(preset)
    seed = preset.seed
    config = preset.stage(name)
    # Each stage seeds its own initialisation: `--stage align` alone builds the same model as
    # the align stage of a full run.
    torch.manual_seed(hash_seed(seed, name))

    if name == "lm":
        from minillava.decoder import Decoder

        cfg = decoder_config(preset, tokenizer.vocab_size)
        if preset.data.lm_seq_len > cfg.max_seq_len:
            raise ValueError(
                f"data.lm_seq_len={preset.data.lm_seq_len} is longer than model.max_seq_len="
                f"{cfg.max_seq_len}"
            )
        scenes = ShapesWorld("train", preset.data.lm_scenes, world, seed=seed)
        batches = SceneTextBatches(
            scenes, tokenizer, config, seed, preset.data.lm_seq_len,
            vqa_fraction=preset.data.vqa_fraction, vqa_questions=preset.data.vqa_questions,
            kinds=("conversation", "detail", "reasoning", "caption"), **dist,
        )  # fmt: skip
        return StagePlan(Decoder(cfg), batches, asdict(cfg))

    images = ShapesWorld(
        "train", preset.data.train_images, world, seed=seed, cache=preset.data.cache_images
    )
    if name == "clip":
        from minillava.clip import CLIP

        cfg = clip_config(preset, tokenizer.vocab_size)
        batches = CaptionBatches(
            images, tokenizer, config, seed, hard_negatives=preset.data.clip_hard_negatives, **dist
        )
        return StagePlan(CLIP(cfg), batches, asdict(cfg))

    from minillava.llava import Llava

    cfg = llava_config(preset, tokenizer)
    longest = preset.data.max_len - 1 + cfg.num_image_tokens  # <image> becomes P positions
    if longest > cfg.text.max_seq_len:
        raise ValueError(
            f"data.max_len={preset.data.max_len} text tokens with {cfg.num_image_tokens} image "
            f"tokens make {longest} positions, more than model.max_seq_len="
            f"{cfg.text.max_seq_len}: raise max_seq_len or lower max_len"
        )
    model = Llava(cfg)
    if name == "align":
        load_part(model.vision_tower, out_dir / "clip.pt", "vision_model.", "vision tower (ViT)")
        load_part(model.language_model, out_dir / "lm.pt", "", "language model")
        model.freeze_vision()
        model.freeze_language()  # stage 1: only the projector learns
        batches = ConversationBatches(
            "align", images, tokenizer, config, seed, preset.data.max_len, kinds=("caption",),
            **dist,
        )  # fmt: skip
        return StagePlan(model, batches, asdict(cfg))

    if name == "instruct":
        if not load_part(model, out_dir / "align.pt", "", "LLaVA after align"):
            load_part(model.vision_tower, out_dir / "clip.pt", "vision_model.", "vision tower")
            load_part(model.language_model, out_dir / "lm.pt", "", "language model")
        model.freeze_vision()  # stage 2: projector + decoder learn, the eyes stay as they are
        if preset.lora:
            from minillava.lora import apply_lora

            wrapped = apply_lora(
                model.language_model,
                preset.lora_targets,
                rank=preset.lora_rank,
                alpha=preset.lora_alpha,
                dropout=preset.lora_dropout,
            )
            print(f"  LoRA rank {preset.lora_rank} on {len(wrapped)} layers of the decoder")
        batches = ConversationBatches(
            "instruct", images, tokenizer, config, seed, preset.data.max_len,
            vqa_fraction=preset.data.vqa_fraction, vqa_questions=preset.data.vqa_questions,
            type_weights=preset.data.vqa_type_weights, text_weight=preset.data.read_text_weight,
            shortcut_weight=preset.data.shortcut_weight,
            explain_share=preset.data.explain_relation_share,
            phases=check_instruct_mix(preset),
            phase_vqa_fraction=preset.data.curriculum_vqa_fraction,
            conversation_rows=preset.data.conversation_rows, **dist,
        )  # fmt: skip
        return StagePlan(model, batches, asdict(cfg))
    raise ValueError(f"unknown stage {name!r}; expected one of {Preset.STAGES}")
