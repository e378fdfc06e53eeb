"""The training loop (train.py) on a toy model, then every LLaVA stage for two steps."""

from __future__ import annotations

import json
import math
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
    result = train_stage(Toy(), ToyBatches(), cfg, name="toy", out_dir=tmp_path, progress=False)
    assert result.steps == 30 and len(result.losses) == 30
    assert sum(result.losses[-5:]) < 0.5 * sum(result.losses[:5])
    ckpt = load_checkpoint(tmp_path / "toy.pt")
    assert ckpt["step"] == 30 and ckpt["extra"]["done"]
    assert ckpt["config"]["stage"]["steps"] == 30
    lines = [json.loads(line) for line in open(tmp_path / "toy.jsonl")]
    assert [r["step"] for r in lines] == list(range(1, 31))
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
