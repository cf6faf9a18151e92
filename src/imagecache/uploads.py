"""Reading an upload form (fields ``key`` and ``file``) with the size limit enforced up front."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import BodyPartReader, web

from imagecache.errors import BadRequest, UploadTooLarge

_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class Upload:
    key: str
    data: bytes
    filename: str


async def read_upload(request: web.Request, max_bytes: int) -> Upload:
    """The key and file of a multipart upload.

    Reads at most ``max_bytes + 1`` bytes of the file, so an oversized upload
    is refused (UploadTooLarge) without being held in memory; raises
    BadRequest when the form lacks a field.
    """
    if not request.content_type.startswith("multipart/"):
        raise BadRequest(
            "the form has no file: send the upload as multipart/form-data "
            "with fields 'key' and 'file'"
        )
    if request.content_length is not None and request.content_length > max_bytes + 64 * 1024:
        raise UploadTooLarge(_too_large(max_bytes))
    key: str | None = None
    data: bytes | None = None
    filename = ""
    reader = await request.multipart()
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise BadRequest("nested multipart bodies are not accepted")
        if part.name == "key":
            key = (await part.read(decode=True)).decode("utf-8", "replace").strip()
        elif part.name == "file":
            filename = part.filename or ""
            data = await _read_limited(part, max_bytes)
        else:
            await part.release()
    if not key:
        raise BadRequest("the form has no key: send a field 'key'")
    if data is None:
        raise BadRequest("the form has no file: send a file in field 'file'")
    return Upload(key, data, filename)


async def _read_limited(part: BodyPartReader, max_bytes: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := await part.read_chunk(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise UploadTooLarge(_too_large(max_bytes))
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> str:
    return f"the file is larger than the limit of {max_bytes / (1 << 20):g} MB"
