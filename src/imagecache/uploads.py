"""Reading request bodies: an upload form (fields ``key`` and ``file``) with the size
limit enforced up front, and the form fields of an admin call.

A body that does not parse (no boundary, a boundary the body lacks, a body cut
short, an unknown encoding or charset) is the client's mistake: BadRequest,
never an unexpected error.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam

from imagecache.errors import BadRequest, ImagecacheError, UploadTooLarge

_CHUNK = 256 * 1024
# A key is at most 128 characters, an admin call's field a number or a word:
# longer fields are refused before they are held.
_MAX_KEY_FIELD_BYTES = 4096
_MAX_TEXT_FIELD_BYTES = 4096
# What aiohttp's body parsers raise on a malformed body: ValueError for
# boundaries and cut-short bodies, RuntimeError for unknown encodings,
# LookupError for unknown charsets, zlib.error for a bad deflate/gzip part,
# HttpProcessingError for a part's malformed headers.
# aiohttp only warns of a malformed Content-Disposition (the part then has no
# name, which is refused anyway); where warnings are errors it raises them.
_MALFORMED = (
    ValueError,
    RuntimeError,
    LookupError,
    zlib.error,
    HttpProcessingError,
    BadContentDispositionHeader,
    BadContentDispositionParam,
)


@dataclass(frozen=True, slots=True)
class Upload:
    key: str
    data: bytes
    filename: str


async def read_upload(request: web.Request, max_bytes: int) -> Upload:
    """The key and file of a multipart upload.

    Reads at most ``max_bytes + 1`` bytes of the file, so an oversized upload
    is refused (UploadTooLarge) without being held in memory; raises
    BadRequest when the form lacks a field or does not parse.
    """
    if not request.content_type.startswith("multipart/"):
        raise BadRequest(
            "the form has no file: send the upload as multipart/form-data "
            "with fields 'key' and 'file'"
        )
    if request.content_length is not None and request.content_length > max_bytes + 64 * 1024:
        raise UploadTooLarge(_too_large(max_bytes))
    try:
        return await _read_upload(request, max_bytes)
    except _MALFORMED as error:
        raise BadRequest(f"the multipart form is malformed: {error}") from None


async def read_fields(request: web.Request) -> dict[str, str]:
    """The text fields of a urlencoded or multipart form body ({} for other bodies);
    raises BadRequest when the body does not parse.

    A multipart body is read part by part, file parts skipped unread:
    aiohttp's request.post() would spool them to temporary files.
    """
    try:
        if request.content_type == "application/x-www-form-urlencoded":
            return {name: str(value) for name, value in (await request.post()).items()}
        if request.content_type == "multipart/form-data":
            return await _read_text_fields(request)
    except _MALFORMED as error:
        raise BadRequest(f"the form is malformed: {error}") from None
    return {}


async def _read_text_fields(request: web.Request) -> dict[str, str]:
    fields: dict[str, str] = {}
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not accepted")
        if part.filename is not None or part.name is None:
            await part.release()
            continue
        raw = await _read_limited(
            part, _MAX_TEXT_FIELD_BYTES, BadRequest(f"the field {part.name[:100]!r} is too long")
        )
        fields[part.name] = bytes(part.decode(raw)).decode(part.get_charset("utf-8"))
    return fields


async def _read_upload(request: web.Request, max_bytes: int) -> Upload:
    key: str | None = None
    data: bytes | None = None
    filename = ""
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not accepted")
        if part.name == "key":
            raw = await _read_limited(
                part, _MAX_KEY_FIELD_BYTES, BadRequest("the key field is too long")
            )
            key = bytes(part.decode(raw)).decode("utf-8", "replace").strip()
        elif part.name == "file":
            filename = part.filename or ""
            data = await _read_limited(part, max_bytes, UploadTooLarge(_too_large(max_bytes)))
        else:
            await part.release()
    if not key:
        raise BadRequest("the form has no key: send a field 'key'")
    if data is None:
        raise BadRequest("the form has no file: send a file in field 'file'")
    return Upload(key, data, filename)


async def _read_limited(part: BodyPartReader, max_bytes: int, too_large: ImagecacheError) -> bytes:
    """The part's bytes; raises ``too_large`` as soon as they pass ``max_bytes``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> str:
    return f"the file is larger than the limit of {max_bytes / (1 << 20):g} MB"
