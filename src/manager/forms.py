"""The manager's form bodies, read once and told apart from bodies that are not forms.

A body that cannot be read as the form its Content-Type announces is the
client's mistake: it becomes MalformedForm (answered 400 by the guard in
app.py, with one log line), never an error of the server.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping

from aiohttp import BodyPartReader, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import BadContentDispositionHeader, BadContentDispositionParam

log = logging.getLogger(__name__)

# What aiohttp raises on a body that does not parse: ValueError (a missing or
# wrong boundary, a cut-off body, undecodable text, bad base64), LookupError
# (an unknown charset), RuntimeError (an unknown content or transfer
# encoding), zlib.error (a broken deflate part), HttpProcessingError (a
# part's headers).
# aiohttp only warns of a malformed Content-Disposition (and then reads the part
# as nameless, which is refused anyway); where warnings are errors it raises them.
_UNREADABLE = (
    ValueError,
    LookupError,
    RuntimeError,
    zlib.error,
    HttpProcessingError,
    BadContentDispositionHeader,
    BadContentDispositionParam,
)
# How much of aiohttp's reason goes into the log line.
REASON_MAX_CHARS = 200
# Parts of a multipart form at most (the largest manager form has 9 fields).
MAX_PARTS = 100

FORM = web.RequestKey("form", dict[str, str])


class MalformedForm(Exception):
    """The request's body is not a readable form."""


async def read_form(request: web.Request) -> Mapping[str, str]:
    """The text fields of the request's form (the first value of each name).

    Files and binary parts are read through but not kept: no manager form has
    them. A request that is not a POST, or whose Content-Type is not a form's,
    has none. Raises MalformedForm, after logging one line, when the body
    cannot be read, HTTPRequestEntityTooLarge past the app's client_max_size.
    """
    read_before: dict[str, str] | None = request.get(FORM)
    if read_before is not None:
        return read_before
    try:
        if request.method == "POST" and request.content_type == "multipart/form-data":
            fields = await _multipart_fields(request)
        else:
            posted = await request.post()
            fields = {}
            for name, value in posted.items():
                if isinstance(value, str):
                    fields.setdefault(name, value)
    except _UNREADABLE as error:
        reason = str(error)[:REASON_MAX_CHARS]
        log.warning(
            "%s %r from %s: malformed form body (%r), answered 400",
            request.method,
            request.path,
            request.remote,
            reason,
        )
        raise MalformedForm(reason) from None
    request[FORM] = fields
    return fields


async def _multipart_fields(request: web.Request) -> dict[str, str]:
    """A multipart form's text fields, read here rather than by ``request.post()``:
    that one spools file parts to temporary files, and leaves those open when a
    later part is malformed."""
    reader = await request.multipart()
    limit, read = request.client_max_size, 0
    fields: dict[str, str] = {}
    parts = 0
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise ValueError("nested multipart bodies are not accepted")
        if part.name is None:
            raise ValueError("a part of the form has no name")
        parts += 1
        if parts > MAX_PARTS:
            raise ValueError(f"more than {MAX_PARTS} parts")
        content_type = part.headers.get(hdrs.CONTENT_TYPE)
        # As request.post() has it: a part with a file name is a file, one with
        # a Content-Type other than text/* is bytes.
        keep = not part.filename and (content_type is None or content_type.startswith("text/"))
        raw = bytearray()
        while chunk := await part.read_chunk():
            read += len(chunk)
            if read > limit:
                raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=read)
            if keep:
                raw += chunk
        if not keep:
            continue
        value = bytearray()
        async for piece in part.decode_iter(raw):
            value += piece
        fields.setdefault(part.name, value.decode(part.get_charset(default="utf-8")))
    return fields
