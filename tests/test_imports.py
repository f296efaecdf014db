"""The import graph of `flows`, `tasks` and `peft_modules`: no cycles (lazy imports inside
functions count too: they only hide a cycle from Python, not from a reader), dependencies that
point one way (flows → tasks → peft_modules), no private name imported across modules, and every
package listed in pyproject.toml so that a wheel ships it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
OURS = ("flows", "tasks", "peft_modules")
LAYER = {"peft_modules": 0, "tasks": 1, "flows": 2}  # an import may point down or sideways only


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for top in OURS for p in sorted((ROOT / top).rglob("*.py"))}


def imports_of(path: Path, known: dict[str, Path]) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, names taken from it) for every import of ours, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name.split(".")[0] in OURS]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in OURS:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.append((sub, node.lineno, []) if sub in known else (node.module, node.lineno, [a.name]))
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: {target for target, _, _ in imports_of(p, known) if target != m} for m, p in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle():
    assert cycles(graph()) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    """The oracle of the test above, on a hand-made graph: a → b → c → a, and d alone."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_point_down():
    known = modules()
    up = [f"{m} imports {t} (line {line})" for m, p in known.items()
          for t, line, _ in imports_of(p, known) if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]]]
    assert up == []


def test_no_private_name_is_imported_across_modules():
    known = modules()
    private = [f"{m}:{line} takes {n} from {t}" for m, p in known.items()
               for t, line, taken in imports_of(p, known) for n in taken
               if n.startswith("_") and n != "__version__"]
    assert private == []


def test_peft_modules_never_import_prefect_or_mlflow_and_bitsandbytes_only_in_quant():
    found = []
    for path in sorted((ROOT / "peft_modules").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                if top in ("prefect", "mlflow") or (top == "bitsandbytes" and path.name != "quant.py"):
                    found.append(f"{path.relative_to(ROOT)}: {name}")
    assert found == []


def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {module_name(p) for top in OURS for p in (ROOT / top).rglob("__init__.py")}
    assert packages - listed == set()


@pytest.mark.parametrize("package", sorted({module_name(p) for top in OURS
                                            for p in (ROOT / top).rglob("__init__.py")}))
def test_every_package_says_what_lives_in_it(package):
    doc = ast.get_docstring(ast.parse(modules()[package].read_text()))
    assert doc and "TODO" not in doc, f"{package}/__init__.py has no docstring"


def calls_outside_tracking(names: set[str]) -> list[str]:
    """`x.NAME(...)` or `NAME(...)` for NAME in `names`, in our modules outside tasks/tracking/."""
    found = []
    for m, path in modules().items():
        if m.startswith("tasks.tracking"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
                if name in names:
                    found.append(f"{m}:{node.lineno} calls {name}")
    return found


def test_only_the_tracking_layer_creates_runs_searches_them_or_makes_a_client():
    assert calls_outside_tracking({"create_run", "search_runs", "MlflowClient"}) == []


def package_of(module: str) -> str:
    """tasks.tracking.store -> tasks.tracking; tasks.train -> tasks.train (a stage is its own)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def test_the_sub_packages_form_a_layered_graph():
    """Beyond modules: no two packages import each other, even through different modules
    (config → tracking and tracking → config would make the house unwalkable again)."""
    edges: dict[str, set[str]] = {}
    for m, targets in graph().items():
        edges.setdefault(package_of(m), set()).update(
            package_of(t) for t in targets if package_of(t) != package_of(m))
    assert cycles(edges) == []
