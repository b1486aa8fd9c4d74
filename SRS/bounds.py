"""Confidence bounds and the certificate arithmetic shared by CERTIFY, PREDICT and the pairing plan.

Every function here is pure (numbers in, numbers out), so the guarantee of each certificate can be
read and tested without a model.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence, Tuple

import numpy as np
from scipy.stats import beta, norm
from statsmodels.stats.proportion import proportion_confint


def lower_confidence_bound(k: float, n: float, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion k/n (0 if n = 0)."""
    if n <= 0:
        return 0.0
    return float(proportion_confint(k, n, alpha=2 * alpha, method="beta")[0])


def upper_confidence_bound(k: float, n: float, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion k/n (1 if n = 0)."""
    if n <= 0:
        return 1.0
    return float(proportion_confint(k, n, alpha=2 * alpha, method="beta")[1])


def lower_confidence_bounds(k, n, alpha: float) -> np.ndarray:
    """:func:`lower_confidence_bound` elementwise (``k`` array, ``n`` array or number, broadcast), equal to it bit
    for bit: the same scipy quantile ``beta.ppf(alpha, k, n - k + 1)`` with the same edge cases (0 where k = 0 or
    n <= 0).  Returns a float64 array."""
    k, n = np.broadcast_arrays(np.asarray(k), np.asarray(n))
    out = np.zeros(k.shape)
    ok = (n > 0) & (k != 0)
    if ok.any():
        out[ok] = beta.ppf(alpha, k[ok], n[ok] - k[ok] + 1)
    return out


def upper_confidence_bounds(k, n, alpha: float) -> np.ndarray:
    """:func:`upper_confidence_bound` elementwise, equal to it bit for bit (``beta.isf(alpha, k + 1, n - k)``
    on arrays; 1 where k = n or n <= 0).  Arguments and result as :func:`lower_confidence_bounds`."""
    k, n = np.broadcast_arrays(np.asarray(k), np.asarray(n))
    out = np.ones(k.shape)
    ok = (n > 0) & (k != n)
    if ok.any():
        out[ok] = beta.isf(alpha, k[ok] + 1, n[ok] - k[ok])
    return out


def radius_from_p(p_lower: float, sigma: float) -> float:
    """R = sigma * PhiInv(p_A_lower)."""
    return float(sigma * norm.ppf(p_lower))


def eliminated_count(n_A: int, K_A: int, M: int, alpha_1: float, exact: int = 0) -> Tuple[float, int]:
    """Steps 3-4 of the correlation-eliminated certificate; return ``(p_m_upper, N_A_E)``.

    ``n_A``: estimation samples predicting c_A; ``exact`` of them re-solved with the standard model (never
    misaligned); ``K_A`` pairs, a uniform subsample of the other n_A - exact (``SRS.pairing``), ``M`` of them
    misaligned. p_m_upper is the one-sided (1 - alpha_1) Clopper-Pearson upper bound on M / K_A (1 when K_A = 0) and
    N_A_E = exact + floor((n_A - exact) (1 - p_m_upper)): with probability >= 1 - alpha_1 at most the number of the n
    i.i.d. standard predictions equal to c_A."""
    p_m_upper = upper_confidence_bound(M, K_A, alpha_1)
    return p_m_upper, int(exact) + int(math.floor((n_A - exact) * (1.0 - p_m_upper)))


def eliminated_p_lower(n_A: int, n: int, K_A: int, M: int, alpha: float, exact: int = 0,
                       looks: int = 1, alpha_2: Optional[float] = None) -> Tuple[float, int, float]:
    """The whole eliminated certificate, alpha_1 = alpha_2 = alpha / 2; return (p_m_upper, N_A_E, p_A_lower),
    p_A_lower the (1 - alpha_2) lower bound of N_A_E / n.

    ``looks``: pair counts fixed in advance at which the misalignment bound may be read (``second_look``), each at
    alpha_1 / looks, so all hold at once with probability >= 1 - alpha_1 whichever is reported.  ``alpha_2``: the p_A
    bound's level if not alpha / 2 (sequential certification: the stopping look's share, ``sequential_levels``)."""
    p_m_upper, n_a_e = eliminated_count(n_A, K_A, M, alpha / 2 / looks, exact)
    return p_m_upper, n_a_e, lower_confidence_bound(n_a_e, n, alpha / 2 if alpha_2 is None else alpha_2)


# ----------------------------------------------------------------------------- sequential certification
LAST_LOOK_SHARE = 0.8   # share of alpha spent at N (the rest is shared by the earlier looks)
EVEN_LOOKS = 10         # looks every ceil(N / 10) samples (whole mini-batches) once past the doubling
FUTILITY_LEVEL = 0.01   # level of the upper bound that stops an image for futility (steers stopping only)


def sequential_looks(N: int, batch: int) -> Tuple[int, ...]:
    """The estimation sample counts at which sequential CERTIFY looks, fixed before any sample is drawn.

    Each a whole number of mini-batches: doubling from one mini-batch (batch, 2 batch, 4 batch, ...) while
    below the step s = batch ceil(N / (10 batch)), then every s, and N itself last (N < batch: just N).  So at
    most about ten evenly spaced looks, plus the doubling ones where a mini-batch is smaller than s: ten for
    N = 10000, batch = 1000 (every 1000); eleven for batch 400 (400, 800, then every 1200)."""
    step = batch * math.ceil(N / (batch * EVEN_LOOKS))
    looks, n = [], batch
    while n < min(step, N):
        looks.append(n)
        n *= 2
    n = step
    while n < N:
        looks.append(n)
        n += step
    return tuple(looks) + (N,)


def sequential_levels(alpha: float, looks: int) -> Tuple[float, ...]:
    """How a failure probability ``alpha`` is split over ``looks`` looks (the union bound: they sum to alpha).

    ``LAST_LOOK_SHARE`` (0.8) of alpha goes to the last look (at N) and the rest is shared equally by the
    earlier ones: (0.2 alpha / (L - 1), ..., 0.2 alpha / (L - 1), 0.8 alpha); one look keeps all of alpha (the
    fixed-N certificate).  So the bound at N costs the same whatever L: level 0.8 alpha instead of alpha, e.g.
    for k = N: p_A_lower = (0.8 alpha)^(1/N) instead of alpha^(1/N)."""
    if looks <= 1:
        return (alpha,)
    last = alpha * LAST_LOOK_SHARE
    return ((alpha - last) / (looks - 1),) * (looks - 1) + (last,)


@lru_cache(maxsize=64)
def futility_targets(thresholds: Tuple[float, ...], N: int, level: float) -> Tuple[float, ...]:
    """Per table threshold t, the least proportion k / N whose (1 - level) lower bound at N reaches t (the
    count an image needs to certify t if it runs to N); 2.0 (unreachable) where even k = N falls short.

    Bisection on ``lower_confidence_bound`` itself, so the target agrees exactly with the bound the certificate
    uses.  Cached: every image of a run asks for the same targets (``thresholds`` must be a tuple, as
    ``table_thresholds`` returns)."""
    def least(t: float) -> float:
        if lower_confidence_bound(N, N, level) < t:
            return 2.0
        lo, hi = 0, N                     # lower bound(hi) >= t > lower bound(lo - 1): bisect on k
        while lo < hi:
            mid = (lo + hi) // 2
            if lower_confidence_bound(mid, N, level) >= t:
                hi = mid
            else:
                lo = mid + 1
        return lo / N
    return tuple(least(t) for t in thresholds)


def table_thresholds(radii: Sequence[float], sigma: float) -> Tuple[float, ...]:
    """The p_A values Phi(r / sigma) at which a certified-accuracy table at ``radii`` changes row, with
    1/2 (the abstain threshold, radius 0) always among them; sorted, without repeats."""
    return tuple(sorted({0.5} | {float(norm.cdf(r / sigma)) for r in radii}))


def row_decided(lower: float, upper: float, thresholds: Sequence[float],
                targets: Optional[Sequence[float]] = None) -> bool:
    """Whether every threshold t is settled: either t <= ``lower`` (its radius is certified from ``lower``) or
    ``upper`` < its target (more samples could not be expected to certify it).  ``targets``: per threshold,
    the proportion the bound at N would need (``futility_targets``); None: the thresholds themselves, i.e. no
    threshold strictly between ``lower`` and ``upper``."""
    targets = thresholds if targets is None else targets
    return not any(lower < t and upper >= target for t, target in zip(thresholds, targets))


__all__ = ["lower_confidence_bound", "upper_confidence_bound", "lower_confidence_bounds", "upper_confidence_bounds",
           "radius_from_p", "eliminated_count",
           "eliminated_p_lower", "sequential_looks", "sequential_levels", "futility_targets", "table_thresholds",
           "row_decided", "FUTILITY_LEVEL", "LAST_LOOK_SHARE"]
