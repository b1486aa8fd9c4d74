"""The pairing planner's fast bound searches (``SRS.pairing``) make every decision of a straightforward one.

The planner reads its Clopper-Pearson bounds from memoised chunks computed by vectorised scipy calls and
memoises its searches; the reference below is the plain implementation (one scalar statsmodels bound per
probe, nothing cached).  Over a grid of inputs the route, the pair counts and the bounds they rest on
must be equal, bit for bit, and a closed-form run plans an image in a few milliseconds.
"""
import math
import random

import numpy as np
import pytest
import scipy.stats
import torch
from scipy.stats import norm

from SRS import pairing
from SRS.bounds import (eliminated_p_lower, lower_confidence_bound, lower_confidence_bounds, upper_confidence_bound,
                        upper_confidence_bounds)
from SRS.pairing import (RouteCosts, adaptive_pair_count, choose_route, clean_upper_bound, count_bound, count_z,
                         eliminated_z, pairs_needed, predicted_n_A, radii_goal, radii_pair_count)


# ------------------------------------------------------------------ the reference planner
def _ref_z(p):
    return float(norm.ppf(p)) if p >= 0.5 else -math.inf


def _ref_eliminated_z(n_A, n, K_A, alpha, M=0, exact=0, looks=1):
    return _ref_z(eliminated_p_lower(n_A, n, K_A, M, alpha, exact, looks)[2])


def _ref_pairs_needed(n_A, n, alpha, slack, cap, z_goal=None, exact=0, looks=1):
    z_target = _ref_z(lower_confidence_bound(n_A, n, alpha)) if z_goal is None else z_goal
    if z_target == -math.inf:
        return 0
    z_target = max(z_target - slack, 0.0)
    if n_A - exact <= 0:
        return 0
    hi = min(cap, n_A - exact)
    if hi < 1 or _ref_eliminated_z(n_A, n, hi, alpha, 0, exact, looks) < z_target:
        return None
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _ref_eliminated_z(n_A, n, mid, alpha, 0, exact, looks) >= z_target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _ref_grid_goal(n_A, n, alpha, grid):
    z = _ref_z(lower_confidence_bound(n_A, n, alpha))
    if z == -math.inf:
        return None
    return math.floor(z / grid + 1e-9) * grid


def _ref_grid_pair_count(n_A, n, alpha, grid, cap, exact=0, descend=True, looks=1):
    goal = _ref_grid_goal(n_A, n, alpha, grid)
    if goal is None:
        return 0
    while goal >= 0:
        need = _ref_pairs_needed(n_A, n, alpha, 0.0, cap, z_goal=goal, exact=exact, looks=looks)
        if need is not None or not descend:
            return need
        goal -= grid
    return 0


def _ref_adaptive_pair_count(n_A, n, alpha, slack, cap, exact=0, looks=1):
    need = _ref_pairs_needed(n_A, n, alpha, slack, cap, exact=exact, looks=looks)
    if need is not None:
        return need
    top = min(cap, n_A - exact)
    if top < 1:
        return 0
    z_top = _ref_eliminated_z(n_A, n, top, alpha, 0, exact, looks)
    if z_top == -math.inf:
        return 0
    return _ref_pairs_needed(n_A, n, alpha, slack, cap, z_goal=z_top, exact=exact, looks=looks) or top


def _ref_choose_route(k0, n0, n, alpha, slack, costs, warm_rows, max_pairs, grid=None, looks=1):
    if grid:
        w = n0 * n / (n0 + n)
        shares = [scipy.stats.beta.ppf((i + 0.5) / pairing.ROUTE_POINTS, (k0 + 0.5) * w / n0, (n0 - k0 + 0.5) * w / n0)
                  for i in range(pairing.ROUTE_POINTS)]
        budget = max(int(math.floor((n * costs.standard - costs.srs_route(n, warm_rows, 0)) / costs.standard)), 1)
        lost, cost = 0, 0.0
        for m in (int(math.floor(n * p)) for p in shares):
            cap = min(max_pairs, budget, m)
            need = _ref_grid_pair_count(m, n, alpha, grid, cap, descend=False, looks=looks)
            if need is None:
                lost += 1
                need = _ref_grid_pair_count(m, n, alpha, grid, cap, descend=True, looks=looks)
            cost += costs.srs_route(n, warm_rows, need) / pairing.ROUTE_POINTS
        ok = lost <= pairing.ROUTE_LOSS * pairing.ROUTE_POINTS and cost < costs.standard_route(n)
        return "srs" if ok else "standard"
    n_A = int(math.floor(n * upper_confidence_bound(k0, n0, pairing.ROUTE_LEVEL)))
    need = _ref_pairs_needed(n_A, n, alpha, slack, min(max_pairs, n_A), looks=looks)
    if need is None:
        return "standard"
    return "srs" if costs.srs_route(n, warm_rows, need) < costs.standard_route(n) else "standard"


# ------------------------------------------------------------------ the bounds
def test_vectorised_bounds_equal_the_scalar_ones_bit_for_bit():
    """lower/upper_confidence_bounds on arrays are the scalar (statsmodels) bounds exactly, edges included
    (k = 0, k = n, n = 0); the memoised readers (count_bound, count_z, clean_upper_bound) too."""
    for n in (0, 1, 7, 100, 1000, 10000):
        ks = np.unique(np.r_[0, 1, 2, np.linspace(0, n, 25).astype(int), n - 1, n].clip(0, n))
        for level in (0.25, 0.1, 0.0005, 0.00025):
            lo, up = lower_confidence_bounds(ks, n, level), upper_confidence_bounds(ks, n, level)
            for i, k in enumerate(ks.tolist()):
                assert lo[i] == lower_confidence_bound(k, n, level) == count_bound(k, n, level), (k, n, level)
                assert up[i] == upper_confidence_bound(k, n, level) == count_bound(k, n, level, upper=True)
                assert count_z(k, n, level) == _ref_z(lower_confidence_bound(k, n, level))
            for K in (0, 1, 2, 255, 256, 257, n):
                assert clean_upper_bound(K, level) == upper_confidence_bound(0, K, level)
    assert count_bound(3.5, 10, 0.1) == lower_confidence_bound(3.5, 10, 0.1)   # not a count: the scalar path
    assert count_z(11, 10, 0.1) == _ref_z(lower_confidence_bound(11, 10, 0.1))


# ------------------------------------------------------------------ the searches
def _grid_of_inputs(count, seed=0):
    """(n_A, n, alpha, slack, cap, exact, looks) spread over sample sizes, levels, counts near the abstain
    threshold and the radius cap, small and large caps, exact samples and second looks."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        n = rng.choice([60, 1000, 10000])
        n_A = min(n, max(0, int(n * rng.choice([0.4, 0.52, 0.6, 0.8, 0.9, 0.97, 0.995, 1.0]) + rng.randint(-3, 3))))
        exact = rng.choice([0, 0, rng.randint(0, n_A // 10)])
        cap = rng.choice([n_A, n, max(1, n_A // 4), max(1, n_A // 50)])
        cases.append((n_A, n, rng.choice([0.001, 0.01, 0.05]), rng.choice([0.05, 0.2, 0.5]), cap, exact,
                      rng.choice([1, 2])))
    return cases


def test_pair_counts_equal_the_reference():
    """pairs_needed (with and without a goal), eliminated_z, adaptive_pair_count and predicted_n_A equal the
    straightforward implementation over a grid of inputs, asked twice (the second time from the memo)."""
    for n_A, n, alpha, slack, cap, exact, looks in _grid_of_inputs(120):
        for K in {0, 1, cap, max(n_A - exact, 0)}:
            want_z = _ref_eliminated_z(n_A, n, K, alpha, 0, exact, looks)
            assert eliminated_z(n_A, n, K, alpha, 0, exact, looks) == want_z
        want = _ref_pairs_needed(n_A, n, alpha, slack, cap, exact=exact, looks=looks)
        for _ in range(2):
            got = pairs_needed(n_A, n, alpha, slack, cap, exact=exact, looks=looks)
            assert got == want, (n_A, n, alpha, cap, exact)
        goal = 1.25
        assert pairs_needed(n_A, n, alpha, 0.0, cap, z_goal=goal, exact=exact, looks=looks) == \
            _ref_pairs_needed(n_A, n, alpha, 0.0, cap, z_goal=goal, exact=exact, looks=looks)
        assert adaptive_pair_count(n_A, n, alpha, slack, cap, exact, looks=looks) == \
            _ref_adaptive_pair_count(n_A, n, alpha, slack, cap, exact, looks)
    for k0 in (0, 50, 90, 99, 100):
        assert predicted_n_A(k0, 100, 10000) == int(math.floor(10000 * upper_confidence_bound(k0, 100, 0.1)))
    assert eliminated_z(900, 1000, 300, 0.001, M=2) == _ref_eliminated_z(900, 1000, 300, 0.001, M=2)


def _grid(g):
    """Table radii (units of sigma) on the grid 0, g, 2g, ... beyond every reachable radius."""
    return [k * g for k in range(int(round(6 / g)) + 1)]


def test_grid_counts_and_routes_equal_the_reference():
    """The pair counts aimed at table radii on a grid (with and without descent) and the route (slack rule,
    and table radii over the quantiles of the prediction of n_A) equal the reference."""
    costs = RouteCosts(standard=31, srs=4, warmup=11)
    for n_A, n, alpha, _, cap, exact, looks in _grid_of_inputs(40, seed=1):
        for grid in (0.25, 0.5):
            for descend in (True, False):
                assert radii_pair_count(n_A, n, alpha, _grid(grid), cap, exact, descend, looks) == \
                    _ref_grid_pair_count(n_A, n, alpha, grid, cap, exact, descend, looks), (n_A, n, alpha, grid, cap)
            assert radii_goal(n_A, n, alpha, _grid(grid)) == _ref_grid_goal(n_A, n, alpha, grid)
    routes = set()
    for n0, k0, n, max_pairs, grid in [(100, 100, 10000, 10000, 0.5), (100, 97, 10000, 10000, 0.5),
                                       (100, 90, 10000, 10000, 0.25), (100, 80, 1000, 1000, 0.5),
                                       (100, 60, 1000, 50, 0.5), (50, 49, 1000, 1000, None),
                                       (100, 90, 10000, 10000, None), (100, 100, 10000, 10000, None),
                                       (100, 90, 10000, 50, None), (100, 55, 1000, 1000, None)]:
        for looks in (1, 2):
            got = choose_route(k0, n0, n, 0.001, 0.05, costs, 1000, max_pairs, grid and _grid(grid), looks)
            assert got == _ref_choose_route(k0, n0, n, 0.001, 0.05, costs, 1000, max_pairs, grid, looks)
            routes.add(got)
    assert routes == {"srs", "standard"}   # both decisions are exercised


# ------------------------------------------------------------------ speed
@pytest.mark.parametrize("radius_slack", [0.05, None])
def test_the_planner_time_of_each_certificate_is_recorded(radius_slack):
    """A closed-form CERTIFY (linear DEQ, N 10000, alpha 0.001, adaptive pairing with the fallback, slack rule
    or table radii) records the planner's time per certificate (``Certificate.planner_seconds``), which the
    runner's summary and ``scripts/bench_certify.py`` report.  Its size is a benchmark figure, not asserted."""
    from test_smoothing import LinearDEQ
    from SRS.settings import DEQSolve, SRSConfig
    from SRS.smooth import Smooth
    d = 6
    model = LinearDEQ(torch.ones(d, dtype=torch.float64) / math.sqrt(d), 0.0, 0.5)
    x = torch.full((1, 1, d), 0.5 / math.sqrt(d), dtype=torch.float64)
    radii = None if radius_slack is not None else tuple(0.5 * r for r in _grid(0.25))
    smooth = Smooth(model, 2, 0.5, standard=DEQSolve("anderson", 30, 0.0),
                    srs=SRSConfig(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 3, 0.0), conf_drop=None,
                                  radius_slack=radius_slack, radii=radii))
    for i in range(3):
        c = smooth.certify(x, 100, 10000, 0.001, 2000, generator=torch.Generator().manual_seed(i))
        assert 0 < c.planner_seconds < math.inf
