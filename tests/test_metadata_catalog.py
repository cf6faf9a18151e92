"""The image catalog's contract, run against SQLite and a real MariaDB alike."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from imagecache.catalog import EVERY_KEY, ImageCatalog, Invalidation
from imagecache.database import Database
from imagecache.errors import StorageError
from tests.mariadb import mariadb_database_url, mariadb_url  # noqa: F401
from tests.metadata_db import (  # noqa: F401
    database_fixture,
    metadata_url_fixture,
    new_blob,
    upload,
)

HOUR = timedelta(hours=1)


@pytest.fixture
async def catalog(database: Database) -> ImageCatalog:
    return await ImageCatalog.open(database)


async def test_new_key_gets_a_version_and_replaces_nothing(catalog: ImageCatalog) -> None:
    assert await catalog.get_image("cat") is None
    assert await catalog.current_version() == 0
    blob = new_blob()
    record, replaced = await upload(catalog, "cat", blob, size=1234)
    assert replaced is None
    assert record.version >= 1
    assert (record.key, record.blob_name, record.content_type) == ("cat", blob, "image/png")
    assert (record.size, record.width, record.height) == (1234, 4, 3)
    assert await catalog.get_image("cat") == record
    assert await catalog.current_version() == record.version
    # The committed blob left the journal: nothing to clean up, however old.
    assert await catalog.blobs_to_delete(timedelta(0)) == []


async def test_replacing_a_key_returns_and_journals_the_old_blob(catalog: ImageCatalog) -> None:
    old, _ = await upload(catalog, "cat")
    new, replaced = await upload(catalog, "cat")
    assert replaced == old.blob_name
    assert new.version > old.version
    assert await catalog.get_image("cat") == new
    assert await catalog.blobs_to_delete(HOUR) == [old.blob_name]
    await catalog.blob_deleted(old.blob_name)
    assert await catalog.blobs_to_delete(timedelta(0)) == []


async def test_versions_strictly_increase_across_keys(catalog: ImageCatalog) -> None:
    versions = [(await upload(catalog, key))[0].version for key in ("a", "b", "a", "c", "b")]
    assert versions == sorted(set(versions))


async def test_concurrent_commits_get_distinct_versions(catalog: ImageCatalog) -> None:
    keys = ["same"] * 10 + [f"key-{i}" for i in range(10)]
    blobs = [new_blob() for _ in keys]
    await asyncio.gather(*(catalog.begin_upload(blob) for blob in blobs))
    results = await asyncio.gather(
        *(
            catalog.commit_upload(key, blob, "image/gif", 1, 1, 1)
            for key, blob in zip(keys, blobs, strict=True)
        )
    )
    versions = [result.record.version for result in results]
    assert len(set(versions)) == len(versions)
    same = [(r.record, r.replaced_blob) for r in results if r.record.key == "same"]
    winner = max(same, key=lambda result: result[0].version)[0]
    assert await catalog.get_image("same") == winner
    # Each commit of "same" but the first replaced exactly one earlier blob.
    replaced = sorted(name for _, name in same if name is not None)
    assert len(replaced) == 9
    assert sorted([*replaced, winner.blob_name]) == sorted(blobs[:10])
    assert sorted(await catalog.blobs_to_delete(HOUR)) == replaced
    for result in results:
        if result.record.key != "same":
            assert result.replaced_blob is None
            assert await catalog.get_image(result.record.key) == result.record
    assert await catalog.current_version() == max(versions)


async def test_crashed_upload_is_collected_only_when_old(catalog: ImageCatalog) -> None:
    blob = new_blob()
    await catalog.begin_upload(blob)  # ...and the gateway crashed before committing
    assert await catalog.blobs_to_delete(HOUR) == []
    assert await catalog.blobs_to_delete(timedelta(0)) == [blob]
    # Being collected, it can no longer be committed: no key may point at it.
    with pytest.raises(StorageError, match="not being uploaded"):
        await catalog.commit_upload("late", blob, "image/png", 1, 1, 1)
    assert await catalog.get_image("late") is None
    assert await catalog.blobs_to_delete(HOUR) == [blob]


async def test_commit_without_begin_upload_changes_nothing(catalog: ImageCatalog) -> None:
    with pytest.raises(StorageError, match="not being uploaded"):
        await catalog.commit_upload("cat", new_blob(), "image/png", 1, 1, 1)
    assert await catalog.list_keys() == []
    assert await catalog.current_version() == 0


async def test_abandoned_upload_is_garbage(catalog: ImageCatalog) -> None:
    blob = new_blob()
    await catalog.begin_upload(blob)
    await catalog.abandon_upload(blob)
    assert await catalog.blobs_to_delete(HOUR) == [blob]
    with pytest.raises(StorageError):
        await catalog.commit_upload("cat", blob, "image/png", 1, 1, 1)


async def test_blob_deleted_drops_the_entry(catalog: ImageCatalog) -> None:
    blob = new_blob()
    await catalog.begin_upload(blob)
    await catalog.blob_deleted(blob)
    assert await catalog.blobs_to_delete(timedelta(0)) == []
    await catalog.blob_deleted(blob)  # twice is harmless
    await catalog.blob_deleted("never-journaled")


async def test_begin_upload_twice_with_one_name_fails(catalog: ImageCatalog) -> None:
    blob = new_blob()
    await catalog.begin_upload(blob)
    with pytest.raises(StorageError):
        await catalog.begin_upload(blob)


async def test_delete_all_journals_every_blob(catalog: ImageCatalog) -> None:
    records = [(await upload(catalog, key))[0] for key in ("b", "a", "c")]
    pending = new_blob()
    await catalog.begin_upload(pending)  # an upload in flight is not an image yet
    deleted, _ = await catalog.delete_all()
    assert deleted == [r.blob_name for r in sorted(records, key=lambda r: r.key)]
    assert await catalog.list_keys() == []
    assert await catalog.list_images() == []
    assert await catalog.get_image("a") is None
    assert sorted(await catalog.blobs_to_delete(HOUR)) == sorted(deleted)
    assert (await catalog.delete_all())[0] == []
    # The version counter does not go back: a new row is newer than any deleted one.
    again, replaced = await upload(catalog, "a")
    assert replaced is None
    assert again.version > max(r.version for r in records)


async def test_list_keys_and_images_in_key_order(catalog: ImageCatalog) -> None:
    keys = ["b", "B-1", "a", "A", "_x", "0", "a.b", "cat"]
    for key in keys:
        await upload(catalog, key)
    # Keys are case-sensitive and sort by code point on both databases.
    assert await catalog.list_keys() == sorted(keys)
    images = await catalog.list_images()
    assert [image.key for image in images] == sorted(keys)
    now = datetime.now(UTC)
    for image in images:
        assert image.uploaded_at.tzinfo is not None
        assert image.uploaded_at.utcoffset() == timedelta(0)
        assert abs(now - image.uploaded_at) < timedelta(seconds=60)
        assert (image.content_type, image.size, image.width, image.height) == (
            "image/png",
            10,
            4,
            3,
        )
        assert await catalog.get_image(image.key) == image


async def test_uploaded_at_keeps_sub_second_precision(catalog: ImageCatalog) -> None:
    record, _ = await upload(catalog, "cat")
    stored = await catalog.get_image("cat")
    assert stored is not None
    assert stored.uploaded_at == record.uploaded_at


# -- the invalidation outbox ----------------------------------------------------------------------


async def test_each_commit_puts_its_invalidation_in_the_outbox(catalog: ImageCatalog) -> None:
    blobs = [new_blob(), new_blob()]
    for blob in blobs:
        await catalog.begin_upload(blob)
    first = await catalog.commit_upload("cat", blobs[0], "image/png", 1, 1, 1)
    second = await catalog.commit_upload("dog", blobs[1], "image/png", 1, 1, 1)
    assert first.invalidation == Invalidation(first.invalidation.id, "cat", first.record.version)
    assert await catalog.pending_invalidations(10) == [first.invalidation, second.invalidation]
    assert await catalog.newest_invalidation_id() == second.invalidation.id
    await catalog.invalidation_delivered(first.invalidation.id)
    assert await catalog.pending_invalidations(10) == [second.invalidation]
    assert await catalog.pending_invalidations(0) == []


async def test_a_failed_commit_leaves_nothing_in_the_outbox(catalog: ImageCatalog) -> None:
    with pytest.raises(StorageError):
        await catalog.commit_upload("cat", new_blob(), "image/png", 1, 1, 1)  # never begun
    assert await catalog.pending_invalidations(10) == []
    assert await catalog.newest_invalidation_id() == 0


async def test_delete_all_invalidates_every_key_below_a_fresh_version(
    catalog: ImageCatalog,
) -> None:
    record, _ = await upload(catalog, "cat")
    _, invalidation = await catalog.delete_all()
    assert invalidation.key == EVERY_KEY
    assert invalidation.version > record.version
    assert await catalog.current_version() == invalidation.version
    assert invalidation in await catalog.pending_invalidations(10)


async def test_versions_of_keys(catalog: ImageCatalog) -> None:
    cat, _ = await upload(catalog, "cat")
    dog, _ = await upload(catalog, "dog")
    assert await catalog.versions(["cat", "dog", "gone"]) == {
        "cat": cat.version,
        "dog": dog.version,
    }
    assert await catalog.versions([]) == {}
