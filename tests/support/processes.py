"""A fake process listing, as psutil's ``process_iter(attrs)`` gives one.

psutil's documented contract (``psutil.process_iter``, ``Process.as_dict``): each process comes
with an ``info`` dict of the attributes asked for; an attribute the process may not be asked
(``AccessDenied``, or a zombie's ``ZombieProcess``) is ``ad_value`` (None) there; a process that
ends meanwhile (``NoSuchProcess``) is left out. A failure of the listing itself raises from the
iteration. A test lists processes with what each attribute does (a value or one of those errors),
and the fake applies those rules, so the code under test sees what psutil would give it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import psutil
import pytest

#: A value, or the error asking for it raises: psutil's per-process errors, or another (then the
#: listing itself fails, as an OSError psutil does not expect would make it).
Attribute = str | None | Exception


@dataclass
class Listed:
    pid: int
    name: Attribute
    exe: Attribute = None


@dataclass
class FakeProcess:
    pid: int
    info: dict[str, object]


def _value(attribute: Attribute, ad_value: object) -> object:
    if isinstance(attribute, (psutil.AccessDenied, psutil.ZombieProcess)):
        return ad_value
    if isinstance(attribute, Exception):
        raise attribute
    return attribute


def listing(processes: Sequence[Listed], *, ourselves: bool = True, ad_value: object = None) -> Iterator[FakeProcess]:
    """What ``process_iter(["name", "exe"])`` yields for ``processes`` (and, unless told not to, this
    process itself: no live listing lacks it)."""
    me = psutil.Process()
    everyone = [*processes, Listed(os.getpid(), me.name(), me.exe())] if ourselves else list(processes)
    for p in everyone:
        try:
            info = {"name": _value(p.name, ad_value), "exe": _value(p.exe, ad_value)}
        except psutil.NoSuchProcess:
            continue  # ended meanwhile: psutil leaves it out
        yield FakeProcess(p.pid, info)


def fake_process_listing(
    monkeypatch: pytest.MonkeyPatch, processes: Sequence[Listed], *, ourselves: bool = True
) -> None:
    def process_iter(attrs: list[str] | None = None, ad_value: object = None) -> Iterator[FakeProcess]:
        assert attrs is not None and set(attrs) <= {"name", "exe"}, attrs
        return listing(processes, ourselves=ourselves, ad_value=ad_value)

    monkeypatch.setattr(psutil, "process_iter", process_iter)
