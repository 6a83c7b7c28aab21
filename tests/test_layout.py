"""The package layout's rules, read off the source: the orchestrator does not import the figures
(except the CLI, which wires ``eac report`` to them), and no module reaches into another's private
(leading-underscore) names."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "workers", "experiments")


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST) -> list[str]:
    """Every module an ``import`` or ``from … import`` names, at any depth (local imports too)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_project_module(name: str) -> bool:
    return name.split(".")[0] in PACKAGES and importlib.util.find_spec(name) is not None


def dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of attribute reads on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def private_uses(path: Path) -> set[tuple[str, str]]:
    """(file, dotted name) for each private name of another project module that ``path`` imports or
    reads: ``from m import _x``, ``m._x`` and ``m.Class._x`` through a name bound to module m."""
    tree = ast.parse(path.read_text(), str(path))
    own = module_name(path)
    where = str(path.relative_to(ROOT))
    bound: dict[str, str] = {}  # local name -> what it stands for (a module, or a class of one)
    uses = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_project_module(alias.name):
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES and node.module != own:
            for alias in node.names:
                if is_private(alias.name):
                    uses.add((where, f"{node.module}.{alias.name}"))
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    defined = defined_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            chain = dotted(node)
            if chain is None:
                continue
            head, _, rest = chain.partition(".")
            if head in bound:
                if not bound[head].startswith(own + ".") and bound[head] != own:
                    uses.add((where, f"{bound[head]}.{rest}"))
            elif head not in ("self", "cls") and node.attr not in defined:  # another module's object
                uses.add((where, chain))
    return uses


def defined_names(tree: ast.AST) -> set[str]:
    """The names a module defines: functions, classes, assigned names and attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


def test_no_module_of_the_orchestrator_imports_the_experiments_except_the_cli():
    offenders = {}
    for path in sources("orchestrator"):
        if path.name == "cli.py":
            continue
        found = [name for name in imported_modules(ast.parse(path.read_text())) if name.split(".")[0] == "experiments"]
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}


def test_no_private_name_is_used_outside_its_module():
    uses = set().union(*(private_uses(path) for package in PACKAGES for path in sources(package)))
    assert uses == set()
