"""Statistics of a sweep over seeds: mean and spread per configuration, and paired differences with a Student t
interval.

Every seed of a sweep trains every router on the same data order and initialisation seed, so two routers'
results at one seed form a pair; the difference of a pair removes what the seed does to both.  For n pairs
with differences d_i:

    mean = sum(d_i) / n,  s = sqrt(sum((d_i - mean)^2) / (n - 1)),  interval = mean -+ t_{(1+level)/2, n-1} s / sqrt(n)

(``level`` 0.95 by default).  With fewer than two pairs there is no spread and no interval: those fields are
NaN.  Spreads are sample standard deviations (n - 1 in the denominator).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (NaN for n < 2), smallest and largest value of n numbers."""
    n: int
    mean: float
    std: float
    min: float
    max: float


@dataclass(frozen=True)
class Interval:
    """Mean of n numbers and its two-sided Student t interval at ``level`` (bounds NaN for n < 2)."""
    n: int
    mean: float
    std: float
    low: float
    high: float
    level: float

    @property
    def contains_zero(self) -> bool:
        """Whether 0 lies in the interval (False when there is no interval)."""
        return bool(self.low <= 0.0 <= self.high)


@dataclass(frozen=True)
class PairedDifference(Interval):
    """``a - b`` over the seeds both have (``seeds``, in order), with its t interval."""
    seeds: Tuple[int, ...] = ()


def summarize(values: Sequence[float]) -> Summary:
    """Summary of the finite numbers in ``values`` (NaN fields when there are none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan)
    std = float(x.std(ddof=1)) if x.size > 1 else float("nan")
    return Summary(int(x.size), float(x.mean()), std, float(x.min()), float(x.max()))


def t_quantile(p: float, dof: int) -> float:
    """The p-quantile of Student's t distribution with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """mean -+ t_{(1+level)/2, n-1} s / sqrt(n) of the finite numbers in ``values``."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must lie in (0, 1)")
    s = summarize(values)
    if s.n < 2:
        return Interval(s.n, s.mean, s.std, float("nan"), float("nan"), level)
    half = t_quantile((1.0 + level) / 2.0, s.n - 1) * s.std / math.sqrt(s.n)
    return Interval(s.n, s.mean, s.std, s.mean - half, s.mean + half, level)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedDifference:
    """``a[seed] - b[seed]`` over the seeds where both are finite, and its t interval."""
    seeds = tuple(sorted(k for k in a if k in b and _finite(a[k]) and _finite(b[k])))
    iv = t_interval([a[k] - b[k] for k in seeds], level)
    return PairedDifference(iv.n, iv.mean, iv.std, iv.low, iv.high, iv.level, seeds)


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def by_seed(rows: Sequence[Mapping], key: str) -> Dict[int, float]:
    """``{row["seed"]: row[key]}`` of rows that hold a finite ``key``."""
    return {int(r["seed"]): float(r[key]) for r in rows if _finite(r.get(key))}


__all__ = ["Summary", "Interval", "PairedDifference", "summarize", "t_quantile", "t_interval", "paired_difference",
           "by_seed"]
