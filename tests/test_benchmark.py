"""The comparison suite and the reproduction script's guard rails."""
import math
import os
import subprocess
import sys

from conftest import ROOT

import pandas as pd
import pytest

from SRS.benchmark import (comparison, max_gap, method_summary, paper_methods, run_methods, srs,
                           standard, summary_markdown)
from SRS.runner import DataSpec, RunSpec, Sampling, SmoothingSpec


def test_paper_methods_are_the_papers_rows():
    labels = [m.label for m in paper_methods()]
    assert labels == ["MDEQ-30A", "SRS-MDEQ-1N", "SRS-MDEQ-1A", "SRS-MDEQ-3A"]
    assert {1, 5, 30} <= set(paper_methods()[0].rungs)  # the paper's MDEQ-1A / -5A rows come from the ladder
    assert dict(srs(1).settings)["srs"] is True and dict(standard(30).settings)["srs"] is False
    assert paper_methods(400)[-1].label == "SRS-MDEQ-3A K=400"


def test_suite_runs_resumes_and_tabulates(tmp_path, tiny_checkpoint):
    common = RunSpec(data=DataSpec("digits", skip=90), checkpoint=tiny_checkpoint, outfile="",
                     sampling=Sampling(0.25, 40, 0.001, 20, 10), smoothing=SmoothingSpec(tol=0.0), progress=False)
    methods = [standard(3), srs(1, conf_drop=10, std=("anderson", 3), warmup=("anderson", 3)),
               srs(1, std=("anderson", 3), warmup=("anderson", 3))]
    paths = run_methods(common, methods, str(tmp_path), log=lambda m: None)
    table, runs = comparison(paths, [0.0, 0.1], baseline="MDEQ-3A")
    assert list(table.index) == ["MDEQ-3A", "SRS-MDEQ-1A K=10", "SRS-MDEQ-1A"] and len(runs["MDEQ-3A"]) == 5
    assert runs["SRS-MDEQ-1A K=10"]["K"].max() == 10
    summary = method_summary(runs, "MDEQ-3A", [0.0, 0.1], 50, 0.001, 0.25)
    assert list(summary["method"]) == list(table.index) and (summary["std calls/image"] >= 1).all()
    gap, at = max_gap(runs, "SRS-MDEQ-1A K=10", "MDEQ-3A", [0.0, 0.1])
    assert 0.0 <= gap <= 100.0 and at in (0.0, 0.1)
    before = {p: open(p).read() for p in paths.values()}
    run_methods(common, methods, str(tmp_path), log=lambda m: None)
    assert {p: open(p).read() for p in paths.values()} == before  # finished files are reused, not redone


def test_paper_setting_without_cifar_stops_cleanly(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--paper", "--ckpt", "x.pth",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: CIFAR-10 is not available here") and len(res.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "reports")


def test_speed_limit_in_the_summary_counts_evaluations_at_the_table_radii():
    """Three images of a 30-evaluation standard model over 1000 samples; SRS-MDEQ-1A (1 evaluation per sample);
    sigma 0.5, table radii 0, 0.125, ..., 1.5.  Image 0 (n_A 900 of 1000, radius 0.58) counts at 0.5: the
    pass plus the fewest pairs whose eliminated radius (no misaligned pair) reaches 0.5, 30 evaluations each.
    Image 1 sits at the cap (n_A = n = 1000, radius 1.23, counted at 1.125): no pairing of its 1000 samples
    reaches 1.125, so the model alone.  Image 2 is wrong: the pass alone.  The share of the limit is the
    f-evaluation speedup over it; a label that names no SRS step, or a sequential row, has no limit."""
    from SRS.benchmark import speed_limit
    from SRS.bounds import lower_confidence_bound
    from SRS.pairing import eliminated_z
    from scipy.stats import norm
    sigma, radii, alpha = 0.5, [0.125 * k for k in range(13)], 0.001
    r0 = sigma * norm.ppf(lower_confidence_bound(900, 1000, alpha))
    r1 = sigma * norm.ppf(lower_confidence_bound(1000, 1000, alpha))
    base = pd.DataFrame({"idx": [0, 1, 2], "time": [10.0] * 3, "n_A": [900, 1000, 990], "n": [1000] * 3,
                         "radius": [r0, r1, 0.9], "correct": [1, 1, 0], "nfe": [30.0] * 3})
    assert 0.5 < r0 < 0.625 and 1.125 < r1 < 1.25
    K = next(k for k in range(1, 901) if eliminated_z(900, 1000, k, alpha) >= 0.5 / sigma)
    assert max(eliminated_z(1000, 1000, k, alpha) for k in (1, 500, 1000)) < 1.125 / sigma
    limit = 90000 / ((1000 + 30 * K) + 30000 + 1000)
    assert speed_limit(base, "SRS-MDEQ-1A", 1000, alpha, radii, sigma) == pytest.approx(limit)
    run = base.assign(nfe=[3.0, 30.0, 1.0], time=[1.0, 10.0, 1.0])
    runs = {"MDEQ-30A": base, "SRS-MDEQ-1A": run, "SRS-MDEQ-1A seq": run.assign(samples=[500, 1000, 200])}
    summary = method_summary(runs, "MDEQ-30A", radii, 1000, alpha, sigma).set_index("method")
    assert summary.loc["SRS-MDEQ-1A", "speed limit"] == pytest.approx(limit)
    assert summary.loc["SRS-MDEQ-1A", "of limit"] == pytest.approx(90000 / 34000 / limit)
    assert math.isnan(summary.loc["MDEQ-30A", "speed limit"])              # no SRS step
    assert math.isnan(summary.loc["SRS-MDEQ-1A seq", "speed limit"])       # the bound is for fixed N


def test_summary_refuses_different_images():
    a = pd.DataFrame({"idx": [0, 1], "time": [1.0, 1.0], "radius": [0.1, 0.2], "correct": [1, 1], "predict": [0, 0]})
    b = a.assign(idx=[0, 2])
    with pytest.raises(ValueError, match="different images"):
        method_summary({"A": a, "B": b}, "A", [0.0], 10, 0.001, 0.25)


def test_reproduction_table_rows_refine_low_margins_and_aim_at_the_table():
    """The report's extra rows are the one-step chains that re-solve low margins (0.1 N pilot); the recipe row
    SRS-MDEQ-3A is the paper's own; given radii reach every adaptive row (none to the fixed-K ones)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "scripts", "reproduce.py"))
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    rows = reproduce.table_methods()
    assert [m.label for m in rows] == ["SRS-MDEQ-1A pilot0.1 refine3", "SRS-MDEQ-1N pilot0.1 refine3"]
    settings = [dict(m.settings) for m in rows]
    assert all(s["refine_margin"] == 3 and s["route_pilot"] == 0.1 and "radii" not in s for s in settings)
    rows = reproduce.table_methods([0.0, 0.3])
    assert all(dict(m.settings)["radii"] == (0.0, 0.3) for m in rows)
    assert rows[0].label == "SRS-MDEQ-1A radii0,0.3 pilot0.1 refine3"
    paper = paper_methods(radii=[0.0, 0.3])
    assert all(dict(m.settings)["radii"] == (0.0, 0.3) for m in paper[1:])
    assert all("radii" not in dict(m.settings) for m in paper_methods(400, radii=[0.0, 0.3]))


def test_srs_rows_label_every_setting_they_change():
    """A row's label names every option it sets away from its declared default (the recipe's): in declaration
    order, with the declared suffixes; options at their defaults leave the label alone."""
    from SRS.settings import SRSOptions, declared
    m = srs(3, radius_slack=0.05, second_look=0, route_pilot=0.1, warm_start="mean", refine_margin=3)
    assert m.label == "SRS-MDEQ-3A slack0.05 pilot0.1 look0 mean refine3"
    s = dict(m.settings)
    assert (s["route_pilot"], s["warm_start"], s["radius_slack"], s["second_look"]) == (0.1, "mean", 0.05, 0.0)
    assert srs(3).label == "SRS-MDEQ-3A" and "route_pilot" not in dict(srs(3).settings)
    assert srs(3, route_pilot=0.5, second_look=3).label == "SRS-MDEQ-3A"  # the defaults
    assert srs(1, conf_drop=400, certificate="reference").label == "SRS-MDEQ-1A K=400 (reference)"
    assert srs(30, step_tol=0.001, step_cost=8).label == "SRS-MDEQ-tol0.001-30A cost8"
    # every declared option has a label (or says why not): a row that sets it is named apart
    assert all(opt.label is not None for _, opt, _ in declared(SRSOptions))
    with pytest.raises(TypeError, match="radius_grid"):
        srs(3, radius_grid=0.25)


def _without_time(path):
    from SRS.results import read_rows
    meta, cols, rows, _ = read_rows(path)
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def test_interleaved_runs_go_image_by_image_and_equal_separate_runs(tmp_path, tiny_checkpoint, monkeypatch):
    """Each image goes through every method before the next image; the rows equal those of one run per
    method (time aside), and the ladder file is the certified model's certify file plus the ladder."""
    import SRS.benchmark as bench
    common = RunSpec(data=DataSpec("digits", skip=90), checkpoint=tiny_checkpoint, outfile="",
                     sampling=Sampling(0.25, 40, 0.001, 20, 10), smoothing=SmoothingSpec(tol=0.0), progress=False)
    methods = [standard(3, rungs=(1, 2)), srs(1, std=("anderson", 3), warmup=("anderson", 3))]
    calls, real_run = [], bench.run
    monkeypatch.setattr(bench, "run", lambda spec, mode: calls.append((os.path.basename(spec.outfile), spec.data.max))
                        or real_run(spec, mode))
    paths = run_methods(common, methods, str(tmp_path / "inter"), log=lambda m: None)
    names = [os.path.basename(p) for p in paths.values()]
    assert calls == [(name, j) for j in range(1, 6) for name in names]
    separate = run_methods(common, [standard(3), methods[1]], str(tmp_path / "sep"), log=lambda m: None,
                           interleave=False)
    inter_rows = _without_time(paths["MDEQ-3A"])
    assert [{k: v for k, v in r.items() if k != "ladder"} for r in inter_rows] == _without_time(separate["MDEQ-3A"])
    assert _without_time(paths[methods[1].label]) == _without_time(separate[methods[1].label])


def test_honest_comparison_names_the_equal_accuracy_baseline_and_times_it(tmp_path, tiny_checkpoint):
    from SRS.benchmark import honest_comparison
    from SRS.ladder import equal_accuracy_rung, rung_frames
    common = RunSpec(data=DataSpec("digits", skip=90), checkpoint=tiny_checkpoint, outfile="",
                     sampling=Sampling(0.25, 40, 0.001, 20, 10), smoothing=SmoothingSpec(tol=0.0), progress=False)
    methods = [standard(8, rungs=(1, 2, 3, 5)), srs(1, std=("anderson", 8), warmup=("anderson", 3))]
    radii = [0.0, 0.1]
    honest = honest_comparison(common, methods, str(tmp_path), radii, log=lambda m: None)
    k = equal_accuracy_rung(rung_frames(honest.paths["MDEQ-8A"]), radii)
    assert honest.baseline.label == f"MDEQ-{k}A" and honest.baseline.nfe == k
    s = honest.summary.set_index("method")
    srs_label = methods[1].label
    assert s.loc[srs_label, "f-eval vs equal-acc."] == pytest.approx(k / honest.runs[srs_label]["nfe"].mean())
    assert s.loc[srs_label, "f-eval vs 30A" if "f-eval vs 30A" in s.columns else "f-eval speedup"] == \
        pytest.approx(8 / honest.runs[srs_label]["nfe"].mean())
    # the planner's seconds per image, measured inside the certification and in no column of the files
    assert 0 < s.loc[srs_label, "planner s/image"] < 1 and s.loc["MDEQ-8A", "planner s/image"] == 0
    assert "planner s/image" in summary_markdown(honest.summary)
    assert not any("planner" in c for c in honest.runs[srs_label].columns)
    if k < 8:
        assert set(honest.timed) == {f"MDEQ-{k}A", srs_label}
        assert s.loc[srs_label, "wall vs equal-acc."] == pytest.approx(
            honest.timed[f"MDEQ-{k}A"]["time"].sum() / honest.timed[srs_label]["time"].sum())


def test_sequential_twins_count_evaluations_per_image_and_time_a_baseline_run_beside_them(tmp_path, tiny_checkpoint):
    """A sequential twin ('<label> seq') certifies the table sequentially: its evaluations per image are nfe times
    the samples it drew (not N0 + N), and a baseline that ran among the methods is timed from that same pass."""
    from SRS.benchmark import evaluations_per_image, honest_comparison, sequential
    common = RunSpec(data=DataSpec("digits", skip=90), checkpoint=tiny_checkpoint, outfile="",
                     sampling=Sampling(0.25, 80, 0.001, 20, 10), smoothing=SmoothingSpec(tol=0.0), progress=False)
    radii = [0.0, 0.1]
    top = standard(8, rungs=(1, 2, 3, 5))
    methods = [top, standard(1), sequential(top, radii)]
    honest = honest_comparison(common, methods, str(tmp_path), radii, log=lambda m: None)
    seq = honest.runs["MDEQ-8A seq"]
    assert "samples" in seq.columns and (seq["samples"] <= 90).all()
    assert list(evaluations_per_image(seq, 90)) == pytest.approx(list(seq["nfe"] * seq["samples"]))
    s = honest.summary.set_index("method")
    assert s.loc["MDEQ-8A seq", "f-eval vs 30A"] == pytest.approx(8 * 90 / (seq["nfe"] * seq["samples"]).mean())
    assert s.loc["MDEQ-8A seq", "evals/image"] == pytest.approx((seq["nfe"] * seq["samples"]).mean())
    if honest.baseline.label == "MDEQ-1A":  # the baseline ran in the first pass: no second pass, same timings
        assert honest.timed is honest.runs and not os.path.exists(tmp_path / "vs_MDEQ-1A")


def test_speed_limit_in_evaluations_is_the_fewest_clean_pairs_or_the_model_alone():
    """limit_evaluations: an image certified at a table radius costs the pass plus the fewest clean pairs whose
    eliminated bound reaches that radius (one pair fewer does not), capped by the model alone; an image
    certified at no table radius costs the pass only."""
    from SRS.benchmark import limit_evaluations
    from SRS.pairing import eliminated_z
    n, samples, alpha, sigma, radii = 1000, 1100, 0.001, 0.5, [0.0, 0.25, 0.5]
    rows = pd.DataFrame([{"n_A": 990, "radius": 0.9, "correct": 1}, {"n_A": 700, "radius": 0.2, "correct": 1},
                         {"n_A": 990, "radius": 0.9, "correct": 0}, {"n_A": 400, "radius": -1.0, "correct": 1}])
    costs = limit_evaluations(rows, n, samples, alpha, radii, sigma, step=1, model_cost=30)
    for n_A, goal, cost in ((990, 0.5, costs[0]), (700, 0.0, costs[1])):
        K = int(round((cost - samples) / 30))
        assert eliminated_z(n_A, n, K, alpha) >= goal / sigma > eliminated_z(n_A, n, K - 1, alpha)
    assert costs[2] == costs[3] == samples
    alone = limit_evaluations(rows, n, samples, alpha, radii, sigma, step=1, model_cost=1.01)
    assert alone[0] == samples * 1.01  # its pairs would cost more than the model's own samples
    assert (limit_evaluations(rows, n, samples, alpha, radii, sigma, step=3, model_cost=30) >= costs).all()


def _script(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_certify_methods_choose_rows_standard_models_and_twins():
    """--methods keeps MDEQ-30A and the listed rows, adds any standard model 'MDEQ-kA', and with --sequential
    the listed twins only (every kept row's twin when none is listed); an unknown label is one error."""
    from DEQ.errors import UserError
    pick = _script("bench_certify").chosen_methods
    rows = [standard(30, rungs=(1, 5)), srs(1), srs(3)]
    radii = (0.0, 0.25)
    labels = lambda ms: [m.label for m in ms]
    assert labels(pick(rows, ["SRS-MDEQ-3A", "MDEQ-5A"], False, radii)) == \
        ["MDEQ-30A", "SRS-MDEQ-3A", "MDEQ-5A"]
    both = pick(rows, ["SRS-MDEQ-3A"], True, radii)
    assert labels(both) == ["MDEQ-30A", "SRS-MDEQ-3A", "MDEQ-30A seq", "SRS-MDEQ-3A seq"]
    assert both[-1].radii == radii and not both[-2].rungs
    only = pick(rows, ["MDEQ-30A seq", "MDEQ-5A seq"], True, radii)
    assert labels(only) == ["MDEQ-30A", "MDEQ-30A seq", "MDEQ-5A seq"]
    with pytest.raises(UserError, match="unknown --methods"):
        pick(rows, ["SRS-MDEQ-3A seq"], False, radii)


def test_speed_limit_script_reads_a_committed_ladder_and_refuses_a_missing_one():
    path = os.path.join(ROOT, "reports", "digits32", "tsv", "MDEQ-30A_ladder_sigma0.5.tsv")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "speed_limit.py"), path, "--steps", "1"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "equal-accuracy baseline MDEQ-8A" in out.stdout and "| 1 | MDEQ-30A |" in out.stdout
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "speed_limit.py"), "missing.tsv"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == ["error: ladder file not found: missing.tsv"]
