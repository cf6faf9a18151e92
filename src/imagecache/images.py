"""What an acceptable image is: keys, file types judged by content (not by name), and
sizes in pixels within a limit, decoded within a budget of pixels at once."""

from __future__ import annotations

import asyncio
import re
import struct
import warnings
from collections import deque
from dataclasses import dataclass
from io import BytesIO

from PIL import Image, UnidentifiedImageError

from imagecache.config import DEFAULT_MAX_IMAGE_PIXELS
from imagecache.errors import BadRequest, ImageTooLarge

MAX_KEY_LENGTH = 128
KEY_RULE = "1 to 128 characters: letters, digits, '.', '_' and '-', not starting with '.'"
_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

# Pillow's format name -> the content type served, and the flags value under
# which the cache nodes keep it (so a cache hit needs no metadata lookup).
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif"}
_FLAGS = {"image/png": 1, "image/jpeg": 2, "image/gif": 3}
_TYPES_BY_FLAGS = {flags: content_type for content_type, flags in _FLAGS.items()}

# What Pillow's image plugins raise on a damaged or crafted file.
_DAMAGED = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)
# Pillow's DecompressionBombError says "Image size (N pixels) exceeds limit of ...".
_POSSIBLE_BOMB = re.compile(r"\((\d+) pixels\)")


@dataclass(frozen=True, slots=True)
class ImageInfo:
    content_type: str
    width: int
    height: int


def check_key(key: str) -> str:
    """The key itself; raises BadRequest when it breaks the key rule."""
    if not key:
        raise BadRequest("a key is required")
    if not _KEY.fullmatch(key):
        raise BadRequest(f"invalid key {key[:140]!r}: keys are {KEY_RULE}")
    return key


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ImageInfo:
    """Type and size of a PNG, JPEG or GIF judged by its bytes, every pixel decoded;
    raises BadRequest otherwise, ImageTooLarge past ``max_pixels``.

    CPU-bound on big files: call it in a worker thread (the gateway's uploads
    go through ImageInspector, which also bounds the memory of decodes).
    """
    info = read_header(data, max_pixels)
    decode(data)
    return info


def read_header(data: bytes, max_pixels: int) -> ImageInfo:
    """Type and size from the file's header, not a pixel decoded; raises BadRequest
    for anything but a PNG, JPEG or GIF, ImageTooLarge past ``max_pixels``.

    Cheap, though a long header (JPEG or GIF blocks) is walked in Python: call
    it in a worker thread.
    """
    if not data:
        raise BadRequest("the file is empty")
    try:
        with warnings.catch_warnings():
            # The limit here is max_pixels: Pillow's own warning (past 89
            # million pixels) would only say the same thing less precisely.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # Image.open reads the header only; pixels are decoded by load().
            with Image.open(BytesIO(data)) as image:
                kind = image.format or ""
                width, height = image.size
    except Image.DecompressionBombError as error:
        # Past twice Image.MAX_IMAGE_PIXELS Pillow refuses in open() itself.
        found = _POSSIBLE_BOMB.search(str(error))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise ImageTooLarge(_too_many_pixels(pixels, max_pixels)) from None
    except UnidentifiedImageError:
        raise BadRequest("the file is not a PNG, JPEG or GIF image") from None
    except _DAMAGED as error:
        raise BadRequest(f"the image file is damaged: {error}") from None
    if kind not in CONTENT_TYPES:
        raise BadRequest(
            f"{kind or 'this'} files are not accepted: upload a PNG, JPEG or GIF image"
        )
    if width * height > max_pixels:
        found_pixels = f"{width} x {height} = {width * height:,} pixels"
        raise ImageTooLarge(_too_many_pixels(found_pixels, max_pixels))
    return ImageInfo(CONTENT_TYPES[kind], width, height)


def decode(data: bytes) -> None:
    """Decode every pixel of an image read_header accepted; raises BadRequest when
    that fails. Holds about 4 bytes a pixel while it runs."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data)) as image:
                # Decoding every pixel is what proves the file renders: verify()
                # alone lets a truncated JPEG through.
                image.load()
    except _DAMAGED as error:
        raise BadRequest(f"the image file is damaged: {error}") from None


def _too_many_pixels(found: str, max_pixels: int) -> str:
    return (
        f"the image has {found}, more than the limit of {max_pixels:,} pixels"
        " (gateway.max_image_pixels)"
    )


class ImageInspector:
    """inspect_image for the gateway's uploads, off the event loop, with at most
    ``budget_pixels`` (by default ``max_pixels``) being decoded at once in this
    process: an upload waits until enough earlier decodes have finished.

    The pixels are counted from the header before decoding, so the memory
    decodes take at once is bounded (about 4 bytes a pixel) however many
    uploads arrive together.
    """

    def __init__(
        self, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, budget_pixels: int | None = None
    ) -> None:
        self.max_pixels = max_pixels
        self.budget = PixelBudget(budget_pixels or max_pixels)

    async def inspect(self, data: bytes) -> ImageInfo:
        info = await asyncio.to_thread(read_header, data, self.max_pixels)
        pixels = max(1, info.width * info.height)
        await self.budget.take(pixels)
        loop = asyncio.get_running_loop()

        def decode_then_give_back() -> None:
            try:
                decode(data)
            finally:
                loop.call_soon_threadsafe(self.budget.give_back, pixels)

        decoding = loop.run_in_executor(None, decode_then_give_back)
        # Shielded: the decode of a cancelled upload runs on in its thread and
        # holds its pixels until it ends, so the budget never undercounts.
        decoding.add_done_callback(_retrieve)
        await asyncio.shield(decoding)
        return info


def _retrieve(future: asyncio.Future[None]) -> None:
    """Mark the outcome of a decode nobody awaits any more as seen (no asyncio warning)."""
    if not future.cancelled():
        future.exception()


class PixelBudget:
    """A semaphore counting pixels, first come first served: a big image waits
    for room instead of being overtaken forever by small ones. An image bigger
    than the whole budget waits until it has the budget to itself."""

    def __init__(self, pixels: int) -> None:
        self.capacity = pixels
        self.free = pixels
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, pixels: int) -> None:
        pixels = min(pixels, self.capacity)
        if not self._waiting and pixels <= self.free:
            self.free -= pixels
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiting.append((pixels, granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.give_back(pixels)  # granted, but its taker is gone
            else:
                self._waiting.remove((pixels, granted))
                self._grant()  # it may have been holding up smaller ones behind it
            raise

    def give_back(self, pixels: int) -> None:
        self.free += min(pixels, self.capacity)
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            pixels, granted = self._waiting.popleft()
            self.free -= pixels
            granted.set_result(None)


def flags_for(content_type: str) -> int:
    return _FLAGS[content_type]


def content_type_for(flags: int) -> str | None:
    """The content type a cache item's flags stand for; None for foreign items."""
    return _TYPES_BY_FLAGS.get(flags)
