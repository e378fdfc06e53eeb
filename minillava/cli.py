"""The `minillava` command: one entry point, one subcommand per job.

Each subcommand lives in the module that does the work and exposes `main(argv)`; this file only
dispatches, so `minillava --help` stays fast (nothing heavy is imported until it is needed):
the subcommand's module is imported by name (`importlib`) once it is chosen, and so is
`minillava.checkpoint`, whose errors are situations to explain rather than bugs to debug. A
subcommand raises them; this file prints them in one line, without a traceback.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "train": ("minillava.train", "train the tiny LLaVA, one stage or all (--preset cpu|gpu)"),
    "chat": ("minillava.chat", "ask a trained model about an image"),
    "eval": ("minillava.report", "VQA accuracy by question type, against a blind baseline"),
    "export": ("minillava.export", "write a checkpoint as a transformers LLaVA directory"),
    "data": ("minillava.data.export", "export ShapesWorld as PNG + LLaVA JSON"),
    "grade": ("minillava.grading", "grade your exercises: minillava grade ch01 (or all)"),
}


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
