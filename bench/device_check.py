"""One prepared command for a lent GPU: prove the CUDA path, then measure the gpu preset.

    PYTHONUNBUFFERED=1 python3 bench/device_check.py --out $OUT --work-dir /tmp/dc  # ~9 min
    python bench/device_check.py --out /tmp/dc --device cpu --preset tiny --no-compile  # a test

GPU time may come in short loans: a few minutes of device time, one command of at most 10
minutes, a bare machine at every start (docs/results.md, "GPU preset"). A loan should not be
spent writing scripts, so this one is written and tested on a CPU beforehand. In
order of value, each part under the time the command has left, it runs:

1. `environment`: torch and CUDA versions, the device, its memory, bf16 support.
2. `precision`: one instruct batch of the cpu preset's LLaVA, its loss in fp32, under bf16
   autocast (what the loop uses on CUDA) and compiled (`torch.compile`, the gpu preset's
   setting), with one fused-AdamW step: the GPU path runs and agrees with the CPU one.
3. `ddp`: `torchrun --nproc_per_node=1 -m minillava.train --preset tiny` (NCCL on CUDA, gloo on
   a CPU): the multi-GPU launch path starts, trains and saves.
4. `train`: `minillava train --preset gpu` (by default) until it ends or the time is up. Per
   stage: steps done, wall time, tokens/s (the median after the first fifth of the logged
   steps: compilation and warm-up excluded), peak GPU memory, and for the `lm` stage the MFU
   estimated like nanoGPT's (6N + 12LCT FLOPs a token over the GPU's bf16 peak); for a stage cut
   short, its projected time at that pace; the evaluation's figures if it got there.

It writes `device_check.json` under `--out` after every part, so a command stopped by its time
limit still returns what it measured, beside the logs of parts 3 and 4; their run directories
(checkpoints, metrics logs, loss plots) go under `--work-dir` (default: `--out`), which on the
device machine is kept out of $OUT: only a few files come back from there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled
sys.path.insert(0, str(ROOT / "bench"))

from compare_runs import summarise  # noqa: E402, I001  (bench/compare_runs.py)
from minillava.presets import apply_overrides, get_preset  # noqa: E402
from solutions.ch11_gpu import flops_per_token, mfu  # noqa: E402  (chapter 11's arithmetic)

# Dense bf16 peaks from the datasheets (FLOP/s, no sparsity), by a name the device reports.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "RTX 4090": 165e12, "L4": 121e12}


def bf16_peak(device_name: str) -> float | None:
    return next((peak for key, peak in BF16_PEAK.items() if key in device_name), None)


def environment(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "cuda": torch.version.cuda,
            "device_name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "bf16_peak_flops": bf16_peak(props.name),
        }
    return info


def precision(device: torch.device, compile_model: bool) -> dict:
    """The cpu preset's LLaVA on one instruct batch: fp32, bf16 autocast, compiled; one step."""
    from minillava.device import autocast
    from minillava.stages import build_stage
    from minillava.tokenizer import get_tokenizer
    from minillava.train import make_optimizer, param_groups, to_device

    preset = get_preset("cpu")
    preset.data.train_images = 256
    tokenizer = get_tokenizer()
    plan = build_stage("instruct", preset, tokenizer, Path("/nonexistent"))  # random weights
    model = plan.model.to(device).train()
    first_of_mix = sum(steps for _types, steps in preset.data.curriculum)  # after the phases
    batch = to_device(plan.batches[first_of_mix], device)
    torch.manual_seed(0)

    def loss_of(fn, dtype: str) -> float:
        with torch.no_grad(), autocast(device, dtype):
            return float(fn(**batch, return_logits=False).loss)

    result = {
        "loss_fp32": loss_of(model, "float32"),
        "loss_bf16_autocast": loss_of(model, "bfloat16"),
    }
    result["bf16_relative_difference"] = (
        abs(result["loss_bf16_autocast"] - result["loss_fp32"]) / result["loss_fp32"]
    )
    if compile_model:
        started = time.perf_counter()
        compiled = torch.compile(model)
        result["loss_compiled_fp32"] = loss_of(compiled, "float32")
        result["compile_s"] = round(time.perf_counter() - started, 1)
        result["compiled_relative_difference"] = (
            abs(result["loss_compiled_fp32"] - result["loss_fp32"]) / result["loss_fp32"]
        )
    optimizer = make_optimizer(param_groups(model, 0.1), preset.instruct, device)
    with autocast(device, "auto"):
        loss = model(**batch, return_logits=False).loss
    loss.backward()
    optimizer.step()
    result["fused_adamw"] = bool(optimizer.defaults.get("fused"))
    result["step_ok"] = all(torch.isfinite(p).all() for p in model.parameters())
    return result


def run_logged(command: list[str], log: Path, timeout_s: float) -> dict:
    """Run `command`, its output to `log`; its exit code and wall time (None code: timed out)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        try:
            code = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, timeout=max(timeout_s, 1), cwd=ROOT
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    tail = log.read_text().splitlines()[-15:]
    return {"command": " ".join(command), "returncode": code,
            "wall_s": round(time.perf_counter() - started, 1), "log_tail": tail}  # fmt: skip


def stage_figures(metrics: Path, planned_steps: int, preset, peak_flops: float | None) -> dict:
    """Steps, wall, steady tokens/s, peak memory (and lm's MFU) from a stage's JSONL log."""
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # blank, or the last line of a run killed mid-write
            continue
    records = [r for r in records if "loss" in r]
    if not records:
        return {"steps": 0, "planned_steps": planned_steps}
    last = records[-1]
    steady = records[len(records) // 5 :] or records
    tokens_per_s = statistics.median(r["tokens_per_s"] for r in steady)
    figures = {
        "steps": last["step"],
        "planned_steps": planned_steps,
        "wall_s": round(last["time_s"], 1),
        "tokens_per_s": round(tokens_per_s),
        "loss_first_last": [records[0]["loss"], last["loss"]],
    }
    if len(steady) > 1:  # the steady pace, for a stage the time limit cut short
        pace = (steady[-1]["time_s"] - steady[0]["time_s"]) / (
            steady[-1]["step"] - steady[0]["step"]
        )
        figures["steady_step_s"] = round(pace, 4)
        figures["projected_wall_s"] = round(last["time_s"] + pace * (planned_steps - last["step"]))
    if "max_memory_gib" in last:
        figures["max_memory_gib"] = round(max(r["max_memory_gib"] for r in records), 2)
    if metrics.stem == "lm" and peak_flops:
        m = preset.model
        n = decoder_parameters(preset)
        per_token = flops_per_token(n, m.num_layers, m.hidden_size, preset.data.lm_seq_len)
        figures["flops_per_token"] = per_token
        figures["mfu"] = mfu(tokens_per_s, per_token, peak_flops)
    return figures


def decoder_parameters(preset) -> int:
    from minillava.decoder import Decoder
    from minillava.stages import decoder_config
    from minillava.tokenizer import get_tokenizer

    with torch.device("meta"):  # the count, without the memory
        decoder = Decoder(decoder_config(preset, get_tokenizer().vocab_size))
    return sum(p.numel() for p in decoder.parameters())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/device")))
    parser.add_argument("--work-dir", type=Path, help="run directories (default: --out)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--preset", default="gpu", help="what part 4 trains")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="for part 4's preset"
    )
    parser.add_argument("--budget-s", type=float, default=540, help="for all four parts")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--skip", default="", help="parts to skip, e.g. ddp,precision")
    args = parser.parse_args(argv)
    deadline = time.perf_counter() + args.budget_s
    skip = set(filter(None, args.skip.split(",")))

    from minillava.device import pick_device

    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work_dir or args.out
    report_path = args.out / "device_check.json"
    report: dict = {"argv": sys.argv[1:] if argv is None else argv}

    def write(part: str, value) -> None:
        report[part] = value
        report_path.write_text(json.dumps(report, indent=1))
        print(f"[device_check] {part}: {json.dumps(value)[:400]}", flush=True)

    write("environment", environment(device))
    if "precision" not in skip:
        try:
            write("precision", precision(device, args.compile))
        except Exception as error:  # noqa: BLE001  (record it, and go on to the other parts)
            write("precision", {"error": repr(error)})
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    if "ddp" not in skip:
        ddp = run_logged(
            [*torchrun, "--nproc_per_node=1", "-m", "minillava.train", "--preset", "tiny",
             "--device", str(device), "--out-dir", str(work / "ddp"), "--no-progress",
             "--no-eval"],
            args.out / "ddp.log", min(120, deadline - time.perf_counter()),
        )  # fmt: skip
        ddp["checkpoint_written"] = (work / "ddp" / "llava.pt").is_file()
        write("ddp", ddp)
    if "train" not in skip:
        run_dir = work / "run"
        command = [sys.executable, "-m", "minillava.train", "--preset", args.preset,
                   "--device", str(device), "--out-dir", str(run_dir), "--no-progress",
                   "--compile" if args.compile else "--no-compile"]  # fmt: skip
        for override in args.set:
            command += ["--set", override]
        train = run_logged(command, args.out / "train.log", deadline - time.perf_counter() - 10)
        preset = apply_overrides(get_preset(args.preset), args.set)  # what the run trained
        peak = report["environment"].get("bf16_peak_flops")
        train["stages"] = {}
        for stage in preset.STAGES:
            if (run_dir / f"{stage}.jsonl").is_file():
                planned = preset.stage(stage).steps
                train["stages"][stage] = stage_figures(
                    run_dir / f"{stage}.jsonl", planned, preset, peak
                )
        if (run_dir / "eval" / "eval.json").is_file():
            evaluation = json.loads((run_dir / "eval" / "eval.json").read_text())
            train["eval"] = summarise(evaluation)
        write("train", train)
    print(f"wrote {report_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
