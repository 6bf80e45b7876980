"""Every command shown to a reader parses: README.md, the guides and the scripts' docstrings.

A line that runs `python extract.py|train.py|similarity.py|demo.py ...` (also behind `torchrun ...`)
is taken from each source, its optional `[...]` parts included, each alternative of a `(a | b)` group
tried, and handed to that script's own `parse_args`. A command shown wrong cannot land.
"""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

from conftest import ROOT

SCRIPTS = ("extract", "train", "similarity", "demo")
_COMMAND = re.compile(r"(?:python3?|torchrun(?: [^\n`]*?)?) (extract|train|similarity|demo)\.py\b((?:\\\n|[^\n`#])*)")


def _sources() -> dict[str, str]:
    texts = {"README.md": (ROOT / "README.md").read_text()}
    for guide in sorted((ROOT / "guides").glob("*.md")) if (ROOT / "guides").is_dir() else []:
        texts[str(guide.relative_to(ROOT))] = guide.read_text()
    for name in SCRIPTS:
        texts[f"{name}.py"] = importlib.import_module(name).__doc__ or ""
    return texts


def _alternatives(text: str) -> list[str]:
    """`(a | b)` groups expanded into one command per alternative (the first group first)."""
    group = re.search(r"\(([^()]*\|[^()]*)\)", text)
    if not group:
        return [text]
    return [alt for choice in group.group(1).split("|")
            for alt in _alternatives(text[:group.start()] + choice.strip() + text[group.end():])]


def _argv(rest: str) -> list[str]:
    rest = rest.replace("\\\n", " ")
    rest = re.sub(r"\s\(.*$", "", rest)           # a trailing "(and search, ...)" says, it does not run
    rest = rest.replace("[", " ").replace("]", " ")  # optional parts included
    words = []
    for word in shlex.split(rest):
        if word in ("...", "…"):
            continue
        # `flat|hnsw|ivfpq` shows a choice: take the first
        words.append(word.split("|")[0] if "|" in word and not word.startswith(("|", "-")) else word)
    return words


def shown_commands() -> list[tuple[str, str, list[str]]]:
    """(source, script, argv) for every command shown."""
    found = []
    for source, text in _sources().items():
        for match in _COMMAND.finditer(text):
            for line in _alternatives(match.group(2)):
                found.append((source, match.group(1), _argv(line)))
    return found


def test_the_finder_sees_the_papers_two_commands_and_expands_shapes():
    shown = {(script, tuple(argv)) for _, script, argv in shown_commands()}
    assert ("extract", ("-d", "DATASET", "-s", "SAVE_DIR", "-b", "2048", "--data-aug", "--processor", "adapt-pca",
                        "256")) in shown or any(s == "extract" and "--data-aug" in a for s, a in shown)
    assert any(s == "train" and "--test-split" in a and "original" in a for s, a in shown)
    assert _alternatives("(--run R | --onnx D) pair A B") == ["--run R pair A B", "--onnx D pair A B"]
    assert _argv(" --run R export -o X [--best] [--kind flat|hnsw] ...") == \
        ["--run", "R", "export", "-o", "X", "--best", "--kind", "flat"]


@pytest.mark.parametrize("source,script,argv", shown_commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_shown_command_parses(source, script, argv, capsys):
    module = importlib.import_module(script)
    try:
        module.parse_args(argv)
    except SystemExit as stop:
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.code == 0, f"{source}: python {script}.py {' '.join(argv)}: {err[-1] if err else stop.code}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_only_defaults_that_say_something(script):
    """No "(default: True)" on a switch, "(default: None)" on an option without one, or a default said twice."""
    from test_docs import parsers_of  # every parser of the script, subcommands included

    for parser in parsers_of(importlib.import_module(script).build_parser()):
        text = " ".join(parser.format_help().split())
        for bad in ("(default: True)", "(default: False)", "(default: None)", "(the default) (default"):
            assert bad not in text, (parser.prog, bad)
