"""The README's layout table against the tree: what it lists exists, and every module is described.

The table is the one headed `| where | what it holds |`; each row's first cell names files as
`` `pkg/mod.py`, `other.py` `` (a bare name after the first lives in the first one's folder). Every
module of our packages must stand in the table or be named in its package's docstring
(`pkg/__init__.py`, as `pkg.mod` or `` `mod` ``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGES = ("toolkit", "featuresExtractor", "adaptation", "retrieval", "synthetic")
HEADER = "| where | what it holds |"


def layout_paths(readme: str) -> list[str]:
    """The files the layout table lists, as paths relative to the repository root."""
    lines = readme.splitlines()
    if HEADER not in lines:
        raise AssertionError(f"README has no layout table (a table headed {HEADER!r})")
    paths = []
    for line in lines[lines.index(HEADER) + 2:]:
        if not line.startswith("|"):
            break
        folder = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if "/" in name:
                folder = name.rpartition("/")[0] + "/"
                paths.append(name)
            else:
                paths.append(folder + name)
    return paths


def layout_problems(root: Path, readme: str) -> list[str]:
    """What the layout table gets wrong about the tree at `root`."""
    listed = layout_paths(readme)
    problems = [f"the table lists {p}, which does not exist" for p in listed if not (root / p).exists()]
    for pkg in PACKAGES:
        init = root / pkg / "__init__.py"
        if not init.is_file():
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root)
            if path.name == "__init__.py" or str(rel) in listed:
                continue
            dotted = ".".join(rel.with_suffix("").parts)
            if dotted not in doc and f"`{path.stem}`" not in doc:
                problems.append(f"{rel} is neither in the README's layout table nor in {pkg}/__init__.py's docstring")
    return problems


def test_the_layout_check_finds_a_planted_mismatch(tmp_path):
    (tmp_path / "toolkit").mkdir()
    (tmp_path / "toolkit" / "__init__.py").write_text('"""The floor: `toolkit.cli` and `lock`."""\n')
    for name in ("cli", "lock", "utils", "hashing"):
        (tmp_path / "toolkit" / f"{name}.py").write_text("")
    readme = f"# x\n\n{HEADER}\n|---|---|\n| `toolkit/utils.py`, `gone.py` | things |\n| `demo.py` | a script |\n\nafter"
    assert layout_paths(readme) == ["toolkit/utils.py", "toolkit/gone.py", "demo.py"]
    assert layout_problems(tmp_path, readme) == [
        "the table lists toolkit/gone.py, which does not exist", "the table lists demo.py, which does not exist",
        "toolkit/hashing.py is neither in the README's layout table nor in toolkit/__init__.py's docstring"]


def test_the_readme_layout_table_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    assert "retrieval/visual_similarity.py" in layout_paths(readme)
    problems = layout_problems(ROOT, readme)
    assert not problems, "\n".join(problems)
