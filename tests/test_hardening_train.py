"""Fault injection on the training side: what `minillava train` does when things go wrong.

Each test breaks one thing on purpose, at a chosen point, and checks that the run stops cleanly:

* weights that blow up while the loss is still finite: no checkpoint keeps them, the message
  names the last good one and its step, and a resume from it at a sane learning rate trains on;
* the launcher of the two CPU processes killed (SIGTERM, SIGKILL): torchrun and its workers go
  with it, and nothing writes to the run directory afterwards;
* a kill while a resume rewrites the metrics log: the old log stays whole;
* user errors (a checkpoint cut short, of another stage or size, `--steps 0`, `batch_size=0`,
  `--device cuda` without a GPU, an --out-dir that is a file): one line on stderr that names the
  input and what to do, a non-zero exit status, no traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from minillava.checkpoint import (
    CheckpointMismatchError,
    CheckpointUnreadableError,
    load_checkpoint,
    load_llava,
    save_checkpoint,
)
from minillava.presets import Preset, StageConfig, get_preset
from minillava.train import (
    MAX_WEIGHT,
    Checkpointer,
    MetricsLog,
    NonFiniteLossError,
    stage_model_config,
    train_stage,
)


class Toy(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x, y):
        return SimpleNamespace(loss=F.mse_loss(self.net(x), y))


class Sums(Dataset):
    """Batch k: y = the sum of x, from (k) alone; `fail_at` simulates a kill fetching batch k."""

    def __init__(self, fail_at=None):
        self.fail_at = fail_at

    def __getitem__(self, k):
        if k == self.fail_at:
            raise KeyboardInterrupt(f"simulated interruption before batch {k}")
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(k))
        return {"x": x, "y": x.sum(-1, keepdim=True)}


class FarTargets(Dataset):
    """Targets a million times the input's sum: every step pushes the weights the same way, so
    Adam moves each one by about the learning rate a step, and they grow steadily."""

    def __getitem__(self, k):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(k))
        return {"x": x, "y": 1e6 * x.sum(-1, keepdim=True)}


QUIET = ["--no-progress", "--no-eval"]

# The cpu preset's two processes (torchrun and two workers), on the tiny preset's lm stage.
TWO_PROCESSES = "--preset tiny --device cpu --set cpu_processes=2 --stage lm".split()


def _train(out_dir, *args) -> int:
    """`minillava train --preset tiny ...`, run in this process through the `minillava` command
    (which would print any checkpoint error it is handed in one line, too)."""
    from minillava.cli import main

    return main(["train", "--preset", "tiny", "--out-dir", str(out_dir), *QUIET, *args])


def _one_line(err: str) -> str:
    """The single line a user error must be: no traceback, nothing else on stderr."""
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    return err


def _sets(overrides: str) -> list[str]:
    """`"a=1 b=2"` -> `["--set", "a=1", "--set", "b=2"]`."""
    return [arg for item in overrides.split() for arg in ("--set", item)]


def _max_weight(state: dict) -> float:
    return max(v.abs().max().item() for v in state.values() if v.is_floating_point())


# ----------------------------------------------------------------------------------------------
# 1. Weights that go bad: no checkpoint keeps them


def test_weights_past_the_bound_stop_the_stage_and_the_last_sane_checkpoint_is_kept(tmp_path):
    """From initial weights below 0.5, lr 4 a step: 4.5, 8.5, then 12.5, past the bound of 10."""
    cfg = StageConfig(steps=20, lr=4.0, warmup_steps=0, weight_decay=0.0, ckpt_every=1)
    with pytest.raises(NonFiniteLossError) as stop:
        train_stage(
            Toy(), FarTargets(), cfg, name="toy", out_dir=tmp_path, progress=False, max_weight=10.0
        )
    kept = load_checkpoint(tmp_path / "toy.pt")
    message = str(stop.value)
    assert "a weight grew to" in message and f"at step {kept['step'] + 1};" in message
    assert f"last good checkpoint is kept: {tmp_path / 'toy.pt'} (step {kept['step']})" in message
    assert kept["step"] == 2 and _max_weight(kept["model"]) <= 10.0
    # That checkpoint continues at a sane learning rate, with finite losses.
    cfg.lr = 1e-3
    resumed = train_stage(
        Toy(),
        FarTargets(),
        cfg,
        name="toy",
        out_dir=tmp_path,
        resume=True,
        progress=False,
        max_weight=10.0,
    )
    assert resumed.resumed_from == kept["step"] and resumed.steps == 20
    assert all(torch.isfinite(torch.tensor(resumed.losses)))


def test_non_finite_adam_moments_are_never_saved(tmp_path):
    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters())
    model(**FarTargets()[0]).loss.backward()
    optimizer.step()
    checkpointer = Checkpointer(
        tmp_path / "toy.pt", model, optimizer, torch.device("cpu"), 9, "toy", {}, {}, True
    )
    checkpointer.save(1)
    next(iter(optimizer.state.values()))["exp_avg_sq"][0] = float("inf")
    with pytest.raises(NonFiniteLossError, match=r"moment estimates .* at step 2.*\(step 1\)"):
        checkpointer.save(2)
    assert load_checkpoint(tmp_path / "toy.pt")["step"] == 1


def test_cli_a_diverging_lm_keeps_only_a_checkpoint_that_resumes(tmp_path, capsys):
    """The learning rate climbs 20 a step (warm-up towards 2e5): the weights pass MAX_WEIGHT
    within a few steps while the loss is still finite."""
    climbing = "lm.lr=2e5 lm.warmup_steps=10000 lm.weight_decay=0.0 lm.steps=6 lm.ckpt_every=1"
    assert _train(tmp_path, "--stage", "lm", *_sets(climbing)) == 1
    err = _one_line(capsys.readouterr().err)
    kept = load_checkpoint(tmp_path / "lm.pt")
    assert "a weight grew to" in err and f"{tmp_path / 'lm.pt'} (step {kept['step']})" in err
    assert "--resume" in err and "--set lm.lr" in err
    assert kept["step"] >= 1 and _max_weight(kept["model"]) <= MAX_WEIGHT
    # The suggested resume, at lr 1e-3, trains to the end with finite losses.
    assert _train(tmp_path, "--stage", "lm", "--set", "lm.steps=6", "--resume") == 0
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "lm.jsonl")]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))


@pytest.mark.parametrize(
    "lr, expected",
    [("1e3", "a weight grew to 1.01e+03"), ("1e39", "the update overflowed float32")],
)
def test_cli_an_absurd_learning_rate_stops_at_step_1_with_nothing_kept(
    tmp_path, capsys, lr, expected
):
    assert _train(tmp_path, "--stage", "lm", *_sets(f"lm.lr={lr} lm.ckpt_every=1")) == 1
    err = _one_line(capsys.readouterr().err)
    assert expected in err and "at step 1;" in err
    assert "no checkpoint of this run was written" in err and not (tmp_path / "lm.pt").exists()


# ----------------------------------------------------------------------------------------------
# 2. The launcher owns its workers


def _processes_of(run_dir: Path) -> list[int]:
    """Processes whose command line names `run_dir`: launcher, torchrun and workers."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if (
                entry.isdigit()
                and str(run_dir).encode() in Path(f"/proc/{entry}/cmdline").read_bytes()
            ):
                found.append(int(entry))
        except OSError:  # ended while we looked
            pass
    return found


def _snapshot(run_dir: Path) -> dict:
    return {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in run_dir.iterdir()}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="finds processes in /proc")
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_killing_the_launcher_stops_torchrun_and_both_workers(tmp_path, how):
    """SIGTERM is passed on and waited for; SIGKILL cannot be, and torchrun and the workers
    stop because their parent died. Either way none is left, and the run directory is still."""
    run_dir = tmp_path / f"run-{how}"  # in every command line of the run: how we find them
    command = [sys.executable, "-m", "minillava.cli", "train", *TWO_PROCESSES, *QUIET,
               *_sets("lm.steps=100000 lm.ckpt_every=1"), "--out-dir", str(run_dir)]  # fmt: skip
    with open(tmp_path / "stderr.txt", "w") as err:
        launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 180
        while not (run_dir / "lm.pt").exists():  # the workers are training (a checkpoint a step)
            assert launcher.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        assert len(_processes_of(run_dir)) == 4  # launcher, torchrun, two workers
        launcher.send_signal(getattr(signal, how))
        status = launcher.wait(timeout=60)
        assert status == (143 if how == "SIGTERM" else -9)  # 128 + SIGTERM: passed on, waited
        deadline = time.monotonic() + 15
        while _processes_of(run_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_of(run_dir) == []
        before = _snapshot(run_dir)
        time.sleep(1.0)
        assert _snapshot(run_dir) == before  # nobody writes checkpoints or metrics any more
    finally:  # whatever went wrong, leave no process of ours behind
        for pid in _processes_of(run_dir):
            os.kill(pid, signal.SIGKILL)
        launcher.wait()


@pytest.mark.slow
def test_a_failure_in_the_two_cpu_processes_is_one_line_from_rank_0(tmp_path):
    """Both workers stop at step 1; rank 0 says why, torchrun adds no traceback of its own."""
    command = [sys.executable, "-m", "minillava.cli", "train", *TWO_PROCESSES, *QUIET,
               *_sets("lm.lr=1e3"), "--out-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert _one_line(done.stderr).startswith("minillava train: stage 'lm': a weight grew to")
    assert "x 2 processes" in done.stdout


# ----------------------------------------------------------------------------------------------
# 3. The metrics log survives a kill while a resume rewrites it


def test_a_kill_while_the_metrics_log_is_rewritten_leaves_the_old_log_whole(tmp_path, monkeypatch):
    path = tmp_path / "toy.jsonl"
    records = [{"stage": "toy", "step": s, "loss": 1.0 / s} for s in range(1, 3001)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = path.read_bytes()

    def killed(src, dst):
        raise KeyboardInterrupt("killed before the rename (simulated)")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLog(path, records[:2000])  # a resume from step 2000 rewrites the log
    assert path.read_bytes() == before  # all 3,000 records, not what a half-written file holds
    monkeypatch.undo()
    log = MetricsLog(path, records[:2000])
    log.write({"stage": "toy", "step": 2001, "loss": 0.5})
    log.close()
    lines = [json.loads(line) for line in open(path)]
    assert [r["step"] for r in lines] == list(range(1, 2002)) and lines[-1]["loss"] == 0.5


def test_a_resume_killed_in_the_rewrite_then_resumed_again_loses_no_record(tmp_path, monkeypatch):
    cfg = StageConfig(steps=8, lr=1e-2, warmup_steps=2, ckpt_every=2, log_every=1)
    whole = train_stage(Toy(), Sums(), cfg, name="toy", out_dir=tmp_path / "a", progress=False)
    run = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):  # stopped fetching step 6's batch: 5 logged, 4 saved
        train_stage(Toy(), Sums(fail_at=5), cfg, name="toy", out_dir=run, progress=False)
    logged = (run / "toy.jsonl").read_bytes()
    real_replace = os.replace

    def killed_on_the_log(src, dst):
        if str(dst).endswith(".jsonl"):
            raise KeyboardInterrupt("killed while the log is rewritten (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_on_the_log)
    with pytest.raises(KeyboardInterrupt):
        train_stage(Toy(), Sums(), cfg, name="toy", out_dir=run, resume=True, progress=False)
    assert (run / "toy.jsonl").read_bytes() == logged
    monkeypatch.undo()
    resumed = train_stage(Toy(), Sums(), cfg, name="toy", out_dir=run, resume=True, progress=False)
    assert resumed.losses == whole.losses
    assert (run / "toy.jsonl").read_text().count("\n") == 8


# ----------------------------------------------------------------------------------------------
# 4. User errors: one line, the input named, what to do


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory) -> Path:
    """A run directory whose lm.pt is the tiny preset's lm stage after one step."""
    from minillava.train import main

    run = tmp_path_factory.mktemp("lm_run")
    args = ["--preset", "tiny", "--stage", "lm", *_sets("lm.steps=1"), "--out-dir", str(run)]
    assert main([*args, *QUIET]) == 0
    return run


def _copy_run(lm_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(lm_run, run)
    return run


@pytest.mark.parametrize("damage", ["empty", "cut short", "not a checkpoint"])
def test_resume_from_a_damaged_checkpoint_is_one_line(lm_run, tmp_path, capsys, damage):
    run = _copy_run(lm_run, tmp_path)
    whole = (run / "lm.pt").read_bytes()
    damaged = {
        "empty": b"",
        "cut short": whole[: len(whole) // 2],
        "not a checkpoint": b"<html>Not Found</html>",
    }
    (run / "lm.pt").write_bytes(damaged[damage])
    assert _train(run, "--stage", "lm", "--set", "lm.steps=2", "--resume") == 2
    err = _one_line(capsys.readouterr().err)
    assert f"checkpoint {run / 'lm.pt'} " in err and "delete it and train again" in err
    with pytest.raises(CheckpointUnreadableError, match="lm.pt"):
        load_llava(run / "lm.pt", device="cpu")  # chat, eval and export say the same


def test_resume_from_another_stage_or_model_size_is_one_line_and_touches_nothing(
    lm_run, tmp_path, capsys
):
    run = _copy_run(lm_run, tmp_path)
    shutil.copy(run / "lm.pt", run / "clip.pt")
    preset_json = (run / "preset.json").read_bytes()
    assert _train(run, "--stage", "clip", "--resume") == 2
    err = _one_line(capsys.readouterr().err)
    assert f"checkpoint {run / 'clip.pt'} holds the 'lm' stage, not 'clip'" in err
    assert "--out-dir" in err
    assert _train(run, "--stage", "lm", "--set", "model.hidden_size=64", "--resume") == 2
    err = _one_line(capsys.readouterr().err)
    assert f"checkpoint {run / 'lm.pt'} was written by a run with other settings" in err
    assert "hidden_size 32 in the checkpoint, 64 in this run" in err
    assert "another --out-dir (or delete" in err
    assert (run / "preset.json").read_bytes() == preset_json  # the run's settings untouched


def test_the_training_loop_refuses_a_checkpoint_its_model_does_not_fit(tmp_path):
    cfg = StageConfig(steps=4, lr=1e-2, warmup_steps=1, ckpt_every=1)
    train_stage(Toy(), FarTargets(), cfg, name="toy", out_dir=tmp_path, progress=False)
    with pytest.raises(
        CheckpointMismatchError,
        match=r"net.0.weight is \[16, 4\] in the "
        r"checkpoint but \[32, 4\] in this model.*another --out-dir",
    ):
        train_stage(Toy(width=32), FarTargets(), cfg, name="toy", out_dir=tmp_path, resume=True)
    shutil.copy(tmp_path / "toy.pt", tmp_path / "other.pt")
    with pytest.raises(CheckpointMismatchError, match="holds the 'toy' stage, not 'other'"):
        train_stage(Toy(), FarTargets(), cfg, name="other", out_dir=tmp_path, resume=True)


def test_chat_eval_and_export_refuse_what_is_not_a_final_llava(lm_run, tmp_path, capsys):
    from tiny_models import tiny_llava_config

    from minillava.cli import main
    from minillava.llava import Llava
    from minillava.tokenizer import get_tokenizer

    with pytest.raises(CheckpointMismatchError, match="is the 'lm' stage's .* not a LLaVA"):
        load_llava(lm_run / "lm.pt", device="cpu")
    tokenizer = get_tokenizer("shapesworld")
    narrow, wide = tiny_llava_config(tokenizer), tiny_llava_config(tokenizer, hidden_size=64)
    save_checkpoint(
        tmp_path / "odd.pt",
        model=Llava(narrow),
        step=1,
        config={},
        model_config=dataclasses.asdict(wide),
    )
    with pytest.raises(CheckpointMismatchError, match=r"weights do not fit the model its config"):
        load_llava(tmp_path / "odd.pt", device="cpu")
    assert main(["export", str(tmp_path / "hf"), "--checkpoint", str(lm_run / "lm.pt")]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"minillava export: checkpoint {lm_run / 'lm.pt'} is the 'lm' stage's")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--steps", "0"], "lm.steps=0, but it must be at least 1 (--steps N or"),
        (["--set", "lm.batch_size=0"], "lm.batch_size=0, but it must be at least 1"),
        (
            ["--set", "lm.batch_size=3", "--set", "lm.grad_accum=2"],
            "lm.batch_size=3 must be divisible by grad_accum x processes = 2 x 1",
        ),
    ],
    ids=["steps 0", "batch_size 0", "uneven batch"],
)
def test_stage_settings_that_cannot_train_are_refused_before_anything_is_written(
    tmp_path, capsys, args, expected
):
    assert _train(tmp_path / "run", "--stage", "lm", *args) == 2
    assert expected in _one_line(capsys.readouterr().err)
    assert (
        not (tmp_path / "run" / "lm.pt").exists() and not (tmp_path / "run" / "llava.pt").exists()
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has the GPU asked for")
def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    assert _train(tmp_path, "--stage", "lm", "--device", "cuda") == 2
    err = _one_line(capsys.readouterr().err)
    assert "--device cuda: device='cuda' asked for, but CUDA is not available here" in err
    assert "try --device auto" in err


def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("not a directory")
    assert _train(tmp_path / "taken", "--stage", "lm") == 2
    err = _one_line(capsys.readouterr().err)
    assert f"--out-dir {tmp_path / 'taken'} is a file, not a folder" in err


def test_the_resume_check_computes_the_configs_the_stages_build(tmp_path):
    from minillava.stages import build_stage
    from minillava.tokenizer import get_tokenizer

    preset, tokenizer = get_preset("tiny"), get_tokenizer()
    for name in Preset.STAGES:
        built = build_stage(name, preset, tokenizer, tmp_path).model_config
        assert json.dumps(stage_model_config(name, preset, tokenizer)) == json.dumps(built), name


def test_a_later_stage_over_an_earlier_stage_of_another_size_is_one_line(lm_run, tmp_path, capsys):
    # Not a resume: `--stage align` loads the run dir's lm.pt into a decoder of this run's size.
    run = _copy_run(lm_run, tmp_path)
    assert _train(run, "--stage", "align", "--set", "model.hidden_size=64") == 2
    err = _one_line(capsys.readouterr().err)
    assert f"{run / 'lm.pt'} does not fit this run's language model" in err
    assert "another --out-dir" in err


def test_a_log_torn_by_a_kill_mid_append_loses_only_its_last_line(tmp_path):
    from minillava.plots import read_metrics

    log = tmp_path / "lm.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert read_metrics(log) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="line 2"):  # damage before the end is not a torn append
        read_metrics(log)


def test_a_damaged_clip_checkpoint_skips_the_zero_shot_evaluation_only(tmp_path, capsys):
    from minillava.report import load_clip_for_eval

    (tmp_path / "clip.pt").write_bytes(b"PK\x03\x04 cut short")
    assert load_clip_for_eval(tmp_path / "clip.pt", torch.device("cpu")) is None
    assert "skipping CLIP zero-shot" in capsys.readouterr().out
