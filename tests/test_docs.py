"""The documents hold together: README.md stays short and starts with the two commands, and every
relative link in README.md and docs/*.md reaches a file (and, with ``#anchor``, a heading in it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCUMENTS = [README, *sorted((REPO / "docs").glob("*.md"))]

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)[ \t#]*$", re.M)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where nothing is a link or a heading."""
    return _FENCE.sub("", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: formatting dropped, lower case, punctuation gone, spaces to dashes."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a Markdown file; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for match in _HEADING.finditer(_prose(path.read_text(encoding="utf-8"))):
        base = slug(match[2])
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def relative_links(path: Path) -> list[str]:
    text = _CODE_SPAN.sub("", _prose(path.read_text(encoding="utf-8")))
    return [t for t in _LINK.findall(text) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_there_are_documents_to_check() -> None:
    assert README in DOCUMENTS and len(DOCUMENTS) > 1


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_reaches_a_file_and_a_heading(document: Path) -> None:
    broken: list[str] = []
    for target in relative_links(document):
        file_part, _, anchor = target.partition("#")
        resolved = (document.parent / file_part).resolve() if file_part else document
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor.lower() not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.relative_to(REPO)}")
    assert broken == [], f"{document.relative_to(REPO)}: {broken}"


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 220, f"README.md has {lines} lines: move detail into docs/"


def test_readme_starts_with_the_two_commands_a_fresh_machine_runs() -> None:
    top = "\n".join(README.read_text(encoding="utf-8").splitlines()[:8])
    assert "make demo" in top and "make test" in top


def test_slugs_follow_github() -> None:
    assert slug("Runbook: disk space containerd does not account for") == (
        "runbook-disk-space-containerd-does-not-account-for"
    )
    assert slug("Installing on Linux (a containerd host)") == "installing-on-linux-a-containerd-host"
    assert slug("Is the `worker` running?") == "is-the-worker-running"


def test_the_architecture_layer_tables_name_every_layer_of_the_import_contracts() -> None:
    """The layer tables are the import-linter contracts as text: a layer added to pyproject.toml and
    not to docs/architecture.md (or one renamed) fails here."""
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    doc = (REPO / "docs" / "architecture.md").read_text()
    rows = {m.replace("\\|", "|") for m in re.findall(r"^\| (`controller[^|]*?(?:\\\|[^|]*?)*) \|", doc, re.M)}
    for contract in contracts:
        if contract["type"] != "layers":
            continue
        for layer in contract["layers"]:
            shown = " | ".join(f"`{m.strip()}`" for m in layer.split("|"))
            assert shown in rows, f"{layer} is not a row of docs/architecture.md's layer tables"
