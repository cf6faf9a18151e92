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
