"""How narfs's modules may import each other: a command module (one that holds a `narfs COMMAND`,
as cli.COMMANDS names them) imports no other command module. What two commands share lives in
a module named for what it holds (catalog, retire, watchstate, quarantine, progress, ...), so a
change to one command cannot break another through a helper it happened to define."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import narfs
from narfs.cli import COMMANDS

PACKAGE = Path(narfs.__file__).parent


def narfs_imports(module: str) -> set[str]:
    """The narfs modules `module` imports, at any level (function-local imports too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("narfs."):
                found.add(node.module.split(".")[1])
            elif node.module == "narfs":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("narfs."))
    return {m for m in found if (PACKAGE / f"{m}.py").exists()} - {module}


def command_modules() -> set[str]:
    return {module.removeprefix("narfs.") for module, _ in COMMANDS.values()}


def cross_command_imports() -> list[tuple[str, str]]:
    commands = command_modules()
    return sorted((m, other) for m in commands for other in narfs_imports(m) & commands)


def test_command_modules_are_the_ones_cli_runs() -> None:
    # One string: a bare command name as a constant would mark this pure file `nix` (conftest).
    assert command_modules() == set("cli watch mount restore gc verify status ls doctor".split())


def test_no_command_imports_another() -> None:
    assert cross_command_imports() == []


def test_the_scan_sees_imports() -> None:
    """The scan finds each import form narfs uses (so an empty result above means something)."""
    assert {"cache", "config", "watchstate"} <= narfs_imports("doctor")  # from .x import y
    assert "quarantine" in narfs_imports("cli")  # from . import x, inside cmd_quarantine
    assert {"catalog", "retire"} <= narfs_imports("gc")


def test_the_code_map_names_every_module() -> None:
    """narfs/__init__.py's code map is where a newcomer starts: a new module goes in it."""
    words = set(narfs.__doc__.replace(",", " ").split())
    missing = sorted(p.stem for p in PACKAGE.glob("*.py")
                     if p.stem != "__init__" and p.stem not in words)
    assert missing == []


def code_map() -> list[list[str]]:
    """The module names of each group of narfs/__init__.py's code map, lowest group first."""
    groups: list[list[str]] = []
    for line in (narfs.__doc__ or "").split("\n")[4:]:
        if line and not line.startswith(" "):
            groups.append([])
        elif line.startswith("    ") and not line.startswith("     "):
            names = re.split(r"\s{2,}", line.strip())[0]
            groups[-1] += [n for n in re.split(r"[ ,]+", names) if (PACKAGE / f"{n}.py").exists()]
    return groups


def test_no_module_imports_from_a_later_group_of_the_code_map() -> None:
    rank = {m: i for i, group in enumerate(code_map()) for m in group}
    assert len(rank) >= 30
    upward = sorted((m, other) for m in rank for other in narfs_imports(m)
                    if rank.get(other, len(rank)) > rank[m])
    assert upward == []
