"""The autoscaler acts only on honest evidence (issue 11).

The rules as tables over ``decide`` and ``stabilized``, then the autoscaler
and configure_cache against a real manager (SQLite store, local pool of
node processes): migration reads are no lookups, a failed resize backs off,
and a configure_cache whose resize fails changes nothing. Each resize is kept
with its evidence: how long it took and the lookups behind its miss rate, on
the Activity page.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import pytest

from cachenode.client import NodeClient
from cachenode.routing import parse_address
from imagecache.config import Config, with_data_dir
from imagecache.database import Database
from manager.appkeys import AUTOSCALER, BACKEND, CONTROLLER, RECORDS
from manager.autoscaler import (
    RETRY_FIRST_SECONDS,
    RETRY_MAX_SECONDS,
    STABILIZATION_JUDGEMENTS,
    Autoscaler,
    decide,
    decide_predictive,
    stabilized,
)
from manager.backends.local import LocalPool
from manager.curves import MIN_SAMPLED_LOOKUPS, CurveWindow, MissCurves
from manager.metrics import MinuteStats
from manager.settings import CacheSettings, Mode, SettingsError, apply_params
from tests.test_manager import PASSWORD, System, running_system
from tests.test_metadata_records import add_old_resize

SETTINGS = CacheSettings(
    capacity_mb=64.0,
    mode=Mode.AUTO,
    max_miss=0.5,
    min_miss=0.2,
    exp_ratio=2.0,
    shrink_ratio=0.5,
    min_lookups=100,
)
MINUTE = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
MB = 1 << 20


def minute(lookups: int, misses: int, *, workers: int = 8, mb_in_use: float = 0) -> MinuteStats:
    return MinuteStats(
        MINUTE, workers, lookups, lookups - misses, misses, lookups, 0, round(mb_in_use * MB)
    )


@pytest.mark.parametrize(
    ("size", "stats", "target"),
    [
        # Too few lookups is no evidence, whatever their miss rate (the cases seen).
        (2, minute(46, 0), 2),
        (8, minute(4, 0), 8),
        (4, minute(14, 14), 4),
        (1, minute(13, 13), 1),
        (1, minute(1, 1), 1),
        (1, minute(99, 99), 1),
        # From minLookups on it is.
        (1, minute(100, 90), 2),
        (4, minute(100, 0), 2),
        # A shrink only to a pool that holds the bytes in use (64 MB a node).
        (4, minute(1000, 0, mb_in_use=128), 2),  # exactly fits in 2
        (4, minute(1000, 0, mb_in_use=129), 3),  # 2 would not hold it: 3 do
        (4, minute(1000, 0, mb_in_use=200), 4),  # only 4 hold it
        (8, minute(1000, 0, mb_in_use=10), 4),
        (2, minute(1000, 0, mb_in_use=64.5), 2),
        # Unknown bytes (a node did not report): no shrink.
        (4, minute(1000, 0, workers=3, mb_in_use=1), 4),
        # Growth does not look at the bytes.
        (2, minute(1000, 900, mb_in_use=1), 4),
    ],
)
def test_decide_acts_only_on_evidence(size: int, stats: MinuteStats, target: int) -> None:
    decision = decide(size, replace(stats, workers=min(stats.workers, size)), SETTINGS, None)
    assert decision.target == target, decision.reason
    assert decision.reason


def test_too_few_lookups_says_so() -> None:
    decision = decide(2, minute(46, 0), SETTINGS, None)
    assert "46 lookups" in decision.reason
    assert "no evidence" in decision.reason


@pytest.mark.parametrize(
    ("size", "recommended", "recent", "target"),
    [
        (8, 4, [], 4),  # nothing recommended before: as recommended
        (8, 4, [8, 4, 4, 4], 8),  # a larger pool recommended within the window
        (8, 4, [4, 4, 4, 4], 4),  # the whole window agreed
        (8, 4, [4, 6, 4, 4], 6),  # held at the highest recommended
        (4, 8, [2, 2, 2, 2], 8),  # growth is never held back
        (4, 4, [8, 8, 8, 8], 4),  # staying put is never changed
    ],
)
def test_a_shrink_is_stabilized(
    size: int, recommended: int, recent: list[int], target: int
) -> None:
    decision = decide(size, minute(1000, 0 if recommended < size else 900), SETTINGS, None)
    if recommended == size:
        decision = replace(decision, target=size)
    assert decision.target == recommended
    assert stabilized(decision, recent).target == target


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"minLookups": "0"}, 0),
        ({"minLookups": "250"}, 250),
        ({}, 100),
    ],
)
def test_min_lookups_is_a_setting(params: dict[str, str], expected: int) -> None:
    settings = apply_params(CacheSettings(), params)
    assert settings.min_lookups == expected
    assert CacheSettings.from_strings(settings.to_strings()) == settings


@pytest.mark.parametrize("text", ["-1", "1.5", "lots", "nan", "1e3", "99999999999", "²"])
def test_bad_min_lookups_are_refused(text: str) -> None:
    with pytest.raises(SettingsError):
        apply_params(CacheSettings(), {"minLookups": text})


# -- against a real manager ------------------------------------------------


@pytest.fixture
async def system(tmp_path: Path) -> AsyncIterator[System]:
    async with running_system(tmp_path, collect_seconds=60.0) as running:
        yield running


async def node_counters(system: System) -> dict[str, tuple[int, int]]:
    """(lookups, misses) of each member, by address."""
    counters = {}
    for node in system.manager.app[CONTROLLER].members:
        host, port = parse_address(node.address)
        async with NodeClient(host, port, timeout=2) as client:
            stats = await client.stats()
        counters[node.address] = (int(stats["lookups"]), int(stats["misses"]))
    return counters


async def test_migration_reads_are_no_lookups(system: System) -> None:
    controller = system.manager.app[CONTROLLER]
    (node,) = controller.members
    host, port = parse_address(node.address)
    async with NodeClient(host, port, timeout=2) as client:
        ticket = await client.ticket()
        for number in range(60):
            await client.set(f"key-{number}".encode(), b"x" * 100, version=1, ticket=ticket)
    before = await node_counters(system)
    await controller.resize(4, "test")
    assert controller.last_migration is not None
    assert controller.last_migration.moved > 0
    after = await node_counters(system)
    assert after[node.address] == before[node.address]
    assert all(counts == (0, 0) for address, counts in after.items() if address != node.address)


class Clock:
    """The monotonic clock the pool controller uses, moved on by hand from now."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


async def test_a_failed_resize_backs_off_doubling(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    controller = system.manager.app[CONTROLLER]
    await system.api("configure_cache", mode="auto", maxMiss="0.5", minMiss="0.2")
    backend = system.manager.app[BACKEND]
    assert isinstance(backend, LocalPool)
    backend.capacity_mb = -1  # every node it starts from now on refuses to run
    clock = Clock()
    autoscaler = Autoscaler(controller, lambda: minute(1000, 900, workers=1), 0.0, clock)
    attempts_at: list[float] = []
    caplog.set_level(logging.WARNING, logger="manager.autoscaler")
    for _ in range(12):  # one judgement a minute for 12 minutes
        caplog.clear()
        decision = await autoscaler.tick()
        assert decision is not None
        failures = [r for r in caplog.records if "failed" in r.getMessage()]
        if decision.resizes:
            attempts_at.append(clock.now)
            assert len(failures) == 1  # logged once per attempt
        else:
            assert "backing off" in decision.reason
            assert failures == []
        clock.now += 60
    assert controller.size == 1
    # Tries at 0, 2 and 6 minutes (the next would be at 14).
    start = attempts_at[0]
    assert attempts_at == [start, start + RETRY_FIRST_SECONDS, start + 3 * RETRY_FIRST_SECONDS]
    assert RETRY_MAX_SECONDS >= 8 * RETRY_FIRST_SECONDS


async def test_a_shrink_waits_for_the_stabilization_window(system: System) -> None:
    controller = system.manager.app[CONTROLLER]
    await system.api("configure_cache", mode="auto", numNodes="4")
    figures = minute(1000, 900, workers=4)
    clock = Clock()
    autoscaler = Autoscaler(controller, lambda: figures, 0.0, clock)
    decision = await autoscaler.tick()  # a miss-heavy minute grows the pool to 8 ...
    assert decision is not None
    assert decision.target == 8
    assert controller.size == 8
    figures = minute(1000, 0, workers=8)  # ... then all hits, and little in use
    targets = []
    for _ in range(STABILIZATION_JUDGEMENTS):
        clock.now = time.monotonic() + 60
        decision = await autoscaler.tick()
        assert decision is not None
        targets.append(decision.target)
    # Held while the grow's recommendation is among the last judgements.
    assert targets == [8] * (STABILIZATION_JUDGEMENTS - 1) + [4]
    assert controller.size == 4


async def test_configure_cache_whose_resize_fails_changes_nothing(system: System) -> None:
    controller = system.manager.app[CONTROLLER]
    backend = system.manager.app[BACKEND]
    assert isinstance(backend, LocalPool)
    before = await controller.settings()
    (node,) = controller.members
    backend.capacity_mb = -1  # every node it starts from now on refuses to run
    answer = await system.api(
        "configure_cache", 503, numNodes="3", cacheSize="8", policy="RR", mode="auto"
    )
    assert answer["success"] == "false"
    assert await controller.settings() == before
    assert controller.size == 1
    # The failure is in the activity history (and so in /metrics), with the size kept.
    (failed, *_) = await system.manager.app[RECORDS].list_activity()
    assert failed.cause.startswith("failed: ")
    assert (failed.size_before, failed.size_after) == (1, 1)
    assert len(await backend.nodes()) == 1
    host, port = parse_address(node.address)
    async with NodeClient(host, port, timeout=2) as client:
        config = await client.config()
    assert config["capacity_mb"] == before.capacity_mb
    assert config["policy"] == before.policy
    # Without a resize, or with one that works, the settings are applied.
    backend.capacity_mb = before.capacity_mb
    await system.api("configure_cache", numNodes="2", cacheSize="8", policy="RR")
    assert (await controller.settings()).capacity_mb == 8
    assert controller.size == 2


async def test_min_lookups_is_on_the_configuration_page(system: System) -> None:
    manager = system.manager
    async with system.http.post(
        manager.make_url("/login"), data={"password": PASSWORD, "next": "/config"}
    ) as reply:
        page = await reply.text()
    assert 'id="minLookups"' in page
    assert 'name="minLookups" type="number" step="1" min="0"' in page
    csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    async with system.http.post(
        manager.make_url("/config/settings"), data={"minLookups": "250", "csrf": csrf}
    ) as reply:
        assert reply.status == 200
    assert (await system.manager.app[CONTROLLER].settings()).min_lookups == 250
    async with system.http.post(
        manager.make_url("/config/settings"), data={"minLookups": "-3", "csrf": csrf}
    ) as reply:
        refused = await reply.text()
        assert reply.status == 400
    assert "Judge only minutes with at least this many lookups" in refused
    assert (await system.manager.app[CONTROLLER].settings()).min_lookups == 250


# -- predictive scaling ------------------------------------------------------------------

CURVE = (0.9, 0.7, 0.5, 0.35, 0.25, 0.2, 0.18, 0.17)
PREDICTIVE = replace(
    CacheSettings(mode=Mode.AUTO, max_miss=0.3, min_miss=0.1), scaling="predictive"
)


@pytest.mark.parametrize(
    ("size", "stats", "curve", "target", "said"),
    [
        # One step to the smallest size predicted within maxMiss, up or down.
        (1, minute(1000, 900, workers=1), CURVE, 5, "predicted miss rate at 5 nodes 25.0%"),
        (8, minute(1000, 170), CURVE, 5, "predicted miss rate at 5 nodes"),
        (5, minute(1000, 250, workers=5), CURVE, 5, "predicted miss rate at 5 nodes"),
        # No size is predicted good enough: all of them.
        (2, minute(1000, 900, workers=2), (0.9,) * 8, 8, "at 8 nodes 90.0%"),
        # Down, but never below what holds the bytes in use (300 MB: 5 nodes of 64).
        (8, minute(1000, 10, mb_in_use=300), (0.1,) * 8, 5, "predicted miss rate at 5"),
        # Down needs every node's bytes.
        (8, minute(1000, 10, workers=7), (0.1,) * 8, 8, "not all known"),
        # The evidence rules of the ratio rule apply unchanged.
        (1, minute(40, 40, workers=1), CURVE, 1, "no evidence"),
        # Measured above maxMiss where the curve calls the size good enough: the
        # measurement wins and the ratio rule grows (2 -> 4), never stuck below demand.
        (5, minute(1000, 400, workers=5), CURVE, 8, "predicts 25.0% at 5 nodes but 40.0% was"),
        (2, minute(1000, 600, workers=2), (0.2,) * 8, 4, "by the ratio rule: miss rate"),
        # Without a curve to trust, the ratio rule decides (expRatio 2).
        (1, minute(1000, 900, workers=1), None, 2, "no trusted miss curve, by the ratio rule"),
        (1, minute(1000, 900, workers=1), (None,) * 8, 2, "by the ratio rule: miss rate"),
        (4, minute(1000, 250, workers=4), None, 4, "no trusted miss curve"),
    ],
)
def test_predictive_scaling_goes_in_one_step(
    size: int,
    stats: MinuteStats,
    curve: tuple[float | None, ...] | None,
    target: int,
    said: str,
) -> None:
    decision = decide_predictive(size, stats, curve, PREDICTIVE, None)
    assert decision.target == target, decision
    assert said in decision.reason


def test_predictive_scaling_waits_while_a_resize_settles() -> None:
    decision = decide_predictive(1, minute(1000, 900, workers=1), CURVE, PREDICTIVE, 30.0, 120.0)
    assert (decision.target, decision.reason.startswith("settling")) == (1, True)


async def test_the_autoscaler_scales_predictively_when_set_to(system: System) -> None:
    controller = system.manager.app[CONTROLLER]
    await system.api(
        "configure_cache", mode="auto", scaling="predictive", maxMiss="0.3", minMiss="0.1"
    )
    assert (await controller.settings()).scaling == "predictive"
    clock = Clock()
    autoscaler = Autoscaler(
        controller, lambda: minute(1000, 900, workers=1), 0.0, clock, last_curve=lambda: CURVE
    )
    decision = await autoscaler.tick()
    assert decision is not None
    assert (decision.size, decision.target, controller.size) == (1, 5, 5)
    await system.api("configure_cache", scaling="sideways", expect=400)
    assert (await controller.settings()).scaling == "predictive"


# -- each resize's evidence on the Activity page -------------------------------------------


class _TableCells(HTMLParser):
    """The text of each cell of each body row of the table with id ``table_id``."""

    def __init__(self, table_id: str) -> None:
        super().__init__()
        self._table_id = table_id
        self._inside = False
        self._cell: list[str] | None = None
        self.rows: list[list[str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "table":
            self._inside = ("id", self._table_id) in attrs
        elif self._inside and tag == "tr":
            self.rows.append([])
        elif self._inside and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._inside = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


async def activity_tables(system: System) -> dict[str, list[list[str]]]:
    """The rows of the Activity page's tables (resizes, decisions), logged in."""
    async with system.http.post(
        system.manager.make_url("/login"), data={"password": PASSWORD, "next": "/activity"}
    ) as reply:
        assert reply.status == 200
        page = await reply.text()
    assert "not how long it took" not in page
    tables = {}
    for table_id in ("resizes", "decisions"):
        cells = _TableCells(table_id)
        cells.feed(page)
        tables[table_id] = [row for row in cells.rows if row]  # the header row has no td
    return tables


# The columns of a resize: When, Status, From, To, Nodes, Why, Duration, Miss rate.
STATUS, NODES, DURATION, EVIDENCE = 1, 4, 6, 7
NOT_RECORDED = "\N{EN DASH}"


def shown_seconds(cell: str) -> float:
    """The duration a cell shows ("4.2 s")."""
    assert re.fullmatch(r"\d+\.\d s", cell), cell
    return float(cell.removesuffix(" s"))


async def test_a_manual_resize_shows_how_long_it_took(system: System) -> None:
    started = time.monotonic()
    await system.api("configure_cache", mode="manual", numNodes="2")
    elapsed = time.monotonic() - started
    (entry,) = await system.manager.app[RECORDS].list_activity()
    assert entry.duration_seconds is not None
    # Starting a node process and moving the keys to it take a while, and no longer
    # than the call that asked for it.
    assert 0.05 < entry.duration_seconds <= elapsed
    assert (entry.miss_rate, entry.lookups) == (None, None)
    (row,) = (await activity_tables(system))["resizes"]
    assert (row[STATUS], row[NODES]) == ("done", "1 started")
    assert shown_seconds(row[DURATION]) == pytest.approx(entry.duration_seconds, abs=0.05)
    assert row[EVIDENCE] == NOT_RECORDED


async def test_an_automatic_resize_shows_the_lookups_behind_its_rate(system: System) -> None:
    controller = system.manager.app[CONTROLLER]
    await system.api("configure_cache", mode="auto", maxMiss="0.5", minMiss="0.2")
    autoscaler = Autoscaler(controller, lambda: minute(1234, 765, workers=1), 0.0, Clock())
    decision = await autoscaler.tick()
    assert decision is not None
    assert (decision.target, decision.lookups, controller.size) == (2, 1234, 2)
    (entry,) = await system.manager.app[RECORDS].list_activity()
    assert entry.cause.startswith("autoscaler: ")
    assert entry.miss_rate == pytest.approx(765 / 1234)
    assert entry.lookups == 1234
    assert entry.duration_seconds is not None
    assert entry.duration_seconds > 0.05
    # The page's decisions are the manager's own autoscaler's: show it this one.
    system.manager.app[AUTOSCALER].decisions.appendleft((datetime.now(UTC), decision))
    tables = await activity_tables(system)
    (row,) = tables["resizes"]
    assert (row[STATUS], row[NODES]) == ("done", "1 started")
    assert shown_seconds(row[DURATION]) == pytest.approx(entry.duration_seconds, abs=0.05)
    assert row[EVIDENCE] == "62.0% of 1,234 lookups"
    assert tables["decisions"][0][1:3] + tables["decisions"][0][-1:] == ["1", "2", "1,234"]


async def test_a_failed_resize_shows_its_status_duration_and_evidence(system: System) -> None:
    controller = system.manager.app[CONTROLLER]
    await system.api("configure_cache", mode="auto", maxMiss="0.5", minMiss="0.2")
    backend = system.manager.app[BACKEND]
    assert isinstance(backend, LocalPool)
    backend.capacity_mb = -1  # every node it starts from now on refuses to run
    autoscaler = Autoscaler(controller, lambda: minute(1000, 900, workers=1), 0.0, Clock())
    decision = await autoscaler.tick()
    assert decision is not None
    assert decision.resizes
    assert controller.size == 1
    (entry,) = await system.manager.app[RECORDS].list_activity()
    assert entry.cause.startswith("failed: autoscaler: ")
    assert (entry.size_before, entry.size_after) == (1, 1)
    assert entry.miss_rate == pytest.approx(0.9)
    assert entry.lookups == 1000
    assert entry.duration_seconds is not None
    assert entry.duration_seconds > 0.05  # a node process started, and failed
    (row,) = (await activity_tables(system))["resizes"]
    assert (row[STATUS], row[NODES]) == ("failed", "none")
    assert shown_seconds(row[DURATION]) == pytest.approx(entry.duration_seconds, abs=0.05)
    assert row[EVIDENCE] == "90.0% of 1,000 lookups"


async def test_resizes_of_an_older_version_show_no_duration_or_lookups(tmp_path: Path) -> None:
    """A data folder whose activity table predates durations and lookups."""
    async with Database.open(with_data_dir(Config(), tmp_path / "data").metadata_url) as database:
        await add_old_resize(database, "autoscaler: miss rate 70.0% > maxMiss", 0.7)
    async with running_system(tmp_path, collect_seconds=60.0) as system:
        (row,) = (await activity_tables(system))["resizes"]
        assert (row[STATUS], row[NODES]) == ("done", "1 started")
        assert (row[DURATION], row[EVIDENCE]) == (NOT_RECORDED, "70.0%")
        await system.api("configure_cache", mode="manual", numNodes="2")
        new, _old = (await activity_tables(system))["resizes"]
        shown_seconds(new[DURATION])


def test_the_autoscaler_acts_on_a_curve_only_with_enough_sampled_lookups() -> None:
    # What the manager hands the autoscaler (CurveWindow.evidence): the window's
    # prediction, or None while it rests on fewer than MIN_SAMPLED_LOOKUPS or
    # on miniature caches that have not yet run through a whole window.
    now = [0.0]
    curves = MissCurves(rate=1.0, clock=lambda: now[0])
    keys = [(f"key {n}", 1_000) for n in range(MIN_SAMPLED_LOOKUPS)]

    def window_of(samples: list[tuple[str, int]]) -> CurveWindow:
        curves.feed(len(samples), samples)
        now[0] += 60.0
        return curves.close_window()

    cold = window_of(keys)  # enough lookups, caches started with the window
    assert (cold.warm, cold.predicted_miss[0] is not None, cold.evidence) == (False, True, None)
    thin = window_of(keys[1:])
    assert (thin.warm, thin.evidence) == (True, None)
    enough = window_of(keys)
    assert enough.evidence == enough.predicted_miss
    assert curves.latest().evidence is not None
