"""The committed HTML docs are current, reproducible, and the README's links resolve."""

from __future__ import annotations

import filecmp
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def _generate(out: Path) -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(["make", "-s", "--no-print-directory", "docs-into", f"OUT={out}", f"BIN={Path(sys.executable).parent}"],
                   cwd=ROOT, check=True, env=env, capture_output=True, timeout=300)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def normalized(text: str) -> str:
    """A generated page as what matters in it: the same on every Python version and machine.

    Python versions dedent docstrings differently (3.13's compiler strips their indentation), so a
    backtick span continued on an indented line renders as `<code>` on one and as plain backticked
    text on another, with other whitespace around it: both are taken as the same text here, with
    runs of whitespace (real, or JSON's escaped newlines in search.js) as one space.
    """
    import html

    text = html.unescape(text.replace('\\"', '"'))
    text = re.sub(r"<code>(.*?)</code>", lambda m: f"`{m.group(1)}`", text, flags=re.S)
    return re.sub(r"(?:\\n|\s)+", " ", text)


def stale_files(generated: Path, committed: Path) -> list[str]:
    """The files of `committed` whose `normalized` text differs from the freshly `generated` ones."""
    return [f for f in _tree(committed) if not filecmp.cmp(committed / f, generated / f, shallow=False)
            and normalized((committed / f).read_text(errors="replace"))
            != normalized((generated / f).read_text(errors="replace"))]


def test_committed_docs_are_not_stale(tmp_path):
    _generate(tmp_path / "docs")
    committed = ROOT / "docs"
    assert _tree(tmp_path / "docs") == _tree(committed), "docs/ is stale: run `make docs` and commit it"
    stale = stale_files(tmp_path / "docs", committed)
    assert not stale, f"docs/ is stale ({', '.join(stale[:5])}): run `make docs` and commit it"


def test_staleness_ignores_how_a_python_version_renders_a_wrapped_code_span(tmp_path):
    # runs.html as Python 3.13 renders collapse_verdict's wrapped backtick span (as code, other spacing),
    # and a real change to the same page: only the second is stale.
    page = (ROOT / "docs" / "adaptation" / "runs.html").read_text()
    wrapped = re.search(r"<p>`(\{&quot;output_std.*?|\{\"output_std.*?)`\.</p>", page, flags=re.S)
    assert wrapped, "collapse_verdict's Returns paragraph not found in docs/adaptation/runs.html"
    as_code = page.replace(wrapped.group(0), "<p><code>" + re.sub(r"\n\s*", "\n", wrapped.group(1)) + "</code>.</p>")
    for name, text in {"same": as_code, "changed": as_code.replace("collapsed in k of n", "collapsed in k of m")}.items():
        (tmp_path / name / "adaptation").mkdir(parents=True)
        (tmp_path / name / "adaptation" / "runs.html").write_text(text)
    (tmp_path / "committed" / "adaptation").mkdir(parents=True)
    (tmp_path / "committed" / "adaptation" / "runs.html").write_text(page)
    assert stale_files(tmp_path / "same", tmp_path / "committed") == []
    assert stale_files(tmp_path / "changed", tmp_path / "committed") == ["adaptation/runs.html"]


def test_docs_hold_no_dates_or_absolute_paths():
    for f in _tree(ROOT / "docs"):
        text = (ROOT / "docs" / f).read_text(errors="replace")
        assert str(ROOT) not in text and "/home/" not in text, f
        assert not re.search(r"20\d\d-\d\d-\d\dT\d\d:\d\d", text), f


def test_readme_links_resolve():
    for rel in ("docs/train.html", "docs/featuresExtractor/processor.html", "featuresExtractor/backbones.py",
                "featuresExtractor/transforms.py"):
        assert (ROOT / rel).is_file(), rel
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [l for l in links if not re.match(r"[a-z]+:", l)]
    assert "docs/train.html" in local and "docs/featuresExtractor/processor.html" in local
    missing = [l for l in local if not (ROOT / l).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_processor_page_documents_the_four_processors():
    page = (ROOT / "docs" / "featuresExtractor" / "processor.html").read_text()
    for row in ("<code>adapt</code>", "<code>adapt-pca N</code>", "<code>pca N</code>", "<code>save</code>",
                "<code>layers</code>", "<code>all</code>"):
        assert row in page, row


def _visible_text(page: str) -> str:
    """The page's text without the source listings (pdoc's collapsed `pdoc-code codehilite` blocks, which
    hold only spans inside their `<pre>`) and without tags."""
    import html

    page = re.sub(r'<div class="pdoc-code codehilite">.*?</div>', " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", page))


def parsers_of(parser) -> list:
    """A parser and every subcommand's parser under it, nested ones included."""
    import argparse

    parsers = [parser]
    for p in parsers:  # grows while it is walked
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
    return parsers


def test_each_scripts_page_shows_its_full_command_line_outside_the_source():
    import argparse

    import demo
    import extract
    import similarity
    import train

    for module in (extract, train, similarity, demo):
        page = (ROOT / "docs" / f"{module.__name__}.html").read_text()
        text = _visible_text(page)
        assert "def build_parser" not in text and "add_argument" not in text  # the source is really gone
        parsers = parsers_of(module.build_parser())
        for sub in parsers[1:]:
            assert f"python {sub.prog} -h" in text
        for parser in parsers:
            for action in parser._actions:
                for flag in action.option_strings:
                    assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (module.__name__, flag)
                if action.help and action.help != argparse.SUPPRESS and len(action.help) > 20:
                    assert " ".join(action.help.split()[:3]) in " ".join(text.split()), (module.__name__, action.help)


def test_guides_links_resolve_from_their_html_pages():
    """The guides are read as docs/guides/NAME.html and the start page as docs/index.html: their links must
    resolve from there (to another page, or to a file of the repository such as bench/README.md)."""
    import guides

    pages = {ROOT / "docs" / "guides": [p.read_text() for p in (ROOT / "guides").glob("*.md")],
             ROOT / "docs": [guides.__doc__]}
    checked = 0
    for base, texts in pages.items():
        for text in texts:
            for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
                if re.match(r"[a-z]+:", link):
                    continue
                assert (base / link).resolve().exists(), f"{link} does not resolve from {base}"
                checked += 1
    assert checked >= 10
