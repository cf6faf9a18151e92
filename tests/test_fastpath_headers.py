"""One image response, whichever way the gateway answers it.

The image handler (aiohttp, ``pages.image``) and the fast path
(``keptcopies.prepared``) build their headers from one table
(``keptcopies.image_header_fields``): the same image, read with the fast
path on and off, gets the same header lines in the same order, apart from
Date and the connection's own.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from imagecache.config import Config, with_data_dir
from tests.conftest import image_bytes
from tests.test_fastpath import get, running

# Per message or per connection: not the image's.
NOT_THE_IMAGES = frozenset({"date", "connection", "keep-alive"})
PNG = image_bytes("PNG", color="green")


@dataclass
class RawReply:
    status_line: bytes
    headers: list[tuple[str, str]]  # in the order sent, names as sent
    body: bytes

    @property
    def image_headers(self) -> list[tuple[str, str]]:
        return [(n, v) for n, v in self.headers if n.lower() not in NOT_THE_IMAGES]


async def raw_exchange(port: int, *requests: bytes) -> list[RawReply]:
    """Send ``requests`` pipelined on one connection; their replies, headers in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    replies = []
    try:
        writer.write(b"".join(requests))
        for _ in requests:
            status_line = await reader.readline()
            headers = []
            while (line := await reader.readline()) != b"\r\n":
                name, _, value = line.decode().partition(":")
                headers.append((name, value.strip()))
            length = int(dict((n.lower(), v) for n, v in headers).get("content-length", "0"))
            body = b"" if b" 304 " in status_line else await reader.readexactly(length)
            replies.append(RawReply(status_line, headers, body))
    finally:
        writer.close()
    return replies


def with_fast_path(config: Config, on: bool) -> Config:
    """``config`` with the fast path ``on`` or off, in a data folder of its own
    (so that each gateway's first upload is version 1)."""
    config = with_data_dir(config, config.data_dir.with_name(f"fast-path-{on}"))
    return replace(config, gateway=replace(config.gateway, fast_path=on))


async def replies_of(config: Config, key: str) -> list[RawReply]:
    """An uploaded image read three ways: the first read, a hit, a 304."""
    async with running(config) as gateway:
        await gateway.upload(key, PNG)
        replies = await raw_exchange(
            gateway.port,
            get(f"/image/{key}"),
            get(f"/image/{key}"),
            get(f"/image/{key}", 'If-None-Match: "v1"'),
        )
        # On: the first read is loaded on the fast path, the next two are hits.
        assert gateway.counters.served == (2 if config.gateway.fast_path else 0)
        return replies


async def test_both_paths_send_the_same_headers_in_the_same_order(gateway_config: Config) -> None:
    fast = await replies_of(with_fast_path(gateway_config, True), "fast")
    slow = await replies_of(with_fast_path(gateway_config, False), "slow")
    for fast_reply, slow_reply in zip(fast, slow, strict=True):
        assert fast_reply.status_line == slow_reply.status_line
        assert fast_reply.image_headers == slow_reply.image_headers
        assert fast_reply.body == slow_reply.body
    assert [r.status_line for r in fast] == [b"HTTP/1.1 200 OK\r\n"] * 2 + [
        b"HTTP/1.1 304 Not Modified\r\n"
    ]
    assert fast[0].body == PNG
    assert [name for name, _ in fast[1].image_headers] == [
        "Content-Type",
        "Content-Length",
        "ETag",
        "Cache-Control",
        "X-Content-Type-Options",
        "Content-Security-Policy",
        "X-Frame-Options",
        "Server",
    ]
    assert dict(fast[2].image_headers)["ETag"] == '"v1"'
    assert "Content-Type" not in dict(fast[2].image_headers)


async def not_found_reply(config: Config) -> RawReply:
    async with running(config) as gateway:
        (reply,) = await raw_exchange(gateway.port, get("/image/ghost"))
        assert gateway.counters.handed_over == 0
        return reply


async def test_both_paths_send_the_same_404(gateway_config: Config) -> None:
    fast = await not_found_reply(with_fast_path(gateway_config, True))
    slow = await not_found_reply(with_fast_path(gateway_config, False))
    assert fast.status_line == slow.status_line == b"HTTP/1.1 404 Not Found\r\n"
    assert fast.image_headers == slow.image_headers
    assert fast.body == slow.body == b"no image for key 'ghost'"
