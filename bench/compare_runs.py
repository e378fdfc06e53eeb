"""Put several runs' evaluations side by side: is a change better than run-to-run noise?

Three runs of the cpu preset, differing only in seed, scored 77.1 to 84.9% on the same 2,000
test questions (docs/results.md): one run of a change says little unless its
figure is compared with the spread of runs without it. This script reads the eval.json that
`make train` and `minillava eval` write and prints one markdown row per run: overall accuracy
and its blind baseline, held-out, every type's accuracy, the weakest gain over the blind baseline
among the types the goal counts (those whose baseline is at most 60%), and the accuracy where a
known shortcut is wrong (`data.instruct.shortcut_answer`); then the mean and the range. A second
table gives what the chat is judged on (first questions, held-out, turns 1 to 3, follow-ups by
pronoun, false premises, description F1 and hallucinated objects) for each run, with their mean
and range.

    python bench/compare_runs.py runs/cpu /tmp/seed1 /tmp/seed2
    python bench/compare_runs.py /tmp/seeds/seed*/eval_noimage --out runs.json
    python bench/compare_runs.py runs/cpu /tmp/seed1 --blind-mode no_image   # the other baseline

A RUN is a run directory (its eval/eval.json is read), an evaluation directory, or an eval.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BASELINE_EXEMPT_ABOVE = 0.60  # a type whose blind baseline is higher need not gain 30 points


def eval_json_path(run: str | Path) -> Path:
    """The eval.json of `run` (a run directory, an evaluation directory, or the file)."""
    run = Path(run)
    for path in (run, run / "eval.json", run / "eval" / "eval.json"):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{run}: no eval.json there, nor in {run / 'eval'}; run `minillava eval --checkpoint "
        f"{run / 'llava.pt'} --out-dir {run / 'eval'}` first"
    )


def summarise(
    evaluation: dict, split: str = "test", source: str = "eval.json", blind_mode: str | None = None
) -> dict:
    """One run's figures on `split` from its eval.json dict (`minillava.report.report`).

    Gains are over the run's first blind baseline ("blind"), or over the one of `blind_mode`
    ("blank": a grey image, "no_image": no image token), which `report` keeps as "blind" or as
    "blind_<mode>".
    """
    try:
        results = evaluation["splits"][split]
        model, blind = results["model"], results["blind"]
    except KeyError:
        splits = sorted(evaluation.get("splits", {}))
        message = f"{source}: no model and blind results for split {split!r}; has {splits}"
        raise ValueError(message) from None
    if blind_mode is not None and (blind.get("blind_mode") or "blank") != blind_mode:
        if f"blind_{blind_mode}" not in results:
            found = [r.get("blind_mode") for k, r in results.items() if k.startswith("blind")]
            raise ValueError(
                f"{source}: no {blind_mode!r} blind baseline for split {split!r} (it has "
                f"{found}); `minillava eval --blind-mode both` writes both"
            )
        blind = results[f"blind_{blind_mode}"]
    gains = {t: model["per_type"][t] - blind["per_type"][t] for t in model["per_type"]}
    counted = {t: g for t, g in gains.items() if blind["per_type"][t] <= BASELINE_EXEMPT_ABOVE}
    weakest = min(counted, key=counted.get) if counted else None
    heldout = evaluation["splits"].get("heldout", {}).get("model", {}).get("accuracy")
    turns = results.get("turns", {}).get("per_turn")
    descriptions = results.get("descriptions", {}).get("totals", {})
    return {
        "n": model["n"],
        "accuracy": model["accuracy"],
        "blind": blind["accuracy"],
        "blind_mode": blind.get("blind_mode"),
        "heldout": heldout if split != "heldout" else None,
        "per_type": model["per_type"],
        "gain": gains,
        "weakest_gain": (weakest, counted[weakest]) if weakest else None,
        "where_shortcut_fails": model.get("where_shortcut_fails", {}),
        # What the chat is judged on beyond first questions (absent in older eval.json files).
        "turns": list(turns.values()) if isinstance(turns, dict) else turns,
        "follow_ups": (results.get("follow_ups", {}).get("per_turn") or [None, None])[1],
        "false_premises": results.get("false_premises", {}).get("honest"),
        "description_f1": descriptions.get("f1"),
        "description_f1_second_turn": results.get("descriptions_second_turn", {})
        .get("totals", {})
        .get("f1"),
        "hallucination_rate": descriptions.get("hallucination_rate"),
    }


CHAT_FIGURES = {  # name -> how to read it from a `summarise` dict
    "short answers": lambda r: r["accuracy"],
    "held-out": lambda r: r["heldout"],
    "turn 1": lambda r: (r["turns"] or [None] * 3)[0],
    "turn 2": lambda r: (r["turns"] or [None] * 3)[1],
    "turn 3": lambda r: (r["turns"] or [None] * 3)[2],
    "follow-ups by pronoun": lambda r: r.get("follow_ups"),
    "false premises": lambda r: r["false_premises"],
    "description F1": lambda r: r["description_f1"],
    "description F1, 2nd turn": lambda r: r.get("description_f1_second_turn"),
    "hallucinated objects": lambda r: r["hallucination_rate"],
}


def chat_table(runs: dict[str, dict]) -> str:
    """The chat's figures, a column per run, then their mean and range (F1 as a fraction, the
    rest in percent); a figure an older eval.json lacks is left out."""
    names = list(runs)
    lines = ["| figure | " + " | ".join(names) + " | mean | range |",
             "|---" + "|---:" * (len(names) + 2) + "|"]  # fmt: skip
    for figure, read in CHAT_FIGURES.items():
        values = [read(run) for run in runs.values()]
        if any(v is None for v in values):
            continue
        show = (lambda v: f"{v:.3f}") if figure.startswith("description F1") else _pct
        mean = sum(values) / len(values)
        cells = [*(show(v) for v in values), show(mean), f"{show(min(values))}-{show(max(values))}"]
        lines.append(f"| {figure} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def markdown_table(runs: dict[str, dict]) -> str:
    """A row per run (name -> `summarise`), then the mean and range of the overall accuracy."""
    types = sorted({t for run in runs.values() for t in run["per_type"]})
    ops = sorted({op for run in runs.values() for op in run["where_shortcut_fails"]})
    header = ["run", "n", "test", "blind", "held-out", *types, "weakest gain"]
    header += [f"{op} (shortcut wrong)" for op in ops]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, run in runs.items():
        weakest = run["weakest_gain"]
        mode = run["blind_mode"]  # the relation gain depends on it (docs/results.md)
        blind = _pct(run["blind"]) + (f" ({mode})" if mode not in (None, "blank") else "")
        cells = [name, str(run["n"]), _pct(run["accuracy"]), blind,
                 _pct(run["heldout"]), *(_pct(run["per_type"].get(t)) for t in types),
                 f"{weakest[0]} {100 * weakest[1]:+.1f}" if weakest else ""]  # fmt: skip
        for op in ops:
            fails = run["where_shortcut_fails"].get(op)
            cells.append(f"{_pct(fails['accuracy'])} (n={fails['n']})" if fails else "")
        lines.append("| " + " | ".join(cells) + " |")
    accuracies = [run["accuracy"] for run in runs.values()]
    mean = sum(accuracies) / len(accuracies)
    lines.append(
        f"\n{len(runs)} runs: test accuracy mean {100 * mean:.1f}%, range "
        f"{100 * min(accuracies):.1f} to {100 * max(accuracies):.1f}%"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="run dirs, eval dirs or eval.json files")
    parser.add_argument("--split", default="test", help="test | heldout (default: test)")
    parser.add_argument(
        "--blind-mode",
        choices=("blank", "no_image"),
        default=None,
        help="the blind baseline the gains are over (default: each run's first, usually blank)",
    )
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    runs = {}
    for run in args.runs:
        path = eval_json_path(run)
        evaluation = json.loads(path.read_text())
        runs[str(run).rstrip("/")] = summarise(evaluation, args.split, str(path), args.blind_mode)
    print(markdown_table(runs))
    print()
    print(chat_table(runs))
    if args.out:
        record = {"command": "python bench/compare_runs.py " + " ".join(argv or sys.argv[1:])}
        Path(args.out).write_text(json.dumps({**record, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
