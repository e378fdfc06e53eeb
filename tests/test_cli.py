"""The `minillava` command: help, bad commands, a missing checkpoint, and a smoke test of
`minillava data export`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minillava.cli import SUBCOMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: minillava")
    for name in SUBCOMMANDS:
        assert f"  {name} " in out


def test_no_arguments_prints_usage(capsys):
    assert main([]) == 0
    assert "commands:" in capsys.readouterr().out


def test_unknown_command_exits_2_with_usage(capsys):
    assert main(["fly"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'fly'" in err and "usage: minillava" in err


def test_the_installed_entry_point_runs_as_a_process():
    """`python -m minillava.cli` is what the `minillava` script calls: exit codes survive."""
    ok = subprocess.run(
        [sys.executable, "-m", "minillava.cli", "--help"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "chat" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "minillava.cli", "nope"], capture_output=True)
    assert bad.returncode == 2


def test_subcommand_help_exits_0(capsys):
    for name in ("chat", "eval", "export"):
        try:
            main([name, "--help"])
        except SystemExit as stop:  # argparse exits after printing help
            assert stop.code == 0
        assert f"minillava {name}" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [["chat", "scene.png", "hi"], ["eval"], ["export", "out"]], ids=lambda a: a[0]
)
def test_a_missing_checkpoint_is_one_line_that_says_run_make_train(argv, tmp_path, capsys):
    missing = tmp_path / "runs" / "llava.pt"
    assert main([*argv, "--checkpoint", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"minillava {argv[0]}: no checkpoint at {missing}; run `make train` first "
        "(or pass --checkpoint PATH)\n"
    )


def test_data_export_writes_images_and_llava_json_that_data_check_accepts(tmp_path, capsys):
    out = tmp_path / "export"
    argv = ["data", "export", str(out), "--split", "test", "--n", "3", "--image-size", "32"]
    assert main(argv) == 0
    assert len(list((out / "images").glob("*.png"))) == 3
    records = json.loads((out / "data.json").read_text())
    assert records and all(r["image"].endswith(".png") for r in records)
    assert records[0]["conversations"][0]["from"] == "human"
    assert main(["data", "check", str(out / "data.json"), str(out / "images")]) == 0
    capsys.readouterr()
