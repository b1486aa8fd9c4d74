"""The comparison suite and the reproduction script's guard rails."""
import os
import subprocess
import sys

from conftest import ROOT
from SRS.benchmark import comparison, max_gap, paper_methods, run_methods, srs, standard


def test_paper_methods_are_the_papers_rows():
    labels = [m.label for m in paper_methods(400)]
    assert labels == ["MDEQ-1A", "MDEQ-5A", "MDEQ-30A", "SRS-MDEQ-1N", "SRS-MDEQ-1A", "SRS-MDEQ-3A"]
    assert "--srs" in srs(1).flags and "--srs" not in standard(30).flags


def test_suite_runs_resumes_and_tabulates(tmp_path, tiny_checkpoint):
    common = ["--N0", "10", "--N", "40", "--batch", "20", "--skip", "90", "--tol", "0", "--quiet"]
    methods = [standard(3), srs(1, conf_drop=10, std=("anderson", 3), warmup=("anderson", 3))]
    paths = run_methods("digits", tiny_checkpoint, 0.25, methods, str(tmp_path), common, log=lambda m: None)
    table, runs = comparison(paths, [0.0, 0.1], baseline="MDEQ-3A")
    assert list(table.index) == ["MDEQ-3A", "SRS-MDEQ-1A"] and len(runs["MDEQ-3A"]) == 5
    assert runs["SRS-MDEQ-1A"]["K"].max() == 10
    gap, at = max_gap(runs, "SRS-MDEQ-1A", "MDEQ-3A", [0.0, 0.1])
    assert 0.0 <= gap <= 100.0 and at in (0.0, 0.1)
    before = {p: open(p).read() for p in paths.values()}
    run_methods("digits", tiny_checkpoint, 0.25, methods, str(tmp_path), common, log=lambda m: None)
    assert {p: open(p).read() for p in paths.values()} == before  # finished files are reused, not redone


def test_paper_setting_without_cifar_stops_cleanly(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--paper", "--ckpt", "x.pth",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: CIFAR-10 is not available here") and len(res.stderr.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "reports")
