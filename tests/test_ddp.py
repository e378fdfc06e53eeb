"""DistributedDataParallel on CPU: two gloo processes started by torchrun, two steps.

DDP averages the gradients of the two processes, and each process sees half of every batch, so
two processes on half-batches must end exactly where one process on whole batches ends (up to
float rounding). The replicas must also be bit-identical to each other.

This file is also the worker script: torchrun runs it with `--worker OUT_DIR`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from minillava.presets import StageConfig
from minillava.train import setup_distributed, train_stage

CONFIG = StageConfig(steps=2, lr=5e-2, warmup_steps=1, grad_accum=2, log_every=1)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, y):
        return SimpleNamespace(loss=F.mse_loss(self.net(x), y))


class ShardedBatches(Dataset):
    """Global batch k (16 rows, from seed and k only); rank r takes rows r, r + W, r + 2W, ..."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        self.rank, self.world_size = rank, world_size

    def __getitem__(self, k):
        g = torch.Generator().manual_seed(k)
        x = torch.randn(16, 4, generator=g)
        y = torch.sin(x.sum(-1, keepdim=True))
        return {"x": x[self.rank :: self.world_size], "y": y[self.rank :: self.world_size]}


class RowShare(Dataset):
    """Rows rank, rank + W, ... of every batch of `full`: the batches one process would see,
    shared out (the stages' own batches draw captions per process, so they would differ)."""

    def __init__(self, full: Dataset, rank: int, world_size: int):
        self.full, self.rank, self.world_size = full, rank, world_size

    def __getitem__(self, k):
        return {key: v[self.rank :: self.world_size] for key, v in self.full[k].items()}


def clip_plan(out_dir: Path, rank: int = 0, world_size: int = 1):
    """The tiny preset's clip stage at batch 8, this process's rows of it."""
    from minillava import stages
    from minillava.presets import get_preset
    from minillava.tokenizer import get_tokenizer

    preset = get_preset("tiny")
    preset.clip.batch_size = 8
    plan = stages.build_stage("clip", preset, get_tokenizer(), out_dir)
    plan.batches = RowShare(plan.batches, rank, world_size)
    return plan, preset.clip


def _clip_worker(out_dir: Path) -> None:
    info, device = setup_distributed("cpu")
    plan, config = clip_plan(out_dir, info.rank, info.world_size)
    result = train_stage(
        plan.model, plan.batches, config, name="clip", out_dir=out_dir, device=device,
        progress=False,
    )  # fmt: skip
    torch.save(
        {"weights": plan.model.state_dict(), "losses": result.losses},
        out_dir / f"clip_rank{info.rank}.pt",
    )
    torch.distributed.destroy_process_group()


def _worker(out_dir: Path) -> None:
    info, device = setup_distributed("cpu")
    assert info.world_size == 2, "run me with torchrun --nproc_per_node=2"
    model = Toy()
    if info.rank == 1:  # DDP must broadcast rank 0's weights at the start
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    result = train_stage(
        model,
        ShardedBatches(info.rank, info.world_size),
        CONFIG,
        name="ddp",
        out_dir=out_dir,
        device=device,
        progress=False,
    )
    torch.save(
        {"weights": model.state_dict(), "losses": result.losses}, out_dir / f"rank{info.rank}.pt"
    )
    torch.distributed.destroy_process_group()


def run_two_workers(flag: str, out_dir: Path) -> None:
    """This file as two gloo processes under torchrun, in worker mode `flag`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        __file__, flag, str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_on_the_full_batch(tmp_path):
    run_two_workers("--worker", tmp_path)

    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0["weights"]:  # the replicas never drift apart
        assert torch.equal(rank0["weights"][key], rank1["weights"][key]), key
    assert rank0["losses"] == rank1["losses"]  # logged losses are averaged over ranks

    single = Toy()
    result = train_stage(single, ShardedBatches(), CONFIG, progress=False)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(rank0["weights"][key], value, rtol=1e-5, atol=1e-6)
    assert rank0["losses"] == pytest.approx(result.losses, rel=1e-5)
    assert (tmp_path / "ddp.pt").is_file()  # rank 0 wrote the checkpoint


@pytest.mark.slow
def test_the_train_command_starts_its_cpu_processes_through_torchrun(tmp_path):
    """`minillava train --set cpu_processes=2` runs `torchrun --nproc_per_node=2 -m
    minillava.train ...` (what a multi-GPU run types by hand): the real stage, LLaVA and all,
    the preset's threads shared out among the processes."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("WORLD_SIZE", None)
    cmd = [
        sys.executable, "-m", "minillava.cli", "train", "--preset", "tiny", "--stage", "instruct",
        "--out-dir", str(tmp_path), "--no-progress", "--no-eval", "--set", "cpu_processes=2",
        "--set", "num_threads=2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("minillava train: preset") == 1  # only rank 0 speaks
    assert "device cpu x 2 processes, 1 CPU threads" in proc.stdout
    ckpt = torch.load(tmp_path / "instruct.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert (tmp_path / "llava.pt").is_file()


@pytest.mark.slow
def test_clip_contrasts_the_whole_batch_across_processes(tmp_path):
    """Each process holds half of the batch; CLIP gathers the embeddings, so two processes
    compute the loss of the whole batch (8 candidates per image, not 4) and end where one
    process on the whole batch ends."""
    run_two_workers("--clip-worker", tmp_path)

    rank0 = torch.load(tmp_path / "clip_rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "clip_rank1.pt", weights_only=True)
    plan, config = clip_plan(tmp_path / "single")
    single = train_stage(plan.model, plan.batches, config, progress=False)
    # A loss over each process's 4 rows alone would be about log(4) at the start, not log(8).
    assert rank0["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert rank0["losses"] == rank1["losses"]
    for key, value in plan.model.state_dict().items():
        assert torch.equal(rank0["weights"][key], rank1["weights"][key]), key
        if key.endswith("k_proj.bias"):
            # Its true gradient is 0 (a bias shared by every key shifts each query's scores by
            # one constant, which softmax ignores): Adam turns the rounding noise it gets
            # instead into steps as large as any other, different in each computation.
            continue
        torch.testing.assert_close(rank0["weights"][key], value, rtol=1e-4, atol=1e-6)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
if __name__ == "__main__" and "--clip-worker" in sys.argv:
    _clip_worker(Path(sys.argv[sys.argv.index("--clip-worker") + 1]))
