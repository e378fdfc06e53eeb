"""One training loop for every stage of minillava, and the `minillava train` command.

LLaVA is trained in stages; we add two at the front because we have no pretrained parts:

    lm        pretrain the decoder (the Brain) on ShapesWorld text     -> runs/<preset>/lm.pt
    clip      contrastive pretraining of the ViT (the Eyes) with a text encoder  -> clip.pt
    align     ViT and decoder frozen; only the projector (the Bridge) learns, on captions
    instruct  ViT frozen; projector + decoder (full or LoRA) learn on conversations, with the
              loss on the assistant's tokens only                     -> instruct.pt, llava.pt

What each stage trains on lives in stages.py. This file is the loop they share, `train_stage`,
and it knows nothing about LLaVA: it takes any model whose forward returns an object with a
`.loss`, and a dataset whose item k is the k-th micro-batch (a dict of tensors, passed to the
model as keyword arguments). Because batch k depends only on k (and the seed), a resumed run sees
exactly the batches the interrupted run would have seen, and reproduces its losses.

What the loop does, step by step:
    for each optimizer step:
        lr <- warm-up then cosine schedule
        for each of grad_accum micro-batches:    (gradient accumulation: a big batch in pieces)
            loss = model(**batch).loss / grad_accum        under bf16 autocast on GPU
                (with return_logits=False when the model takes it: the loss alone is cheaper)
            stop if the loss is NaN/inf                    (the last good checkpoint is kept)
            loss.backward()                                (DDP averages gradients over GPUs)
        clip the global gradient norm, optimizer.step(), zero the gradients
        stop if a weight became NaN/inf or absurdly large  (so no checkpoint keeps it)
        log a JSONL line, update the progress bar, checkpoint now and then (atomically)
    plot the loss curve to PNG

Multi-GPU: `torchrun --nproc_per_node=N -m minillava.train ...` starts N processes; each takes
its share of every batch and DistributedDataParallel keeps the replicas identical.
On a CPU the cpu preset does the same with two processes of one thread each
(`Preset.cpu_processes`): `minillava train` then runs that torchrun command itself, and owns it:
stopping `minillava train` (Ctrl-C, SIGTERM, even SIGKILL) stops torchrun and its workers too
(minillava/launch.py).

`--parts exercises` trains the model with your own functions from exercises/ wherever they are
done and pass their checks, the library's elsewhere; a table at the start says whose runs where
(minillava/parts.py).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from minillava import parts
from minillava.checkpoint import (
    CheckpointMismatchError,
    load_checkpoint,
    save_checkpoint,
    unwrap_model,
    weights_mismatch,
)
from minillava.cli import output_dir_problem
from minillava.device import autocast, device_from_flag, pick_device
from minillava.launch import die_with_parent, launch_cpu_processes, threads_per_process
from minillava.lora import merge_lora
from minillava.plots import plot_loss_curve, read_metrics
from minillava.presets import PRESETS, Preset, StageConfig, apply_overrides, get_preset
from minillava.report import load_clip_for_eval, report
from minillava.stages import (
    StagePlan,
    build_stage,
    check_instruct_mix,
    clip_config,
    decoder_config,
    llava_config,
    world_config,
)
from minillava.tokenizer import get_tokenizer

# ----------------------------------------------------------------------------------------------
# Several processes (DDP)


@dataclass
class DistInfo:
    """Who am I among the training processes? (rank 0 prints, logs and saves.)"""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank and world size of this process (rank 0 of 1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return DistInfo(dist.get_rank(), local, dist.get_world_size())
    return DistInfo()


def setup_distributed(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the process group if started by `torchrun` (WORLD_SIZE > 1); pick this rank's device.

    NCCL on CUDA, gloo on CPU (which is how the tests run two processes on a laptop).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    chosen = pick_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if chosen.type == "cuda" else "gloo")
    info = dist_info()
    if chosen.type == "cuda" and info.world_size > 1:
        chosen = torch.device("cuda", info.local_rank)  # one GPU per process
        torch.cuda.set_device(chosen)
    return info, chosen


def _mean_over_ranks(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a scalar over processes (every rank then logs, and NaN-checks, the same value)."""
    if info.world_size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)  # gloo has no AVG: sum, then divide
    return value / info.world_size


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule


def lr_at(step: int, config: StageConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then cosine decay.

    Warm-up avoids huge first updates while Adam's moment estimates are still noise; the cosine
    lands softly at `lr * min_lr_ratio` on the last step. Computed from the step alone (no
    scheduler state), so a resumed run follows the same curve.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    min_lr = config.lr * config.min_lr_ratio
    decay_steps = max(1, config.steps - config.warmup_steps - 1)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - min_lr)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices get weight decay; biases and norms do not.

    Decaying a LayerNorm gain or a bias towards 0 only hurts (they are not what overfits), so
    like GPT-2/nanoGPT we decay exactly the parameters with 2 or more dimensions. Frozen
    parameters (requires_grad=False) are left out: that is how a stage freezes a part.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimizer(groups: list[dict], config: StageConfig, device: torch.device):
    """AdamW; the fused CUDA kernel on GPU (one launch for all parameters instead of many)."""
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        fused=device.type == "cuda",
    )


# ----------------------------------------------------------------------------------------------
# The loop


class NonFiniteLossError(RuntimeError):
    """The loss, the gradient or the weights became NaN, infinite or absurdly large: training
    stopped, before a checkpoint could keep them."""


# The largest weight (in absolute value) a stage may reach before we call it diverged. Healthy
# runs stay far below it: from initial weights of about 0.02, the largest weight of the cpu
# preset's final model is 1.5 (a norm gain), of its CLIP 2.8 (the logit scale). Past it a
# checkpoint is poisoned even while the loss is still finite: lm at lr=1e3 reaches weights of
# about 1e7 in three steps, and resuming that checkpoint at lr=1e-3 gives a NaN loss at once,
# while the tiny preset's lm stopped by this bound (largest weight 99.5) resumes at lr=1e-3 with
# finite losses. So no checkpoint is written with a weight past it.
# (A model of your own that needs larger weights: pass train_stage(max_weight=...).)
MAX_WEIGHT = 100.0


@dataclass
class StageResult:
    """What `train_stage` returns: the per-step losses and where the artifacts are."""

    name: str
    steps: int  # optimizer steps completed in total (including those before a resume)
    losses: list[float] = field(default_factory=list)  # loss of every logged step
    evals: list[dict] = field(default_factory=list)  # what eval_fn returned, with its step
    checkpoint: Path | None = None
    metrics: Path | None = None
    plot: Path | None = None
    seconds: float = 0.0  # wall time of this call
    resumed_from: int = 0


def loss_only_kwargs(model: nn.Module) -> dict:
    """Extra forward arguments that ask a model for its loss alone, if it can skip the logits.

    The loop reads only `.loss`. `Decoder` and `Llava` take `return_logits=False` and then run
    their last layer and LM head only at the positions that have a label (one in ten in VQA
    batches) instead of building (B, T, V) logits: the same loss and gradients, less work.
    Other models (CLIP) get nothing extra.
    """
    accepts = "return_logits" in inspect.signature(unwrap_model(model).forward).parameters
    return {"return_logits": False} if accepts else {}


def count_tokens(batch: dict) -> int:
    """Tokens in a batch, for tokens/s: non-padding positions, else the batch size."""
    if isinstance(batch.get("attention_mask"), torch.Tensor):
        return int(batch["attention_mask"].sum())
    if isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    return first.shape[0]


def to_device(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a batch; non_blocking overlaps the copy with compute (pinned memory)."""
    return {
        key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def train_stage(
    model: nn.Module,
    batches: Dataset,
    config: StageConfig,
    *,
    name: str = "stage",
    out_dir: str | Path | None = None,
    device: torch.device | str = "auto",
    dtype: str = "auto",
    groups: list[dict] | None = None,
    resume: bool = False,
    compile: bool = False,
    num_workers: int = 0,
    run_config: dict | None = None,
    model_config: dict | None = None,
    eval_fn: Callable[[nn.Module], dict] | None = None,
    eval_every: int = 0,
    progress: bool = True,
    max_weight: float = MAX_WEIGHT,
) -> StageResult:
    """Train `model` for `config.steps` optimizer steps on `batches`; checkpoint and log.

    Args:
        model: forward(**batch) must return an object with a scalar `.loss`. Parameters with
            requires_grad=False are frozen (not given to the optimizer).
        batches: item k is micro-batch k (a dict of tensors); step s uses items
            s*grad_accum ... s*grad_accum + grad_accum - 1. Under DDP each rank's dataset must
            return that rank's share of the batch.
        config: steps, learning rate and schedule, accumulation, clipping, checkpoint interval.
        name: the stage name; files are `{out_dir}/{name}.pt`, `{name}.jsonl`, `{name}_loss.png`.
        out_dir: where to write them (None: write nothing, e.g. in a notebook).
        device, dtype: where and in what precision to train ("auto": the best available, bf16
            autocast on CUDA); compile: torch.compile the model; num_workers: DataLoader workers.
        groups: optimizer parameter groups (default: `param_groups(model, weight_decay)`); a
            group may carry "lr_scale" to train at a multiple of the scheduled rate.
        resume: continue from `{out_dir}/{name}.pt` if it exists (returns at once if that stage
            was already finished; CheckpointMismatchError if it cannot: another stage's
            checkpoint, or one written for a model of other sizes).
        run_config, model_config: stored in every checkpoint (how to rebuild the model).
        eval_fn: called as eval_fn(model) (in eval mode, no grad) every `eval_every` steps and
            at the end; its dict of numbers is logged with the step (e.g. {"val_loss": ...}).
        progress: show a tqdm progress bar (on the main process).
        max_weight: stop (NonFiniteLossError) if a trained weight's magnitude exceeds it.
    """
    started = time.perf_counter()
    info = dist_info()
    device = prepare_device(device)
    model.to(device)
    groups = groups if groups is not None else param_groups(model, config.weight_decay)
    optimizer = make_optimizer(groups, config, device)
    files = StageFiles.of(name, out_dir)
    result = StageResult(name, 0, checkpoint=files.checkpoint, metrics=files.metrics,
                         plot=files.plot)  # fmt: skip

    # Resume: restore weights, optimizer moments, step and RNG, then skip the steps already done.
    records, restored = [], False
    if resume and files.checkpoint is not None and files.checkpoint.is_file():
        result.resumed_from = restore(files.checkpoint, model, optimizer, device, name)
        restored = True
        if files.metrics.is_file():
            records = read_metrics(files.metrics, up_to_step=result.resumed_from)
        if info.is_main:
            print(f"[{name}] resuming from {files.checkpoint} at step {result.resumed_from}/"
                  f"{config.steps}")  # fmt: skip
    result.losses = [r["loss"] for r in records if "loss" in r]
    result.steps = start_step = result.resumed_from
    if start_step >= config.steps:
        result.seconds = time.perf_counter() - started
        return result  # this stage was already finished

    run_config = {**(run_config or {}), "stage": asdict(config)}
    checkpointer = Checkpointer(files.checkpoint, model, optimizer, device, config.steps, name,
                                run_config, model_config or {}, info.is_main,
                                saved_step=start_step if restored else None)  # fmt: skip
    train_model, ddp_model = wrap_for_training(model, device, info, compile)
    step_fn = OptimizationStep(train_model, ddp_model, optimizer, config, device, dtype, info,
                               loss_only_kwargs(model), name, checkpointer, max_weight)  # fmt: skip
    micro_batches = iter(make_loader(batches, config, start_step, num_workers, device))
    log = MetricsLog(files.metrics if info.is_main else None, records)
    bar = tqdm(total=config.steps, initial=start_step, desc=f"{name:>8}",
               disable=not (progress and info.is_main), dynamic_ncols=True, leave=True)  # fmt: skip
    meter = Throughput(info.world_size)
    try:
        for step in range(start_step, config.steps):
            lr = set_learning_rate(optimizer, step, config)
            step_loss, grad_norm = step_fn(micro_batches, step, meter)
            done = step + 1
            if done % config.log_every == 0 or done == config.steps:
                loss_value = _mean_over_ranks(step_loss, info).item()
                record = {"stage": name, "step": done, "loss": loss_value, "lr": lr,
                          "grad_norm": float(grad_norm), "tokens_per_s": meter.rate(),
                          "time_s": time.perf_counter() - started}  # fmt: skip
                if device.type == "cuda":  # what the stage has held at most so far
                    record["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                result.losses.append(loss_value)
                log.write(record)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.1e}",
                                tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)  # fmt: skip
            bar.update(1)
            result.steps = done
            if eval_fn is not None and (
                done == config.steps or eval_every and done % eval_every == 0
            ):
                evaluation = {"stage": name, "step": done, **_evaluate(eval_fn, model, train_model)}
                result.evals.append(evaluation)
                log.write(evaluation, flush=False)
            if (config.ckpt_every and done % config.ckpt_every == 0) or done == config.steps:
                checkpointer.save(done)
    finally:
        bar.close()
        log.close()

    if files.plot is not None and info.is_main and files.metrics.is_file():
        plot_loss_curve(files.metrics, files.plot, title=f"stage {name}: training loss")
    result.seconds = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------------------------
# The loop's parts: files, resume, model wrapping, batches, one optimizer step, the log


@dataclass
class StageFiles:
    """Where a stage writes: its checkpoint, its metrics log and its loss plot (None: nowhere)."""

    checkpoint: Path | None = None
    metrics: Path | None = None
    plot: Path | None = None

    @classmethod
    def of(cls, name: str, out_dir: str | Path | None) -> StageFiles:
        if out_dir is None:
            return cls()
        out_dir = Path(out_dir)
        return cls(out_dir / f"{name}.pt", out_dir / f"{name}.jsonl", out_dir / f"{name}_loss.png")


def prepare_device(device: torch.device | str) -> torch.device:
    """The device to train on; on CUDA, TF32 tensor cores on and the peak-memory count reset."""
    device = pick_device(device) if isinstance(device, str) else device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)  # each stage's log says its own peak
    return device


def restore(path: Path, model: nn.Module, optimizer, device: torch.device, name: str) -> int:
    """Load weights, optimizer moments and RNG state from checkpoint `path`; return its step.

    A checkpoint that cannot continue this stage (another stage's, weights only, or written by a
    run whose model had other sizes) raises CheckpointMismatchError saying so in one line.
    """
    ckpt = load_checkpoint(path, map_location=device)
    check_stage(ckpt, path, name)
    other_run = f"resume it with the settings it was written with, or {START_AFRESH.format(path)}"
    mismatch = weights_mismatch(unwrap_model(model), ckpt["model"])
    if mismatch:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by a run with other settings ({mismatch}); {other_run}"
        )
    unwrap_model(model).load_state_dict(ckpt["model"])
    if ckpt["optimizer"] is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except ValueError as error:  # other parameter groups: other parts frozen, LoRA or not
            raise CheckpointMismatchError(
                f"checkpoint {path} was written by a run that trained other parameters ({error}); "
                f"{other_run}"
            ) from None
    torch.set_rng_state(ckpt["extra"]["rng_state"].cpu())  # dropout masks continue as before
    if device.type == "cuda" and "cuda_rng_state" in ckpt["extra"]:
        torch.cuda.set_rng_state(ckpt["extra"]["cuda_rng_state"].cpu(), device)
    return ckpt["step"]


# What to do with a checkpoint this run cannot continue.
START_AFRESH = "train these settings in another --out-dir (or delete {})"


def check_stage(ckpt: dict, path: Path, name: str) -> None:
    """Raise CheckpointMismatchError unless `ckpt` holds the training state of stage `name`."""
    extra = ckpt.get("extra") or {}
    stage = extra.get("stage")
    if stage is not None and stage != name:
        raise CheckpointMismatchError(
            f"checkpoint {path} holds the {stage!r} stage, not {name!r}: --resume cannot continue "
            f"stage {name!r} from it; {START_AFRESH.format(path)}"
        )
    if "rng_state" not in extra:
        raise CheckpointMismatchError(
            f"checkpoint {path} holds weights only (a final model?), not the training state "
            f"--resume continues from; {START_AFRESH.format(path)}"
        )


@dataclass
class Checkpointer:
    """Saves the stage's checkpoint (main process only): weights, optimizer, step and RNG state,
    everything `restore` needs to continue as if never stopped.

    Only a state a resume can continue from is saved. The weights were checked after the step
    (OptimizationStep); Adam's moments are checked here, before writing, on every process (they
    are the same on all), so that all stop together. `saved_step` is the step of the checkpoint
    at `path` that this run wrote or resumed from (None: none yet), which a stop message names.
    """

    path: Path | None
    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    steps: int
    name: str
    run_config: dict
    model_config: dict
    is_main: bool
    saved_step: int | None = None

    def save(self, step: int) -> None:
        if self.path is None:
            return
        moments = [value for state in self.optimizer.state.values() for value in state.values()
                   if isinstance(value, torch.Tensor) and value.is_floating_point()]  # fmt: skip
        if moments and not torch.stack([torch.isfinite(m).all() for m in moments]).all():
            what = "Adam's moment estimates became NaN or infinite"
            raise NonFiniteLossError(_stop_message(self.name, step, what, self))
        if self.is_main:
            self.write(step)
        self.saved_step = step

    def write(self, step: int) -> None:
        extra = {"stage": self.name, "rng_state": torch.get_rng_state(), "done": step >= self.steps}
        if self.device.type == "cuda":
            extra["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)
        save_checkpoint(
            self.path,
            model=self.model,
            optimizer=self.optimizer,
            step=step,
            config=self.run_config,
            model_config=self.model_config,
            extra=extra,
        )


def wrap_for_training(model: nn.Module, device: torch.device, info: DistInfo, compile: bool):
    """(the model to call, the DDP wrapper or the model): DDP over several processes, then
    (optionally) torch.compile. The unwrapped `model` is what gets saved."""
    train_model = ddp_model = model
    if info.world_size > 1:
        train_model = ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if compile:
        train_model = torch.compile(train_model)
    train_model.train()
    return train_model, ddp_model


def make_loader(batches: Dataset, config: StageConfig, start_step: int, num_workers: int,
                device: torch.device) -> DataLoader:  # fmt: skip
    """Micro-batch k is item k of `batches`; start where we stopped. Workers build batches in
    parallel with training; pinned (page-locked) memory makes the host-to-GPU copy asynchronous."""
    accum = config.grad_accum
    return DataLoader(
        batches,
        batch_size=None,  # items are whole batches already
        sampler=range(start_step * accum, config.steps * accum),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        # Its own generator: creating the iterator must not consume the global RNG, or a resumed
        # run's dropout masks would be shifted by one draw.
        generator=torch.Generator().manual_seed(0),
    )


def set_learning_rate(optimizer, step: int, config: StageConfig) -> float:
    """Set the scheduled rate of `step` in every group (times its "lr_scale"); return it."""
    lr = lr_at(step, config)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


class Throughput:
    """Tokens per second over the steps since the last logged one, over all processes."""

    def __init__(self, world_size: int):
        self.world_size, self.tokens, self.start = world_size, 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        """The window's rate; a new window starts."""
        elapsed = time.perf_counter() - self.start
        rate = self.tokens * self.world_size / max(elapsed, 1e-9)
        self.tokens, self.start = 0, time.perf_counter()
        return rate


@dataclass
class OptimizationStep:
    """One optimizer step: grad_accum micro-batches forward and backward, clip, update.

    Returns the step's loss (summed over its micro-batches, each divided by grad_accum) and the
    global gradient norm before clipping. Raises NonFiniteLossError before a NaN or infinite
    loss or gradient can reach the weights, and after the update if it made a weight NaN,
    infinite or larger than `max_weight` (the loss can be finite while the weights are not sane,
    and the weights are what a checkpoint keeps).
    """

    train_model: nn.Module
    ddp_model: nn.Module
    optimizer: torch.optim.Optimizer
    config: StageConfig
    device: torch.device
    dtype: str
    info: DistInfo
    forward_kwargs: dict  # {"return_logits": False} for Decoder and Llava
    name: str
    checkpointer: Checkpointer  # which checkpoint is kept, named in the message if a step fails
    max_weight: float = MAX_WEIGHT

    def __post_init__(self):
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]

    def __call__(self, micro_batches, step: int, meter: Throughput):
        accum = self.config.grad_accum
        step_loss = torch.zeros((), device=self.device)
        for micro in range(accum):
            batch = to_device(next(micro_batches), self.device)
            meter.add(count_tokens(batch))
            # Under DDP, gradients are all-reduced on every backward unless we say no_sync:
            # only the last micro-batch of the step needs to communicate.
            skip_sync = self.info.world_size > 1 and micro < accum - 1
            with self.ddp_model.no_sync() if skip_sync else contextlib.nullcontext():
                with autocast(self.device, self.dtype):
                    loss = self.train_model(**batch, **self.forward_kwargs).loss / accum
                # Checked every micro-step (a GPU sync, cheap next to a step): a NaN must
                # stop us before backward() spreads it into the weights.
                if not torch.isfinite(_mean_over_ranks(loss.detach(), self.info)):
                    self.stop(step, f"the loss became {float(loss.detach())}")
                loss.backward()
            step_loss += loss.detach()

        clip = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip)
        if not torch.isfinite(grad_norm):
            self.stop(step, f"the gradient became {float(grad_norm)}")
        try:
            self.optimizer.step()
        except RuntimeError as error:
            # Adam's step size lr / (1 - beta1^t) is turned into a float32 for the update: with
            # an absurd learning rate (1e39) that overflows, and torch raises instead of writing
            # infinite weights.
            if "overflow" not in str(error):
                raise
            self.stop(step, "the update overflowed float32")
        self.optimizer.zero_grad(set_to_none=True)
        # The largest weight: one number, so one GPU sync (as the loss check above).
        largest = torch.stack([p.detach().abs().max() for p in self.trainable]).max().item()
        if not math.isfinite(largest):
            self.stop(step, f"a weight became {largest}")
        if largest > self.max_weight:
            self.stop(step, f"a weight grew to {largest:.3g} (sane ones stay below "
                            f"{self.max_weight:g})")  # fmt: skip
        return step_loss, grad_norm

    def stop(self, step: int, what: str) -> NoReturn:
        raise NonFiniteLossError(_stop_message(self.name, step + 1, what, self.checkpointer))


class MetricsLog:
    """The stage's JSONL log, one record a line (main process only; path None: no file).

    Started anew on every run with `records`: a resumed run keeps the records up to its step and
    drops those of the steps it redoes. That rewrite is atomic, as a checkpoint is (a temp file,
    fsync, rename): a run killed in the middle of it leaves the old log whole, where truncating
    the log and writing it back would lose every record not yet written again. The new records
    are then appended, one line each.
    """

    def __init__(self, path: Path | None, records: list[dict]):
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
                f.flush()
                os.fsync(f.fileno())  # on disk before the rename makes it the log
            os.replace(tmp, path)
            self.file = open(path, "a")

    def write(self, record: dict, flush: bool = True) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            if flush:
                self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _evaluate(eval_fn: Callable, model: nn.Module, train_model: nn.Module) -> dict:
    train_model.eval()
    with torch.no_grad():
        out = eval_fn(model)
    train_model.train()
    return {key: float(value) for key, value in out.items()}


def _stop_message(name: str, step: int, what: str, checkpointer: Checkpointer) -> str:
    """Why stage `name` stopped at (1-based) `step`, which checkpoint is kept, and what to do."""
    smaller = f"a smaller --set {name}.lr"
    if checkpointer.saved_step is None:
        kept = f"no checkpoint of this run was written before it: start again with {smaller}"
    else:
        kept = (
            f"the last good checkpoint is kept: {checkpointer.path} (step "
            f"{checkpointer.saved_step}); continue from it with --resume and {smaller}"
        )
    return (
        f"stage {name!r}: {what} at step {step}; training stopped and {kept}. Usual causes: a "
        "learning rate too high, no gradient clipping, or a batch with no tokens to predict."
    )


# ----------------------------------------------------------------------------------------------
# `minillava train`


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minillava train",
        description="Train the tiny LLaVA: lm -> clip -> align -> instruct, then evaluate. "
        "Multi-GPU: torchrun --nproc_per_node=N -m minillava.train ...",
    )
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS), help="default: cpu")
    parser.add_argument(
        "--stage", default="all", choices=("all", *Preset.STAGES), help="one stage, or all in order"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoints in the run dir"
    )
    parser.add_argument(
        "--out-dir",
        help="run directory (default: runs/<preset>, runs/<preset>-<parts> with --parts)",
    )
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps")
    parser.add_argument("--dtype", help="auto (bf16 on CUDA) | float32 | bfloat16 | float16")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile")
    parser.add_argument("--lora", action=argparse.BooleanOptionalAction, help="LoRA in instruct")
    parser.add_argument(
        "--parts",
        choices=parts.PARTS,
        help="whose functions run in the model: the library's (default), your exercises' where "
        "they pass their checks, or the solutions' (minillava/parts.py)",
    )
    parser.add_argument("--steps", type=int, help="optimizer steps of every selected stage")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any preset field, e.g. --set instruct.lr=3e-4 --set model.hidden_size=192",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def resolve_preset(args: argparse.Namespace) -> Preset:
    """The named preset, then the explicit flags, then the --set overrides (last wins)."""
    preset = get_preset(args.preset)
    stages = Preset.STAGES if args.stage == "all" else (args.stage,)
    flags = {
        "device": args.device,
        "dtype": args.dtype,
        "compile": args.compile,
        "lora": args.lora,
        "parts": args.parts,
        "seed": args.seed,
        "num_workers": args.num_workers,
    }
    for key, value in flags.items():
        if value is not None:
            setattr(preset, key, value)
    if args.steps is not None:
        for name in stages:
            preset.stage(name).steps = args.steps
    return apply_overrides(preset, args.set)


def check_run(args, preset: Preset, stages, tokenizer) -> tuple[torch.device, Path]:
    """Refuse what would fail later, in one line that names the setting (ValueError) or the
    checkpoint (CheckpointMismatchError); return the device and the run directory (made here).

    All of it is checked before any process starts or any file is written: a run that cannot
    start must not leave workers behind, nor overwrite the run directory's preset.json.
    """
    device = device_from_flag(preset.device)
    processes = int(os.environ.get("WORLD_SIZE", "0")) or (
        preset.cpu_processes if device.type == "cpu" else 1
    )
    for name in stages:
        check_stage_config(name, preset.stage(name), processes)
    if preset.parts not in parts.PARTS:  # (--set parts=...; the flag has its choices)
        raise ValueError(f"parts={preset.parts!r}, expected one of {', '.join(parts.PARTS)}")
    out_dir = Path(args.out_dir or default_out_dir(preset))
    problem = output_dir_problem(out_dir)
    if problem:
        raise ValueError(f"--out-dir {problem}; pass another --out-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file on the way, no permission
        raise ValueError(
            f"--out-dir {out_dir} cannot be made ({error.strerror}); pass another --out-dir"
        ) from None
    if args.resume:
        for name in stages:
            check_resumable(out_dir / f"{name}.pt", name, preset, tokenizer)
    return device, out_dir


def check_stage_config(name: str, config: StageConfig, processes: int) -> None:
    """Raise ValueError naming the field if stage `name` cannot train with `config`.

    `steps=0` would "train" nothing and still write a checkpoint (and, for instruct, an untrained
    llava.pt); `batch_size=0` or a batch that does not split evenly would fail deep inside.
    """
    for key in ("steps", "batch_size", "grad_accum", "log_every"):
        value = getattr(config, key)
        if value < 1:
            how = (
                f"--set {name}.{key}=N" if key != "steps" else f"--steps N or --set {name}.steps=N"
            )
            raise ValueError(f"{name}.{key}={value}, but it must be at least 1 ({how})")
    share = config.grad_accum * processes  # every micro-batch of every process gets rows
    if config.batch_size % share:
        raise ValueError(
            f"{name}.batch_size={config.batch_size} must be divisible by grad_accum x processes "
            f"= {config.grad_accum} x {processes}; --set {name}.batch_size to a multiple of {share}"
        )


def check_resumable(path: Path, name: str, preset: Preset, tokenizer) -> None:
    """Raise CheckpointMismatchError if --resume cannot continue stage `name` from `path`: a file
    cut short, another stage's checkpoint, or one written for a model of other sizes. (No file:
    nothing to resume, the stage starts from step 0.)"""
    if not path.is_file():
        return
    ckpt = load_checkpoint(path)
    check_stage(ckpt, path, name)
    differences = _differences(ckpt["model_config"], stage_model_config(name, preset, tokenizer))
    if differences:
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by a run with other settings "
            f"({'; '.join(differences[:3])}): resume it with those, or {START_AFRESH.format(path)}"
        )


def stage_model_config(name: str, preset: Preset, tokenizer) -> dict:
    """The model config stage `name` builds from `preset`, as its checkpoint stores it
    (stages.build_stage's `model_config`), without building the model or its data."""
    if name == "lm":
        return asdict(decoder_config(preset, tokenizer.vocab_size))
    if name == "clip":
        return asdict(clip_config(preset, tokenizer.vocab_size))
    return asdict(llava_config(preset, tokenizer))


def _differences(saved: dict, wanted: dict, prefix: str = "") -> list[str]:
    """'field A in the checkpoint, B in this run' for each (nested) field that differs."""
    out = []
    for key in sorted(set(saved) | set(wanted)):
        old, new = saved.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _differences(old, new, f"{prefix}{key}.")
        elif json.dumps(old) != json.dumps(new):  # (a tuple and the list it was saved as match)
            out.append(f"{prefix}{key} {old!r} in the checkpoint, {new!r} in this run")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    stages = Preset.STAGES if args.stage == "all" else (args.stage,)
    started_by_torchrun = "WORLD_SIZE" in os.environ
    if started_by_torchrun:
        die_with_parent()  # a worker never trains on after its torchrun has gone
    # Under torchrun every process checks the same and stops the same way; rank 0 says why.
    rank = DistInfo(rank=int(os.environ.get("RANK", "0")))
    tokenizer = get_tokenizer("shapesworld")
    try:
        preset = resolve_preset(args)
        if "instruct" in stages:
            check_instruct_mix(preset)  # before lm, clip and align spend their minutes
        device, out_dir = check_run(args, preset, stages, tokenizer)
    except ValueError as error:  # a setting, or a checkpoint --resume cannot continue
        return stopped(error, 2, rank)
    choices = choose_parts(preset.parts, rank, started_by_torchrun)
    if preset.cpu_processes > 1 and not started_by_torchrun and device.type == "cpu":
        with parts.decision_in_env(choices):  # the workers use the parts checked here
            return launch_cpu_processes(preset, argv)
    info, device = setup_distributed(preset.device)
    if device.type == "cpu" and info.world_size > 1:  # the CPU is shared among the processes
        torch.set_num_threads(threads_per_process(preset.num_threads, info.world_size))
    elif preset.num_threads > 0:
        torch.set_num_threads(preset.num_threads)
    say = print if info.is_main else (lambda *a, **k: None)
    run_config = {
        "preset": preset.to_dict(),
        "world": asdict(world_config(preset)),
        "tokenizer": "shapesworld",
        "parts": parts.summary(choices),  # {seam: whose}: which functions trained this model
    }
    if info.is_main:
        with open(out_dir / "preset.json", "w") as f:
            json.dump(run_config, f, indent=1)
    say(
        f"minillava train: preset {preset.name!r}, stages {', '.join(stages)}, device {device}"
        f"{f' x {info.world_size} processes' if info.world_size > 1 else ''}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    say(f"run dir: {out_dir}/ (preset.json has every setting)")

    started = time.perf_counter()
    for name in stages:
        try:
            plan = run_stage(name, preset, args, tokenizer, out_dir, device, info, run_config)
        except NonFiniteLossError as error:
            return stopped(error, 1, info)
        except CheckpointMismatchError as error:  # e.g. a --resume from a LoRA run without --lora
            return stopped(error, 2, info)
    if "instruct" in stages and info.is_main:
        model = save_final_model(plan, out_dir, preset, run_config)
        say(f"training time: {time.perf_counter() - started:.0f} s")
        if preset.eval_samples > 0 and not args.no_eval:
            evaluate_run(model, tokenizer, out_dir, preset, run_config, device)
    if info.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return 0


def default_out_dir(preset: Preset) -> Path:
    """runs/<preset>, or runs/<preset>-<parts> for a run on other parts than the library's: a run
    with your parts goes beside the library's run, so the two can be compared (chapter 11)."""
    name = preset.name if preset.parts == "library" else f"{preset.name}-{preset.parts}"
    return Path("runs") / name


def choose_parts(which: str, rank: DistInfo, started_by_torchrun: bool) -> list[parts.Choice]:
    """Decide whose function runs at each seam of the model (parts.py), and say it, once.

    The process a user started checks the exercises and prints the table; the workers it starts
    (torchrun) take its decision from the environment. Workers that torchrun started directly
    (several GPUs) check for themselves, and rank 0 prints.
    """
    decided = parts.decided_in_env() if started_by_torchrun else None
    choices = parts.use_parts(which, decided)
    if which != "library" and decided is None and rank.is_main:
        print(parts.format_parts_report(choices, which))
    return choices


def stopped(error: Exception, status: int, info: DistInfo) -> int:
    """Say in one line why the run stopped; return the exit status.

    Under torchrun all processes stop at the same point, and rank 0 speaks for them. The others
    end quietly with status 0, so that torchrun waits for rank 0's status instead of stopping
    it, at the first failure it sees, before it has said why.
    """
    if info.is_main:
        print(f"minillava train: {error}", file=sys.stderr)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return status if info.is_main else 0


def run_stage(name, preset, args, tokenizer, out_dir, device, info, run_config) -> StagePlan:
    """Build stage `name` (stages.py), train it with `train_stage`, say how it went."""
    say = print if info.is_main else (lambda *a, **k: None)
    config = preset.stage(name)
    say(f"\n== stage {name}: {config.steps} steps, batch {config.batch_size}, lr {config.lr:g}")
    plan = build_stage(name, preset, tokenizer, out_dir, info.rank, info.world_size)
    trainable = sum(p.numel() for p in plan.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in plan.model.parameters())
    kind = type(plan.model).__name__
    say(f"  {kind}: {total / 1e6:.2f}M parameters, {trainable / 1e6:.2f}M trained")
    try:
        result = train_stage(
            plan.model,
            plan.batches,
            config,
            name=name,
            out_dir=out_dir,
            device=device,
            dtype=preset.dtype,
            resume=args.resume,
            compile=preset.compile,
            num_workers=preset.num_workers,
            run_config=run_config,
            model_config=plan.model_config,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        say(f"\ninterrupted: continue with the same command plus --resume (from {out_dir})")
        raise
    first, last = (result.losses[0], result.losses[-1]) if result.losses else (math.nan,) * 2
    say(
        f"  done in {result.seconds:.0f} s: loss {first:.3f} -> {last:.3f}\n"
        f"  checkpoint {result.checkpoint}, metrics {result.metrics}, loss curve {result.plot}"
    )
    return plan


def save_final_model(plan: StagePlan, out_dir: Path, preset: Preset, run_config: dict):
    """The deliverable: the instruct model with any LoRA folded in, plain layer names, no
    optimizer state, as `llava.pt`. chat/eval/export load it with checkpoint.load_llava."""
    model = merge_lora(unwrap_model(plan.model))
    final = out_dir / "llava.pt"
    save_checkpoint(
        final,
        model=model,
        step=preset.instruct.steps,
        config=run_config,
        model_config=plan.model_config,
    )
    print(f"\nfinal model: {final}  (try: minillava chat --checkpoint {final} ...)")
    return model


def evaluate_run(model, tokenizer, out_dir: Path, preset: Preset, run_config: dict, device):
    """The eval table (model vs blind baseline, test and held-out splits) and chat samples."""
    started = time.perf_counter()
    print(f"\n== evaluation: {preset.eval_samples} questions per split, greedy decoding")
    report(
        model.to(device).eval(),
        tokenizer,
        out_dir / "eval",
        n=preset.eval_samples,
        n_chat=preset.chat_samples,
        clip_model=load_clip_for_eval(out_dir / "clip.pt", device),
        world=run_config["world"],
    )
    print(f"evaluation time: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
