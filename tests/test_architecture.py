"""The shape of the package: imports go down the layers, no cycles, short functions.

The layers, lowest first, are the reading order of ``src/ddpm_cars/`` (see the README's
Architecture section). A module may import its own layer and the layers below it; the
test walks every import statement, those inside functions included. Nothing in the
package imports the studies beside it (``studies/``): the wheel ships without them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "ddpm_cars"

LAYERS = [
    {"errors", "files", "validation", "config", "presets", "caches"},
    {"schedule", "runtime", "conditioning"},
    {"diffusion", "models"},
    {"denoiser"},
    {"samplers", "distillation"},
    {"editing", "generation"},
    {"data", "viz"},
    {"run", "parallel"},
    {"evaluation", "report", "export"},
    {"training"},
    {"benchmarks", "commands"},
    {"cli", "__main__", "__init__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
# edges forbidden even within a layer
FORBIDDEN = {("models", "diffusion"), ("models", "schedule"), ("conditioning", "schedule")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _imports(path: Path) -> set[str]:
    """The ddpm_cars modules ``path`` imports (``a.b`` for ``ddpm_cars.a.b``), anywhere in it."""
    module = _module_name(path)
    package = module.split(".")[:-1] if path.name != "__init__.py" else module.split(".")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.removeprefix("ddpm_cars.") for a in node.names if a.name.startswith("ddpm_cars.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("ddpm_cars"):
                target = node.module.removeprefix("ddpm_cars").lstrip(".")
            else:
                continue
            for alias in node.names:  # `from ddpm_cars import run` names a module
                sub = f"{target}.{alias.name}" if target else alias.name
                found.add(
                    sub
                    if (SRC / sub.replace(".", "/")).with_suffix(".py").is_file()
                    or (SRC / sub.replace(".", "/")).is_dir()
                    else target
                )
    return {f for f in found if f}


def _absolute_imports(source: str) -> set[str]:
    """The top-level names of the absolute imports in ``source`` (``a`` for ``import a.b``
    and ``from a.b import c``), those inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module.split(".")[0])
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _unit(module: str) -> str:
    return module.split(".")[0]


def test_every_module_is_in_a_layer():
    assert {_unit(m) for m in _graph()} <= set(RANK)


def test_imports_go_down_the_layers():
    wrong = [
        f"{m} imports {t}"
        for m, targets in _graph().items()
        for t in targets
        if _unit(t) != _unit(m) and (RANK[_unit(t)] > RANK[_unit(m)] or (_unit(m), _unit(t)) in FORBIDDEN)
    ]
    assert not wrong, "\n".join(wrong)


def test_no_lower_module_imports_training():
    for module, targets in _graph().items():
        if _unit(module) in ("evaluation", "models", "samplers", "editing", "generation", "report", "run", "parallel"):
            assert not [t for t in targets if _unit(t) == "training"], module


def test_the_package_has_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(nxt) :] + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_the_package_does_not_import_the_studies():
    wrong = [
        p.relative_to(SRC).as_posix()
        for p in sorted(SRC.rglob("*.py"))
        if "studies" in _absolute_imports(p.read_text())
    ]
    assert not wrong, "the installed package has no studies/ to import: " + ", ".join(wrong)
    assert _absolute_imports("def f():\n    from studies.sampler_quality import main\n") == {"studies"}
    assert _absolute_imports("import studies.throughput as t\nfrom .studies import x\n") == {"studies"}


def test_the_walk_sees_nested_and_aliased_imports():
    graph = _graph()
    assert "run" in graph["commands.training"] and "parallel" in graph["commands.training"]  # `import run as ckpt`
    assert "generation" in graph["parallel"]  # imported inside generate_across_ranks


def test_no_function_is_longer_than_60_lines():
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(
                    f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                )
    assert not long, "\n".join(long)


MAX_PARAMETERS = 8  # settings that travel together become one value (a sampler's settings, an edit request)


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The names a call may pass: positional, keyword-only, ``*args`` and ``**kwargs``, not ``self``/``cls``."""
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return names[1:] if names[:1] in (["self"], ["cls"]) else names


def test_no_function_takes_more_than_8_parameters():
    wide = [
        f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({len(_parameters(node))}: {', '.join(_parameters(node))})"
        for path in sorted(SRC.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(_parameters(node)) > MAX_PARAMETERS
    ]
    assert not wide, "\n".join(wide)


def test_the_parameter_count_sees_every_kind_of_parameter():
    (fn,) = ast.parse("def f(self, a, /, b, *rest, c, d=1, **more): pass").body
    assert _parameters(fn) == ["a", "b", "c", "d", "rest", "more"]
    (fn,) = ast.parse("def g(x, y): pass").body
    assert _parameters(fn) == ["x", "y"]


def test_only_the_command_line_knows_argparse():
    """Commands are functions of typed requests: only ``cli.py`` parses."""
    knows = [
        p.relative_to(SRC).as_posix()
        for p in sorted(SRC.rglob("*.py"))
        if "argparse" in _absolute_imports(p.read_text())
    ]
    assert knows == ["cli.py"]


def test_the_checkpoint_loading_sequence_exists_once():
    """Config, network, weights: only ``Run`` puts them together."""
    places = [p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if "load_weights(build_model(" in p.read_text()]
    assert places == ["run.py"]
