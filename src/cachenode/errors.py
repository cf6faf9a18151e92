"""The cache node's exceptions: one tree, each error knowing its wire status."""

from __future__ import annotations

from cachenode.status import Status


class CacheNodeError(Exception):
    """Base of every error the cachenode package raises on purpose."""

    status: Status = Status.INTERNAL_ERROR


class StoreError(CacheNodeError):
    """A store operation was refused; the store is unchanged."""


class ItemTooLarge(StoreError):
    status = Status.TOO_LARGE


class StaleWrite(StoreError):
    """A versioned write older than what the node knows of its key."""

    status = Status.NOT_STORED


class InvalidKey(StoreError):
    status = Status.INVALID_ARGUMENT


class InvalidConfig(StoreError):
    status = Status.INVALID_ARGUMENT


class ProtocolError(CacheNodeError):
    """The peer sent bytes that break the framing; the connection must close.

    The decoders raise nothing else.
    """

    status = Status.MALFORMED


class NodeError(CacheNodeError):
    """Base of the client's errors: talking to a node did not succeed."""


class NodeUnavailable(NodeError):
    """The node could not be reached, or the connection broke mid-request."""

    status = Status.UNAVAILABLE


class NodeTimeout(NodeUnavailable):
    """The node did not answer within the client's timeout."""


class NodeReplyError(NodeError):
    """The node answered a request with an error status."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(f"{status.name}: {message}" if message else status.name)
        self.status = status
        self.message = message
