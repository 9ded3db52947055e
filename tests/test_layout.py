"""The package's shape: every module imports, no import cycle anywhere (lazy imports inside functions included), and
model.py stays the reference Llama (small, importing nothing of LoRA or the speed paths)."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "preflexor"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """preflexor modules `name` imports anywhere in its source (`from preflexor.x import y` counts x.y when that is
    a module, else x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("preflexor"):
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or ({node.module} & known)
    return out - {name}


def test_every_module_imports_and_there_is_no_import_cycle():
    mods = _modules()
    for name in mods:
        importlib.import_module(name)
    graph = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert "preflexor.train" not in mods and "preflexor.evaluate" not in mods  # drivers live at the top level


def test_model_is_the_reference_llama():
    mods = _modules()
    deps = _imports("preflexor.model", mods["preflexor.model"], set(mods))
    assert deps == set(), deps
    assert len((PKG / "model.py").read_text().splitlines()) <= 350
