"""Small statistics for the study report, stdlib only (no SciPy in the project's venv).

Student's t distribution through the regularised incomplete beta function (Lentz's
continued fraction, as in Numerical Recipes 6.4): ``t_sf``, ``t_ppf``; a 95 % interval of
a mean; the paired t-test.
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["betainc", "mean_ci", "paired_t", "t_cdf", "t_ppf"]


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)``."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x={x} is outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The ``q`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q={q} is outside (0, 1)")
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mean_ci(xs: Sequence[float], level: float = 0.95) -> tuple[float, float, float, float]:
    """``(mean, sample std, ci_low, ci_high)``: the t interval of the mean; std and the
    interval are NaN with fewer than two values."""
    n = len(xs)
    if n == 0:
        return (math.nan,) * 4
    m = sum(xs) / n
    if n < 2:
        return m, math.nan, math.nan, math.nan
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = t_ppf(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return m, sd, m - half, m + half


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float, int]:
    """Paired t-test of ``a - b``: ``(mean difference, t, two-sided p, n)``. With identical
    differences (sd 0) t is +-inf and p 0, or NaN and 1 when they are all 0; NaN below n = 2."""
    if len(a) != len(b):
        raise ValueError(f"paired_t: {len(a)} values against {len(b)}; pairs are needed")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    if n < 2:
        return (d[0] if d else math.nan), math.nan, math.nan, n
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    if sd == 0:
        return m, (math.copysign(math.inf, m) if m else math.nan), (0.0 if m else 1.0), n
    t = m / (sd / math.sqrt(n))
    p = 2.0 * (1.0 - t_cdf(abs(t), n - 1))
    return m, t, p, n
