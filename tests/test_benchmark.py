"""The comparison suite and the reproduction script's guard rails."""
import os
import subprocess
import sys

from conftest import ROOT
import math

import pandas as pd
import pytest

from SRS.benchmark import (comparison, max_gap, method_summary, paper_methods, run_methods, sound_speed_limit, srs,
                           standard)
from SRS.runner import DataSpec, RunSpec, Sampling, SmoothingSpec


def test_paper_methods_are_the_papers_rows():
    labels = [m.label for m in paper_methods()]
    assert labels == ["MDEQ-1A", "MDEQ-5A", "MDEQ-30A", "SRS-MDEQ-1N", "SRS-MDEQ-1A", "SRS-MDEQ-3A"]
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
    summary = method_summary(runs, "MDEQ-3A", [0.0, 0.1], 50, 0.001)
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


def test_sound_speed_limit_closed_form():
    """Two images, standard 10 s each over 1000 samples; SRS pass 1 ms/sample.  Image 0 has p = 0.9:
    ln(2000)/0.1 = 76 pairs at 10 ms -> 1 + 0.76 s.  Image 1 sits at the cap (p = 0.9999): pairs
    would cost 760 s, so its cheapest sound certificate is the standard run, 10 s."""
    base = pd.DataFrame({"idx": [0, 1], "time": [10.0, 10.0], "p_A_lower": [0.9, 0.9999]})
    run = pd.DataFrame({"idx": [0, 1], "time": [1.0 + 0.5, 10.2], "route": ["srs", "fallback"],
                        "std_rows": [50, 1000]})
    limit, pass_per_sample = sound_speed_limit(base, run, 1000, 0.001)
    assert pass_per_sample == pytest.approx(0.001)
    assert limit == pytest.approx(20.0 / (1.0 + math.log(2000) / 0.1 * 0.01 + 10.0))


def test_summary_refuses_different_images():
    a = pd.DataFrame({"idx": [0, 1], "time": [1.0, 1.0], "radius": [0.1, 0.2], "correct": [1, 1], "predict": [0, 0]})
    b = a.assign(idx=[0, 2])
    with pytest.raises(ValueError, match="different images"):
        method_summary({"A": a, "B": b}, "A", [0.0], 10, 0.001)
