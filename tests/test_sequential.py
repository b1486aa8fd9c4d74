"""Sequential CERTIFY (SRS.sequential): the look schedule and levels, soundness on closed-form models at the
worst case for a stopping rule (p_A exactly at a table threshold), the fixed-N path unchanged, and the
certify.py plumbing (flags, one-line errors, results file, --resume, analysis).

The closed-form models are those of test_smoothing.py: a linear classifier sign(w.x) with ||w|| = 1,
smoothed at sigma, has p_A = Phi(w.x / sigma) and the exact certified radius |w.x|; the linear DEQ has a
known radius too.  A certificate is *violated* when it names a class with radius above the true one (or
any class where p_A = 1/2 exactly); soundness means violations happen with probability <= alpha.
"""
import math

import pytest
import torch
from scipy.stats import norm

import SRS.runner as srs_runner
import SRS.sequential as sequential
from SRS.analysis import certified_accuracy
from SRS.pairing import ESCAPE_SHARE
from SRS.bounds import (futility_targets, lower_confidence_bound, row_decided, sequential_levels, sequential_looks,
                        table_thresholds)
from SRS.results import CERTIFY_COLUMNS, SEQUENTIAL_COLUMNS, read_results, read_rows
from SRS.settings import DEQSolve, SRSConfig
from SRS.smooth import ABSTAIN, Smooth
from test_smoothing import Linear, _deq_setup, binomial_slack

from test_certify_cli import _no_dataset, assert_one_line_error, certify_script

ALPHA = 0.05
SIGMA = 0.5
D = 4


def linear_point(margin):
    """The linear classifier of test_smoothing (||w|| = 1) and an input at signed distance ``margin``:
    p(class 1) = Phi(margin / sigma), true radius |margin|."""
    w = torch.ones(D, dtype=torch.float64) / math.sqrt(D)
    return Smooth(Linear(w, 0.0), 2, SIGMA), torch.full((1, 1, D), margin / math.sqrt(D), dtype=torch.float64)


def sequential_violations(smooth, x, true_r, true_c, reps, radii, n0=20, N=1600, batch=100, seed0=20_000):
    """(violation rate, mean samples) of sequential CERTIFY over ``reps`` seeds; true_c None: any
    certificate is a violation (p_A = 1/2 exactly)."""
    bad, samples = 0, 0
    for rep in range(reps):
        c = smooth.certify_sequential(x, n0, N, ALPHA, batch, radii, generator=torch.Generator().manual_seed(seed0 + rep))
        samples += c.samples
        if c.prediction != ABSTAIN and (true_c is None or c.prediction != true_c or c.radius > true_r):
            bad += 1
    return bad / reps, samples / reps


# ------------------------------------------------------------------ the pure parts
def test_looks_double_from_one_batch_then_come_evenly_to_N():
    assert sequential_looks(10000, 1000) == tuple(range(1000, 10001, 1000))
    assert sequential_looks(10000, 400) == (400, 800) + tuple(range(1200, 9601, 1200)) + (10000,)
    assert sequential_looks(100000, 1000) == (1000, 2000, 4000, 8000) + tuple(range(10000, 100001, 10000))
    assert sequential_looks(400, 50) == tuple(range(50, 401, 50))
    assert sequential_looks(30, 50) == (30,) and sequential_looks(100, 100) == (100,)
    for N, batch in [(10000, 1000), (10000, 400), (100000, 1000), (777, 64)]:
        looks = sequential_looks(N, batch)
        assert all(n % batch == 0 for n in looks[:-1]) and list(looks) == sorted(set(looks)) and looks[-1] == N


@pytest.mark.parametrize("looks", [1, 2, 5, 10])
def test_levels_sum_to_alpha_with_most_at_N(looks):
    levels = sequential_levels(0.001, looks)
    assert len(levels) == looks and sum(levels) == pytest.approx(0.001)
    assert levels[-1] == pytest.approx(0.001 if looks == 1 else 0.0008)
    assert len(set(levels[:-1])) <= 1


def test_price_at_N_is_the_bound_at_four_fifths_of_alpha():
    """The figures docs/guarantees.md ("Sequential CERTIFY") states: N = 10000, alpha = 0.001."""
    N, alpha = 10000, 0.001
    fixed, seq = lower_confidence_bound(N, N, alpha), lower_confidence_bound(N, N, 0.8 * alpha)
    assert fixed == pytest.approx(alpha ** (1 / N)) and seq == pytest.approx((0.8 * alpha) ** (1 / N))
    assert round(seq, 6) == 0.999287 and round(fixed, 6) == 0.999309
    assert round(norm.ppf(seq), 3) == 3.189 and round(norm.ppf(fixed), 3) == 3.199
    assert round(norm.ppf(lower_confidence_bound(9000, N, 0.8 * alpha)), 4) == 1.2276
    assert round(norm.ppf(lower_confidence_bound(9000, N, alpha)), 4) == 1.2287


def test_thresholds_and_the_decision():
    t = table_thresholds([0.5, 0.25, 0.0, 0.25], 0.5)
    assert t == (0.5, pytest.approx(norm.cdf(0.5)), pytest.approx(norm.cdf(1.0)))
    assert table_thresholds([1.0], 0.5)[0] == 0.5                      # abstain threshold always there
    assert row_decided(0.70, 0.83, t) and row_decided(0.2, 0.45, t)   # between two thresholds; below 1/2
    assert not row_decided(0.45, 0.55, t) and not row_decided(0.80, 0.90, t)
    # futility: an upper bound above t = Phi(2) but below what the bound at N needs settles t
    targets = (0.5, 0.7, 0.87)
    assert row_decided(0.80, 0.86, t, targets) and not row_decided(0.80, 0.87, t, targets)


def test_futility_targets_are_the_least_count_whose_bound_at_N_reaches_the_threshold():
    N, level = 2000, 0.0008
    t = table_thresholds([0.0, 0.25, 0.5, 1.5], SIGMA)
    targets = futility_targets(t, N, level)
    for threshold, target in zip(t[:-1], targets[:-1]):
        k = round(target * N)
        assert lower_confidence_bound(k, N, level) >= threshold > lower_confidence_bound(k - 1, N, level)
    assert lower_confidence_bound(N, N, level) < t[-1] and targets[-1] > 1   # 3 sigma is out of reach at N 2000


def test_futility_stops_early_where_N_would_not_certify_and_keeps_the_rows_N_would():
    """p = Phi(0.2 / 0.5) sits below the target of the table radius 0.25, so fixed N rarely certifies 0.25: the
    futility bound settles it early.  p = Phi(0.35 / 0.5) clears the target, so the row radius 0.25 stays."""
    N, batch, radii = 1600, 100, [0.0, 0.25, 0.5]
    smooth, x = linear_point(0.2)
    stops = [smooth.certify_sequential(x, 20, N, ALPHA, batch, radii, generator=torch.Generator().manual_seed(s))
             for s in range(40)]
    assert sum(c.n < N for c in stops) >= 36 and all(c.radius < 0.25 for c in stops)
    smooth, x = linear_point(0.35)
    rows = [smooth.certify_sequential(x, 20, N, ALPHA, batch, radii, generator=torch.Generator().manual_seed(s))
            for s in range(40)]
    assert sum(c.prediction == 1 and c.radius >= 0.25 for c in rows) >= 38


# ------------------------------------------------------------------ soundness (standard model)
def test_sound_with_p_exactly_at_a_table_threshold():
    """p_A = Phi(0.25 / 0.5) is the threshold of the table radius 0.25: the rule's worst case (the
    bounds keep straddling it, and every early stop above it is a violation)."""
    smooth, x = linear_point(0.25)
    rate, samples = sequential_violations(smooth, x, 0.25, 1, 600, [0.0, 0.25, 0.5])
    assert rate <= binomial_slack(ALPHA, 600)


def test_sound_between_thresholds_and_stops_early():
    smooth, x = linear_point(0.4)
    rate, samples = sequential_violations(smooth, x, 0.4, 1, 400, [0.25, 0.5])
    assert rate <= binomial_slack(ALPHA, 400)
    assert samples < 0.7 * (20 + 1600)


def test_sound_at_one_half():
    """w.x = 0: p = 1/2 for both classes, so any certificate (of either class) is wrong."""
    smooth, x = linear_point(0.0)
    rate, _ = sequential_violations(smooth, x, 0.0, None, 400, [0.0, 0.25])
    assert rate <= binomial_slack(ALPHA, 400)


def test_full_alpha_at_every_look_would_not_be_sound(monkeypatch):
    """Guard against a vacuous soundness test: spending all of alpha at each look overclaims at a threshold."""
    monkeypatch.setattr(sequential, "sequential_levels", lambda alpha, looks: (alpha,) * looks)
    smooth, x = linear_point(0.25)
    rate, _ = sequential_violations(smooth, x, 0.25, 1, 600, [0.0, 0.25, 0.5], N=2000, batch=50)
    assert rate > binomial_slack(ALPHA, 600)


# ------------------------------------------------------------------ soundness (SRS, misaligned chain)
MISALIGNED = dict(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 2, 0.0))
STD = DEQSolve("anderson", 50, 1e-10)


@pytest.mark.parametrize("pairing,reps", [(dict(conf_drop=100), 200), (dict(), 120)], ids=["fixed_K", "adaptive"])
def test_sequential_srs_sound_on_a_misaligned_chain(pairing, reps):
    """a = 0.95 with one naive step: the chain averages past noise and is far more confident than f_D
    (test_smoothing); the table's radius 0.3 is the true radius (p_A exactly at its threshold)."""
    model, x, r, c = _deq_setup(a=0.95)
    smooth = Smooth(model, 2, SIGMA, standard=STD, srs=SRSConfig(**MISALIGNED, **pairing))
    rate, _ = sequential_violations(smooth, x, r, c, reps, [0.0, r], N=800, batch=40)
    assert rate <= binomial_slack(ALPHA, reps)


def test_sequential_srs_escapes_soundly_on_a_misaligned_chain():
    """The recipe's escape in sequential CERTIFY: most images of the misaligned chain leave SRS after their first
    look for sequential CERTIFY of the standard model on noise of its own (its evaluations on top of the pairs',
    the certificate's ``samples`` the SRS branch's); violations over all routes stay at or below alpha."""
    model, x, r, c = _deq_setup(a=0.95)
    smooth = Smooth(model, 2, SIGMA, standard=STD, srs=SRSConfig(**MISALIGNED))
    reps, N, bad, routes = 80, 800, 0, []
    for rep in range(reps):
        cert = smooth.certify_sequential(x, 20, N, ALPHA, 40, [0.0, r], generator=torch.Generator().manual_seed(rep))
        routes.append(cert.route)
        bad += cert.prediction != ABSTAIN and (cert.prediction != c or cert.radius > r)
        if cert.route == "escape":
            assert cert.M > 0 and cert.std_rows == cert.K_A + cert.n and 20 < cert.samples <= 20 + N
    assert routes.count("escape") >= reps // 3
    assert bad / reps <= binomial_slack(ALPHA, reps)


def test_sequential_srs_keeps_the_row_it_stopped_on():
    """An aligned chain (a = 0.5, steps run to the fixed point, so no pair is misaligned): wherever sequential SRS
    stops before N, the eliminated certificate reaches the row the SRS counts decided (its pairs are sized at
    the stopping look's level, and it only stops where they can be); the stops still come early.  Sizing the
    pairs at CERTIFY's level and stopping where the raw counts clear a threshold lost that row."""
    model, x, r, c = _deq_setup(a=0.5)
    cfg = SRSConfig(step=DEQSolve("naive", 60, 0.0), warmup=DEQSolve("naive", 60, 0.0))
    smooth = Smooth(model, 2, SIGMA, standard=DEQSolve("naive", 100, 1e-12), srs=cfg)
    radii, N, batch, alpha = [0.0, 0.1, 0.2], 3200, 100, 0.05
    looks = sequential_looks(N, batch)
    level = sequential_levels((1 - ESCAPE_SHARE) * alpha / 2, len(looks))[0]   # the SRS branch leaves the escape its share
    thresholds = table_thresholds(radii, SIGMA)
    early = 0
    for seed in range(12):
        cert = smooth.certify_sequential(x, 20, N, alpha, batch, radii, generator=torch.Generator().manual_seed(seed))
        assert cert.M == 0
        lower = lower_confidence_bound(cert.n_A, cert.n, level)
        if cert.stop != "decided" or cert.route != "srs" or lower < 0.5:
            continue
        early += 1
        row = max(t for t in thresholds if t <= lower)
        assert cert.prediction == c and cert.p_A_lower >= row
    assert early >= 3


def test_sequential_srs_refuses_what_it_cannot_certify():
    model, x, _, _ = _deq_setup()
    for cfg in (SRSConfig(**MISALIGNED, conf_drop=20, certificate="reference"),
                SRSConfig(**MISALIGNED, refine_margin=1.0)):
        with pytest.raises(ValueError):
            Smooth(model, 2, SIGMA, standard=STD, srs=cfg).certify_sequential(x, 10, 100, ALPHA, 50, [0.1])


# ------------------------------------------------------------------ the fixed-N path and the last look
def _baseline_models():
    model, x, _, _ = _deq_setup(a=0.5)
    std = Smooth(model, 2, 0.5, standard=DEQSolve("naive", 100, 1e-12))
    srs = Smooth(model, 2, 0.5, standard=DEQSolve("naive", 100, 1e-12),
                 srs=SRSConfig(step=DEQSolve("naive", 1, 0.0), warmup=DEQSolve("naive", 3, 0.0), conf_drop=60))
    return x, std, srs


def test_fixed_N_certify_is_unchanged():
    """The certificates CERTIFY gave before sequential mode existed (same seed, same settings)."""
    x, std, srs = _baseline_models()
    a = std.certify(x, 20, 400, 0.01, 50, generator=torch.Generator().manual_seed(4))
    assert (a.prediction, a.radius, a.n_A, a.n, a.p_A_lower) == (1, 0.1910855064041261, 282, 400, 0.6488327393307989)
    assert a.counts.tolist() == [118, 282] and a.stop == "" and a.samples == 0
    b = srs.certify(x, 20, 400, 0.01, 50, generator=torch.Generator().manual_seed(4))
    assert (b.prediction, b.radius, b.n_A, b.p_A_lower, b.K, b.K_A, b.M) == (ABSTAIN, 0.0, 327, 0.4569666767051658,
                                                                             60, 46, 8)


def test_an_image_that_runs_to_N_is_fixed_N_certify_at_four_fifths_of_alpha():
    """Same noise (the looks are whole mini-batches), bound at N at 0.8 alpha.  A table with a radius every
    0.005 keeps a threshold between the bounds at every look, so the image runs to N."""
    x, std, _ = _baseline_models()
    radii = [0.005 * i for i in range(100)]
    seq = std.certify_sequential(x, 20, 3200, 0.01, 50, radii, generator=torch.Generator().manual_seed(4))
    fixed = std.certify(x, 20, 3200, 0.01, 50, generator=torch.Generator().manual_seed(4))
    assert seq.stop == "N" and seq.n == 3200 and seq.samples == 3220
    assert seq.n_A == fixed.n_A and seq.p_A_lower == lower_confidence_bound(fixed.n_A, 3200, 0.008)
    assert seq.radius == pytest.approx(0.5 * norm.ppf(seq.p_A_lower)) and 0 < seq.radius < fixed.radius


def test_a_clear_image_stops_at_the_first_look():
    smooth, x = linear_point(2.0)                      # p_A = Phi(4): every sample votes class 1
    c = smooth.certify_sequential(x, 20, 10000, 0.001, 500, [0.0, 0.25, 0.5], generator=torch.Generator().manual_seed(0))
    assert c.stop == "decided" and c.n == 500 and c.samples == 520 and c.prediction == 1
    level = sequential_levels(0.001, len(sequential_looks(10000, 500)))[0]
    assert c.radius >= 0.5 and c.p_A_lower == lower_confidence_bound(500, 500, level)


# ------------------------------------------------------------------ certify.py
SMOKE = ["--sequential", "--radii", "0", "0.25", "0.5", "--N0", "20", "--N", "400", "--batch", "50", "--max", "3",
         "--skip", "50", "--quiet"]


def test_certify_py_sequential_smoke_and_analysis(tiny_checkpoint, tmp_path):
    out = tmp_path / "seq.tsv"
    certify_script.main(["digits", tiny_checkpoint, "0.5", str(out)] + SMOKE)
    meta, columns, rows, _ = read_rows(out)
    assert tuple(columns) == SEQUENTIAL_COLUMNS and columns[:len(CERTIFY_COLUMNS)] == list(CERTIFY_COLUMNS)
    assert meta["mode"] == "certify_sequential" and meta["radii"] == "[0.0, 0.25, 0.5]"
    assert meta["looks"] == "[50, 100, 150, 200, 250, 300, 350, 400]" and meta["sequential"] == "true"
    assert meta["futility_level"] == "0.01"
    assert len(rows) == 3
    for r in rows:
        assert r["stop"] in sequential.STOP_REASONS and int(r["samples"]) == 20 + int(r["n"])
        assert int(r["n"]) in (50, 100, 200, 400)
    df = read_results(out)
    assert len(df) == 3 and df["samples"].dtype.kind in "if" and list(df["stop"]) == [r["stop"] for r in rows]
    assert certified_accuracy(df, [0.0, 0.25]).shape == (2,)
    # --resume with another table is refused in one line naming the radii
    with pytest.raises(SystemExit) as exc:
        certify_script.main(["digits", tiny_checkpoint, "0.5", str(out), "--resume"] + SMOKE[:2] + ["0.3"] + SMOKE[5:])
    assert exc.value.code == 2
    assert read_rows(out)[2] == rows


BAD_SEQUENTIAL = [
    ("radii_without_sequential", ["--radii", "0", "0.5"], ["--radii sets the table", "add --sequential"]),
    ("radii_nan", ["--sequential", "--radii", "0", "nan"], ["--radii must be finite numbers >= 0", "nan"]),
    ("radii_inf", ["--sequential", "--radii", "inf"], ["--radii must be finite numbers >= 0", "inf"]),
    ("radii_negative", ["--sequential", "--radii", "-0.25"], ["--radii must be finite numbers >= 0", "-0.25"]),
    ("srs_reference", ["--sequential", "--radii", "0", "--srs", "--conf_drop", "20", "--certificate", "reference"],
     ["--sequential with --srs needs --certificate eliminated"]),
    ("srs_refine", ["--sequential", "--radii", "0", "--srs", "--refine_margin", "1"],
     ["--sequential with --srs does not take --refine_margin"]),
]


@pytest.mark.parametrize("name,extra,needles", BAD_SEQUENTIAL, ids=[c[0] for c in BAD_SEQUENTIAL])
def test_bad_sequential_input_one_line_error_and_no_output(tiny_checkpoint, tmp_path, capsys, monkeypatch, name,
                                                           extra, needles):
    monkeypatch.setattr(srs_runner, "get_dataset", _no_dataset)
    out = tmp_path / "res" / "out.tsv"
    with pytest.raises(SystemExit) as exc:
        certify_script.main(["digits", tiny_checkpoint, "0.25", str(out), "--N", "60", "--quiet"] + extra)
    assert_one_line_error(capsys, exc, *needles)
    assert not out.exists()


def test_sequential_decides_the_default_table_without_radii():
    """--sequential without --radii decides the paper's table: multiples of sigma / 2 from 0 to 3 sigma; with
    --srs the adaptive pairs aim at the same radii (one flag, one table)."""
    from SRS.cli import certify_mode, run_spec
    args = certify_script.parse_args(["digits", "ckpt.pth", "0.25", "out.tsv", "--sequential", "--srs"])
    spec = run_spec(args, table=True)
    mode = certify_mode(args, spec)
    assert mode.radii == (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
    _, srs = spec.smoothing.resolve(DEQSolve("anderson", 30, 0.0), 0.25)
    assert srs.radii == mode.radii
    args = certify_script.parse_args(["digits", "ckpt.pth", "0.25", "out.tsv", "--sequential", "--radii", "0.5", "0"])
    assert certify_mode(args, run_spec(args, table=True)).radii == (0.0, 0.5)
