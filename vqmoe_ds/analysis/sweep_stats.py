"""Statistics of a sweep over seeds: mean and spread per configuration, paired differences with a Student t
interval, and the two one-sided tests (TOST) that make "no difference" a measured equivalence.

Every seed of a sweep trains every router on the same data order and initialisation seed, so two routers'
results at one seed form a pair; the difference of a pair removes what the seed does to both.  For n pairs
with differences d_i:

    mean = sum(d_i) / n,  s = sqrt(sum((d_i - mean)^2) / (n - 1)),  interval = mean -+ t_{(1+level)/2, n-1} s / sqrt(n)

(``level`` 0.95 by default; the interval is scipy.stats' one-sample t interval).  With fewer than two pairs
there is no spread and no interval: those fields are NaN.  Spreads are sample standard deviations (n - 1 in the
denominator).

Equivalence within a margin m (`tost`): two one-sided one-sample t tests of the differences, H0: mean <= -m
against mean > -m (t_low = (mean + m) / (s / sqrt(n))) and H0: mean >= m against mean < m
(t_high = (mean - m) / (s / sqrt(n))), both from scipy.stats.ttest_1samp; p = max of their p-values.  p < alpha
shows the mean difference lies within (-m, m); that is the same as the 1 - 2 alpha t interval lying inside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

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


def _finite_array(values: Sequence[float]) -> np.ndarray:
    return np.asarray([v for v in values if _finite(v)], dtype=np.float64)


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """mean -+ t_{(1+level)/2, n-1} s / sqrt(n) of the finite numbers in ``values`` (scipy.stats.ttest_1samp's
    confidence interval; a sample without spread has the interval [mean, mean])."""
    from scipy import stats

    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} must lie in (0, 1)")
    s = summarize(values)
    if s.n < 2:
        return Interval(s.n, s.mean, s.std, float("nan"), float("nan"), level)
    if s.std == 0.0:
        return Interval(s.n, s.mean, s.std, s.mean, s.mean, level)
    ci = stats.ttest_1samp(_finite_array(values), 0.0).confidence_interval(level)
    return Interval(s.n, s.mean, s.std, float(ci.low), float(ci.high), level)


@dataclass(frozen=True)
class Equivalence:
    """TOST of n differences against the margin (-margin, margin): the two t statistics, their p-values, the
    test's p (the larger one) and whether it is below ``alpha``; NaN fields and False for n < 2."""
    n: int
    mean: float
    margin: float
    t_low: float
    t_high: float
    p_low: float
    p_high: float
    alpha: float

    @property
    def p(self) -> float:
        return max(self.p_low, self.p_high)

    @property
    def equivalent(self) -> bool:
        return bool(self.p < self.alpha)


def tost(values: Sequence[float], margin: float, alpha: float = 0.05) -> Equivalence:
    """The two one-sided t tests of the module docstring for the finite numbers in ``values``."""
    from scipy import stats

    if not margin > 0:
        raise ValueError(f"margin={margin} must be > 0")
    x = _finite_array(values)
    nan = float("nan")
    if x.size < 2:
        return Equivalence(int(x.size), float(x.mean()) if x.size else nan, margin, nan, nan, nan, nan, alpha)
    mean = float(x.mean())
    if float(x.std(ddof=1)) == 0.0:  # no spread: the mean is the difference at every seed
        inside = -margin < mean < margin
        p_low = 0.0 if mean > -margin else 1.0
        p_high = 0.0 if mean < margin else 1.0
        inf = math.inf
        return Equivalence(int(x.size), mean, margin, inf if inside else -inf, -inf if inside else inf,
                           p_low, p_high, alpha)
    low = stats.ttest_1samp(x, -margin, alternative="greater")
    high = stats.ttest_1samp(x, margin, alternative="less")
    return Equivalence(int(x.size), mean, margin, float(low.statistic), float(high.statistic), float(low.pvalue),
                       float(high.pvalue), alpha)


def paired_values(a: Mapping[int, float], b: Mapping[int, float]) -> Tuple[Tuple[int, ...], List[float]]:
    """(seeds, ``a[seed] - b[seed]``) over the seeds where both are finite."""
    seeds = tuple(sorted(k for k in a if k in b and _finite(a[k]) and _finite(b[k])))
    return seeds, [a[k] - b[k] for k in seeds]


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedDifference:
    """``a[seed] - b[seed]`` over the seeds where both are finite, and its t interval."""
    seeds, diffs = paired_values(a, b)
    iv = t_interval(diffs, level)
    return PairedDifference(iv.n, iv.mean, iv.std, iv.low, iv.high, iv.level, seeds)


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def by_seed(rows: Sequence[Mapping], key: str) -> Dict[int, float]:
    """``{row["seed"]: row[key]}`` of rows that hold a finite ``key``."""
    return {int(r["seed"]): float(r[key]) for r in rows if _finite(r.get(key))}


__all__ = ["Summary", "Interval", "PairedDifference", "Equivalence", "summarize", "t_quantile", "t_interval",
           "paired_values", "paired_difference", "tost", "by_seed"]
