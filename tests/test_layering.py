"""The library's import graph has no loops: modules read top-down (registry above policies and
vision, FASA's calibration file format below the command that runs the model, the eval
harness's sample types below task builders and dataset loaders)."""

import ast
from pathlib import Path

import tokaccel

PACKAGE = Path(tokaccel.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of tokaccel (the kernels through tokaccel/kernels)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")) + sorted((PACKAGE / "kernels").glob("*.py")):
        parts = ["tokaccel", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the tokaccel modules importing it runs: its module-level imports, each resolved to
    the most specific module (`from . import x` is x when x is a module), plus the packages above a
    target that the importer is not inside (importing p.x from outside p runs p's __init__ first;
    a package's own __init__ importing its children is not a loop). Imports inside functions are
    deliberate lazy edges and not counted; tokaccel itself (the root) is left out."""
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name if name and name != "tokaccel" else None

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                targets.update(known(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    targets.add(known(f"{base}.{alias.name}") or known(base))
        own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        above = set()
        for target in filter(None, targets):
            parts = target.split(".")
            above.update(".".join(parts[:i]) for i in range(2, len(parts)))
        graph[name] = {t for t in (targets | above) - own_packages if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_finds_a_planted_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_loops_inside_tokaccel():
    graph = import_graph()
    assert len(graph) > 80 and "tokaccel.kernels.ops" in graph
    assert "tokaccel.registry" in graph["tokaccel.patch"]
    assert cycles(graph) == []


def test_registry_sits_above_policies_and_vision():
    graph = import_graph()
    below = [m for m in graph if m.startswith(("tokaccel.policies", "tokaccel.vision"))]
    assert not [m for m in below if "tokaccel.registry" in graph[m]]
    assert not [m for m in graph if m.startswith("tokaccel.policies") and any(
        t.startswith("tokaccel.vision") or t == "tokaccel.calibrate" for t in graph[m])]


def private_reads(source: str, own: str) -> list[str]:
    """Private names (one leading underscore) that module `own` takes from other tokaccel modules:
    `from tokaccel.x import _name` (imports anywhere, lazy ones included) and `alias._name` where
    alias is a tokaccel module the code imported (`import tokaccel.x as alias`, `from . import x`).
    Names inside `own` itself are its own business."""
    found, aliases = [], {}
    package = own if own.endswith("__init__") else own.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if not base.startswith("tokaccel") or base == own:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"from {base} import {alias.name}")
                aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tokaccel") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and node.attr.startswith("_") and not node.attr.startswith("__"):
            found.append(f"{node.value.id}.{node.attr}")
    return found


def test_the_private_name_scan_finds_planted_reads():
    source = "from tokaccel.policies.engine import _secret\nfrom .cache import ok\nfrom . import rope\nrope._table\n"
    assert private_reads(source, "tokaccel.patch") == ["from tokaccel.policies.engine import _secret", "rope._table"]
    assert private_reads("from ._impl import thing\n", "tokaccel.kernels.ops") == []  # a private module's public name


def test_no_module_reads_another_modules_private_names():
    reads = {name: private_reads(path.read_text(encoding="utf-8"), name) for name, path in _modules().items()}
    assert {name: found for name, found in reads.items() if found} == {}
