"""Every ```python block of docs/ runs, and every command line in README.md and docs/ is valid.

A page's blocks run in order in one namespace, as a reader pastes them into one session. A block
right after a line `<!-- not run: REASON -->` is skipped (the reason must be given). The
command lines (`python -m jaxprune.main --config X[:args] --config.key=value ...`) are parsed by
the CLI's own config machinery (ml_collections' config flags) and checked by
`config_lib.validate` and the recipe's own `validate`, without running the job. Figures are not
pinned here: measured results live in docs/results.md with their commands.
"""
import importlib
import importlib.util
import re
import shlex

from absl import flags
from ml_collections import config_flags
import pytest

from conftest import REPO, sweep

from jaxprune import config_lib
from jaxprune import methods

# docs/transformers.md's block runs in tests/test_docs_transformers.py (which also checks
# its printed output); README.md's in tests/test_readme.py.
RUN_ELSEWHERE = {"transformers.md"}
# The pages whose examples compile many networks (~10-25 s each) run in the full suite only.
QUICK_PAGES = {p.relative_to(REPO).as_posix() for p in (REPO / "docs").rglob("*.md")} - {
    "docs/library.md", "docs/your_model.md"}
PAGES = sorted(p for p in (REPO / "docs").rglob("*.md"))
SKIP = re.compile(r"<!-- not run: (.*?) -->\s*$")


def python_blocks(path):
  """``(first line number, code, skip reason or None)`` of each ```python block."""
  lines = path.read_text().split("\n")
  blocks, i = [], 0
  while i < len(lines):
    if lines[i].strip() == "```python":
      start, j = i + 1, i + 1
      while lines[j].strip() != "```":
        j += 1
      prev = next((l for l in reversed(lines[:i]) if l.strip()), "")
      skip = SKIP.search(prev)
      blocks.append((start, "\n".join(lines[start:j]), skip.group(1).strip() if skip else None))
      i = j
    i += 1
  return blocks


def run_page(path, name):
  """Runs the page's blocks in one namespace; tracebacks point at the page's own lines."""
  namespace = {"__name__": "docs_example"}
  for start, code, skip in python_blocks(path):
    if skip is not None:
      assert skip, f"{path}:{start}: a skipped block must say why"
      continue
    compiled = compile("\n" * start + code, name, "exec")
    exec(compiled, namespace)  # pylint: disable=exec-used
  return namespace


@pytest.mark.parametrize("page", sweep([p.relative_to(REPO).as_posix() for p in PAGES
                                        if p.name not in RUN_ELSEWHERE],
                                       QUICK_PAGES))
def test_docs_python_blocks_run(page):
  run_page(REPO / page, page)


def command_lines(text):
  """Every ``--config configs/...`` command in ```bash blocks and `inline code`."""
  found = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    joined = re.sub(r"\\\n\s*", " ", block)
    found += [line for line in joined.split("\n") if "--config configs/" in line]
  for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
    if "--config configs/" in span:
      found.append(span)
  # Placeholders such as configs/<recipe>.py name no config.
  return [line.split(" #", 1)[0] for line in found if "<" not in line.split("--config ")[1]]


def all_commands():
  for page in [REPO / "README.md", *PAGES]:
    for line in command_lines(page.read_text()):
      yield page.relative_to(REPO).as_posix(), line


def check_command(line):
  """Parses ``line``'s --config and --config.key=value as `python -m jaxprune.main` does."""
  tokens = shlex.split(line)
  start = tokens.index("--config")
  config = tokens[start + 1]
  overrides = [t for t in tokens[start + 2:] if t.startswith("--config.")]
  argv = ["jaxprune", f"--config={config}", *overrides]
  values = flags.FlagValues()
  # sys_argv: config_flags defines the --config.key flags it finds there.
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  config_lib.validate(values.config)  # the checks every recipe shares, then the recipe's own
  recipe = importlib.import_module(methods.RECIPES[values.config.method])
  if hasattr(recipe, "validate"):
    recipe.validate(values.config)
  return values.config


COMMANDS = sorted(set(all_commands()))


def test_docs_name_commands():
  pages = {page for page, _ in COMMANDS}
  assert "README.md" in pages and "docs/cli.md" in pages
  assert len(COMMANDS) >= 20


@pytest.mark.parametrize("page,line", COMMANDS)
def test_docs_command_parses_with_valid_keys(page, line, monkeypatch):
  monkeypatch.chdir(REPO)  # configs/ paths are relative to the repository root
  config = check_command(line)
  assert config.method in {"baseline", "tas", "ista", "prune", "dnw", "autoprune"}, page
  if ":" in config.model.name:  # a user's factory, from PYTHONPATH=tests in the docs
    module, factory = config.model.name.split(":")
    assert line.startswith("PYTHONPATH=tests "), line
    assert callable(getattr(importlib.import_module(module), factory)), line


def test_command_check_rejects_an_unknown_key(monkeypatch):
  monkeypatch.chdir(REPO)
  with pytest.raises(Exception, match="trian"):
    check_command("python -m jaxprune.main --config configs/tas_resnet.py:smoke "
                  "--config.trian.epochs=3 --workdir /tmp/x")
  with pytest.raises(Exception):
    check_command("python -m jaxprune.main --config configs/tas_resnet.py:smoke "
                  "--config.train.learning_rate=-1 --workdir /tmp/x")


def test_docs_links_resolve():
  """Every relative link of README.md and docs/ names a file of the repository."""
  for page in [REPO / "README.md", *PAGES]:
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
      if "://" in target:
        continue
      assert (page.parent / target).exists(), f"{page.relative_to(REPO)}: {target}"


def test_every_cited_section_exists():
  """Code citing ``<method>.md §n`` finds that § heading in docs/methods/<method>.md."""
  headings = {}
  for page in (REPO / "docs" / "methods").glob("*.md"):
    headings[page.name] = set(re.findall(r"^#+ §(\d+)", page.read_text(), re.M))
  cited = []
  for path in [*(REPO / "jaxprune").rglob("*.py"), *(REPO / "configs").glob("*.py"),
               *(REPO / "benchmarks").glob("*.py"), *(REPO / "tests").rglob("*.py")]:
    for doc, sections in re.findall(r"(tas|ista|dnw|autoprune)\.md,? (§[\d§, -]+)",
                                    path.read_text()):
      for number in re.findall(r"\d+", sections):
        cited.append((path.relative_to(REPO).as_posix(), f"{doc}.md", number))
  assert cited
  missing = [c for c in cited if c[2] not in headings[c[1]]]
  assert not missing, missing


def test_version_is_defined_once():
  """setup.py reads ``jaxprune.__version__``; no second copy of the number."""
  import jaxprune  # pylint: disable=g-import-not-at-top
  assert re.fullmatch(r"\d+\.\d+\.\d+", jaxprune.__version__)
  setup = (REPO / "setup.py").read_text()
  assert jaxprune.__version__ not in setup and "__version__" in setup


def test_package_docstring_names_every_subpackage():
  import jaxprune  # pylint: disable=g-import-not-at-top
  packages = [p.parent.name for p in (REPO / "jaxprune").glob("*/__init__.py")]
  assert len(packages) >= 8
  for name in [*packages, "flops", "latency", "main"]:
    assert f"``{name}``" in jaxprune.__doc__, name


API_ROOTS = ("graph|surgery|search|flops|latency|kernels|optim|models|engine|data|methods|"
             "distill|plots|config_lib|jsonio|errors")


def _resolves(dotted):
  obj, parts = importlib.import_module("jaxprune"), dotted.split(".")
  for i, part in enumerate(parts):
    try:  # a module first: surgery.rebuild is a function and a module
      obj = importlib.import_module("jaxprune." + ".".join(parts[:i + 1]))
      continue
    except ImportError:
      pass
    if not hasattr(obj, part):
      return False
    obj = getattr(obj, part)
  return True


def test_docs_name_what_exists():
  """Every `jaxprune` name (`surgery.prune_to`, `latency.measure`) and repository path the
  README and docs name in code spans exists: nothing stale after a move or a rename."""
  names = re.compile(r"`(?:jaxprune\.)?((?:%s)(?:\.[A-Za-z_]\w*)+)" % API_ROOTS)
  paths = re.compile(r"(?<![\w./])((?:jaxprune|configs|benchmarks|tests|launch)/"
                     r"[\w/.-]+\.(?:py|json))")
  missing = []
  for page in [REPO / "README.md", *PAGES]:
    text = page.read_text()
    missing += [(page.name, n) for n in sorted(set(names.findall(text))) if not _resolves(n)]
    missing += [(page.name, p) for p in sorted(set(paths.findall(text))) if not (REPO / p).exists()]
  assert not missing, missing


def _config_keys():
  keys = set()

  def walk(node, prefix):
    for key in node.keys():
      keys.add(prefix + key)
      if hasattr(node[key], "keys"):
        walk(node[key], prefix + key + ".")

  for path in sorted((REPO / "configs").glob("*.py")):
    spec = importlib.util.spec_from_file_location("_docs_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    walk(module.get_config(), "")
    walk(module.get_config("smoke"), "")
  return keys


# Named by the docs as what is refused: a placeholder, a key inside a dict literal, and the
# targets ISTA and AutoPrune do not have.
REFUSED = {"key", "model.kwargs.x", "ista.target", "autoprune.target"}


def test_every_documented_override_is_a_config_key():
  """`--config.a.b=...` mentioned anywhere in the README and docs (also outside a full
  command) is a key of some config in configs/."""
  keys = _config_keys()
  unknown = []
  for page in [REPO / "README.md", *PAGES]:
    for key in sorted(set(re.findall(r"--config\.([\w.]+)", page.read_text()))):
      if key not in keys and key not in REFUSED:
        unknown.append((page.name, key))
  assert not unknown, unknown


def test_readme_layout_names_every_module():
  """The README's Layout names every module and subpackage of jaxprune/ as they are."""
  text = (REPO / "README.md").read_text()
  layout = text.split("## Layout\n", 1)[1]
  for path in sorted((REPO / "jaxprune").rglob("*.py")):
    if path.name == "__init__.py" or "__pycache__" in path.parts:
      continue
    name = path.name if path.parent.name == "jaxprune" else path.stem
    assert re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", layout), path.relative_to(REPO)
  for package in (REPO / "jaxprune").glob("*/"):
    if (package / "__init__.py").exists():
      assert f"{package.name}/" in layout, package.name
