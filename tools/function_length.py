"""Fails when a function in the given trees is longer than the limit (lines from ``def`` to its end).

McCabe complexity is ruff's C901 (pyproject.toml); ruff has no rule for a function's length.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path


def long_functions(root: Path, limit: int) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    found.append(f"{path}:{node.lineno}: {node.name} is {lines} lines (limit {limit})")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("roots", nargs="+", type=Path)
    parser.add_argument("--max-lines", type=int, default=60)
    args = parser.parse_args()
    found = [line for root in args.roots for line in long_functions(root, args.max_lines)]
    print("\n".join(found) if found else f"no function over {args.max_lines} lines")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
