"""What the gateway and the manager share: error kinds, the JSON answers, background loops.

The manager's internal API answers in the public API's shape (imagecache.answers),
checked on a real manager over loopback; the loops of imagecache.appbase run on
a real event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from imagecache import errors
from imagecache.appbase import every, running
from imagecache.manager_link import ManagerError
from manager.app import create_app as create_manager
from tests.test_manager_hardening import TOKEN, manager_config

# Each error kind and the HTTP status it answers with.
STATUSES = {
    errors.ImagecacheError: 500,
    errors.BadRequest: 400,
    errors.UploadTooLarge: 413,
    errors.ImageTooLarge: 413,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.ImageNotFound: 404,
    errors.ServiceUnavailable: 503,
    errors.BlobNotFound: 404,
    errors.StorageError: 503,
}


def test_each_error_kind_answers_with_its_status() -> None:
    assert {kind: kind("x").http_status for kind in STATUSES} == STATUSES
    # A kind that names no status keeps its base's; the manager's refusals carry theirs.
    assert ManagerError.http_status == 500
    assert ManagerError(409, "busy").http_status == 409


@pytest.fixture
async def manager_url(tmp_path: Path) -> AsyncIterator[str]:
    async with TestServer(create_manager(manager_config(tmp_path)), host="127.0.0.1") as server:
        yield str(server.make_url("/internal"))


async def test_the_internal_api_answers_in_the_public_apis_shape(manager_url: str) -> None:
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with ClientSession() as http:
        async with http.post(f"{manager_url}/getNumNodes") as reply:
            assert reply.status == 401
            assert reply.headers["WWW-Authenticate"] == 'Bearer realm="imagecache"'
            assert await reply.json() == {
                "success": "false",
                "error": {"code": 401, "message": "a valid gateway token is required"},
            }
        async with http.post(f"{manager_url}/getRate", data={"rate": "x"}, headers=bearer) as reply:
            assert reply.status == 400
            assert "WWW-Authenticate" not in reply.headers
            assert await reply.json() == {
                "success": "false",
                "error": {"code": 400, "message": "rate must be 'miss' or 'hit'"},
            }
        # Every call is routed, under its name.
        async with http.post(f"{manager_url}/getNumNodes", headers=bearer) as reply:
            assert await reply.json() == {"success": "true", "numNodes": 1}
        for call in ("configure_cache", "getRate", "miss_curve", "key_samples"):
            async with http.post(f"{manager_url}/{call}", headers=bearer) as reply:
                assert reply.status != 404, call


async def test_every_runs_at_once_or_after_a_delay_and_survives_a_failed_run() -> None:
    runs: list[str] = []

    async def now() -> None:
        runs.append("now")
        if runs.count("now") == 1:
            raise RuntimeError("a failed run is logged, and the loop goes on")

    async def later() -> None:
        runs.append("later")

    async with running(every(0.01, now), every(0.01, later, first_after=0.2)):
        await asyncio.sleep(0.1)
        assert runs.count("now") >= 2
        assert "later" not in runs
        await asyncio.sleep(0.2)
        assert "later" in runs
    stopped = len(runs)
    await asyncio.sleep(0.05)
    assert len(runs) == stopped  # the block's end cancelled both loops
