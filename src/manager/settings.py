"""The cache pool's settings: what the Memory Configuration page and configure_cache set.

Stored in the metadata store's settings table, so every manager and gateway
sees the same values, and validated here as a whole before anything changes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

MIN_NODES = 1
MAX_NODES = 8
MAX_MIN_LOOKUPS = 10_000_000


class Mode(StrEnum):
    MANUAL = "manual"
    AUTO = "auto"


class SettingsError(ValueError):
    """A setting is missing or out of range; nothing was changed."""


@dataclass(frozen=True, slots=True)
class CacheSettings:
    capacity_mb: float = 64.0  # per node
    policy: str = "lru"  # "lru" or "random"
    mode: Mode = Mode.MANUAL
    max_miss: float = 0.5  # grow when the last minute's miss rate is above this
    min_miss: float = 0.1  # shrink when it is below this
    exp_ratio: float = 2.0  # grow to ceil(n * exp_ratio)
    shrink_ratio: float = 0.5  # shrink to floor(n * shrink_ratio)
    # A minute with fewer lookups is no evidence: a handful of reads (one
    # missing key is a 100% miss rate) must not resize the pool.
    min_lookups: int = 100
    # "ratio": grow by expRatio, shrink by shrinkRatio (the original rule);
    # "predictive": go at once to the smallest size the miss curve predicts
    # within maxMiss (docs/design.md, "The miss curve").
    scaling: str = "ratio"

    def validate(self) -> CacheSettings:
        """Return self, or raise SettingsError naming the first bad value."""
        if not 0 < self.capacity_mb <= 64 * 1024:
            raise SettingsError(
                f"cacheSize must be between 0 and 65536 MB, not {self.capacity_mb:g}"
            )
        if self.policy not in ("lru", "random"):
            raise SettingsError(f"policy must be LRU or RR, not {self.policy!r}")
        if not 0 <= self.min_miss <= 1 or not 0 <= self.max_miss <= 1:
            raise SettingsError("maxMiss and minMiss must be fractions between 0 and 1")
        if self.min_miss >= self.max_miss:
            raise SettingsError(
                f"minMiss ({self.min_miss:g}) must be below maxMiss ({self.max_miss:g})"
            )
        if not 1 < self.exp_ratio <= MAX_NODES:
            raise SettingsError(f"expRatio must be above 1 (and at most 8), not {self.exp_ratio:g}")
        if not 0 < self.shrink_ratio < 1:
            raise SettingsError(f"shrinkRatio must be between 0 and 1, not {self.shrink_ratio:g}")
        if self.scaling not in SCALINGS:
            raise SettingsError(f"scaling must be ratio or predictive, not {self.scaling!r}")
        if not 0 <= self.min_lookups <= MAX_MIN_LOOKUPS:
            raise SettingsError(
                f"minLookups must be a whole number from 0 to {MAX_MIN_LOOKUPS}, "
                f"not {self.min_lookups:g}"
            )
        return self

    def to_strings(self) -> dict[str, str]:
        return {name: str(value) for name, value in asdict(self).items()}

    @classmethod
    def from_strings(cls, stored: Mapping[str, str]) -> CacheSettings:
        """Settings from the metadata store; missing or unreadable ones keep their defaults."""
        settings = cls()
        for name, text in stored.items():
            if name in cls.__dataclass_fields__:
                try:
                    changed: dict[str, Any] = {name: _parse(name, text)}
                    settings = replace(settings, **changed)
                except (SettingsError, ValueError):
                    continue
        return settings


# The API's parameter names (README, "The admin API") and this module's.
API_NAMES = {
    "cacheSize": "capacity_mb",
    "policy": "policy",
    "mode": "mode",
    "maxMiss": "max_miss",
    "minMiss": "min_miss",
    "expRatio": "exp_ratio",
    "shrinkRatio": "shrink_ratio",
    "minLookups": "min_lookups",
    "scaling": "scaling",
}
SCALINGS = ("ratio", "predictive")
POLICY_NAMES = {"lru": "lru", "rr": "random", "random": "random"}


def apply_params(settings: CacheSettings, params: Mapping[str, str]) -> CacheSettings:
    """``settings`` with the API or form parameters applied and validated.

    Raises SettingsError for an unknown policy or mode, a value that is not a
    number, or a combination out of range.
    """
    changes: dict[str, Any] = {}
    for api_name, name in API_NAMES.items():
        if api_name in params and params[api_name] != "":
            changes[name] = _parse(name, params[api_name])
    return replace(settings, **changes).validate()


def policy_label(policy: str) -> str:
    """The policy as the API spells it: LRU or RR."""
    return "LRU" if policy == "lru" else "RR"


def _parse(name: str, text: str) -> object:
    if name == "policy":
        policy = POLICY_NAMES.get(text.strip().lower())
        if policy is None:
            raise SettingsError(f"policy must be LRU or RR, not {text!r}")
        return policy
    if name == "mode":
        try:
            return Mode(text.strip().lower())
        except ValueError:
            raise SettingsError(f"mode must be manual or auto, not {text!r}") from None
    if name == "scaling":
        scaling = text.strip().lower()
        if scaling not in SCALINGS:
            raise SettingsError(f"scaling must be ratio or predictive, not {text!r}")
        return scaling
    if name == "min_lookups":
        if re.fullmatch(r"[0-9]{1,9}", text.strip()) is None:
            raise SettingsError(f"minLookups must be a whole number, not {text!r}")
        return int(text)
    try:
        value = float(text)
    except ValueError:
        raise SettingsError(f"{name} must be a number, not {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SettingsError(f"{name} must be a finite number")
    return value
