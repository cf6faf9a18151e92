"""Which requests the fast path (``fastpath``) answers: reading a request's head.

Only a plain ``GET /image/<key>`` over HTTP/1.1, with no body and no header
that could change its meaning, is the fast path's; for anything else the
reader says None, and the connection goes to aiohttp, whose reading of the
request (and its limits and errors) then decides.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Heads longer than this go to aiohttp, which applies its own limits.
MAX_HEAD = 8192
# Header lines, each "\r\n" name ":" value; a name is an RFC 9110 token.
# Values hold no control characters but tab (aiohttp answers those 400).
_HEADER_LINES = re.compile(rb"(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*)*")
_HEADERS_OF_NOTE = re.compile(  # in the lowered head
    rb"\r\n(host|if-none-match|connection|content-length|transfer-encoding|expect|upgrade):"
    rb"([^\r\n]*)"
)
_REQUEST_LINE = re.compile(rb"GET /image/([A-Za-z0-9_-][A-Za-z0-9._-]{0,127}) HTTP/1\.1")


class ImageRequest(NamedTuple):  # a tuple: made for every request, and cheaply
    key: str
    if_none_match: bytes  # the header's value, or b""
    close: bool  # "Connection: close": answer, then close


def parse_image_request(head: bytes) -> ImageRequest | None:
    """The request if ``head`` (without its blank line) is a plain image GET, else None.

    None means "let aiohttp decide": it is not an error here.
    """
    line_end = head.find(b"\r\n")
    if line_end < 0:
        line_end = len(head)
    match = _REQUEST_LINE.fullmatch(head, 0, line_end)
    if match is None or _HEADER_LINES.fullmatch(head, line_end) is None:
        return None  # not an image GET, or a malformed or folded header line
    if_none_match = b""
    close = False
    seen: set[bytes] = set()
    # Names are matched in a lowered copy; values come from the original
    # (an ETag is case-sensitive).
    for header in _HEADERS_OF_NOTE.finditer(head.lower(), line_end):
        name = header.group(1)
        if name in seen:
            return None  # a repeated header: aiohttp's reading of it decides
        seen.add(name)
        value = head[header.start(2) : header.end(2)].strip()
        if name == b"host":
            continue
        if name == b"if-none-match":
            if_none_match = value
        elif name == b"connection":
            tokens = {token.strip() for token in value.lower().split(b",")}
            if b"upgrade" in tokens:
                return None
            close = b"close" in tokens
        elif name != b"content-length" or value != b"0":
            return None  # a body, or a protocol change: aiohttp's business
    if b"host" not in seen:
        return None  # HTTP/1.1 requires it; aiohttp answers 400
    return ImageRequest(match.group(1).decode("ascii"), if_none_match, close)
