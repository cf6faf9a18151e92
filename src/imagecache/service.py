"""The image store's use cases: upload, read, list, delete all, clean up.

The order of steps is what keeps the invariants (docs/design.md):

- upload: journal the new blob name, write the blob, switch the row in one
  transaction (which assigns a new, higher version), invalidate that key on
  every cache node up to the new version, only then acknowledge; the replaced
  blob is deleted afterwards, and the journal lets a restart finish any step
  a crash interrupted;
- read: cache first; on a miss one load per key (single flight) reads the row
  and the blob and fills the cache with ADD at the row's version, which a node
  refuses if it has seen a newer version of the key. Before loading, the load
  asks the key's node for a fill lease, so that concurrent misses in several
  gateways cost about one blob read: the others wait for that fill. The lease
  only decides who loads, never what a read may return.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from cachenode.client import CachedItem, LeaseGranted
from imagecache.blobs import BlobStore
from imagecache.cachepool import CachePool
from imagecache.catalog import ImageCatalog, ImageRecord
from imagecache.errors import BlobNotFound, ImagecacheError, ImageNotFound, StorageError
from imagecache.images import check_key, content_type_for, flags_for, inspect_image

log = logging.getLogger(__name__)

# A load that took longer than this does not fill the cache: the nodes keep
# tombstones for 30 s, and a fill must arrive while they still refuse it.
FILL_DEADLINE_SECONDS = 5.0
# An upload journaled this long ago and never committed was interrupted.
ABANDONED_UPLOAD_AGE = timedelta(hours=1)
# How long a load may take before another gateway takes the key over: a
# holder that died delays the other gateways' reads of its key this long.
# Shorter than FILL_DEADLINE_SECONDS: a load too slow to fill (which sends no
# fill, so does not end its lease) has lost its lease by then anyway.
FILL_LEASE_SECONDS = 2.0
# A load that finds another gateway loading asks again after 5 ms, then
# doubling up to 50 ms: a fill usually lands within a few milliseconds.
LEASE_POLL_FIRST_SECONDS = 0.005
LEASE_POLL_MAX_SECONDS = 0.05
# ... and waits at most this many lease times in all before it loads anyway:
# the lease it found (a dead holder's ends within one) and one taken over by
# another gateway after it. Waiting never fails a read.
LEASE_WAIT_LIMIT = 2


@dataclass(frozen=True, slots=True)
class Image:
    key: str
    data: bytes
    content_type: str
    version: int


@dataclass(frozen=True, slots=True)
class UploadResult:
    record: ImageRecord
    replaced: bool


class SingleFlight:
    """At most one load per key at a time; concurrent callers share its result."""

    def __init__(self) -> None:
        self._loads: dict[str, asyncio.Task[Image]] = {}

    async def run(self, key: str, load: Callable[[], Awaitable[Image]]) -> Image:
        task = self._loads.get(key)
        if task is None:
            task = asyncio.ensure_future(load())
            self._loads[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        # Shielded: one caller giving up must not cancel the others' load.
        return await asyncio.shield(task)

    def forget(self, key: str | None = None) -> None:
        """Later callers start a new load (of ``key``, or of every key)."""
        if key is None:
            self._loads.clear()
        else:
            self._loads.pop(key, None)

    def _finished(self, key: str, task: asyncio.Task[Image]) -> None:
        if self._loads.get(key) is task:
            del self._loads[key]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone


class ImageService:
    def __init__(
        self,
        metadata: ImageCatalog,
        blobs: BlobStore,
        pool: CachePool,
        *,
        fill_lease_seconds: float = FILL_LEASE_SECONDS,
    ) -> None:
        """``fill_lease_seconds`` 0 turns fill leases off: every gateway loads its own misses."""
        self._metadata = metadata
        self._blobs = blobs
        self._pool = pool
        self._lease_seconds = fill_lease_seconds
        self._loads = SingleFlight()
        self.blob_reads = 0  # for tests and metrics: loads that reached the blob store

    async def upload(self, key: str, data: bytes) -> UploadResult:
        """Store ``data`` under ``key``, replacing any image there.

        Raises BadRequest for a bad key or a file that is not an image, and
        StorageError when it could not be stored (then nothing changed).
        """
        check_key(key)
        info = await asyncio.to_thread(inspect_image, data)
        blob_name = uuid.uuid4().hex
        await self._metadata.begin_upload(blob_name)
        try:
            await self._blobs.put(blob_name, data, info.content_type)
        except (ImagecacheError, OSError) as error:
            await self._forget_blob(blob_name)
            raise StorageError(f"could not store the image: {error}") from error
        # If the commit fails the journal still says "uploading", so the
        # clean-up deletes the blob later; it must not be deleted now, since
        # a commit whose reply was lost may have succeeded.
        record, replaced_blob = await self._metadata.commit_upload(
            key, blob_name, info.content_type, len(data), info.width, info.height
        )
        self._loads.forget(key)
        await self._pool.invalidate(key, record.version)
        await self._pool.store(key, data, flags_for(info.content_type), record.version)
        if replaced_blob is not None:
            await self._delete_blob(replaced_blob)
        return UploadResult(record, replaced=replaced_blob is not None)

    async def read(self, key: str) -> Image:
        """The image of ``key``; raises ImageNotFound, or BadRequest for a bad key."""
        check_key(key)
        item = await self._pool.get(key)
        image = None if item is None else _cached_image(key, item)
        if image is not None:
            return image
        return await self._loads.run(key, lambda: self._load(key))

    async def list_images(self) -> list[ImageRecord]:
        return await self._metadata.list_images()

    async def list_keys(self) -> list[str]:
        return await self._metadata.list_keys()

    async def delete_all(self) -> int:
        """Delete every image, row and cached copy; returns how many images there were."""
        blob_names = await self._metadata.delete_all()
        self._loads.forget()
        await self._pool.clear(version=await self._metadata.current_version() + 1)
        for name in blob_names:
            await self._delete_blob(name)
        return len(blob_names)

    async def clean_up(self) -> int:
        """Delete blobs that a crash or failure left behind; returns how many."""
        names = await self._metadata.blobs_to_delete(ABANDONED_UPLOAD_AGE)
        for name in names:
            await self._delete_blob(name)
        return len(names)

    async def heal_cache(self) -> None:
        await self._pool.heal(self._metadata.current_version)

    async def _load(self, key: str) -> Image:
        """Load ``key`` into the cache, or wait for another gateway that is loading it."""
        turn = await self._wait_for_turn(key)
        if isinstance(turn, Image):
            return turn
        holds_lease = turn
        try:
            return await self._load_from_store(key)
        except Exception:
            # Let the waiting gateways go on now, not at the end of the lease:
            # a missing key must answer 404 there promptly too. A load that
            # succeeds needs no release: its fill ends the lease on the node.
            if holds_lease:
                await self._pool.release(key)
            raise

    async def _wait_for_turn(self, key: str) -> Image | bool:
        """The image another gateway's load put in the cache meanwhile; else
        whether this load holds the key's fill lease (it loads either way)."""
        if self._lease_seconds <= 0:
            return False
        started = time.monotonic()
        give_up_at = started + LEASE_WAIT_LIMIT * self._lease_seconds
        pause = LEASE_POLL_FIRST_SECONDS
        while True:
            answer = await self._pool.lease(key, self._lease_seconds)
            if answer is None:
                return False  # the node cannot answer: load without it
            if isinstance(answer, LeaseGranted):
                return True
            if isinstance(answer, CachedItem):
                # Another gateway filled it: a cache read like the GET in
                # ``read``, and fresh for the same reasons (docs/design.md).
                image = _cached_image(key, answer)
                return False if image is None else image  # a foreign item: load it
            left = give_up_at - time.monotonic()
            if left <= 0:
                log.info(
                    "%r: no fill after %.1f s of waiting, loading it here",
                    key,
                    time.monotonic() - started,
                )
                return False
            await asyncio.sleep(min(pause, answer.seconds_left, left))
            pause = min(pause * 2, LEASE_POLL_MAX_SECONDS)

    async def _load_from_store(self, key: str) -> Image:
        for _ in range(3):
            started = time.monotonic()
            record = await self._metadata.get_image(key)
            if record is None:
                raise ImageNotFound(f"no image for key {key!r}")
            try:
                data = await self._blobs.get(record.blob_name)
            except BlobNotFound:
                continue  # replaced meanwhile, and the old blob deleted: read the row again
            self.blob_reads += 1
            if time.monotonic() - started < FILL_DEADLINE_SECONDS:
                await self._pool.fill(key, data, flags_for(record.content_type), record.version)
            return Image(key, data, record.content_type, record.version)
        raise StorageError(f"the image of {key!r} keeps changing; try again")

    async def _delete_blob(self, name: str) -> None:
        try:
            await self._blobs.delete(name)
            await self._metadata.blob_deleted(name)
        except (ImagecacheError, OSError) as error:
            log.warning("blob %s not deleted yet, the clean-up will retry: %s", name, error)

    async def _forget_blob(self, name: str) -> None:
        try:
            await self._metadata.abandon_upload(name)
            await self._delete_blob(name)
        except (ImagecacheError, OSError) as error:
            log.warning("upload of blob %s abandoned, clean-up will remove it: %s", name, error)


def _cached_image(key: str, item: CachedItem) -> Image | None:
    """The image a cached item holds; None for an item the gateway did not
    store (its flags name no image type), which counts as a miss."""
    content_type = content_type_for(item.flags)
    if content_type is None:
        return None
    return Image(key, item.value, content_type, item.version)
