"""Parse PowerShell scripts with tree-sitter's PowerShell grammar: the Windows scripts cannot run here.

    python tools/ps_parse.py examples/windows/*.ps1

Exits 1 naming ``file:line:column`` (1-based) of every ERROR or MISSING node of the grammar, and of
every PowerShell 7-only construct the grammar accepts but Windows PowerShell 5.1, the target, does
not (the ``&&`` and ``||`` pipeline chain operators). ``??``, ``?:`` and ``?.`` are not in the
grammar: they come out as ERROR nodes. Exits 2 when a file cannot be read, 0 when every file parses.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import tree_sitter_powershell
from tree_sitter import Language, Node, Parser

__all__ = ["Problem", "main", "problems"]

#: Node types of constructs Windows PowerShell 5.1 does not have, with what to write instead.
PS7_ONLY = {
    "pipeline_chain_tail": "a && or || pipeline chain operator (PowerShell 7 only): test $LASTEXITCODE in an if",
}


class Problem:
    """One place in a script the parse rejects: 1-based line and column, and what is wrong there."""

    def __init__(self, path: str, line: int, column: int, what: str) -> None:
        self.path, self.line, self.column, self.what = path, line, column, what

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.what}"


def _nodes(root: Node) -> Iterator[Node]:
    """Every node of the tree, in document order (iteratively: deep trees exceed the recursion limit)."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def _excerpt(source: bytes, node: Node) -> str:
    text = source[node.start_byte : node.end_byte].decode("utf-8", "replace").strip()
    first = text.splitlines()[0] if text else ""
    return first[:60] + ("..." if len(first) > 60 or "\n" in text else "")


def problems(path: str, source: bytes) -> list[Problem]:
    """The ERROR and MISSING nodes of ``source`` parsed as PowerShell, and its PowerShell 7-only constructs."""
    parser = Parser(Language(tree_sitter_powershell.language()))
    tree = parser.parse(source)
    found: list[Problem] = []
    for node in _nodes(tree.root_node):
        line, column = node.start_point.row + 1, node.start_point.column + 1
        if node.is_missing:
            found.append(Problem(path, line, column, f"missing {node.type!r}"))
        elif node.is_error:
            found.append(Problem(path, line, column, f"syntax error at {_excerpt(source, node)!r}"))
        elif node.type in PS7_ONLY:
            found.append(Problem(path, line, column, PS7_ONLY[node.type]))
    return found


def main(argv: Sequence[str] | None = None) -> int:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: ps_parse.py FILE.ps1...", file=sys.stderr)
        return 2
    status = 0
    for path in paths:
        try:
            source = Path(path).read_bytes()
        except OSError as e:
            print(f"{path}: cannot read: {e.strerror or e}", file=sys.stderr)
            return 2
        found = problems(path, source)
        for problem in found:
            print(problem)
        if found:
            status = 1
    if status == 0:
        print(f"{len(paths)} PowerShell file(s) parse")
    return status


if __name__ == "__main__":
    sys.exit(main())
