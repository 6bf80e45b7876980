"""The import structure: imports run one way, no module imports itself through others, and no
`_private` name crosses modules (neither imported by name nor reached as `module._name`).

The layers, bottom up: `toolkit` <- `featuresExtractor` <- `adaptation` <- `retrieval` <- the scripts.
`synthetic` (generated test data) stands beside the scripts: it may import any package, no package
imports it. Each check is a function of a source tree, run on this one and on a planted bad case.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("featuresExtractor", "toolkit", "adaptation", "retrieval")
SCRIPTS = ("extract", "train", "similarity", "demo")
ALLOWED = {
    "toolkit": set(),
    "featuresExtractor": {"toolkit"},
    "adaptation": {"toolkit", "featuresExtractor"},
    "retrieval": {"toolkit", "featuresExtractor", "adaptation"},
    "synthetic": {"toolkit", "featuresExtractor", "adaptation", "retrieval"},
}
"""Each package of ours -> the packages of ours it may import (besides itself)."""


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[0] in ("tests", "bench"):  # run with their own folder on sys.path: importable by file name
        return parts[-1]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in the file, function-level ones included."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            found.append((module, [a.name for a in node.names]))
    return found


def _package_files(root: Path) -> list[Path]:
    return [p for pkg in (*PACKAGES, "synthetic") for p in (root / pkg).rglob("*.py")]


def _all_files(root: Path) -> list[Path]:
    """Every Python file of ours: packages, scripts, tests and bench."""
    scripts = [root / f"{name}.py" for name in SCRIPTS if (root / f"{name}.py").is_file()]
    return [*_package_files(root), *scripts, *(p for d in ("tests", "bench") for p in (root / d).rglob("*.py"))]


def _graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of our packages it imports."""
    modules = {_module_name(p, root): p for p in _package_files(root)}
    graph = {}
    for mod, path in modules.items():
        edges = set()
        for target, names in _imports(path, root):
            # "from . import zoo" names a module; "from .zoo import X" the module itself.
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != mod:
                    edges.add(candidate)
                    break
        graph[mod] = edges
    return graph


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """The imports against the layers (`ALLOWED`), as "importer -> imported"."""
    wrong = []
    for mod, targets in sorted(graph.items()):
        layer = mod.split(".")[0]
        wrong += [f"{mod} -> {t}" for t in sorted(targets)
                  if t.split(".")[0] != layer and t.split(".")[0] not in ALLOWED[layer]]
    return wrong


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_imports(root: Path = ROOT) -> list[str]:
    """`from module import _name` anywhere in our files."""
    crossing = []
    for path in _all_files(root):
        for target, names in _imports(path, root):
            crossing += [f"{_module_name(path, root)}: {target}.{n}" for n in names if _private(n)]
    return crossing


def _bound_modules(path: Path, root: Path, modules: set[str]) -> dict[str, str]:
    """Local name -> the module of ours it is bound to by an import in `path`."""
    bound = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname and a.name in modules:
                    bound[a.asname] = a.name
                elif not a.asname and a.name.split(".")[0] in modules:
                    bound[a.name.split(".")[0]] = a.name.split(".")[0]
    for target, names in _imports(path, root):
        for n in names:
            if f"{target}.{n}" in modules:
                bound[n] = f"{target}.{n}"
    # "from x import y as z": the alias is what the code uses
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.asname and a.name in bound:
                    bound[a.asname] = bound.pop(a.name)
    return bound


def _module_of(node: ast.expr, bound: dict[str, str], modules: set[str]) -> str | None:
    """The module of ours an expression (`x`, `x.y`) names, or None."""
    if isinstance(node, ast.Name):
        return bound.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _module_of(node.value, bound, modules)
        if base and f"{base}.{node.attr}" in modules:
            return f"{base}.{node.attr}"
    return None


def _private_attributes(root: Path = ROOT) -> list[str]:
    """`module._name` (read, written or patched with setattr/monkeypatch) where `module` is one of ours."""
    files = _all_files(root)
    everywhere = {_module_name(p, root) for p in files if p.parts[len(root.parts)] not in ("tests", "bench")}
    everywhere |= {m.rpartition(".")[0] for m in everywhere if "." in m}
    crossing = []
    for path in files:
        here = _module_name(path, root)
        own_folder = {_module_name(p, root) for p in path.parent.glob("*.py")} if path.parent != root else set()
        modules = everywhere | (own_folder if path.parts[len(root.parts)] in ("tests", "bench") else set())
        bound = _bound_modules(path, root, modules)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = _module_of(node.value, bound, modules)
                if owner and owner != here:
                    crossing.append(f"{here}: {owner}.{node.attr}")
            elif isinstance(node, ast.Call) and node.args:
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if name not in ("setattr", "getattr", "delattr"):
                    continue
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):  # monkeypatch.setattr("m._x", v)
                    owner, _, attr = first.value.rpartition(".")
                    if owner in modules and _private(attr):
                        crossing.append(f"{here}: {first.value}")
                elif len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and \
                        isinstance(node.args[1].value, str) and _private(node.args[1].value):
                    owner = _module_of(first, bound, modules)
                    if owner and owner != here:
                        crossing.append(f"{here}: {owner}.{node.args[1].value}")
    return crossing


def _plant(root: Path, files: dict[str, str]) -> Path:
    """A source tree of `files` (path -> text) under `root`, each package with an __init__.py."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in (*PACKAGES, "synthetic"):
        (root / pkg).mkdir(exist_ok=True)
        (root / pkg / "__init__.py").touch()
    return root


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    graph = _graph()
    assert "featuresExtractor.backbones" in graph and graph["featuresExtractor.backbones"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_layer_check_finds_planted_upward_imports(tmp_path):
    root = _plant(tmp_path, {
        "toolkit/low.py": "def f():\n    from featuresExtractor import pca\n",  # function-level counts too
        "featuresExtractor/pca.py": "from toolkit import low\nimport retrieval.index\n",
        "adaptation/fit.py": "from featuresExtractor.pca import x\nfrom retrieval import index\n",
        "retrieval/index.py": "from adaptation import fit\nfrom . import more\nimport synthetic.planted\n",
        "retrieval/more.py": "",
        "synthetic/planted.py": "from retrieval.index import y\n",
    })
    assert _upward(_graph(root)) == ["adaptation.fit -> retrieval.index",
                                     "featuresExtractor.pca -> retrieval.index",
                                     "retrieval.index -> synthetic.planted",
                                     "toolkit.low -> featuresExtractor.pca"]


def test_imports_run_one_way():
    graph = _graph()
    assert graph["retrieval.visual_similarity"] and graph["synthetic.planted"]
    assert _upward(graph) == []


def test_the_private_name_checks_find_planted_crossings(tmp_path):
    root = _plant(tmp_path, {
        "toolkit/cli.py": "_hidden = 1\nprint(_hidden)\n",
        "featuresExtractor/pipeline.py": "def _store(): pass\nx = _store\n",
        "retrieval/index.py": "from featuresExtractor.pipeline import _store\nfrom toolkit import cli as c\n"
                              "print(c._hidden)\n",
        "extract.py": "import featuresExtractor.pipeline\nfeaturesExtractor.pipeline._store()\n",
        "tests/helper.py": "def _mine(): pass\n",
        "tests/test_x.py": "import helper\nimport featuresExtractor.pipeline as pipeline\n"
                           "pipeline._store = None\nhelper._mine()\n"
                           "def test(monkeypatch):\n"
                           "    monkeypatch.setattr(pipeline, '_store', None)\n"
                           "    monkeypatch.setattr('toolkit.cli._hidden', 2)\n"
                           "    setattr(pipeline, 'public', 1)\n",
        "bench/b.py": "from toolkit import cli\nprint(cli._hidden, len([])._x)\n",
    })
    assert _private_imports(root) == ["retrieval.index: featuresExtractor.pipeline._store"]
    assert sorted(_private_attributes(root)) == sorted([
        "retrieval.index: toolkit.cli._hidden", "extract: featuresExtractor.pipeline._store",
        "test_x: featuresExtractor.pipeline._store", "test_x: helper._mine",
        "test_x: featuresExtractor.pipeline._store", "test_x: toolkit.cli._hidden", "b: toolkit.cli._hidden"])


def test_no_private_name_imported_from_another_module():
    crossing = _private_imports()
    assert not crossing, crossing


def test_no_private_name_reached_in_another_module():
    crossing = _private_attributes()
    assert not crossing, crossing


def _modules_after(tmp_path, model: str) -> dict:
    """Run extract.py on one drawn pair in a fresh interpreter: the modules imported before it and after."""
    import json
    import subprocess
    import sys

    script = f"""
import json, sys
before = sorted(sys.modules)
import extract
from synthetic.drawn_images import make_pairs
make_pairs({str(tmp_path / 'd')!r}, n_pairs=1, seed=0)
code = extract.main(["-d", {str(tmp_path / 'd')!r}, "-s", {str(tmp_path / 'o')!r}, "--model", {model!r},
                     "--pretrained", "none", "-p", "adapt", "--workers", "0", "--no-progress"])
print(json.dumps({{"code": code, "before": before, "after": sorted(sys.modules)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _libraries(modules) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_a_torchvision_backbone_imports_neither_open_clip_nor_timm(tmp_path):
    found = _modules_after(tmp_path, "resnet18")
    assert found["code"] == 0 and "torchvision" in _libraries(found["after"])
    assert not {"open_clip", "timm"} & _libraries(found["after"])


def long_functions(root: Path, limit: int = 60) -> list[str]:
    """Functions longer than `limit` lines in the packages and scripts (tests and bench are not held to it)."""
    files = [p for p in root.rglob("*.py") if not {"tests", "bench", "docs", ".venv"} & set(p.relative_to(root).parts)]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return found


def test_no_function_over_60_lines(tmp_path):
    (tmp_path / "long.py").write_text("def f():\n" + "    x = 1\n" * 60)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_long.py").write_text("def g():\n" + "    x = 1\n" * 80)
    assert long_functions(tmp_path) == ["long.py:1 f (61 lines)"]
    assert long_functions(ROOT) == []
