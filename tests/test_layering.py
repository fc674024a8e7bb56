"""The package's layers hold: read from every module's imports (docs/design/layers.md)."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxprune")

# Lowest first: a module may import its own level (without a cycle) and the levels below.
LAYERS = (
    ("errors", "jsonio"),                 # one-line errors, the run's JSON files
    ("kernels", "distill"),               # pure jnp math of the papers (and the KD loss)
    ("optim",),                           # optax transforms, the leaf selection
    ("graph",),                           # the jaxpr interpreter, the channel graph
    ("flops", "latency"),                 # costs: FLOPs/params, measured time
    ("surgery",),                         # removing channels from any model
    ("search",),                          # TAS search spaces
    ("models",),                          # example networks
    ("engine",),                          # processes, mesh, steps, checkpoints, the loop
    ("data", "plots"),                    # input pipelines (processes: engine), figures
    ("methods", "config_lib"),            # the recipes and their configs
    ("main",),                            # the command line
    ("",),                                # the package itself (jaxprune/__init__.py)
)
LEVEL = {unit: i for i, units in enumerate(LAYERS) for unit in units}

# Violations still in the tree, each with the area that removes it (issue 25). Must shrink
# to empty: an entry that no longer occurs fails the test too (remove it).
KNOWN = {
}

# NamedTuple's public API starts with an underscore.
_PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}


def _private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__") and name not in _PUBLIC_UNDERSCORE


def scan(root: str = ROOT):
  """``(modules, packages, imports)`` of the package at ``root``: ``imports[m]`` lists
  ``(target module, [imported names], [private attributes read from it])`` for every
  import statement in ``m``, function-local ones included."""
  modules, packages, sources = set(), set(), {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      if not f.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(root))[:-3]
      name = rel.replace(os.sep, ".")
      if name.endswith(".__init__"):
        name = name[:-len(".__init__")]
        packages.add(name)
      modules.add(name)
      with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
        sources[name] = fh.read()
  imports = {m: parse(m, src, modules, m in packages) for m, src in sources.items()}
  return modules, packages, imports


def parse(module: str, source: str, modules, is_package: bool = False):
  """The jaxprune imports of one module's source (see :func:`scan`)."""
  tree = ast.parse(source)
  out, aliases = [], {}
  base = module if is_package else module.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.split(".")[0] == "jaxprune":
          out.append([a.name, [], []])
          if a.asname:
            aliases[a.asname] = len(out) - 1
    elif isinstance(node, ast.ImportFrom):
      target = node.module or ""
      if node.level:
        parts = base.split(".")
        parts = parts[:len(parts) - node.level + 1]
        target = ".".join(parts + ([node.module] if node.module else []))
      if target.split(".")[0] != "jaxprune":
        continue
      names = []
      for a in node.names:
        sub = f"{target}.{a.name}"
        if sub in modules:  # a submodule: an import of that module
          out.append([sub, [], []])
          aliases[a.asname or a.name] = len(out) - 1
        else:
          names.append(a.name)
      if names:
        out.append([target, names, []])
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases and _private(node.attr)):
      out[aliases[node.value.id]][2].append(node.attr)
  return [(t, n, p) for t, n, p in out]


def unit(module: str) -> str:
  """The layer unit of a module: ``jaxprune.X`` -> ``X`` (``""`` for the package)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def edges(module: str, target: str, packages) -> list[str]:
  """The modules that importing ``target`` from ``module`` runs: ``target`` and the
  packages above it that are not already being imported (``module``'s own)."""
  parts = target.split(".")
  out = [target]
  for i in range(2, len(parts)):
    parent = ".".join(parts[:i])
    if parent in packages and not (module + ".").startswith(parent + "."):
      out.append(parent)
  return out


def violations(modules, packages, imports, layers=LEVEL) -> set[tuple[str, str, str]]:
  """``(kind, importer, imported)`` for every wrong-way import ("layer"), cycle
  ("cycle": importer and one module of the cycle) and private name imported across
  modules ("private": the name after the module)."""
  found = set()
  graph = {m: set() for m in modules}
  for m, rows in imports.items():
    for target, names, private in rows:
      if target not in modules:
        found.add(("missing", m, target))
        continue
      if target != m:
        for name in names + private:
          if _private(name):
            found.add(("private", m, f"{target}.{name}"))
      for t in edges(m, target, packages):
        if t == m:
          continue
        graph[m].add(t)
        a, b = unit(m), unit(t)
        if a not in layers or b not in layers:
          found.add(("unlayered", m, t))
        elif layers[b] > layers[a]:
          found.add(("layer", m, t))
  # Cycles among modules, and among units (two units of a level that import each other).
  for nodes, succ in ((graph, graph),
                      _units(graph)):
    for cycle in _cycles(nodes, succ):
      found.add(("cycle", cycle[0], " -> ".join(cycle)))
  return found


def _units(graph):
  g = {}
  for m, ts in graph.items():
    g.setdefault(unit(m), set()).update(unit(t) for t in ts if unit(t) != unit(m))
  return g, g


def _cycles(nodes, succ) -> list[list[str]]:
  """One cycle per strongly connected component with more than one node (Tarjan),
  given from its smallest node."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in sorted(succ.get(v, ())):
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
        out.append(_path(min(comp), set(comp), succ))

  for v in sorted(nodes):
    if v not in index:
      visit(v)
  return out


def _path(start, comp, succ) -> list[str]:
  """A shortest cycle through ``start`` inside ``comp`` (breadth first)."""
  prev, frontier = {start: None}, [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w in sorted(succ.get(v, ())):
        if w == start:
          path = [v]
          while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
          return path[::-1] + [start]
        if w in comp and w not in prev:
          prev[w] = v
          nxt.append(w)
    frontier = nxt
  raise AssertionError(f"no cycle through {start}")


def test_every_unit_of_the_package_has_a_layer():
  modules, _, _ = scan()
  assert {unit(m) for m in modules} <= set(LEVEL), sorted({unit(m) for m in modules} - set(LEVEL))


def test_imports_follow_the_layers_without_cycles_or_private_names():
  found = violations(*scan())
  new = sorted(v for v in found if v not in KNOWN)
  fixed = sorted(v for v in KNOWN if v not in found)
  assert not new, "imports against docs/design/layers.md:\n" + "\n".join(map(str, new))
  assert not fixed, "fixed (remove from KNOWN in tests/test_layering.py):\n" + "\n".join(
      map(str, fixed))


# The checker on small synthetic packages: it finds what it must, and only that.
_SYNTH = {
    "jaxprune": "",
    "jaxprune.errors": "",
    "jaxprune.graph": "from jaxprune.graph.walk import Walk\n",
    "jaxprune.graph.walk": "from jaxprune import errors\n",
    "jaxprune.surgery": "from jaxprune.surgery import cut\n",
    "jaxprune.surgery.cut": "from jaxprune.graph import Walk\nfrom jaxprune.graph import walk\n",
    "jaxprune.engine": "",
    "jaxprune.engine.loop": "import jaxprune.data\n",
    "jaxprune.data": "",
}
_SYNTH_LAYERS = {"": 9, "errors": 0, "graph": 1, "surgery": 2, "data": 3, "engine": 3}


def _synthetic(extra: dict[str, str]):
  sources = {**_SYNTH, **extra}
  modules = set(sources)
  packages = {m for m in modules if any(o.startswith(m + ".") for o in modules)}
  imports = {m: parse(m, s, modules, m in packages) for m, s in sources.items()}
  return violations(modules, packages, imports, _SYNTH_LAYERS)


def test_checker_passes_a_clean_package():
  assert _synthetic({}) == set()


def test_checker_finds_a_wrong_way_import_at_any_depth():
  src = "def f():\n  from jaxprune.surgery import cut\n  return cut\n"
  assert _synthetic({"jaxprune.graph.walk": src}) >= {
      ("layer", "jaxprune.graph.walk", "jaxprune.surgery.cut"),
      ("layer", "jaxprune.graph.walk", "jaxprune.surgery")}
  assert _synthetic({"jaxprune.errors": "import jaxprune.graph.walk as w\n"}) >= {
      ("layer", "jaxprune.errors", "jaxprune.graph.walk")}


def test_checker_finds_a_cycle_through_a_package_init():
  # data -> engine/__init__ (run by importing engine.x) -> engine.loop -> data.
  found = _synthetic({"jaxprune.data": "from jaxprune.engine import mesh\n",
                      "jaxprune.engine": "from jaxprune.engine import loop\n",
                      "jaxprune.engine.mesh": ""})
  cycles = {v[2] for v in found if v[0] == "cycle"}
  assert "jaxprune.data -> jaxprune.engine -> jaxprune.engine.loop -> jaxprune.data" in cycles
  assert "data -> engine -> data" in cycles
  assert {v[0] for v in found} == {"cycle"}


def test_checker_finds_private_names_imported_or_read_across_modules():
  found = _synthetic({
      "jaxprune.graph.walk": "_step = 1\n",
      "jaxprune.surgery.cut": ("from jaxprune.graph.walk import _step\n"
                               "from jaxprune.graph import walk as w\n"
                               "x = w._step + w._replace\n")})
  assert found == {("private", "jaxprune.surgery.cut", "jaxprune.graph.walk._step")}
  # A module's own private names are its own.
  assert _synthetic({"jaxprune.graph": "from jaxprune.graph.walk import Walk\n_a = 1\n",
                     "jaxprune.graph.walk": "def f():\n  from jaxprune.graph import walk\n"
                                            "  return walk._g\n"}) == set()


@pytest.mark.parametrize("source", ["from . import walk\n", "from .walk import Walk\n"])
def test_checker_resolves_relative_imports(source):
  found = _synthetic({"jaxprune.errors": "", "jaxprune.graph.walk": "",
                      "jaxprune.surgery.cut": "", "jaxprune.graph": source})
  assert found == set()
  found = _synthetic({"jaxprune.surgery.cut": "", "jaxprune.errors": "",
                      "jaxprune.graph.walk": "from ..surgery import cut\n"})
  assert ("layer", "jaxprune.graph.walk", "jaxprune.surgery.cut") in found
