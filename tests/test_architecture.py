"""The package's shape: no import cycles, solvers layered without function-level imports, a thin CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import prism_plan

PACKAGE = Path(prism_plan.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, ast.AST]]:
    """(imported prism_plan module, node) for every import in the file, wherever it stands."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node) for a in node.names if a.name.startswith("prism_plan")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("prism_plan"):
            found.append((node.module, node))
    return found


def import_graph() -> dict[str, set[str]]:
    """prism_plan module -> the prism_plan modules it imports (a package import counts as its __init__)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m, _ in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_solvers_import_at_module_level_only():
    for path in (PACKAGE / "solvers").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"{path.name}: {fn.name} imports inside the function"


def test_no_private_solve_called_on_another_object():
    for path in (PACKAGE / "solvers").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "_solve" and isinstance(node.ctx, ast.Load):
                assert isinstance(node.value, ast.Name) and node.value.id == "self", f"{path.name}:{node.lineno}"


def test_cli_stays_thin():
    for name in ("cli.py", "cli_profile.py"):
        text = (PACKAGE / name).read_text()
        assert "numpy" not in text, name
        assert len(text.splitlines()) <= 300, name


def test_every_option_says_what_it_is():
    from prism_plan.cli import cli

    def commands(group, prefix=""):
        for name, cmd in group.commands.items():
            if hasattr(cmd, "commands"):
                yield from commands(cmd, f"{prefix}{name} ")
            else:
                yield prefix + name, cmd

    names = [name for name, _ in commands(cli)]
    assert names[:7] == ["profile run", "profile import", "profile tables", "profile drift", "profile convergence",
                         "solve", "migrate"]
    for name, cmd in commands(cli):
        for p in cmd.params:
            if p.param_type_name == "option" and p.name != "help":
                assert p.help, f"{name} {p.opts[0]} has no help"
        writes = any("--output" in p.opts for p in cmd.params)
        if writes:
            assert {"quiet", "as_json"} <= {p.name for p in cmd.params}, name
