"""Confidence bounds and the certificate arithmetic shared by CERTIFY, PREDICT and the pairing plan.

Every function here is pure (numbers in, numbers out), so the guarantee of each certificate can be
read and tested without a model.
"""
from __future__ import annotations

import math
from typing import Tuple

from scipy.stats import norm
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


def radius_from_p(p_lower: float, sigma: float) -> float:
    """R = sigma * PhiInv(p_A_lower)."""
    return float(sigma * norm.ppf(p_lower))


def eliminated_count(n_A: int, K_A: int, M: int, alpha_1: float, exact: int = 0) -> Tuple[float, int]:
    """Steps 3-4 of the correlation-eliminated certificate.

    Args:
        n_A: estimation samples whose SRS prediction is c_A.
        K_A: paired samples among the n_A - exact unchecked ones (a uniform subsample of those, see
            ``SRS.pairing``).
        M: pairs among the K_A whose standard prediction is not c_A.
        alpha_1: failure probability spent on the misalignment bound.
        exact: samples among the n_A whose prediction *is* the standard model's (rows the chain
            re-solved with the standard model, ``SRSConfig.refine_margin``): they cannot be misaligned,
            so only the other n_A - exact need the bound.

    Returns:
        (p_m_upper, N_A_E): the one-sided (1 - alpha_1) Clopper-Pearson upper bound on the misaligned
        fraction M / K_A of the unchecked samples (1 when K_A = 0), and
        N_A_E = exact + floor((n_A - exact) (1 - p_m_upper)), a count that with probability
        >= 1 - alpha_1 is at most the number of the n i.i.d. standard predictions equal to c_A.
    """
    p_m_upper = upper_confidence_bound(M, K_A, alpha_1)
    return p_m_upper, int(exact) + int(math.floor((n_A - exact) * (1.0 - p_m_upper)))


def eliminated_p_lower(n_A: int, n: int, K_A: int, M: int, alpha: float, exact: int = 0,
                       looks: int = 1) -> Tuple[float, int, float]:
    """The whole eliminated certificate with the reference split alpha_1 = alpha_2 = alpha / 2.

    Args:
        looks: the misalignment bound may be read at this many pair counts fixed in advance (the
            second look of ``SRSConfig.second_look``); each look's bound is then taken at
            alpha_1 / looks, so by the union bound all of them hold at once with probability
            >= 1 - alpha_1, whichever look is reported.

    Returns:
        (p_m_upper, N_A_E, p_A_lower), p_A_lower being the (1 - alpha/2) lower bound of N_A_E / n.
    """
    p_m_upper, n_a_e = eliminated_count(n_A, K_A, M, alpha / 2 / looks, exact)
    return p_m_upper, n_a_e, lower_confidence_bound(n_a_e, n, alpha / 2)


__all__ = ["lower_confidence_bound", "upper_confidence_bound", "radius_from_p", "eliminated_count",
           "eliminated_p_lower"]
