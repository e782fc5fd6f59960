"""The package's floors: each layer imports only itself and the layers below it, and no module circles back.

Read from the source with ``ast`` (imports inside functions count too), so the check costs no imports.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "redheart_tune"

# lowest first; a module belongs to the first (longest) prefix that names it
LAYERS = [
    ("util",),
    ("model",),
    ("config", "layout"),
    ("data",),
    ("engine",),
    ("tune",),
    ("analysis",),
    ("pipeline",),
    ("cli",),
]


def module_name(path: Path) -> str:
    parts = ("redheart_tune",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "redheart_tune" or len(parts) == 1:
        return None  # the package root holds only __version__
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py's LAYERS")


def imports(path: Path) -> set[str]:
    """Every redheart_tune module ``path`` imports, at any depth of the file."""
    found = set()
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("redheart_tune"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("redheart_tune"):
                found.add(base)
                # ``from redheart_tune.x import y`` where y is a module counts as importing it
                found.update(f"{base}.{a.name}" for a in node.names if modules_by_name.get(f"{base}.{a.name}"))
    return found


modules_by_name = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {name: {m for m in imports(p) if m in modules_by_name and m != name} for name, p in modules_by_name.items()}


def test_every_module_sits_in_a_layer():
    assert len(modules_by_name) > 50
    for name in modules_by_name:
        layer_of(name)


def upward(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{name} (layer {LAYERS[layer_of(name)]}) imports {dep} (layer {LAYERS[layer_of(dep)]})"
        for name, deps in graph.items()
        for dep in deps
        if layer_of(name) is not None and layer_of(dep) is not None and layer_of(dep) > layer_of(name)
    ]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), a package importing its own
    submodules aside: ``engine/memory/__init__`` re-exporting ``engine.memory.plan`` is not a circle."""
    def edges(name):
        return {d for d in graph.get(name, ()) if not d.startswith(name + ".")}

    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_goes_up_a_floor():
    assert not upward(GRAPH), "\n".join(upward(GRAPH))


def test_no_import_circles():
    assert not circles(GRAPH), circles(GRAPH)


def test_the_checks_catch_what_they_look_for():
    """The checkers on a graph with one upward arrow and one circle, as the house had them before."""
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["redheart_tune.tune.resources"].add("redheart_tune.analysis.crossover")
    graph["redheart_tune.engine.memory.step"].add("redheart_tune.engine.loop")
    graph["redheart_tune.engine.loop"].add("redheart_tune.engine.memory.step")
    assert upward(graph) == [
        "redheart_tune.tune.resources (layer ('tune',)) imports redheart_tune.analysis.crossover "
        "(layer ('analysis',))"
    ]
    assert ["redheart_tune.engine.loop", "redheart_tune.engine.memory.step"] in circles(graph)
