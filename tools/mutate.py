#!/usr/bin/env python3
"""A mutation run over the safety rules: which rule could break with no test noticing?

Each mutant is NAMED and breaks one rule of DESIGN.md's "Desired state" or "Safety invariants"
(a keep rule of the planner, the last look before removal, removing store entries without
leaving the store, the sorting of ctr's errors, names never read as options). For each one:

1. the working tree is copied once to a temporary folder (without .venv, .git, .cache), and
   the selected tests are run on that unmutated copy first: a kill means nothing if they
   fail without a mutant (another engineer's half-done edit, say);
2. each mutant gets its own copy of that snapshot with ``old`` replaced by ``new`` (``old``
   must occur exactly once, or the run stops naming the mutant: source drift never skips one
   silently) and its tests run there, with PYTHONPATH on the copy (checked: ``controller`` is
   imported from the copy, not from the editable install);
3. a table says, for each mutant, which test killed it, or SURVIVED; the exit status is
   non-zero when one survived. A kill by a test the mutant does not list counts only if that
   test fails again on the mutant and passes without it (suites run side by side can disturb
   each other); otherwise the test is set aside and the mutant's run goes on without it.

By default a mutant runs only the tests listed in its ``killed_by`` (fast); ``--all-tests``
runs the whole suite that needs no containerd instead. Mutants run two at a time.

    python tools/mutate.py                  # every mutant, its own tests
    python tools/mutate.py --list           # the mutants, their rules and tests
    python tools/mutate.py --only NAME      # one mutant (repeatable)
    python tools/mutate.py --all-tests      # each mutant against `pytest -m "not containerd"`
    python tools/mutate.py --all-tests -- --ignore=tests/test_safety_rules.py   # pytest options after --

No dependency beyond the project's .venv: mutmut mutates every operator everywhere and
takes hours; this mutates what a safety rule rests on, each mutant a sentence.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
#: Not copied: the virtualenv, git's data, downloads, and caches a run would only trip over.
SKIPPED_TOP = frozenset({".venv", ".git", ".cache", "demo-run", "build"})
SKIPPED_ANYWHERE = frozenset({"__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".hypothesis"})
PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not containerd")
#: A mutant's tests must finish within this (seconds); pytest-timeout stops a single hung test first.
RUN_TIMEOUT = 900.0
JOBS = 2

PLANNER = "controller/core/planner.py"
IDENTITY = "controller/core/identity.py"
CLEANER = "controller/adapters/store_cleanup.py"
PLATFORM = "controller/adapters/platform.py"
CTR = "controller/adapters/ctr.py"
AGES = "controller/core/ages.py"
STORE = "controller/adapters/store.py"
COMMANDS = "controller/commands.py"

RULES_TESTS = "tests/test_safety_rules.py"
CLOCK_TESTS = "tests/test_clock_steps.py"
PASSES_TESTS = "tests/test_passes.py"
WORKER_TESTS = "tests/test_worker_question.py"


@dataclass(frozen=True)
class Mutant:
    """One way to break one safety rule: ``old`` (occurring exactly once in ``path``) becomes ``new``."""

    name: str
    rule: str
    path: str
    old: str
    new: str
    #: The tests expected to kill it (pytest node ids); the run uses only these unless --all-tests.
    killed_by: tuple[str, ...] = ()


def t(name: str, file: str = RULES_TESTS) -> str:
    """A test's node id."""
    return f"{file}::{name}"


def c(name: str) -> str:
    """A clock-step test's node id."""
    return t(name, CLOCK_TESTS)


MUTANTS: tuple[Mutant, ...] = (
    # -- the planner's keep rules (controller/core/planner.py) -------------------------------
    Mutant(
        "result-keeps-active-not-committed",
        "keep rule 1: result/ID keeps KEY-committed",
        PLANNER,
        'yield Claim(key + "-committed", Rule.RESULT,',
        "yield Claim(key, Rule.RESULT,",
        (t("test_rule_1_a_finished_result_keeps_its_committed_snapshot_and_its_chain"),),
    ),
    Mutant(
        "live-build-drops-active",
        "keep rule 2: a live build (daemon) keeps KEY",
        PLANNER,
        'for k in (key, key + "-committed"):\n                yield Claim(k, Rule.LIVE_BUILD',
        'for k in (key + "-committed",):\n                yield Claim(k, Rule.LIVE_BUILD',
        (t("test_rule_2_a_live_build_keeps_its_active_and_committed_snapshot_and_its_entry"),),
    ),
    Mutant(
        "live-build-drops-committed",
        "keep rule 2: a live build (daemon) keeps KEY-committed",
        PLANNER,
        'for k in (key, key + "-committed"):\n                yield Claim(k, Rule.LIVE_BUILD',
        "for k in (key,):\n                yield Claim(k, Rule.LIVE_BUILD",
        (t("test_rule_2_a_live_build_keeps_its_active_and_committed_snapshot_and_its_entry"),),
    ),
    Mutant(
        "daemon-result-tmp-interrupted",
        "boot vs daemon: in daemon mode a result-tmp/ entry is a live build, not an interrupted one",
        PLANNER,
        '    if mode is Mode.BOOT:\n        return False, f"boot: {name} is an interrupted build"',
        '    if True:\n        return False, f"boot: {name} is an interrupted build"',
        (t("test_rule_2_a_live_build_keeps_its_active_and_committed_snapshot_and_its_entry"),),
    ),
    Mutant(
        "protect-glob-exact-only",
        "keep rule 3: the policy protects keys by glob",
        PLANNER,
        "matched = [k for k in owned if fnmatchcase(k, pattern)]",
        "matched = [k for k in owned if k == pattern]",
        (t("test_rule_3_protection_by_key_glob_and_by_base_image_reference"),),
    ),
    Mutant(
        "protect-base-image-unhashed",
        "keep rule 3: a base image reference protects obuilder-base-SHA256(reference)",
        PLANNER,
        "base = base_image_key(ref)",
        'base = "obuilder-base-" + ref',
        (t("test_rule_3_protection_by_key_glob_and_by_base_image_reference"),),
    ),
    Mutant(
        "protect-base-image-drops-committed",
        "keep rule 3: a protected base image keeps obuilder-base-SHA256-committed too",
        PLANNER,
        'found = [k for k in (base, base + "-committed") if k in w.owned]',
        "found = [k for k in (base,) if k in w.owned]",
        (t("test_rule_3_protection_by_key_glob_and_by_base_image_reference"),),
    ),
    Mutant(
        "container-snapshot-key-ignored",
        "keep rule 4: a kept container keeps its SnapshotKey",
        PLANNER,
        "        if c.snapshot_key:\n            yield Claim(c.snapshot_key, Rule.CONTAINER",
        "        if not c.snapshot_key:\n            yield Claim(c.snapshot_key, Rule.CONTAINER",
        (t("test_rule_4_a_kept_container_keeps_its_snapshot_key"),),
    ),
    Mutant(
        "container-root-path-ignored",
        "keep rule 4: a container on a build's folder by root path (Linux) keeps that build's KEY",
        PLANNER,
        "return ([c.root_path] if c.root_path else []) + list(c.layer_folders[-1:])",
        "return list(c.layer_folders[-1:])",
        (t("test_rule_4_a_container_on_a_builds_folder_by_root_path_keeps_that_build"),),
    ),
    Mutant(
        "container-first-layer-folder",
        "keep rule 4: a container runs on its LAST layer folder (Windows), which names its build",
        PLANNER,
        "return ([c.root_path] if c.root_path else []) + list(c.layer_folders[-1:])",
        "return ([c.root_path] if c.root_path else []) + list(c.layer_folders[:1])",
        (t("test_rule_4_a_windows_container_keeps_the_build_of_its_last_layer_folder"),),
    ),
    Mutant(
        "ancestors-not-kept",
        "keep rule 5: the ancestors of a kept snapshot are kept",
        PLANNER,
        "        key = parent_of.get(root.key)\n",
        "        key = None\n",
        (t("test_rule_1_a_finished_result_keeps_its_committed_snapshot_and_its_chain"),),
    ),
    Mutant(
        "ancestors-parent-only",
        "keep rule 5: every ancestor is kept, up the whole chain",
        PLANNER,
        "            key = parent_of.get(key)\n    return out",
        "            key = None\n    return out",
        (t("test_rule_1_a_finished_result_keeps_its_committed_snapshot_and_its_chain"),),
    ),
    Mutant(
        "foreign-child-ignored",
        "an owned snapshot with a child we do not own is kept (it cannot go without touching that child)",
        PLANNER,
        "if s.key not in w.owned and s.parent in w.owned:",
        "if False:",
        (t("test_a_snapshot_we_do_not_own_keeps_its_owned_parent"),),
    ),
    Mutant(
        "unreadable-drops-active",
        "an unreadable layerinfo keeps every key OBuilder could have used (KEY)",
        PLANNER,
        "            yield Claim(key, Rule.UNREADABLE, why)\n",
        "            pass\n",
        (t("test_an_unreadable_layerinfo_keeps_the_keys_obuilder_could_have_used"),),
    ),
    Mutant(
        "unreadable-drops-committed",
        "an unreadable layerinfo keeps every key OBuilder could have used (KEY-committed)",
        PLANNER,
        '            yield Claim(key + "-committed", Rule.UNREADABLE, why)\n',
        "            pass\n",
        (t("test_an_unreadable_layerinfo_keeps_the_keys_obuilder_could_have_used"),),
    ),
    Mutant(
        "unreadable-result-removed-at-boot",
        "at boot only result-tmp/ is interrupted: an unreadable result/ still keeps its keys",
        PLANNER,
        'if e.layerinfo_error is None or (e.area == "result-tmp" and w.mode is Mode.BOOT):',
        "if e.layerinfo_error is None or w.mode is Mode.BOOT:",
        (t("test_an_unreadable_layerinfo_keeps_the_keys_obuilder_could_have_used"),),
    ),
    Mutant(
        "daemon-running-container-removed",
        "daemon: a live build is never disturbed (a container whose task is live stays)",
        PLANNER,
        'return Rule.RUNNING, f"{task}: a live build is never disturbed"',
        'return Rule.LEFTOVER, f"{task}: a live build is never disturbed"',
        (t("test_daemon_a_container_whose_task_runs_is_never_disturbed"),),
    ),
    Mutant(
        "daemon-cache-tmp-purged",
        "cache-tmp/ is purged at boot only (the worker may use it while it runs)",
        PLANNER,
        "    if w.mode is not Mode.BOOT:\n        return ()\n    names = sorted(w.observation.store.cache_tmp)",
        "    names = sorted(w.observation.store.cache_tmp)",
        (t("test_cache_tmp_is_purged_at_boot_only"),),
    ),
    Mutant(
        "snapshot-prefix-ignored",
        "ownership: a snapshot whose key lacks the owned prefix is never touched",
        PLANNER,
        "owned = {k for k in parent_of if k.startswith(options.snapshot_prefix)}",
        "owned = set(parent_of)",
        (t("test_ownership_what_lacks_our_prefixes_is_never_touched"),),
    ),
    Mutant(
        "container-prefix-ignored",
        "ownership: a container whose id lacks the owned prefix is never touched",
        PLANNER,
        "        if not c.id.startswith(options.container_prefix):\n            continue\n",
        "",
        (t("test_ownership_what_lacks_our_prefixes_is_never_touched"),),
    ),
    # -- the last look before removal (controller/core/identity.py) --------------------------
    Mutant(
        "guard-ignores-recreated-key",
        "last look: a key re-created since planned (another Created) is not removed",
        IDENTITY,
        "elif planned is None or created != planned:",
        "elif planned is None:",
        (t("test_last_look_a_key_recreated_since_planned_is_not_removed"),),
    ),
    Mutant(
        "guard-ignores-new-result",
        "last look: a result/ID that appeared since planned keeps its build's keys",
        IDENTITY,
        'if self.store_has("result", build):',
        "if False:",
        (t("test_last_look_a_result_that_appeared_since_planned_keeps_its_keys"),),
    ),
    Mutant(
        "guard-ignores-new-result-tmp",
        "last look: a result-tmp/ID that appeared since planned keeps its build's keys",
        IDENTITY,
        'elif build not in stale_tmp and self.store_has("result-tmp", build):',
        "elif False:",
        (t("test_last_look_a_result_tmp_that_appeared_since_planned_keeps_its_keys"),),
    ),
    Mutant(
        "guard-gone-is-failure",
        "last look: a key gone before its removal is done (not found), never a failure",
        IDENTITY,
        'out[key] = Result(Outcome.NOT_FOUND, "gone before its removal")',
        'out[key] = Result(Outcome.FAILED, "gone before its removal")',
        (t("test_last_look_a_key_gone_before_its_removal_is_done_not_stuck"),),
    ),
    Mutant(
        "guard-committed-key-not-its-build",
        "last look: KEY-committed belongs to build ID (obuilder-ID-committed)",
        IDENTITY,
        'rest = key[len(prefix) :].removesuffix("-committed")',
        "rest = key[len(prefix) :]",
        (t("test_last_look_a_result_that_appeared_since_planned_keeps_its_keys"),),
    ),
    # -- removing store entries (controller/adapters/store_cleanup.py, platform.py) ---------
    Mutant(
        "cleaner-enters-mount",
        "store cleaner: an entry with a file system mounted inside is left whole (never entered)",
        CLEANER,
        "            if mounted:\n                # What is mounted there",
        "            if False:\n                # What is mounted there",
        (t("test_an_entry_with_a_mount_inside_is_left_whole"),),
    ),
    Mutant(
        "cleaner-follows-area-link",
        "store cleaner: an area (result-tmp/, cache-tmp/) that is a link out of the store is never followed",
        CLEANER,
        "if folder.resolve() != self.root.resolve() / area:",
        "if False:",
        (t("test_an_area_that_is_a_link_out_of_the_store_is_never_followed"),),
    ),
    Mutant(
        "cleaner-accepts-dotdot",
        "store cleaner: a name read from disk is a plain entry name (no separator, no ..)",
        CLEANER,
        'if not name or name in (".", "..") or os.sep in name or (os.altsep and os.altsep in name):',
        'if not name or name in (".",):',
        (t("test_a_name_that_is_not_a_plain_entry_name_removes_nothing"),),
    ),
    Mutant(
        "cleaner-empties-linked-trash",
        "store cleaner: a trash folder that is a link out of the store is never emptied",
        CLEANER,
        "        if trash.resolve() != self.root.resolve().joinpath(*TRASH_DIR):\n            return None\n",
        "",
        (t("test_a_trash_folder_that_is_a_link_out_of_the_store_is_never_emptied", "tests/test_files.py"),),
    ),
    Mutant(
        "cleaner-cache-tmp-wrong-area",
        "store cleaner: cache-tmp/NAME removes that cache-tmp/ entry and nothing else",
        CLEANER,
        'return self._remove("cache-tmp", name)',
        'return self._remove("result-tmp", name)',
        (t("test_a_cache_tmp_entry_is_removed_and_nothing_else"),),
    ),
    Mutant(
        "remove-follows-entry-link",
        "removal: an entry that is a link is removed as a link, never followed",
        PLATFORM,
        '    if entry_kind(st) != "dir":\n        _remove_one(',
        '    if entry_kind(st) != "dir" and not os.path.isdir(top):\n        _remove_one(',  # isdir follows links
        (t("test_an_entry_that_is_a_link_is_removed_as_a_link"),),
    ),
    Mutant(
        "remove-follows-inner-link",
        "removal: a link inside an entry is removed as a link, never followed",
        PLATFORM,
        "                    elif entry.is_symlink():\n"
        '                        kind = "link"\n'
        "                    else:\n"
        '                        kind = "dir" if entry.is_dir(follow_symlinks=False) else "file"\n',
        '                    else:\n                        kind = "dir" if entry.is_dir() else "file"\n',
        (t("test_links_inside_an_entry_are_removed_as_links", "tests/test_files.py"),),
    ),
    # -- ctr: sorting its errors, counting what it removed, passing names (ctr.py) ----------
    Mutant(
        "ctr-has-child-is-failure",
        "ctr: 'cannot remove snapshot with child' is has-child (retried once its children go)",
        CTR,
        "        return Result(Outcome.HAS_CHILD, message)",
        "        return Result(Outcome.FAILED, message)",
        (t("test_errors_are_classified", "tests/test_ctr.py"),),
    ),
    Mutant(
        "ctr-any-not-found-is-gone",
        "ctr: 'not found' means gone only when it is about the object named",
        CTR,
        'if message.endswith(": not found") and (name is None or _about(message, name)):',
        'if message.endswith(": not found"):',
        (t("test_not_found_means_the_named_object_is_gone_never_a_loose_match", "tests/test_ctr.py"),),
    ),
    Mutant(
        "ctr-other-error-is-gone",
        "ctr: any other error is a failure, never a removal",
        CTR,
        "    return Result(Outcome.FAILED, message)\n\n\ndef _about",
        "    return Result(Outcome.NOT_FOUND, message)\n\n\ndef _about",
        (t("test_errors_are_classified", "tests/test_ctr.py"),),
    ),
    Mutant(
        "ctr-rm-without-lines-counts-all",
        "ctr: a containers rm / tasks delete that fails without per-id lines counts no id as removed",
        CTR,
        "if proc.returncode != 0 and not failures:",
        "if False:",
        (t("test_a_container_removal_that_fails_without_naming_ids_counts_none_removed"),),
    ),
    Mutant(
        "ctr-snapshots-rm-unknown-failure-counts-all",
        "ctr: a snapshots rm failure that names no key counts no key as removed",
        CTR,
        "results.update((k, Result(Outcome.NOT_TRIED, message)) for k in pending)",
        "results.update((k, Result(Outcome.REMOVED)) for k in pending)",
        (t("test_a_snapshot_removal_that_fails_without_naming_a_key_counts_none_removed"),),
    ),
    Mutant(
        "ctr-listing-splits-keys",
        "ctr: a key with blanks is read whole from snapshots ls (cells cut at the header's columns)",
        CTR,
        'return {name: line[start:end].rstrip(" ") for name, start, end in columns}',
        'return {name: (line[start:end].split() or [""])[0] for name, start, end in columns}',
        (t("test_table_is_cut_at_header_columns_not_blanks", "tests/test_ctr.py"),),
    ),
    Mutant(
        "ctr-removal-splits-keys",
        "ctr: a key with blanks is passed to snapshots rm whole, never split",
        CTR,
        '"rm", "--", *pending]',
        '"rm", "--", *" ".join(pending).split()]',
        (t("test_a_key_with_blanks_is_removed_whole_and_never_split"),),
    ),
    Mutant(
        "ctr-snapshots-rm-without-dashdash",
        "ctr: a key is never read as an option (snapshots rm -- KEYS)",
        CTR,
        '"rm", "--", *pending]',
        '"rm", *pending]',
        (t("test_names_are_never_read_as_options"),),
    ),
    Mutant(
        "ctr-snapshots-info-without-dashdash",
        "ctr: a key is never read as an option (snapshots info -- KEY, the last look's question)",
        CTR,
        '"info", "--", key]',
        '"info", key]',
        (t("test_names_are_never_read_as_options"),),
    ),
    Mutant(
        "ctr-remove-each-without-dashdash",
        "ctr: an id is never read as an option (tasks delete / containers rm -- IDS)",
        CTR,
        'self.run([*command, "--", *chunk])',
        "self.run([*command, *chunk])",
        (t("test_names_are_never_read_as_options"),),
    ),
    # -- ages no clock step can inflate (controller/core/ages.py, the planner's age rules) ----
    Mutant(
        "age-is-the-wall-clock-age",
        "ages: an age is never more than this process watched (a forward step of the wall clock)",
        AGES,
        "    return min(seen, wall_age(stamped_at, now, net_step))",
        "    return wall_age(stamped_at, now, net_step)",
        (c("test_a_snapshot_younger_than_its_grace_period_stays_whatever_the_wall_clock_steps_forward"),),
    ),
    Mutant(
        "watch-outlives-its-stamp",
        "ages: time watched under another stamp (a re-created key) counts for nothing",
        AGES,
        "    if watch is None or watch.stamp != stamp:\n        return timedelta(0)",
        "    if watch is None:\n        return timedelta(0)",
        (c("test_time_watched_under_another_created_counts_for_nothing"),),
    ),
    Mutant(
        "watch-carried-across-a-new-stamp",
        "ages: an object under a new stamp is watched from zero (ids repeat; an entry that changed)",
        AGES,
        "if old is not None and (stamp is None or stamp == old.stamp):",
        "if old is not None:",
        (
            t("test_history_watches_containers_by_identity_and_state_and_forgets_what_went", PASSES_TESTS),
            c("test_a_live_builds_result_tmp_entry_stays_whatever_the_step_and_goes_once_watched_unchanged"),
        ),
    ),
    Mutant(
        "wall-age-ignores-a-backward-step",
        "ages: after a backward step, a stamp from before it is read on the clock as it was",
        AGES,
        "    return max(now, now - net_step) - stamped_at",
        "    return now - stamped_at",
        (c("test_after_a_backward_step_a_leak_still_goes_within_its_grace_period"),),
    ),
    Mutant(
        "a-step-is-never-seen",
        "ages: a step of the wall clock between two passes is seen (and reported once)",
        AGES,
        "    if abs(step) <= max(STEP_TOLERANCE, SLEW * elapsed):",
        "    if True:",
        (
            c("test_after_a_backward_step_a_leak_still_goes_within_its_grace_period"),
            c("test_a_step_is_reported_once_with_its_size_and_a_slew_is_no_step"),
        ),
    ),
    Mutant(
        "grace-by-the-wall-clock",
        "keep rule 6: a snapshot's grace period counts what was watched, not now - Created",
        PLANNER,
        "        age = w.age(watches, k, ages.stamp_of(created), created)",
        "        age = w.now - created",
        (c("test_a_snapshot_younger_than_its_grace_period_stays_whatever_the_wall_clock_steps_forward"),),
    ),
    Mutant(
        "max-task-age-ignored",
        "containers: a running task older than maxTaskAge (as watched) is a leftover",
        PLANNER,
        "        if options.max_task_age is not None and age > options.max_task_age:",
        "        if False:",
        (c("test_max_task_age_counts_what_was_watched_running_not_the_wall_clock"),),
    ),
    Mutant(
        "max-task-age-by-the-wall-clock",
        "containers: maxTaskAge counts what was watched running, never the wall clock alone",
        PLANNER,
        "            age = w.age(history.live_containers, c.id, stamp, c.created_at)",
        "            age = w.now - c.created_at if c.created_at else timedelta(0)",
        (c("test_max_task_age_counts_what_was_watched_running_not_the_wall_clock"),),
    ),
    Mutant(
        "idle-container-without-grace",
        "containers: a stopped container waits its grace period as watched before it goes",
        PLANNER,
        "    if age < options.grace_period:\n        return Rule.GRACE",
        "    if False:\n        return Rule.GRACE",
        (c("test_a_stopped_container_waits_its_grace_period_on_the_monotonic_clock"),),
    ),
    Mutant(
        "stale-after-ignored",
        "result-tmp: a live build's entry stays until watched unchanged for staleAfter",
        PLANNER,
        "    if age < options.stale_after:",
        "    if False:",
        (c("test_a_live_builds_result_tmp_entry_stays_whatever_the_step_and_goes_once_watched_unchanged"),),
    ),
    Mutant(
        "stale-after-by-the-wall-clock",
        "result-tmp: staleAfter counts what was watched, not now - mtime",
        PLANNER,
        "            age = w.age(w.observation.history.tmp_entries, e.id, ages.entry_stamp(e), e.changed_at)",
        "            age = w.now - e.changed_at",
        (c("test_a_live_builds_result_tmp_entry_stays_whatever_the_step_and_goes_once_watched_unchanged"),),
    ),
    Mutant(
        "entry-stamps-ignored",
        "result-tmp: a write a stepped clock dated in the past is still a change (the entry's stamps)",
        AGES,
        "    return e.stamps or stamp_of(e.changed_at)",
        "    return stamp_of(e.changed_at)",
        (c("test_a_live_builds_result_tmp_entry_stays_whatever_the_step_and_goes_once_watched_unchanged"),),
    ),
    Mutant(
        "entry-stamps-only-the-newest-mtime",
        "result-tmp: an entry's stamps change with any of its top files' stamps",
        STORE,
        "            digest.update(_stamp_bytes(name, cst))",
        "            pass",
        (c("test_a_write_the_stepped_clock_dated_in_the_past_still_changes_an_entrys_stamps"),),
    ),
    # -- is the worker running? cannot tell is yes ---------------------------------------------
    Mutant(
        "cannot-tell-is-no",
        "worker: a listing that cannot tell is treated as a running worker (exit 9, nothing touched)",
        COMMANDS,
        "    if sighting.answer is platform.WorkerAnswer.CANNOT_TELL:",
        "    if False:",
        (t("test_once_exits_9_with_the_reason_and_touches_nothing_when_it_cannot_tell", WORKER_TESTS),),
    ),
    Mutant(
        "empty-listing-is-no-worker",
        "worker: a process listing that names no process cannot tell",
        PLATFORM,
        '    if not names:\n        raise CannotTell("the process listing named no process at all, not even this one")',
        "    if False:\n        pass",
        (t("test_a_listing_that_names_no_process_is_cannot_tell", WORKER_TESTS),),
    ),
    Mutant(
        "listing-failure-is-no-worker",
        "worker: a process listing that fails cannot tell",
        PLATFORM,
        '        raise CannotTell(f"listing processes failed: {type(e).__name__}: {e}") from e',
        "        return {}",
        (t("test_a_listing_that_raises_is_cannot_tell", WORKER_TESTS),),
    ),
)


# -- running -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    mutant: Mutant
    #: "killed", "survived" or "error" (the tests could not run: none collected, say).
    verdict: str
    #: The first failing test's id (or what stopped the run), when killed.
    killed_by: str
    seconds: float
    output: str
    #: Tests that failed on the mutant but also fail without it (or not again): set aside, not kills.
    flaky: tuple[str, ...] = ()


class DriftError(Exception):
    """Raised when a mutant's ``old`` does not occur exactly once in its file."""


def copy_tree(source: Path, target: Path) -> None:
    def ignore(folder: str, names: list[str]) -> set[str]:
        top = Path(folder).resolve() == source.resolve()
        return {n for n in names if n in SKIPPED_ANYWHERE or (top and n in SKIPPED_TOP)}

    shutil.copytree(source, target, symlinks=True, ignore=ignore)


def check_snippets(tree: Path, mutants: Sequence[Mutant]) -> None:
    """Every ``old`` occurs exactly once in its file, or the run stops naming each that does not."""
    problems = []
    for m in mutants:
        file = tree / m.path
        text = file.read_text(encoding="utf-8") if file.exists() else None
        count = 0 if text is None else text.count(m.old)
        if text is None:
            problems.append(f"{m.name}: {m.path} does not exist")
        elif count != 1:
            problems.append(f"{m.name}: its snippet occurs {count} times in {m.path}, not once:\n    {m.old!r}")
        elif m.old == m.new:
            problems.append(f"{m.name}: its replacement is its snippet: it changes nothing")
    if problems:
        raise DriftError("the source drifted from these mutants (fix each mutant's `old`):\n  " + "\n  ".join(problems))


def apply(tree: Path, m: Mutant) -> None:
    file = tree / m.path
    text = file.read_text(encoding="utf-8")
    if text.count(m.old) != 1:
        raise DriftError(f"{m.name}: its snippet does not occur exactly once in {m.path}")
    file.write_text(text.replace(m.old, m.new), encoding="utf-8")


def environment(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env["PYTHONPATH"] = str(tree)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_import(tree: Path) -> None:
    """The copy's ``controller`` is the one imported, not the editable install's."""
    proc = subprocess.run(
        [str(PYTHON), "-c", "import controller; print(controller.__file__)"],
        cwd=tree,
        env=environment(tree),
        capture_output=True,
        text=True,
        check=False,
    )
    where = Path(proc.stdout.strip() or "?").resolve()
    if proc.returncode != 0 or not where.is_relative_to(tree.resolve()):
        raise SystemExit(f"mutate: the copy's controller is not the one imported ({where}): {proc.stderr.strip()}")


#: pytest's summary line of a failed test: its id (a parameter id may hold blanks), then " - why".
_FIRST_FAILURE = re.compile(r"^(?:FAILED|ERROR) (\S+?(?:\[.*?\])?)(?: - |$)", re.MULTILINE)


def run_tests(tree: Path, tests: Sequence[str], extra: Sequence[str] = ()) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [str(PYTHON), *PYTEST, *extra, *tests],
            cwd=tree,
            env=environment(tree),
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=RUN_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out + f"\n(timed out after {RUN_TIMEOUT:g} s)", time.monotonic() - started
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


def first_failure(output: str) -> str:
    m = _FIRST_FAILURE.search(output)
    return m.group(1) if m else "?"


#: How many unexpected killers that prove flaky a mutant's run may set aside before it gives up.
MAX_FLAKY = 3


def expected(m: Mutant, test: str) -> bool:
    """Whether ``test`` (a parametrized case counts as its function) is one ``m`` lists in ``killed_by``."""
    return test in m.killed_by or test.split("[", 1)[0] in m.killed_by


def confirmed(snapshot: Path, tree: Path, test: str) -> bool:
    """A kill by a test the mutant does not list is a kill only if that test fails again on the
    mutant and passes without it: whole suites run side by side can disturb each other (one
    starts a process named like the worker while the other's `--once` looks for one)."""
    return run_tests(tree, [test])[0] == 1 and run_tests(snapshot, [test])[0] == 0


def run_mutant(snapshot: Path, scratch: Path, m: Mutant, tests: Sequence[str], extra: Sequence[str] = ()) -> Verdict:
    tree = scratch / m.name
    copy_tree(snapshot, tree)
    flaky: list[str] = []
    seconds = 0.0
    try:
        apply(tree, m)
        while True:
            code, output, took = run_tests(tree, tests, [*extra, *(f"--deselect={f}" for f in flaky)])
            seconds += took
            killer = first_failure(output)
            settled = code != 1 or killer == "?" or expected(m, killer) or len(flaky) >= MAX_FLAKY
            if settled or confirmed(snapshot, tree, killer):
                break
            flaky.append(killer)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    if code == 0:
        return Verdict(m, "survived", "", seconds, output, tuple(flaky))
    if code == 1:
        return Verdict(m, "killed", killer, seconds, output, tuple(flaky))
    if code == -1:
        return Verdict(m, "killed", f"timeout ({killer})", seconds, output, tuple(flaky))
    if code == 2:
        # Interrupted: a collection error (the mutant broke an import). A kill, but say so.
        return Verdict(m, "killed", f"collection error ({killer})", seconds, output, tuple(flaky))
    # 5: no test collected (a killed_by that names no test), 3/4: pytest itself failed.
    return Verdict(m, "error", f"pytest exited {code}", seconds, output, tuple(flaky))


def tests_of(m: Mutant, all_tests: bool) -> tuple[str, ...]:
    return () if all_tests else m.killed_by


def print_table(verdicts: Sequence[Verdict]) -> None:
    rows = [("mutant", "rule", "killed by")]
    for o in verdicts:
        verdict = (
            o.killed_by if o.verdict == "killed" else o.verdict.upper() + (f" ({o.killed_by})" if o.killed_by else "")
        )
        rows.append((o.mutant.name, o.mutant.rule, verdict))
    widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((44, 70, 200))]
    for n, row in enumerate(rows):
        cells = [row[i] if len(row[i]) <= widths[i] else row[i][: widths[i] - 1] + "…" for i in range(3)]
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def list_mutants(mutants: Sequence[Mutant]) -> None:
    for m in mutants:
        print(f"{m.name}\n  rule: {m.rule}\n  file: {m.path}")
        for test in m.killed_by:
            print(f"  killed by: {test}")


def select(names: Sequence[str] | None) -> tuple[Mutant, ...]:
    by_name = {m.name: m for m in MUTANTS}
    if len(by_name) != len(MUTANTS):
        raise SystemExit("mutate: two mutants share a name")
    if not names:
        return MUTANTS
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(f"mutate: no mutant named {', '.join(unknown)} (see --list)")
    return tuple(by_name[n] for n in names)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--list", action="store_true", help="print the mutants, their rules and tests, and exit")
    parser.add_argument("--only", action="append", metavar="NAME", help="run this mutant only (repeatable)")
    parser.add_argument(
        "--all-tests", action="store_true", help='run every test of `pytest -m "not containerd"` against each mutant'
    )
    parser.add_argument("--jobs", type=int, default=JOBS, help=f"mutants at once (default {JOBS})")
    parser.add_argument("--verbose", action="store_true", help="print pytest's output of each survivor")
    parser.add_argument(
        "pytest_args",
        nargs="*",
        metavar="-- PYTEST_ARGS",
        help="more pytest options, after --: e.g. -- --ignore=tests/test_safety_rules.py (which mutants would the "
        "rest of the suite kill?) or --deselect of a test broken by an edit under way",
    )
    args = parser.parse_args(argv)
    mutants = select(args.only)
    if args.list:
        list_mutants(mutants)
        return 0
    missing = [m.name for m in mutants if not m.killed_by]
    if missing and not args.all_tests:
        raise SystemExit(f"mutate: no killed_by for {', '.join(missing)}")

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="obr-mutate-") as scratch_dir:
        scratch = Path(scratch_dir)
        # One snapshot of the working tree: every mutant starts from the same source.
        snapshot = scratch / "snapshot"
        copy_tree(REPO, snapshot)
        try:
            check_snippets(snapshot, mutants)
        except DriftError as e:
            print(f"mutate: {e}", file=sys.stderr)
            return 2
        check_import(snapshot)
        wanted = () if args.all_tests else tuple(dict.fromkeys(t for m in mutants for t in m.killed_by))
        shown = "the not-containerd suite" if args.all_tests else f"{len(wanted)} selected tests"
        print(f"mutate: {len(mutants)} mutants; first {shown} on the unmutated copy ...", flush=True)
        code, output, seconds = run_tests(snapshot, wanted, args.pytest_args)
        if code != 0:
            print(output[-4000:], file=sys.stderr)
            if code in (1, -1):
                why = f"the tests fail WITHOUT a mutant ({first_failure(output)}): a kill would mean nothing"
            else:
                why = f"pytest cannot run the selected tests (exit {code}): does a killed_by name no test?"
            print(f"mutate: {why}; fix that first", file=sys.stderr)
            return 2
        print(f"mutate: they pass ({seconds:.1f} s); now each mutant, {args.jobs} at a time", flush=True)

        def one(m: Mutant) -> Verdict:
            o = run_mutant(snapshot, scratch, m, tests_of(m, args.all_tests), args.pytest_args)
            print(f"  {o.verdict:8} {m.name} ({o.seconds:.1f} s)", flush=True)
            return o

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            outcomes = list(pool.map(one, mutants))

    elapsed = time.monotonic() - started
    print()
    print_table(outcomes)
    bad = [o for o in outcomes if o.verdict != "killed"]
    killed = len(outcomes) - len(bad)
    print(f"\n{len(outcomes)} mutants, {killed} killed, {len(bad)} not, in {elapsed:.0f} s ({args.jobs} at a time)")
    for o in outcomes:
        for test in o.flaky:
            print(f"{o.mutant.name}: set aside {test}: it failed on the mutant, but not again, or without it too")
    for o in bad:
        print(f"\n{o.mutant.name} {o.verdict.upper()}: {o.mutant.rule}\n  {o.mutant.path}: {o.mutant.old!r}")
        print(f"  -> {o.mutant.new!r}")
        if args.verbose or o.verdict == "error":
            print(o.output[-3000:])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
