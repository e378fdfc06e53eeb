"""Plots of training runs, written straight to PNG.

We draw on a `matplotlib.figure.Figure` directly instead of going through `pyplot`: no global
state, no GUI backend needed, and it works the same in a terminal, a test and a notebook (where
the returned figure displays inline).
"""

from __future__ import annotations

import json
from pathlib import Path

from matplotlib.figure import Figure


def read_metrics(path: str | Path, up_to_step: int | None = None) -> list[dict]:
    """Read a JSONL metrics log (one JSON object per line, as train.py writes) into dicts.

    `up_to_step` keeps only the records of steps up to it (records without a step are kept):
    a run resumed from a checkpoint at step s continues the log as it was at s, not with the
    lines a killed run wrote after its last checkpoint. A last line cut short (a run killed
    while appending it) is left out; a bad line before the last is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics log {str(path)!r} not found")
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):  # torn by a kill mid-append: the record was never whole
                break
            raise ValueError(f"metrics log {str(path)!r}, line {number}: {error}") from None
    if up_to_step is not None:
        records = [r for r in records if r.get("step", 0) <= up_to_step]
    return records


def smooth(values: list[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (what TensorBoard's slider does)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**i))
    return out


def plot_loss_curve(
    records: list[dict] | str | Path,
    out_path: str | Path | None = None,
    title: str | None = None,
    key: str = "loss",
) -> Figure:
    """Loss against step, raw and smoothed; learning rate on a second axis if logged.

    `records` is a metrics list or the path of a JSONL log (as written by train.py). Records
    without `key` (e.g. evaluation lines) are skipped. Saves a PNG when `out_path` is given.
    """
    if not isinstance(records, list):
        records = read_metrics(records)
    rows = [r for r in records if key in r and "step" in r]
    if not rows:
        raise ValueError(f"plot_loss_curve: no records with {key!r} and 'step' to plot")
    steps = [r["step"] for r in rows]
    values = [r[key] for r in rows]

    fig = Figure(figsize=(6, 3.5), dpi=120)
    ax = fig.add_subplot()
    ax.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=1, label=f"{key} (raw)")
    ax.plot(steps, smooth(values), color="tab:blue", linewidth=2, label=f"{key} (smoothed)")
    evals = [r for r in records if "val_loss" in r]
    if evals:
        ax.plot(
            [r["step"] for r in evals],
            [r["val_loss"] for r in evals],
            "o-",
            color="tab:orange",
            label="validation loss",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    if min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")  # losses falling over orders of magnitude read better in log
    ax.grid(alpha=0.3)
    if "lr" in rows[0]:
        lr_ax = ax.twinx()
        lr_ax.plot(steps, [r["lr"] for r in rows], color="tab:gray", linestyle="--", linewidth=1)
        lr_ax.set_ylabel("learning rate", color="tab:gray")
        lr_ax.tick_params(axis="y", colors="tab:gray")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or f"{key} per step")
    fig.tight_layout()
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path)
    return fig
