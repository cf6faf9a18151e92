"""The metadata store's contract, run against SQLite and a real MariaDB alike."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from imagecache.errors import StorageError
from imagecache.metadata import ImageRecord, Membership, MetadataStore, NodeRecord
from tests.mariadb import free_port, mariadb_database_url, mariadb_url  # noqa: F401

HOUR = timedelta(hours=1)


@pytest.fixture(params=["sqlite", "mysql"])
def metadata_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        # A folder that does not exist yet: open() creates it.
        return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'metadata.db'}"
    url: str = request.getfixturevalue("mariadb_database_url")
    return url


@pytest.fixture
async def metadata(metadata_url: str) -> AsyncIterator[MetadataStore]:
    async with MetadataStore.open(metadata_url) as store:
        yield store


def new_blob() -> str:
    return uuid.uuid4().hex


async def upload(
    store: MetadataStore, key: str, blob_name: str | None = None, size: int = 10
) -> tuple[ImageRecord, str | None]:
    """What the gateway does around writing a blob: journal it, then commit it."""
    blob_name = blob_name or new_blob()
    await store.begin_upload(blob_name)
    return await store.commit_upload(key, blob_name, "image/png", size, 4, 3)


async def test_new_key_gets_a_version_and_replaces_nothing(metadata: MetadataStore) -> None:
    assert await metadata.get_image("cat") is None
    assert await metadata.current_version() == 0
    blob = new_blob()
    record, replaced = await upload(metadata, "cat", blob, size=1234)
    assert replaced is None
    assert record.version >= 1
    assert (record.key, record.blob_name, record.content_type) == ("cat", blob, "image/png")
    assert (record.size, record.width, record.height) == (1234, 4, 3)
    assert await metadata.get_image("cat") == record
    assert await metadata.current_version() == record.version
    # The committed blob left the journal: nothing to clean up, however old.
    assert await metadata.blobs_to_delete(timedelta(0)) == []


async def test_replacing_a_key_returns_and_journals_the_old_blob(metadata: MetadataStore) -> None:
    old, _ = await upload(metadata, "cat")
    new, replaced = await upload(metadata, "cat")
    assert replaced == old.blob_name
    assert new.version > old.version
    assert await metadata.get_image("cat") == new
    assert await metadata.blobs_to_delete(HOUR) == [old.blob_name]
    await metadata.blob_deleted(old.blob_name)
    assert await metadata.blobs_to_delete(timedelta(0)) == []


async def test_versions_strictly_increase_across_keys(metadata: MetadataStore) -> None:
    versions = [(await upload(metadata, key))[0].version for key in ("a", "b", "a", "c", "b")]
    assert versions == sorted(set(versions))


async def test_concurrent_commits_get_distinct_versions(metadata: MetadataStore) -> None:
    keys = ["same"] * 10 + [f"key-{i}" for i in range(10)]
    blobs = [new_blob() for _ in keys]
    await asyncio.gather(*(metadata.begin_upload(blob) for blob in blobs))
    results = await asyncio.gather(
        *(
            metadata.commit_upload(key, blob, "image/gif", 1, 1, 1)
            for key, blob in zip(keys, blobs, strict=True)
        )
    )
    versions = [record.version for record, _ in results]
    assert len(set(versions)) == len(versions)
    same = [(record, replaced) for record, replaced in results if record.key == "same"]
    winner = max(same, key=lambda result: result[0].version)[0]
    assert await metadata.get_image("same") == winner
    # Each commit of "same" but the first replaced exactly one earlier blob.
    replaced = sorted(name for _, name in same if name is not None)
    assert len(replaced) == 9
    assert sorted([*replaced, winner.blob_name]) == sorted(blobs[:10])
    assert sorted(await metadata.blobs_to_delete(HOUR)) == replaced
    for record, replaced_blob in results:
        if record.key != "same":
            assert replaced_blob is None
            assert await metadata.get_image(record.key) == record
    assert await metadata.current_version() == max(versions)


async def test_crashed_upload_is_collected_only_when_old(metadata: MetadataStore) -> None:
    blob = new_blob()
    await metadata.begin_upload(blob)  # ...and the gateway crashed before committing
    assert await metadata.blobs_to_delete(HOUR) == []
    assert await metadata.blobs_to_delete(timedelta(0)) == [blob]
    # Being collected, it can no longer be committed: no key may point at it.
    with pytest.raises(StorageError, match="not being uploaded"):
        await metadata.commit_upload("late", blob, "image/png", 1, 1, 1)
    assert await metadata.get_image("late") is None
    assert await metadata.blobs_to_delete(HOUR) == [blob]


async def test_commit_without_begin_upload_changes_nothing(metadata: MetadataStore) -> None:
    with pytest.raises(StorageError, match="not being uploaded"):
        await metadata.commit_upload("cat", new_blob(), "image/png", 1, 1, 1)
    assert await metadata.list_keys() == []
    assert await metadata.current_version() == 0


async def test_abandoned_upload_is_garbage(metadata: MetadataStore) -> None:
    blob = new_blob()
    await metadata.begin_upload(blob)
    await metadata.abandon_upload(blob)
    assert await metadata.blobs_to_delete(HOUR) == [blob]
    with pytest.raises(StorageError):
        await metadata.commit_upload("cat", blob, "image/png", 1, 1, 1)


async def test_blob_deleted_drops_the_entry(metadata: MetadataStore) -> None:
    blob = new_blob()
    await metadata.begin_upload(blob)
    await metadata.blob_deleted(blob)
    assert await metadata.blobs_to_delete(timedelta(0)) == []
    await metadata.blob_deleted(blob)  # twice is harmless
    await metadata.blob_deleted("never-journaled")


async def test_begin_upload_twice_with_one_name_fails(metadata: MetadataStore) -> None:
    blob = new_blob()
    await metadata.begin_upload(blob)
    with pytest.raises(StorageError):
        await metadata.begin_upload(blob)


async def test_delete_all_journals_every_blob(metadata: MetadataStore) -> None:
    records = [(await upload(metadata, key))[0] for key in ("b", "a", "c")]
    pending = new_blob()
    await metadata.begin_upload(pending)  # an upload in flight is not an image yet
    deleted = await metadata.delete_all()
    assert deleted == [r.blob_name for r in sorted(records, key=lambda r: r.key)]
    assert await metadata.list_keys() == []
    assert await metadata.list_images() == []
    assert await metadata.get_image("a") is None
    assert sorted(await metadata.blobs_to_delete(HOUR)) == sorted(deleted)
    assert await metadata.delete_all() == []
    # The version counter does not go back: a new row is newer than any deleted one.
    again, replaced = await upload(metadata, "a")
    assert replaced is None
    assert again.version > max(r.version for r in records)


async def test_list_keys_and_images_in_key_order(metadata: MetadataStore) -> None:
    keys = ["b", "B-1", "a", "A", "_x", "0", "a.b", "cat"]
    for key in keys:
        await upload(metadata, key)
    # Keys are case-sensitive and sort by code point on both databases.
    assert await metadata.list_keys() == sorted(keys)
    images = await metadata.list_images()
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
        assert await metadata.get_image(image.key) == image


async def test_uploaded_at_keeps_sub_second_precision(metadata: MetadataStore) -> None:
    record, _ = await upload(metadata, "cat")
    stored = await metadata.get_image("cat")
    assert stored is not None
    assert stored.uploaded_at == record.uploaded_at


async def test_membership_round_trip_bumps_the_epoch(metadata: MetadataStore) -> None:
    assert await metadata.get_membership() == Membership(0, ())
    first = (
        NodeRecord("node-2", "127.0.0.1:11312", "active"),
        NodeRecord("node-1", "127.0.0.1:11311", "joining"),
    )
    assert await metadata.set_membership(first) == 1
    assert await metadata.get_membership() == Membership(1, first)  # order kept
    second = (NodeRecord("node-1", "127.0.0.1:11311", "leaving"),)
    assert await metadata.set_membership(list(second)) == 2
    assert await metadata.get_membership() == Membership(2, second)
    assert await metadata.set_membership([]) == 3
    assert await metadata.get_membership() == Membership(3, ())


async def test_membership_rejects_bad_nodes(metadata: MetadataStore) -> None:
    with pytest.raises(ValueError, match="state"):
        await metadata.set_membership([NodeRecord("n", "127.0.0.1:1", "sleeping")])
    node = NodeRecord("n", "127.0.0.1:1", "active")
    with pytest.raises(ValueError, match="distinct"):
        await metadata.set_membership([node, node])
    assert await metadata.get_membership() == Membership(0, ())


async def test_settings_round_trip_and_overwrite(metadata: MetadataStore) -> None:
    assert await metadata.get_settings() == {}
    await metadata.put_settings({"mode": "manual", "policy": "LRU", "capacity_mb": "64"})
    await metadata.put_settings({"policy": "RR", "maxMiss": "0.5"})
    await metadata.put_settings({})
    assert await metadata.get_settings() == {
        "mode": "manual",
        "policy": "RR",
        "capacity_mb": "64",
        "maxMiss": "0.5",
    }


async def test_reopening_keeps_everything(metadata_url: str) -> None:
    async with MetadataStore.open(metadata_url) as store:
        record, _ = await upload(store, "cat")
        await store.set_membership([NodeRecord("n", "127.0.0.1:1", "active")])
        await store.put_settings({"mode": "auto"})
    async with MetadataStore.open(metadata_url) as store:
        assert await store.get_image("cat") == record
        assert (await store.get_membership()).epoch == 1
        assert await store.get_settings() == {"mode": "auto"}
        assert (await upload(store, "dog"))[0].version > record.version


async def test_stores_opened_at_once_share_one_schema(metadata_url: str) -> None:
    """A gateway and a manager starting together both create the schema if absent."""

    async def open_and_upload(key: str) -> int:
        async with MetadataStore.open(metadata_url) as store:
            return (await upload(store, key))[0].version

    versions = await asyncio.gather(*(open_and_upload(f"key-{i}") for i in range(4)))
    assert sorted(versions) == [1, 2, 3, 4]


async def test_unreachable_mysql_is_a_storage_error() -> None:
    url = f"mysql+aiomysql://nobody:secret@127.0.0.1:{free_port()}/imagecache"
    with pytest.raises(StorageError, match="could not") as caught:
        async with MetadataStore.open(url) as store:
            await store.list_keys()
    assert "secret" not in str(caught.value)


async def test_unusable_sqlite_path_is_a_storage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(StorageError):
        async with MetadataStore.open(f"sqlite+aiosqlite:///{tmp_path / 'file' / 'm.db'}"):
            pass


async def test_other_urls_are_refused() -> None:
    with pytest.raises(ValueError, match="sqlite"):
        async with MetadataStore.open("postgresql+asyncpg://u@localhost/db"):
            pass


async def test_sqlite_two_stores_on_one_file_commit_concurrently(tmp_path: Path) -> None:
    """Like the gateway and the manager, two engines write the same file at once."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    async with MetadataStore.open(url) as first, MetadataStore.open(url) as second:

        async def uploads(store: MetadataStore, name: str) -> list[ImageRecord]:
            results = await asyncio.gather(
                *(upload(store, key) for key in [f"{name}-{i % 5}" for i in range(20)]),
                *(store.set_membership([]) for _ in range(3)),
                *(store.put_settings({name: "x"}) for _ in range(3)),
            )
            return [result[0] for result in results if isinstance(result, tuple)]

        mine, theirs = await asyncio.gather(uploads(first, "first"), uploads(second, "second"))
        versions = [record.version for record in mine + theirs]
        assert len(versions) == 40
        assert len(set(versions)) == 40
        assert sorted(await first.list_keys()) == sorted(
            {f"{name}-{i}" for name in ("first", "second") for i in range(5)}
        )
        assert (await second.get_membership()).epoch == 6
        assert len(await first.blobs_to_delete(HOUR)) == 30  # each key replaced 3 times


async def test_activity_history_newest_first(metadata: MetadataStore) -> None:
    assert await metadata.list_activity() == []
    await metadata.add_activity(1, 3, "manual expand by 2", None)
    await metadata.add_activity(3, 2, "autoscaler: miss rate 2.0% < minMiss", 0.02)
    history = await metadata.list_activity()
    assert [(a.size_before, a.size_after) for a in history] == [(3, 2), (1, 3)]
    assert history[0].cause.startswith("autoscaler")
    assert history[0].miss_rate == pytest.approx(0.02)
    assert history[1].miss_rate is None
    assert history[0].at.tzinfo is not None
    assert len(await metadata.list_activity(limit=1)) == 1
