"""The attack mode of the runner (SRS/code/attack.py), the attack table, and the cross-check that must
hold: certified accuracy at radius r is a lower bound on the smoothed accuracy under any attack of size r."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from DEQ.attacks import certificate_contradictions
from SRS import analysis
from SRS.cli import attack_main, attack_parser, certify_main, certify_parser
from SRS.results import PREDICTION_COLUMNS, read_results

ATTACK = os.path.join(ROOT, "SRS", "code", "attack.py")
COMMON = ["--batch", "100", "--skip", "50", "--max", "6", "--alpha", "0.01", "--threads", "1", "--quiet"]


def _attack(ckpt, out, *extra):
    return attack_main(attack_parser().parse_args(["digits", ckpt, "0.25", str(out), "--N", "200", *COMMON, *extra]))


def test_smooth_pgd_never_beats_a_certificate(tiny_checkpoint, tmp_path):
    """Per image: an attack of size eps < R never changes the class certified with radius R (beyond the
    certificate's and PREDICT's failure probability, 0.01 each here: no contradiction expected on 6
    images); so the accuracy under attack at each radius is at least the certified accuracy there."""
    cert = tmp_path / "cert.tsv"
    certify_main(certify_parser().parse_args(["digits", tiny_checkpoint, "0.25", str(cert), "--N0", "20", "--N", "200",
                                              *COMMON]))
    c = read_results(cert)
    for eps in (0.1, 0.3):
        out = tmp_path / f"spgd_{eps}.tsv"
        s = _attack(tiny_checkpoint, out, "--attack", "smooth_pgd", "--num_noise_vec", "2", "--epsilon", str(eps),
                    "--steps", "4")
        assert s["images"] == 6 and s["max_adv_norm"] <= eps + 1e-5
        a = read_results(out, PREDICTION_COLUMNS)
        assert list(a["idx"]) == list(c["idx"])
        assert certificate_contradictions(c["predict"], c["radius"], a["predict"], eps) == []
        certified = float(analysis.certified_accuracy(c, [eps])[0])
        assert a["correct"].mean() >= certified
        assert a.attrs["meta"]["attack_label"] == "Smooth-PGD m=2" and a.attrs["meta"]["epsilon"] == str(eps)


def test_attack_resumes_and_tabulates(tiny_checkpoint, tmp_path):
    pgd = tmp_path / "pgd.tsv"
    _attack(tiny_checkpoint, pgd, "--attack", "pgd", "--epsilon", "0.2", "--steps", "3", "--max", "3")
    s = _attack(tiny_checkpoint, pgd, "--attack", "pgd", "--epsilon", "0.2", "--steps", "3", "--resume")
    assert s["images"] == 3 and s["skipped_done"] == 3 and s["rows"] == 6
    with pytest.raises(Exception, match="epsilon=0.2 but this run has epsilon=0.4"):
        _attack(tiny_checkpoint, pgd, "--attack", "pgd", "--epsilon", "0.4", "--steps", "3", "--resume")
    runs = {"pgd": read_results(pgd, PREDICTION_COLUMNS)}
    table = analysis.attack_table(runs)
    assert list(table.index) == ["PGD"] and list(table.columns) == ["clean", "0.2"]
    assert table.loc["PGD", "0.2"] == pytest.approx(100 * runs["pgd"]["correct"].mean())
    assert "| PGD |" in analysis.attack_markdown(table) and r"\toprule" in analysis.attack_latex(table)


@pytest.mark.parametrize("extra,match", [
    (["--attack", "fgsm", "--epsilon", "0.5"], "--attack 'fgsm' is not an attack"),
    (["--attack", "pgd", "--epsilon", "-0.5"], "--epsilon must be"),
    (["--attack", "smooth_pgd", "--epsilon", "0.5", "--num_noise_vec", "0"], "--num_noise_vec (m) must be"),
    (["--attack", "smooth_pgd", "--epsilon", "0.5", "--norm", "linf"], "smooth_pgd is an l2 attack"),
    (["--attack", "pgd", "--epsilon", "0.5", "--srs", "--steps", "0"], "--steps must be"),
    # a flag that does not apply to the chosen attack is refused, not recorded and ignored
    (["--attack", "pgd", "--epsilon", "0.5", "--num_noise_vec", "4"], "--num_noise_vec 4 sets the noise vectors of "
                                                                       "--attack smooth_pgd"),
    (["--attack", "pgd", "--epsilon", "0.5", "--no_grad_attack"], "--no_grad_attack is SmoothAdv's estimate"),
    (["--attack", "smooth_pgd", "--epsilon", "0.5", "--restarts", "3"], "--restarts 3 restarts --attack pgd"),
    (["--attack", "pgd", "--epsilon", "0.5", "--srs", "--route_pilot", "0.2"], "--route_pilot sets the standard "
                                                                                "fallback route of CERTIFY"),
])
def test_bad_attack_flags_one_line(tiny_checkpoint, tmp_path, extra, match):
    out = tmp_path / "bad.tsv"
    proc = subprocess.run([sys.executable, ATTACK, "digits", tiny_checkpoint, "0.25", str(out), "--N", "50", *extra],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert match in proc.stderr and not out.exists()


def test_run_attacks_builds_the_table_and_reuses_files(tiny_checkpoint, tmp_path):
    from SRS.benchmark import run_attacks
    from SRS.modes import AttackSettings
    from SRS.runner import DataSpec, RunSpec, Sampling, SmoothingSpec
    template = RunSpec(data=DataSpec("digits", skip=150), checkpoint=tiny_checkpoint, outfile="",
                       sampling=Sampling(0.25, 60, 0.01, 60), smoothing=SmoothingSpec(tol=0.0), threads=1,
                       progress=False)
    attacks = [AttackSettings("pgd", 0.25, steps=2), AttackSettings("smooth_pgd", 0.25, steps=2, num_noise_vec=4),
               AttackSettings("smooth_pgd", 0.5, steps=2, num_noise_vec=4)]
    paths = run_attacks(template, attacks, str(tmp_path), log=lambda m: None)
    assert list(paths) == ["clean", "PGD eps=0.25", "Smooth-PGD m=4 eps=0.25", "Smooth-PGD m=4 eps=0.5"]
    table = analysis.attack_table({k: read_results(p, PREDICTION_COLUMNS) for k, p in paths.items()})
    assert list(table.index) == ["PGD", "Smooth-PGD m=4"] and list(table.columns) == ["clean", "0.25", "0.5"]
    assert table.loc["PGD", "0.5"] != table.loc["PGD", "0.5"]  # not run: NaN, shown as '-'
    before = {p: open(p).read() for p in paths.values()}
    run_attacks(template, attacks, str(tmp_path), log=lambda m: None)
    assert {p: open(p).read() for p in paths.values()} == before
