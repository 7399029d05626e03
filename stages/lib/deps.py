"""The code a stage runs: its module and the ``stages.*`` modules it imports,
transitively. One source of truth for two copies of that fact: the code
fingerprint that decides whether a persisted checkpoint may resume
(``tracking.stage_code_digest``) and the ``deps:`` of ``dvc.yaml`` (a test
checks that every stage lists exactly these files)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the directory that holds the ``stages`` package


def _module_path(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """``stages.*`` modules named by the import statements of one file (also
    ``from stages.lib import x``, where ``x`` is a module)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.startswith("stages.") and _module_path(n) is not None}


def stage_files(module: str) -> list[str]:
    """Paths (relative to the repository root, sorted) of ``module`` and of
    every ``stages.*`` module it imports, directly or not; package
    ``__init__`` files are left out (they hold no code)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_path(name)
        if path is None:
            raise ModuleNotFoundError(f"no source file for {name}")
        todo.extend(_imports(path) - seen)
    paths = (_module_path(n) for n in seen)
    return sorted(p.relative_to(ROOT).as_posix() for p in paths if p.name != "__init__.py")
