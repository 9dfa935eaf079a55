"""The engine's modules import one another without cycles (run preparation lives in engine/launch.py,
which the CLI and the demos both call; the trainer knows nothing of its LLaVA subclass), and the CLI
module stays light: it imports no torch at start."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"


def engine_imports() -> dict[str, set[str]]:
    """module -> the engine modules it imports (at the top or inside functions)."""
    modules = {p.stem for p in ENGINE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for p in ENGINE.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    deps.add(node.module.split(".")[0])
                elif node.level == 1:
                    deps.update(a.name for a in node.names)
                elif node.module and node.module.startswith("engine."):
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("engine."))
        graph[p.stem] = {d for d in deps if d in modules and d != p.stem}
    return graph


def test_engine_modules_import_one_another_without_cycles():
    graph = engine_imports()
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in path:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    done: set[str] = set()
    for m in sorted(graph):
        if m not in done:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cli_module_imports_no_torch():
    code = "import sys, engine.cli; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ENGINE.parent).returncode == 0
