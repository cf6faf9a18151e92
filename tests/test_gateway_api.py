"""The JSON API as the third-party grader sees it, and its answers to bad input."""

from __future__ import annotations

import base64
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from imagecache.appkeys import SERVICE
from tests.conftest import image_bytes

Client = TestClient[web.Request, web.Application]
JPEG = image_bytes("JPEG", (40, 30), "blue")
PNG = image_bytes("PNG", (20, 10), "green")


def upload_form(
    key: str | None, data: bytes | None, filename: str = "photo.png"
) -> aiohttp.FormData:
    form = aiohttp.FormData()
    if key is not None:
        form.add_field("key", key)
    if data is not None:
        form.add_field("file", data, filename=filename, content_type="application/octet-stream")
    return form


async def call(client: Client, path: str, expect: int = 200, **kwargs: Any) -> dict[str, Any]:
    response = await client.post(path, **kwargs)
    body: dict[str, Any] = await response.json()
    assert response.status == expect, body
    return body


def assert_error(body: dict[str, Any], code: int, *words: str) -> None:
    assert body["success"] == "false"
    assert body["error"]["code"] == code
    for word in words:
        assert word in body["error"]["message"]


async def test_the_graders_sequence(gateway: Client) -> None:
    assert await call(gateway, "/api/delete_all") == {"success": "true"}
    assert await call(gateway, "/api/list_keys") == {"success": "true", "keys": []}
    assert await call(gateway, "/api/upload", data=upload_form("test_1", JPEG, "1.jpeg")) == {
        "success": "true",
        "key": "test_1",
    }
    assert await call(gateway, "/api/upload", data=upload_form("test_2", PNG, "2.png")) == {
        "success": "true",
        "key": "test_2",
    }
    body = await call(gateway, "/api/key/test_1")
    assert body["success"] == "true"
    assert body["key"] == "test_1"
    assert base64.b64decode(body["content"]) == JPEG
    assert (await call(gateway, "/api/list_keys"))["keys"] == ["test_1", "test_2"]
    assert await call(gateway, "/api/delete_all") == {"success": "true"}
    assert (await call(gateway, "/api/list_keys"))["keys"] == []
    assert_error(await call(gateway, "/api/key/test_1", expect=404), 404, "test_1")


async def test_replacing_a_key_returns_the_new_image(gateway: Client) -> None:
    await call(gateway, "/api/upload", data=upload_form("cat", PNG))
    assert base64.b64decode((await call(gateway, "/api/key/cat"))["content"]) == PNG
    await call(gateway, "/api/upload", data=upload_form("cat", JPEG))
    assert base64.b64decode((await call(gateway, "/api/key/cat"))["content"]) == JPEG
    assert (await call(gateway, "/api/list_keys"))["keys"] == ["cat"]


@pytest.mark.parametrize(
    ("key", "data", "filename", "code", "words"),
    [
        ("k", b"just some text, not an image", "fake.png", 400, ["not a PNG, JPEG or GIF"]),
        ("k", b"", "empty.png", 400, ["empty"]),
        ("k", JPEG[: len(JPEG) * 2 // 3], "truncated.jpeg", 400, ["damaged"]),
        ("k", image_bytes("BMP"), "bitmap.png", 400, ["BMP", "not accepted"]),
        ("k", b"x" * 300_000, "huge.png", 413, ["larger than the limit"]),
        (None, PNG, "a.png", 400, ["no key"]),
        ("k", None, "", 400, ["no file"]),
        ("bad key", PNG, "a.png", 400, ["invalid key"]),
        ("../etc/passwd", PNG, "a.png", 400, ["invalid key"]),
        (".hidden", PNG, "a.png", 400, ["invalid key"]),
        ("k" * 129, PNG, "a.png", 400, ["invalid key"]),
    ],
    ids=[
        "text-named-png",
        "empty",
        "truncated",
        "bmp",
        "oversized",
        "no-key",
        "no-file",
        "space-in-key",
        "traversal-key",
        "dot-key",
        "long-key",
    ],
)
async def test_bad_uploads_get_the_error_shape_and_change_nothing(
    aiohttp_client: Any,
    gateway_config: Any,
    key: str | None,
    data: bytes | None,
    filename: str,
    code: int,
    words: list[str],
) -> None:
    from dataclasses import replace

    from imagecache.app import create_app

    config = replace(
        gateway_config, gateway=replace(gateway_config.gateway, max_upload_bytes=200_000)
    )
    client = await aiohttp_client(create_app(config))
    await call(client, "/api/upload", data=upload_form("k", PNG))
    body = await call(client, "/api/upload", expect=code, data=upload_form(key, data, filename))
    assert_error(body, code, *words)
    assert (await call(client, "/api/list_keys"))["keys"] == ["k"]
    assert base64.b64decode((await call(client, "/api/key/k"))["content"]) == PNG


async def test_non_multipart_upload_is_refused(gateway: Client) -> None:
    body = await call(gateway, "/api/upload", expect=400, json={"key": "k"})
    assert_error(body, 400, "multipart")


async def test_malformed_key_in_read_is_a_400(gateway: Client) -> None:
    assert_error(await call(gateway, "/api/key/bad!key", expect=400), 400, "invalid key")


async def test_unknown_api_call_and_wrong_method_use_the_error_shape(gateway: Client) -> None:
    assert_error(await call(gateway, "/api/nope", expect=404), 404)
    response = await gateway.get("/api/list_keys")
    assert response.status == 405
    assert_error(await response.json(), 405)


async def test_admin_calls_answer_503_until_a_manager_answers(gateway: Client) -> None:
    for path in ("/api/getNumNodes", "/api/getRate?rate=miss", "/api/configure_cache?mode=manual"):
        assert_error(await call(gateway, path, expect=503), 503, "manager")


async def test_reads_go_to_the_cache_after_the_first_miss(gateway: Client) -> None:
    await call(gateway, "/api/upload", data=upload_form("k", PNG))
    service = gateway.app[SERVICE]
    before = service.blob_reads
    for _ in range(5):
        assert base64.b64decode((await call(gateway, "/api/key/k"))["content"]) == PNG
    # The upload wrote through to the cache: not one read reached the blob store.
    assert service.blob_reads == before


async def test_prometheus_metrics_count_hits_and_misses(gateway: Client) -> None:
    await call(gateway, "/api/upload", data=upload_form("k", PNG))
    await call(gateway, "/api/key/k")
    await call(gateway, "/api/key/absent", expect=404)
    text = await (await gateway.get("/metrics")).text()
    assert "imagecache_gateway_cache_hits_total 1.0" in text
    assert "imagecache_gateway_cache_misses_total 1.0" in text
    assert "imagecache_gateway_cache_nodes 1.0" in text
