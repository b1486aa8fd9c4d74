"""Batched and adaptive pairing, the standard fallback, and their soundness on closed-form models.

The closed-form models are those of test_smoothing.py: a contractive linear DEQ z = a z + x with a
linear head, whose smoothed classifier and exact certified radius are known.  A certificate is
*violated* when it returns the wrong class or a radius above the true one; soundness means violations
happen with probability <= alpha.
"""
import math

import numpy as np
import pytest
import scipy.stats
import torch

from SRS.bounds import eliminated_p_lower, lower_confidence_bound, upper_confidence_bound
from SRS.sampling import safe_argmax as _safe_argmax
from SRS import pairing
from SRS import smooth as smooth_module
from SRS.settings import DEFAULT_TABLE_Z, DEQSolve, SRSConfig
from SRS.smooth import ABSTAIN, Smooth
from SRS.pairing import (ROUTE_LOSS, ROUTE_LOSS_BEFORE_PILOT, ROUTE_POINTS, SECOND_LOOK_CHANCE, PairPlan, RouteCosts, route_costs, adaptive_pair_count, choose_route,
                         eliminated_z, first_in_A, image_route, fixed_pairs, pair_permutation, predicted_counts, radii_goal,
                         radii_pair_count, radii_z, pairs_needed, predicted_n_A, second_look_pays, table_route_outlook,
                         escape_pays,
                         two_looks)
from test_smoothing import _deq_setup, binomial_slack, violation_rate


class CountingDEQ(torch.nn.Module):
    """Wraps a DEQ and records (max_iter, z0 given, rows) of every solve."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def solve(self, x, solver="naive", max_iter=50, z0=None, tol=None):
        self.calls.append((max_iter, z0 is not None, x.shape[0]))
        return self.inner.solve(x, solver, max_iter, z0, tol)


STD = DEQSolve("anderson", 30, 0.0)
# The adaptive rule these tests were written for: pairs within 0.05 sigma of the SRS counts' radius, a 0.1 N route
# pilot, one look (the recipe's defaults aim at the table's radii with a second look and a 0.5 N pilot instead).
SLACK_RULE = dict(radius_slack=0.05, route_pilot=0.1, second_look=0.0)


def _cfg(**kw):
    """SRSConfig with the slack rule unless ``kw`` says otherwise."""
    return SRSConfig(**{**SLACK_RULE, **kw})


def _srs(**kw):
    base = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 3, 0.0))
    base.update(kw)
    return _cfg(**base)


def _table(step, top=1.5):
    """Table radii 0, step, 2 step, ..., top (pixel units)."""
    return tuple(k * step for k in range(int(round(top / step)) + 1))


# ------------------------------------------------------------ batched pairing
def test_paired_solves_run_in_full_batches():
    """K = 200 of n = 1000 pairs with batch 100: today's code solved ~20 rows inside each of the 10
    batches; now every pair is solved after the pass, ceil(K_A / batch) calls of full batches."""
    model, x, _, _ = _deq_setup(a=0.5)
    counting = CountingDEQ(model)
    s = Smooth(counting, 2, 0.5, standard=STD, srs=_srs(conf_drop=200))
    c = s.certify(x, 50, 1000, 0.01, 100, generator=torch.Generator().manual_seed(0))
    std_calls = [rows for it, warm, rows in counting.calls if it == 30]
    assert c.K == 200 and 0 < c.K_A <= 200
    assert len(std_calls) == math.ceil(c.K_A / 100) == c.std_calls
    assert all(r == 100 for r in std_calls[:-1]) and sum(std_calls) == c.K_A == c.std_rows


class RecordingDEQ(CountingDEQ):
    """Also keeps every input batch the SRS chain saw (warm starts and warm-ups, not the pairs)."""

    def __init__(self, inner, budget):
        super().__init__(inner)
        self.seen, self.budget = [], budget

    def solve(self, x, solver="naive", max_iter=50, z0=None, tol=None):
        out = super().solve(x, solver, max_iter, z0, tol)
        if max_iter != self.budget:
            self.seen.append(x.clone())
            prev = getattr(self, "srs_logits", None)
            self.srs_logits = out.logits if prev is None else torch.cat([prev, out.logits])
        return out


def test_batched_pairs_equal_pairs_solved_one_by_one():
    """The regenerated paired inputs are bit-identical to the noisy inputs the chain saw at those
    positions, and M equals the count obtained by solving each pair on its own."""
    model, x, _, _ = _deq_setup(a=0.95)
    rec = RecordingDEQ(model, STD.max_iter)
    s = Smooth(rec, 2, 0.5, standard=STD, srs=_srs(conf_drop=150))
    n, n0, batch, seed = 400, 20, 40, 7
    c = s.certify(x, n0, n, 0.05, batch, generator=torch.Generator().manual_seed(seed))
    est = torch.cat(rec.seen)[n0:]                    # the estimation samples, in position order
    assert est.shape[0] == n
    # SRS predictions of the run at every position, from the recorded chain (replayed on the inputs)
    perm = pair_permutation(n, torch.Generator().manual_seed(seed))[:150].sort().values
    c_hat = int(np.argmax(c.counts)) if c.prediction == ABSTAIN else c.prediction
    # solve the standard model row by row at the paired positions that are in A
    srs_pred = torch.cat([_safe_argmax(_replay_srs_logits(model, rec, n0, i)) for i in perm.tolist()])
    in_A = perm[srs_pred == c_hat]
    std_one = torch.stack([_safe_argmax(model.solve(est[i:i + 1], STD.solver, STD.max_iter, None, STD.tol).logits)[0]
                           for i in in_A.tolist()])
    assert c.K == 150 and c.K_A == len(in_A)
    assert c.M == int((std_one != c_hat).sum())


def _replay_srs_logits(model, rec, n0, pos):
    """SRS logits at estimation position pos: re-run the recorded chain step that produced it."""
    return rec.srs_logits[n0 + pos: n0 + pos + 1]


def test_fixed_and_adaptive_positions_are_uniform_orders_of_A():
    perm = pair_permutation(50, torch.Generator().manual_seed(3))
    in_A = torch.zeros(50, dtype=torch.bool)
    in_A[::3] = True
    plan = fixed_pairs(perm, in_A, 20)
    assert plan.K == 20 and plan.K_A == int(in_A[perm[:20]].sum()) and in_A[plan.positions].all()
    ad = first_in_A(perm, in_A, 5)
    assert ad.K_A == 5 and in_A[ad.positions].all() and int(in_A[perm[:ad.K]].sum()) == 5 and in_A[perm[ad.K - 1]]


# ------------------------------------------------------------ the plan
def test_pairs_needed_reaches_the_target_and_is_minimal():
    n, alpha, slack = 10000, 0.001, 0.05
    for n_A in (6000, 9000, 9900):
        k = pairs_needed(n_A, n, alpha, slack, n_A)
        z_none = float(__import__("scipy.stats").stats.norm.ppf(lower_confidence_bound(n_A, n, alpha)))
        assert k is not None and eliminated_z(n_A, n, k, alpha) >= z_none - slack
        assert k == 1 or eliminated_z(n_A, n, k - 1, alpha) < z_none - slack
    assert pairs_needed(4000, n, alpha, slack, 4000) == 0            # SRS alone abstains: no pairs
    assert pairs_needed(n, n, alpha, slack, n) is None                 # at the radius cap: unreachable
    assert pairs_needed(9000, n, alpha, slack, 10) is None             # cap too small


def test_adaptive_count_stops_where_the_cap_saturates():
    n, alpha, slack = 10000, 0.001, 0.05
    assert adaptive_pair_count(9000, n, alpha, slack, 10000) == pairs_needed(9000, n, alpha, slack, 10000)
    k = adaptive_pair_count(9990, n, alpha, slack, 9000)              # unreachable: near the cap
    assert 0 < k < 9000
    assert eliminated_z(9990, n, k, alpha) >= eliminated_z(9990, n, 9000, alpha) - slack
    assert adaptive_pair_count(3000, n, alpha, slack, 100) == 0        # abstains anyway


@pytest.mark.parametrize("grid", [0.5, 0.25])
def test_table_radii_on_a_grid_give_the_grid_pair_counts(grid):
    """Radii equal to a grid (0, g, 2g, ... past the largest radius N = 10000 can certify) pair exactly as the
    grid rule did (the plain reference planner of test_planner): same K_A for every count, cap, exact samples,
    look plan and descent."""
    from test_planner import _ref_grid_pair_count as _grid_pair_count
    n, alpha = 10000, 0.001
    radii = tuple(k * grid for k in range(int(4 / grid) + 1))
    for n_A in list(range(5000, 10001, 83)) + [9939, 9990, 10000]:
        for cap, exact, looks in ((n_A, 0, 1), (300, 0, 1), (n_A, 40, 2), (1500, 0, 2)):
            for descend in (True, False):
                assert radii_pair_count(n_A, n, alpha, radii, cap, exact, descend, looks) == \
                    _grid_pair_count(n_A, n, alpha, grid, cap, exact, descend, looks), (n_A, cap, exact, looks, descend)


def test_table_pairs_reach_the_table_radius_with_the_fewest_pairs():
    """K_A reaches the largest table radius at or below the SRS counts' radius (no misaligned pair) and
    K_A - 1 does not; far above a table radius that is far fewer pairs than the 0.05-sigma slack asks;
    under a cap it settles one table radius down (or None without descent); uneven radii work alike."""
    from scipy.stats import norm
    n, alpha, radii = 10000, 0.001, (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    for n_A in (8347, 9516, 9939):
        z_counts = norm.ppf(lower_confidence_bound(n_A, n, alpha))
        goal = radii_goal(n_A, n, alpha, radii)
        assert goal in radii and goal <= z_counts < goal + 0.5
        K = radii_pair_count(n_A, n, alpha, radii, n_A)
        assert eliminated_z(n_A, n, K, alpha) >= goal > eliminated_z(n_A, n, K - 1, alpha)
        slack = pairs_needed(n_A, n, alpha, 0.05, n_A)
        assert slack is None or K <= slack
    assert radii_pair_count(9939, n, alpha, radii, 9939) < pairs_needed(9939, n, alpha, 0.05, 9939) / 10
    K = radii_pair_count(9939, n, alpha, radii, 300)
    assert K <= 300 and 1.5 <= eliminated_z(9939, n, K, alpha) < 2.0
    assert radii_pair_count(9939, n, alpha, radii, 300, descend=False) is None
    assert radii_pair_count(3000, n, alpha, radii, 100) == 0          # the counts abstain: no pairs
    assert adaptive_pair_count(9939, n, alpha, None, 9939, radii=radii) == radii_pair_count(9939, n, alpha, radii, 9939)
    # uneven radii: the largest at or below the counts' radius; below all of them, radius 0 (not abstain)
    z_9516 = norm.ppf(lower_confidence_bound(9516, n, alpha))
    assert radii_goal(9516, n, alpha, (0.3, 1.1, 2.9)) == 1.1 and 1.1 <= z_9516 < 2.9
    assert radii_goal(9516, n, alpha, (2.5, 2.9)) == 0.0
    K = radii_pair_count(9516, n, alpha, (0.3, 1.1, 2.9), 9516)
    assert eliminated_z(9516, n, K, alpha) >= 1.1 > eliminated_z(9516, n, K - 1, alpha)


def test_table_radii_in_sigma_units():
    """The pairs aim at --radii / sigma; without radii at the paper's table 0, 0.5, ..., 3; none with the slack rule."""
    assert radii_z(SRSConfig(), 0.25) == (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
    assert radii_z(SRSConfig(radii=(0.5, 0.0, 0.18)), 0.12) == (0.0, 1.5, round(0.5 / 0.12, 12))
    assert radii_z(SRSConfig(radius_slack=0.05), 0.25) is None


def test_table_route_weighs_the_prediction_of_n_A():
    """Aimed at table radii, the route reads the prediction of n_A at its quantiles: an image at the radius cap
    (most of the prediction out of the pairs' reach) goes to the standard model; one whose prediction only
    crosses the thin strip just above a table radius (the pairs there exceed the budget, so the planner would
    descend a row) takes SRS while that strip holds at most ROUTE_LOSS of it; one far from both takes SRS."""
    costs, n, alpha = RouteCosts(standard=31, srs=4, warmup=11), 10000, 0.001
    radii = tuple(k / 2 for k in range(9))
    assert choose_route(1100, 1100, n, alpha, None, costs, 1000, n, radii=radii) == "standard"
    assert table_route_outlook(1100, 1100, n, alpha, radii, costs, 1000, n)[1] > ROUTE_LOSS
    assert choose_route(1004, 1100, n, alpha, None, costs, 1000, n, radii=radii) == "srs"
    assert radii_pair_count(9127, n, alpha, radii, 9127, descend=False) < 200
    costs = RouteCosts(standard=31, srs=4, warmup=4)   # a digits image: 5002 of 5100 selection and pilot samples
    cost, lost = table_route_outlook(5002, 5100, n, alpha, DEFAULT_TABLE_Z, costs, 0, n, looks=2)
    assert 0 < lost <= ROUTE_LOSS and cost < costs.standard_route(n) / 4
    assert choose_route(5002, 5100, n, alpha, None, costs, 0, n, DEFAULT_TABLE_Z, 2) == "srs"


def test_an_unclear_selection_waits_for_the_route_pilot():
    """A digits image at sigma 0.25 with 99 of 100 selection samples: 7.5% of its wide prediction is out of
    reach, within ROUTE_LOSS but not ROUTE_LOSS_BEFORE_PILOT, so with a route pilot the decision waits for
    it; the pilot's 5099 of 5100 puts 65% out of reach (the standard model keeps the row)."""
    costs, n, alpha = RouteCosts(standard=31, srs=4, warmup=4), 10000, 0.001
    assert ROUTE_LOSS_BEFORE_PILOT < table_route_outlook(99, 100, n, alpha, DEFAULT_TABLE_Z, costs, 0, n, 2)[1] <= ROUTE_LOSS
    assert choose_route(99, 100, n, alpha, None, costs, 0, n, DEFAULT_TABLE_Z, 2) == "srs"
    assert choose_route(99, 100, n, alpha, None, costs, 0, n, DEFAULT_TABLE_Z, 2, ROUTE_LOSS_BEFORE_PILOT) == "standard"
    assert choose_route(5099, 5100, n, alpha, None, costs, 0, n, DEFAULT_TABLE_Z, 2) == "standard"
    cfg, std = SRSConfig(step=DEQSolve("anderson", 3, 0.0)), DEQSolve("anderson", 30, 0.0)
    assert image_route(cfg, std, 99, 100, n, alpha, 0, sigma=0.25) == "srs"
    assert image_route(cfg, std, 99, 100, n, alpha, 0, sigma=0.25, final=False) == "fallback"


def test_predicted_counts_spread_like_the_selection_and_the_fresh_samples():
    """The quantiles of the prediction of n_A: centred on n k0 / n0, with the spread of a share estimated from
    n0 samples and of n fresh samples together (sd sqrt(p (1 - p) (1 / n0 + 1 / n)) n)."""
    for k0, n0 in ((90, 100), (4500, 5000)):
        points = np.array(predicted_counts(k0, n0, 10000))
        p = k0 / n0
        assert len(points) == ROUTE_POINTS and np.all(np.diff(points) >= 0)
        assert abs(points.mean() - 10000 * p) < 0.01 * 10000 * p
        sd = 10000 * math.sqrt(p * (1 - p) * (1 / n0 + 1 / 10000))
        assert 0.85 * sd < points.std() < 1.05 * sd      # mid-quantiles understate the tails a little


def test_second_look_only_where_it_can_raise_the_row():
    """The paper's table at alpha 0.001, n 10000.  n_A 8640, a first look of 672 of 2016 planned pairs: none
    misaligned, no second look; 4 misaligned, the row rises if the other 1344 hold at most 5 more, which the
    first look's rate allows with chance 0.28 (solved); 6 misaligned, at most 3 more, chance 0.03 (skipped).
    n_A 8554, 3544 of 8554 planned: 5 misaligned, one more in the next 5010 already keeps the row down
    (skipped); 3, solved.  The chance is negative binomial: a Poisson count at a Gamma(M + 1/2, K_A) rate."""
    n, alpha = 10000, 0.001

    def plan(first, total):
        return PairPlan(torch.arange(first), first, first, looks=2, more=torch.arange(total - first), K_more=total)
    assert not second_look_pays(plan(672, 2016), 0, 8640, n, alpha, DEFAULT_TABLE_Z)
    assert second_look_pays(plan(672, 2016), 4, 8640, n, alpha, DEFAULT_TABLE_Z)
    assert not second_look_pays(plan(672, 2016), 6, 8640, n, alpha, DEFAULT_TABLE_Z)
    assert eliminated_z(8640, n, 2016, alpha, 9, 0, 2) >= 1.0 > eliminated_z(8640, n, 2016, alpha, 10, 0, 2)
    assert eliminated_z(8640, n, 672, alpha, 4, 0, 2) < 1.0
    assert abs(scipy.stats.nbinom.cdf(5, 4.5, 1 / 3) - 0.275) < 0.001
    assert scipy.stats.nbinom.cdf(3, 6.5, 1 / 3) < SECOND_LOOK_CHANCE
    assert not second_look_pays(plan(3544, 8554), 5, 8554, n, alpha, DEFAULT_TABLE_Z)
    assert second_look_pays(plan(3544, 8554), 3, 8554, n, alpha, DEFAULT_TABLE_Z)
    assert second_look_pays(plan(672, 2016), 4, 8640, n, alpha, None)               # no table: any larger radius
    assert not second_look_pays(PairPlan(torch.arange(672), 700, 672), 4, 8640, n, alpha, None)   # none planned


def test_escape_only_where_misalignment_costs_a_table_step():
    """The paper's table, the SRS certificate at 0.9 alpha and the escape at 0.1 alpha (alpha 0.001).  n 1000,
    n_A 1000, a first look of 201 of 603 planned pairs with 8 misaligned: the SRS outlook (the second look at the
    first look's rate) reaches z 1.24, the counts 2.36 at the escape's level: escape.  n_A 942, 124 of 372: 10
    misaligned escape (0.72 against 1.34); 3 do not (1.005, the counts' own row 1).  n 10000, n_A 8554, 3778 of
    8483: 5 misaligned cost row 1 by 0.006 sigma, not worth a standard pass.  Nothing misaligned, or no escape
    level (the escape off): never."""
    alpha, share = 0.001, pairing.ESCAPE_SHARE
    a_srs, a_esc = alpha * (1 - share), alpha * share

    def plan(first, total):
        return PairPlan(torch.arange(first), first, first, looks=2, more=torch.arange(total - first), K_more=total)
    assert share == 0.1 and pairing.ESCAPE_Z == 0.5
    assert escape_pays(plan(201, 603), 8, 1000, 1000, a_srs, a_esc, DEFAULT_TABLE_Z)
    assert abs(eliminated_z(1000, 1000, 603, a_srs, 8 + 16, 0, 2) - 1.239) < 0.001
    assert abs(pairing.count_z(1000, 1000, a_esc) - 2.359) < 0.001
    assert escape_pays(plan(124, 372), 10, 942, 1000, a_srs, a_esc, DEFAULT_TABLE_Z)
    assert not escape_pays(plan(124, 372), 3, 942, 1000, a_srs, a_esc, DEFAULT_TABLE_Z)
    assert eliminated_z(942, 1000, 372, a_srs, 3 + 6, 0, 2) >= 1.0 > pairing.count_z(942, 1000, a_esc) - 0.5
    assert not escape_pays(plan(3778, 8483), 5, 8554, 10000, a_srs, a_esc, DEFAULT_TABLE_Z)
    assert 0 < pairing.count_z(8554, 10000, a_esc) - eliminated_z(8554, 10000, 8483, a_srs, 5 + 6, 0, 2) < 0.01
    assert not escape_pays(plan(201, 603), 0, 1000, 1000, a_srs, a_esc, DEFAULT_TABLE_Z)
    assert not escape_pays(plan(201, 603), 8, 1000, 1000, alpha, 0.0, DEFAULT_TABLE_Z)
    assert escape_pays(PairPlan(torch.arange(201), 201, 201), 8, 1000, 1000, a_srs, a_esc, None)   # one look, no table
    assert pairing.escape_alpha(SRSConfig(), alpha) == a_esc
    assert pairing.escape_alpha(SRSConfig(fallback=False), alpha) == 0.0
    assert pairing.escape_alpha(SRSConfig(conf_drop=400), alpha) == 0.0


def test_escape_is_sound_on_a_misaligned_chain(monkeypatch):
    """The default recipe on the deliberately misaligned chain (a = 0.95, one naive step): most images escape
    after their first look.  The SRS certificates are bounded at (1 - ESCAPE_SHARE) alpha, the escapes' at
    ESCAPE_SHARE alpha on n standard samples of their own (solved on top of the first look's pairs), a fallback
    decided before the estimation samples at alpha; violations over all routes stay at or below alpha."""
    model, x, r, c = _deq_setup(a=0.95)
    recipe = SRSConfig(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0))
    s = Smooth(model, 2, 0.5, standard=DEQSolve("anderson", 50, 1e-10), srs=recipe)
    levels = []
    standard_bound, eliminated_bound = smooth_module.bound_standard, smooth_module.bound_eliminated

    def bound_standard(cert, level):
        levels.append((cert.route, level))
        standard_bound(cert, level)

    def bound_eliminated(cert, K, K_A, M, level, *args, **kw):
        levels.append(("srs", level))
        eliminated_bound(cert, K, K_A, M, level, *args, **kw)
    monkeypatch.setattr(smooth_module, "bound_standard", bound_standard)
    monkeypatch.setattr(smooth_module, "bound_eliminated", bound_eliminated)
    reps, alpha, n, bad, routes = 60, 0.05, 400, 0, []
    for rep in range(reps):
        cert = s.certify(x, 20, n, alpha, 40, generator=torch.Generator().manual_seed(10_000 + rep))
        routes.append(cert.route)
        bad += cert.prediction != ABSTAIN and (cert.prediction != c or cert.radius > r)
        if cert.route == "escape":
            assert cert.M > 0 and cert.std_rows == cert.K_A + n and cert.n == n
    assert routes.count("escape") >= reps // 2
    assert bad / reps <= binomial_slack(alpha, reps)
    expected = {"escape": pairing.ESCAPE_SHARE * alpha, "srs": (1 - pairing.ESCAPE_SHARE) * alpha, "fallback": alpha}
    assert levels and all(level == pytest.approx(expected[route]) for route, level in levels)


def test_two_looks_are_prefixes_of_one_uniform_order():
    perm = pair_permutation(1000, torch.Generator().manual_seed(5))
    in_A = torch.rand(1000, generator=torch.Generator().manual_seed(6)) < 0.7
    plan, whole = two_looks(perm, in_A, 40, 120), first_in_A(perm, in_A, 120)
    both = torch.cat([plan.positions, plan.more]).sort().values
    assert plan.K_A == 40 and plan.more.numel() == 80 and plan.looks == 2
    assert torch.equal(both, whole.positions) and plan.K_more == whole.K
    assert torch.equal(plan.positions, first_in_A(perm, in_A, 40).positions) and plan.K == first_in_A(perm, in_A, 40).K


def test_looks_split_the_misalignment_level():
    """Two planned looks: each look's misalignment bound at alpha / 4 (alpha_1 / 2), p_A at alpha / 2."""
    p_m, n_a_e, p = eliminated_p_lower(900, 1000, 300, 2, 0.001, looks=2)
    assert p_m == upper_confidence_bound(2, 300, 0.00025) and n_a_e == math.floor(900 * (1 - p_m))
    assert p == lower_confidence_bound(n_a_e, 1000, 0.0005)
    assert pairs_needed(9000, 10000, 0.001, 0.05, 10000, looks=2) > pairs_needed(9000, 10000, 0.001, 0.05, 10000)


def test_route_prefers_the_standard_model_near_the_radius_cap():
    costs = RouteCosts(standard=31, srs=2, warmup=11)
    assert choose_route(100, 100, 10000, 0.001, 0.05, costs, 0, 10000) == "standard"
    assert choose_route(90, 100, 10000, 0.001, 0.05, costs, 0, 10000) == "srs"
    assert choose_route(90, 100, 10000, 0.001, 0.05, costs, 0, 50) == "standard"   # pairs do not fit max_pairs
    assert predicted_n_A(100, 100, 10000) == 10000 and predicted_n_A(90, 100, 10000) > 9000


def test_eliminated_arithmetic_matches_the_spec():
    p_m, n_a_e, p = eliminated_p_lower(900, 1000, 300, 2, 0.001)
    assert n_a_e == math.floor(900 * (1 - p_m)) and p == lower_confidence_bound(n_a_e, 1000, 0.0005)


# ------------------------------------------------------------ soundness
def test_adaptive_pairing_is_sound_on_a_linear_deq():
    model, x, r, c = _deq_setup(a=0.5)
    s = Smooth(model, 2, 0.5, standard=DEQSolve("naive", 100, 1e-12), srs=_srs(conf_drop=None, fallback=False))
    rate = violation_rate(s, x, r, c, reps=150, n0=20, n=300, alpha=0.1, batch=50)
    assert rate <= binomial_slack(0.1, 150)


@pytest.mark.parametrize("fallback", [False, True])
def test_adaptive_pairing_catches_a_misaligned_chain(fallback):
    """a = 0.95, one naive step from the warm start: the chain is far more confident than f_D.  Its
    counts alone overclaim most of the time; adaptive K (and the fallback) stays at or below alpha."""
    model, x, r, c = _deq_setup(a=0.95)
    kw = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0))
    none = Smooth(model, 2, 0.5, standard=DEQSolve("anderson", 50, 1e-10), srs=_cfg(**kw, conf_drop=0, certificate="none"))
    sound = Smooth(model, 2, 0.5, standard=DEQSolve("anderson", 50, 1e-10),
                   srs=_cfg(**kw, conf_drop=None, fallback=fallback))
    assert violation_rate(none, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40) > 5 * 0.05
    assert violation_rate(sound, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40) <= binomial_slack(0.05, 60)


@pytest.mark.parametrize("certificate", ["eliminated", "reference"])
def test_zero_pairs_under_a_correction_abstain_on_a_misaligned_chain(certificate):
    """conf_drop = 0 pairs nothing: a corrected certificate then knows nothing about f_D, so
    p_m_upper = 1 and it abstains (never the uncorrected counts under a corrected label).  On the
    misaligned chain the uncorrected counts overclaim far above alpha; zero pairs stay at or below it."""
    model, x, r, c = _deq_setup(a=0.95)
    kw = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0))
    std = DEQSolve("anderson", 50, 1e-10)
    none = Smooth(model, 2, 0.5, standard=std, srs=_cfg(**kw, conf_drop=0, certificate="none"))
    zero = Smooth(model, 2, 0.5, standard=std, srs=_cfg(**kw, conf_drop=0, certificate=certificate))
    assert violation_rate(none, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40) > 5 * 0.05
    assert violation_rate(zero, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40) <= binomial_slack(0.05, 60)
    cert = zero.certify(x, 20, 400, 0.05, 40, generator=torch.Generator().manual_seed(0))
    assert (cert.K, cert.K_A, cert.p_m_upper, cert.prediction) == (0, 0, 1.0, ABSTAIN)
    assert cert.status == "abstain_pA_below_half" and cert.n_A > 0
    pred = zero.predict(x, 400, 0.05, 40, generator=torch.Generator().manual_seed(0))
    assert (pred.K_A, pred.p_m_upper, pred.prediction) == (0, 1.0, ABSTAIN)


def test_predict_takes_one_look_whatever_second_look_says():
    """PREDICT bounds the misalignment once (at alpha / 2): the second look of CERTIFY's recipe does not
    enlarge its pairs, so PREDICT pairs exactly as with second_look off (same noise, same K_A, same M)."""
    model, x, r, c = _deq_setup(a=0.95)
    kw = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0), conf_drop=None, radius_slack=None,
              radii=_table(0.25))
    std = DEQSolve("anderson", 50, 1e-10)
    looks = [Smooth(model, 2, 0.5, standard=std, srs=_cfg(**kw, second_look=g)) for g in (3.0, 0.0)]
    assert looks[0].srs.looks == 2 and looks[1].srs.looks == 1
    preds = [s.predict(x, 400, 0.05, 40, generator=torch.Generator().manual_seed(3)) for s in looks]
    assert preds[0].K_A > 0
    assert (preds[0].K, preds[0].K_A, preds[0].M, int(preds[0])) == (preds[1].K, preds[1].K_A, preds[1].M, int(preds[1]))


@pytest.mark.parametrize("a", [0.5, 0.95])
def test_table_pairing_is_sound(a):
    """Adaptive pairing aimed at table radii (K_A from n_A and the radii), with the fallback and the route
    pilot: violations stay at or below alpha, also for the deliberately misaligned chain (a = 0.95)."""
    model, x, r, c = _deq_setup(a=a)
    std = DEQSolve("naive", 100, 1e-12) if a == 0.5 else DEQSolve("anderson", 50, 1e-10)
    kw = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 3 if a == 0.5 else 2, 0.0))
    sound = Smooth(model, 2, 0.5, standard=std, srs=_cfg(**kw, conf_drop=None, radius_slack=None, radii=_table(0.05)))
    assert violation_rate(sound, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40) <= binomial_slack(0.05, 60)


@pytest.mark.parametrize("a", [0.5, 0.95])
def test_the_default_recipe_is_sound(a):
    """SRSConfig's defaults (the recipe: pairs aimed at the paper's table, a second look, the fallback with a
    0.5 N route pilot) on one-step chains: at or below alpha, also on the deliberately misaligned chain."""
    model, x, r, c = _deq_setup(a=a)
    std = DEQSolve("naive", 100, 1e-12) if a == 0.5 else DEQSolve("anderson", 50, 1e-10)
    recipe = SRSConfig(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 3 if a == 0.5 else 2, 0.0))
    assert (recipe.radius_slack, recipe.radii, recipe.second_look, recipe.route_pilot) == (None, None, 3.0, 0.5)
    sound = Smooth(model, 2, 0.5, standard=std, srs=recipe)
    assert violation_rate(sound, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40) <= binomial_slack(0.05, 60)


@pytest.mark.parametrize("grid", [None, 0.05])
def test_second_look_is_sound_on_a_misaligned_chain(grid, monkeypatch):
    """The deliberately misaligned chain (a = 0.95, one naive step): the first look often finds a
    misaligned pair, and the second look is solved where it can still raise the row (fallback off, so that
    every image pairs); violations stay at or below alpha, second looks happened, and the pairs solved are
    the pairs reported."""
    model, x, r, c = _deq_setup(a=0.95)
    kw = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0))
    s = Smooth(model, 2, 0.5, standard=DEQSolve("anderson", 50, 1e-10),
               srs=_cfg(**kw, conf_drop=None, second_look=3.0, fallback=False,
                        **({} if grid is None else dict(radius_slack=None, radii=_table(grid)))))
    decisions = []

    def recorded(*args, **kw):
        decisions.append(pairing.second_look_pays(*args, **kw))
        return decisions[-1]
    monkeypatch.setattr(smooth_module, "second_look_pays", recorded)
    reps, alpha, bad = 60, 0.05, 0
    for rep in range(reps):
        cert = s.certify(x, 20, 400, alpha, 40, generator=torch.Generator().manual_seed(rep))
        bad += cert.prediction != ABSTAIN and (cert.prediction != c or cert.radius > r)
        assert cert.std_rows == cert.K_A
    assert bad / reps <= binomial_slack(alpha, reps)
    assert any(decisions)


# ------------------------------------------------------------ where the chain starts
def test_mean_warm_start_starts_every_row_at_the_previous_batch_mean():
    """--warm_start mean: after the warm-up, every row of a batch starts from the mean of the previous
    batch's solutions.  On the linear DEQ (independent noise, z* = x / (1 - a), per-component variance
    v of z*) k naive steps from a start s leave a^k (s - z*_i): from the mean of B rows, variance
    a^(2k) v (1 + 1/B); from the previous sample's solution z_j = z*_j + e_j (itself pulled toward the
    mean), stationary variance 2 a^(2k) v / (1 + a^k).  The error ratio sqrt((1 + a^k)(1 + 1/B) / 2)
    tends to 1/sqrt(2) as the step converges; a = 0.5, k = 3: 0.75."""
    from SRS.sampling import SampleStats, SRSChain, noisy_batch
    a, k, rows = 0.5, 3, 200
    model, x, _, _ = _deq_setup(a=a)
    starts = []

    class Recording(torch.nn.Module):
        def solve(self, noisy, solver="naive", max_iter=50, z0=None, tol=None):
            starts.append(None if z0 is None else z0.clone())
            return model.solve(noisy, solver, max_iter, z0, tol)

    mse = {}
    for warm_start in ("previous", "mean"):
        starts.clear()
        chain = SRSChain(Recording(), _srs(step=DEQSolve("naive", k, 0.0), warmup=DEQSolve("naive", 200, 1e-13),
                                           warm_start=warm_start))
        g, stats, err, previous = torch.Generator().manual_seed(0), SampleStats(), [], None
        for _ in range(40):
            noisy = noisy_batch(x, rows, 0.5, g)
            chain(noisy, stats)
            if previous is not None and warm_start == "mean":
                assert torch.allclose(starts[-1], previous.mean(0, keepdim=True).expand(rows, -1))
            if previous is not None:
                err.append(((chain.z - noisy.flatten(1) / (1 - a)) ** 2).sum(1).mean().item())
            previous = chain.z.clone()
        assert starts[0] is None and all(s is not None for s in starts[1:])
        mse[warm_start] = np.mean(err)
    ratio = math.sqrt(mse["mean"] / mse["previous"])
    assert abs(ratio - math.sqrt((1 + a ** k) * (1 + 1 / rows) / 2)) < 0.03, mse


def test_mean_warm_start_skips_diverged_rows():
    """A diverged (NaN) row of the previous batch does not enter the mean every row starts from."""
    from SRS.sampling import SRSChain
    chain = SRSChain(None, _srs(warm_start="mean"))
    chain.z = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 4.0]])
    assert torch.equal(chain._start(4), torch.tensor([[2.0, 3.0]] * 4))
    chain.z = torch.full((2, 2), float("nan"))
    assert torch.equal(chain._start(3), torch.zeros(3, 2))


def test_mean_warm_start_keeps_adaptive_pairing_sound_on_a_misaligned_chain():
    """The deliberately misaligned chain (a = 0.95, one naive step) started from the mean: the pairing
    argument does not depend on where the chain starts, and violations stay at or below alpha."""
    model, x, r, c = _deq_setup(a=0.95)
    kw = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0), warm_start="mean")
    none = Smooth(model, 2, 0.5, standard=DEQSolve("anderson", 50, 1e-10), srs=_cfg(**kw, conf_drop=0, certificate="none"))
    sound = Smooth(model, 2, 0.5, standard=DEQSolve("anderson", 50, 1e-10), srs=_cfg(**kw, conf_drop=None))
    assert violation_rate(none, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40) > 5 * 0.05
    assert violation_rate(sound, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40) <= binomial_slack(0.05, 60)


def test_fallback_mixes_both_routes_and_stays_sound():
    """An input near the decision boundary of the route: some images go to the standard model, some
    to SRS; violations over both stay at or below alpha."""
    model, x, r, c = _deq_setup(a=0.5)   # true radius 0.3 at sigma 0.5, n0 20, n 600: about 1 image in 3 falls back
    s = Smooth(model, 2, 0.5, standard=DEQSolve("naive", 100, 1e-12), srs=_srs(conf_drop=None))
    routes, bad = [], 0
    for rep in range(150):
        cert = s.certify(x, 20, 600, 0.1, 50, generator=torch.Generator().manual_seed(20_000 + rep))
        routes.append(cert.route)
        bad += cert.prediction != ABSTAIN and (cert.prediction != c or cert.radius > r)
    assert {"srs", "fallback"} <= set(routes)
    assert bad / 150 <= binomial_slack(0.1, 150)


@pytest.mark.parametrize("a", [0.5, 0.95])
def test_route_pilot_moves_images_to_srs_and_stays_sound(a):
    """An input at true radius 0.36 (sigma 0.5; the one-step chain's p is about 0.9): its 20 selection
    samples often cannot rule out p near 1 (no affordable pairing), so they alone send a part of the
    images to the standard model, while a pilot of 0.5 n SRS samples can.  Violations over both routes stay at or below alpha with and without the pilot, also
    with the deliberately misaligned chain (a = 0.95, one naive step); with the well-aligned chain
    (a = 0.5) the pilot sends more images to SRS."""
    model, x, _, _ = _deq_setup(a=a)
    x = x * 1.2
    r, c = model.true_radius_and_class(x)
    std = DEQSolve("naive", 100, 1e-12) if a == 0.5 else DEQSolve("anderson", 50, 1e-10)
    kw = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 3 if a == 0.5 else 2, 0.0), conf_drop=None)
    reps, alpha, n = 80, 0.1, 800
    on_srs = {}
    for pilot in (0.0, 0.5):
        s = Smooth(model, 2, 0.5, standard=std, srs=_cfg(**kw, route_pilot=pilot))
        routes, bad = [], 0
        for rep in range(reps):
            cert = s.certify(x, 20, n, alpha, 100, generator=torch.Generator().manual_seed(40_000 + rep))
            routes.append(cert.route)
            assert cert.pilot in ((0,) if pilot == 0 else (0, math.ceil(pilot * n)))
            bad += cert.prediction != ABSTAIN and (cert.prediction != c or cert.radius > r)
        assert bad / reps <= binomial_slack(alpha, reps), (pilot, bad)
        on_srs[pilot] = routes.count("srs") + routes.count("escape")   # escape: SRS route, left after its first look
    if a == 0.5:
        assert on_srs[0.5] > on_srs[0.0], on_srs


def test_route_pilot_leaves_the_image_noise_alone():
    """The pilot draws from its own stream: an image that falls back with and without it gets the
    same fallback counts (same estimation noise), and the pilot's samples are reported."""
    model, x, _, _ = _deq_setup(a=0.5)
    x = x * 5     # far inside the radius cap: the standard model either way
    certs = {}
    for pilot in (0.0, 0.1):
        s = Smooth(model, 2, 0.5, standard=DEQSolve("naive", 100, 1e-12), srs=_srs(conf_drop=None, route_pilot=pilot))
        certs[pilot] = s.certify(x, 100, 1000, 0.001, 250, generator=torch.Generator().manual_seed(3))
    assert certs[0.0].route == certs[0.1].route == "fallback"
    assert certs[0.0].pilot == 0 and certs[0.1].pilot == 100
    assert np.array_equal(certs[0.0].counts, certs[0.1].counts) and certs[0.0].radius == certs[0.1].radius
    # the pilot's 100 one-step samples are the image's cost, not samples of it: f evaluations per
    # certification sample (100 selection + 1000 standard) grow by 100 / 1100
    assert certs[0.1].nfe * 1100 == pytest.approx(certs[0.0].nfe * 1100 + 100)


def test_fallback_route_is_ordinary_certify_on_the_standard_model():
    model, x, r, c = _deq_setup(a=0.5)
    x = x * 5
    counting = CountingDEQ(model)
    s = Smooth(counting, 2, 0.5, standard=DEQSolve("naive", 100, 1e-12), srs=_srs(conf_drop=None))
    cert = s.certify(x, 100, 1000, 0.001, 250, generator=torch.Generator().manual_seed(1))
    assert cert.route == "fallback" and cert.K == cert.K_A == 0 and cert.std_rows == 1000
    assert cert.p_A_lower == lower_confidence_bound(cert.n_A, 1000, 0.001)
    # selection by the SRS chain (warm-up from zeros, then warm starts), estimation by f_D from zeros
    assert [w for it, w, rows in counting.calls if it == 100] == [False] * 4


def test_step_cost_prices_a_tolerance_step_by_its_expected_evaluations():
    """A tolerance step with a 30-evaluation cap costs as much as the standard model by its budget, so
    every image would fall back; --step_cost gives the cost model the evaluations it really spends."""
    model, x, _, _ = _deq_setup(a=0.5)
    tol_step = dict(step=DEQSolve("anderson", 30, 1e-6), warmup=DEQSolve("naive", 3, 0.0), conf_drop=None)
    std = DEQSolve("anderson", 30, 0.0)
    capped = Smooth(model, 2, 0.5, standard=std, srs=_cfg(**tol_step))
    priced = Smooth(model, 2, 0.5, standard=std, srs=_cfg(**tol_step, step_cost=3.0))
    capped_costs, priced_costs = route_costs(capped.srs, std), route_costs(priced.srs, std)
    assert capped_costs.srs == capped_costs.standard and priced_costs.srs == 4.0
    routes = {name: {s.certify(x, 20, 600, 0.1, 50, generator=torch.Generator().manual_seed(k)).route for k in range(8)}
              for name, s in (("capped", capped), ("priced", priced))}
    assert routes["capped"] == {"fallback"} and "srs" in routes["priced"]


# ------------------------------------------------------------ re-solved low-margin samples
def test_refining_every_sample_gives_the_standard_counts_and_needs_no_pairs():
    """With a margin no sample passes, every SRS prediction is re-solved: the counts are the standard
    model's on the same noise, every sample of A is exact, no pair is solved and the certificate is the
    eliminated one with p_m_upper multiplying nothing (N_A_E = n_A)."""
    model, x, _, _ = _deq_setup(a=0.95)
    std = DEQSolve("anderson", 50, 1e-10)
    kw = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0), conf_drop=None, fallback=False)
    standard = Smooth(model, 2, 0.5, standard=std).certify(x, 20, 400, 0.01, 40, generator=torch.Generator().manual_seed(5))
    srs = Smooth(model, 2, 0.5, standard=std, srs=_cfg(**kw, refine_margin=1e9))
    c = srs.certify(x, 20, 400, 0.01, 40, generator=torch.Generator().manual_seed(5))
    assert np.array_equal(c.counts, standard.counts)
    assert c.K_A == 0 and c.M == 0 and c.N_A_E == c.n_A and c.refined == 420
    assert c.p_A_lower == lower_confidence_bound(c.n_A, 400, 0.005)
    # re-solves run after each phase in full batches: ceil(20/40) + ceil(400/40) standard calls
    assert c.std_calls == 1 + 10 and c.std_rows == 420


def test_refined_samples_are_exact_and_the_pairs_come_from_the_others():
    model, x, _, _ = _deq_setup(a=0.95)
    counting = CountingDEQ(model)
    kw = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0), conf_drop=None, fallback=False)
    s = Smooth(counting, 2, 0.5, standard=DEQSolve("anderson", 50, 1e-10), srs=_cfg(**kw, refine_margin=0.5))
    c = s.certify(x, 20, 400, 0.01, 40, generator=torch.Generator().manual_seed(7))
    assert 0 < c.refined < 420
    assert c.std_rows == c.refined + c.K_A
    # every pair is an unrefined sample of A: K_A is at most the unrefined part of A
    assert c.K_A <= c.n_A
    # re-solving removes misalignment: the one-step chain of a = 0.95 has misaligned pairs without it
    plain = Smooth(model, 2, 0.5, standard=DEQSolve("anderson", 50, 1e-10), srs=_cfg(**kw))
    assert c.M <= plain.certify(x, 20, 400, 0.01, 40, generator=torch.Generator().manual_seed(7)).M


def test_refine_margin_keeps_adaptive_pairing_sound_on_a_misaligned_chain():
    """The misaligned chain of the test above, with low-margin samples re-solved: at or below alpha,
    and far fewer misaligned pairs than without re-solving."""
    model, x, r, c = _deq_setup(a=0.95)
    kw = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0), conf_drop=None)
    std = DEQSolve("anderson", 50, 1e-10)
    refined = Smooth(model, 2, 0.5, standard=std, srs=_cfg(**kw, refine_margin=1.0))
    plain = Smooth(model, 2, 0.5, standard=std, srs=_cfg(**kw))
    assert violation_rate(refined, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40) <= binomial_slack(0.05, 60)
    m_plain = m_refined = 0
    for rep in range(10):
        m_plain += plain.certify(x, 20, 400, 0.05, 40, generator=torch.Generator().manual_seed(rep)).M
        m_refined += refined.certify(x, 20, 400, 0.05, 40, generator=torch.Generator().manual_seed(rep)).M
    assert m_refined < m_plain


def test_eliminated_count_with_exact_samples():
    from SRS.bounds import eliminated_count, upper_confidence_bound
    p_m, n_a_e = eliminated_count(900, 100, 1, 0.01, exact=300)
    assert p_m == upper_confidence_bound(1, 100, 0.01)
    assert n_a_e == 300 + math.floor(600 * (1 - p_m))
    assert eliminated_count(900, 0, 0, 0.01, exact=900) == (1.0, 900)
    # fewer pairs are needed when part of A is exact
    assert pairs_needed(9000, 10000, 0.001, 0.05, 9000, exact=4000) < pairs_needed(9000, 10000, 0.001, 0.05, 9000)
