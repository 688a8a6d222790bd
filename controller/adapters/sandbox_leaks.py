"""What OBuilder's HCS sandbox leaves outside the store when it dies: temp folders and HCN namespaces.

For each run, OBuilder's ``lib/hcs_sandbox.ml`` (ocurrent/obuilder):

- with host networking, first runs ``HCN_TOOL create`` and keeps its trimmed output as the
  namespace id (``Os.win32_pread [t.hcn_namespace_path; "create"]``);
- then makes a temporary folder with ``Lwt_io.with_temp_dir ~perm:0o700 ~prefix:"obuilder-hcs-"``
  (under ``Filename.get_temp_dir_name ()``: ``%TEMP%`` on Windows) and writes the run's OCI
  ``config.json`` into it, naming that namespace at ``windows.network.networkNamespace``, and
  each secret at ``secrets/N/secret``;
- in the run's finalizer, after the folder is gone, runs ``HCN_TOOL delete NS`` and only logs
  a failure.

A crash of the worker or the machine skips both clean-ups: the job's secrets stay on disk and
the namespace stays in HNS. At boot (the worker not running) every such folder is a leak.

A link (symlink, or junction on Windows) named with the prefix is reported and removed as a
link only: nothing behind it is read or deleted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from controller.adapters import platform
from controller.model.records import Record

#: ``Lwt_io.with_temp_dir ~prefix:"obuilder-hcs-"`` in OBuilder's ``lib/hcs_sandbox.ml``.
DEFAULT_PREFIX = "obuilder-hcs-"
CONFIG_NAME = "config.json"
SECRETS_NAME = "secrets"
#: OBuilder's config.json is a few kilobytes; anything far larger is not one of its.
CONFIG_MAX_BYTES = 1 << 20
#: The longest one call of the hcn tool may take.
HCN_TIMEOUT = 60.0
#: How much of the tool's stderr a result keeps.
STDERR_KEPT = 4000
#: Where OBuilder's config.json names the HCN namespace (``Json_config.make``).
NAMESPACE_FIELD = ("windows", "network", "networkNamespace")

Runner = Callable[..., subprocess.CompletedProcess[str]]

_GUID = re.compile(r"\{?[0-9A-Fa-f]{8}(?:-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}\}?")


class LeakedSandbox(Record):
    """One ``obuilder-hcs-*`` entry left in the worker's temp folder."""

    path: str
    name: str
    #: A symlink or junction: removed as a link, never followed (nothing behind it is read).
    is_link: bool = False
    has_config: bool = False
    #: Set when ``config.json`` exists but cannot be read, does not parse or has an odd shape.
    config_error: str | None = None
    #: The HCN namespace its config.json names (``windows.network.networkNamespace``).
    namespace: str | None = None
    #: It holds a ``secrets`` folder (the job's secrets, ``secrets/N/secret``).
    has_secrets: bool = False


class NamespaceDeletion(Record):
    """What became of the HCN namespace a leaked sandbox named."""

    namespace: str
    #: The tool ran and exited 0.
    deleted: bool = False
    #: Why the tool was not run (no tool configured, an id refused).
    skipped: str | None = None
    exit_code: int | None = None
    stderr: str | None = None
    #: The tool could not be run, or took too long.
    error: str | None = None


class SandboxResult(Record):
    """What one leaked sandbox's removal did; ``errors`` says what could not be done."""

    path: str
    is_link: bool = False
    secrets_removed: bool = False
    #: The folder (or the link) is gone.
    removed: bool = False
    namespace: NamespaceDeletion | None = None
    errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        ns_ok = self.namespace is None or self.namespace.deleted or self.namespace.skipped is not None
        return self.removed and not self.errors and ns_ok


# -- Finding ---------------------------------------------------------------------------------


def find(temp_dir: Path | str, prefix: str = DEFAULT_PREFIX) -> tuple[LeakedSandbox, ...]:
    """Every folder or link directly under ``temp_dir`` whose name starts with ``prefix``, by name.

    Plain files are not OBuilder's (``with_temp_dir`` makes folders) and are left out. A
    missing ``temp_dir`` has no leaks; one that cannot be listed raises its ``OSError``."""
    _check_prefix(prefix)
    top = os.fspath(temp_dir)
    try:
        names = sorted(os.listdir(platform.long_path(top)))
    except FileNotFoundError:
        return ()
    found = (_examine(os.path.join(top, name), name) for name in names if name.startswith(prefix))
    return tuple(leak for leak in found if leak is not None)


def _check_prefix(prefix: str) -> None:
    # An empty prefix would name everything in the temp folder.
    if not prefix or any(sep in prefix for sep in ("/", "\\", "\0")) or prefix in (".", ".."):
        raise ValueError(f"not a usable temp folder prefix: {prefix!r}")


def _examine(path: str, name: str) -> LeakedSandbox | None:
    try:
        kind = platform.entry_kind(os.lstat(platform.long_path(path)))
    except FileNotFoundError:
        return None  # gone meanwhile
    except OSError as e:
        return LeakedSandbox(path=path, name=name, config_error=f"cannot look at it: {_say(e)}")
    if kind in ("link", "dirlink"):
        return LeakedSandbox(path=path, name=name, is_link=True)
    if kind != "dir":
        return None
    has_config, namespace, error = _read_config(os.path.join(path, CONFIG_NAME))
    return LeakedSandbox(
        path=path,
        name=name,
        has_config=has_config,
        config_error=error,
        namespace=namespace,
        has_secrets=_lexists(os.path.join(path, SECRETS_NAME)),
    )


def _lexists(path: str) -> bool:
    try:
        os.lstat(platform.long_path(path))
    except FileNotFoundError:
        return False
    except OSError:
        return True  # there, though we may not look at it
    return True


def _read_config(path: str) -> tuple[bool, str | None, str | None]:
    """(whether config.json exists, the namespace it names, why it could not be read)."""
    try:
        kind = platform.entry_kind(os.lstat(platform.long_path(path)))
    except FileNotFoundError:
        return False, None, None
    except OSError as e:
        return True, None, f"cannot look at {CONFIG_NAME}: {_say(e)}"
    if kind != "file":
        return True, None, f"{CONFIG_NAME} is a {kind}, not a file: not followed"
    try:
        with platform.open_shared(path) as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as e:
        return True, None, f"cannot read {CONFIG_NAME}: {_say(e)}"
    if len(data) > CONFIG_MAX_BYTES:
        return True, None, f"{CONFIG_NAME} is larger than {CONFIG_MAX_BYTES} bytes: not read"
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return True, None, f"{CONFIG_NAME} does not parse: {e}"
    namespace, error = namespace_of(doc)
    return True, namespace, error


def namespace_of(doc: Any) -> tuple[str | None, str | None]:
    """The namespace an OCI config names at ``windows.network.networkNamespace`` (trimmed), or
    why the document has none we can use; (None, None) when it names none (no host network)."""
    node: Any = doc
    where = "the document"
    for field in NAMESPACE_FIELD:
        if not isinstance(node, Mapping):
            return None, f"{where} is not a JSON object"
        node = node.get(field)
        if node is None:
            return None, None
        where = ".".join(NAMESPACE_FIELD[: NAMESPACE_FIELD.index(field) + 1])
    if not isinstance(node, str):
        return None, f"{where} is not a string"
    namespace = node.strip()
    if not namespace:
        return None, f"{where} is empty"
    return namespace, None


# -- Removing --------------------------------------------------------------------------------


def remove(
    leaks: Iterable[LeakedSandbox],
    *,
    hcn_tool: str | None,
    run: Runner = subprocess.run,
    timeout: float = HCN_TIMEOUT,
) -> tuple[SandboxResult, ...]:
    """Remove each leak: its secrets first, then the whole folder (a link as a link), then its
    HCN namespace through ``hcn_tool delete NS`` when one is named and a tool is configured.

    Every step of every leak is tried whatever failed before; each result says what went."""
    return tuple(_remove_leak(leak, hcn_tool, run, timeout) for leak in leaks)


def _remove_leak(leak: LeakedSandbox, hcn_tool: str | None, run: Runner, timeout: float) -> SandboxResult:
    errors: list[str] = []
    secrets_removed = False
    if leak.has_secrets and not leak.is_link:
        secrets_removed = _attempt(os.path.join(leak.path, SECRETS_NAME), "secrets", errors)
    removed = _attempt(leak.path, "folder", errors)
    namespace = None
    if leak.namespace is not None:
        namespace = delete_namespace(leak.namespace, hcn_tool=hcn_tool, run=run, timeout=timeout)
    return SandboxResult(
        path=leak.path,
        is_link=leak.is_link,
        secrets_removed=secrets_removed,
        removed=removed,
        namespace=namespace,
        errors=tuple(errors),
    )


def _attempt(path: str, what: str, errors: list[str]) -> bool:
    try:
        platform.remove_tree(path)
    except OSError as e:
        errors.append(f"{what}: {_say(e)}")
        return False
    return True


def refusal(namespace: str) -> str | None:
    """Why a namespace id must not be handed to the tool, or None if it may be."""
    if namespace.startswith("-"):
        return "refused: an id beginning with '-' would be read as an option"
    if not namespace or any(c.isspace() or not c.isprintable() for c in namespace):
        return "refused: an id with blanks or control characters"
    return None


def delete_namespace(namespace: str, *, hcn_tool: str | None, run: Runner, timeout: float) -> NamespaceDeletion:
    """Run ``[hcn_tool, "delete", namespace]`` (an argument list, never a shell) within ``timeout``."""
    refused = refusal(namespace)
    if refused is not None:
        return NamespaceDeletion(namespace=namespace, skipped=refused)
    if not hcn_tool:
        return NamespaceDeletion(namespace=namespace, skipped="no hcn-namespace tool configured")
    try:
        done = _call(run, [hcn_tool, "delete", namespace], timeout)
    except subprocess.TimeoutExpired:
        return NamespaceDeletion(namespace=namespace, error=f"{hcn_tool} delete took longer than {timeout:g}s")
    except OSError as e:
        return NamespaceDeletion(namespace=namespace, error=f"cannot run {hcn_tool}: {_say(e)}")
    stderr = (done.stderr or "").strip()[-STDERR_KEPT:] or None
    code = done.returncode
    return NamespaceDeletion(namespace=namespace, deleted=code == 0, exit_code=code, stderr=stderr)


def _call(run: Runner, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return run(
        argv,
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
        **platform.child_process_options(),
    )


# -- Namespaces no run owns ------------------------------------------------------------------


def namespaces_not_owned(
    hcn_tool: str | None,
    live: set[str],
    run: Runner = subprocess.run,
    *,
    list_args: tuple[str, ...] | None = None,
    timeout: float = HCN_TIMEOUT,
) -> tuple[str, ...] | None:
    """The HCN namespaces the tool lists that no live run owns, to report (never to delete).

    OBuilder calls its ``hcn-namespace`` tool (mtelvers/hcn-namespace) with ``create`` and
    ``delete NS`` only (``lib/hcs_sandbox.ml``); no ``list`` command of it is documented, and a
    tool that knows no ``list`` might read an unknown command as ``create``. So without
    ``list_args`` (the arguments that make the configured tool list namespaces, e.g.
    ``("list",)`` for a tool known to have one) this returns None: we cannot tell.

    With them, the tool must exit 0 and print one namespace id (a GUID) a line; anything else
    is None too. Ids compare case-insensitively, braces aside. A namespace OBuilder created and
    leaked before it wrote config.json shows up only here. HNS holds other software's
    namespaces as well, so what this returns is not known to be OBuilder's."""
    if not hcn_tool or list_args is None:
        return None
    try:
        done = _call(run, [hcn_tool, *list_args], timeout)
    except (subprocess.TimeoutExpired, OSError):
        return None
    if done.returncode != 0:
        return None
    listed = [line.strip() for line in (done.stdout or "").splitlines() if line.strip()]
    if not all(_GUID.fullmatch(ns) for ns in listed):
        return None
    owned = {_same(ns) for ns in live}
    return tuple(sorted(ns for ns in dict.fromkeys(listed) if _same(ns) not in owned))


def _same(namespace: str) -> str:
    return namespace.strip().strip("{}").lower()


def _say(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror or e}{where}"
