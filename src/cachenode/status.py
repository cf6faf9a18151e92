"""Status codes of the binary protocol (docs/protocol.md), shared by errors and codec."""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    OK = 0x00
    NOT_FOUND = 0x01
    NOT_STORED = 0x02  # ADD of a key that is present
    TOO_LARGE = 0x03  # value above the node's maximum item size or capacity
    INVALID_ARGUMENT = 0x04  # a well-framed request with bad content (key, config)
    UNKNOWN_OPCODE = 0x05
    MALFORMED = 0x06  # framing broken: the node closes the connection after this reply
    INTERNAL_ERROR = 0x07
    LEASED = 0x08  # LEASE of a key another client is loading: ask again shortly
    BUSY = 0x09  # SET/ADD while the node receives as many values at once as it may: try again
    UNAUTHORIZED = 0x0A  # no AUTH with the node's token came first: the connection closes
    # Never sent on the wire: the client's status for a node it could not reach.
    UNAVAILABLE = 0xFF
