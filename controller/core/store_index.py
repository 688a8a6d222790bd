"""What the planner derives from the store alone, kept from pass to pass by identity.

The store adapter returns the very same ``StoreState``, and the same tuples of the same
``StoreEntry`` objects, when nothing in the store changed; a build ending makes one new entry
and leaves the others the same objects. What a plan needs from 50,000 results (each one's claim
on its committed snapshot, the unreadable ones, the drift report's id sets, which build owns
each folder and key) is therefore derived when the ``results`` tuple is new, and entry by entry
only for the entries that are new; a pass over an unchanged store then costs a few set
operations in C over the owned keys, not a Python loop building an object per result.

Reuse is by identity, never by value, and every memo holds a strong reference to what it was
built from: an id in it cannot be taken by another object while it is held. The planner stays a
function of its inputs; tests/test_planner.py checks that a plan made through the memo equals
one made from fresh copies of the records.

Every memo is built whole, then published by one assignment, and never changed after: two
threads planning at once at worst both derive.
"""

from __future__ import annotations

import ntpath
import posixpath
import re
from collections.abc import Callable, Container, Mapping, Set
from functools import partial
from itertools import chain, compress, repeat
from operator import attrgetter, is_, itemgetter, not_
from typing import NamedTuple, TypeVar, cast

from controller.model.plan import Rule, StoreDrift
from controller.model.records import DbRow, StoreEntry

_WINDOWS_PATH = re.compile(r"^(?:[A-Za-z]:|\\\\)|\\")


def path_identity(path: str) -> str:
    """A form of a folder path in which two spellings of one folder compare equal.

    Windows paths (drive letter, UNC or backslashes) compare case-insensitively
    with either slash; others as POSIX. Decided by the path's shape, not the host,
    so Windows inputs are planned the same on any machine.
    """
    if _WINDOWS_PATH.search(path):
        return ntpath.normcase(ntpath.normpath(path))
    return posixpath.normpath(path)


class Claim(NamedTuple):
    """A keep rule's verdict on one snapshot key (a tuple: a large store makes many)."""

    key: str
    rule: Rule
    reason: str


#: One result's claims (the planner's rule 1), derived once per ``StoreEntry`` object.
Derive = Callable[[StoreEntry], tuple[Claim, ...]]
Owners = tuple[dict[str, StoreEntry], dict[str, StoreEntry]]


class _Entry(NamedTuple):
    """What the index derives from one result, once per ``StoreEntry`` object. It holds the entry:
    while it is held, no other object can have its id."""

    entry: StoreEntry
    claims: tuple[Claim, ...]
    #: Readable with one claimed key (nearly every result): (id, key), for the drift report.
    single: tuple[str, str] | None
    #: Readable with another number of keys: (id, keys).
    several: tuple[str, tuple[str, ...]] | None
    unreadable: bool


class _Owner(NamedTuple):
    """Which folder and which active keys one result owns, once per ``StoreEntry`` object (held)."""

    entry: StoreEntry
    folder: str | None
    keys: tuple[str, ...]


_FIRST = itemgetter(0)
_SECOND = itemgetter(1)
_RULE_AND_REASON = itemgetter(1, 2)
_ID = attrgetter("id")


class ResultIndex:
    """What the planner derives from one ``store.results`` tuple; get it from :func:`index_results`.

    ``claims``, ``keeps`` and what the methods return are shared by every plan made on this tuple:
    read them, copy them, never change them.
    """

    # Built in C from the entries' records (map, compress, chain): a build ending rebuilds it.
    def __init__(
        self,
        results: tuple[StoreEntry, ...],
        derive: Derive,
        entries: list[_Entry],
        owners: dict[int, _Owner],
    ) -> None:
        self.results = results
        self.derive = derive
        #: By id(entry): what the next tuple's index takes over for the entries it shares.
        self.by_entry: dict[int, _Entry] = dict(zip(map(id, results), entries, strict=True))
        flat = list(chain.from_iterable(map(attrgetter("claims"), entries)))
        #: Each committed key's claim, in the order of the results: the first result's that names
        #: it, at its place, as merge() keeps them (the order decides which root explains an ancestor).
        self.claims: dict[str, Claim] = _first_wins(list(map(_FIRST, flat)), flat)
        #: The same as ``(rule, reason)``, as ``Plan.snapshot_keeps`` holds them.
        self.keeps: dict[str, tuple[Rule, str]] = dict(
            zip(self.claims, map(_RULE_AND_REASON, self.claims.values()), strict=True)
        )
        self.unreadable = tuple(compress(results, map(attrgetter("unreadable"), entries)))
        # A readable result is missing its snapshot when none of its claimed keys exists: with one
        # key that is a membership test, run in C over the ids sorted here (sorted already when
        # the store lists result/ in order: then the sort is one pass).
        single = list(filter(None, map(attrgetter("single"), entries)))
        single.sort()
        self._single_ids: tuple[str, ...] = tuple(map(_FIRST, single))
        self._single_keys: tuple[str, ...] = tuple(map(_SECOND, single))
        self._several = tuple(filter(None, map(attrgetter("several"), entries)))
        self._owner_of = owners
        self._owners: Owners | None = None
        self._subset: tuple[Set[str], dict[str, Claim], dict[str, tuple[Rule, str]]] | None = None
        self._rows: tuple[tuple[DbRow, ...], tuple[str, ...], tuple[str, ...]] | None = None
        self._drift: tuple[tuple[DbRow, ...], tuple[str, ...], StoreDrift] | None = None

    def on(self, owned: Set[str]) -> tuple[Mapping[str, Claim], Mapping[str, tuple[Rule, str]]]:
        """The claims (and keeps) of the results whose committed snapshot is owned."""
        keys = self.claims.keys() & owned
        if len(keys) == len(self.claims):
            return self.claims, self.keeps
        last = self._subset
        if last is None or last[0] != keys:
            # Built again only when which results have their snapshot changed, not at every pass;
            # in the results' order, as the whole.
            ordered = list(compress(self.claims, map(keys.__contains__, self.claims)))
            claims = dict(zip(ordered, map(self.claims.__getitem__, ordered), strict=True))
            keeps = dict(zip(ordered, map(self.keeps.__getitem__, ordered), strict=True))
            last = self._subset = (keys, claims, keeps)
        return last[1], last[2]

    def drift(self, db_rows: tuple[DbRow, ...], present: Container[str]) -> StoreDrift:
        """The store's drift report: rows and results that do not match, results whose snapshot is gone."""
        rows = self._rows
        if rows is None or rows[0] is not db_rows:
            result_ids = set(map(_ID, self.results))
            row_ids = set(map(_ID, db_rows))
            rows = self._rows = (db_rows, _sorted(row_ids - result_ids), _sorted(result_ids - row_ids))
        missing = tuple(compress(self._single_ids, map(not_, map(present.__contains__, self._single_keys))))
        several = [i for i, keys in self._several if not any(k in present for k in keys)]
        if several:
            missing = _sorted((*missing, *several))
        last = self._drift
        if last is None or last[0] is not db_rows or last[1] != missing:
            report = StoreDrift(
                rows_without_result=rows[1], results_without_row=rows[2], results_missing_snapshot=missing
            )
            last = self._drift = (db_rows, missing, report)
        return last[2]

    def owners(self) -> Owners:
        """Which result each layer folder and each active key belongs to (the first result's)."""
        owners = self._owners
        if owners is None:
            records = _records(self.results, self._owner_of, _owner)
            self._owner_of = dict(zip(map(id, self.results), records, strict=True))
            results = self.results
            with_folder = list(compress(results, map(attrgetter("folder"), records)))
            by_folder = _first_wins(list(filter(None, map(attrgetter("folder"), records))), with_folder)
            keys = list(map(attrgetter("keys"), records))
            # Each entry once for each of its keys.
            owner_of_key = list(chain.from_iterable(map(repeat, results, map(len, keys))))
            by_key = _first_wins(list(chain.from_iterable(keys)), owner_of_key)
            owners = self._owners = (by_folder, by_key)
        return owners


class _Memo:
    """The index of the last ``results`` tuple planned."""

    last: ResultIndex | None = None


_MEMO = _Memo()


def index_results(results: tuple[StoreEntry, ...], derive: Derive) -> ResultIndex:
    """The index of ``results``: the last one if it was built from this very tuple, else a new one
    that derives only the entries the last one did not hold."""
    last = _MEMO.last
    if last is not None and last.results is results and last.derive is derive:
        return last
    reuse = last.by_entry if last is not None and last.derive is derive else {}
    entries = _records(results, reuse, partial(_entry, derive))
    index = ResultIndex(results, derive, entries, last._owner_of if last is not None else {})
    _MEMO.last = index
    return index


_R = TypeVar("_R")
_V = TypeVar("_V")


def _records(results: tuple[StoreEntry, ...], held: Mapping[int, _R], make: Callable[[StoreEntry], _R]) -> list[_R]:
    """Each entry's record: the one ``held`` has for this very entry (it holds the entry, so an id
    found there is this entry's), else a new one. Looked up in C; only new entries cost Python."""
    records: list[_R | None] = list(map(held.get, map(id, results)))
    for at in compress(range(len(records)), map(partial(is_, None), records)):
        records[at] = make(results[at])
    return cast(list[_R], records)  # no None is left


def _entry(derive: Derive, e: StoreEntry) -> _Entry:
    claims = derive(e)
    if e.layerinfo_error is not None:
        return _Entry(e, claims, None, None, True)
    keys = tuple(c.key for c in claims)
    if len(keys) == 1:
        return _Entry(e, claims, (e.id, keys[0]), None, False)
    return _Entry(e, claims, None, (e.id, keys), False)


def _owner(e: StoreEntry) -> _Owner:
    folder = path_identity(e.layerinfo.source) if e.layerinfo is not None and e.layerinfo.source else None
    return _Owner(e, folder, e.snapshot_keys)


def _first_wins(keys: list[str], values: list[_V]) -> dict[str, _V]:
    """``values`` by key, in the order of the keys' first places, each key's first value."""
    out = dict(zip(keys, values, strict=True))
    if len(out) != len(keys):  # a key twice: dict() kept its first place but its last value
        out.update(zip(reversed(keys), reversed(values), strict=True))
    return out


def _sorted(items: Set[str] | tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(items))


__all__ = ("Claim", "Derive", "ResultIndex", "index_results", "path_identity")
