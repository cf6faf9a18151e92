"""The gateway's own copies of hot images, kept as ready HTTP responses.

A copy is only ever served while the key's cache node vouches that it still
holds the same version (``fastpath``: a CHECK, or a read lease): a copy is a way to skip moving
the bytes from the node, never a second source of truth, so it cannot make a
read older than what the node would have returned.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from imagecache.memfiles import MemoryFile, MemoryFiles
from imagecache.webguards import SECURITY_HEADERS

# A sample bucket above every sampling threshold: the copy's lookups are never sampled.
NEVER_SAMPLED = 1 << 32


@dataclass(frozen=True, slots=True)
class KeptImage:
    version: int
    etag: bytes  # as sent, quotes included: b'"v12"'
    headers: bytes  # the 200 response's header lines after the status line, up to the blank line
    not_modified_headers: bytes  # the same for a 304
    body: bytes | memoryview  # a view of ``file`` when there is one
    file: MemoryFile | None = None  # the body in an in-memory file, for sendfile
    # The hash bucket of its key for the miss-curve sample (keysamples): made
    # once here, so a fast-path hit only compares it with the sampler's
    # threshold, which the manager may change.
    sample_bucket: int = NEVER_SAMPLED

    @property
    def size(self) -> int:
        return len(self.body) + len(self.headers) + len(self.not_modified_headers)


def etag_of(version: int) -> str:
    """The ETag of an image version, quotes included (weak comparison is never needed)."""
    return f'"v{version}"'


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """Whether If-None-Match (RFC 9110: ``*``, or a list of ETags, weak comparison) holds ``etag``.

    Both the image handler of ``pages`` and the fast path read the header with this.
    """
    if not if_none_match:
        return False
    tokens = [token.strip() for token in if_none_match.split(b",")]
    return b"*" in tokens or etag in tokens or b"W/" + etag in tokens


def image_header_fields(
    version: int, content_type: str | None = None, length: int = 0
) -> list[tuple[str, str]]:
    """The headers of an image response, in the order sent: a 200's with
    ``content_type`` and ``length`` (the body's size), a 304's without.

    Both ways a gateway answers a read send these: the image handler of
    ``pages`` (aiohttp adds Date and Server after them) and the fast path
    (``prepared`` makes them bytes once per copy).
    no-cache: browsers revalidate every time (cheap: a 304), so an updated
    image shows at once, never a stale copy. The security headers are those
    aiohttp's other responses get from webguards.add_security_headers.
    """
    typed = [] if content_type is None else [("Content-Type", content_type)]
    sized = [] if content_type is None else [("Content-Length", str(length))]
    return [
        *typed,
        *sized,
        ("ETag", etag_of(version)),
        ("Cache-Control", "no-cache"),
        *SECURITY_HEADERS,
    ]


def not_found_header_fields(length: int) -> list[tuple[str, str]]:
    """The headers of the 404 that answers a key with no image (a plain-text
    message of ``length`` bytes), in the order sent: the image handler of
    ``pages`` and the fast path send the same."""
    return [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(length)),
        *SECURITY_HEADERS,
    ]


def header_lines(fields: list[tuple[str, str]]) -> bytes:
    """``fields`` as header lines, each ending in CRLF."""
    return b"".join(b"%s: %s\r\n" % (name.encode(), value.encode()) for name, value in fields)


def prepared(
    version: int,
    content_type: str,
    body: bytes,
    files: MemoryFiles | None = None,
    *,
    sample_bucket: int = NEVER_SAMPLED,
) -> KeptImage:
    """An image as a ready response: its header lines made once for every read,
    and its bytes in an in-memory file when ``files`` can make one;
    ``sample_bucket``: its key's bucket for the miss curve's sample."""
    etag = etag_of(version).encode()
    headers = header_lines(image_header_fields(version, content_type, len(body)))
    common = header_lines(image_header_fields(version))
    file = files.make(body) if files is not None else None
    if file is None:
        return KeptImage(version, etag, headers, common, body, sample_bucket=sample_bucket)
    return KeptImage(version, etag, headers, common, file.view, file, sample_bucket=sample_bucket)


# Reads counted per copy kept (at least MIN_FREQUENCY_SAMPLE, at most
# MAX_FREQUENCY_SAMPLE) in one period of counting: TinyLFU's aging, so the
# counts follow what is hot lately. A key's weight is its reads this period
# plus half those of the period before; older ones are forgotten. Aging swaps
# the two periods' counts rather than halving every count in a Python loop,
# which held the event loop longest (at 100,000 counts: 6 ms at worst, now 4.5,
# mostly the dict's own growth). The counts hold at most twice that many keys
# (reads of images only: a key with no image is never counted).
FREQUENCY_SAMPLE_PER_COPY = 10
MIN_FREQUENCY_SAMPLE = 1000
MAX_FREQUENCY_SAMPLE = 100_000


class KeptCopies:
    """Least recently used images up to ``capacity`` bytes; 0 keeps nothing.

    Only images their node served are kept (``keep``). Admission as in
    TinyLFU (Einziger et al.; Caffeine): every read of an image is counted
    (a hit in ``get``, a load in ``keep``), older periods weighing less;
    while there is room every image its node served is kept; once a new copy
    would evict copies, it is kept only if its key was read more often lately
    than each of theirs. A working set larger than the capacity then leaves
    the copies alone instead of replacing one with every read: making a copy
    (an in-memory file, mapped) costs a miss about 40% of its CPU
    (bench/misses.py), and the hot images stay kept.

    With ``files``, big images are kept in in-memory files (``memfiles``);
    ``sample_bucket`` gives each copy its key's bucket in the miss curve's sample.
    """

    def __init__(
        self,
        capacity: int,
        files: MemoryFiles | None = None,
        sample_bucket: Callable[[str], int] | None = None,
    ) -> None:
        self.capacity = capacity
        self._files = files
        self._sample_bucket = sample_bucket
        self._images: OrderedDict[str, KeptImage] = OrderedDict()
        self._used = 0
        self._reads: dict[str, int] = {}  # reads of each image this period (hits and loads)
        self._earlier_reads: dict[str, int] = {}  # ... and in the period before
        self._reads_counted = 0  # this period

    def get(self, key: str) -> KeptImage | None:
        """The copy of ``key`` (now the most recently used, and a read counted
        for admission), or None."""
        image = self._images.get(key)
        if image is not None:
            self._images.move_to_end(key)
            self._count_read(key)
        return image

    def keep(
        self, key: str, version: int, content_type: str, body: bytes, *, from_node: bool
    ) -> KeptImage:
        """Keep this image of ``key`` if it is worth keeping; returns it prepared either way.

        ``from_node`` False: the image missed its node and was loaded from the
        blob store. It is not kept: on a pool smaller than the working set the
        node drops such a key again before its next read, so every read of its
        copy would pay a CHECK that fails and then the full read anyway (on
        bench/misses.py, a fifth of the throughput). A hot key is kept at its
        next read, a hit. Its read counts for admission either way, and a copy
        of an older version goes.
        """
        current = self._images.get(key)
        bucket = NEVER_SAMPLED if self._sample_bucket is None else self._sample_bucket(key)
        self._count_read(key)  # the load's read
        if not from_node:
            if current is not None and current.version < version:
                self.drop(key)
            return prepared(version, content_type, body, sample_bucket=bucket)
        if (
            version <= 0  # unversioned (a text protocol write): CHECK could not tell it apart
            or (current is not None and current.version >= version)
            or len(body) >= self.capacity // 4  # one image must not flush the rest
            or not self._admits(key, len(body), replacing=current is not None)
        ):
            return prepared(version, content_type, body, sample_bucket=bucket)
        image = prepared(version, content_type, body, self._files, sample_bucket=bucket)
        self.drop(key)
        self._images[key] = image
        self._used += image.size
        while self._used > self.capacity:
            _, evicted = self._images.popitem(last=False)
            self._used -= evicted.size
        return image

    def _count_read(self, key: str) -> None:
        self._reads[key] = self._reads.get(key, 0) + 1
        self._reads_counted += 1
        sample = FREQUENCY_SAMPLE_PER_COPY * len(self._images)
        if self._reads_counted >= min(max(MIN_FREQUENCY_SAMPLE, sample), MAX_FREQUENCY_SAMPLE):
            self._earlier_reads, self._reads = self._reads, {}
            self._reads_counted = 0

    def _weight(self, key: str) -> int:
        """``key``'s reads lately: this period's, and half the period before's."""
        return self._reads.get(key, 0) + self._earlier_reads.get(key, 0) // 2

    def _admits(self, key: str, size: int, *, replacing: bool) -> bool:
        """Whether a copy of ``size`` bytes may be kept for ``key``: a newer
        version of a kept key always, another while there is room, else only
        if read more often lately than every copy it would evict."""
        room_needed = self._used + size - self.capacity
        if replacing or room_needed <= 0:
            return True
        weight = self._weight(key)
        for victim, image in self._images.items():  # least recently used first
            if weight <= self._weight(victim):
                return False
            room_needed -= image.size
            if room_needed <= 0:
                break
        return True

    def drop(self, key: str, version: int | None = None) -> None:
        """Forget the copy of ``key``; with ``version``, only a copy of that version."""
        image = self._images.get(key)
        if image is not None and version in (None, image.version):
            del self._images[key]
            self._used -= image.size

    def clear(self) -> None:
        self._images.clear()
        self._used = 0

    @property
    def used(self) -> int:
        """Bytes held: bodies and their prepared header lines."""
        return self._used

    def __contains__(self, key: object) -> bool:
        """Whether a copy of ``key`` is kept (neither a read nor a use)."""
        return key in self._images

    def __len__(self) -> int:
        return len(self._images)
