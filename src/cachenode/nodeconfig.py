"""The node's settings as CONFIG reads and writes them (docs/protocol.md): a JSON object."""

from __future__ import annotations

import json

from cachenode.errors import InvalidConfig
from cachenode.node import Node
from cachenode.store import MIB, Policy
from cachenode.streaminput import Value

MAX_CONFIG_MB = 1 << 20


def apply_config(node: Node, body: Value) -> None:
    """Apply a CONFIG body: a JSON object with any of capacity_mb, policy, max_item_mb.

    Raises InvalidConfig, changing nothing, when any part of it is invalid.
    """
    try:
        settings = json.loads(bytes(body))
    except (ValueError, RecursionError):  # json's RecursionError: absurdly deep nesting
        raise InvalidConfig("CONFIG body is not JSON") from None
    if not isinstance(settings, dict):
        raise InvalidConfig("CONFIG body must be a JSON object")
    unknown = set(settings) - {"capacity_mb", "policy", "max_item_mb"}
    if unknown:
        raise InvalidConfig(f"unknown settings: {', '.join(sorted(unknown))}")
    capacity = _megabytes(settings, "capacity_mb")
    max_item_size = _megabytes(settings, "max_item_mb")
    policy = settings.get("policy")
    if policy is not None and policy not in tuple(Policy):
        raise InvalidConfig(f"policy must be 'lru' or 'random', not {policy!r}")
    node.store.configure(
        capacity=capacity,
        policy=Policy(policy) if policy is not None else None,
        max_item_size=max_item_size,
    )


def current_config(node: Node) -> bytes:
    store = node.store
    return json.dumps(
        {
            "capacity_mb": store.capacity / MIB,
            "policy": store.policy.value,
            "max_item_mb": store.max_item_size / MIB,
        }
    ).encode()


def _megabytes(settings: dict[str, object], name: str) -> int | None:
    value = settings.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidConfig(f"{name} must be a positive number, not {value!r}")
    if value > MAX_CONFIG_MB:  # also refuses Infinity, which json accepts
        raise InvalidConfig(f"{name} must be at most {MAX_CONFIG_MB} (1 TiB), not {value!r}")
    return int(value * MIB)
