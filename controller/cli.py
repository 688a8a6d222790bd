"""The ``reconcile`` command: its flags and exit codes.

Only what parsing needs is imported here, so ``--help`` and ``--version`` answer at
once; the work (settings, the core, the adapters) is imported once a run is asked
for (``controller.commands``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from controller import __version__
from controller.adapters import platform
from controller.model.errors import (
    CtrError,
    CtrNotFoundError,
    LockedError,
    PolicyError,
    ReconcileError,
    StoreReadError,
    StoreSanityError,
    UsageError,
)

EXIT_OK, EXIT_NOT_CONVERGED, EXIT_USAGE, EXIT_DRIFT = 0, 1, 2, 3

EPILOG = """\
exit codes:
  0  converged (with --dry-run: nothing to do)
  1  did not converge: stuck objects and their reasons are printed
  2  usage, policy or store-sanity error (nothing was touched)
  3  --dry-run found drift

environment:
  CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE, CONTAINERD_SNAPSHOTTER give the defaults
  of --address, --namespace and --snapshotter; flags override them.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reconcile",
        description=(
            "Keep an OBuilder HCS store and containerd in agreement: remove leaked obuilder-run-* "
            "containers, orphan obuilder-* snapshots (leaves first) and interrupted result-tmp/ "
            "entries, and never anything the store still needs."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="reconcile once to convergence, then exit (boot mode: the worker is not running)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument("--json", action="store_true", help="print the plan and summary as JSON on stdout")
    p.add_argument("--policy", metavar="FILE", help="ReconcilePolicy YAML (flags override it; it overrides defaults)")
    p.add_argument(
        "--store", metavar="ROOT", help="OBuilder store root (as in --store=hcs:ROOT); policy: spec.store.root"
    )
    p.add_argument(
        "--address",
        metavar="ADDR",
        help=f"containerd address (default: $CONTAINERD_ADDRESS, else {platform.DEFAULT_ADDRESS})",
    )
    p.add_argument(
        "--namespace", metavar="NS", help="containerd namespace (default: $CONTAINERD_NAMESPACE, else default)"
    )
    p.add_argument(
        "--snapshotter",
        metavar="NAME",
        help=f"snapshotter (default: $CONTAINERD_SNAPSHOTTER, else {platform.DEFAULT_SNAPSHOTTER})",
    )
    p.add_argument("--ctr", metavar="PATH", help=f"the ctr executable (default: {platform.DEFAULT_CTR})")
    p.add_argument(
        "--wait-for-containerd",
        metavar="DURATION",
        help="wait up to DURATION (30s, 5m) for containerd to answer before the first pass, for a boot step "
        "that may start before containerd (policy: spec.containerd.waitFor; default: do not wait)",
    )
    p.add_argument(
        "--force", action="store_true", help="allow --once boot semantics while a worker process appears to be running"
    )
    p.add_argument(
        "--explain",
        metavar="NAME",
        help="say which rule keeps a snapshot, container or result-tmp entry, or why it would go",
    )
    p.add_argument(
        "--max-passes",
        type=int,
        metavar="N",
        help="give up after N passes that each made progress (policy: spec.limits.maxPasses, default 10)",
    )
    p.add_argument(
        "--metrics-address",
        metavar="HOST:PORT",
        help="daemon: serve /metrics, /healthz, /readyz here ('off' disables; policy: spec.metrics.address, "
        "default 127.0.0.1:9847)",
    )
    p.add_argument(
        "--status-file",
        metavar="PATH",
        help="JSON status rewritten after each pass (default: STORE/state/obuilder-reconcile/status.json)",
    )
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON lines")
    p.add_argument("-v", "--verbose", action="store_true", help="list every object in the plan")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from controller.commands import run

    try:
        return run(args, os.environ)
    except (UsageError, PolicyError, StoreSanityError, LockedError, CtrNotFoundError) as e:
        print(f"reconcile: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (CtrError, StoreReadError) as e:
        print(f"reconcile: {e}", file=sys.stderr)
        return EXIT_NOT_CONVERGED
    except ReconcileError as e:
        print(f"reconcile: {e}", file=sys.stderr)
        return EXIT_NOT_CONVERGED
