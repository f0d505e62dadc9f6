"""The package as a whole: imports flow one way, and ``import lorakit`` stays light.

The import graph is read from the source (``ast``), function-local imports included, so a cycle cannot hide
inside a function. Imports under ``if TYPE_CHECKING:`` never run and are left out.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lorakit"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _layers() -> list[list[str]]:
    """The layer diagram of docs/architecture.md (its ```layers block), bottom layer first: the one place the
    layering is written down. Each line is ``N  name/  name/  module.py ...``."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    block = text.split("```layers\n", 1)[1].split("```", 1)[0]
    rows = {}
    for line in block.splitlines():
        match = re.match(r"\s*(\d+)\s+(.+)", line)
        if match:
            rows[int(match[1])] = [n.rstrip("/").removesuffix(".py") for n in match[2].split()]
    assert sorted(rows) == list(range(len(rows))), f"{ARCHITECTURE}: layers must be numbered 0..N, got {sorted(rows)}"
    return [rows[i] for i in range(len(rows))]


# Each folder (or top-level module) may import its own modules and those of the layers below, never above; two
# folders of one layer do not import each other (the server does not import the trainer). No cycles anywhere.
LEVELS = _layers()
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}
# torch, safetensors and pyyaml are lorakit's dependencies (yaml: the model card's header). bitsandbytes is imported
# by quant only when used; gguf (and numpy, its arrays) by gguf_export only when writing a GGUF file, and gguf_export
# itself only when one is asked for.
CORE_THIRD_PARTY = {"torch", "safetensors", "yaml", "bitsandbytes", "gguf", "numpy"}
LIGHT_LAYERS = ("core", "files")  # LoRA itself and its files: only the dependencies above


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[str]:
    """Absolute names of every module ``path`` imports, anywhere in the file but under ``if TYPE_CHECKING:``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from . import x" / "from .pkg import mod" may name submodules: record both spellings
            found.append(prefix)
            found.extend(f"{prefix}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        if name == "lorakit":  # the package's front door re-exports; it is not a layer
            continue
        graph[name] = {dep for dep in _imports(path) if dep in files and dep != name and dep != "lorakit"}
    return graph


def _is_folder(module: str) -> bool:
    return (PACKAGE / _top(module)).is_dir()


def _top(module: str) -> str:
    return module.split(".")[1]


def test_every_module_has_a_level():
    on_disk = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").is_file()}
    assert not on_disk - LEVEL.keys(), f"in lorakit/ but not in {ARCHITECTURE}'s layers: {sorted(on_disk - LEVEL.keys())}"
    assert not LEVEL.keys() - on_disk, f"in {ARCHITECTURE}'s layers but not in lorakit/: {sorted(LEVEL.keys() - on_disk)}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                walk(dep, stack + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" → ".join(c) for c in cycles)


def test_imports_only_point_down():
    upward = [f"{m} (layer {LEVEL[_top(m)]}) imports {d} (layer {LEVEL[_top(d)]})"
              for m, deps in _graph().items() for d in deps if LEVEL[_top(d)] > LEVEL[_top(m)]]
    assert not upward, "\n".join(upward)


def test_folders_of_one_layer_do_not_import_each_other():
    sideways = [f"{m} imports {d} (both layer {LEVEL[_top(m)]})" for m, deps in _graph().items() for d in deps
                if _top(d) != _top(m) and LEVEL[_top(d)] == LEVEL[_top(m)] and _is_folder(m) and _is_folder(d)]
    assert not sideways, "\n".join(sideways)


def test_no_module_imports_a_private_name_of_another():
    private = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("lorakit")):
                private += [f"{path.relative_to(PACKAGE.parent)}: {alias.name}" for alias in node.names
                            if alias.name.startswith("_") and alias.name != "__version__"]
    assert not private, private


@pytest.mark.parametrize("layer", LIGHT_LAYERS)
def test_the_core_imports_only_its_dependencies(layer):
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for path in (PACKAGE / layer).rglob("*.py"):
        outside = {dep.split(".")[0] for dep in _imports(path) if not dep.startswith("lorakit")} \
            - stdlib - CORE_THIRD_PARTY
        assert not outside, f"{path.relative_to(ROOT)} imports {sorted(outside)}"


@pytest.mark.parametrize("heavy", ["transformers", "lorakit.training", "lorakit.serve", "peft", "bitsandbytes"])
def test_import_lorakit_stays_light(heavy):
    code = f"import sys, lorakit; print({heavy!r} in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


def test_the_public_names_import_from_the_package():
    from lorakit import LoraConfig, LoraModel, TrainConfig, find_targets, get_lora_model, quantize, train
    from lorakit.training import TrainConfig as TrainingConfig
    from lorakit.training import train as training_train

    assert TrainConfig is TrainingConfig and train is training_train
    assert callable(get_lora_model) and callable(find_targets) and callable(quantize)
    assert LoraModel.__name__ == "LoraModel" and LoraConfig().r == 8
