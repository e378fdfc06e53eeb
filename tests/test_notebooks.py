"""Every chapter notebook runs top to bottom in fast mode, and is committed with its outputs.

Each notebooks/*.ipynb is executed with MINILLAVA_FAST=1 (fewer steps, smaller sizes), from
notebooks/ as the working directory, on this very Python (a kernelspec made for the test, so a
user's own "python3" kernel elsewhere cannot be picked up by mistake). A cell that raises fails
the test with the cell's source and traceback. New chapters are picked up by the glob.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [path.stem for path in NOTEBOOKS]
CELL_TIMEOUT = 180  # seconds per cell; a whole notebook should take under ~60 s in fast mode


@pytest.fixture
def kernel_name(tmp_path, monkeypatch) -> str:
    """A kernelspec running this interpreter (the project's .venv)."""
    spec_dir = tmp_path / "kernels" / "minillava-test"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "minillava test",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return "minillava-test"


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_in_fast_mode(path, kernel_name, monkeypatch):
    monkeypatch.setenv("MINILLAVA_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError naming the cell that failed


@pytest.fixture
def every_exercise_finished(tmp_path, monkeypatch) -> Path:
    """An exercises/ package holding the reference solutions, first on the kernel's path: the
    notebooks then run as they do for a learner who has finished every exercise."""
    package = tmp_path / "finished" / "exercises"
    package.mkdir(parents=True)
    for source in (ROOT / "solutions").glob("*.py"):
        shutil.copy(source, package / source.name)
    paths = [str(package.parent), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    return package


def _stream_text(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []))


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_with_every_exercise_finished(
    path, kernel_name, monkeypatch, every_exercise_finished
):
    """Run with the solutions in exercises/, every check passes and the notebook's model runs the
    learner's parts (where the notebook builds one from them), not the library's."""
    monkeypatch.setenv("MINILLAVA_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name=kernel_name,
        resources={"metadata": {"path": str(path.parent)}},
    ).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    checks = [cell for cell in code if "check(" in cell.source]
    assert checks, f"{path.name}: no check(...) cell"
    for cell in checks:
        text = _stream_text(cell)
        assert "PASS" in text and "TODO" not in text and "FAIL" not in text, (
            f"{path.name}: with every exercise finished, a check cell printed:\n{text}"
        )
    if any("use_your_parts" in cell.source for cell in code):
        said = "".join(_stream_text(cell) for cell in code)
        assert "The model below runs your" in said, f"{path.name}: the library's parts ran"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_committed_executed(path):
    """Outputs are committed (figures visible on a repository page), without errors."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    outputs = [out for cell in code for out in cell.get("outputs", [])]
    assert all(cell.get("execution_count") for cell in code if cell.source.strip()), (
        f"{path.name}: some code cells were never run: execute the notebook before committing"
    )
    errors = [out for out in outputs if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: committed with an error output: {errors[0].get('ename')}"
    assert any("image/png" in out.get("data", {}) for out in outputs), (
        f"{path.name}: no figure in the committed outputs"
    )
    sources = "\n".join(cell.source for cell in notebook.cells)
    assert "check(" in sources, f"{path.name}: no check(...) cell for the exercises"
    assert "what you built" in sources.lower(), f"{path.name}: no 'What you built' recap"
