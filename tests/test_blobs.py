"""The blob store: one contract suite run against the folder and the S3 adapter,
then what only one adapter promises. S3 runs against a moto server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from aiobotocore.session import get_session

from imagecache.blobs import BlobStore, FolderBlobStore, S3BlobStore, open_blob_store
from imagecache.config import AwsConfig, BlobConfig
from imagecache.errors import BlobNotFound, StorageError
from tests.aws import REGION, aws_environment, moto_server  # noqa: F401

MIB = 1 << 20
BIG = random.Random(0).randbytes(5 * MIB)
PREFIX = "images/"
# Small enough that the contract's listing test spans several S3 pages.
PAGE_SIZE = 3

INVALID_NAMES = {
    "traversal": "../etc/passwd",
    "slash": "a/b",
    "empty": "",
    "200-chars": "x" * 200,
    "dot-dot": "..",
    "dot": "a.b",
    "space": "a b",
    "newline": "abc\n",
    "non-ascii": "é",
}


def s3_client(endpoint: str) -> Any:
    """An aiobotocore S3 client (an async context manager) for the moto server."""
    return get_session().create_client("s3", region_name=REGION, endpoint_url=endpoint)


async def create_bucket(client: Any) -> str:
    """A new, empty bucket with a name unique to the calling test."""
    bucket = f"blobs-{uuid4().hex}"
    await client.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(params=["folder", "s3"])
async def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BlobStore]:
    """Each adapter in turn, empty. The folder store lives under ``tmp_path/blobs``."""
    if request.param == "folder":
        store = FolderBlobStore(tmp_path / "blobs")
        await store.prepare()
        yield store
        return
    request.getfixturevalue("aws_environment")
    endpoint: str = request.getfixturevalue("moto_server")
    async with s3_client(endpoint) as client:
        bucket = await create_bucket(client)
        yield S3BlobStore(client, bucket, PREFIX, page_size=PAGE_SIZE)


@pytest.fixture
async def s3(moto_server: str, aws_environment: None) -> AsyncIterator[Any]:  # noqa: F811
    """An aiobotocore S3 client for the moto server, in an isolated environment."""
    async with s3_client(moto_server) as client:
        yield client


@pytest.fixture
async def bucket(s3: Any) -> str:
    return await create_bucket(s3)


async def all_names(store: BlobStore) -> list[str]:
    return sorted([name async for name in store.names()])


def files_under(folder: Path) -> list[Path]:
    # Blocking, but only on a test's own small temporary folder.
    return [p for p in folder.rglob("*") if p.is_file()]


# The contract, for both adapters.


@pytest.mark.parametrize("data", [b"\x89PNG small", b"", BIG], ids=["small", "empty", "5MB"])
async def test_put_then_get_round_trips(blob_store: BlobStore, data: bytes) -> None:
    await blob_store.put("abc123", data, "image/png")

    assert await blob_store.get("abc123") == data


async def test_put_overwrites(blob_store: BlobStore) -> None:
    await blob_store.put("abc123", b"old", "image/png")
    await blob_store.put("abc123", b"new", "image/jpeg")

    assert await blob_store.get("abc123") == b"new"
    assert await all_names(blob_store) == ["abc123"]


async def test_get_of_a_missing_name_raises(blob_store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await blob_store.get("nothere")


async def test_delete_then_get_raises(blob_store: BlobStore) -> None:
    await blob_store.put("abc123", b"data", "image/png")
    await blob_store.put("abc456", b"other", "image/png")

    await blob_store.delete("abc123")

    with pytest.raises(BlobNotFound):
        await blob_store.get("abc123")
    assert await blob_store.get("abc456") == b"other"
    assert await all_names(blob_store) == ["abc456"]


async def test_delete_of_a_missing_name_is_fine(blob_store: BlobStore) -> None:
    await blob_store.delete("nothere")
    await blob_store.put("abc123", b"data", "image/png")
    await blob_store.delete("abc123")
    await blob_store.delete("abc123")

    assert await all_names(blob_store) == []


async def test_names_of_an_empty_store(blob_store: BlobStore) -> None:
    assert await all_names(blob_store) == []


async def test_names_lists_exactly_what_was_put(blob_store: BlobStore) -> None:
    # Short, long, mixed-case and punctuated names, sharing fan-out folders or not;
    # more than PAGE_SIZE of them so S3 lists several pages.
    names = ["a", "ab", "abc", "ABC", "a-_b", "_", "-x", "Z" * 128]
    names += [uuid4().hex for _ in range(8)]
    for name in names:
        await blob_store.put(name, name.encode(), "image/png")

    assert await all_names(blob_store) == sorted(names)
    for name in names:
        assert await blob_store.get(name) == name.encode()


async def test_names_allows_deleting_while_listing(blob_store: BlobStore) -> None:
    names = [uuid4().hex for _ in range(10)]
    for name in names:
        await blob_store.put(name, b"x", "image/png")

    async for name in blob_store.names():
        await blob_store.delete(name)

    assert await all_names(blob_store) == []


@pytest.mark.parametrize("name", INVALID_NAMES.values(), ids=INVALID_NAMES.keys())
async def test_invalid_names_raise_and_write_nothing(
    blob_store: BlobStore, name: str, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="invalid blob name"):
        await blob_store.put(name, b"evil", "image/png")
    with pytest.raises(ValueError, match="invalid blob name"):
        await blob_store.get(name)
    with pytest.raises(ValueError, match="invalid blob name"):
        await blob_store.delete(name)

    assert await all_names(blob_store) == []
    # Nothing escaped the folder store's root either (S3 never writes here).
    assert files_under(tmp_path) == []


async def test_the_longest_name_is_128_characters(blob_store: BlobStore) -> None:
    await blob_store.put("n" * 128, b"data", "image/png")

    assert await blob_store.get("n" * 128) == b"data"
    with pytest.raises(ValueError, match="invalid blob name"):
        await blob_store.put("n" * 129, b"data", "image/png")


# The folder adapter.


async def test_folder_fans_out_by_the_first_two_characters(tmp_path: Path) -> None:
    store = FolderBlobStore(tmp_path / "blobs")
    await store.put("abcdef", b"data", "image/png")
    await store.put("x", b"short", "image/png")

    assert (tmp_path / "blobs" / "ab" / "abcdef").read_bytes() == b"data"
    assert (tmp_path / "blobs" / "x" / "x").read_bytes() == b"short"


async def test_folder_leftover_temp_file_is_not_listed_and_shadows_nothing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "blobs"
    store = FolderBlobStore(root)
    await store.put("abcdef", b"good", "image/png")
    # What a crash in the middle of put() leaves: a torn temporary file beside
    # the blob, and one for a blob whose first put never completed.
    (root / "ab" / ".abcdef.k3j4h5.tmp").write_bytes(b"to")
    (root / "ab" / ".abzzzz.q8w7e6.tmp").write_bytes(b"to")

    assert await all_names(store) == ["abcdef"]
    assert await store.get("abcdef") == b"good"
    with pytest.raises(BlobNotFound):
        await store.get("abzzzz")


async def test_folder_open_removes_stale_temp_files_only(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    await FolderBlobStore(root).put("abcdef", b"good", "image/png")
    stale = root / "ab" / ".abcdef.old.tmp"
    fresh = root / "ab" / ".abcdef.new.tmp"
    stale.write_bytes(b"torn")
    fresh.write_bytes(b"maybe another process is writing")
    two_hours_ago = time.time() - 7200
    os.utime(stale, (two_hours_ago, two_hours_ago))

    async with open_blob_store(BlobConfig(backend="folder", folder=root), AwsConfig()) as store:
        assert not stale.exists()
        assert fresh.exists()
        assert await store.get("abcdef") == b"good"


async def test_folder_open_creates_the_root_with_parents(tmp_path: Path) -> None:
    root = tmp_path / "data" / "deeper" / "blobs"

    async with open_blob_store(BlobConfig(backend="folder", folder=root), AwsConfig()) as store:
        assert root.is_dir()
        assert await all_names(store) == []


async def test_folder_put_leaves_no_temp_files(tmp_path: Path) -> None:
    store = FolderBlobStore(tmp_path / "blobs")
    await store.put("abcdef", b"one", "image/png")
    await store.put("abcdef", b"two", "image/png")

    assert sorted(p.name for p in (tmp_path / "blobs" / "ab").iterdir()) == ["abcdef"]


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting the work handed to its threads."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.handed = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        self.handed += 1
        return super().submit(*args, **kwargs)


@pytest.fixture
def counting_executor() -> Iterator[CountingExecutor]:
    executor = CountingExecutor()
    yield executor
    executor.shutdown()


def drop_from_page_cache(path: Path, keep_first: int = 0) -> None:
    """Evict ``path``'s pages (it was fsynced), then read its first ``keep_first`` bytes back."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead past them
        if keep_first:
            os.pread(fd, keep_first, 0)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``path`` to the disk (pages still dirty could not be evicted)."""
    with open(path, "wb") as file:
        file.write(data)
        os.fsync(file.fileno())


def cached_prefix(path: Path) -> int:
    """How many of the file's first bytes a no-wait read gets from the page cache."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [bytearray(path.stat().st_size)], 0, os.RWF_NOWAIT)
    except BlockingIOError:
        return 0
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="reads in the loop need Linux")
async def test_folder_reads_a_cached_blob_without_a_thread(
    tmp_path: Path, counting_executor: CountingExecutor
) -> None:
    store = FolderBlobStore(tmp_path / "blobs")
    data = random.Random(1).randbytes(300_000)
    await store.put("abcdef", data, "image/png")
    asyncio.get_running_loop().set_default_executor(counting_executor)

    assert await store.get("abcdef") == data
    assert counting_executor.handed == 0


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="reads in the loop need Linux")
@pytest.mark.parametrize("cached", [0, 8192], ids=["none-cached", "first-pages-cached"])
async def test_folder_reads_what_the_page_cache_lacks_in_a_thread(
    tmp_path: Path, counting_executor: CountingExecutor, cached: int
) -> None:
    store = FolderBlobStore(tmp_path / "blobs")
    data = random.Random(2).randbytes(300_000)
    await store.put("abcdef", data, "image/png")
    # Whether pages can be evicted here is probed on another file: the
    # probe's no-wait read may start readahead of what it missed (it did on
    # CI's kernel, and the store then found the whole blob cached).
    probe = tmp_path / "probe"
    write_synced(probe, data)
    drop_from_page_cache(probe, keep_first=cached)
    if cached_prefix(probe) not in (cached, 0):
        pytest.skip("this file system does not let the test evict a file's pages")
    drop_from_page_cache(tmp_path / "blobs" / "ab" / "abcdef", keep_first=cached)
    asyncio.get_running_loop().set_default_executor(counting_executor)

    assert await store.get("abcdef") == data
    assert counting_executor.handed == 1


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="reads in the loop need Linux")
async def test_folder_reads_leave_no_descriptor_open_even_when_cancelled(tmp_path: Path) -> None:
    store = FolderBlobStore(tmp_path / "blobs")
    data = random.Random(3).randbytes(300_000)
    await store.put("abcdef", data, "image/png")
    path = tmp_path / "blobs" / "ab" / "abcdef"
    before = open_descriptors()

    assert await store.get("abcdef") == data  # from the page cache
    drop_from_page_cache(path)
    assert await store.get("abcdef") == data  # through a thread
    with pytest.raises(BlobNotFound):
        await store.get("abcdefg")
    for _ in range(20):  # cancelled while the thread reads: it closes the file itself
        drop_from_page_cache(path)
        reading = asyncio.ensure_future(store.get("abcdef"))
        await asyncio.sleep(0)
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
    for _ in range(100):  # the threads finish on their own
        if open_descriptors() == before:
            break
        await asyncio.sleep(0.01)
    assert open_descriptors() == before


async def test_folder_reads_an_empty_blob(tmp_path: Path) -> None:
    store = FolderBlobStore(tmp_path / "blobs")
    await store.put("abcdef", b"", "image/png")

    assert await store.get("abcdef") == b""


async def test_folder_os_errors_become_storage_errors(tmp_path: Path) -> None:
    root = tmp_path / "blobs"
    store = FolderBlobStore(root)
    await store.prepare()
    # A file where the fan-out folder "ab" should be.
    (root / "ab").write_bytes(b"in the way")

    with pytest.raises(StorageError, match="cannot write blob"):
        await store.put("abcdef", b"data", "image/png")
    with pytest.raises(StorageError, match="cannot read blob"):
        await store.get("abcdef")


async def test_folder_open_on_a_file_raises_storage_error(tmp_path: Path) -> None:
    (tmp_path / "blobs").write_bytes(b"not a folder")
    config = BlobConfig(backend="folder", folder=tmp_path / "blobs")

    with pytest.raises(StorageError, match="cannot prepare blob folder"):
        async with open_blob_store(config, AwsConfig()):
            pass


# The S3 adapter.


async def test_s3_keys_are_prefix_and_name_with_the_content_type(s3: Any, bucket: str) -> None:
    store = S3BlobStore(s3, bucket, PREFIX)
    await store.put("abcdef", b"data", "image/webp")

    head = await s3.head_object(Bucket=bucket, Key="images/abcdef")
    assert head["ContentType"] == "image/webp"
    assert head["ContentLength"] == 4


async def test_s3_names_skips_keys_it_did_not_write(s3: Any, bucket: str) -> None:
    store = S3BlobStore(s3, bucket, PREFIX)
    await store.put("abcdef", b"data", "image/png")
    for key in ["abcdef", "other/abcdef", "images/sub/abcdef", "images/bad name", "images/"]:
        await s3.put_object(Bucket=bucket, Key=key, Body=b"foreign")

    assert await all_names(store) == ["abcdef"]


async def test_s3_with_an_empty_prefix(s3: Any, bucket: str) -> None:
    store = S3BlobStore(s3, bucket, "")
    await store.put("abcdef", b"data", "image/png")

    assert await all_names(store) == ["abcdef"]
    assert (await s3.head_object(Bucket=bucket, Key="abcdef"))["ContentLength"] == 4


async def test_s3_open_blob_store_round_trips(moto_server: str, bucket: str) -> None:  # noqa: F811
    config = BlobConfig(backend="s3", bucket=bucket, prefix=PREFIX)

    async with open_blob_store(config, AwsConfig(REGION, moto_server)) as store:
        await store.put("abcdef", b"data", "image/png")
        assert await store.get("abcdef") == b"data"
        assert await all_names(store) == ["abcdef"]


async def test_s3_open_blob_store_with_a_missing_bucket_raises(
    moto_server: str,  # noqa: F811
    aws_environment: None,  # noqa: F811
) -> None:
    config = BlobConfig(backend="s3", bucket=f"missing-{uuid4().hex}")

    with pytest.raises(StorageError, match="cannot use S3 bucket"):
        async with open_blob_store(config, AwsConfig(REGION, moto_server)):
            pass


async def test_s3_missing_bucket_is_a_storage_error_not_a_missing_blob(s3: Any) -> None:
    store = S3BlobStore(s3, f"missing-{uuid4().hex}", PREFIX)

    with pytest.raises(StorageError, match="NoSuchBucket"):
        await store.get("abcdef")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        await store.put("abcdef", b"data", "image/png")
    with pytest.raises(StorageError, match="NoSuchBucket"):
        await all_names(store)


async def test_s3_unreachable_endpoint_raises_storage_error(
    aws_environment: None,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A loopback port that nothing listens on; one attempt, so no retry backoff.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")

    async with s3_client(f"http://127.0.0.1:{port}") as client:
        store = S3BlobStore(client, "some-bucket", PREFIX)
        with pytest.raises(StorageError, match="cannot write"):
            await store.put("abcdef", b"data", "image/png")
        with pytest.raises(StorageError, match="cannot read"):
            await store.get("abcdef")
        with pytest.raises(StorageError, match="cannot delete"):
            await store.delete("abcdef")
        with pytest.raises(StorageError, match="cannot list"):
            await all_names(store)


async def test_open_blob_store_rejects_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="unknown blob backend"):
        async with open_blob_store(BlobConfig(backend="tape"), AwsConfig()):
            pass


async def test_s3_invalid_names_send_nothing(s3: Any, bucket: str) -> None:
    store = S3BlobStore(s3, bucket, PREFIX)

    for name in INVALID_NAMES.values():
        with pytest.raises(ValueError, match="invalid blob name"):
            await store.put(name, b"evil", "image/png")

    # Listed raw: names() alone would hide keys that are not valid names.
    listing = await s3.list_objects_v2(Bucket=bucket)
    assert listing.get("Contents", []) == []
