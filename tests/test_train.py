"""The training loop (train.py) on a toy model, then every LLaVA stage for two steps."""

from __future__ import annotations

import json
import math
import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from minillava.checkpoint import load_checkpoint
from minillava.presets import Preset, StageConfig, apply_overrides, get_preset
from minillava.train import NonFiniteLossError, lr_at, param_groups, train_stage


class Toy(nn.Module):
    """A two-layer regression net with dropout (so resume must restore the RNG too)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))

    def forward(self, x, y):
        return SimpleNamespace(loss=F.mse_loss(self.net(x), y))


class ToyBatches(Dataset):
    """Batch k depends only on (seed, k); `fail_at` simulates a crash, `nan_at` a bad batch."""

    def __init__(self, batch_size=8, seed=0, fail_at=None, nan_at=None):
        self.batch_size, self.seed, self.fail_at, self.nan_at = batch_size, seed, fail_at, nan_at

    def __len__(self):
        return 10**6

    def __getitem__(self, k):
        if k == self.fail_at:
            raise KeyboardInterrupt(f"simulated interruption before batch {k}")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        x = torch.randn(self.batch_size, 4, generator=g)
        y = x.sum(-1, keepdim=True)
        if k == self.nan_at:
            x[0, 0] = float("nan")
        return {"x": x, "y": y}


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = StageConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10], strict=False))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # cosine falls
    assert lrs[-1] == pytest.approx(0.1)


def test_param_groups_decay_matrices_only_and_skip_frozen():
    model = Toy()
    model.net[0].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [p.shape for p in decay["params"]] == [torch.Size([1, 16])]
    assert sorted(p.numel() for p in no_decay["params"]) == [1, 16]


def test_loop_learns_and_writes_checkpoint_metrics_and_plot(tmp_path):
    cfg = StageConfig(steps=30, lr=1e-2, warmup_steps=3, grad_accum=2, log_every=1)
    val = ToyBatches(seed=99)[0]

    def eval_fn(model):
        assert not model.training and not torch.is_grad_enabled()
        return {"val_loss": model(**val).loss}

    result = train_stage(
        Toy(), ToyBatches(), cfg, name="toy", out_dir=tmp_path, progress=False,
        eval_fn=eval_fn, eval_every=20,
    )  # fmt: skip
    assert result.steps == 30 and len(result.losses) == 30
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    assert [e["step"] for e in result.evals] == [20, 30]
    assert result.evals[1]["val_loss"] < result.evals[0]["val_loss"] * 1.5
    ckpt = load_checkpoint(tmp_path / "toy.pt")
    assert ckpt["step"] == 30 and ckpt["extra"]["done"]
    assert ckpt["config"]["stage"]["steps"] == 30
    lines = [json.loads(line) for line in open(tmp_path / "toy.jsonl")]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 31))
    assert [r["step"] for r in lines if "val_loss" in r] == [20, 30]
    assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(lines[0])
    assert (tmp_path / "toy_loss.png").stat().st_size > 1000


def test_grad_accumulation_matches_one_big_batch():
    """Two micro-batches of 8 == one batch of 16 (the loss is a mean, so we divide by 2)."""

    class Halves(Dataset):
        def __init__(self, full):
            self.full = full

        def __getitem__(self, k):
            b = ToyBatches(batch_size=16)[k // 2] if not self.full else ToyBatches(16)[k]
            return (
                b if self.full else {key: v[(k % 2) * 8 : (k % 2) * 8 + 8] for key, v in b.items()}
            )

    cfg = dict(steps=3, lr=1e-2, warmup_steps=1, log_every=1)
    big, small = Toy(), Toy()
    big.net[2].p = small.net[2].p = 0.0  # no dropout: the two runs draw different masks
    train_stage(big, Halves(True), StageConfig(**cfg), progress=False)
    train_stage(small, Halves(False), StageConfig(grad_accum=2, **cfg), progress=False)
    for a, b in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    cfg = StageConfig(steps=8, lr=1e-2, warmup_steps=2, ckpt_every=1, log_every=1)
    full = train_stage(Toy(), ToyBatches(), cfg, name="toy", out_dir=tmp_path / "a", progress=False)

    with pytest.raises(KeyboardInterrupt):  # stopped while fetching the batch of step 6
        train_stage(
            Toy(), ToyBatches(fail_at=5), cfg, name="toy", out_dir=tmp_path / "b", progress=False
        )
    assert load_checkpoint(tmp_path / "b" / "toy.pt")["step"] == 5
    model = Toy()
    resumed = train_stage(
        model, ToyBatches(), cfg, name="toy", out_dir=tmp_path / "b", resume=True, progress=False
    )
    assert resumed.resumed_from == 5
    assert resumed.losses == full.losses  # bit-identical on CPU
    final_a = load_checkpoint(tmp_path / "a" / "toy.pt")["model"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, final_a[key]), key
    # Resuming a finished stage does nothing and still reports its losses.
    again = train_stage(Toy(), ToyBatches(), cfg, name="toy", out_dir=tmp_path / "b", resume=True)
    assert again.steps == 8 and again.losses == full.losses


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = StageConfig(steps=10, lr=1e-2, warmup_steps=1, ckpt_every=1)
    with pytest.raises(NonFiniteLossError, match=r"became nan at step 4.*last good checkpoint"):
        train_stage(Toy(), ToyBatches(nan_at=3), cfg, name="toy", out_dir=tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path / "toy.pt")
    assert ckpt["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_loop_asks_models_that_can_for_the_loss_alone():
    """Decoder and Llava take return_logits=False (no (B, T, V) logits); other models get
    their batch unchanged."""
    from minillava.decoder import Decoder, DecoderConfig
    from minillava.train import loss_only_kwargs

    seen = []

    class LossOnly(Toy):
        def forward(self, x, y, return_logits=True):
            seen.append(return_logits)
            return super().forward(x, y)

    cfg = StageConfig(steps=2, lr=1e-2, warmup_steps=1)
    train_stage(LossOnly(), ToyBatches(), cfg, progress=False)
    assert seen == [False, False]
    train_stage(Toy(), ToyBatches(), cfg, progress=False)  # no such argument: not passed
    decoder = Decoder(DecoderConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2))
    assert loss_only_kwargs(decoder) == {"return_logits": False}
    assert loss_only_kwargs(Toy()) == {}


@pytest.mark.slow
def test_compile_flag_runs_the_same_loop():
    pytest.importorskip("torch._dynamo")
    cfg = StageConfig(steps=2, lr=1e-2, warmup_steps=1)
    result = train_stage(Toy(), ToyBatches(), cfg, compile=True, progress=False)
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)


def test_presets_overrides_parse_types_and_reject_unknown_keys():
    preset = apply_overrides(
        get_preset("cpu"),
        [
            "instruct.lr=3e-4",
            "model.hidden_size=64",
            "lora=true",
            "model.num_kv_heads=2",
            "lora_targets=['q_proj']",
            "device=cpu",
        ],
    )
    assert preset.instruct.lr == 3e-4 and preset.model.hidden_size == 64 and preset.lora
    assert preset.model.num_kv_heads == 2 and preset.lora_targets == ("q_proj",)
    assert get_preset("cpu").instruct.lr != 3e-4  # presets are fresh copies
    with pytest.raises(ValueError, match="unknown field 'hiden_size'"):
        apply_overrides(get_preset("cpu"), ["model.hiden_size=3"])
    with pytest.raises(ValueError, match="expected a int"):
        apply_overrides(get_preset("cpu"), ["lm.steps=many"])
    assert isinstance(Preset().to_dict()["model"], dict)


# ----------------------------------------------------------------------------------------------
# The LLaVA stages and the `minillava train` command, on the `tiny` preset


def _train(out_dir, *args) -> int:
    from minillava.train import main

    return main(
        ["--preset", "tiny", "--out-dir", str(out_dir), "--no-progress", "--no-eval", *args]
    )


def _losses(path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(path)]


def test_batches_depend_only_on_seed_stage_and_index_and_shard_the_global_batch():
    from minillava.stages import StageBatches

    cfg = StageConfig(batch_size=8, grad_accum=2)
    full = StageBatches("x", 20, cfg, seed=3)
    assert sorted(full.indices(0) + full.indices(1)) == sorted(full.global_indices(0))
    assert StageBatches("x", 20, cfg, seed=3).indices(7) == full.indices(7)  # a fresh object
    assert StageBatches("y", 20, cfg, seed=3).global_indices(0) != full.global_indices(0)
    assert StageBatches("x", 20, cfg, seed=4).global_indices(0) != full.global_indices(0)
    one_epoch = full.global_indices(0) + full.global_indices(1)  # 20 // 8 = 2 steps per epoch
    assert len(set(one_epoch)) == 16
    ranks = [StageBatches("x", 20, cfg, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(ranks[0].indices(5) + ranks[1].indices(5)) == sorted(full.indices(5))
    with pytest.raises(ValueError, match="divisible by grad_accum x processes"):
        StageBatches("x", 20, StageConfig(batch_size=6, grad_accum=4), seed=0)


def test_clip_hard_negatives_pair_each_image_with_its_shape_swapped_twin():
    from minillava.data.shapes import ShapesWorld, WorldConfig
    from minillava.stages import CaptionBatches
    from minillava.tokenizer import get_tokenizer

    world, tok = ShapesWorld("train", 40, WorldConfig(image_size=16)), get_tokenizer()
    cfg = StageConfig(batch_size=8)
    twins = CaptionBatches(world, tok, cfg, seed=0, hard_negatives=True)
    plain = CaptionBatches(world, tok, cfg, seed=0)
    samples = twins.with_twins(twins.indices(0), random.Random(0))
    for original, twin in zip(samples[0::2], samples[1::2], strict=True):
        assert twin.index == original.index  # the twin of the sample before it
        pairs = zip(original.scene.objects, twin.scene.objects, strict=True)
        assert sum(a.shape != b.shape for a, b in pairs) == 1  # only one shape differs
        assert not torch.equal(twin.pixel_values, original.pixel_values)
    batch, again = twins[0], CaptionBatches(world, tok, cfg, seed=0, hard_negatives=True)[0]
    assert torch.equal(batch["pixel_values"], again["pixel_values"])  # still reproducible
    assert torch.equal(batch["input_ids"], again["input_ids"])
    ordinary = plain[0]["pixel_values"]
    assert torch.equal(batch["pixel_values"][0::2], ordinary[0::2])  # originals unchanged
    assert not torch.equal(batch["pixel_values"][1::2], ordinary[1::2])


@pytest.mark.slow
def test_all_stages_two_steps_each_hand_weights_on_and_freeze_the_right_parts(tmp_path):
    from minillava.checkpoint import load_llava
    from minillava.eval import generate_answers

    assert _train(tmp_path) == 0
    for name in Preset.STAGES:
        assert len(_losses(tmp_path / f"{name}.jsonl")) == 2
        assert (tmp_path / f"{name}_loss.png").is_file()
    lm, clip, align, instruct = (
        load_checkpoint(tmp_path / f"{name}.pt")["model"] for name in Preset.STAGES
    )
    changed = {"vision": 0, "language": 0, "projector": 0}
    for key, value in align.items():
        part, _, rest = key.partition(".")
        if part == "vision_tower":  # the CLIP ViT, frozen
            assert torch.equal(value, clip[f"vision_model.{rest}"]), key
        elif part == "language_model":  # the lm-stage decoder, frozen
            assert torch.equal(value, lm[rest]), key
        if not torch.equal(value, instruct[key]):
            changed[part.split("_")[0]] += 1
    assert changed["vision"] == 0 and changed["language"] > 0 and changed["projector"] > 0

    model, tokenizer, info = load_llava(tmp_path / "llava.pt", device="cpu")
    assert info["config"]["world"]["image_size"] == 16 and info["step"] == 2
    assert all(torch.equal(v, instruct[k]) for k, v in model.state_dict().items())
    answers = generate_answers(model, tokenizer, ["What colour is the circle?"],
                               torch.zeros(1, 3, 16, 16), max_new_tokens=3)  # fmt: skip
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.slow
def test_lora_instruct_trains_only_adapters_and_saves_merged_plain_names(tmp_path):
    """Also runs the decoder with gradient checkpointing (recompute in backward)."""
    from minillava.presets import get_preset
    from minillava.stages import build_stage
    from minillava.tokenizer import get_tokenizer

    assert (
        _train(tmp_path, "--stage", "instruct", "--lora", "--set", "gradient_checkpointing=1") == 0
    )
    adapted = load_checkpoint(tmp_path / "instruct.pt")["model"]
    final = load_checkpoint(tmp_path / "llava.pt")["model"]
    assert any(k.endswith("lora_A") for k in adapted)
    assert not any("lora_" in k or ".base." in k for k in final)
    # The frozen base weights are exactly the initial ones (same seed, same build).
    preset = get_preset("tiny")
    preset.lora = preset.gradient_checkpointing = True
    initial = build_stage("instruct", preset, get_tokenizer(), tmp_path / "none").model
    for key, value in initial.state_dict().items():
        if "lora_" not in key and not key.startswith("projector."):
            assert torch.equal(adapted[key], value), key
    q = "language_model.layers.0.self_attn.q_proj"
    merged = adapted[f"{q}.base.weight"] + 2.0 * adapted[f"{q}.lora_B"] @ adapted[f"{q}.lora_A"]
    torch.testing.assert_close(final[f"{q}.weight"], merged)  # alpha / rank = 16 / 8


@pytest.mark.slow
def test_cli_resume_after_an_interruption_reproduces_the_losses(tmp_path, monkeypatch):
    from minillava.stages import SceneTextBatches

    args = ["--stage", "lm", "--set", "lm.steps=4", "--set", "lm.ckpt_every=1"]
    assert _train(tmp_path / "a", *args) == 0
    original = SceneTextBatches.__getitem__

    def interrupted(self, m):
        if m == 2:
            raise KeyboardInterrupt
        return original(self, m)

    monkeypatch.setattr(SceneTextBatches, "__getitem__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", *args)
    monkeypatch.undo()
    assert len(_losses(tmp_path / "b" / "lm.jsonl")) == 2
    assert _train(tmp_path / "b", *args, "--resume") == 0
    assert _losses(tmp_path / "b" / "lm.jsonl") == _losses(tmp_path / "a" / "lm.jsonl")


def test_cli_nan_stops_with_a_message(tmp_path, capsys):
    args = [
        "--stage",
        "lm",
        "--set",
        "lm.lr=1e30",
        "--set",
        "lm.steps=4",
        "--set",
        "lm.ckpt_every=1",
    ]
    # At lr 1e30 the first update already throws the weights to ~1e30: nothing sane to keep
    # (a resume from such a checkpoint hits NaN at once), so no checkpoint is written.
    # tests/test_hardening_train.py: a run that goes bad later keeps its last sane checkpoint.
    assert _train(tmp_path, *args) == 1
    err = capsys.readouterr().err
    assert "a weight grew to" in err and "at step 1;" in err
    assert "no checkpoint of this run was written" in err and not (tmp_path / "lm.pt").exists()


def test_cli_flags_and_overrides(tmp_path, capsys):
    from minillava.cli import main as cli_main
    from minillava.train import build_parser, resolve_preset

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--help"])
    assert exit_info.value.code == 0 and "--resume" in capsys.readouterr().out
    args = build_parser().parse_args(
        ["--stage", "clip", "--steps", "7", "--lora", "--seed", "3", "--set", "clip.lr=0.5"]
    )
    preset = resolve_preset(args)
    assert preset.clip.steps == 7 and preset.lm.steps != 7 and preset.lora and preset.seed == 3
    assert preset.clip.lr == 0.5
    assert _train(tmp_path, "--set", "model.nope=1") == 2
    assert "unknown field 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["tiny", "cpu", "gpu"])
def test_every_preset_makes_consistent_configs(name):
    from minillava.stages import check_instruct_mix, clip_config, llava_config, world_config
    from minillava.tokenizer import get_tokenizer

    preset = get_preset(name)
    tokenizer = get_tokenizer()
    llava = llava_config(preset, tokenizer)
    images = 5  # the data engine's longest conversation: five questions, each with the image
    assert preset.data.max_len + images * (llava.num_image_tokens - 1) <= llava.text.max_seq_len
    assert llava.image_token_id == tokenizer.image_id and llava.text.vocab_size == len(tokenizer)
    assert clip_config(preset, len(tokenizer)).vision == llava.vision  # CLIP's ViT is LLaVA's
    assert world_config(preset).image_size == llava.vision.image_size
    assert llava.vision_feature_layer == preset.model.vision_feature_layer
    assert llava.vision_feature_layer == (0 if name == "cpu" else -2)  # -2: LLaVA-1.5's
    check_instruct_mix(preset)  # its phases are valid and leave steps for the whole mix
    for stage in Preset.STAGES:
        cfg = preset.stage(stage)
        assert cfg.batch_size % cfg.grad_accum == 0 and cfg.warmup_steps < cfg.steps


def test_the_gpu_preset_asks_the_questions_the_cpu_preset_measured():
    cpu, gpu = get_preset("cpu").data, get_preset("gpu").data
    for field in ("curriculum", "vqa_type_weights", "read_text_weight"):
        assert getattr(gpu, field) == getattr(cpu, field), field
    assert gpu.curriculum and gpu.read_text_weight == 6.0  # not the defaults: the measured mix
    gpu.vqa_type_weights["count"] = 9.0  # each preset holds its own dict
    assert get_preset("cpu").data.vqa_type_weights["count"] == 2.0


def test_vision_feature_layer_is_a_preset_field_the_llava_config_follows():
    from minillava.presets import apply_overrides
    from minillava.stages import llava_config
    from minillava.tokenizer import get_tokenizer

    preset = apply_overrides(get_preset("tiny"), ["model.vision_feature_layer=0"])
    assert llava_config(preset, get_tokenizer()).vision_feature_layer == 0
    with pytest.raises(ValueError, match="vision_feature_layer"):
        llava_config(apply_overrides(get_preset("tiny"), ["model.vision_feature_layer=9"]),
                     get_tokenizer())  # fmt: skip


def test_vqa_training_conversations_are_asked_as_the_chat_asks():
    import random

    from minillava.chat import next_question
    from minillava.data.mixture import scene_turns, vqa_turns
    from minillava.data.shapes import ShapesWorld, WorldConfig

    world = ShapesWorld("train", 4, WorldConfig(image_size=16))
    sample = world[0]
    turns = scene_turns(sample.scene, sample.captions, random.Random(0), world.config, vqa=True)
    assert [t["from"] for t in turns] == ["human", "gpt"] * 3  # data.questions_per_image
    _, asked = vqa_turns(sample.scene, random.Random(0), world.config)
    history = []
    for k, qa in enumerate(asked):  # each human turn is what ChatSession would send
        expected = next_question(history, qa.question, with_image=True)
        assert turns[: 2 * k + 1] == expected
        assert turns[2 * k + 1]["value"] == " " + qa.answer  # the word as read mid-sentence
        history = turns[: 2 * k + 2]
    assert all(
        t["value"].endswith("?\n<image>") or t["value"].endswith(".\n<image>") for t in turns[0::2]
    )  # fmt: skip  (every question, then the image)
    assert all(len(t["value"].split()) <= 2 for t in turns[1::2])  # short answers


def test_false_premise_share_asks_about_absent_objects_in_training():
    import random

    from minillava.data.mixture import vqa_turns
    from minillava.data.shapes import ShapesWorld, WorldConfig

    world = ShapesWorld("train", 200, WorldConfig(image_size=16))
    for share, low, high in ((0.0, 0, 0), (0.3, 0.2, 0.4), (1.0, 1, 1)):
        rng, kinds = random.Random(0), []
        for i in range(len(world)):
            _, asked = vqa_turns(world.scene(i), rng, world.config, false_premise_share=share)
            kinds += [qa.type == "false_premise" for qa in asked]
        assert low <= sum(kinds) / len(kinds) <= high, share
    preset = apply_overrides(get_preset("tiny"), ["data.false_premise_share=1.5"])
    with pytest.raises(ValueError, match="data.false_premise_share must be in"):
        check_mix(preset)
    for share in ("follow_up_share", "describe_later_share"):
        preset = apply_overrides(get_preset("tiny"), [f"data.{share}=-0.1"])
        with pytest.raises(ValueError, match=f"data.{share} must be in"):
            check_mix(preset)
    preset = apply_overrides(get_preset("tiny"), ["data.questions_per_image=0"])
    with pytest.raises(ValueError, match="data.questions_per_image must be >= 1"):
        check_mix(preset)


def check_mix(preset):
    from minillava.stages import check_instruct_mix

    return check_instruct_mix(preset)


def test_vqa_type_weights_change_the_question_mix_and_reject_unknown_types():
    import random
    from collections import Counter

    from minillava.data.mixture import scene_turns
    from minillava.data.shapes import ShapesWorld, WorldConfig

    world = ShapesWorld("train", 320, WorldConfig(image_size=16))

    def colour_share(weights) -> float:
        rng, asked = random.Random(0), Counter()
        for i in range(len(world)):
            turns = scene_turns(world.scene(i), [], rng, world.config, vqa=True,
                                type_weights=weights)  # fmt: skip
            asked.update("colo" in t["value"].lower() for t in turns[0::2])
        return asked[True] / sum(asked.values())

    # 8 types: colour is 1/8 of the uniform mix and 8/15 with weight 8 (colour words also
    # appear in a few other questions, so the shares are not exact).
    assert colour_share(None) < 0.3
    assert colour_share({"colour": 8.0}) > 0.45
    with pytest.raises(ValueError, match="unknown question types.*'colours'"):
        scene_turns(
            world.scene(0), [], random.Random(0), world.config, vqa=True,
            type_weights={"colours": 2.0},
        )  # fmt: skip


def test_vqa_type_weights_can_be_set_from_the_command_line():
    preset = apply_overrides(get_preset("cpu"), ["data.vqa_type_weights={'count': 2.0}"])
    assert preset.data.vqa_type_weights == {"count": 2.0}


def test_a_bad_question_type_weight_is_refused_when_the_instruct_stage_is_built(tmp_path):
    from minillava.stages import build_stage
    from minillava.tokenizer import get_tokenizer

    preset = apply_overrides(get_preset("tiny"), ["data.vqa_type_weights={'colour': -1.0}"])
    with pytest.raises(ValueError, match="vqa_type_weights must be >= 0"):
        build_stage("instruct", preset, get_tokenizer(), tmp_path)


def test_the_curriculum_asks_only_each_phases_types_then_the_whole_mix(tmp_path, monkeypatch):
    from minillava import stages
    from minillava.tokenizer import get_tokenizer

    preset = apply_overrides(
        get_preset("tiny"),
        ["data.curriculum=((('colour', 'position'), 10), (('shape',), 10))", "instruct.steps=40",
         "data.vqa_fraction=0.5"],
    )  # fmt: skip
    batches = stages.build_stage("instruct", preset, get_tokenizer(), tmp_path).batches
    asked = []
    real_scene_turns = stages.scene_turns

    def recording_scene_turns(*args, **mix):
        asked.append((step, mix["vqa"], mix.get("type_weights")))
        return real_scene_turns(*args, **mix)

    monkeypatch.setattr(stages, "scene_turns", recording_scene_turns)
    for step in range(40):
        batches[step]  # grad_accum 1: item m is step m
    expected = {
        **dict.fromkeys(range(10), {"colour", "position"}),
        **dict.fromkeys(range(10, 20), {"shape"}),
    }
    vqa_steps = {s for s, vqa, _ in asked if vqa}
    assert vqa_steps & set(range(10)) and vqa_steps & set(range(10, 20))  # each phase asked
    assert vqa_steps - set(range(20))  # and the whole mix after them
    assert {s for s, vqa, _ in asked if not vqa} & set(range(20))  # conversations stay in phases
    for s, vqa, weights in asked:
        if vqa and s in expected:
            assert {t for t, w in weights.items() if w > 0} == expected[s]
            assert weights.get("colour", 0) in (0.0, 3.0)  # the preset's weights, kept
        elif vqa:
            assert weights == preset.data.vqa_type_weights
    too_long = apply_overrides(preset, ["data.curriculum=((('colour',), 40),)"])
    with pytest.raises(ValueError, match="whole question mix would never be trained"):
        stages.build_stage("instruct", too_long, get_tokenizer(), tmp_path)
    for bad in ["((('colours',), 2),)", "((('colour',), 0),)", "(('colour',),)", "(3,)"]:
        with pytest.raises(ValueError, match="data.curriculum"):
            stages.build_stage(
                "instruct", apply_overrides(preset, [f"data.curriculum={bad}"]), get_tokenizer(),
                tmp_path,
            )  # fmt: skip


def test_an_optional_field_can_be_set_back_to_none_and_others_cannot():
    preset = apply_overrides(get_preset("tiny"), ["data.read_text_weight=2.0"])
    assert preset.data.read_text_weight == 2.0
    apply_overrides(preset, ["data.read_text_weight=None", "model.num_kv_heads=None"])
    assert preset.data.read_text_weight is None and preset.model.num_kv_heads is None
    with pytest.raises(ValueError, match="expected a int"):
        apply_overrides(preset, ["model.hidden_size=None"])


def test_cached_images_are_drawn_once_and_give_the_same_batches(tmp_path):
    from minillava.stages import build_stage
    from minillava.tokenizer import get_tokenizer

    preset = apply_overrides(get_preset("tiny"), ["data.train_images=24", "instruct.batch_size=8"])
    plain = build_stage("instruct", preset, get_tokenizer(), tmp_path).batches
    cached = apply_overrides(preset, ["data.cache_images=true"])  # (in place)
    batches = build_stage("instruct", cached, get_tokenizer(), tmp_path).batches
    assert plain.world.cache is None and batches.world.cache == {}
    for m in range(6):  # two epochs of 3 batches: the second reads only cached images
        for key, value in plain[m].items():
            assert torch.equal(batches[m][key], value), (m, key)
    assert len(batches.world.cache) == 24
    assert get_preset("cpu").data.cache_images and not get_preset("gpu").data.cache_images


def test_a_curriculum_longer_than_instruct_stops_the_run_before_any_stage(tmp_path, capsys):
    # --steps 3 cuts every stage of the cpu preset to 3 steps; its curriculum keeps its length.
    phases = sum(steps for _, steps in get_preset("cpu").data.curriculum)
    assert _train(tmp_path, "--preset", "cpu", "--steps", "3") == 2
    assert f"data.curriculum takes {phases} instruct steps" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.pt"))  # nothing was trained
    assert _train(tmp_path, "--preset", "tiny", "--set", "data.false_premise_share=2") == 2
    assert "data.false_premise_share must be in" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.pt"))  # refused before the lm stage too
    # cpu_processes=1: in this process, not through torchrun.
    assert _train(tmp_path, "--preset", "cpu", "--steps", "3", "--stage", "clip", "--set",
                  "clip.batch_size=4", "--set", "data.train_images=8",
                  "--set", "cpu_processes=1") == 0  # fmt: skip


def test_the_cpu_threads_are_shared_out_among_the_processes():
    from minillava.launch import threads_per_process

    assert threads_per_process(2, 2) == 1  # the cpu preset: two processes of one thread
    assert threads_per_process(8, 2) == 4
    assert threads_per_process(1, 2) == 1  # never none
    assert threads_per_process(0, 2) == max(1, os.cpu_count() // 2)  # 0: one per core
    assert get_preset("cpu").cpu_processes == 2 and get_preset("tiny").cpu_processes == 1


def test_read_text_weight_asks_text_questions_on_images_that_show_a_character(tmp_path):
    import random
    from collections import Counter

    from minillava.data.mixture import vqa_turns
    from minillava.data.shapes import ShapesWorld, WorldConfig
    from minillava.stages import build_stage
    from minillava.tokenizer import get_tokenizer

    world = ShapesWorld("train", 400, WorldConfig(image_size=16, text_prob=0.5))

    def text_share(text_weight, type_weights=None) -> dict[bool, float]:
        """Share of text questions on scenes with a character (True) and without (False)."""
        rng, asked, scenes = random.Random(0), Counter(), Counter()
        for i in range(len(world)):
            scene = world.scene(i)
            _, [qa] = vqa_turns(scene, rng, world.config, 1, type_weights, text_weight)
            shows = scene.text is not None
            scenes[shows] += 1
            asked[shows] += qa.type == "text"
        return {shows: asked[shows] / scenes[shows] for shows in (True, False)}

    plain, weighted = text_share(None), text_share(21.0)  # 21 / (7 + 21): 3 in 4 questions
    assert plain[True] < 0.25 and plain[False] < 0.25  # 1 in 8 in the uniform mix
    assert weighted[True] > 0.6  # images that show a character are asked to read it
    assert weighted[False] < 0.25  # and the others keep the mix
    # A curriculum phase without text (weight 0) keeps it out, whatever read_text_weight says.
    phase = {"colour": 1.0, **{t: 0.0 for t in ("shape", "count", "existence", "position",
                                                "relation", "text", "reasoning")}}  # fmt: skip
    assert text_share(21.0, phase) == {True: 0.0, False: 0.0}

    preset = apply_overrides(get_preset("tiny"), ["data.read_text_weight=-1.0"])
    with pytest.raises(ValueError, match="data.read_text_weight must be >= 0"):
        build_stage("instruct", preset, get_tokenizer(), tmp_path)
