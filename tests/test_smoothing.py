"""Randomized smoothing and SRS certificates against closed forms.

A linear binary classifier sign(w.x + b) smoothed with N(0, sigma^2 I) is itself:
P(class 1 | x) = Phi((w.x + b) / (sigma ||w||)), and its exact certified radius is
|w.x + b| / ||w||.  A contractive linear DEQ z = A z + B x has the exact fixed point
z* = (I - A)^{-1} B x, so a linear head on z* is again a linear classifier of x with
a known radius.  A certificate is *violated* when it returns the wrong class or a
radius above the true one; soundness means violations happen with probability <= alpha.
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta, norm
from statsmodels.stats.proportion import proportion_confint

from DEQ.interface import DEQOutput
from DEQ.solvers import solve
from SRS.bounds import lower_confidence_bound, radius_from_p, upper_confidence_bound
from SRS.settings import DEQSolve, SRSConfig
from SRS.smooth import ABSTAIN, Smooth


class Linear(torch.nn.Module):
    """Two-class linear classifier on R^d (inputs shaped (B, 1, 1, d))."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, x):
        s = x.flatten(1) @ self.w + self.b
        return torch.stack([-s, s], 1)


class LinearDEQ(torch.nn.Module):
    """z = a z + x (0 <= a < 1), so z* = x / (1 - a); the head sign(w.z + b) at z* is the linear
    classifier sign(w.x / (1 - a) + b) of x, whose smoothed version and radius are known exactly."""

    def __init__(self, w, b, a):
        super().__init__()
        self.w, self.b, self.a = w, b, a

    def solve(self, x, solver="naive", max_iter=50, z0=None, tol=None):
        xf = x.flatten(1)
        if z0 is None:
            z0 = torch.zeros_like(xf)
        res = solve(solver, lambda z: self.a * z + xf, z0, max_iter, tol=1e-12 if tol is None else tol, stop_mode="abs")
        s = res.z @ self.w + self.b
        return DEQOutput(torch.stack([-s, s], 1), res.z, res)

    def forward(self, x):
        return self.solve(x).logits

    def true_radius_and_class(self, x):
        s = float(x.flatten() @ self.w) / (1 - self.a) + self.b
        return abs(s) / (float(self.w.norm()) / (1 - self.a)), int(s > 0)


def violation_rate(smooth, x, true_r, true_c, reps, n0, n, alpha, batch):
    bad = 0
    for rep in range(reps):
        g = torch.Generator().manual_seed(10_000 + rep)
        c = smooth.certify(x, n0, n, alpha, batch, generator=g)
        if c.prediction != ABSTAIN and (c.prediction != true_c or c.radius > true_r):
            bad += 1
    return bad / reps


def binomial_slack(alpha, reps):
    return alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps)


# ------------------------------------------------------------------ bounds
@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (990, 1000), (5000, 10000)])
def test_bounds_equal_statsmodels_and_scipy(k, n):
    a = 0.001
    assert lower_confidence_bound(k, n, a) == pytest.approx(proportion_confint(k, n, alpha=2 * a, method="beta")[0])
    assert upper_confidence_bound(k, n, a) == pytest.approx(proportion_confint(k, n, alpha=2 * a, method="beta")[1])
    if k > 0:
        assert lower_confidence_bound(k, n, a) == pytest.approx(beta.ppf(a, k, n - k + 1))
    if k < n:
        assert upper_confidence_bound(k, n, a) == pytest.approx(beta.ppf(1 - a, k + 1, n - k))


def test_radius_formula():
    assert radius_from_p(0.5, 0.25) == 0.0
    assert radius_from_p(0.975, 0.5) == pytest.approx(0.5 * norm.ppf(0.975))


# --------------------------------------------------------- standard smoothing
def test_standard_certificate_is_sound_on_a_linear_classifier():
    d, sigma, alpha = 8, 0.5, 0.1
    w = torch.ones(d, dtype=torch.float64) / math.sqrt(d)
    model = Linear(w, 0.0)
    x = torch.full((1, 1, d), 0.4 / math.sqrt(d), dtype=torch.float64)  # true margin 0.4 -> radius 0.4
    smooth = Smooth(model, 2, sigma)
    rate = violation_rate(smooth, x, 0.4, 1, reps=300, n0=20, n=200, alpha=alpha, batch=200)
    assert rate <= binomial_slack(alpha, 300)


def test_point_estimate_would_not_be_sound():
    """Guard against a vacuous soundness test: plugging in p_hat instead of the bound violates often."""
    d, sigma = 8, 0.5
    w = torch.ones(d, dtype=torch.float64) / math.sqrt(d)
    x = torch.full((1, 1, d), 0.4 / math.sqrt(d), dtype=torch.float64)
    smooth = Smooth(Linear(w, 0.0), 2, sigma)
    over = 0
    for rep in range(200):
        c = smooth.certify(x, 20, 200, 0.1, 200, generator=torch.Generator().manual_seed(rep))
        p_hat = c.n_A / c.n
        over += sigma * norm.ppf(min(p_hat, 1 - 1e-9)) > 0.4
    assert over / 200 > 0.3


def test_certify_and_predict_agree_with_closed_form_probability():
    d, sigma = 4, 0.25
    w = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    x = torch.tensor([[[0.1, 0.3, -0.2, 0.5]]], dtype=torch.float64)
    p_true = norm.cdf(0.1 / sigma)
    smooth = Smooth(Linear(w, 0.0), 2, sigma)
    c = smooth.certify(x, 100, 20000, 0.001, 5000, generator=torch.Generator().manual_seed(0))
    assert c.prediction == 1 and abs(c.n_A / c.n - p_true) < 0.015
    assert c.radius == pytest.approx(sigma * norm.ppf(lower_confidence_bound(c.n_A, c.n, 0.001)))
    assert c.radius < 0.1
    p = smooth.predict(x, 2000, 0.001, 1000, generator=torch.Generator().manual_seed(1))
    assert p.prediction == 1
    # on the decision boundary the smoothed classifier is a coin flip: PREDICT must abstain
    x0 = torch.tensor([[[0.0, 0.3, -0.2, 0.5]]], dtype=torch.float64)
    assert smooth.predict(x0, 2000, 0.001, 1000, generator=torch.Generator().manual_seed(2)).prediction == ABSTAIN


def test_certificate_unpacks_like_locuslab_smooth():
    w = torch.ones(3, dtype=torch.float64)
    smooth = Smooth(Linear(w, 0.0), 2, 0.1)
    pred, radius = smooth.certify(torch.ones(1, 1, 3, dtype=torch.float64), 10, 100, 0.001, 50)
    assert pred == 1 and radius > 0


# ------------------------------------------------------------------- SRS
def _deq_setup(a=0.5):
    d = 6
    w = torch.ones(d, dtype=torch.float64) / math.sqrt(d)
    model = LinearDEQ(w, 0.0, a)
    x = torch.full((1, 1, d), 0.3 / math.sqrt(d), dtype=torch.float64)  # true radius 0.3
    r, c = model.true_radius_and_class(x)
    return model, x, r, c


def test_srs_with_enough_steps_gives_the_standard_counts():
    model, x, _, _ = _deq_setup()
    std = Smooth(model, 2, 0.5, standard=DEQSolve("naive", 200, 1e-13))
    srs = Smooth(model, 2, 0.5, standard=DEQSolve("naive", 200, 1e-13),
                 srs=SRSConfig(step=DEQSolve("naive", 200, 1e-13), warmup=DEQSolve("naive", 200, 1e-13), conf_drop=50))
    a = std.certify(x, 50, 500, 0.01, 100, generator=torch.Generator().manual_seed(3))
    b = srs.certify(x, 50, 500, 0.01, 100, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(a.counts, b.counts)
    assert b.M == 0 and b.K == 50


def test_srs_eliminated_certificate_is_sound():
    model, x, r, c = _deq_setup(a=0.5)
    srs = Smooth(model, 2, 0.5, standard=DEQSolve("naive", 100, 1e-12),
                 srs=SRSConfig(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 3, 0.0), conf_drop=100))
    rate = violation_rate(srs, x, r, c, reps=150, n0=20, n=300, alpha=0.1, batch=50)
    assert rate <= binomial_slack(0.1, 150)


def test_misaligned_srs_is_caught_by_the_eliminated_bound():
    """a = 0.95 and one naive step from a warm start: the SRS chain averages many past noisy inputs,
    so its predictions are far more confident than f_D's.  Certified as is ('none'), radii are too
    large most of the time; the correlation-eliminated certificate stays sound."""
    model, x, r, c = _deq_setup(a=0.95)
    cfg = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0), conf_drop=200)
    naive_cert = Smooth(model, 2, 0.5, standard=DEQSolve("anderson", 50, 1e-10), srs=SRSConfig(**cfg, certificate="none"))
    sound = Smooth(model, 2, 0.5, standard=DEQSolve("anderson", 50, 1e-10), srs=SRSConfig(**cfg))
    bad_none = violation_rate(naive_cert, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40)
    bad_sound = violation_rate(sound, x, r, c, reps=60, n0=20, n=400, alpha=0.05, batch=40)
    assert bad_none > 5 * 0.05  # the uncorrected chain overclaims far beyond alpha
    assert bad_sound <= binomial_slack(0.05, 60)


def test_reference_variant_is_weaker_than_eliminated():
    model, x, _, _ = _deq_setup(a=0.5)
    kw = dict(standard=DEQSolve("naive", 100, 1e-12))
    step = dict(step=DEQSolve("naive", 2, 0.0), warmup=DEQSolve("naive", 10, 0.0), conf_drop=100)
    ours = Smooth(model, 2, 0.3, srs=SRSConfig(**step), **kw).certify(x, 20, 1000, 0.01, 100, torch.Generator().manual_seed(5))
    ref = Smooth(model, 2, 0.3, srs=SRSConfig(**step, certificate="reference"), **kw).certify(
        x, 20, 1000, 0.01, 100, torch.Generator().manual_seed(5))
    assert ours.n_A == ref.n_A and ours.p_m_upper == ref.p_m_upper
    assert ours.p_A_lower <= ref.p_A_lower
    assert ours.N_A_E == math.floor(ours.n_A * (1 - ours.p_m_upper))


def test_nonfinite_logits_abstain_with_a_reason():
    class Broken(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(x.shape[0], 3)
            out[::7] = float("nan")
            return out
    c = Smooth(Broken(), 3, 0.1).certify(torch.zeros(1, 2, 2), 10, 50, 0.01, 25)
    assert c.prediction == ABSTAIN and c.radius == 0.0 and c.status.startswith("nonfinite")


def test_seed_reproducibility():
    model, x, _, _ = _deq_setup()
    s = Smooth(model, 2, 0.5, standard=DEQSolve("naive", 50),
               srs=SRSConfig(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 5, 0.0), conf_drop=30))
    a = s.certify(x, 20, 200, 0.01, 40, generator=torch.Generator().manual_seed(9))
    b = s.certify(x, 20, 200, 0.01, 40, generator=torch.Generator().manual_seed(9))
    assert np.array_equal(a.counts, b.counts) and a.radius == b.radius and a.M == b.M


def test_a_diverging_solve_makes_the_image_abstain():
    model, x, _, _ = _deq_setup()

    class Diverging(LinearDEQ):
        def solve(self, x, solver="naive", max_iter=50, z0=None, tol=None):
            xf = x.flatten(1)
            z0 = torch.zeros_like(xf) if z0 is None else z0
            blow = torch.zeros(xf.shape[0], 1, dtype=xf.dtype)
            blow[::5] = float("inf")  # every 5th sample's map explodes to inf/NaN at once
            res = solve(solver, lambda z: self.a * z + xf + blow * (z + 1), z0, max_iter, tol=1e-12)
            s = res.z @ self.w + self.b
            return DEQOutput(torch.stack([-s, s], 1), res.z, res)
    bad = Diverging(model.w, model.b, model.a)
    for srs in (None, SRSConfig(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 3, 0.0), conf_drop=10)):
        c = Smooth(bad, 2, 0.5, standard=DEQSolve("naive", 5), srs=srs).certify(x, 10, 50, 0.01, 25)
        assert c.prediction == ABSTAIN and c.status.startswith("nonfinite")
