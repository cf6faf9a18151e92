"""What the gateway's and the manager's aiohttp applications are both built on.

The manager runs on the gateway's metadata and blob stores, so both
applications open them the same way, under the same typed keys (re-exported
by each one's ``appkeys``); both render templates from the one templates/
folder and run background loops that log a failed pass and go on.

Here, in the gateway's package, because the manager may import the gateway
and never the other way round.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp_jinja2
import jinja2
from aiohttp import web

from imagecache.blobs import BlobStore, open_blob_store
from imagecache.catalog import ImageCatalog
from imagecache.config import Config
from imagecache.database import Database
from imagecache.poolmembers import MembershipStore

log = logging.getLogger(__name__)

# The top-level templates/ folder, which the build installs as this package (setup.cfg):
# a folder on disk both installed and editable, since the wheel is unpacked, never zipped.
TEMPLATES = Path(str(importlib.resources.files("imagecache.templates")))

CONFIG = web.AppKey("config", Config)
CATALOG = web.AppKey("catalog", ImageCatalog)
MEMBERSHIP_STORE = web.AppKey("membership_store", MembershipStore)
BLOBS = web.AppKey("blobs", BlobStore)


def use_templates(app: web.Application, folder: str) -> None:
    """Render ``app``'s pages from templates/<folder>, HTML escaped; serve /static."""
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(TEMPLATES / folder),
        autoescape=jinja2.select_autoescape(["html"]),
    )
    app.router.add_static("/static", TEMPLATES / "static")


@contextlib.asynccontextmanager
async def metadata_stores(
    app: web.Application, *, membership_apart: bool = False
) -> AsyncIterator[Database]:
    """The catalog and the membership store in ``app`` while the block runs; yields
    the database, for the application's own stores.

    ``membership_apart``: the membership store gets connections of its own (the
    gateway's: renewing its view must not queue behind image loads, or a busy
    gateway would lose its lease).
    """
    url = app[CONFIG].metadata_url
    async with contextlib.AsyncExitStack() as stack:
        database = await stack.enter_async_context(Database.open(url))
        membership_db = database
        if membership_apart:
            membership_db = await stack.enter_async_context(Database.open(url))
        app[CATALOG] = await ImageCatalog.open(database)
        app[MEMBERSHIP_STORE] = await MembershipStore.open(membership_db)
        yield database


async def blobs_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the blob store the configuration names, in ``app[BLOBS]``."""
    config = app[CONFIG]
    async with open_blob_store(config.blobs, config.aws) as blobs:
        app[BLOBS] = blobs
        yield


@contextlib.asynccontextmanager
async def running(*loops: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """``loops`` run as tasks while the block runs; cancelled, and waited for, after it."""
    tasks = [asyncio.create_task(loop) for loop in loops]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def every(
    seconds: float, action: Callable[[], Awaitable[object]], *, first_after: float = 0.0
) -> None:
    """Run ``action`` every ``seconds``, the first time after ``first_after``; a failed
    run is logged and the loop goes on."""
    if first_after:
        await asyncio.sleep(first_after)
    while True:
        try:
            await action()
        except Exception:
            log.exception(
                "background task %s failed; retrying", getattr(action, "__name__", action)
            )
        await asyncio.sleep(seconds)
