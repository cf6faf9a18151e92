"""The blob store: image bytes under application-made names, in a local folder or on S3.

Blob names are made by the application (``uuid4().hex``), never taken from a user's
file name, and both adapters refuse anything but ``[0-9A-Za-z_-]{1,128}`` with
ValueError, so a name can never walk out of the folder or the S3 prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from imagecache.config import AwsConfig, BlobConfig
from imagecache.errors import BlobNotFound, StorageError

T = TypeVar("T")

NAME_PATTERN = re.compile(r"[0-9A-Za-z_-]{1,128}")

# Temporary files start with a dot, which no blob name can, so they can never be
# mistaken for a blob.
_TEMP_PREFIX = "."
_TEMP_SUFFIX = ".tmp"
# Leftover temporary files older than this are removed at open. Younger ones may
# belong to a put still running in another process sharing the folder.
_STALE_TEMP_SECONDS = 3600.0

# S3 error codes that mean "no such key". A bare 404 code comes from responses
# without a body; NoSuchBucket is deliberately absent: that is a broken setup,
# not a missing blob.
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
# preadv's "fail instead of waiting on the disk" flag, where there is one (Linux).
_NO_WAIT: int | None = getattr(os, "RWF_NOWAIT", None)


class BlobStore(Protocol):
    """Where image bytes live; a put is durable once it returns."""

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``name``, replacing any blob of that name.

        Raises ValueError for a malformed name, StorageError when the store fails.
        """
        ...

    async def get(self, name: str) -> bytes:
        """The bytes stored under ``name``.

        Raises ValueError for a malformed name, BlobNotFound when there is no such
        blob, StorageError when the store fails.
        """
        ...

    async def delete(self, name: str) -> None:
        """Remove the blob ``name``; removing a missing blob is not an error.

        Raises ValueError for a malformed name, StorageError when the store fails.
        """
        ...

    def names(self) -> AsyncIterator[str]:
        """Every blob name in the store, in no particular order (for cleanup).

        Raises StorageError when the store fails.
        """
        ...


def check_name(name: str) -> str:
    """``name`` itself when it is a valid blob name; raises ValueError otherwise."""
    if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"invalid blob name {name!r}: must match {NAME_PATTERN.pattern}")
    return name


@asynccontextmanager
async def open_blob_store(blobs: BlobConfig, aws: AwsConfig) -> AsyncIterator[BlobStore]:
    """Yield the blob store that ``blobs`` configures, ready for use; close it on exit.

    The folder store's root is created if missing. The S3 store's client is
    created here, with credentials from the standard AWS chain, and the bucket is
    checked once so that a bad setup fails at start-up, not on the first upload.
    Raises StorageError when the folder or bucket cannot be used, ValueError for
    an unknown backend.
    """
    if blobs.backend == "folder":
        store = FolderBlobStore(blobs.folder)
        await store.prepare()
        yield store
    elif blobs.backend == "s3":
        session = get_session()
        async with session.create_client(
            "s3", region_name=aws.region, endpoint_url=aws.endpoint_url
        ) as client:
            s3_store = S3BlobStore(client, blobs.bucket, blobs.prefix)
            await s3_store.check_bucket()
            yield s3_store
    else:
        raise ValueError(f"unknown blob backend {blobs.backend!r}")


class FolderBlobStore:
    """Blobs as files under ``root``, fanned out by the first two characters of
    the name (``root/ab/abcdef...``) so no folder grows huge.

    Every file operation but a read runs in a worker thread, so the event loop
    never waits on the disk; a read runs there only for the part of a blob
    that is not in the page cache (``get``). Names differing only in case are
    distinct blobs, which needs a case-sensitive file system (the application's
    names are lowercase hex).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._root_text = str(root)

    async def prepare(self) -> None:
        """Create the root folder (and parents) if missing and remove stale
        temporary files left by a crash. Raises StorageError when that fails."""
        await self._run(self._prepare, "prepare blob folder", self.root)

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``name`` atomically and durably (see BlobStore.put).

        The folder store keeps no content type; the gateway knows it from metadata.
        """
        path = self._path(check_name(name))
        await self._run(partial(self._put, path, data), "write blob", path)

    async def get(self, name: str) -> bytes:
        """The bytes of blob ``name`` (see BlobStore.get).

        A blob whose pages are all in the page cache is read right here, in
        one copy and without a worker thread (``RWF_NOWAIT`` makes the read
        fail rather than wait on the disk); the rest of any other blob is read
        in a worker thread, so the event loop still never waits on the disk.
        The hop costs about 35 us of CPU per read, a miss's largest share
        after the database (bench/misses.py); so does a pathlib path (about
        10 us to build), hence the plain string.
        """
        check_name(name)
        path = os.path.join(self._root_text, name[:2], name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as error:
            raise BlobNotFound(f"no blob named {name}") from error
        except OSError as error:
            raise StorageError(f"cannot read blob {path}: {error}") from error
        try:
            try:
                data, done = _read_cached(fd)
            except BaseException:
                os.close(fd)
                raise
            if done < len(data):
                # The thread owns the descriptor from here and closes it.
                # Shielded: a cancelled read still lets it run (cancelling it
                # before it starts would leave the file open).
                rest = asyncio.ensure_future(
                    asyncio.to_thread(_read_rest_and_close, fd, data, done)
                )
                rest.add_done_callback(_retrieve_outcome)
                await asyncio.shield(rest)
            else:
                os.close(fd)
        except OSError as error:
            raise StorageError(f"cannot read blob {path}: {error}") from error
        return bytes(data)

    async def delete(self, name: str) -> None:
        """Remove blob ``name`` if present (see BlobStore.delete)."""
        path = self._path(check_name(name))
        # No fsync: a delete lost in a crash leaves an orphan for cleanup to find,
        # it never loses an acknowledged image.
        await self._run(partial(path.unlink, missing_ok=True), "delete blob", path)

    async def names(self) -> AsyncIterator[str]:
        """Every blob name (see BlobStore.names); temporary files are skipped.

        Each fan-out folder is listed in one go before its names are yielded, so
        the caller may delete blobs while iterating.
        """
        folders = await self._run(self._list_folders, "list blob folder", self.root)
        for folder in folders:
            for name in await self._run(
                partial(self._list_blobs, folder), "list blob folder", folder
            ):
                yield name

    def _path(self, name: str) -> Path:
        return self.root / name[:2] / name

    @staticmethod
    async def _run(work: Callable[[], T], action: str, path: Path) -> T:
        # Cancelling the caller does not stop the thread, so a cancelled put may
        # still land; that is harmless, as it was never acknowledged.
        try:
            return await asyncio.to_thread(work)
        except OSError as error:
            raise StorageError(f"cannot {action} {path}: {error}") from error

    def _prepare(self) -> None:
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            _fsync_folder(self.root.parent)
        oldest_kept = time.time() - _STALE_TEMP_SECONDS
        for folder in self._list_folders():
            for entry in os.scandir(folder):
                # Another process may rename its temporary file away meanwhile.
                with contextlib.suppress(FileNotFoundError):
                    if _is_temp(entry.name) and entry.stat().st_mtime < oldest_kept:
                        os.unlink(entry.path)

    def _put(self, path: Path, data: bytes) -> None:
        folder = path.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            # The new folder's own entry must survive a crash too.
            _fsync_folder(folder.parent)
        # Write aside and rename into place: after a crash the name holds either
        # the old blob or the new one, never a torn write.
        fd, temp = tempfile.mkstemp(
            prefix=_TEMP_PREFIX + path.name + ".", suffix=_TEMP_SUFFIX, dir=folder
        )
        try:
            with open(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        # The rename is durable only once the folder is synced.
        _fsync_folder(folder)

    def _list_folders(self) -> list[Path]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return [Path(e.path) for e in entries if e.is_dir() and NAME_PATTERN.fullmatch(e.name)]

    @staticmethod
    def _list_blobs(folder: Path) -> list[str]:
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return []
        # Only names that put() could have made here: valid, and in their own fan-out folder.
        return [
            e.name
            for e in entries
            if e.name[:2] == folder.name and NAME_PATTERN.fullmatch(e.name) and e.is_file()
        ]


def _read_cached(fd: int) -> tuple[bytearray, int]:
    """A buffer of the file's size, and how many of its first bytes were read
    from the page cache (without waiting on the disk: none where the platform
    has no ``RWF_NOWAIT``, i.e. outside Linux)."""
    data = bytearray(os.fstat(fd).st_size)
    if _NO_WAIT is None or not data:
        return data, 0
    try:
        return data, os.preadv(fd, [data], 0, _NO_WAIT)
    except BlockingIOError:  # its first page is not in the page cache
        return data, 0
    except OSError as error:
        if error.errno != errno.EOPNOTSUPP:  # this file system cannot say
            raise
        return data, 0


def _retrieve_outcome(done: asyncio.Future[None]) -> None:
    """Take a shielded read's outcome, which its cancelled reader no longer will."""
    if not done.cancelled():
        done.exception()


def _read_rest_and_close(fd: int, data: bytearray, done: int) -> None:
    """Fill ``data`` from offset ``done`` on, then close ``fd`` (in a worker
    thread: this may wait on the disk)."""
    try:
        with memoryview(data) as view:
            while done < len(data):
                read = os.preadv(fd, [view[done:]], done)
                if read == 0:
                    raise OSError(errno.EIO, f"the blob ended after {done} of {len(data)} bytes")
                done += read
    finally:
        os.close(fd)


def _is_temp(file_name: str) -> bool:
    return file_name.startswith(_TEMP_PREFIX) and file_name.endswith(_TEMP_SUFFIX)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3BlobStore:
    """Blobs as objects ``prefix + name`` in an S3 bucket.

    ``client`` is an aiobotocore S3 client owned by the caller (open_blob_store).
    ``page_size`` is how many keys one listing request asks for (S3's maximum is 1000).
    """

    def __init__(self, client: Any, bucket: str, prefix: str, page_size: int = 1000) -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix
        self.page_size = page_size

    async def check_bucket(self) -> None:
        """Return if the bucket exists and is reachable; raise StorageError otherwise."""
        try:
            await self._client.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"cannot use S3 bucket {self.bucket!r}: {error}") from error

    async def put(self, name: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``name`` (see BlobStore.put); S3 is durable on success."""
        key = self.prefix + check_name(name)
        try:
            await self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type
            )
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"cannot write s3://{self.bucket}/{key}: {error}") from error

    async def get(self, name: str) -> bytes:
        """The bytes of blob ``name`` (see BlobStore.get)."""
        key = self.prefix + check_name(name)
        try:
            response = await self._client.get_object(Bucket=self.bucket, Key=key)
            async with response["Body"] as body:
                data: bytes = await body.read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in _NOT_FOUND_CODES:
                raise BlobNotFound(f"no blob named {name}") from error
            raise StorageError(f"cannot read s3://{self.bucket}/{key}: {error}") from error
        except BotoCoreError as error:
            # Includes a connection lost or a timeout while reading the body.
            raise StorageError(f"cannot read s3://{self.bucket}/{key}: {error}") from error
        return data

    async def delete(self, name: str) -> None:
        """Remove blob ``name`` if present (see BlobStore.delete); S3 itself
        answers success for a missing key."""
        key = self.prefix + check_name(name)
        try:
            await self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"cannot delete s3://{self.bucket}/{key}: {error}") from error

    async def names(self) -> AsyncIterator[str]:
        """Every blob name under the prefix (see BlobStore.names).

        Keys under the prefix that are not valid blob names were not written by
        this store and are skipped, so cleanup never touches them.
        """
        paginator = self._client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=self.prefix,
            PaginationConfig={"PageSize": self.page_size},
        )
        try:
            async for page in pages:
                for item in page.get("Contents", ()):
                    name = item["Key"][len(self.prefix) :]
                    if NAME_PATTERN.fullmatch(name):
                        yield name
        except (ClientError, BotoCoreError) as error:
            raise StorageError(f"cannot list s3://{self.bucket}/{self.prefix}: {error}") from error
