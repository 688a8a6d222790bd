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

#: A policy is a page of YAML; anything this large is not one, and is refused unread.
MAX_POLICY_BYTES = 256 * 1024
#: The tags of YAML's core schema: anything else (``!!python/name:...``, custom tags) is refused.
_CORE_TAGS = frozenset(
    "tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp")
)


def load_policy(path: Path) -> ReconcilePolicy:
    """Read and validate a policy file; every error names the file, line, column and field."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise PolicyError(f"{path}: cannot read: {e.strerror or e}") from e
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(f"{path}:1:1: larger than {MAX_POLICY_BYTES // 1024} KiB; a policy is a page of YAML")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolicyError(f"{path}: not UTF-8 text (byte {e.start}): {e.reason}") from e
    return parse_policy(text, str(path))


def _too_deep(text: str, limit: int = 32) -> int | None:
    """Where ``[``/``{`` nesting first passes ``limit``, quoted text aside, or None.

    PyYAML's scanner takes time quadratic in flow nesting: a small file of brackets would
    hold the loader for minutes, so such a file is refused before YAML sees it."""
    depth, quote = 0, ""
    for at, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return at
        elif ch in "]}":
            depth -= 1
    return None


def parse_policy(text: str, name: str = "<policy>") -> ReconcilePolicy:
    deep = _too_deep(text)
    if deep is not None:
        line = text.count("\n", 0, deep) + 1
        column = deep - (text.rfind("\n", 0, deep) + 1) + 1
        raise PolicyError(f"{name}:{line}:{column}: nested deeper than a policy can be")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        raise PolicyError(f"{where}: not valid YAML: {e.problem or e}") from e
    except yaml.YAMLError as e:
        raise PolicyError(f"{name}: not valid YAML: {e}") from e
    except RecursionError as e:
        raise PolicyError(f"{name}: YAML nested too deeply to be a policy") from e
    if node is None:
        raise PolicyError(f"{name}:1:1: the file is empty; expected a ReconcilePolicy")
    marks: dict[tuple[str | int, ...], tuple[yaml.Mark, yaml.Mark]] = {}
    data = _to_python(node, (), marks, name, set())
    try:
        return ReconcilePolicy.model_validate(data)
    except ValidationError as e:
        raise PolicyError(_describe(e, marks, name, node.start_mark)) from e


def _to_python(
    node: yaml.Node,
    path: tuple[str | int, ...],
    marks: dict[tuple[str | int, ...], tuple[yaml.Mark, yaml.Mark]],
    name: str,
    seen: set[int],
) -> Any:
    # An alias makes the composed graph share a node: refused, so no file can expand into an
    # exponential document ("billion laughs"); a policy has no use for anchors.
    m = node.start_mark
    where = f"{name}:{m.line + 1}:{m.column + 1}: {_dotted(path) or 'the document'}"
    if id(node) in seen:
        raise PolicyError(f"{where}: YAML aliases (*name) are not allowed in a policy")
    seen.add(id(node))
    if node.tag not in _CORE_TAGS:
        raise PolicyError(f"{where}: YAML tag {node.tag!r} is not allowed in a policy")
    if len(path) > 16:
        raise PolicyError(f"{where}: nested deeper than a policy can be")
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                k = key_node.start_mark
                raise PolicyError(f"{name}:{k.line + 1}:{k.column + 1}: {_dotted(path)}: a key must be a plain name")
            key = _to_python(key_node, path, {}, name, seen)
            if key in out:
                m = key_node.start_mark
                raise PolicyError(f"{name}:{m.line + 1}:{m.column + 1}: {_dotted((*path, key))}: duplicate key")
            marks[(*path, key)] = (key_node.start_mark, value_node.start_mark)
            out[key] = _to_python(value_node, (*path, key), marks, name, seen)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            marks[(*path, i)] = (item.start_mark, item.start_mark)
            items.append(_to_python(item, (*path, i), marks, name, seen))
        return items
    try:
        return yaml.SafeLoader("").construct_object(node)
    except yaml.YAMLError as e:
        raise PolicyError(f"{where}: {e}") from e


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
