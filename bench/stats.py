"""Distributions of samples: median and p95, printed the same way everywhere."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Distribution:
    """Samples summarised: `n`, median, 95th percentile (nearest rank), min and max."""

    n: int
    median: float
    p95: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: list[float]) -> Distribution:
        if not samples:
            raise ValueError("a distribution needs at least one sample")
        ordered = sorted(samples)
        rank = max(1, math.ceil(0.95 * len(ordered)))
        return cls(len(ordered), statistics.median(ordered), ordered[rank - 1], ordered[0], ordered[-1])

    def scaled(self, factor: float) -> Distribution:
        return Distribution(self.n, self.median * factor, self.p95 * factor, self.low * factor, self.high * factor)

    def cell(self, unit: str = "ms", digits: int = 0) -> str:
        """`median / p95 unit (n=…)`, for a results table."""
        return f"{self.median:.{digits}f} / {self.p95:.{digits}f} {unit} (n={self.n})"


def ms(samples_s: list[float]) -> Distribution:
    """Samples taken in seconds, summarised in milliseconds."""
    return Distribution.of(samples_s).scaled(1000)
