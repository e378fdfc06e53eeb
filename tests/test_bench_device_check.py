"""bench/device_check.py: the one command a lent GPU runs, proven on a CPU first."""

import json

import pytest
from tiny_models import load_bench_script

from minillava.presets import get_preset


@pytest.fixture(scope="module")
def check():
    return load_bench_script("device_check")


def test_every_part_runs_and_reports_on_a_cpu(check, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    argv = ["--out", str(out), "--work-dir", str(work), "--device", "cpu", "--preset", "tiny"]
    assert check.main([*argv, "--no-compile"]) == 0
    # $OUT on the device machine brings back a few files: the report and the two logs
    assert sorted(p.name for p in out.iterdir()) == ["ddp.log", "device_check.json", "train.log"]
    assert (work / "run" / "llava.pt").is_file()
    report = json.loads((out / "device_check.json").read_text())
    assert report["environment"]["device"] == "cpu"
    precision = report["precision"]
    assert precision["step_ok"] and precision["fused_adamw"] is False  # fused: CUDA only
    assert precision["bf16_relative_difference"] < 0.02
    assert report["ddp"]["returncode"] == 0 and report["ddp"]["checkpoint_written"]
    stages = report["train"]["stages"]
    assert list(stages) == ["lm", "clip", "align", "instruct"]
    for figures in stages.values():
        assert figures["steps"] == figures["planned_steps"] == 2
        assert figures["tokens_per_s"] > 0 and "max_memory_gib" not in figures  # CUDA only
    assert "mfu" not in stages["lm"]  # no bf16 peak is known for a CPU
    assert report["train"]["returncode"] == 0 and report["train"]["eval"]["n"] == 8


def test_a_stage_cut_short_is_projected_at_its_steady_pace(check, tmp_path):
    # 100 steps logged of 1,000: 5 s of warm-up and compilation, then 0.1 s a step.
    records = [
        {"stage": "lm", "step": s, "loss": 5.0, "tokens_per_s": 1000.0 if s > 10 else 10.0,
         "time_s": 5.0 + 0.1 * s, "max_memory_gib": 0.01 * s}
        for s in range(1, 101)
    ]  # fmt: skip
    metrics = tmp_path / "lm.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    preset = get_preset("gpu")
    figures = check.stage_figures(metrics, 1000, preset, peak_flops=989e12)
    assert figures["steps"] == 100 and figures["tokens_per_s"] == 1000  # warm-up left out
    assert figures["steady_step_s"] == pytest.approx(0.1)
    assert figures["projected_wall_s"] == pytest.approx(15.0 + 0.1 * 900, abs=1)
    assert figures["max_memory_gib"] == 1.0
    # nanoGPT's MFU: tokens/s x (6N + 12 L C T) / peak, N the decoder's parameters
    m = preset.model
    n = check.decoder_parameters(preset)
    assert 12e6 < n < 14e6  # the gpu preset's 12.85M-parameter decoder (chapter 11)
    per_token = 6 * n + 12 * m.num_layers * m.hidden_size * preset.data.lm_seq_len
    assert figures["mfu"] == pytest.approx(1000 * per_token / 989e12, rel=1e-3)


def test_the_bf16_peak_is_known_by_the_name_the_device_reports(check):
    assert check.bf16_peak("NVIDIA H200") == check.bf16_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert check.bf16_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert check.bf16_peak("Some Future GPU") is None  # then no MFU, rather than a wrong one


def test_a_run_the_time_limit_stops_still_reports_what_it_measured(check, tmp_path):
    # A stage far too long for the budget: the run is stopped, its log read as it stands.
    argv = ["--out", str(tmp_path), "--device", "cpu", "--preset", "tiny", "--no-compile",
            "--skip", "precision,ddp", "--budget-s", "25", "--set", "lm.steps=100000"]  # fmt: skip
    assert check.main(argv) == 0
    train = json.loads((tmp_path / "device_check.json").read_text())["train"]
    assert train["returncode"] is None  # timed out
    lm = train["stages"]["lm"]
    assert 0 < lm["steps"] < lm["planned_steps"] == 100000
    assert lm["projected_wall_s"] > lm["wall_s"]
    assert list(train["stages"]) == ["lm"] and "eval" not in train
