"""The gateway's domain errors; each knows the HTTP status it maps to."""

from __future__ import annotations


class ImagecacheError(Exception):
    """Base of the errors the gateway raises on purpose; ``str()`` is for the user."""

    http_status = 500


class BadRequest(ImagecacheError):
    """Input the user can fix: a malformed key, a file that is not an image, ..."""

    http_status = 400


class UploadTooLarge(ImagecacheError):
    http_status = 413


class ImageTooLarge(ImagecacheError):
    """An image of more pixels than ``gateway.max_image_pixels``: decoding it would cost
    too much memory, whatever its file size."""

    http_status = 413


class Unauthorized(ImagecacheError):
    """A call that needs the API token came without it, or with another one."""

    http_status = 401


class Forbidden(ImagecacheError):
    """A state-changing request a browser sent from another site's page."""

    http_status = 403


class ImageNotFound(ImagecacheError):
    http_status = 404


class ServiceUnavailable(ImagecacheError):
    """A part the request needs (the manager, the metadata store) cannot be reached."""

    http_status = 503


class BlobNotFound(ImagecacheError):
    """The blob store has no blob of that name."""

    http_status = 404


class StorageError(ImagecacheError):
    """The metadata or blob store failed; nothing was acknowledged."""

    http_status = 503
