"""The README and docs/ point at things that exist: relative links, in-page anchors, and
the configs, targets and synth subcommands they name."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from synth.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_PATH = re.compile(r"`((?:configs|targets)/[\w./-]+\.yaml)`")
SYNTH_CMD = re.compile(r"`synth ([a-z]+)(?: ([a-z]+))?")


def _anchor(heading: str) -> str:
    """GitHub's anchor for an ASCII heading: lower case, punctuation but ``-`` and ``_`` dropped, spaces to hyphens."""
    return re.sub(r"[^a-z0-9 _\-]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's subcommands by name ({} when it has none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    broken = []
    for target in LINK.findall(doc.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading for #{anchor} in {dest.name}")
    assert not broken, f"{doc.name}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_configs_and_targets_exist(doc):
    missing = sorted({p for p in REPO_PATH.findall(doc.read_text()) if not (ROOT / p).exists()})
    assert not missing, f"{doc.name} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_named_subcommands_exist(doc):
    commands = _subcommands(_parser())
    unknown = []
    for command, sub in SYNTH_CMD.findall(doc.read_text()):
        if command not in commands:
            unknown.append(command)
            continue
        nested = _subcommands(commands[command])
        if sub and nested and sub not in nested:
            unknown.append(f"{command} {sub}")
    assert not unknown, f"{doc.name} names synth subcommands that do not exist: {sorted(set(unknown))}"


def test_anchor_rule_on_a_known_heading():
    assert _anchor(" One recording is one draw: `synth bench redraw`") == "one-recording-is-one-draw-synth-bench-redraw"
