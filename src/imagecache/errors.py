"""The gateway's domain errors; each knows the HTTP status it maps to."""

from __future__ import annotations

from typing import Any


class ImagecacheError(Exception):
    """Base of the errors the gateway raises on purpose; ``str()`` is for the user.

    Each kind names its HTTP status where it is declared, as a class keyword:
    ``class ImageNotFound(ImagecacheError, http_status=404)``; one that names
    none keeps its base's.
    """

    http_status = 500

    def __init_subclass__(cls, *, http_status: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if http_status is not None:
            cls.http_status = http_status


class BadRequest(ImagecacheError, http_status=400):
    """Input the user can fix: a malformed key, a file that is not an image, ..."""


class UploadTooLarge(ImagecacheError, http_status=413):
    """An upload past ``gateway.max_upload_bytes``."""


class ImageTooLarge(ImagecacheError, http_status=413):
    """An image of more pixels than ``gateway.max_image_pixels``: decoding it would cost
    too much memory, whatever its file size."""


class Unauthorized(ImagecacheError, http_status=401):
    """A call that needs the API token came without it, or with another one."""


class Forbidden(ImagecacheError, http_status=403):
    """A state-changing request a browser sent from another site's page."""


class ImageNotFound(ImagecacheError, http_status=404):
    """No image is stored under the key."""


class ServiceUnavailable(ImagecacheError, http_status=503):
    """A part the request needs (the manager, the metadata store) cannot be reached."""


class BlobNotFound(ImagecacheError, http_status=404):
    """The blob store has no blob of that name."""


class StorageError(ImagecacheError, http_status=503):
    """The metadata or blob store failed; nothing was acknowledged."""
