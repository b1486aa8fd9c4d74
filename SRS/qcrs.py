"""QCRS: input-specific noise level by quasiconcave search (Kung & Chen, AAAI 2024).

A bisection on sign(R_hat(s + h) - R_hat(s - h)) over [left, right] picks sigma(x) from search samples (seeded
streams of their own, common random numbers across probes); then the ordinary CERTIFY runs at sigma(x) on noise
independent of the search, and at sigma0 for the fixed-sigma row (the stream certify.py uses).  Guarantee: w.p.
>= 1 - alpha the returned class is g_{sigma(x)}(x) on the ball of the radius; the search spends no alpha.  NOT
guaranteed: the input-dependent classifier x' -> g_{sigma(x')}(x') is not certified (Sukenik et al. 2022); the
fixed-sigma certificate is the globally consistent one.  Algorithm, streams and caveat: docs/guarantees.md, "QCRS".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch

from DEQ.checks import check_number
from DEQ.errors import UserError

from .bounds import lower_confidence_bound, radius_from_p
from .certificates import Certificate
from .sampling import ABSTAIN, SampleStats, derived_seed
from .smooth import Smooth

DEFAULT_LEFT_RATIO, DEFAULT_RIGHT_RATIO = 0.25, 3.5


def check_search_settings(sigma0: float, left: float, right: float, epsilon: float, epsilon_step: float,
                          gradient_n: int) -> None:
    """One-line UserErrors for a bad search configuration.

    sigma0 must lie in [left, right], so best_sigma always does (sigma0 is a
    candidate: it is kept when it certifies the larger radius).  epsilon_step is
    any positive float, as in the reference (its paper runs use 0.2 - 0.8, i.e.
    probes wider than epsilon); a step below 2 loosens the epsilon accuracy."""
    for name, value in (("--sigma", sigma0), ("--left", left), ("--right", right), ("--epsilon", epsilon),
                        ("--epsilon_step", epsilon_step)):
        check_number(name, value)  # inf spent hundreds of samples per image on sigma = inf; nan slipped through
    if not left > 0:
        raise UserError(f"--left must be > 0 (a noise level), got {left}")
    if left > right:
        raise UserError(f"--left {left} is larger than --right {right}: give an interval left <= right")
    if not left <= sigma0 <= right:
        raise UserError(f"--sigma {sigma0} is outside [--left {left}, --right {right}]: widen the interval to contain it")
    if not epsilon > 0:
        raise UserError(f"--epsilon must be > 0, got {epsilon}")
    if not epsilon_step > 0:
        raise UserError(f"--epsilon_step must be > 0 (probe step h = epsilon / epsilon_step), got {epsilon_step}")
    if gradient_n < 1:
        raise UserError(f"--gradient_n must be >= 1, got {gradient_n}")


@dataclass(frozen=True)
class QCRSSettings:
    """The sigma search (flag names of the reference code's certify_qcrs.py).

    Attributes:
        sigma0: the fixed noise level (the base classifier's training noise), also certified.
        left, right: the interval searched (default 0.25 and 3.5 times sigma0, see :meth:`around`).
        epsilon: stop bisecting when the interval is this narrow.
        epsilon_step: finite-difference step h = epsilon / epsilon_step (>= 2 keeps the result within epsilon).
        gradient_n: noisy samples per radius estimate.
        n_select: samples that pick c_hat for the search (None: gradient_n).
    """
    sigma0: float
    left: float
    right: float
    epsilon: float = 0.01
    epsilon_step: float = 2.0
    gradient_n: int = 500
    n_select: Optional[int] = None

    @classmethod
    def around(cls, sigma0: float, left: Optional[float] = None, right: Optional[float] = None,
               **kwargs) -> "QCRSSettings":
        """Settings with the default interval [0.25 sigma0, 3.5 sigma0] where ``left``/``right`` are None."""
        return cls(sigma0, DEFAULT_LEFT_RATIO * sigma0 if left is None else left,
                   DEFAULT_RIGHT_RATIO * sigma0 if right is None else right, **kwargs)

    def validate(self) -> None:
        check_search_settings(self.sigma0, self.left, self.right, self.epsilon, self.epsilon_step, self.gradient_n)


def _generator(device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _clone(generator: torch.Generator, state: torch.Tensor) -> torch.Generator:
    g = torch.Generator(device=generator.device)
    g.set_state(state)
    return g


@dataclass
class SearchResult:
    """Outcome of the sigma search for one input."""
    best_sigma: float
    radius_at_best: float            # R_hat at best_sigma (a search estimate, not a certificate)
    samples_used: int                # noisy copies drawn by the search (selection + probes + comparison)
    evaluations: int                 # R_hat evaluations (two per finite difference, two for the comparison)
    candidate: float = float("nan")  # bisection result before the comparison with sigma0
    radius_at_sigma0: float = float("nan")
    kept_sigma0: bool = True
    c_hat: int = ABSTAIN
    nfe: float = 0.0                 # evaluations of f summed over the search's samples
    seconds: float = 0.0
    trace: List[Tuple[float, float, float]] = field(default_factory=list, repr=False)  # (sigma, R_hat(-), R_hat(+))


@dataclass
class QCRSResult:
    """CERTIFY at the searched sigma, CERTIFY at the fixed sigma0, and the search itself."""
    certificate: Certificate         # at best_sigma: the QCRS result
    fixed: Certificate               # at sigma0: the ordinary fixed-sigma certificate
    search: SearchResult
    sigma0: float
    certify_samples: int             # n0 + n of the QCRS certificate
    fixed_samples: int               # extra samples for the fixed certificate (0 when best_sigma == sigma0)
    certify_seconds: float = 0.0
    fixed_seconds: float = 0.0

    @property
    def best_sigma(self) -> float:
        return self.search.best_sigma

    @property
    def extra_samples(self) -> int:
        """Samples QCRS costs on top of a fixed-sigma CERTIFY (the search; the fixed comparison excluded)."""
        return self.search.samples_used

    def __iter__(self):
        return iter((self.certificate.prediction, self.certificate.radius))


class QCRS:
    """Input-specific sigma for a :class:`SRS.smooth.Smooth` (any classifier, DEQ standard mode, or SRS).

    See the module docstring for the algorithm, the noise streams and exactly what
    the certificate guarantees (and what it does not)."""

    def __init__(self, smooth: Smooth):
        self.smooth = smooth

    # ----------------------------------------------------------- search
    def radius_estimate(self, x: torch.Tensor, sigma: float, c_hat: int, num: int, alpha: float, batch_size: int,
                        generator: Optional[torch.Generator], stats: SampleStats) -> float:
        """R_hat(sigma) = sigma * PhiInv(LB(#c_hat / num, alpha)), 0 below 1/2 or on non-finite logits.

        Uses the smoothed classifier's own sampling (``Smooth.sample_counts``: the SRS chain in SRS
        mode, from a fresh warm-up, no pairs): an estimate to steer the search, not a certificate."""
        counts, bad = self.smooth.with_sigma(sigma).sample_counts(x, num, batch_size, generator, stats)
        if bad or c_hat == ABSTAIN:
            return 0.0
        p = lower_confidence_bound(int(counts[c_hat]), num, alpha)
        return radius_from_p(p, sigma) if p >= 0.5 else 0.0

    def search(self, x: torch.Tensor, settings: QCRSSettings, alpha: float, batch_size: int,
               generator: Optional[torch.Generator] = None) -> SearchResult:
        """Bisection on the sign of dR/dsigma over [left, right] (see the module docstring).

        Args:
            x: (C, H, W) or (1, C, H, W) input.
            settings: the search; validated here (one-line UserErrors).
            alpha: level of the radius estimates (they steer the search only).
            batch_size: noisy samples per mini-batch.
            generator: only read (its initial seed names the search streams), never advanced.

        Returns:
            :class:`SearchResult`.  With left == right == sigma0 no sample is drawn.
        """
        settings.validate()
        sigma0, gradient_n = settings.sigma0, settings.gradient_n
        t0 = time.perf_counter()
        self.smooth.base_classifier.eval()
        x = x.unsqueeze(0) if x.dim() == 3 else x
        seed = generator.initial_seed() if generator is not None else int(torch.randint(0, 2 ** 62, ()))
        device = x.device
        stats = SampleStats()
        h = settings.epsilon / settings.epsilon_step
        out = SearchResult(best_sigma=sigma0, radius_at_best=float("nan"), samples_used=0, evaluations=0)
        c_hat: Optional[int] = None

        def select() -> int:
            nonlocal c_hat
            if c_hat is None:
                counts, bad = self.smooth.with_sigma(sigma0).sample_counts(
                    x, settings.n_select or gradient_n, batch_size, _generator(device, derived_seed(seed, "qcrs:select")),
                    stats)
                c_hat = int(counts.argmax()) if counts.sum() > 0 else ABSTAIN
            return c_hat

        def r_hat(s: float) -> float:
            out.evaluations += 1
            return self.radius_estimate(x, s, select(), gradient_n, alpha, batch_size,
                                        _generator(device, derived_seed(seed, "qcrs:probe")), stats)

        direction = 0
        lo, hi = settings.left, settings.right
        while hi - lo > settings.epsilon:
            mid = (lo + hi) / 2
            s_minus = mid - h if mid - h > 0 else mid / 2
            r_minus, r_plus = r_hat(s_minus), r_hat(mid + h)
            out.trace.append((mid, r_minus, r_plus))
            grad = r_plus - r_minus
            if grad > 0 or (grad == 0 and direction < 0):
                lo, direction = mid, 1
            else:
                hi, direction = mid, -1
        candidate = (lo + hi) / 2
        out.candidate = candidate
        if candidate == sigma0:  # nothing to compare (radius_at_best stays NaN: not estimated)
            out.best_sigma, out.kept_sigma0 = sigma0, True
        else:
            r0, rc = r_hat(sigma0), r_hat(candidate)
            out.radius_at_sigma0 = r0
            out.kept_sigma0 = r0 >= rc
            out.best_sigma = sigma0 if out.kept_sigma0 else candidate
            out.radius_at_best = r0 if out.kept_sigma0 else rc
        out.c_hat = ABSTAIN if c_hat is None else c_hat
        out.samples_used, out.nfe = stats.samples, stats.nfe
        out.seconds = time.perf_counter() - t0
        return out

    # ----------------------------------------------------------- certify
    def certify(self, x: torch.Tensor, settings: QCRSSettings, n0: int, n: int, alpha: float, batch_size: int,
                generator: Optional[torch.Generator] = None) -> QCRSResult:
        """Search sigma, then CERTIFY at best_sigma and at sigma0 (noise streams: module docstring).

        The QCRS certificate holds w.p. >= 1 - alpha for g_{best_sigma} at x only;
        the fixed one w.p. >= 1 - alpha for g_{sigma0}.  Not a certificate of the
        input-dependent classifier x -> g_{sigma(x)}(x): see the module docstring.

        Args:
            x, settings, alpha, batch_size: as :meth:`search`.
            n0, n: CERTIFY's selection and estimation samples.
            generator: the image's noise stream (both certificates start from its state at entry).

        Returns:
            :class:`QCRSResult` (unpacks as the QCRS prediction and radius).
        """
        x = x.unsqueeze(0) if x.dim() == 3 else x
        if generator is None:
            generator = _generator(x.device, int(torch.randint(0, 2 ** 62, ())))
        state = generator.get_state()
        found = self.search(x, settings, alpha, batch_size, generator)
        sigma0 = settings.sigma0
        t0 = time.perf_counter()
        cert = self.smooth.with_sigma(found.best_sigma).certify(x, n0, n, alpha, batch_size,
                                                                generator=_clone(generator, state))
        t1 = time.perf_counter()
        if found.best_sigma == sigma0:
            fixed, fixed_samples = cert, 0
        else:
            fixed = self.smooth.with_sigma(sigma0).certify(x, n0, n, alpha, batch_size,
                                                           generator=_clone(generator, state))
            fixed_samples = n0 + n
        t2 = time.perf_counter()
        return QCRSResult(cert, fixed, found, sigma0, n0 + n, fixed_samples, t1 - t0, t2 - t1)


def bisection_steps(left: float, right: float, epsilon: float) -> int:
    """Finite differences the bisection takes on [left, right] (each costs 2 * gradient_n samples)."""
    steps, width = 0, right - left
    while width > epsilon:
        width /= 2
        steps += 1
    return steps


def expected_search_samples(sigma0: float, left: float, right: float, epsilon: float, gradient_n: int,
                            n_select: Optional[int] = None) -> int:
    """Upper bound on SearchResult.samples_used: selection + 2 per step + 2 for the comparison."""
    steps = bisection_steps(left, right, epsilon)
    if steps == 0 and (left + right) / 2 == sigma0:
        return 0
    return (n_select or gradient_n) + gradient_n * (2 * steps + 2)


__all__ = ["QCRS", "QCRSSettings", "QCRSResult", "SearchResult", "check_search_settings",
           "bisection_steps", "expected_search_samples", "DEFAULT_LEFT_RATIO", "DEFAULT_RIGHT_RATIO"]
