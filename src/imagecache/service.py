"""The image store's use cases: upload, read, list, delete all, clean up.

The order of steps is what keeps the invariants (docs/design.md):

- upload: journal the new blob name, write the blob, take a write ticket from
  the key's node, switch the row in one transaction (which assigns a new,
  higher version and puts the key's invalidation in the outbox), deliver the
  invalidation to every cache node, only then acknowledge; the replaced blob
  is deleted afterwards, and the journal and the outbox let any gateway
  finish any step a crash interrupted;
- read: cache first; on a miss one load per key (single flight, joined only
  by readers it can answer) reads the row and the blob and fills the cache
  with ADD at the row's version, carrying a write ticket taken before the
  row was read, which a node refuses if it has seen a newer version of the
  key since. Before loading, the load asks the key's node for a fill lease
  (which is also that ticket), so that concurrent misses in several gateways
  cost about one blob read: the others wait for that fill. The lease only
  decides who loads, never what a read may return.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum

from cachenode.client import CachedItem, LeaseHeld
from cachenode.protocol import MissKind
from imagecache.blobs import BlobStore
from imagecache.cachepool import CachePool, WriteTicket
from imagecache.catalog import ImageCatalog, ImageRecord
from imagecache.errors import BlobNotFound, ImagecacheError, ImageNotFound, StorageError
from imagecache.images import ImageInspector, check_key, content_type_for, flags_for
from imagecache.invalidation import Invalidator, read_back
from imagecache.singleflight import Flight, SingleFlight

log = logging.getLogger(__name__)

# An upload journaled this long ago and never committed was interrupted.
ABANDONED_UPLOAD_AGE = timedelta(hours=1)
# How long a load may take before another gateway takes the key over: a
# holder that died delays the other gateways' reads of its key this long.
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
    # Read from the store and refused by the cache as over its item size:
    # every read it answers reports its miss as one no pool size fixes.
    too_large_to_cache: bool = False
    # Read from the key's cache node (a hit), not loaded from the blob store.
    from_node: bool = False


@dataclass(frozen=True, slots=True)
class UploadResult:
    record: ImageRecord
    replaced: bool


class ImageService:
    def __init__(
        self,
        catalog: ImageCatalog,
        blobs: BlobStore,
        pool: CachePool,
        invalidator: Invalidator,
        *,
        fill_lease_seconds: float = FILL_LEASE_SECONDS,
        images: ImageInspector | None = None,
    ) -> None:
        """``fill_lease_seconds`` 0 turns fill leases off: every gateway loads its own misses.
        ``images`` checks uploads (its pixel limit, default 50 million)."""
        self._catalog = catalog
        self._blobs = blobs
        self._pool = pool
        self._invalidator = invalidator
        self._lease_seconds = fill_lease_seconds
        self._loads: SingleFlight[Image] = SingleFlight()
        self._images = images or ImageInspector()
        self.blob_reads = 0  # for tests and metrics: loads that reached the blob store

    async def upload(self, key: str, data: bytes) -> UploadResult:
        """Store ``data`` under ``key``, replacing any image there.

        Raises BadRequest for a bad key or a file that is not an image, and
        StorageError when it could not be stored or made current everywhere
        (then it was not acknowledged: the image may be stored or not).
        """
        check_key(key)
        info = await self._images.inspect(data)
        blob_name = uuid.uuid4().hex
        await self._catalog.begin_upload(blob_name)
        try:
            await self._blobs.put(blob_name, data, info.content_type)
        except (ImagecacheError, OSError) as error:
            await self._forget_blob(blob_name)
            raise StorageError(f"could not store the image: {error}") from error
        # Taken before the commit: any newer upload's invalidation reaches the
        # node after it, so a late write-through of this version is refused.
        ticket = await self._pool.ticket(key)
        try:
            committed = await self._catalog.commit_upload(
                key, blob_name, info.content_type, len(data), info.width, info.height
            )
            record, replaced_blob = committed.record, committed.replaced_blob
            invalidation = committed.invalidation
        except StorageError:
            # The commit may have happened with its reply lost: the row tells.
            # If it did not, the journal still says "uploading" and the
            # clean-up deletes the blob later.
            found = await read_back(self._catalog, key, blob_name)
            if found is None:
                raise
            log.warning("the commit of %r went through though its reply was lost", key)
            record, invalidation = found
            replaced_blob = None  # journaled as garbage by the commit: the clean-up has it
        await self._invalidator.deliver(invalidation)
        if ticket is not None:
            await self._pool.store(key, data, flags_for(info.content_type), record.version, ticket)
        if replaced_blob is not None:
            await self._delete_blob(replaced_blob)
        return UploadResult(record, replaced=replaced_blob is not None)

    async def read(self, key: str) -> Image:
        """The image of ``key``; raises ImageNotFound, or BadRequest for a bad key."""
        check_key(key)
        # With leases, one request reads the key and, on a miss, asks for its lease.
        answer = await (
            self._pool.lookup(key, self._lease_seconds)
            if self._lease_seconds > 0
            else self._pool.get(key)
        )
        if isinstance(answer, CachedItem):
            image = _cached_image(key, answer)
            if image is not None:
                return image
        first_turn = _FirstTurn(answer)
        if self._loads.running(key):
            # This read joins the load under way, which asked for itself.
            first_turn.take()
            if isinstance(answer, WriteTicket):
                # Unused: give it back, or other gateways would wait out its time.
                await self._pool.release(key)
        # Each read that gets here counted a miss on the key's node, also the
        # reads that share another's load: each tells the node when no pool
        # size could have made it a hit (a key with no image, an image too
        # large to cache), so the node counts it apart from the misses.
        try:
            image = await self._loads.run(
                key, lambda flight: self._load(key, flight, first_turn.take())
            )
        except ImageNotFound:
            await self._pool.unfixable_miss(key, MissKind.NO_IMAGE)
            raise
        if image.too_large_to_cache:
            await self._pool.unfixable_miss(key, MissKind.TOO_LARGE)
        return image

    async def list_images(self) -> list[ImageRecord]:
        return await self._catalog.list_images()

    async def list_keys(self) -> list[str]:
        return await self._catalog.list_keys()

    async def delete_all(self) -> int:
        """Delete every image, row and cached copy; returns how many images there were.

        Raises StorageError as ``upload`` does.
        """
        blob_names, invalidation = await self._catalog.delete_all()
        await self._invalidator.deliver(invalidation)
        for name in blob_names:
            await self._delete_blob(name)
        return len(blob_names)

    async def clean_up(self) -> int:
        """Delete blobs that a crash or failure left behind; returns how many."""
        names = await self._catalog.blobs_to_delete(ABANDONED_UPLOAD_AGE)
        for name in names:
            await self._delete_blob(name)
        return len(names)

    async def heal_cache(self) -> None:
        """Bring back nodes set aside after failures; deliver what the outbox
        holds and heal dirty nodes."""
        await self._pool.heal()
        await self._invalidator.deliver_pending()

    async def _load(self, key: str, flight: Flight, answer: LeaseAnswer | _Ask) -> Image:
        """Load ``key`` into the cache, or wait for another gateway that is loading it.

        ``answer`` is what the node answered the read that starts this load
        (``_Ask.AGAIN``: nothing yet, or nothing this load may use)."""
        turn = await self._wait_for_turn(key, flight, answer)
        if isinstance(turn, Image):
            return turn
        holds_lease = turn is not None
        try:
            # The fill's ticket is taken before the row is read.
            ticket = turn if turn is not None else await self._pool.ticket(key)
            return await self._load_from_store(key, flight, ticket)
        except ImageNotFound:
            # Every read this load answers reports its miss to the key's node
            # (``read``), which ends the lease as the release below does.
            raise
        except Exception:
            # Let the waiting gateways go on now, not at the end of the lease:
            # a missing key must answer 404 there promptly too. A load that
            # succeeds needs no release: its fill ends the lease on the node.
            if holds_lease:
                await self._pool.release(key)
            raise

    async def _wait_for_turn(
        self, key: str, flight: Flight, answer: LeaseAnswer | _Ask
    ) -> Image | WriteTicket | None:
        """The image another gateway's load put in the cache meanwhile; else
        the key's fill lease, as the fill's ticket, or None when this load
        does not hold it (it loads either way)."""
        if self._lease_seconds <= 0:
            return None
        started = time.monotonic()
        give_up_at = started + LEASE_WAIT_LIMIT * self._lease_seconds
        pause = LEASE_POLL_FIRST_SECONDS
        # The read's own LOOKUP counts as this load's first question: it was
        # asked after that read arrived, before anyone could join the load.
        flight.probe()
        while True:
            if isinstance(answer, _Ask):
                flight.probe()
                answer = await self._pool.lease(key, self._lease_seconds)
            if answer is None:
                return None  # the node cannot answer: load without it
            if isinstance(answer, WriteTicket):
                return answer
            if isinstance(answer, CachedItem):
                # Another gateway filled it: a cache read like the one in
                # ``read``, and fresh for the same reasons (docs/design.md).
                return _cached_image(key, answer)  # None: a foreign item, load it
            left = give_up_at - time.monotonic()
            if left <= 0:
                log.info(
                    "%r: no fill after %.1f s of waiting, loading it here",
                    key,
                    time.monotonic() - started,
                )
                return None
            await asyncio.sleep(min(pause, answer.seconds_left, left))
            pause = min(pause * 2, LEASE_POLL_MAX_SECONDS)
            answer = _Ask.AGAIN

    async def _load_from_store(self, key: str, flight: Flight, ticket: WriteTicket | None) -> Image:
        for _ in range(3):
            flight.probe()
            record = await self._catalog.stored_image(key)
            if record is None:
                raise ImageNotFound(f"no image for key {key!r}")
            try:
                data = await self._blobs.get(record.blob_name)
            except BlobNotFound:
                continue  # replaced meanwhile, and the old blob deleted: read the row again
            self.blob_reads += 1
            too_large = False
            if ticket is not None:
                flags = flags_for(record.content_type)
                too_large = not await self._pool.fill(key, data, flags, record.version, ticket)
            return Image(key, data, record.content_type, record.version, too_large)
        raise StorageError(f"the image of {key!r} keeps changing; try again")

    async def _delete_blob(self, name: str) -> None:
        try:
            await self._blobs.delete(name)
            await self._catalog.blob_deleted(name)
        except (ImagecacheError, OSError) as error:
            log.warning("blob %s not deleted yet, the clean-up will retry: %s", name, error)

    async def _forget_blob(self, name: str) -> None:
        try:
            await self._catalog.abandon_upload(name)
            await self._delete_blob(name)
        except (ImagecacheError, OSError) as error:
            log.warning("upload of blob %s abandoned, clean-up will remove it: %s", name, error)


# What a key's node answered a read or a lease request: the item, the lease
# granted (the fill's ticket), another's lease, or None (it cannot answer).
LeaseAnswer = CachedItem | WriteTicket | LeaseHeld | None


class _Ask(Enum):
    AGAIN = "ask the node again"


class _FirstTurn:
    """The read's answer from the node, for the first load that read starts
    (any later one asks again: the answer is too old for it)."""

    def __init__(self, answer: LeaseAnswer) -> None:
        self._answer: LeaseAnswer | _Ask = answer

    def take(self) -> LeaseAnswer | _Ask:
        answer, self._answer = self._answer, _Ask.AGAIN
        return answer


def _cached_image(key: str, item: CachedItem) -> Image | None:
    """The image a cached item holds; None for an item the gateway did not
    store (unversioned, or its flags name no image type), which counts as a miss."""
    content_type = content_type_for(item.flags)
    if content_type is None or not item.version:
        return None
    return Image(key, item.value, content_type, item.version, from_node=True)
