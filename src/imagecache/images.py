"""What an acceptable image is: keys, and file types judged by content, not by name."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from io import BytesIO

from PIL import Image, UnidentifiedImageError

from imagecache.errors import BadRequest

MAX_KEY_LENGTH = 128
KEY_RULE = "1 to 128 characters: letters, digits, '.', '_' and '-', not starting with '.'"
_KEY = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

# Pillow's format name -> the content type served, and the flags value under
# which the cache nodes keep it (so a cache hit needs no metadata lookup).
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif"}
_FLAGS = {"image/png": 1, "image/jpeg": 2, "image/gif": 3}
_TYPES_BY_FLAGS = {flags: content_type for content_type, flags in _FLAGS.items()}


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


def inspect_image(data: bytes) -> ImageInfo:
    """Type and size of a PNG, JPEG or GIF judged by its bytes; raises BadRequest otherwise.

    CPU-bound on big files: call it in a worker thread.
    """
    if not data:
        raise BadRequest("the file is empty")
    try:
        with warnings.catch_warnings():
            # Huge dimensions are refused below rather than warned about.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(BytesIO(data)) as image:
                kind = image.format or ""
                width, height = image.size
                # Decoding every pixel is what proves the file renders: verify()
                # alone lets a truncated JPEG through.
                image.load()
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadRequest("the file is not a PNG, JPEG or GIF image") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadRequest(f"the image file is damaged: {error}") from None
    if kind not in CONTENT_TYPES:
        raise BadRequest(
            f"{kind or 'this'} files are not accepted: upload a PNG, JPEG or GIF image"
        )
    return ImageInfo(CONTENT_TYPES[kind], width, height)


def flags_for(content_type: str) -> int:
    return _FLAGS[content_type]


def content_type_for(flags: int) -> str | None:
    """The content type a cache item's flags stand for; None for foreign items."""
    return _TYPES_BY_FLAGS.get(flags)
