"""Reading a ReconcilePolicy file: YAML in, a validated model out, or an error naming the place.

Every error names the file, the line and column, and the field path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from controller.model.errors import PolicyError
from controller.model.policy import ReconcilePolicy


def load_policy(path: Path) -> ReconcilePolicy:
    """Read and validate a policy file; every error names the file, line, column and field."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PolicyError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_policy(text, str(path))


def parse_policy(text: str, name: str = "<policy>") -> ReconcilePolicy:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise PolicyError(f"{where}: not valid YAML: {e.problem or e}") from e
    if node is None:
        raise PolicyError(f"{name}:1:1: the file is empty; expected a ReconcilePolicy")
    marks: dict[tuple[str | int, ...], tuple[yaml.Mark, yaml.Mark]] = {}
    data = _to_python(node, (), marks, name)
    try:
        return ReconcilePolicy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(_describe(e, marks, name, node.start_mark)) from e


def _to_python(
    node: yaml.Node,
    path: tuple[str | int, ...],
    marks: dict[tuple[str | int, ...], tuple[yaml.Mark, yaml.Mark]],
    name: str,
) -> Any:
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.SafeLoader("").construct_object(key_node)
            if key in out:
                m = key_node.start_mark
                raise PolicyError(f"{name}:{m.line + 1}:{m.column + 1}: {_dotted((*path, key))}: duplicate key")
            marks[(*path, key)] = (key_node.start_mark, value_node.start_mark)
            out[key] = _to_python(value_node, (*path, key), marks, name)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            marks[(*path, i)] = (item.start_mark, item.start_mark)
            items.append(_to_python(item, (*path, i), marks, name))
        return items
    return yaml.SafeLoader("").construct_object(node)


def _dotted(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(
    error: ValidationError,
    marks: dict[tuple[str | int, ...], tuple[yaml.Mark, yaml.Mark]],
    name: str,
    top: yaml.Mark,
) -> str:
    lines: list[tuple[int, int, str]] = []
    for err in error.errors():
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        mark = top
        for cut in range(len(loc), 0, -1):
            if loc[:cut] in marks:
                key_mark, value_mark = marks[loc[:cut]]
                mark = key_mark if err["type"] == "extra_forbidden" or cut < len(loc) else value_mark
                break
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field (a typo?)"
        elif err["type"] == "missing":
            message = "required field is missing"
        elif err["type"] == "literal_error":
            message = f"{message}, got {err['input']!r}"
        lines.append((mark.line, mark.column, f"{name}:{mark.line + 1}:{mark.column + 1}: {_dotted(loc)}: {message}"))
    return "\n".join(text for _, _, text in sorted(lines))
