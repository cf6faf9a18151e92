"""The manager records the miss curve's windows on the clock, and shows what-if on its
dashboard: a real manager with a local pool of node processes."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imagecache.sampling import INITIAL_RATE
from manager.appkeys import CONTROLLER, CURVE_RECORDS, CURVES
from manager.whatif import RecordedMinute, replay
from manager.whatif_report import percent
from tests.processes import early_in_a_minute
from tests.test_manager import PASSWORD, TOKEN, System, running_system
from tests.test_samplingrate import sampled_keys
from tests.test_whatif_report import MINUTE, SETTINGS, SETTLE_SECONDS, record_run

# Two keys in the sample at the manager's first rate (and so at every higher one).
SAMPLED_KEYS = sampled_keys(INITIAL_RATE, 2)


async def post_samples(system: System, lookups: int, samples: list[list[object]]) -> None:
    async with system.http.post(
        system.manager.make_url("/internal/key_samples"),
        json={"lookups": lookups, "samples": samples, "rate": 1.0},  # cut down to the manager's
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as reply:
        assert reply.status == 200, await reply.text()


async def test_curve_windows_close_on_the_clock_and_are_saved(tmp_path: Path) -> None:
    """Windows of 0.5 s: closed on multiples of 0.5 s of the wall clock, one after
    another, each saved with the lookups posted in it; ``latest`` moves on."""
    async with running_system(tmp_path, curve_window_seconds=0.5) as system:
        curves, records = system.manager.app[CURVES], system.manager.app[CURVE_RECORDS]
        a, b = SAMPLED_KEYS
        await post_samples(system, 10, [[a, 1000], [b, 1000], [a, 1000]])
        posted = datetime.now(UTC)
        first_latest = curves.latest().started
        await asyncio.sleep(1.6)  # three boundaries at least
        assert curves.latest().started > first_latest
        saved = await records.windows(posted - timedelta(minutes=1), datetime.now(UTC))
        assert len(saved) >= 3
        for window in saved[1:]:  # the first one opened when the manager started
            assert window.started.microsecond % 500_000 == 0, window.started
        for before, after in itertools.pairwise(saved):
            # One after the other, each ending on the boundary the next starts on
            # (the first, partial one too), however late the loop ran.
            assert before.started + timedelta(seconds=before.seconds) == after.started
        assert all(window.seconds == 0.5 for window in saved[1:])
        assert sum(window.lookups for window in saved) == 10
        (busy,) = [window for window in saved if window.lookups]
        assert busy.sampled_lookups == 3
        assert busy.predicted_miss[0] is not None
        assert busy.policy == "lru"
        # It ends on a boundary, however long it lasted (a loop held up by a
        # busy machine closes it late, at the boundary it wakes after).
        ended = busy.started + timedelta(seconds=busy.seconds)
        assert busy.seconds > 0
        assert ended.microsecond % 500_000 == 0, busy


async def login(system: System) -> None:
    async with system.http.post(
        system.manager.make_url("/login"), data={"password": PASSWORD, "next": "/whatif"}
    ) as reply:
        assert reply.status == 200


def page_totals(page: str) -> dict[str, tuple[str, str]]:
    found = {}
    for name in ("Resizes", "Node-minutes", "Mean miss rate"):
        match = re.search(
            rf'<tr><td>{name}</td><td class="num">([^<]+)</td><td class="num">([^<]+)</td></tr>',
            page,
        )
        assert match is not None, page
        found[name] = (match.group(1), match.group(2))
    return found


async def test_the_whatif_page_replays_the_recorded_run(tmp_path: Path) -> None:
    # The manager's own first sample and curve window fall in the minute it starts
    # in, which the page leaves out as partial until the minute ends: start early in one.
    await early_in_a_minute(15)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    url = f"sqlite+aiosqlite:///{tmp_path / 'data' / 'imagecache.db'}"
    run = await record_run(url, now - 23 * MINUTE, 20)
    recorded = [RecordedMinute(m, c) for m, c in zip(run.minutes, run.curves, strict=True)]
    async with running_system(tmp_path, collect_seconds=3600) as system:
        async with system.http.get(system.manager.make_url("/whatif")) as reply:
            assert reply.status == 200
            assert reply.url.path == "/login"  # operators only
        await login(system)
        for policy in ("ratio", "predictive"):
            async with system.http.get(
                system.manager.make_url("/whatif"), params={"scaling": policy, "minutes": "30"}
            ) as reply:
                assert reply.status == 200
                page = await reply.text()
            expected = replay(recorded, SETTINGS, policy=policy, settle_seconds=SETTLE_SECONDS)
            assert page_totals(page) == {
                "Resizes": ("0", str(expected.resizes)),
                "Node-minutes": ("20", str(expected.node_minutes)),
                "Mean miss rate": ("90.0%", percent(expected.mean_miss_rate)),
            }
            assert "20 recorded minutes, 19 with a miss curve" in page
            assert page.count("<polyline") == 2
            assert f'<option value="{policy}" selected>' in page
            assert page.count("<tr><td>20") == 20  # a row per minute
        # By default: the stored settings (ratio, maxMiss 0.3) over the last hour.
        async with system.http.get(system.manager.make_url("/whatif")) as reply:
            page = await reply.text()
        assert 'aria-current="page">What-if' in page
        assert 'name="maxMiss" type="number" step="any" min="0" max="1"' in page
        assert 'value="0.3"' in page
        assert page_totals(page)["Resizes"] == ("0", "3")


async def test_the_whatif_page_refuses_bad_values_by_their_labels(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="manager.whatif_views")
    async with running_system(tmp_path, collect_seconds=3600) as system:
        await login(system)
        before = await system.manager.app[CONTROLLER].settings()
        for params, label, field in (
            ({"maxMiss": "lots"}, "Grow when the miss rate is above", "maxMiss"),
            ({"minutes": "0"}, "Span (minutes)", "minutes"),
            ({"minutes": "x" * 500}, "Span (minutes)", "minutes"),
            ({"minMiss": "0.9", "maxMiss": "0.5"}, "Shrink when the miss rate is below", "minMiss"),
            ({"scaling": "sideways"}, "Resize by", None),
        ):
            caplog.clear()
            async with system.http.get(system.manager.make_url("/whatif"), params=params) as reply:
                assert reply.status == 400, params
                page = await reply.text()
            logged = [r for r in caplog.records if r.name == "manager.whatif_views"]
            assert len(logged) == 1, logged  # one line, no traceback
            assert logged[0].exc_info is None
            assert "Nothing replayed:" in page
            assert f"“{label}”" in page, (params, page)
            if field is not None:
                assert re.search(rf'id="whatif-{field}"[^>]*aria-invalid="true"', page, re.S)
            assert 'id="whatif-totals"' not in page
            if params.get("minutes", "").startswith("x"):  # shown back, cut short
                assert f'value="{"x" * 100}"' in page
        assert await system.manager.app[CONTROLLER].settings() == before
