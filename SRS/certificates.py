"""What CERTIFY and PREDICT return, and the arithmetic that turns counts into them.

* standard: p_A_lower = Clopper-Pearson lower bound of n_A / n at level alpha (Cohen et al. 2019);
* SRS, correlation eliminated (Gao et al. 2024): the n_A SRS counts are corrected by the
  misalignment bound of the K_A paired standard solves (``SRS.bounds.eliminated_p_lower``), or by
  the reference code's weaker variant;
* either way: predict c_A with radius sigma PhiInv(p_A_lower) when p_A_lower >= 1/2, else abstain.

PREDICT: two-sided binomial test of the top two counts; in SRS mode the top count is corrected by
the same misalignment bound (``SRS.bounds.eliminated_count``) first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Tuple

import numpy as np
from scipy.stats import binomtest

from .bounds import (eliminated_count, eliminated_p_lower, lower_confidence_bound, radius_from_p,
                     upper_confidence_bound)


@dataclass
class Certificate:
    """Result of CERTIFY.  Unpacks as (prediction, radius), like locuslab/smoothing's Smooth.certify."""
    prediction: int
    radius: float
    n_A: int = 0                    # estimation samples predicting c_A (SRS predictions in SRS mode)
    n: int = 0
    p_A_lower: float = 0.0
    p_m_upper: float = float("nan")  # SRS: upper bound on the misalignment rate
    N_A_E: float = float("nan")      # SRS: conservative count of f_D predicting c_A
    K: int = 0                       # positions of the uniform pairing order scanned
    K_A: int = 0                     # pairs whose SRS prediction is c_A (each solved by f_D)
    M: int = 0                       # ... of which f_D disagrees
    nfe: float = 0.0                 # evaluations of f per noisy sample (all phases, pairs included)
    residual: float = float("nan")   # mean final solver residual
    status: str = "ok"
    route: str = "standard"          # standard | srs | fallback (SRS selection, standard estimation) | escape
    std_calls: int = 0               # solver calls of the standard model (pairs, fallback, standard mode)
    std_rows: int = 0                # samples solved by the standard model (pairs, refinement, fallback)
    refined: int = 0                 # SRS samples re-solved by the standard model (low margin, refine_margin)
    pilot: int = 0                   # SRS samples of the route pilot (route_pilot; in no certificate)
    looks: int = 1                   # looks at the misalignment bound planned (second_look)
    samples: int = 0                 # sequential CERTIFY: noisy samples drawn (selection + estimation up to the stop)
    stop: str = ""                   # sequential CERTIFY: why sampling stopped (``SRS.sequential``)
    planner_seconds: float = 0.0     # CPU time of the pairing planner (no column: ``SRS.results.PLANNER``)
    counts: Optional[np.ndarray] = field(default=None, repr=False)

    def __iter__(self) -> Iterator:
        return iter((self.prediction, self.radius))


@dataclass
class Prediction:
    """Result of PREDICT.  ``int(p)`` is the prediction (ABSTAIN = -1)."""
    prediction: int
    n1: int = 0
    n2: int = 0
    pvalue: float = 1.0
    p_m_upper: float = float("nan")
    nfe: float = 0.0
    status: str = "ok"
    K: int = 0
    K_A: int = 0
    M: int = 0
    std_calls: int = 0
    refined: int = 0
    planner_seconds: float = 0.0     # CPU time of the pairing planner (no column: ``SRS.results.PLANNER``)

    def __int__(self):
        return self.prediction


def bound_standard(cert: Certificate, alpha: float) -> None:
    """Standard CERTIFY (and the fallback route): p_A_lower of n_A / n at level alpha."""
    cert.p_A_lower = lower_confidence_bound(cert.n_A, cert.n, alpha)


def bound_eliminated(cert: Certificate, K: int, K_A: int, M: int, alpha: float, variant: str = "eliminated",
                     exact: int = 0, looks: int = 1, alpha_2: Optional[float] = None) -> None:
    """SRS CERTIFY: correct n_A by the misalignment of the K_A pairs (M misaligned), then bound.

    Args:
        exact: samples of the n_A re-solved by the standard model (never misaligned; the pairs come
            from the others, see ``SRS.bounds.eliminated_count``).  'eliminated' only.
        looks: looks at the misalignment bound planned (``SRS.bounds.eliminated_p_lower``); 'eliminated' only.
        alpha_2: level of the p_A bound if not alpha / 2 (sequential CERTIFY's share at its stopping
            look, ``SRS.bounds.eliminated_p_lower``); 'eliminated' only.
        variant: 'eliminated' (sound: alpha / 2 for the misalignment bound, alpha / 2 for
            p_A_lower, see ``SRS.bounds.eliminated_p_lower``) or 'reference' (the reference code's
            weaker variant: Clopper-Pearson of (n_A r) / (n r), r = 1 - p_m_upper).
    """
    cert.K, cert.K_A, cert.M = K, K_A, M
    cert.looks = looks if variant == "eliminated" else 1
    if variant == "reference":
        cert.p_m_upper = upper_confidence_bound(M, K_A, alpha / 2)
        r = 1.0 - cert.p_m_upper
        cert.N_A_E = cert.n_A * r
        cert.p_A_lower = lower_confidence_bound(cert.n_A * r, cert.n * r, alpha / 2) if r > 0 else 0.0
    else:
        cert.p_m_upper, n_a_e, cert.p_A_lower = eliminated_p_lower(cert.n_A, cert.n, K_A, M, alpha, exact, looks,
                                                                         alpha_2)
        cert.N_A_E = float(n_a_e)


def decide(cert: Certificate, c_hat: int, sigma: float) -> Certificate:
    """Predict c_hat with radius sigma PhiInv(p_A_lower) if the status is ok and p_A_lower >= 1/2."""
    if cert.status == "ok" and cert.p_A_lower >= 0.5:
        cert.prediction, cert.radius = c_hat, radius_from_p(cert.p_A_lower, sigma)
    elif cert.status == "ok":
        cert.status = "abstain_pA_below_half"
    return cert


def record_cost(cert: Certificate, stats) -> Certificate:
    """Copy what sampling the image cost (an ``SRS.sampling.SampleStats``) into ``cert``."""
    cert.nfe, cert.residual = stats.nfe_per_sample, stats.mean_residual
    cert.std_calls, cert.std_rows, cert.refined = stats.std_calls, stats.std_rows, stats.refined
    cert.pilot, cert.planner_seconds = stats.pilot, stats.planner_seconds
    return cert


def eliminate_top_count(out: Prediction, K: int, K_A: int, M: int, alpha: float, exact: int = 0) -> Tuple[int, int, float]:
    """SRS PREDICT: the eliminated top count at alpha / 2, the discarded part counted for the runner-up.

    ``exact``: samples of the top count re-solved by the standard model (see ``SRS.bounds.eliminated_count``).

    Records K, K_A, M and p_m_upper in ``out`` (whose n1, n2 stay the raw SRS counts).

    Returns:
        (n1_E, n2 + n1 - n1_E, alpha / 2): the counts and the level left for the test.
    """
    out.K, out.K_A, out.M = K, K_A, M
    out.p_m_upper, n1_e = eliminated_count(out.n1, K_A, M, alpha / 2, exact)
    return n1_e, out.n2 + (out.n1 - n1_e), alpha / 2


def binomial_decision(out: Prediction, top: int, n1: int, n2: int, level: float) -> Prediction:
    """Two-sided binomial test of n1 against n2 at ``level``: predict ``top`` or abstain.

    ``top`` is predicted only when n1 > n2: after the SRS correction n1 may fall below n2, and a
    significant test in the runner-up's favour is no evidence for ``top``."""
    out.pvalue = float(binomtest(n1, n1 + n2, p=0.5).pvalue) if n1 + n2 > 0 else 1.0
    if out.pvalue <= level and n1 > n2:
        out.prediction = top
    else:
        out.status = "abstain_test"
    return out


__all__ = ["Certificate", "Prediction", "bound_standard", "bound_eliminated", "decide", "record_cost", "eliminate_top_count",
           "binomial_decision"]
