"""The manager's form bodies, read once and told apart from bodies that are not forms.

A body that cannot be read as the form its Content-Type announces is the
client's mistake: it becomes MalformedForm (answered 400 by the guard in
app.py, with one log line), never an error of the server.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger(__name__)

# What aiohttp raises on a body that does not parse: ValueError (a missing or
# wrong boundary, a cut-off body, undecodable text, bad base64), LookupError
# (an unknown charset), RuntimeError (an unknown content or transfer
# encoding), zlib.error (a broken deflate part), HttpProcessingError (a
# part's headers).
_UNREADABLE = (ValueError, LookupError, RuntimeError, zlib.error, HttpProcessingError)
# How much of aiohttp's reason goes into the log line.
REASON_MAX_CHARS = 200

FORM = web.RequestKey("form", dict[str, str])


class MalformedForm(Exception):
    """The request's body is not a readable form."""


async def read_form(request: web.Request) -> Mapping[str, str]:
    """The text fields of the request's form (the first value of each name).

    Files and binary parts are left out: no manager form has them. A request
    that is not a POST, or whose Content-Type is not a form's, has none.
    Raises MalformedForm, after logging one line, when the body cannot be read.
    """
    read_before: dict[str, str] | None = request.get(FORM)
    if read_before is not None:
        return read_before
    try:
        posted = await request.post()
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
    fields: dict[str, str] = {}
    for name, value in posted.items():
        if isinstance(value, str):
            fields.setdefault(name, value)
    request[FORM] = fields
    return fields
