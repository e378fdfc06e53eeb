"""The `minillava` command: one entry point, one subcommand per job.

Each subcommand lives in the module that does the work and exposes `main(argv)`; this file only
dispatches, so `minillava --help` stays fast (nothing heavy is imported until it is needed):
the subcommand's module is imported by name (`importlib`) once it is chosen, and so is
`minillava.checkpoint`, whose errors are situations to explain rather than bugs to debug. A
subcommand raises them; this file prints them in one line, without a traceback.

It also holds what the chat, eval and export command lines share: `ArgumentParser`, whose usage
errors are one line (the mistake and what to do, not a screen of usage text), the argument types
that refuse a bad value while parsing (`positive_int`, `probability`, ...), and
`output_dir_problem`, which catches an unusable output folder before minutes of work are spent
on what goes in it. (`minillava data` keeps to plain argparse: data/ imports nothing above it.)
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

SUBCOMMANDS = {
    "train": ("minillava.train", "train the tiny LLaVA, one stage or all (--preset cpu|gpu)"),
    "chat": ("minillava.chat", "ask a trained model about an image"),
    "eval": ("minillava.report", "VQA accuracy by question type, against a blind baseline"),
    "export": ("minillava.export", "write a checkpoint as a transformers LLaVA directory"),
    "data": ("minillava.data.export", "export ShapesWorld as PNG + LLaVA JSON"),
    "grade": ("minillava.grading", "grade your exercises: minillava grade ch01 (or all)"),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line on stderr (exit code 2):

        minillava chat: argument --top-p: must be in (0, 1], got 5 (see minillava chat --help)

    argparse's own error prints the whole usage first, which buries the one line that matters.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _number(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        name = "a whole number" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1 (a count of steps, tokens, samples...)."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0 (an index, or a count that may be zero)."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number >= 0 (float() also reads "nan" and "inf")."""
    value = _number(text, float)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    """An argparse type: a number in (0, 1], such as top-p's share of probability to keep."""
    value = _number(text, float)
    if not 0.0 < value <= 1.0:  # also refuses nan, which compares False to everything
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def output_dir_problem(path: str | Path) -> str | None:
    """Why `path` cannot become an output folder (None if it can), checked without creating it.

    It can if it is a folder already, or if the nearest part of it that exists is a folder we
    may write in (mkdir then creates the rest). Checked up front, so that a typo costs a second
    rather than the minutes of evaluation (or the model load) before the first write.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{path} is a file, not a folder"
    existing = path
    while not existing.exists():
        if existing.is_symlink():  # a dangling link: mkdir would fail on it
            return f"{existing} is a broken symlink"
        existing = existing.parent
    if not existing.is_dir():
        return f"{path} cannot be made: {existing} is a file, not a folder"
    if not path.exists() and not os.access(existing, os.W_OK | os.X_OK):
        return f"{path} cannot be made: no permission to write in {existing}"
    if path.exists() and not os.access(path, os.W_OK | os.X_OK):
        return f"no permission to write in {path}"
    return None


def usage() -> str:
    lines = ["usage: minillava <command> [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `minillava <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"minillava: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    # Imported here, not at the top: it loads torch, which `minillava --help` does not need.
    from minillava.checkpoint import CheckpointMismatchError, CheckpointNotFoundError

    try:
        return module.main(rest) or 0
    except CheckpointNotFoundError as error:  # not trained yet: say how, no traceback
        print(f"minillava {name}: {error}", file=sys.stderr)
        return 1
    except CheckpointMismatchError as error:  # a stale checkpoint: say what to do, no traceback
        print(f"minillava {name}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
