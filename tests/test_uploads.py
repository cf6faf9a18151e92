"""Reading request bodies (imagecache.uploads): what an upload form and an admin
call's form may hold, and every body refused with a 4xx rather than an error.

Driven over TCP on 127.0.0.1 through a small aiohttp app whose handlers call
``read_upload`` and ``read_fields`` as the gateway's do; the bodies are written
byte by byte, so malformed ones reach the parser as a client would send them.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import ClientSession, web
from aiohttp.test_utils import TestServer

from imagecache.errors import ImagecacheError
from imagecache.uploads import read_fields, read_upload

MAX_BYTES = 1000
BOUNDARY = "xYzBoundary42"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: dict[str, Any]


async def _upload(request: web.Request) -> web.Response:
    try:
        upload = await read_upload(request, MAX_BYTES)
    except ImagecacheError as error:
        return web.json_response({"error": str(error)}, status=error.http_status)
    return web.json_response(
        {
            "key": upload.key,
            "size": len(upload.data),
            "sha256": hashlib.sha256(upload.data).hexdigest(),
            "filename": upload.filename,
        }
    )


async def _fields(request: web.Request) -> web.Response:
    try:
        return web.json_response(await read_fields(request))
    except ImagecacheError as error:
        return web.json_response({"error": str(error)}, status=error.http_status)


@pytest.fixture
async def post() -> AsyncIterator[Any]:
    """POST raw bytes with a Content-Type to /upload or /fields of a running app."""
    app = web.Application(client_max_size=1 << 20)
    app.router.add_post("/upload", _upload)
    app.router.add_post("/fields", _fields)
    async with TestServer(app, host="127.0.0.1", port=0) as server, ClientSession() as session:

        async def send(path: str, body: bytes, content_type: str = MULTIPART) -> Reply:
            async with session.post(
                server.make_url(path), data=body, headers={"Content-Type": content_type}
            ) as response:
                return Reply(response.status, await response.json())

        yield send


def part(headers: Sequence[str], content: bytes) -> bytes:
    return "\r\n".join(headers).encode() + b"\r\n\r\n" + content


def field(name: str, value: bytes | str, *extra_headers: str) -> bytes:
    content = value.encode() if isinstance(value, str) else value
    return part([f'Content-Disposition: form-data; name="{name}"', *extra_headers], content)


def file_part(data: bytes, filename: str = "cat.png", name: str = "file") -> bytes:
    disposition = f'Content-Disposition: form-data; name="{name}"; filename="{filename}"'
    return part([disposition, "Content-Type: image/png"], data)


def body(*parts: bytes, boundary: str = BOUNDARY, closed: bool = True) -> bytes:
    """A multipart body of ``parts``; ``closed`` False: cut short before its end."""
    out = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    return out + (b"--" + boundary.encode() + b"--\r\n" if closed else b"")


# --- read_upload: what it accepts -------------------------------------------------


async def test_an_upload_gives_its_key_file_and_filename(post: Any) -> None:
    data = bytes(range(256)) * 3  # every byte value, CR and LF among them
    reply = await post("/upload", body(field("key", "  cats/tabby.png \r\n"), file_part(data)))
    assert reply == Reply(
        200,
        {
            "key": "cats/tabby.png",  # surrounding white space dropped
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "filename": "cat.png",
        },
    )


async def test_the_fields_may_come_in_any_order_among_others(post: Any) -> None:
    data = b"\x89PNG" + b"x" * 50
    reply = await post(
        "/upload",
        body(
            field("note", "ignored"), file_part(data), field("other", "x" * 5000), field("key", "k")
        ),
    )
    assert reply.status == 200
    assert (reply.body["key"], reply.body["size"]) == ("k", len(data))


async def test_a_file_without_a_filename_has_an_empty_one(post: Any) -> None:
    reply = await post("/upload", body(field("key", "k"), field("file", b"abc")))
    assert reply.status == 200
    assert (reply.body["filename"], reply.body["size"]) == ("", 3)


async def test_a_key_in_base64_transfer_encoding_is_decoded(post: Any) -> None:
    encoded = base64.b64encode("ключ".encode())
    reply = await post(
        "/upload",
        body(field("key", encoded, "Content-Transfer-Encoding: base64"), file_part(b"abc")),
    )
    assert reply.status == 200
    assert reply.body["key"] == "ключ"


async def test_an_empty_file_is_read_as_empty(post: Any) -> None:
    """Whether an empty file is an image is the caller's to say (imagecache.images)."""
    reply = await post("/upload", body(field("key", "k"), file_part(b"")))
    assert reply.status == 200
    assert reply.body["size"] == 0


# --- read_upload: sizes -----------------------------------------------------------


async def test_a_file_of_exactly_the_limit_is_accepted(post: Any) -> None:
    reply = await post("/upload", body(field("key", "k"), file_part(b"a" * MAX_BYTES)))
    assert reply.status == 200
    assert reply.body["size"] == MAX_BYTES


async def test_a_file_one_byte_over_the_limit_is_refused_413(post: Any) -> None:
    reply = await post("/upload", body(field("key", "k"), file_part(b"a" * (MAX_BYTES + 1))))
    assert reply.status == 413
    assert "larger than the limit" in reply.body["error"]


async def test_a_body_declared_far_over_the_limit_is_refused_before_reading(post: Any) -> None:
    """The Content-Length alone settles it: even parts that would be skipped count."""
    padding = field("padding", b"p" * (MAX_BYTES + 64 * 1024))
    reply = await post("/upload", body(field("key", "k"), file_part(b"abc"), padding))
    assert reply.status == 413
    assert "larger than the limit" in reply.body["error"]


async def test_a_key_field_over_4096_bytes_is_refused_400(post: Any) -> None:
    reply = await post("/upload", body(field("key", "k" * 4097), file_part(b"abc")))
    assert reply.status == 400
    assert reply.body["error"] == "the key field is too long"
    reply = await post("/upload", body(field("key", "k" * 4096), file_part(b"abc")))
    assert reply.status == 200


# --- read_upload: what it refuses -------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "application/json", "image/png", "text/plain"],
)
async def test_a_body_that_is_not_multipart_is_refused_400(post: Any, content_type: str) -> None:
    reply = await post("/upload", b"key=k&file=abc", content_type)
    assert reply.status == 400
    assert "send the upload as multipart/form-data" in reply.body["error"]


@pytest.mark.parametrize(
    ("parts", "error"),
    [
        ([], "the form has no key: send a field 'key'"),
        ([file_part(b"abc")], "the form has no key: send a field 'key'"),
        ([field("key", " \t "), file_part(b"abc")], "the form has no key: send a field 'key'"),
        ([field("key", "k")], "the form has no file: send a file in field 'file'"),
        ([field("key", "k"), file_part(b"abc", name="upload")], "the form has no file"),
    ],
    ids=["empty form", "no key", "blank key", "no file", "file under another name"],
)
async def test_a_form_without_key_or_file_is_refused_400(
    post: Any, parts: list[bytes], error: str
) -> None:
    reply = await post("/upload", body(*parts))
    assert reply.status == 400
    assert reply.body["error"].startswith(error)


MALFORMED = {
    "no boundary in the content type": (body(field("key", "k")), "multipart/form-data"),
    "a boundary the body lacks": (body(field("key", "k"), boundary="other"), MULTIPART),
    "a body that is not multipart": (b"just some text\r\n", MULTIPART),
    "cut short": (body(field("key", "k"), file_part(b"abc"), closed=False), MULTIPART),
    "cut short inside a part": (body(field("key", "k"))[:-30], MULTIPART),
    "unknown transfer encoding": (
        body(field("key", "k", "Content-Transfer-Encoding: x-rot13"), file_part(b"a")),
        MULTIPART,
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_multipart_body_is_refused_400(post: Any, case: str) -> None:
    data, content_type = MALFORMED[case]
    reply = await post("/upload", data, content_type)
    assert reply.status == 400, reply
    assert reply.body["error"]


async def test_a_part_with_a_malformed_disposition_is_refused_400(post: Any) -> None:
    broken = part(['Content-Disposition: form-data; name="key"; name="again"'], b"k")
    reply = await post("/upload", body(broken, file_part(b"abc")))
    assert reply.status == 400


async def test_a_nested_multipart_body_is_refused_400(post: Any) -> None:
    inner = body(field("key", "k"), boundary="inner")
    nested = part(
        [
            'Content-Disposition: form-data; name="file"',
            "Content-Type: multipart/mixed; boundary=inner",
        ],
        inner,
    )
    reply = await post("/upload", body(field("key", "k"), nested))
    assert reply.status == 400
    assert reply.body["error"] == "nested multipart bodies are not accepted"


# --- read_fields ------------------------------------------------------------------


async def test_urlencoded_fields_are_read(post: Any) -> None:
    reply = await post(
        "/fields", b"size=3&policy=lru&note=a%20b", "application/x-www-form-urlencoded"
    )
    assert reply == Reply(200, {"size": "3", "policy": "lru", "note": "a b"})


async def test_multipart_text_fields_are_read_and_files_skipped(post: Any) -> None:
    latin = field("name", "café".encode("latin-1"), "Content-Type: text/plain; charset=latin-1")
    reply = await post("/fields", body(field("size", "3"), file_part(b"\x00" * 50_000), latin))
    assert reply == Reply(200, {"size": "3", "name": "café"})


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "image/png"])
async def test_other_bodies_have_no_fields(post: Any, content_type: str) -> None:
    reply = await post("/fields", b'{"size": 3}', content_type)
    assert reply == Reply(200, {})


async def test_a_text_field_over_4096_bytes_is_refused_400(post: Any) -> None:
    reply = await post("/fields", body(field("size", "9" * 4097)))
    assert reply.status == 400
    assert reply.body["error"] == "the field 'size' is too long"


@pytest.mark.parametrize(
    "data",
    [
        body(field("size", "3", "Content-Type: text/plain; charset=x-no-such-charset")),
        body(field("size", "3", "Content-Transfer-Encoding: x-rot13")),
        body(field("size", "3"), closed=False),
        b"not multipart at all",
    ],
    ids=["unknown charset", "unknown transfer encoding", "cut short", "not multipart"],
)
async def test_a_malformed_form_is_refused_400(post: Any, data: bytes) -> None:
    reply = await post("/fields", data)
    assert reply.status == 400
    assert reply.body["error"].startswith("the form is malformed")


async def test_a_nested_multipart_form_is_refused_400(post: Any) -> None:
    nested = part(
        [
            'Content-Disposition: form-data; name="size"',
            "Content-Type: multipart/mixed; boundary=in",
        ],
        body(field("size", "3"), boundary="in"),
    )
    reply = await post("/fields", body(nested))
    assert reply.status == 400
    assert reply.body["error"] == "nested multipart bodies are not accepted"
