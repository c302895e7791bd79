"""The shape of the code (issue 19): one dependency direction between launcher/ and dpo_ds/, no import cycle
among dpo_ds's modules, and no module so big that it mixes jobs."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAX_LINES = 500


def _modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every module of `package` (a package is named by its __init__)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `path` imports at module level (imports inside functions run later and
    cannot form a cycle at import time)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_launcher_never_imports_dpo_ds():
    offenders = [f"{path.relative_to(REPO)}:{node.lineno}"
                 for path in sorted((REPO / "launcher").rglob("*.py"))
                 for node in ast.walk(ast.parse(path.read_text()))
                 if (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "dpo_ds" for a in node.names))
                 or (isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dpo_ds")]
    assert offenders == [], f"launcher/ imports dpo_ds (dpo_ds builds on launcher, not the reverse): {offenders}"


def test_no_import_cycle_in_dpo_ds():
    modules = _modules("dpo_ds")
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == [], f"import cycles: {cycles}"


def test_no_module_over_the_size_limit():
    big = {str(path.relative_to(REPO)): n for path in _modules("dpo_ds").values()
           if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert big == {}, f"modules over {MAX_LINES} lines (split them along their jobs): {big}"
