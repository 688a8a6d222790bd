"""The ``reconcile`` command: its flags, its three subcommands and its exit codes.

Only what parsing needs is imported here, so ``--help`` and ``--version`` answer at
once; the work (settings, the core, the adapters) is imported once a run is asked
for (``controller.commands``), and ``check-policy`` imports the policy loader alone.

``reconcile [flags]`` is the tool (``--once`` at boot, the daemon without it);
``reconcile check [flags]`` reports every inconsistency, read-only (``controller.commands.run_check``);
``reconcile check-policy FILE`` validates a policy with no store, worker or containerd;
``reconcile service [flags]`` is the Windows service (``controller.service``). The three
words are recognised only as the first argument, so every flag-style command line keeps
its meaning.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from controller import __version__
from controller.adapters import platform
from controller.model.errors import EXIT_RULES, ExitCode, ReconcileError, UsageError, exit_code_for

if TYPE_CHECKING:
    from controller.config.invocation import Invocation


def _exit_codes() -> str:
    import textwrap

    lines = ["exit codes ([worker starts] or [worker stays down]: what the Windows service and the boot unit do):"]
    for rule in EXIT_RULES:
        verdict = "worker starts" if rule.start_worker else "worker stays down"
        lines += textwrap.wrap(
            f"{int(rule.code)}  {rule.meaning} [{verdict}]", 96, initial_indent="  ", subsequent_indent="     "
        )
    return "\n".join(lines)


EPILOG = f"""\
{_exit_codes()}

subcommands (first argument only):
  check [flags]       list every inconsistency between result/, result-tmp/, cache-tmp/, the DB
                      and containerd (read-only, worker up or down): exit 0 clean, 1 findings
                      (reconcile check --help)
  check-policy FILE   validate a policy (no store, worker or containerd needed): exit 0 and
                      a one-line summary (--json: the effective policy), or exit 2 with
                      FILE:LINE:COLUMN
  service [flags]     the Windows service: boot pass while start-pending, then the daemon
                      (--console runs it in a console; elsewhere than Windows it always does)

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
    _what_to_do(p)
    _where(p)
    _how_to_report(p)
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _what_to_do(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--once",
        action="store_true",
        help="reconcile once to convergence, then exit (boot mode: the worker is not running)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    p.add_argument(
        "--plan-out",
        metavar="FILE",
        help="with --once --dry-run: write the plan, with the identity of every object it removes, for "
        "`reconcile apply FILE` to perform exactly",
    )
    p.add_argument("--json", action="store_true", help="print the plan and summary as JSON on stdout")
    p.add_argument(
        "--force", action="store_true", help="allow --once boot semantics while a worker process appears to be running"
    )
    p.add_argument(
        "--explain",
        metavar="NAME",
        help="say which rule keeps a snapshot, container or result-tmp entry, or why it would go",
    )
    p.add_argument(
        "--repair",
        action="append",
        metavar="CLASS[,CLASS]",
        help="with --once, before the passes: opt-in repairs of OBuilder's DB and result/ (poisoned-result, "
        "row-without-result, rc, result-without-row), only when the worker check passes (never with --force), "
        "the store lock held, after a backup of the DB into STORE/state/obuilder-reconcile/; replaces the "
        "policy's spec.repair.classes (reconcile check lists what each would do)",
    )
    p.add_argument(
        "--max-passes",
        type=int,
        metavar="N",
        help="give up after N passes that each made progress (policy: spec.limits.maxPasses, default 10)",
    )


def build_apply_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reconcile apply",
        description="Perform exactly a plan written by `reconcile --once --dry-run --plan-out FILE`: only its "
        "actions whose object still has the identity it was planned on (a snapshot's Created, a container's "
        "creation time, an entry's stamps) and that the rules still plan; the rest is left alone and said. "
        "Boot semantics, as --once: the worker must be down. Refuses a plan made for another store or policy. "
        "Exit 0: all done; 1: something was left alone or failed.",
    )
    p.add_argument("plan_file", metavar="FILE", help="the plan")
    _where(p)
    p.add_argument(
        "--force", action="store_true", help="apply while a worker process appears to be running (as --once --force)"
    )
    p.add_argument("--json", action="store_true", help="print what was done and left alone as JSON")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="log lines as text or JSON lines")
    return p


def apply(argv: Sequence[str]) -> int:
    def run(args: Invocation) -> int:
        from controller.commands import run_apply

        return run_apply(args, os.environ)

    return _subcommand(build_apply_parser(), argv, run)


def _subcommand(parser: argparse.ArgumentParser, argv: Sequence[str], run: Callable[[Invocation], int]) -> int:
    """A subcommand's flags, then its run (imported only now: `--help` stays fast); our errors as exit codes."""
    args = invocation(parser.parse_args(argv))
    try:
        return run(args)
    except ReconcileError as e:
        print(f"reconcile: {e}", file=sys.stderr)
        return int(exit_code_for(e))


def _where(p: argparse.ArgumentParser) -> None:
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


def _how_to_report(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--log-file",
        metavar="PATH",
        help="append log lines to PATH (UTF-8, rotated at 10 MB, 5 kept) instead of stderr",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="list every object in the plan")


def build_service_parser() -> argparse.ArgumentParser:
    """``reconcile service``: the daemon's flags, and how to host it."""
    p = build_parser()
    p.prog = "reconcile service"
    p.description = (
        "The reconcile service: waits for containerd, runs the boot pass (--once semantics) while it reports "
        "start-pending, then reports running and goes on as the daemon; a stop lets the action under way finish. "
        "The worker, which depends on it, ends running unless starting it would do harm (a store that is not "
        "ready, another repair holding the lock): those are tried again while start-pending, then stop the "
        "service as failed, with the reason."
    )
    p.add_argument(
        "--console",
        action="store_true",
        help="run in this console (Ctrl-C or Ctrl-Break stops it) instead of under the Windows service manager",
    )
    p.add_argument(
        "--service-name",
        default="obuilder-reconcile",
        metavar="NAME",
        help="the service's name (its Event Log source; default obuilder-reconcile)",
    )
    p.add_argument(
        "--state-dir",
        default=None,
        metavar="DIR",
        help="where the service remembers, past a restart, that it kept the worker down (default: "
        + platform.machine_state_dir()
        + ")",
    )
    return p


def build_check_policy_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reconcile check-policy",
        description="Validate a ReconcilePolicy file: no store, worker or containerd needed.",
    )
    p.add_argument("file", metavar="FILE")
    p.add_argument(
        "--json",
        action="store_true",
        help="print the effective policy (every default filled in, camelCase as in the file) as JSON, "
        "e.g. for an installer to read spec.worker.processNames and spec.worker.serviceName",
    )
    return p


CHECK_EPILOG = """\
finding classes (severity; repair):
  result-missing-snapshot  result/ID whose KEY-committed snapshot is gone: Db_store.get_build takes it
                           as built and the next step fails to prepare (error; --repair poisoned-result)
  row-without-result       a DB row with no result/ID (warning; --repair row-without-result)
  result-without-row       result/ID with no DB row: never pruned (warning; --repair result-without-row)
  rc-mismatch              a row whose rc is not the number of rows naming it as parent: Dao.lru takes
                           only rc = 0 rows (warning; --repair rc)
  orphan-snapshot          an obuilder-* snapshot nothing keeps (warning; reconcile --once)
  leftover-container       an obuilder-run-* container no build uses (warning; reconcile --once)
  stale-result-tmp         an interrupted result-tmp/ entry (info; reconcile --once)
  cache-tmp-leftover       a cache-tmp/ entry left at start-up (info; reconcile --once)

With the worker surely down, what it left is judged with boot semantics; otherwise only what is
surely dead is reported (no age counts in one look). Nothing is changed.

exit codes:
  0  clean: the store, its DB and containerd agree
  1  findings (listed on stdout; --json: one JSON document)
  2 and above: as for reconcile (usage, store not ready, containerd unreachable...)
"""


def build_check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reconcile check",
        description="Report every inconsistency between result/, result-tmp/, cache-tmp/, OBuilder's DB and "
        "containerd's snapshots and containers, with what OBuilder does with each and the repair that exists "
        "for it. Read-only; the worker may be up or down.",
        epilog=CHECK_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _where(p)
    p.add_argument("--json", action="store_true", help="print the report as one JSON document")
    return p


def check(argv: Sequence[str]) -> int:
    def run(args: Invocation) -> int:
        from controller.commands import run_check

        return run_check(args, os.environ)

    return _subcommand(build_check_parser(), argv, run)


def check_policy(argv: Sequence[str]) -> int:
    args = build_check_policy_parser().parse_args(argv)
    from pathlib import Path

    from controller.config.policy import load_policy
    from controller.model.policy import format_duration

    try:
        policy = load_policy(Path(args.file))
    except ReconcileError as e:
        print(f"reconcile: {e}", file=sys.stderr)
        return int(exit_code_for(e))
    if args.json:
        import json

        print(json.dumps(policy.model_dump(mode="json", by_alias=True), indent=2))
        return int(ExitCode.OK)
    spec = policy.spec
    protect = spec.protect
    print(
        f"{args.file}: ok: ReconcilePolicy {policy.metadata.name!r}: "
        f"store {spec.store.root or '(none: pass --store)'}, "
        f"protects {len(protect.base_images)} base images and {len(protect.snapshot_keys)} key globs, "
        f"gracePeriod {format_duration(spec.timing.grace_period)}, interval {format_duration(spec.timing.interval)}, "
        f"worker processes {', '.join(spec.worker.process_names) or '(none)'}"
        + (f", worker service {spec.worker.service_name}" if spec.worker.service_name else "")
    )
    return int(ExitCode.OK)


def invocation(args: argparse.Namespace) -> Invocation:
    """The parsed flags as the typed, frozen record the rest of the program reads."""
    from controller.config.invocation import Invocation

    fields = {name: getattr(args, name) for name in Invocation._fields if hasattr(args, name)}
    if fields.get("repair") is not None:
        fields["repair"] = tuple(fields["repair"])
    return Invocation(**fields)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["check-policy"]:
        return check_policy(argv[1:])
    if argv[:1] == ["check"]:
        return check(argv[1:])
    if argv[:1] == ["apply"]:
        return apply(argv[1:])
    service = argv[:1] == ["service"]
    parsed = (build_service_parser() if service else build_parser()).parse_args(argv[1:] if service else argv)
    args = invocation(parsed)
    try:
        if service:
            from controller.commands import run_service

            if args.repair is not None:
                raise UsageError("reconcile service takes its repairs from spec.repair.classes, not --repair")

            return int(run_service(args, os.environ))
        from controller.commands import run

        return run(args, os.environ)
    except ReconcileError as e:
        print(f"reconcile: {e}", file=sys.stderr)
        return int(exit_code_for(e))
