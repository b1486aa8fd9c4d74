"""Sequential CERTIFY for a certified-accuracy table: each image stops sampling once its row is decided.

A table at radii r_1 < ... < r_m only needs to know, per image, which thresholds
t_k = Phi(r_k / sigma) (and t_0 = 1/2, the abstain threshold, radius 0) the certified p_A_lower
reaches.  Sequential CERTIFY draws the selection samples as CERTIFY does (n0 samples, c_A = the most
frequent class), then the estimation samples in mini-batches, and looks at the count of c_A at
sample counts fixed before any sample is drawn (``SRS.bounds.sequential_looks``: batch, 2 batch,
4 batch, ..., N).  At look j it computes Clopper-Pearson lower and upper bounds of k_j / n_j at the
look's level alpha_j (``SRS.bounds.sequential_levels``: half of alpha at N, the other half shared
equally by the L - 1 earlier looks) and stops when no threshold lies strictly between them
(``SRS.bounds.row_decided``), or at N.  The reported certificate is the ordinary one with the lower
bound of the stopping look: radius sigma PhiInv(lower), abstain when lower < 1/2.

Method and why
--------------
Clopper-Pearson at a fixed schedule of looks with the union bound, rather than a betting confidence
sequence (Waudby-Smith and Ramdas): each look's bound is the exact binomial bound the field already
uses (the fixed-N certificate is the case L = 1), so the price is explicit and small, needs no
tuning, and the whole argument is one union bound.  A betting sequence looks after every batch and
is tighter early, but costs a constant factor in the bound at N that depends on the betting strategy.

Guarantee (standard model)
--------------------------
Given c_A (the selection noise is independent of the estimation noise), the count k_j of c_A among
the first n_j estimation samples is Binomial(n_j, p_A) for each fixed look j, whatever is done at the
other looks.  So P(lower_j > p_A) <= alpha_j for each j, and by the union bound all L lower bounds
hold at once with probability >= 1 - sum_j alpha_j = 1 - alpha.  On that event the lower bound at
the stopping look holds too, whatever rule chose the look: the certificate fails with probability
<= alpha, as fixed-N CERTIFY does.  Only the lower bounds are claims; the upper bounds are part of
the stopping rule only (a wrong upper bound can stop an image early, giving it a smaller radius,
never a larger one), so they spend no alpha: each is computed at its look's level alpha_j.

Price against fixed N
---------------------
At N the bound is taken at level alpha / 2 instead of alpha, whatever L: for k = N,
p_A_lower = (alpha / 2)^(1/N) instead of alpha^(1/N), i.e. ln(alpha) / N becomes ln(alpha / 2) / N.
For N = 10000 and alpha = 0.001: 0.999240 instead of 0.999309, the largest radius
3.171 sigma instead of 3.199 sigma (-0.9%); for k / N = 0.9: PhiInv(p_A_lower) 1.2253 instead of
1.2287.  An image that runs to N therefore certifies a slightly smaller radius than fixed-N CERTIFY
on the same noise; an image decided at look j < L stops after n_j samples.

The label
---------
The label never enters the rule: an image whose c_A is not its label runs the same rule and stops
where its bounds clear the thresholds (its row counts 0 at every radius through ``correct``).
Stopping on the label would make the sampling, hence the certificate, depend on it; as it is, the
certificate is a property of the input alone, as fixed-N CERTIFY's.

Sequential SRS
--------------
With an SRS configuration the selection samples, the route decision (``SRS.pairing``, from the
selection and pilot samples only) and the chain are those of CERTIFY; a 'fallback' image runs the
rule above with the standard model.  On the SRS route the chain runs batch by batch and the rule is
evaluated on the SRS counts with the bounds at the looks' shares of alpha_2 = alpha / 2.  At the stop
the pairs are planned as in CERTIFY over the n_tau samples drawn (``SRS.pairing.plan_pairs``: a
uniform subsample of A, the samples predicting c_A, sized from n_A alone), and the
correlation-eliminated certificate bounds the misalignment at alpha_1 = alpha / 2 and N_A_E / n_tau at
the stopping look's share of alpha_2.  Why this keeps the level:

* the standard model's predictions Y_i = f_D(x + e_i) on the chain's noise are i.i.d. whatever the
  chain did (the noise is i.i.d. and f_D is fixed), so T_j = #{i <= n_j : Y_i = c_A} is
  Binomial(n_j, p_A) at every fixed look, and the union bound over looks makes the lower bounds of
  T_j / n_j hold at once with probability >= 1 - alpha_2, also at the look tau chosen from the SRS
  counts;
* condition on all the noise (hence on tau, on every SRS prediction and on every Y_i): the paired
  positions come from a permutation drawn on a stream independent of the noise, and their number is a
  function of n_A, n_tau and fixed settings, so they are a uniform subsample of A and the argument of
  ``SRS.pairing`` gives N_A_E <= #{i in A : Y_i = c_A} <= T_tau with probability >= 1 - alpha_1;
* the Clopper-Pearson lower bound is non-decreasing in the count, so on both events the reported
  p_A_lower <= lower bound of T_tau / n_tau <= p_A: failure probability <= alpha_1 + alpha_2 = alpha.

Restrictions: sequential SRS needs the 'eliminated' certificate (the others have no such argument)
and no ``refine_margin`` (its re-solves are done per phase, after the pass).  The rule on the SRS
counts decides when to stop, not what is certified: where the chain is misaligned the eliminated
bound lands below the SRS bound and the image may lose its row's threshold (the pairs are sized by
``plan_pairs``' usual rule, aimed at the table's radii unless ``radius_slack`` is given).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import torch

from .bounds import confidence_interval, row_decided, sequential_levels, sequential_looks, table_thresholds
from .certificates import Certificate, bound_eliminated, bound_standard, decide, record_cost
from .pairing import pair_cap, plan_pairs
from .sampling import ABSTAIN, PhaseLog, SampleStats, SRSChain, draw_counts, ensure_generator

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
    route = "standard"
    looks = sequential_looks(N, batch_size)
    warm = {}
    if srs is not None:
        estimation_chain = chain if srs.chain_across_phases else chain.restart()
        warm = {n_j: estimation_chain.warmup_rows(n_j, batch_size) for n_j in looks}
        route, _ = smooth._route(x, sel, c_hat, n0, N, alpha, batch_size, generator, stats, chain, warm[N])
        chain = estimation_chain
    on_srs = route == "srs"
    levels = sequential_levels(alpha / 2 if on_srs else alpha, len(looks))
    thresholds = table_thresholds(radii, smooth.sigma)
    log = PhaseLog() if on_srs else None
    if on_srs:
        def classify(noisy):
            return chain(noisy, stats)
    else:
        def classify(noisy):
            return smooth._standard(noisy, stats)
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
        if n_j < N and row_decided(*confidence_interval(int(counts[c_hat]), drawn, level), thresholds):
            stop = STOP_DECIDED
            break
    cert = Certificate(ABSTAIN, 0.0, n_A=int(counts[c_hat]), n=drawn, counts=counts, route=route,
                       samples=n0 + drawn, stop=stop)
    if bad:
        cert.status = f"nonfinite_logits({bad})"
    elif on_srs:
        _pair_and_bound(smooth, x, cert, log, c_hat, alpha, level, batch_size, generator, stats, warm[drawn])
    else:
        bound_standard(cert, level)
    decide(cert, c_hat, smooth.sigma)
    return record_cost(cert, stats)


def _pair_and_bound(smooth, x, cert: Certificate, log: PhaseLog, c_hat: int, alpha: float, level: float,
                    batch_size: int, generator: torch.Generator, stats: SampleStats, warm_rows: int) -> None:
    """The correlation-eliminated certificate over the cert.n samples drawn: pairs planned and solved as
    in CERTIFY (a uniform subsample of A sized from n_A), misalignment at alpha / 2, and the p_A bound at
    the stopping look's share ``level`` of alpha / 2."""
    srs, n = smooth.srs, cert.n
    with stats.planning():
        plan = plan_pairs(srs, log.preds(), c_hat, n, cert.n_A, alpha, generator,
                          pair_cap(srs, smooth.standard, n, warm_rows), None, smooth.sigma)
    M = smooth._misaligned(x, log, plan.positions, c_hat, batch_size, stats)
    K, K_A = plan.K, plan.K_A
    if plan.more is not None and M > 0:
        M += smooth._misaligned(x, log, plan.more, c_hat, batch_size, stats)
        K, K_A = plan.with_second_look()
    bound_eliminated(cert, K, K_A, M, alpha, "eliminated", plan.exact, plan.looks, alpha_2=level)


__all__ = ["certify_sequential", "check_sequential_srs", "STOP_DECIDED", "STOP_N", "STOP_NONFINITE", "STOP_REASONS"]
