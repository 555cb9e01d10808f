"""The package's imports run one way: the command on top, the subpackages below it, the shared
core at the bottom. No cycles, nothing below the command imports it, nothing imports another
module's private names. Read from the source with `ast`, lazy imports inside functions included;
the checker is shown to catch each kind of violation on a small package built here."""

import ast
from pathlib import Path

import pytest

from .conftest import ROOT

# Lower layers never import higher ones. A top-level module of the package is the shared core.
LAYERS = {"cli": 3, "train": 3, "sweep": 2, "analysis": 2, "training": 1}
COMMAND = 3


def modules(root: Path, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer(name: str, package: str) -> int:
    parts = name.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def imports(name: str, path: Path, known: dict) -> list[tuple[str, str | None, int]]:
    """(imported module, imported private name or None, line) for each import of the package
    in the module, resolving relative imports; `from pkg import sub` counts as the submodule."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    bound = {}  # local name -> module it names, for attribute access to private names
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != next(iter(known)).split(".")[0]:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:
                    found.append((sub, None, node.lineno))
                    bound[alias.asname or alias.name] = sub
                else:
                    private = alias.name if is_private(alias.name) else None
                    found.append((base, private, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.append((alias.name, None, node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in bound and is_private(node.attr)):
            found.append((bound[node.value.id], node.attr, node.lineno))
    return found


def violations(root: Path, package: str) -> list[str]:
    known = modules(root, package)
    graph = {m: set() for m in known}
    problems = []
    for name, path in known.items():
        for target, private, line in imports(name, path, known):
            where = f"{path.relative_to(root)}:{line}"
            if private:
                problems.append(f"{where}: {name} uses the private {target}.{private}")
            if target == name or target not in known:
                continue
            graph[name].add(target)
            if layer(target, package) > layer(name, package):
                kind = "the command" if layer(target, package) == COMMAND else "a higher layer"
                problems.append(f"{where}: {name} imports {kind}, {target}")
    problems += [f"import cycle among {', '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set]) -> list[list[str]]:
    """Each set of modules that import each other, directly or not (Tarjan's strongly
    connected components of more than one module)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_imports_run_one_way():
    assert violations(ROOT, "latentwire") == []


def make_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "latentwire" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for folder in [root / "latentwire", *(p for p in (root / "latentwire").rglob("*")
                                          if p.is_dir())]:
        (folder / "__init__.py").touch()
    return root


CLEAN = {"cli.py": "from .sweep import runner\nfrom . import stats\n",
         "stats.py": "import math\n",
         "sweep/runner.py": "from .. import stats\nfrom ..training import loop\n",
         "training/loop.py": "from ..stats import mean\n"}


@pytest.mark.parametrize("change, expected", [
    ({}, []),
    ({"stats.py": "def f():\n    from .cli import main\n"},
     ["latentwire/stats.py:2: latentwire.stats imports the command, latentwire.cli",
      "import cycle among latentwire.cli, latentwire.stats, latentwire.sweep.runner, "
      "latentwire.training.loop"]),
    ({"training/loop.py": "from ..sweep import runner\n"},
     ["latentwire/training/loop.py:1: latentwire.training.loop imports a higher layer, "
      "latentwire.sweep.runner",
      "import cycle among latentwire.sweep.runner, latentwire.training.loop"]),
    ({"stats.py": "from .training import loop\n"},
     ["latentwire/stats.py:1: latentwire.stats imports a higher layer, latentwire.training.loop",
      "import cycle among latentwire.stats, latentwire.training.loop"]),
    ({"sweep/runner.py": "from .. import stats\nfrom .other import x\n",
      "sweep/other.py": "from .runner import y\n"},
     ["import cycle among latentwire.sweep.other, latentwire.sweep.runner"]),
    ({"sweep/runner.py": "from ..stats import _helper\nfrom .. import stats\nstats._cache\n"},
     ["latentwire/sweep/runner.py:1: latentwire.sweep.runner uses the private "
      "latentwire.stats._helper",
      "latentwire/sweep/runner.py:3: latentwire.sweep.runner uses the private "
      "latentwire.stats._cache"]),
])
def test_the_checker_catches_upward_imports_cycles_and_private_names(tmp_path, change, expected):
    root = make_package(tmp_path, {**CLEAN, **change})
    assert sorted(violations(root, "latentwire")) == sorted(expected)
