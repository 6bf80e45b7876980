"""The packages' import structure: no module imports itself through others, no `_private` name crosses modules."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("featuresExtractor", "toolkit", "adaptation", "retrieval")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import in the file, function-level ones included."""
    name = _module_name(path)
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


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    graph = {}
    for mod, path in modules.items():
        edges = set()
        for target, names in _imports(path):
            # "from . import zoo" names a module; "from .zoo import X" the module itself.
            for candidate in [f"{target}.{n}" for n in names] + [target]:
                if candidate in modules and candidate != mod:
                    edges.add(candidate)
                    break
        graph[mod] = edges
    return graph


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


def test_the_cycle_finder_finds_a_planted_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    graph = _graph()
    assert "featuresExtractor.backbones" in graph and graph["featuresExtractor.backbones"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_private_name_imported_from_another_module():
    crossing = []
    scripts = [ROOT / f"{name}.py" for name in ("extract", "train", "similarity", "demo")]
    for path in [*(p for pkg in (*PACKAGES, "tests", "bench") for p in (ROOT / pkg).rglob("*.py")), *scripts]:
        for target, names in _imports(path):
            crossing += [f"{_module_name(path)}: {target}.{n}" for n in names
                         if n.startswith("_") and not n.startswith("__")]
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
