"""Whatever bytes arrive (a layerinfo, a policy, ctr's output), only our own errors come out.

A controller that runs unattended reads files a crash half wrote and output a newer ctr
prints differently: none of that may end in a traceback, in the daemon or in ``--once``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.adapters.ctr import (
    SNAPSHOT_KINDS,
    parse_container_info,
    parse_snapshot_created,
    parse_snapshots,
    parse_table,
)
from controller.adapters.sexp import SexpSyntaxError, parse_one
from controller.adapters.store import read_layerinfo
from controller.config.policy import parse_policy
from controller.model.errors import CtrError, LayerinfoError, PolicyError

#: Text made of what these formats are made of, so the fuzzing gets past the first byte.
_SEXP_BITS = st.sampled_from(
    ["(", ")", '"', "\\", "#|", "|#", "#;", ";", "\n", " ", "a", "\\x4", "\\12", "snapshot_key"]
)
_YAML_BITS = st.sampled_from(
    ["spec:", " ", "\n", "  ", "- ", "[", "]", "{", "}", "&a ", "*a", "!!str ", "!x ", ": ", "'", '"', "10m", "kind"]
)
_JSON_BITS = st.sampled_from(['{"ID": "x"', '"Spec": {', '"root": {"path": 1}', "}", ",", "[", "]", "null", '"C"'])


@settings(max_examples=300, deadline=None)
@given(st.lists(_SEXP_BITS, max_size=60).map("".join) | st.binary(max_size=200))
def test_the_sexp_reader_raises_only_its_syntax_error(text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with contextlib.suppress(SexpSyntaxError):
        parse_one(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(_SEXP_BITS, max_size=60).map("".join))
def test_a_layerinfo_is_read_or_refused_with_its_place(tmp_path: Path, text: str) -> None:
    path = tmp_path / "layerinfo"
    path.write_text(text)
    try:
        read_layerinfo(path)
    except LayerinfoError as e:
        assert str(e).startswith(f"{path}:")


@settings(max_examples=300, deadline=None)
@given(st.lists(_YAML_BITS, max_size=40).map("".join) | st.text(max_size=200))
def test_the_policy_loader_raises_only_policy_errors(text: str) -> None:
    try:
        parse_policy(text, "p.yaml")
    except PolicyError as e:
        assert str(e).startswith("p.yaml")


@settings(max_examples=300, deadline=None)
@given(st.lists(_JSON_BITS, max_size=20).map("".join) | st.text(max_size=200))
def test_ctr_output_parsers_raise_only_ctr_errors(text: str) -> None:
    for parse in (parse_container_info, lambda t: parse_snapshot_created(t, "k")):
        with contextlib.suppress(CtrError):
            parse(text)
    rows = parse_table(text)
    assert all(isinstance(v, str) for row in rows for v in row.values())


_TABLE_BITS = st.sampled_from(
    [
        "KEY",
        "PARENT",
        "KIND",
        " ",
        "   ",
        "\t",
        "\n",
        "obuilder-a",
        "sha256:1f",
        "Committed",
        "Active",
        "View",
        "é",
        "\r",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_TABLE_BITS, max_size=40).map("".join) | st.text(max_size=200))
def test_a_snapshot_listing_is_read_whole_or_refused_never_misread(text: str) -> None:
    try:
        snapshots = parse_snapshots(text)
    except CtrError as e:
        assert "snapshots ls" in str(e)
        return
    # What is read is what ctr could have printed: a kind it prints, a key, nothing invented.
    assert all(s.kind in SNAPSHOT_KINDS and s.key and s.key in text for s in snapshots)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["2026-11-29T10:00:00", "2026-11-29", "1", "null", "[]", '"x"', "2026-11-29T10:00:00Z"]))
def test_times_ctr_did_not_print_are_ctr_errors_not_naive_datetimes(created: str) -> None:
    value = created if created[0] in '[n1"' else json.dumps(created)

    def snapshot(text: str) -> datetime | None:
        return parse_snapshot_created(text, "k")

    def container(text: str) -> datetime | None:
        return parse_container_info(text).created_at

    parsers: list[tuple[str, Callable[[str], datetime | None]]] = [
        (f'{{"Created": {value}}}', snapshot),
        (f'{{"ID": "c", "CreatedAt": {value}}}', container),
    ]
    for text, parse in parsers:
        try:
            when = parse(text)
        except CtrError:
            continue
        assert when is None or when.tzinfo is not None, (text, when)
