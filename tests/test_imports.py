"""Imports run one way: data -> tokenizer -> model parts -> llava -> training / evaluation / chat.

Read from the source (no module is imported), counting every import: at the top of a file and
inside functions alike, since an import moved into a function still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import minillava

PACKAGE = Path(minillava.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The minillava module `name` refers to (a submodule, or the package that defines it)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """The minillava modules `module` imports, anywhere in its file."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..data import y
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from minillava import stages` imports the module minillava.stages
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            if name == "minillava" or name.startswith("minillava."):
                target = resolve(name)
                if target is not None and target != module:
                    found.add(target)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for other in sorted(graph.get(node, ())):
            if state.get(other) == 1:
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle_through_several_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_reader_sees_imports_inside_functions_and_every_form(tmp_path, monkeypatch):
    source = (
        "import minillava.decoder\n"
        "from minillava import stages\n"
        "from minillava.data.shapes import WorldConfig\n"
        "def f():\n"
        "    from minillava.chat import ChatSession\n"
        "    from .llava import Llava\n"
    )
    probe = PACKAGE / "eval.py"  # any module of the package: only its text is replaced
    monkeypatch.setattr(Path, "read_text", lambda self, encoding=None: source)
    assert imports_of(module_name(probe)) == {
        "minillava.decoder",
        "minillava.stages",
        "minillava.data.shapes",
        "minillava.chat",
        "minillava.llava",
        "minillava",
    }


def test_minillava_has_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_data_engine_imports_nothing_above_it():
    # data/ is the bottom of the flow: scenes, conversations, images. It may use itself only.
    for module, targets in GRAPH.items():
        if module.startswith("minillava.data"):
            above = {t for t in targets if not t.startswith("minillava.data")}
            assert not above, f"{module} imports {sorted(above)}"


def test_the_model_parts_import_no_training_evaluation_or_chat():
    # The networks are the middle of the flow: they never reach up to what uses them.
    parts = ("attention", "vit", "clip", "projector", "resampler", "decoder",
             "decoder_loss_only", "generate", "llava", "lora")  # fmt: skip
    users = ("train", "stages", "eval", "report", "chat", "cli", "checkpoint", "export")
    for part in parts:
        targets = {t.removeprefix("minillava.") for t in GRAPH.get(f"minillava.{part}", ())}
        assert not targets & set(users), f"minillava.{part} imports {sorted(targets & set(users))}"
