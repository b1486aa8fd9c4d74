"""The smoothed classifier: CERTIFY and PREDICT (Cohen et al. 2019), standard or serialized (SRS).

:class:`Smooth` works for any images -> logits module.  Standard mode certifies the smoothed f_D (every copy
solved from zeros); SRS mode certifies the same f_D with the correlation-eliminated certificate (:mod:`SRS.pairing`
holds the soundness summary, docs/guarantees.md the argument).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Tuple

import numpy as np
import torch

from .certificates import (Certificate, Prediction, binomial_decision, bound_eliminated, bound_standard, decide,
                           eliminate_top_count, record_cost)
from .pairing import (PairPlan, escape_alpha, escape_pays, image_route, pair_cap, plan_pairs, radii_z,
                      second_look_pays)
from DEQ.interface import is_deq

from .sampling import (ABSTAIN, PhaseLog, SampleStats, SRSChain, StandardSolver, draw_counts, ensure_generator,
                       regenerate, safe_argmax, side_stream)
from .settings import DEQSolve, SRSConfig


class Smooth:
    """A smoothed classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I).

    Guarantee (Cohen et al. 2019): if ``certify`` returns (c, R), c != ABSTAIN, then w.p. >= 1 - alpha over its
    noise, g(x + d) = c for every ||d||_2 < R, g being the smoothed *standard* classifier (``base_classifier``,
    or a DEQ solved from zeros with ``standard``); in SRS mode too, with any pairing and the fallback (the
    eliminated certificate only claims radii for the standard model; docs/guarantees.md).  ``predict`` returns
    a class other than g(x) w.p. at most alpha.

    Args:
        base_classifier: images -> logits (a :class:`DEQ.interface.DEQClassifier` for DEQ settings).
        num_classes, sigma (pixel units); standard: the standard DEQ solve; srs: SRS settings or None.
    """

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float,
                 standard: Optional[DEQSolve] = None, srs: Optional[SRSConfig] = None):
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma
        self.is_deq = is_deq(base_classifier)
        if srs is not None and not self.is_deq:
            raise ValueError("SRS needs a DEQ base classifier (a model with a .solve method)")
        self.standard = (standard or DEQSolve()) if self.is_deq else None  # plain modules: their forward
        self.srs = srs
        self._standard = StandardSolver(base_classifier, self.standard)

    def with_sigma(self, sigma: float) -> "Smooth":
        """The same base classifier and settings smoothed at another noise level."""
        return Smooth(self.base_classifier, self.num_classes, sigma, self.standard, self.srs)

    # ----------------------------------------------------------- public API
    def sample_counts(self, x: torch.Tensor, num: int, batch_size: int, generator: Optional[torch.Generator] = None,
                      stats: Optional[SampleStats] = None) -> Tuple[np.ndarray, int]:
        """Class counts of ``num`` noisy copies of x, sampled as this classifier samples: the standard
        model, or in SRS mode a fresh chain (warm-up first) without pairs.  No certificate: for
        searches and estimates (QCRS).

        Args:
            x: (C, H, W) or (1, C, H, W) input.
            stats: accumulates cost and residuals if given.

        Returns:
            (counts per class, samples with non-finite logits).
        """
        self.base_classifier.eval()
        x = x.unsqueeze(0) if x.dim() == 3 else x
        generator = ensure_generator(generator, x.device)
        stats = SampleStats() if stats is None else stats
        chain = SRSChain(self.base_classifier, self.srs) if self.srs is not None else None
        return self._phase(x, num, batch_size, generator, stats, chain).numpy()

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: Optional[torch.Generator] = None) -> Certificate:
        """CERTIFY: guess c_A from n0 samples, bound p_A from n fresh samples, return (c_A, R).

        Standard mode: p_A_lower = Clopper-Pearson lower bound of n_A / n at level alpha.  SRS mode: the
        correlation-eliminated certificate (N_A_E = floor(N_A (1 - p_m_upper)), p_m_upper at alpha / 2 from K_A
        uniform pairs, p_A_lower of N_A_E / n at alpha / 2; union bound: level alpha), or with ``fallback``
        ordinary CERTIFY on fresh noise, decided before the estimation samples (``route='fallback'``, level
        alpha) or after the first look of pairs (``route='escape'``: the SRS certificate then runs at
        (1 - ESCAPE_SHARE) alpha and the escape at ESCAPE_SHARE alpha, ``SRS.pairing.escape_pays``); argument:
        docs/guarantees.md.  Abstains (ABSTAIN, 0.0) when p_A_lower < 1/2 or a solve diverged or gave
        non-finite logits.

        Args:
            x: (C, H, W) or (1, C, H, W); n0, n: selection and estimation samples; alpha: failure probability.
            batch_size: samples per mini-batch; generator: the noise stream (None: fresh from the global RNG).

        Returns:
            :class:`SRS.certificates.Certificate`, which unpacks as (prediction, radius).
        """
        self.base_classifier.eval()
        x = x.unsqueeze(0) if x.dim() == 3 else x
        generator = ensure_generator(generator, x.device)
        stats, srs = SampleStats(), self.srs
        chain = SRSChain(self.base_classifier, srs) if srs is not None else None
        sel, bad0 = self._phase(x, n0, batch_size, generator, stats, chain).numpy()
        c_hat = int(sel.argmax())
        route, warm, log, escape = "standard", 0, None, 0.0
        if srs is not None:
            escape = escape_alpha(srs, alpha)
            estimation_chain = chain if srs.chain_across_phases else chain.restart()
            warm = estimation_chain.warmup_rows(n, batch_size)
            route, rate = self._route(x, sel, c_hat, n0, n, alpha - escape, batch_size, generator, stats, chain,
                                      warm)
            chain = estimation_chain
            log = PhaseLog() if route == "srs" and srs.corrected else None
        counts, bad1 = self._phase(x, n, batch_size, generator, stats, chain if route == "srs" else None,
                                   log).numpy()
        cert = Certificate(ABSTAIN, 0.0, n_A=int(counts[c_hat]), n=n, counts=counts, route=route)
        if bad0 or bad1:
            cert.status = f"nonfinite_logits({bad0 + bad1})"
        elif log is not None:
            level = alpha - escape
            exact = exact_mask(log, srs)
            with stats.planning():
                plan = plan_pairs(srs, log.preds(), c_hat, n, cert.n_A, level, generator,
                                  pair_cap(srs, self.standard, n, warm, refine_rate=rate), exact, self.sigma)
            K, K_A, M, escaped = self._pairs(x, log, plan, c_hat, cert.n_A, n, level, batch_size, stats,
                                             escape_level=escape)
            if escaped:
                cert = self._escape(x, c_hat, n, escape, batch_size, generator, stats)
                cert.K, cert.K_A, cert.M = K, K_A, M
            else:
                bound_eliminated(cert, K, K_A, M, level, srs.certificate, plan.exact, plan.looks)
        else:
            bound_standard(cert, alpha)
        decide(cert, c_hat, self.sigma)
        return record_cost(cert, stats)

    def certify_sequential(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                           radii, generator: Optional[torch.Generator] = None) -> Certificate:
        """Sequential CERTIFY for a certified-accuracy table at ``radii``: the estimation samples stop at
        the first look (fixed in advance) where no table threshold lies between the anytime-valid bounds,
        or at n; same guarantee as :meth:`certify` (level alpha).  See :mod:`SRS.sequential`."""
        from .sequential import certify_sequential
        return certify_sequential(self, x, n0, n, alpha, batch_size, radii, generator)

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: Optional[torch.Generator] = None) -> Prediction:
        """PREDICT: two-sided binomial test of the top two counts; ABSTAIN if p-value > alpha.

        SRS mode: the top count is corrected as in certify (n1_E = floor(n1 (1 -
        p_m_upper)), the discarded n1 - n1_E counted for the runner-up) and the test
        runs at alpha / 2, the misalignment bound taking the other alpha / 2.  The
        pairs are a uniform subsample of the samples predicting the top class;
        adaptive pairing sizes them with the certify rule applied to n1 (no fallback, one look:
        ``second_look`` belongs to CERTIFY).

        Args: as :meth:`certify`, with n samples in one phase.

        Returns:
            :class:`SRS.certificates.Prediction` (``int()`` of it is the class or ABSTAIN).
        """
        self.base_classifier.eval()
        x = x.unsqueeze(0) if x.dim() == 3 else x
        generator = ensure_generator(generator, x.device)
        stats, srs = SampleStats(), self.srs
        chain = SRSChain(self.base_classifier, srs) if srs is not None else None
        log = PhaseLog() if srs is not None and srs.corrected else None
        counts, bad = self._phase(x, n, batch_size, generator, stats, chain, log).numpy()
        top2 = counts.argsort()[::-1][:2]
        top = int(top2[0])
        out = Prediction(ABSTAIN, int(counts[top]), int(counts[top2[1]]))
        n1, n2, level = out.n1, out.n2, alpha
        if log is not None and not bad:
            with stats.planning():
                plan = plan_pairs(replace(srs, second_look=0.0), log.preds(), top, n, out.n1, alpha, generator,
                                  pair_cap(srs, self.standard, n, 0, use_budget=False), exact_mask(log, srs),
                                  self.sigma)
            M = self._misaligned(x, log, plan.positions, top, batch_size, stats)
            n1, n2, level = eliminate_top_count(out, plan.K, plan.K_A, M, alpha, plan.exact)
        out.nfe, out.std_calls, out.refined = stats.nfe_per_sample, stats.std_calls, stats.refined
        out.planner_seconds = stats.planner_seconds
        if bad:
            out.status = f"nonfinite_logits({bad})"
            return out
        return binomial_decision(out, top, n1, n2, level)

    def base_predict(self, x: torch.Tensor) -> torch.Tensor:
        """The standard base classifier's predictions on the batch ``x`` (no noise; ABSTAIN for
        non-finite logits or a diverged solve).

        Args:
            x: (B, C, H, W) inputs.

        Returns:
            (B,) classes.
        """
        self.base_classifier.eval()
        with torch.no_grad():
            return safe_argmax(self._standard(x, SampleStats()))

    # ------------------------------------------------------------- internals
    def _phase(self, x, num: int, batch_size: int, generator, stats: SampleStats, chain: Optional[SRSChain],
               log: Optional[PhaseLog] = None):
        """One phase of ``num`` samples through the chain, or the standard model if ``chain`` is None.

        With ``refine_margin`` > 0 the chain's low-margin samples are re-solved by the standard model
        after the pass (:meth:`_refine`): the phase's counts and ``log`` then hold those exact predictions."""
        if chain is None:
            def classify(noisy):
                return self._standard(noisy, stats)
        else:
            def classify(noisy):
                return chain(noisy, stats)
        margin = self.srs.refine_margin if chain is not None else 0.0
        if margin > 0 and log is None:
            log = PhaseLog()
        counts = draw_counts(x, num, batch_size, self.sigma, generator, classify, self.num_classes, log, margin)
        if margin > 0:
            self._refine(x, log, counts, batch_size, stats)
        return counts

    def _route(self, x, sel: np.ndarray, c_hat: int, n0: int, n: int, alpha: float, batch_size: int,
               generator: torch.Generator, stats: SampleStats, chain: SRSChain, warm: int) -> Tuple[str, float]:
        """('srs' or 'fallback', the refined fraction of the samples the decision saw).

        The selection samples decide (``SRS.pairing.image_route``); where ``route_pilot`` > 0 and they do not
        clearly send the image to SRS (``final=False``: at most ``ROUTE_LOSS_BEFORE_PILOT`` of the prediction
        out of the pairs' reach), ceil(route_pilot * n) further SRS samples on a stream of their own
        (``derived_seed(seed, 'route_pilot')``) refine the decision.  Pilot samples enter no certificate.
        Soundness: the decision is a function of selection and pilot noise only, independent of the samples
        either branch certifies with, so each branch fails w.p. <= alpha given it (docs/guarantees.md); a pilot
        chain state that warm-starts the estimation chain leaves its predictions functions of the noise.
        """
        srs = self.srs
        k, seen, rate = int(sel[c_hat]), n0, (stats.refined / n0 if n0 else 0.0)
        size = math.ceil(srs.route_pilot * n)
        with stats.planning():
            route = image_route(srs, self.standard, k, seen, n, alpha, warm, rate, self.sigma, final=size <= 0)
        if route == "srs" or size <= 0:
            return route, rate
        pilot_gen = side_stream(generator, "route_pilot")
        margin = srs.refine_margin
        log = PhaseLog() if margin > 0 else None
        pilot_stats = SampleStats()
        pilot = draw_counts(x, size, batch_size, self.sigma, pilot_gen,
                            lambda noisy: chain(noisy, pilot_stats), self.num_classes, log, margin).numpy()[0]
        stats.add_cost(pilot_stats)
        stats.pilot += size
        flagged = int(log.flagged().numel()) if log is not None else 0
        k, seen = k + int(pilot[c_hat]), n0 + size
        rate = (stats.refined + flagged) / seen
        with stats.planning():
            route = image_route(srs, self.standard, k, seen, n, alpha, warm, rate, self.sigma)
        return route, rate

    def _refine(self, x, log: PhaseLog, counts, batch_size: int, stats: SampleStats) -> None:
        """Re-solve the flagged samples with the standard model (regenerated noise, full batches) and
        replace their predictions, in ``log`` and in ``counts``, by the standard model's.

        Soundness: the chain's prediction at a flagged position becomes f_D's own prediction on the
        same noise; which positions are flagged is a function of the noise and the chain.  So the SRS
        predictions are still functions of the noise (the pairing argument of ``SRS.pairing`` holds
        unchanged), and the flagged samples are known not to be misaligned (``log.exact()``)."""
        positions = log.flagged()
        if positions.numel() == 0:
            return
        old = log.preds()[positions.to(x.device)]
        new = []
        with torch.no_grad():
            for chunk in regenerate(x, self.sigma, log, positions, batch_size):
                new.append(safe_argmax(self._standard(chunk, stats, paired=True)))
        new = torch.cat(new)
        stats.refined += int(positions.numel())
        counts.replace(old, new)
        log.replace(positions, new)

    def _pairs(self, x, log: PhaseLog, plan: PairPlan, c_hat: int, n_A: int, n: int, alpha: float, batch_size: int,
               stats: SampleStats, p_level: Optional[float] = None,
               escape_level: float = 0.0) -> Tuple[int, int, int, bool]:
        """(K, K_A, M, escaped) of ``plan``'s pairs: the first look solved, its second look too where the first
        found a misaligned pair and the second can still raise the table row (``SRS.pairing.second_look_pays``).
        With ``escape_level`` > 0, escaped is True (and no second look solved) where the first look's
        misalignment makes the escape to ordinary CERTIFY pay (``SRS.pairing.escape_pays``)."""
        M = self._misaligned(x, log, plan.positions, c_hat, batch_size, stats)
        K, K_A = plan.K, plan.K_A
        if M == 0:
            return K, K_A, M, False
        radii = radii_z(self.srs, self.sigma)
        with stats.planning():
            escaped = escape_pays(plan, M, n_A, n, alpha, escape_level, radii, p_level)
            more = not escaped and second_look_pays(plan, M, n_A, n, alpha, radii, p_level)
        if more:
            M += self._misaligned(x, log, plan.more, c_hat, batch_size, stats)
            K, K_A = plan.with_second_look()
        return K, K_A, M, escaped

    def _escape(self, x, c_hat: int, n: int, level: float, batch_size: int, generator: torch.Generator,
                stats: SampleStats) -> Certificate:
        """Ordinary CERTIFY's estimation for an SRS-route image that escapes (``SRS.pairing.escape_pays``): n
        standard samples on a stream of their own (``derived_seed(seed, 'escape')``), bounded at ``level``.
        Their evaluations count toward the image's cost like the pilot's, not as samples of the certificate's
        N0 + N.  Soundness: the noise is independent of everything that decided the escape (docs/guarantees.md)."""
        own = SampleStats()
        counts, bad = draw_counts(x, n, batch_size, self.sigma, side_stream(generator, "escape"),
                                  lambda noisy: self._standard(noisy, own), self.num_classes).numpy()
        stats.add_cost(own)
        cert = Certificate(ABSTAIN, 0.0, n_A=int(counts[c_hat]), n=n, counts=counts, route="escape")
        if bad:
            cert.status = f"nonfinite_logits({bad})"
        else:
            bound_standard(cert, level)
        return cert

    def _misaligned(self, x, log: PhaseLog, positions: torch.Tensor, c_hat: int, batch_size: int,
                    stats: SampleStats) -> int:
        """M: paired positions (sorted, all in A) whose standard prediction is not c_hat.

        The paired noisy inputs are regenerated from the recorded generator states and solved by the
        standard model in full mini-batches of ``batch_size`` rows: ceil(K_A / batch_size) calls."""
        if positions.numel() == 0:
            return 0
        misaligned = torch.zeros((), dtype=torch.long, device=x.device)
        with torch.no_grad():
            for chunk in regenerate(x, self.sigma, log, positions, batch_size):
                std = safe_argmax(self._standard(chunk, stats, paired=True))
                misaligned += (std != c_hat).sum()
        return int(misaligned)


def exact_mask(log: PhaseLog, srs: SRSConfig) -> Optional[torch.Tensor]:
    """The positions whose prediction is the standard model's own (re-solved), for the 'eliminated'
    certificate; None otherwise (the reference variant pairs over all of A, as its code does)."""
    return log.exact() if srs.certificate == "eliminated" else None


__all__ = ["ABSTAIN", "Smooth"]
