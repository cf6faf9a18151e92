"""Samples of the gateway's image lookups, for the manager's miss-rate curve.

Every successful user read of an image (the fast path, the image handler,
``/api/key/<key>``) is counted; the reads of keys in the spatial sample
(``imagecache.sampling``: CRC-32 of the key under a threshold, the same
answer in every process) are kept with the image's size. Every few seconds the
gateway posts what it gathered to the manager (``SampleReporter``), which
simulates every pool size over the samples of all gateways.

The share of keys sampled is the manager's choice (manager.samplingrate),
named in its answer to each post. The fast path computes a key's hash bucket
once per kept copy (``KeptImage.sample_bucket``), so a hit costs a counter
increment and a comparison with the current threshold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from imagecache.errors import ImagecacheError
from imagecache.manager_link import ManagerLink
from imagecache.sampling import INITIAL_RATE, is_sampled, sample_bucket, sampling_threshold

log = logging.getLogger(__name__)

# The rate a gateway samples at until the manager's answer to its first post
# names one (manager.samplingrate chooses it for every gateway).
SAMPLING_RATE = INITIAL_RATE
# Samples one post carries at most; beyond, a batch keeps its first ones and
# counts the rest as dropped. With keys of at most 128 characters a post stays
# under the manager's 1 MiB body limit. The manager keeps the pool's sampled
# reads within 2,000 a second (manager.samplingrate), a post every 2 s at
# most 4,000, so a batch fills only in the seconds before a lower rate is named.
MAX_SAMPLES_PER_POST = 5_000
# How often the gateway posts its samples to the manager.
REPORT_SECONDS = 2.0


@dataclass
class SampleBatch:
    """What a gateway gathered since its last post."""

    lookups: int = 0  # every successful image lookup, sampled or not
    samples: list[tuple[str, int]] = field(default_factory=list)  # (key, image bytes)
    dropped: int = 0  # sampled lookups left out: the batch was full

    def as_json(self) -> dict[str, object]:
        return {"lookups": self.lookups, "samples": [list(s) for s in self.samples]}


class KeySampler:
    """Counts the lookups and keeps the sampled ones, up to ``max_samples`` a batch."""

    def __init__(
        self, rate: float = SAMPLING_RATE, max_samples: int = MAX_SAMPLES_PER_POST
    ) -> None:
        self.rate = rate
        self.threshold = sampling_threshold(rate)
        self.max_samples = max_samples
        self.batch = SampleBatch()

    def set_rate(self, rate: float) -> None:
        """Sample at ``rate`` from now on (the manager's choice). What was gathered
        at the old rate is dropped: the manager would not take it whole."""
        if rate != self.rate:
            self.rate, self.threshold = rate, sampling_threshold(rate)
            self.batch = SampleBatch()

    def is_sampled(self, key: str) -> bool:
        """Whether lookups of ``key`` belong to the sample at the current rate."""
        return is_sampled(key.encode(), self.threshold)

    @staticmethod
    def bucket(key: str) -> int:
        """The hash bucket of ``key``, computed once per kept copy: a lookup of
        it is sampled while the bucket is below ``threshold``."""
        return sample_bucket(key.encode())

    def looked_up(self, key: str, size: int) -> None:
        """A successful lookup of ``key`` (an image of ``size`` bytes)."""
        self.batch.lookups += 1
        if is_sampled(key.encode(), self.threshold):
            self.keep(key, size)

    def keep(self, key: str, size: int) -> None:
        """A sampled lookup (the caller has counted it in ``batch.lookups``)."""
        batch = self.batch
        if len(batch.samples) < self.max_samples:
            batch.samples.append((key, size))
        else:
            batch.dropped += 1

    def take(self) -> SampleBatch:
        """The batch gathered so far; the next one starts empty."""
        batch, self.batch = self.batch, SampleBatch()
        return batch


class SampleReporter:
    """Posts the sampler's batches to the manager, best effort: a failed post
    drops its batch (the curve is a prediction; a gap of seconds barely moves
    it) and is logged once until a post succeeds again."""

    def __init__(self, sampler: KeySampler, link: ManagerLink) -> None:
        self._sampler = sampler
        self._link = link
        self._failing = False

    async def report(self) -> None:
        batch = self._sampler.take()
        if not batch.lookups:
            return
        if batch.dropped:
            log.info(
                "posting %d key samples; %d more did not fit the batch and were dropped",
                len(batch.samples),
                batch.dropped,
            )
        payload = {**batch.as_json(), "rate": self._sampler.rate}
        try:
            answer = await self._link.call_json("key_samples", payload)
        except ImagecacheError as error:
            if not self._failing:
                log.warning(
                    "key samples not delivered, dropped until the manager answers: %s", error
                )
            self._failing = True
            return
        self._failing = False
        rate = answer.get("rate")
        if isinstance(rate, int | float) and 0 < rate <= 1:
            self._sampler.set_rate(float(rate))
        # An answer without a rate (a manager of an older version) keeps this one.
