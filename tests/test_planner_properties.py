"""Properties of the planner over random snapshot forests, stores and containers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.core import planner
from controller.core.ages import entry_stamp, stamp_of
from controller.core.passes import PassOptions, run_once
from controller.core.planner import Claim, plan
from controller.model.plan import Mode, PlanOptions, Rule
from controller.model.records import (
    Container,
    ContainerdState,
    DbRow,
    History,
    LayerInfo,
    Observation,
    Snapshot,
    StoreEntry,
    StoreState,
    Task,
    TaskStatus,
    Watch,
)
from tests.support.fake import FakeClock, FakeContainerd, FakeStore, fake_ports

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
OPTIONS = PlanOptions(grace_period=timedelta(minutes=10), stale_after=timedelta(hours=6))


@st.composite
def worlds(draw: st.DrawFn) -> tuple[Observation, PlanOptions, Mode]:
    n = draw(st.integers(1, 40))
    parents: dict[str, str | None] = {}
    for i in range(n):
        kind = draw(st.sampled_from(["step", "step", "step", "base", "foreign", "layer"]))
        key = {
            "step": f"obuilder-s{i}",
            "base": f"obuilder-base-b{i}",
            "foreign": f"foreign-{i}",
            "layer": f"sha256:{i:04x}",
        }[kind]
        if kind in ("step", "base") and draw(st.booleans()):
            key += "-committed"
        parents[key] = draw(st.sampled_from([None, *parents])) if parents else None
    owned = [k for k in parents if k.startswith("obuilder-")]
    committed = [k for k in owned if k.endswith("-committed")]
    active = [k for k in owned if not k.endswith("-committed")]

    def entry(area: str, key: str) -> StoreEntry:
        build = key.removesuffix("-committed").removeprefix("obuilder-")
        info = LayerInfo(snapshot_key=key.removesuffix("-committed"), source=f"/snap/{build}", parent_layer_paths=())
        when = NOW - draw(st.sampled_from([timedelta(0), timedelta(days=1)]))
        return StoreEntry(id=build, area=area, layerinfo=info, changed_at=when, stamps=f"stamps-{build}")

    picked = draw(st.lists(st.sampled_from(committed), unique=True)) if committed else []
    results = [entry("result", k) for k in picked]
    picked = draw(st.lists(st.sampled_from(active), unique=True)) if active else []
    tmp = [entry("result-tmp", k) for k in picked]
    if draw(st.booleans()):
        tmp.append(StoreEntry(id="broken", area="result-tmp", layerinfo_error="x:1:1: unexpected end of input"))
    containers, tasks = [], []
    for i in range(draw(st.integers(0, 4))):
        cid = f"obuilder-run-{i}"
        uses = draw(st.sampled_from(["", *owned]))
        rootfs = draw(st.sampled_from(["", *[f"/snap/{e.id}" for e in tmp]]))
        containers.append(Container(id=cid, snapshot_key=uses, root_path=rootfs, created_at=NOW - timedelta(hours=1)))
        status = draw(st.sampled_from(list(TaskStatus)))
        if status is not TaskStatus.ABSENT:
            tasks.append(Task(id=cid, status=status))
    old, new = NOW - timedelta(days=1), NOW - timedelta(seconds=5)
    # containerd's Created; None: not read yet (the daemon reads it before removing).
    created = {k: draw(st.sampled_from([old, new, None])) for k in owned}


    def watch(stamp: str, stamped_at: datetime | None) -> Watch:
        """What the daemon may have watched: never longer than the object has been (a watch under
        another stamp was another object's, of any length)."""
        if draw(st.booleans()):
            return Watch(stamp="another", since=-draw(st.sampled_from([0.0, 5.0, 86_400.0])))
        longest = (NOW - stamped_at).total_seconds() if stamped_at is not None else 86_400.0
        seconds = draw(st.sampled_from([0.0, 5.0, 700.0, 86_400.0]).filter(lambda s: s <= longest))
        # No pass has brought this history up to date: its monotonic clock reads 0.
        return Watch(stamp=stamp, since=-seconds)

    history = History(
        snapshots={k: watch(stamp_of(created.get(k) or old), created.get(k)) for k in owned if draw(st.booleans())},
        idle_containers={c.id: watch(stamp_of(c.created_at), None) for c in containers},
        live_containers={c.id: watch(stamp_of(c.created_at), c.created_at) for c in containers},
        tmp_entries={e.id: watch(entry_stamp(e), e.changed_at) for e in tmp},
    )
    protect = tuple(draw(st.lists(st.sampled_from(["obuilder-base-*", "obuilder-s1*", "nothing-*"]), max_size=2)))
    observation = Observation(
        store=StoreState(root="/store", results=tuple(results), tmp=tuple(tmp)),
        containerd=ContainerdState(
            snapshots=tuple(Snapshot(key=k, parent=p, created=created.get(k)) for k, p in parents.items()),
            containers=tuple(containers),
            tasks=tuple(tasks),
        ),
        history=history,
    )
    return observation, OPTIONS.model_copy(update={"protect_keys": protect}), draw(st.sampled_from(list(Mode)))


def _watched(watch: Watch | None, stamp: str) -> timedelta:
    return timedelta(seconds=-watch.since) if watch is not None and watch.stamp == stamp else timedelta(0)


def must_keep(obs: Observation, options: PlanOptions, mode: Mode) -> set[str]:
    """Kept for reasons simple enough to state here, with every ancestor of them."""
    parents = {s.key: s.parent for s in obs.containerd.snapshots}
    owned = {k for k in parents if k.startswith(options.snapshot_prefix)}
    grace = options.grace_period
    roots = {e.layerinfo.snapshot_key + "-committed" for e in obs.store.results if e.layerinfo}
    roots |= {k for k in owned for g in options.protect_keys if fnmatchcase(k, g)}
    roots |= {p for k, p in parents.items() if k not in owned and p is not None}
    if mode is Mode.DAEMON:
        # Beside a live worker an unreadable layerinfo may be one being written.
        roots |= {"obuilder-broken", "obuilder-broken-committed"}
        seen = obs.history.snapshots
        roots |= {
            s.key
            for s in obs.containerd.snapshots
            if s.key in owned and (s.created is None or _watched(seen.get(s.key), stamp_of(s.created)) < grace)
        }
        running = {t.id for t in obs.containerd.tasks if t.status is TaskStatus.RUNNING}
        roots |= {c.snapshot_key for c in obs.containerd.containers if c.id in running and c.snapshot_key}
        roots |= {
            e.layerinfo.snapshot_key
            for e in obs.store.tmp
            if e.layerinfo and _watched(obs.history.tmp_entries.get(e.id), entry_stamp(e)) < options.stale_after
        }
    kept = set()
    for root in roots:
        key: str | None = root
        while key is not None and key in parents:
            kept.add(key)
            key = parents[key]
    return kept & owned


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(worlds())
def test_never_plans_a_kept_snapshot_an_ancestor_of_one_or_a_foreign_object(
    world: tuple[Observation, PlanOptions, Mode],
) -> None:
    obs, options, mode = world
    p = plan(obs, options, NOW, mode)
    removed = set(p.snapshots)
    assert not removed & must_keep(obs, options, mode)
    assert all(k.startswith("obuilder-") for k in removed)
    assert all(c.id.startswith("obuilder-run-") for c in p.containers)
    if mode is Mode.DAEMON:
        assert "broken" not in {t.id for t in p.tmp_entries}, "beside a worker, an unreadable layerinfo stays"
        assert not removed & set(p.unaged), "a snapshot whose age is unknown is never removed"
        running = {t.id for t in obs.containerd.tasks if t.status is TaskStatus.RUNNING}
        assert not running & {c.id for c in p.containers}, "a live build is never disturbed"


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(worlds(), st.sampled_from([60.0, 3_600.0, 7 * 3_600.0, 30 * 86_400.0]))
def test_a_step_of_the_wall_clock_alone_removes_nothing_more(
    world: tuple[Observation, PlanOptions, Mode], step: float
) -> None:
    """Rule: no age that decides a removal exceeds what the daemon watched on its monotonic clock.
    A VM resumed or a time sync steps the wall clock forward, not containerd's stamps of what it
    already made nor the daemon's watches: whatever the step, nothing goes that stayed before."""
    obs, options, mode = world
    before = plan(obs, options, NOW, mode)
    after = plan(obs, options, NOW + timedelta(seconds=step), mode)
    assert set(after.snapshots) <= set(before.snapshots) | set(before.deferred)
    assert {c.id for c in after.containers} <= {c.id for c in before.containers}
    assert {t.id for t in after.tmp_entries} <= {t.id for t in before.tmp_entries}


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(worlds())
def test_children_always_go_before_their_parents(world: tuple[Observation, PlanOptions, Mode]) -> None:
    obs, options, mode = world
    p = plan(obs, options, NOW, mode)
    level_of = {k: n for n, level in enumerate(p.snapshot_levels) for k in level}
    for s in obs.containerd.snapshots:
        if s.parent in level_of:
            assert s.key in level_of, f"{s.parent} planned while its child {s.key} stays"
            assert level_of[s.key] < level_of[s.parent]


@pytest.mark.slow
@settings(max_examples=200, deadline=None)
@given(worlds())
def test_running_the_plan_against_containerd_rules_converges(world: tuple[Observation, PlanOptions, Mode]) -> None:
    obs, options, mode = world
    fake = FakeContainerd.from_state(obs.containerd)
    store = FakeStore(obs.store)
    # What the fake answers when asked a snapshot's age: a Created not drawn is long ago.
    asked = fake.snapshot_created(list(fake.parents))
    snapshots = tuple(s.model_copy(update={"created": asked[s.key]}) for s in obs.containerd.snapshots)
    keep = must_keep(
        obs.model_copy(update={"containerd": obs.containerd.model_copy(update={"snapshots": snapshots})}), options, mode
    )

    summary = run_once(fake_ports(fake, store, FakeClock(NOW)), PassOptions(options, mode), max_passes=5)
    first = summary.first.plan
    assert first is not None
    # A running task is killed only at boot; a container survives a pass only when the
    # fake (like containerd) refuses to delete it while its task runs.
    assert summary.converged, summary.stuck
    assert summary.acted <= 2
    assert keep <= set(fake.parents)
    assert set(first.snapshots).isdisjoint(fake.parents)


# -- what the planner keeps between plans (controller/core/store_index.py) ---------------------------


@st.composite
def twisted_worlds(draw: st.DrawFn) -> tuple[Observation, PlanOptions, Mode]:
    """``worlds()`` with what they lack: two results naming one snapshot, unreadable results and ones
    without a layerinfo, DB rows that disagree, a foreign child, a container ctr could not describe."""
    obs, options, mode = draw(worlds())
    results = list(obs.store.results)
    keys = [s.key for s in obs.containerd.snapshots]
    for n in range(draw(st.integers(0, 3))):
        twist = draw(st.sampled_from(["twin", "unreadable", "fallback"]))
        if twist == "twin" and results:
            twin = draw(st.sampled_from(results))
            results.insert(draw(st.integers(0, len(results))), twin.model_copy(update={"id": f"twin{n}"}))
        elif twist == "unreadable":
            results.append(StoreEntry(id=f"u{n}", area="result", layerinfo_error="x:1:1: unexpected end of input"))
        else:
            results.append(StoreEntry(id=f"s{n}", area="result", has_rootfs=draw(st.booleans())))
    rows = (*(DbRow(id=e.id) for e in results if draw(st.booleans())), DbRow(id="ghost"))
    snapshots = obs.containerd.snapshots
    uninspectable: dict[str, str] = {}
    if keys:
        if draw(st.booleans()):
            snapshots += (Snapshot(key="foreign-child", parent=draw(st.sampled_from(keys))),)
        if draw(st.booleans()):
            uninspectable[draw(st.sampled_from(keys))] = "ctr failed"
    obs = obs.model_copy(
        update={
            "store": obs.store.model_copy(update={"results": tuple(results), "db_rows": rows}),
            "containerd": obs.containerd.model_copy(update={"snapshots": snapshots, "uninspectable": uninspectable}),
        }
    )
    return obs, options, mode


def fresh(obs: Observation) -> Observation:
    """The same world in new records: nothing the planner kept from an earlier plan is found for it."""
    return Observation.model_validate(obs.model_dump())


@settings(max_examples=150, deadline=None)
@given(twisted_worlds(), st.data())
def test_plans_made_one_after_another_on_the_same_store_equal_plans_from_fresh_records(
    world: tuple[Observation, PlanOptions, Mode], data: st.DataObject
) -> None:
    obs, options, mode = world
    snapshots, results = obs.containerd.snapshots, obs.store.results
    fewer = tuple(s for s in snapshots if data.draw(st.booleans(), "kept by containerd"))
    more = (*snapshots, Snapshot(key="obuilder-s99-committed", parent=snapshots[0].key))
    replaced = list(results)
    if replaced:
        at = data.draw(st.integers(0, len(replaced) - 1), "replaced")
        replaced[at] = replaced[at].model_copy(update={"id": "rebuilt"})
    sequence = [
        obs,
        obs.model_copy(update={"containerd": obs.containerd.model_copy(update={"snapshots": fewer})}),
        obs.model_copy(update={"containerd": obs.containerd.model_copy(update={"snapshots": more})}),
        obs.model_copy(update={"store": obs.store.model_copy(update={"results": tuple(replaced)})}),
        obs,
    ]
    again = [plan(o, options, NOW, mode) for o in sequence]
    for o, kept in zip(sequence, again, strict=True):
        made = plan(fresh(o), options, NOW, mode)
        assert kept == made
        assert list(kept.snapshot_keeps.items()) == list(made.snapshot_keeps.items())


def reference_keeps(obs: Observation, options: PlanOptions, mode: Mode) -> dict[str, tuple[Rule, str]]:
    """Why each snapshot is kept, as the rules say it without shortcuts: every rule's claims merged
    by KEEP_PRIORITY, every kept key's ancestors walked in rank order, then grace and its ancestors,
    then what an uninspectable container may use."""
    parent_of = {s.key: s.parent for s in obs.containerd.snapshots}
    w = planner._world(obs, options, NOW, mode, parent_of)
    planner._judge_containers(w)
    planner._judge_tmp_entries(w)
    kept = with_ancestors(planner.merge((c for rule in planner.RULES for c in rule(w)), w.owned), parent_of, w.owned)
    young = planner.merge(planner.keep_young(w, w.owned - kept.keys(), []), w.owned)
    if young:
        kept.update(with_ancestors(young, {k: p for k, p in parent_of.items() if p not in kept}, w.owned))
    kept.update(planner.merge(planner.keep_what_uninspectable_containers_may_use(w, set(kept)), w.owned))
    return {k: (c.rule, c.reason) for k, c in kept.items()}


def with_ancestors(
    kept: dict[str, Claim], parent_of: dict[str, str | None], owned: set[str]
) -> dict[str, Claim]:
    """Rule 5 walked from every kept key, best-ranked first, the first of equals first."""
    out = dict(kept)
    walked: set[str] = set()
    for root in sorted(kept.values(), key=lambda c: planner.KEEP_PRIORITY.index(c.rule)):
        key = parent_of.get(root.key)
        while key is not None and key not in out and key not in walked:
            walked.add(key)
            if key in owned:
                out[key] = Claim(key, Rule.ANCESTOR, f"ancestor of {root.key} (kept: {root.rule})")
            key = parent_of.get(key)
    return out


@settings(max_examples=150, deadline=None)
@given(twisted_worlds())
def test_the_planners_shortcuts_keep_what_every_claim_merged_keeps(
    world: tuple[Observation, PlanOptions, Mode],
) -> None:
    """The results' claims come merged from the store's index, only roots that can claim an ancestor
    walk, grace stops below what is kept: the same keeps, reasons and order as the rules unabridged."""
    obs, options, mode = world
    kept = plan(obs, options, NOW, mode).snapshot_keeps
    assert list(kept.items()) == list(reference_keeps(obs, options, mode).items())
