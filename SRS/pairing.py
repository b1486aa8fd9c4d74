"""Which SRS samples get a paired standard solve, how many, and when SRS is not worth it.

Soundness (full argument: docs/guarantees.md, "Why the pairing and the fallback keep the level"): the pairs
are the first K_A members of A = {i : S_i = c_A} in a uniform permutation drawn independently of the noise,
and K_A depends only on n_A, n, alpha, the budgets and the permutation's ranks, never on a standard
prediction; so given K_A they are a uniform K_A-subset of A, M is hypergeometric and the Clopper-Pearson bound
of M / K_A keeps level alpha_1.  The route (SRS or standard fallback) is decided from the selection samples
only, so each branch fails with probability <= alpha given the decision.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.stats import beta, nbinom, norm

from .bounds import (eliminated_p_lower, lower_confidence_bound, lower_confidence_bounds, upper_confidence_bound,
                     upper_confidence_bounds)
from .settings import DEFAULT_TABLE_Z, SAMPLE_OVERHEAD, DEQSolve, SRSConfig

PAIR_SEED_SALT = 0x5EED5EED


def pair_permutation(n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
    """The order in which the n estimation positions are offered for pairing: drawn on the CPU from a stream
    derived from the noise generator's seed, never from the noise (which is the same with or without pairing)."""
    seed = (generator.initial_seed() if generator is not None else int(torch.randint(0, 2 ** 62, ()))) ^ PAIR_SEED_SALT
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _z(p: float) -> float:
    return float(norm.ppf(p)) if p >= 0.5 else -math.inf


# Planner bounds come from memoised chunks of consecutive counts, one vectorised scipy call each, equal bit for
# bit to the scalar bound: every decision is the one the scalar functions give.
_CHUNK = 256
_CACHED_CHUNKS = 4096                     # at most ~8 MB of float64


@functools.lru_cache(maxsize=_CACHED_CHUNKS)
def _bound_chunk(upper: bool, n: int, level: float, start: int) -> np.ndarray:
    """The lower (``upper`` False) or upper Clopper-Pearson bound of c / n at ``level`` for c in
    [start, start + _CHUNK) and c <= n."""
    counts = np.arange(start, min(start + _CHUNK, n + 1))
    return (upper_confidence_bounds if upper else lower_confidence_bounds)(counts, n, level)


@functools.lru_cache(maxsize=_CACHED_CHUNKS)
def _count_z_chunk(n: int, level: float, start: int) -> np.ndarray:
    """``_z(lower_confidence_bound(c, n, level))`` for c in [start, start + _CHUNK) and c <= n."""
    p = _bound_chunk(False, n, level, start)
    return np.where(p >= 0.5, norm.ppf(p), -np.inf)


@functools.lru_cache(maxsize=_CACHED_CHUNKS)
def _clean_upper_chunk(level: float, start: int) -> np.ndarray:
    """``upper_confidence_bound(0, K, level)`` for K in [start, start + _CHUNK) (no misaligned pair)."""
    K = np.arange(start, start + _CHUNK)
    return upper_confidence_bounds(np.zeros_like(K), K, level)


def _whole(v) -> bool:
    return isinstance(v, (int, np.integer)) or (isinstance(v, float) and v.is_integer())


def _in_table(c, n) -> bool:
    """Whether the count c of n is read from the memoised chunks (whole numbers, 0 <= c <= n)."""
    return _whole(c) and _whole(n) and 0 <= c <= n


def count_bound(c: int, n: int, level: float, upper: bool = False) -> float:
    """``lower_confidence_bound(c, n, level)`` (``upper``: the upper bound), memoised; bit-identical."""
    if not _in_table(c, n):
        return (upper_confidence_bound if upper else lower_confidence_bound)(c, n, level)
    c = int(c)
    return float(_bound_chunk(upper, int(n), level, c - c % _CHUNK)[c % _CHUNK])


def count_z(c: int, n: int, level: float) -> float:
    """``PhiInv(lower_confidence_bound(c, n, level))`` (-inf below 1/2), memoised; bit-identical."""
    if not _in_table(c, n):
        return _z(lower_confidence_bound(c, n, level))
    c = int(c)
    return float(_count_z_chunk(int(n), level, c - c % _CHUNK)[c % _CHUNK])


def clean_upper_bound(K: int, level: float) -> float:
    """``upper_confidence_bound(0, K, level)`` (K pairs, none misaligned), memoised; bit-identical."""
    if not (_whole(K) and K >= 0):
        return upper_confidence_bound(0, K, level)
    K = int(K)
    return float(_clean_upper_chunk(level, K - K % _CHUNK)[K % _CHUNK])


def eliminated_z(n_A: int, n: int, K_A: int, alpha: float, M: int = 0, exact: int = 0, looks: int = 1,
                 p_level: Optional[float] = None) -> float:
    """PhiInv(p_A_lower) of the eliminated certificate (radius / sigma; -inf when it abstains); equal bit for bit
    to ``eliminated_p_lower`` (with M = 0 through the memoised bounds).  ``p_level``: the p_A bound's level if not
    alpha / 2 (sequential CERTIFY's stopping look)."""
    if M != 0:
        return _z(eliminated_p_lower(n_A, n, K_A, M, alpha, exact, looks, alpha_2=p_level)[2])
    p_m_upper = clean_upper_bound(K_A, alpha / 2 / looks)
    n_a_e = int(exact) + int(math.floor((n_A - exact) * (1.0 - p_m_upper)))
    return count_z(n_a_e, n, alpha / 2 if p_level is None else p_level)


def pairs_needed(n_A: int, n: int, alpha: float, slack: float, cap: int,
                 z_goal: Optional[float] = None, exact: int = 0, looks: int = 1,
                 p_level: Optional[float] = None) -> Optional[int]:
    """Fewest pairs K_A with which, if none is misaligned, the eliminated certificate comes within ``slack``
    (units of sigma) of the SRS counts' own radius at level alpha (or of ``z_goal``).

    ``cap``: most pairs allowed (at most n_A - ``exact`` usable); ``exact``: samples of A re-solved by the
    standard model; ``looks``: planned looks at the misalignment bound; ``p_level``: the p_A bound's level if not
    alpha / 2 (sequential CERTIFY's stopping look).  Returns 0 when the SRS counts abstain,
    K_A in [1, min(cap, n_A)], or None when even that falls short.  A pure function of its arguments (memoised).
    """
    return _pairs_needed(n_A, n, alpha, slack, cap, z_goal, exact, looks, p_level)


@functools.lru_cache(maxsize=1 << 16)
def _pairs_needed(n_A: int, n: int, alpha: float, slack: float, cap: int, z_goal: Optional[float], exact: int,
                  looks: int, p_level: Optional[float] = None) -> Optional[int]:
    """:func:`pairs_needed` with positional arguments (the memo key): a bisection on K_A."""
    z_target = count_z(n_A, n, alpha if p_level is None else p_level) if z_goal is None else z_goal
    if z_target == -math.inf:
        return 0
    z_target = max(z_target - slack, 0.0)     # at least certify radius 0 (not abstain)
    if n_A - exact <= 0:
        return 0                               # every sample of A is exact: nothing to pair
    hi = min(cap, n_A - exact)

    def z_of(K: int) -> float:
        return eliminated_z(n_A, n, K, alpha, 0, exact, looks, p_level)
    if hi < 1 or z_of(hi) < z_target:
        return None
    lo = 1                                     # eliminated_z is non-decreasing in K_A (M = 0)
    while lo < hi:
        mid = (lo + hi) // 2
        if z_of(mid) >= z_target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def table_row(z: float, radii: Optional[Sequence[float]]) -> float:
    """The largest of ``radii`` (units of sigma) at or below z; -1 where z abstains (-inf) or none is; z itself
    without ``radii``."""
    if radii is None:
        return z
    if z == -math.inf:
        return -1.0
    return max([r for r in radii if r <= z + 1e-9], default=-1.0)


def radii_goal(n_A: int, n: int, alpha: float, radii: Sequence[float]) -> Optional[float]:
    """radius / sigma of the largest table radius (``radii``, in units of sigma) at or below the radius the
    SRS counts alone give at level ``alpha``; 0 (certify, do not abstain) when none is; None when the counts
    abstain."""
    z = count_z(n_A, n, alpha)
    if z == -math.inf:
        return None
    return max(table_row(z, radii), 0.0)


def radii_pair_count(n_A: int, n: int, alpha: float, radii: Sequence[float], cap: int, exact: int = 0,
                     descend: bool = True, looks: int = 1, p_level: Optional[float] = None) -> Optional[int]:
    """K_A aimed at the table ``radii`` (units of sigma): the fewest pairs with which, none misaligned, the
    certificate reaches :func:`radii_goal`; where the cap prevents it, the next table radius down (to 0) with
    ``descend``, else None.  0 when the counts abstain.  ``p_level``: the p_A bound's level if not alpha / 2
    (sequential CERTIFY: the goal is then the counts' row at that level too).  A function of n_A, ``exact`` and
    the fixed radii and levels, so the pairing argument holds."""
    goal = radii_goal(n_A, n, alpha if p_level is None else p_level, radii)
    if goal is None:
        return 0
    for target in sorted({r for r in radii if r <= goal} | {goal, 0.0}, reverse=True):
        need = pairs_needed(n_A, n, alpha, 0.0, cap, z_goal=target, exact=exact, looks=looks, p_level=p_level)
        if need is not None or not descend:
            return need
    return 0


def adaptive_pair_count(n_A: int, n: int, alpha: float, slack: Optional[float], cap: int, exact: int = 0,
                        radii: Optional[Sequence[float]] = None, looks: int = 1, p_level: Optional[float] = None) -> int:
    """K_A of adaptive pairing: :func:`radii_pair_count` with table ``radii``; else :func:`pairs_needed` within
    ``slack``, or within ``slack`` of what the cap itself gives when the target is unreachable.  A function of
    n_A and ``exact`` (the pairing argument holds).  ``p_level``: see :func:`radii_pair_count`."""
    if radii:
        return radii_pair_count(n_A, n, alpha, radii, cap, exact, looks=looks, p_level=p_level)
    need = pairs_needed(n_A, n, alpha, slack, cap, exact=exact, looks=looks, p_level=p_level)
    if need is not None:
        return need
    top = min(cap, n_A - exact)
    if top < 1:
        return 0
    z_top = eliminated_z(n_A, n, top, alpha, 0, exact, looks, p_level)
    if z_top == -math.inf:
        return 0                               # abstains even with every pair allowed
    return pairs_needed(n_A, n, alpha, slack, cap, z_goal=z_top, exact=exact, looks=looks, p_level=p_level) or top


@dataclass
class PairPlan:
    """The paired positions of one phase.

    Attributes:
        positions: sorted positions (0..n-1) solved by the standard model, all in A; K_A: their count.
        K: positions of the permutation scanned; exact: samples of A re-solved (never paired or misaligned).
        looks: planned looks; more: sorted positions of the second look (the next members of A in the same
            uniform order, solved only when the first look finds a misaligned pair) or None; K_more: scanned.
    """
    positions: torch.Tensor
    K: int
    K_A: int
    exact: int = 0
    looks: int = 1
    more: Optional[torch.Tensor] = None
    K_more: int = 0

    def with_second_look(self) -> Tuple[int, int]:
        """(K scanned, K_A solved) once the second look's pairs are solved too."""
        return self.K_more, self.K_A + int(self.more.numel())


def fixed_pairs(perm: torch.Tensor, in_A: torch.Tensor, K: int) -> PairPlan:
    """``--conf_drop K``: the first K positions of the permutation; those in A get solved."""
    first = perm[:K]
    chosen = first[in_A[first]].sort().values
    return PairPlan(chosen, int(first.numel()), int(chosen.numel()))


def first_in_A(perm: torch.Tensor, in_A: torch.Tensor, K_A: int) -> PairPlan:
    """Adaptive pairing: the first K_A members of A in permutation order (K_A <= |A|)."""
    hits = in_A[perm]
    order = torch.nonzero(hits).flatten()[:K_A]
    chosen = perm[order].sort().values
    K = int(order[-1]) + 1 if K_A > 0 else 0
    return PairPlan(chosen, K, int(chosen.numel()))


def two_looks(perm: torch.Tensor, in_A: torch.Tensor, K_first: int, K_total: int) -> PairPlan:
    """Adaptive pairing with a second look: the first K_first members of A in permutation order and the next
    K_total - K_first (both prefixes of one uniform ordering of A's pairable part)."""
    order = torch.nonzero(in_A[perm]).flatten()[:K_total]
    first, more = perm[order[:K_first]].sort().values, perm[order[K_first:]].sort().values
    K = int(order[K_first - 1]) + 1 if K_first > 0 else 0
    return PairPlan(first, K, int(first.numel()), looks=2, more=more, K_more=int(order[-1]) + 1)


SECOND_LOOK_CHANCE = 0.05   # the second look is skipped where it raises the row with a smaller chance than this


def second_look_pays(plan: PairPlan, M: int, n_A: int, n: int, alpha: float, radii: Optional[Sequence[float]],
                     p_level: Optional[float] = None) -> bool:
    """Whether to solve ``plan``'s second look after its first found M misaligned pairs: only when M > 0 and
    the second look raises the certificate's table row (:func:`table_row`; its radius without ``radii``) above
    the first look's own with a chance of at least ``SECOND_LOOK_CHANCE``.  The chance is that the second
    look's m pairs hold at most the misaligned count that still raises the row, under the first look's rate:
    a Poisson count with Jeffreys' Gamma(M + 1/2, K_A) rate, i.e. negative binomial.  Where the first look's
    misaligned pairs already cost the row (say 5 of 3544, while one more in the next 5010 loses it), the
    second look would solve up to (G - 1) K_A pairs for almost nothing.

    Soundness: each look's misalignment bound is at alpha_1 / 2 (union bound over the two planned looks), so
    stopping after either on any function of the first look's pairs keeps the level (docs/guarantees.md)."""
    if M <= 0 or plan.more is None or plan.more.numel() == 0:
        return False
    more = int(plan.more.numel())
    total = plan.K_A + more
    row = table_row(eliminated_z(n_A, n, plan.K_A, alpha, M, plan.exact, plan.looks, p_level), radii)

    def raises(extra: int) -> bool:
        z = eliminated_z(n_A, n, total, alpha, M + extra, plan.exact, plan.looks, p_level)
        return table_row(z, radii) > row
    if not raises(0):
        return False
    if raises(more):
        return True
    lo, hi = 0, more                  # the most extra misaligned pairs that still raise the row: in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if raises(mid) else (lo, mid)
    return float(nbinom.cdf(lo, M + 0.5, plan.K_A / total)) >= SECOND_LOOK_CHANCE


ESCAPE_SHARE = 0.1   # of alpha: the escape's level on an SRS-route image (its SRS certificate takes the rest)
ESCAPE_Z = 0.5       # units of sigma: escape only where misalignment costs at least this much radius (a table step)


def escape_alpha(cfg: SRSConfig, alpha: float) -> float:
    """The level of the escape (:func:`escape_pays`) of an SRS-route image: ``ESCAPE_SHARE`` alpha with adaptive
    pairing, the fallback and the eliminated certificate (the SRS certificate then runs at the rest), else 0."""
    on = cfg.adaptive and cfg.fallback and cfg.pairs and cfg.certificate == "eliminated"
    return ESCAPE_SHARE * alpha if on else 0.0


def escape_pays(plan: PairPlan, M: int, n_A: int, n: int, alpha: float, escape_level: float,
                radii: Optional[Sequence[float]], p_level: Optional[float] = None) -> bool:
    """Whether an SRS-route image escapes to ordinary CERTIFY on fresh noise after its first look found M
    misaligned pairs: the SRS outlook (the first look's certificate, or the second look's at the first look's
    rate, whichever is higher) falls at least ``ESCAPE_Z`` sigma and one table row (:func:`table_row`) below the
    radius the counts n_A give at the escape's level ``escape_level``.  ``alpha``: the SRS certificate's level;
    ``p_level``: its p_A bound's level if not alpha / 2 (sequential CERTIFY's stopping look).

    A chain that misaligns by a few percent costs the eliminated bound far more than its counts lose, and no
    number of pairs recovers it; one that misaligns rarely costs at most an edge row, not worth a standard pass.

    Soundness: the SRS certificate runs at alpha = (1 - ESCAPE_SHARE) alpha_0, the escape's fresh-noise
    certificate at escape_level = ESCAPE_SHARE alpha_0; whatever decides between them, the reported one fails
    with probability at most their sum, alpha_0 (docs/guarantees.md)."""
    if M <= 0 or escape_level <= 0:
        return False
    z_srs = eliminated_z(n_A, n, plan.K_A, alpha, M, plan.exact, plan.looks, p_level)
    if plan.more is not None and plan.more.numel() > 0:
        more = int(plan.more.numel())
        extra = int(round(M * more / plan.K_A))
        z_srs = max(z_srs, eliminated_z(n_A, n, plan.K_A + more, alpha, M + extra, plan.exact, plan.looks, p_level))
    z_counts = count_z(n_A, n, escape_level)
    return table_row(z_counts, radii) > table_row(z_srs, radii) and z_counts - z_srs >= ESCAPE_Z


@dataclass(frozen=True)
class RouteCosts:
    """Cost model in evaluations of f per noisy sample (standard D, SRS S, warm-up W), each plus the
    per-sample overhead ``SRS.settings.SAMPLE_OVERHEAD``."""
    standard: float
    srs: float
    warmup: float

    def srs_route(self, n: int, warm_rows: int, K_A: float) -> float:
        return (n - warm_rows) * self.srs + warm_rows * self.warmup + K_A * self.standard

    def standard_route(self, n: int) -> float:
        return n * self.standard

    def pair_budget(self, n: int, warm_rows: int) -> int:
        """Most pairs for which the SRS route is still cheaper than the standard route."""
        spare = self.standard_route(n) - self.srs_route(n, warm_rows, 0)
        return max(int(math.floor(spare / self.standard)), 0)


ROUTE_LEVEL = 0.1
ROUTE_POINTS = 40    # table radii: the route reads the prediction of n_A at this many quantiles ...
ROUTE_LOSS = 0.2     # ... and takes SRS only where at most this share of them leave the table row out of reach;
ROUTE_LOSS_BEFORE_PILOT = 0.05   # the selection samples alone, where a route pilot can still refine the decision


def predicted_n_A(k0: int, n0: int, n: int, level: float = ROUTE_LEVEL) -> int:
    """A cautious (high-side) prediction of n_A from the selection count k0 of n0: n times the one-sided
    (1 - level) upper Clopper-Pearson bound of k0 / n0 (docs/guarantees.md)."""
    return int(math.floor(n * count_bound(k0, n0, level, upper=True)))


@functools.lru_cache(maxsize=1 << 12)
def predicted_counts(k0: int, n0: int, n: int, points: int = ROUTE_POINTS) -> Tuple[int, ...]:
    """n_A at the ``points`` mid-quantiles (i + 1/2) / points of its prediction from the selection count k0 of
    n0: n times a Beta law of the share, Jeffreys' posterior of k0 / n0 widened by moment matching to the
    spread of n fresh samples too (effective size n0 n / (n0 + n), the mean kept).  An approximation that only
    steers the route (which any function of the selection counts may do); memoised."""
    w = n0 * n / (n0 + n)
    a, b = (k0 + 0.5) * w / n0, (n0 - k0 + 0.5) * w / n0
    shares = beta.ppf((np.arange(points) + 0.5) / points, a, b)
    return tuple(int(v) for v in np.floor(n * shares))


def table_route_outlook(k0: int, n0: int, n: int, alpha: float, radii: Sequence[float], costs: RouteCosts,
                        warm_rows: int, max_pairs: int, looks: int = 1) -> Tuple[float, float]:
    """(expected evaluations of the SRS route, share of the prediction where the table row is out of reach)
    for pairs aimed at table ``radii``, over :func:`predicted_counts`: at each predicted n_A the pairs the
    estimation planner would plan under the same cap (``max_pairs`` and the pair budget of ``costs``); out
    of reach where even that cap cannot carry the eliminated bound to the counts' own table row, so the
    planner would descend one row (the standard model keeps it)."""
    budget = max(costs.pair_budget(n, warm_rows), 1)
    lost, total = 0, 0.0
    points = predicted_counts(k0, n0, n)
    for m in points:
        cap = min(max_pairs, budget, m)
        need = radii_pair_count(m, n, alpha, radii, cap, descend=False, looks=looks)
        if need is None:
            lost += 1
            need = radii_pair_count(m, n, alpha, radii, cap, descend=True, looks=looks)
        total += costs.srs_route(n, warm_rows, need)
    return total / len(points), lost / len(points)


def choose_route(k0: int, n0: int, n: int, alpha: float, slack: Optional[float], costs: RouteCosts, warm_rows: int,
                 max_pairs: int, radii: Optional[Sequence[float]] = None, looks: int = 1,
                 loss: float = ROUTE_LOSS) -> str:
    """'srs' or 'standard', from the selection count alone (which keeps the level; docs/guarantees.md).

    With table ``radii``: SRS when its expected cost over the prediction of n_A is below n standard samples
    and at most ``loss`` of the prediction leaves the table row out of the pairs' reach
    (:func:`table_route_outlook`).  Otherwise (``slack``): SRS when the pass plus the pairs at the cautious
    :func:`predicted_n_A` cost less than n standard samples and fit ``max_pairs``.
    """
    if radii:
        cost, lost = table_route_outlook(k0, n0, n, alpha, radii, costs, warm_rows, max_pairs, looks)
        return "srs" if lost <= loss and cost < costs.standard_route(n) else "standard"
    n_A = predicted_n_A(k0, n0, n)
    need = pairs_needed(n_A, n, alpha, slack, min(max_pairs, n_A), looks=looks)
    if need is None:
        return "standard"
    return "srs" if costs.srs_route(n, warm_rows, need) < costs.standard_route(n) else "standard"


# ----------------------------------------------------------------- the decisions of one image
def route_costs(cfg: SRSConfig, standard: DEQSolve, refine_rate: float = 0.0) -> RouteCosts:
    """The cost model of ``cfg`` with the standard model ``standard`` (evaluations of f per sample);
    ``refine_rate``: the expected fraction of SRS samples re-solved by the standard model."""
    step = cfg.step.max_iter if cfg.step_cost is None else cfg.step_cost
    std = standard.max_iter + SAMPLE_OVERHEAD
    return RouteCosts(std, step + SAMPLE_OVERHEAD + refine_rate * std, cfg.warmup.max_iter + SAMPLE_OVERHEAD)


def image_route(cfg: SRSConfig, standard: DEQSolve, k0: int, n0: int, n: int, alpha: float, warm_rows: int,
                refine_rate: float = 0.0, sigma: Optional[float] = None, final: bool = True) -> str:
    """'srs', or 'fallback' when adaptive pairing with the fallback on predicts from the selection samples
    alone (count k0 of c_A, re-solved fraction ``refine_rate``) that SRS would cost more or could not keep the
    table row (:func:`choose_route`).  ``final`` False: a route pilot refines a 'fallback', so SRS is taken
    only where at most ``ROUTE_LOSS_BEFORE_PILOT`` of the prediction is out of reach."""
    if not (cfg.adaptive and cfg.fallback and cfg.pairs):
        return "srs"
    route = choose_route(k0, n0, n, alpha, cfg.radius_slack, route_costs(cfg, standard, refine_rate), warm_rows,
                         cfg.max_pairs or n, radii_z(cfg, sigma), cfg.looks,
                         ROUTE_LOSS if final else ROUTE_LOSS_BEFORE_PILOT)
    return "srs" if route == "srs" else "fallback"


def pair_cap(cfg: SRSConfig, standard: DEQSolve, n: int, warm_rows: int, use_budget: bool = True,
             refine_rate: float = 0.0) -> int:
    """Most pairs an image may spend: ``max_pairs`` and, adaptive with the fallback (``use_budget``), no more
    than keeps the SRS route cheaper than the standard one."""
    cap = min(cfg.max_pairs or n, n)
    if cfg.adaptive and cfg.fallback and use_budget:
        cap = min(cap, max(route_costs(cfg, standard, refine_rate).pair_budget(n, warm_rows), 1))
    return cap


def radii_z(cfg: SRSConfig, sigma: Optional[float]) -> Optional[Tuple[float, ...]]:
    """The table radii in units of sigma, sorted, rounded to 12 decimals; the paper's 0, 0.5, ..., 3 without
    ``cfg.radii``; None with ``radius_slack``.  Raises ValueError for pixel radii without ``sigma``."""
    if cfg.radius_slack is not None:
        return None
    if cfg.radii is None:
        return DEFAULT_TABLE_Z
    if sigma is None:
        raise ValueError("table radii in pixel units need the noise level sigma")
    return tuple(sorted({round(r / sigma, 12) for r in cfg.radii}))


def plan_pairs(cfg: SRSConfig, preds: torch.Tensor, c_hat: int, n: int, n_A: int, alpha: float,
               generator: torch.Generator, cap: int, exact: Optional[torch.Tensor] = None,
               sigma: Optional[float] = None, p_level: Optional[float] = None) -> PairPlan:
    """The paired positions of a phase whose SRS predictions are ``preds`` (A = those predicting ``c_hat``,
    minus ``exact`` positions, which are counted, never paired): the uniform order is drawn from ``generator``
    after the pass; fixed K (``cfg.conf_drop``) or adaptive K_A from n_A alone, at most ``cap``.

    With ``cfg.second_look`` G > 1 (adaptive), the first look's bound is at alpha_1 / 2 and a second look of up
    to ceil(G K_first) pairs in all is planned with it, both sizes fixed before any pair is solved; the caller
    solves it only when the first look finds a misaligned pair.  ``p_level``: the p_A bound's level if not
    alpha / 2 (sequential CERTIFY's stopping look).  Returns a :class:`PairPlan`.
    """
    in_A = (preds == c_hat).cpu()
    n_exact = 0
    if exact is not None:
        n_exact = int((in_A & exact).sum())
        in_A = in_A & ~exact
    perm = pair_permutation(n, generator)
    if not cfg.adaptive:
        plan = fixed_pairs(perm, in_A, cfg.conf_drop)
    else:
        first = adaptive_pair_count(n_A, n, alpha, cfg.radius_slack, cap, n_exact, radii_z(cfg, sigma), cfg.looks,
                                    p_level)
        total = min(int(math.ceil(cfg.second_look * first)), cap, int(in_A.sum())) if cfg.looks == 2 else first
        plan = two_looks(perm, in_A, first, total) if total > first else first_in_A(perm, in_A, first)
    plan.exact = n_exact
    return plan


__all__ = ["pair_permutation", "count_bound", "count_z", "clean_upper_bound", "eliminated_z", "pairs_needed",
           "radii_goal", "radii_pair_count", "radii_z",
           "adaptive_pair_count", "two_looks", "PairPlan", "table_row", "second_look_pays", "escape_alpha",
           "escape_pays", "fixed_pairs", "first_in_A",
           "RouteCosts", "predicted_n_A", "predicted_counts", "table_route_outlook", "choose_route", "route_costs", "image_route", "pair_cap", "plan_pairs"]
