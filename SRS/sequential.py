"""Sequential CERTIFY for a certified-accuracy table: each image stops sampling once its row is decided.

Looks at sample counts fixed before sampling (``SRS.bounds.sequential_looks``), a Clopper-Pearson lower bound of
k_j / n_j at each look's level alpha_j (``SRS.bounds.sequential_levels``: 0.8 alpha at N, the rest shared by the
earlier looks); stop when every table threshold is settled (``SRS.bounds.row_decided``): certified by the lower
bound, or futile, the (1 - ``FUTILITY_LEVEL``) upper bound lying below the proportion the bound at N would need
(``SRS.bounds.futility_targets``); or at N.  Certify with the stopping look's lower bound.  Guarantee: each k_j
is Binomial(n_j, p_A) given c_A, so by the union bound all lower bounds hold at once w.p. >= 1 - alpha, hence at
any stopping look; the upper bounds only steer stopping (spend no alpha: a wrong one stops an image early, with a
smaller radius, never a larger one).  The label never enters the rule.  Sequential SRS adds the pairing argument
at alpha_1 = alpha / 2 and the looks at alpha_2 = alpha / 2 (needs the 'eliminated' certificate, no
``refine_margin``); it stops before N only where the pairs it would plan can carry the eliminated bound to the
decided row (``row_reachable``).  With the escape (``SRS.pairing.escape_alpha``) the SRS route runs at
(1 - ESCAPE_SHARE) alpha and an image that escapes after its first look of pairs gets sequential CERTIFY of the
standard model at ESCAPE_SHARE alpha on noise of its own.  Full argument and the price against fixed N:
docs/guarantees.md, "Sequential CERTIFY".
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import torch

from .bounds import (FUTILITY_LEVEL, futility_targets, lower_confidence_bound, row_decided, sequential_levels,
                     sequential_looks, table_thresholds, upper_confidence_bound)
from .certificates import Certificate, bound_eliminated, bound_standard, decide, record_cost
from .pairing import escape_alpha, pair_cap, pairs_needed, plan_pairs, radii_pair_count, radii_z, route_costs
from .sampling import ABSTAIN, PhaseLog, SampleStats, SRSChain, draw_counts, ensure_generator, side_stream

STOP_DECIDED = "decided"      # no table threshold between the bounds at a look before N
STOP_N = "N"                  # reached N (the last look)
STOP_NONFINITE = "nonfinite"  # a sample had non-finite logits (the image abstains)
STOP_REASONS = (STOP_DECIDED, STOP_N, STOP_NONFINITE)


def check_sequential_srs(srs) -> None:
    """ValueError unless sequential CERTIFY can certify with the SRS configuration ``srs`` (None: standard)."""
    if srs is None:
        return
    if srs.certificate != "eliminated":
        raise ValueError("sequential SRS certification needs the 'eliminated' certificate")
    if srs.refine_margin > 0:
        raise ValueError("sequential SRS certification does not re-solve low-margin samples (refine_margin 0)")


def certify_sequential(smooth, x: torch.Tensor, n0: int, N: int, alpha: float, batch_size: int,
                       radii: Sequence[float], generator: Optional[torch.Generator] = None) -> Certificate:
    """Sequential CERTIFY of ``smooth`` (an :class:`SRS.smooth.Smooth`) for a table at ``radii``.

    Args:
        x: (C, H, W) or (1, C, H, W) input.
        n0: selection samples; N: most estimation samples; alpha: failure probability.
        batch_size: noisy samples per mini-batch; the looks are at ``sequential_looks(N, batch_size)``.
        radii: the table's radii (pixel units, >= 0).
        generator: the noise stream (a fresh one from the global RNG if None).

    Returns:
        :class:`SRS.certificates.Certificate` with ``n`` the estimation samples drawn up to the stop,
        ``samples`` = n0 + n, and ``stop`` one of :data:`STOP_REASONS`.  Guarantee (module docstring):
        a certificate (c, R) with c != ABSTAIN is wrong (c not g(x), or some ||d|| < R with
        g(x + d) != c) with probability at most alpha.
    """
    srs = smooth.srs
    check_sequential_srs(srs)
    if srs is not None and srs.radii is None and srs.radius_slack is None:
        srs = replace(srs, radii=tuple(radii))  # adaptive pairs aim at this table (the CLI's --radii is both)
        smooth = type(smooth)(smooth.base_classifier, smooth.num_classes, smooth.sigma, smooth.standard, srs)
    smooth.base_classifier.eval()
    x = x.unsqueeze(0) if x.dim() == 3 else x
    generator = ensure_generator(generator, x.device)
    stats = SampleStats()
    chain = SRSChain(smooth.base_classifier, srs) if srs is not None else None
    sel, bad = smooth._phase(x, n0, batch_size, generator, stats, chain).numpy()
    c_hat = int(sel.argmax())
    route, escape = "standard", 0.0
    looks = sequential_looks(N, batch_size)
    warm = {}
    if srs is not None:
        escape = escape_alpha(srs, alpha)
        estimation_chain = chain if srs.chain_across_phases else chain.restart()
        warm = {n_j: estimation_chain.warmup_rows(n_j, batch_size) for n_j in looks}
        route, _ = smooth._route(x, sel, c_hat, n0, N, alpha - escape, batch_size, generator, stats, chain, warm[N])
        chain = estimation_chain
    on_srs = route == "srs"
    level_srs = alpha - escape
    levels = sequential_levels(level_srs / 2 if on_srs else alpha, len(looks))
    settled = _table_rule(radii, smooth.sigma, N, levels)
    log = PhaseLog() if on_srs else None
    if on_srs:
        def classify(noisy):
            return chain(noisy, stats)
    else:
        def classify(noisy):
            return smooth._standard(noisy, stats)

    def decided(n_A: int, n: int, level: float) -> bool:
        """Every table threshold certified at ``level`` or futile; on the SRS route also within reach of the
        correction."""
        if not settled(n_A, n, level):
            return False
        if not on_srs:
            return True
        with stats.planning():
            return row_reachable(srs, smooth.standard, n_A, n, level_srs, level, warm[n], smooth.sigma)

    counts, drawn, stop, level, bad = _draw_until_decided(smooth, x, c_hat, N, batch_size, generator, classify,
                                                          looks, levels, decided, log, bad)
    cert = Certificate(ABSTAIN, 0.0, n_A=int(counts[c_hat]), n=drawn, counts=counts, route=route,
                       samples=n0 + drawn, stop=stop)
    if bad:
        cert.status = f"nonfinite_logits({bad})"
    elif on_srs:
        cert = _pair_and_bound(smooth, x, cert, log, c_hat, level_srs, level, batch_size, generator, stats,
                               warm[drawn], escape, radii, N)
    else:
        bound_standard(cert, level)
    decide(cert, c_hat, smooth.sigma)
    return record_cost(cert, stats)


def _table_rule(radii: Sequence[float], sigma: float, N: int, levels: Sequence[float]):
    """``settled(k, n, level)``: whether every threshold of the table at ``radii`` is settled at a look with count
    k of n at ``level`` (certified by the lower bound, or futile against the bound at N at ``levels[-1]``)."""
    thresholds = table_thresholds(radii, sigma)
    targets = futility_targets(thresholds, N, levels[-1])

    def settled(n_A: int, n: int, level: float) -> bool:
        return row_decided(lower_confidence_bound(n_A, n, level), upper_confidence_bound(n_A, n, FUTILITY_LEVEL),
                           thresholds, targets)
    return settled


def _draw_until_decided(smooth, x, c_hat: int, N: int, batch_size: int, generator: torch.Generator, classify,
                        looks: Sequence[int], levels: Sequence[float], decided, log: Optional[PhaseLog] = None,
                        bad: int = 0):
    """Estimation samples through ``classify`` up to each look in turn, until ``decided(k, n_j, level_j)`` at a
    look before N, a non-finite sample (``bad``: those already seen, e.g. in the selection), or N.  Returns
    (counts, drawn, stop, the stopping look's level, samples with non-finite logits, ``bad`` included)."""
    counts = np.zeros(smooth.num_classes, dtype=np.int64)
    drawn, stop, level = 0, STOP_N, levels[-1]
    for n_j, level in zip(looks, levels):
        part, part_bad = draw_counts(x, n_j - drawn, batch_size, smooth.sigma, generator, classify,
                                     smooth.num_classes, log, offset=drawn).numpy()
        counts += part
        bad += part_bad
        drawn = n_j
        if bad:
            stop = STOP_NONFINITE
            break
        if n_j < N and decided(int(counts[c_hat]), drawn, level):
            stop = STOP_DECIDED
            break
    return counts, drawn, stop, level, bad


def row_reachable(srs, standard, n_A: int, n: int, alpha: float, level: float, warm_rows: int,
                  sigma: float) -> bool:
    """Sequential SRS's extra stopping condition before N: whether the pairs the stop would plan, none misaligned,
    let the eliminated certificate at the look's level ``level`` reach the row the SRS counts decided, within
    the image's pair cap and within what the chain has spent so far (pairs costing at most the n SRS samples'
    evaluations: where more are needed, sampling on widens the margin more cheaply, and a misaligned pair
    would cost the row).  Without it the stop comes exactly where the raw counts clear a threshold, and the
    correction (p_m_upper > 0 even with no misaligned pair) always costs that row.  A function of the SRS
    counts and fixed settings only, so the stopping time stays one of the SRS counts (module docstring)."""
    costs = route_costs(srs, standard)
    cap = min(pair_cap(srs, standard, n, warm_rows), max(int(n * costs.srs // costs.standard), 1))
    radii = radii_z(srs, sigma)
    if radii:
        need = radii_pair_count(n_A, n, alpha, radii, cap, descend=False, looks=srs.looks, p_level=level)
    else:
        need = pairs_needed(n_A, n, alpha, srs.radius_slack, cap, looks=srs.looks, p_level=level)
    return need is not None


def _pair_and_bound(smooth, x, cert: Certificate, log: PhaseLog, c_hat: int, alpha: float, level: float,
                    batch_size: int, generator: torch.Generator, stats: SampleStats, warm_rows: int,
                    escape: float = 0.0, radii: Sequence[float] = (), N: int = 0) -> Certificate:
    """The correlation-eliminated certificate over the cert.n samples drawn: pairs planned and solved as
    in CERTIFY (a uniform subsample of A sized from n_A, aimed at the row at the stopping look's level),
    misalignment at alpha / 2, and the p_A bound at the stopping look's share ``level`` of alpha / 2.  With
    ``escape`` > 0 the image escapes after the first look as CERTIFY's does (``SRS.pairing.escape_pays``):
    sequential CERTIFY of the standard model for the ``radii`` table at level ``escape``, on at most N samples of
    a noise stream of its own (:func:`_escape`).  Returns the certificate (``cert``, or the escape's)."""
    srs, n = smooth.srs, cert.n
    with stats.planning():
        plan = plan_pairs(srs, log.preds(), c_hat, n, cert.n_A, alpha, generator,
                          pair_cap(srs, smooth.standard, n, warm_rows), None, smooth.sigma, p_level=level)
    K, K_A, M, escaped = smooth._pairs(x, log, plan, c_hat, cert.n_A, n, alpha, batch_size, stats, p_level=level,
                                       escape_level=escape)
    if escaped:
        out = _escape(smooth, x, c_hat, N, escape, batch_size, generator, stats, radii)
        out.K, out.K_A, out.M, out.samples = K, K_A, M, cert.samples
        return out
    bound_eliminated(cert, K, K_A, M, alpha, "eliminated", plan.exact, plan.looks, alpha_2=level)
    return cert


def _escape(smooth, x, c_hat: int, N: int, alpha: float, batch_size: int, generator: torch.Generator,
            stats: SampleStats, radii: Sequence[float]) -> Certificate:
    """Sequential CERTIFY of the standard model for c_hat at level ``alpha``, on at most N samples from a stream of
    their own (``derived_seed(seed, 'escape')``), for an SRS image that escapes.  Their evaluations count toward
    the image's cost as the route pilot's do; the certificate's ``samples`` stay the SRS branch's.  Soundness: the
    noise is independent of everything that decided the escape (docs/guarantees.md)."""
    own = SampleStats()
    looks = sequential_looks(N, batch_size)
    levels = sequential_levels(alpha, len(looks))
    counts, drawn, stop, level, bad = _draw_until_decided(smooth, x, c_hat, N, batch_size,
                                                          side_stream(generator, "escape"),
                                                          lambda noisy: smooth._standard(noisy, own), looks, levels,
                                                          _table_rule(radii, smooth.sigma, N, levels))
    stats.add_cost(own)
    cert = Certificate(ABSTAIN, 0.0, n_A=int(counts[c_hat]), n=drawn, counts=counts, route="escape", stop=stop)
    if bad:
        cert.status = f"nonfinite_logits({bad})"
    else:
        bound_standard(cert, level)
    return cert


__all__ = ["certify_sequential", "check_sequential_srs", "row_reachable", "STOP_DECIDED", "STOP_N", "STOP_NONFINITE", "STOP_REASONS"]
