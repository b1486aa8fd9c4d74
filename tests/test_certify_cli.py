"""certify.py / predict.py end to end: results files, determinism, --resume, SRS columns, errors, NaN solves.

The CLIs are run as subprocesses for the contracts that need a real process (exit code, stderr,
no download attempt) and otherwise in-process through the scripts' own ``parse_args`` / ``main``
(the same ``cli_main`` wrapper), which is much faster than re-importing torch per case.

The shared tiny digits checkpoint (conftest ``tiny_checkpoint``) has collapsed features: its
logits vary by ~1e-3 between inputs, so it predicts one class with certainty and every count
would be 60/60 whatever the noise.  The module fixture ``ckpt`` therefore rescales its final
linear layer (standardises each logit over noisy test samples, then favours class 9 by two
standard deviations): the network is the same, but its predictions now depend on the noise,
which gives rows that certify, rows that abstain, and counts that change with the seed.
"""
import dataclasses
import hashlib
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import beta, binomtest, norm

ROOT = Path(__file__).resolve().parents[1]
CODE = ROOT / "SRS" / "code"

import SRS.cli as srs_cli  # noqa: E402
import SRS.runner as srs_runner  # noqa: E402
from DEQ.checkpoint import load_model  # noqa: E402
from DEQ.data import get_dataset  # noqa: E402
from DEQ.interface import DEQOutput  # noqa: E402
from DEQ.solvers import solve as fp_solve  # noqa: E402
from SRS.results import CERTIFY_COLUMNS, read_rows  # noqa: E402
from SRS.settings import DEQSolve, SRSConfig  # noqa: E402
from SRS.smooth import ABSTAIN, Smooth  # noqa: E402

CERTIFY_HEADER = ["idx", "label", "predict", "radius", "correct", "time", "n_A", "n", "p_A_lower", "p_m_upper",
                  "N_A_E", "K", "K_A", "M", "nfe", "residual", "status", "route", "std_calls", "std_rows"]
PREDICT_HEADER = ["idx", "label", "predict", "correct", "time", "n1", "n2", "pvalue", "p_m_upper", "K", "K_A", "M", "nfe",
                  "std_calls", "status"]
ALPHA = 0.001
SIGMA = 0.25
SMALL = ["--N0", "10", "--N", "60", "--batch", "30", "--f_thresh", "4", "--quiet"]
SRS_FLAGS = ["--srs", "--f_solver", "anderson", "--f_thresh", "1", "--warmup_thresh", "5", "--std_solver", "anderson",
             "--std_thresh", "10", "--conf_drop", "20"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _load_script(name):
    spec = importlib.util.spec_from_file_location(f"srs_code_{name}_script", CODE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


certify_script = _load_script("certify")
predict_script = _load_script("predict")


# ----------------------------------------------------------------- helpers
def certify_argv(ckpt, out, *extra, sigma=SIGMA, dataset="digits", small=True):
    return [dataset, str(ckpt), str(sigma), str(out)] + (SMALL if small else []) + list(extra)


def predict_argv(ckpt, out, *extra, sigma=SIGMA):
    return ["digits", str(ckpt), str(sigma), str(out), "--N", "60", "--batch", "30", "--f_thresh", "4", "--quiet"] + list(extra)


def run_certify(argv):
    return srs_cli.certify_main(certify_script.parse_args(argv))


def run_script(script, argv, cwd=None):
    return subprocess.run([sys.executable, str(CODE / script)] + list(argv), capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=240)


def read_results(path):
    """(metadata dict, header, rows as dicts of strings, raw data lines)."""
    return read_rows(path)


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "time"} for r in rows]


def cp_lower(k, n, alpha):
    """One-sided Clopper-Pearson lower bound (independent of the code under test)."""
    return 0.0 if k <= 0 else float(beta.ppf(alpha, k, n - k + 1))


def cp_upper(k, n, alpha):
    if n <= 0:
        return 1.0
    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def close(printed, value, rel=2e-5):
    """Values are written with 6 significant digits."""
    return math.isclose(float(printed), value, rel_tol=rel, abs_tol=1e-9)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_one_line_error(capsys, excinfo, *needles):
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    return lines[0]


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint, tmp_path_factory):
    """tiny_checkpoint with a noise-sensitive classifier layer (see the module docstring)."""
    model, _, raw = load_model(tiny_checkpoint)
    test = get_dataset("digits", "test")
    g = torch.Generator().manual_seed(123)
    x = torch.cat([test[i][0].unsqueeze(0).repeat(60, 1, 1, 1) for i in range(0, 450, 50)])
    x = x + SIGMA * torch.randn(x.shape, generator=g)
    with torch.no_grad():
        logits = model.solve(x, "broyden", 4).logits
    mu, sd = logits.mean(0), logits.std(0).clamp_min(1e-6)
    state = dict(raw["state_dict"])
    offset = torch.zeros_like(mu)
    offset[9] = 2.0
    state["classifier.weight"] = state["classifier.weight"] / sd[:, None]
    state["classifier.bias"] = (state["classifier.bias"] - mu) / sd + offset
    path = tmp_path_factory.mktemp("ckpt") / "noisy_digits.pth"
    torch.save({**raw, "state_dict": state}, path)
    return str(path)


@pytest.fixture(scope="module")
def std_run(ckpt, tmp_path_factory):
    """One real `certify.py` process, standard mode, every 50th test image."""
    out = tmp_path_factory.mktemp("std") / "std.tsv"
    res = run_script("certify.py", certify_argv(ckpt, out, "--skip", "50"))
    assert res.returncode == 0, res.stderr
    return out, res


# ----------------------------------------------------------------- 1. standard certify file
def test_standard_certify_writes_metadata_header_and_consistent_rows(std_run, ckpt):
    out, res = std_run
    assert "certified 9 images" in res.stdout
    meta, header, rows, _ = read_results(out)
    assert meta["command"].split()[1].endswith("certify.py") and "--skip 50" in meta["command"]
    assert "torch" in meta["versions"] and "python" in meta["versions"]
    assert meta["seed"] == "0" and meta["mode"] == "certify" and meta["dataset"] == "digits"
    assert meta["checkpoint_sha256"] == sha256(ckpt)
    assert meta["sigma"] == "0.25" and meta["N0"] == "10" and meta["N"] == "60"
    # the certified model: CERTIFY.SOLVER of the checkpoint config (a config without the section: anderson), the
    # budget from --f_thresh (standard mode), CERTIFY.TOL 0
    assert meta["standard"] == "anderson:4" and meta["tol"] == "0.0" and meta["srs"] == "off"
    assert header == CERTIFY_HEADER

    test = get_dataset("digits", "test")
    assert [int(r["idx"]) for r in rows] == list(range(0, 450, 50))
    predictions = set()
    for r in rows:
        idx, label, pred = int(r["idx"]), int(r["label"]), int(r["predict"])
        predictions.add(pred)
        assert label == int(test[idx][1])
        assert int(r["correct"]) == int(pred == label)
        n_A, n = int(r["n_A"]), int(r["n"])
        assert n == 60 and 0 <= n_A <= n
        assert close(r["p_A_lower"], cp_lower(n_A, n, ALPHA))
        assert r["p_m_upper"] == "nan" and r["N_A_E"] == "nan" and (r["K"], r["K_A"], r["M"]) == ("0", "0", "0")
        assert 1 <= float(r["nfe"]) <= 4 and float(r["time"]) >= 0
        if pred == ABSTAIN:
            assert float(r["radius"]) == 0.0 and r["correct"] == "0"
            assert r["status"] == "abstain_pA_below_half" and float(r["p_A_lower"]) < 0.5
        else:
            assert r["status"] == "ok" and 0 <= pred < 10 and float(r["p_A_lower"]) >= 0.5
            assert close(r["radius"], SIGMA * norm.ppf(float(r["p_A_lower"])), rel=1e-4) and float(r["radius"]) > 0
    assert ABSTAIN in predictions and len(predictions) >= 2, "fixture should give both certified and abstaining rows"


# ----------------------------------------------------------------- 2. determinism
def test_same_seed_same_file_other_seed_other_counts(std_run, ckpt, tmp_path):
    out, _ = std_run
    meta0, header0, rows0, _ = read_results(out)
    a, b, c = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "c.tsv"
    run_certify(certify_argv(ckpt, a, "--skip", "50"))
    run_certify(certify_argv(ckpt, b, "--skip", "50", "--seed", "0"))
    run_certify(certify_argv(ckpt, c, "--skip", "50", "--seed", "1"))
    ma, ha, ra, _ = read_results(a)
    mb, hb, rb, _ = read_results(b)
    mc, hc, rc, _ = read_results(c)
    skip = {"date", "command"}  # the command line differs between b and a (--seed 0)
    assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in mb.items() if k not in skip}
    assert ha == hb == header0
    assert without_time(ra) == without_time(rb)
    # the in-process run writes what the certify.py process wrote
    assert without_time(ra) == without_time(rows0)
    assert {k: v for k, v in ma.items() if k not in skip} == {k: v for k, v in meta0.items() if k not in skip}
    # another seed: other noise, so other counts somewhere (same images and labels)
    assert mc["seed"] == "1"
    assert [(r["idx"], r["label"]) for r in rc] == [(r["idx"], r["label"]) for r in ra]
    assert [r["n_A"] for r in rc] != [r["n_A"] for r in ra]
    assert [r["residual"] for r in rc] != [r["residual"] for r in ra]


# ----------------------------------------------------------------- 3. resume / overwrite
def tear_last_row(path):
    raw = Path(path).read_bytes()
    assert raw.endswith(b"\n")
    start = raw[:-1].rfind(b"\n") + 1
    last = raw[start:-1]
    torn = raw[:start] + last[: len(last) // 2]
    Path(path).write_bytes(torn)
    return int(last.split(b"\t")[0])


def test_resume_after_torn_write_equals_uninterrupted_run(ckpt, tmp_path):
    full, part = tmp_path / "full.tsv", tmp_path / "part.tsv"
    run_certify(certify_argv(ckpt, full, "--max", "4"))
    run_certify(certify_argv(ckpt, part, "--max", "2"))
    torn_idx = tear_last_row(part)
    assert torn_idx == 1 and not part.read_bytes().endswith(b"\n")

    summary = run_certify(certify_argv(ckpt, part, "--max", "4", "--resume"))
    assert summary["skipped_done"] == 1 and summary["images"] == 3  # idx 0 kept; 1 (torn), 2, 3 computed

    mf, hf, rows_full, _ = read_results(full)
    mp, hp, rows_part, lines = read_results(part)
    assert hp == hf == CERTIFY_HEADER
    idx = [int(r["idx"]) for r in rows_part]
    assert idx == [0, 1, 2, 3] and len(set(idx)) == len(idx)
    assert all(len(line.split("\t")) == len(CERTIFY_HEADER) for line in lines)
    assert without_time(rows_part) == without_time(rows_full)
    assert part.read_text().count("# command:") == 1  # metadata written once, not again on resume


def test_resume_refuses_a_file_with_a_repeated_row_as_analyze_does(ckpt, tmp_path, capsys):
    from DEQ.errors import UserError
    from SRS.analysis import read_results as analysis_read
    out = tmp_path / "dup.tsv"
    run_certify(certify_argv(ckpt, out, "--max", "2"))
    text = out.read_text()
    out.write_text(text + text.splitlines(keepends=True)[-1])  # the last row once more
    before = out.read_bytes()
    with pytest.raises(UserError, match="idx 1 appears more than once"):
        analysis_read(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        certify_script.main(certify_argv(ckpt, out, "--max", "4", "--resume"))
    assert_one_line_error(capsys, exc, "--resume", str(out), "idx 1 appears more than once", "remove the repeated row")
    assert out.read_bytes() == before


def test_resume_of_complete_file_adds_nothing(ckpt, tmp_path):
    out = tmp_path / "r.tsv"
    run_certify(certify_argv(ckpt, out, "--max", "2"))
    before = out.read_bytes()
    summary = run_certify(certify_argv(ckpt, out, "--max", "2", "--resume"))
    assert summary["images"] == 0 and summary["skipped_done"] == 2
    assert out.read_bytes() == before


@pytest.mark.parametrize("change,key", [
    ({"sigma": 0.5}, "sigma"),
    ({"extra": ["--N", "80"]}, "N"),
    ({"extra": ["--seed", "3"]}, "seed"),
    ({"extra": ["--f_thresh", "3"]}, "standard"),
    ({"extra": ["--alpha", "0.01"]}, "alpha"),
])
def test_resume_with_other_settings_fails_and_leaves_file_alone(ckpt, tmp_path, capsys, change, key):
    out = tmp_path / "r.tsv"
    run_certify(certify_argv(ckpt, out, "--max", "2"))
    tear_last_row(out)  # even a torn file must not be modified by a refused --resume
    before = out.read_bytes()
    capsys.readouterr()
    argv = certify_argv(ckpt, out, "--max", "3", "--resume", *change.get("extra", []), sigma=change.get("sigma", SIGMA))
    with pytest.raises(SystemExit) as exc:
        certify_script.main(argv)
    line = assert_one_line_error(capsys, exc, "--resume", f"{key}=")
    assert "same settings" in line
    assert out.read_bytes() == before


def test_resume_of_predict_file_with_certify_fails(ckpt, tmp_path, capsys):
    out = tmp_path / "p.tsv"
    predict_script.main(predict_argv(ckpt, out, "--max", "1"))
    before = out.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        certify_script.main(certify_argv(ckpt, out, "--max", "1", "--resume"))
    assert_one_line_error(capsys, exc, "--resume", "other columns")
    assert out.read_bytes() == before


def test_existing_file_needs_resume_or_overwrite(ckpt, tmp_path, capsys):
    out = tmp_path / "o.tsv"
    run_certify(certify_argv(ckpt, out, "--max", "2"))
    before = out.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        certify_script.main(certify_argv(ckpt, out, "--max", "1"))
    assert_one_line_error(capsys, exc, "already holds results", "--resume", "--overwrite")
    assert out.read_bytes() == before

    run_certify(certify_argv(ckpt, out, "--max", "1", "--overwrite"))
    meta, header, rows, _ = read_results(out)
    assert header == CERTIFY_HEADER and [r["idx"] for r in rows] == ["0"] and meta["max"] == "1"
    assert out.read_text().count("# command:") == 1

    # an empty file is not "results": it is simply (re)written
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    run_certify(certify_argv(ckpt, empty, "--max", "1"))
    assert [r["idx"] for r in read_results(empty)[2]] == ["0"]


# ----------------------------------------------------------------- 4. SRS mode
def test_srs_certify_columns(ckpt, tmp_path):
    out = tmp_path / "srs.tsv"
    run_certify(certify_argv(ckpt, out, "--skip", "50", "--max", "5", "--warmup_solver", "anderson", *SRS_FLAGS))
    meta, header, rows, _ = read_results(out)
    assert header == CERTIFY_HEADER
    assert meta["standard"] == "anderson:10"
    assert "step=anderson:1" in meta["srs"] and "warmup=anderson:5" in meta["srs"]
    assert "conf_drop=20" in meta["srs"] and "certificate=eliminated" in meta["srs"]
    assert [int(r["idx"]) for r in rows] == [0, 50, 100, 150, 200]
    statuses = set()
    for r in rows:
        statuses.add(r["status"])
        assert r["status"] in ("ok", "abstain_pA_below_half"), r
        pred, label = int(r["predict"]), int(r["label"])
        assert int(r["correct"]) == int(pred == label)
        n_A, n, K, K_A, M = (int(r[k]) for k in ("n_A", "n", "K", "K_A", "M"))
        assert n == 60 and K == 20 and 0 <= M <= K_A <= K and 0 <= n_A <= n
        pm = float(r["p_m_upper"])
        assert 0.0 <= pm <= 1.0 and close(r["p_m_upper"], cp_upper(M, K_A, ALPHA / 2))
        N_A_E = float(r["N_A_E"])
        assert N_A_E == int(N_A_E) and 0 <= N_A_E <= n_A
        assert N_A_E in {math.floor(n_A * (1 - pm - d)) for d in (-1e-5, 0.0, 1e-5)}
        assert close(r["p_A_lower"], cp_lower(int(N_A_E), n, ALPHA / 2))
        # the SRS chain is cheap: warm-up 5 steps on the first batch, 1 step after, plus K standard 10-step solves
        assert 0 < float(r["nfe"]) <= (10 * 5 + 60 * 1 + 20 * 10) / 70 + 1e-6
        if r["status"] == "ok":
            assert pred != ABSTAIN and float(r["p_A_lower"]) >= 0.5 and float(r["radius"]) > 0
            assert close(r["radius"], SIGMA * norm.ppf(float(r["p_A_lower"])), rel=1e-4)
        else:
            assert pred == ABSTAIN and float(r["radius"]) == 0.0 and float(r["p_A_lower"]) < 0.5
    assert statuses  # at least one informative status was written


RECIPE_SRS = ("step=anderson:3 step_tol=0.0 warmup=anderson:10 interval=0 conf_drop=auto certificate=eliminated "
              "chain_across_phases=True radii=0,0.125,0.25,0.375,0.5,0.625,0.75 max_pairs=None fallback=True "
              "route_pilot=0.5 second_look=3.0")


def test_the_recipe_certifies_mdeq_30a_with_srs_3a_steps_and_says_so(ckpt, tmp_path, capsys):
    """`--srs --f_thresh 3` and nothing else: one line names the certified model and the SRS step before the
    work; the header records MDEQ-30A at tol 0 and the recipe (table radii at sigma 0.25, second look, pilot)."""
    out = tmp_path / "recipe.tsv"
    capsys.readouterr()
    certify_script.main(["digits", ckpt, str(SIGMA), str(out), "--N0", "10", "--N", "60", "--batch", "30", "--max", "2",
                         "--quiet", "--srs", "--f_thresh", "3"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"certifying MDEQ-30A (anderson, 30 evaluations, tol 0) of {ckpt} with SRS-3A steps"
    assert printed[1].startswith("certified 2 images")
    meta, header, rows, _ = read_results(out)
    assert (meta["standard"], meta["tol"], meta["srs"]) == ("anderson:30", "0.0", RECIPE_SRS)
    assert header == CERTIFY_HEADER and len(rows) == 2


def test_standard_mode_names_the_certified_model_too(ckpt, tmp_path, capsys):
    """Standard mode certifies the same model (--f_thresh or --std_thresh name it; equal values agree)."""
    out = tmp_path / "std.tsv"
    capsys.readouterr()
    run_certify(certify_argv(ckpt, out, "--max", "1"))
    assert capsys.readouterr().out.splitlines()[0] == f"certifying MDEQ-4A (anderson, 4 evaluations, tol 0) of {ckpt}"
    for extra, solver in ((["--std_thresh", "4"], "anderson"),
                          (["--std_thresh", "4", "--std_solver", "naive", "--f_solver", "naive"], "naive")):
        args = certify_script.parse_args(certify_argv(ckpt, out, *extra))
        assert srs_cli.run_spec(args).smoothing.resolve(DEQSolve("anderson", 30, 0.0))[0] == DEQSolve(solver, 4, 0.0)


def _with_certify_section(path, out, section):
    """A copy of checkpoint ``path`` whose stored config has CERTIFY ``section`` (None: no CERTIFY section)."""
    import yaml
    raw = torch.load(path, map_location="cpu", weights_only=False)
    cfg = yaml.safe_load(raw["config"])
    cfg.pop("CERTIFY", None)
    if section is not None:
        cfg["CERTIFY"] = section
    torch.save({**raw, "config": yaml.safe_dump(cfg)}, out)
    return str(out)


def test_the_certified_model_comes_from_the_checkpoint_config(ckpt, tmp_path):
    """CERTIFY of the stored config names the certified model in both modes; a config without the section
    (an older checkpoint) certifies the defaults, MDEQ-30A at tol 0."""
    small = ["--N0", "10", "--N", "30", "--batch", "30", "--max", "1", "--quiet"]
    broyden = _with_certify_section(ckpt, tmp_path / "b.pth", {"SOLVER": "broyden", "THRES": 6, "TOL": 0.001})
    old = _with_certify_section(ckpt, tmp_path / "old.pth", None)
    for path, standard, tol in ((broyden, "broyden:6", "0.001"), (old, "anderson:30", "0.0")):
        for mode in ([], ["--srs", "--conf_drop", "10"]):
            out = tmp_path / f"{os.path.basename(path)}{len(mode)}.tsv"
            run_certify(["digits", path, str(SIGMA), str(out)] + small + mode)
            meta = read_results(out)[0]
            assert (meta["standard"], meta["tol"]) == (standard, tol)
            assert (meta["srs"] == "off") == (not mode)


# ----------------------------------------------------------------- 5. predict
def check_predict_rows(rows, srs):
    test = get_dataset("digits", "test")
    for r in rows:
        pred, label = int(r["predict"]), int(r["label"])
        assert label == int(test[int(r["idx"])][1]) and int(r["correct"]) == int(pred == label)
        n1, n2, pv = int(r["n1"]), int(r["n2"]), float(r["pvalue"])
        assert 0 <= n2 <= n1 and n1 + n2 <= 60 and 0.0 <= pv <= 1.0 and float(r["nfe"]) > 0
        level = ALPHA / 2 if srs else ALPHA
        if srs:
            assert 0.0 <= float(r["p_m_upper"]) <= 1.0
        else:
            assert r["p_m_upper"] == "nan"
            assert close(r["pvalue"], binomtest(n1, n1 + n2, 0.5).pvalue, rel=1e-4)
        if pred == ABSTAIN:
            assert r["status"] == "abstain_test" and pv > level
        else:
            assert r["status"] == "ok" and pv <= level and 0 <= pred < 10


def test_predict_standard_in_process(ckpt, tmp_path, capsys):
    out = tmp_path / "pred.tsv"
    predict_script.main(predict_argv(ckpt, out, "--skip", "50"))
    assert "predicted 9 images" in capsys.readouterr().out
    meta, header, rows, _ = read_results(out)
    assert header == PREDICT_HEADER and meta["mode"] == "predict" and meta["srs"] == "off"
    assert [int(r["idx"]) for r in rows] == list(range(0, 450, 50))
    check_predict_rows(rows, srs=False)
    assert {r["status"] for r in rows} == {"ok", "abstain_test"}, "fixture should give both outcomes"


def test_predict_srs_subprocess(ckpt, tmp_path):
    out = tmp_path / "pred_srs.tsv"
    res = run_script("predict.py", predict_argv(ckpt, out, "--skip", "100", *SRS_FLAGS))
    assert res.returncode == 0, res.stderr
    assert "predicted 5 images" in res.stdout
    meta, header, rows, _ = read_results(out)
    assert header == PREDICT_HEADER and meta["checkpoint_sha256"] == sha256(ckpt)
    assert "conf_drop=20" in meta["srs"] and meta["standard"] == "anderson:10"
    assert [int(r["idx"]) for r in rows] == [0, 100, 200, 300, 400]
    check_predict_rows(rows, srs=True)


def test_predict_header_leaves_out_the_fallback_route(ckpt, tmp_path):
    """Adaptive pairing in PREDICT has no fallback route: the header records only what shaped the rows."""
    out = tmp_path / "pred_auto.tsv"
    predict_script.main(predict_argv(ckpt, out, "--max", "1", "--srs", "--f_thresh", "1", "--std_thresh", "10"))
    srs = read_results(out)[0]["srs"]
    assert "conf_drop=auto" in srs and "radii=0,0.125,0.25,0.375,0.5,0.625,0.75" in srs
    assert "fallback" not in srs and "route_pilot" not in srs and "step_cost" not in srs and "second_look" not in srs
    cert = tmp_path / "cert_auto.tsv"
    run_certify(certify_argv(ckpt, cert, "--max", "1", "--srs", "--f_thresh", "1", "--std_thresh", "10"))
    assert "fallback=True route_pilot=0.5 second_look=3.0" in read_results(cert)[0]["srs"]


# ----------------------------------------------------------------- 6. bad input
def _no_dataset(*a, **k):
    raise AssertionError("the data set must not be opened (or downloaded) for bad input")


BAD_CERTIFY = [
    ("missing_ckpt", {"ckpt": "missing"}, ["checkpoint not found"]),
    ("corrupt_ckpt", {"ckpt": "corrupt"}, ["unreadable", "corrupt"]),
    ("other_dataset", {"dataset": "cifar10"}, ["trained on digits, not cifar10"]),
    ("unknown_dataset", {"dataset": "mnist"}, ["unknown data set", "mnist"]),
    ("sigma_zero", {"sigma": "0"}, ["sigma must be > 0"]),
    ("sigma_negative", {"sigma": "-0.5"}, ["sigma must be > 0"]),
    ("sigma_nan", {"sigma": "nan"}, ["sigma must be > 0"]),
    ("sigma_inf", {"sigma": "inf"}, ["sigma must be > 0"]),
    ("N0_zero", {"extra": ["--N0", "0"]}, ["--N0 must be >= 1"]),
    ("N_zero", {"extra": ["--N", "0"]}, ["--N must be >= 1"]),
    ("alpha_zero", {"extra": ["--alpha", "0"]}, ["--alpha must be in (0, 1)"]),
    ("alpha_one", {"extra": ["--alpha", "1"]}, ["--alpha must be in (0, 1)"]),
    ("batch_zero", {"extra": ["--batch", "0"]}, ["--batch"]),
    ("conf_drop_gt_N", {"extra": SRS_FLAGS[:-1] + ["80"]}, ["--conf_drop 80 is larger than --N 60"]),
    ("f_solver", {"extra": ["--f_solver", "newton"]}, ["'newton' is not a solver", "anderson"]),
    ("std_solver", {"extra": ["--srs", "--std_solver", "newton"]}, ["--std_solver 'newton' is not a solver"]),
    ("f_thresh_zero", {"extra": ["--f_thresh", "0"]}, ["--f_thresh must be >= 1"]),
    ("conf_drop_word", {"extra": ["--srs", "--conf_drop", "many"]}, ["--conf_drop must be 'auto'", "'many'"]),
    ("conf_drop_negative", {"extra": ["--srs", "--conf_drop", "-3"]}, ["--conf_drop must be >= 0"]),
    ("radius_slack_negative", {"extra": ["--srs", "--radius_slack", "-0.1"]}, ["--radius_slack must be a finite number >= 0"]),
    ("radius_slack_nan", {"extra": ["--srs", "--radius_slack", "nan"]}, ["--radius_slack must be a finite number >= 0"]),
    ("max_pairs_zero", {"extra": ["--srs", "--max_pairs", "0"]}, ["--max_pairs must be between 1 and --N 60"]),
    ("max_pairs_gt_N", {"extra": ["--srs", "--max_pairs", "61"]}, ["--max_pairs must be between 1 and --N 60"]),
    ("step_cost_zero", {"extra": ["--srs", "--step_cost", "0"]}, ["--step_cost must be a finite number > 0"]),
    ("refine_margin_negative", {"extra": ["--srs", "--refine_margin", "-1"]},
     ["--refine_margin must be a finite number >= 0"]),
    ("refine_margin_no_srs", {"extra": ["--refine_margin", "2"]}, ["--refine_margin", "needs --srs"]),
    ("radius_grid_removed", {"extra": ["--srs", "--radius_grid", "0.25"]},
     ["--radius_grid is replaced by --radii", "pass --radii instead"]),
    ("radii_negative", {"extra": ["--srs", "--radii", "0", "-0.25"]}, ["--radii must be finite numbers >= 0", "-0.25"]),
    ("radii_and_slack", {"extra": ["--srs", "--radii", "0", "0.5", "--radius_slack", "0.1"]},
     ["--radius_slack replaces", "--radii", "give one of them"]),
    ("radii_fixed_K", {"extra": ["--srs", "--conf_drop", "20", "--radii", "0.1"]},
     ["--radii sets the table", "--conf_drop auto"]),
    ("radii_standard", {"extra": ["--radii", "0", "0.5"]}, ["--radii sets the table", "drop --radii"]),
    ("f_and_std_thresh_differ", {"extra": ["--std_thresh", "10"]},
     ["--f_thresh 4 and --std_thresh 10 both name the certified model", "give one of them"]),
    ("f_and_std_solver_differ", {"extra": ["--f_solver", "naive", "--std_solver", "anderson"]},
     ["--f_solver naive and --std_solver anderson", "give one of them"]),
    ("second_look_below_one", {"extra": ["--srs", "--second_look", "0.5"]}, ["--second_look must be 0 (off) or a factor > 1"]),
    ("second_look_fixed_K", {"extra": ["--srs", "--conf_drop", "20", "--second_look", "2"]},
     ["--second_look sets adaptive pairing"]),
    ("second_look_reference", {"extra": ["--srs", "--certificate", "reference", "--second_look", "2"]},
     ["--second_look", "needs --certificate eliminated"]),
    ("route_pilot_negative", {"extra": ["--srs", "--route_pilot", "-0.1"]},
     ["--route_pilot must be a finite number >= 0"]),
    ("route_pilot_fixed_K", {"extra": ["--srs", "--conf_drop", "40", "--route_pilot", "0.2"]},
     ["--route_pilot sets adaptive pairing"]),
    ("route_pilot_no_fallback", {"extra": ["--srs", "--no_fallback", "--route_pilot", "0.2"]},
     ["--route_pilot", "--no_fallback turns off"]),
    ("warm_start_unknown", {"extra": ["--srs", "--warm_start", "best"]},
     ["--warm_start must be one of previous, mean", "'best'"]),
    ("warm_start_no_srs", {"extra": ["--warm_start", "mean"]}, ["--warm_start", "needs --srs"]),
    ("conf_drop_zero", {"extra": ["--srs", "--conf_drop", "0"]},
     ["--conf_drop 0 pairs no sample", "eliminated certificate", "--conf_drop auto"]),
    ("conf_drop_zero_reference", {"extra": ["--srs", "--conf_drop", "0", "--certificate", "reference"]},
     ["--conf_drop 0 pairs no sample", "reference certificate"]),
    ("warmup_thresh_no_srs", {"extra": ["--warmup_thresh", "10"]},
     ["--warmup_thresh sets the SRS chain", "needs --srs"]),
    ("step_tol_no_srs", {"extra": ["--step_tol", "0.01"]}, ["--step_tol sets the SRS chain", "needs --srs"]),
    ("certificate_no_srs", {"extra": ["--certificate", "none"]}, ["--certificate sets the SRS chain", "needs --srs"]),
    ("conf_drop_no_srs", {"extra": ["--conf_drop", "20"]}, ["--conf_drop sets the SRS chain", "needs --srs"]),
    ("step_tol_negative", {"extra": ["--srs", "--step_tol", "-1"]}, ["--step_tol must be a finite number >= 0"]),
    ("adaptive_flag_fixed_K", {"extra": ["--srs", "--conf_drop", "20", "--max_pairs", "5"]},
     ["--max_pairs sets adaptive pairing", "--conf_drop auto"]),
    ("adaptive_flag_no_srs", {"extra": ["--no_fallback"]}, ["--no_fallback sets adaptive pairing", "needs --srs"]),
    ("unwritable", {"out": "under_file"}, ["cannot create the output folder", "afile is a file, not a folder",
                                           "writable OUTFILE"]),
    ("resume_and_overwrite", {"extra": ["--resume", "--overwrite"]},
     ["--resume continues OUTFILE and --overwrite replaces it: give one of them"]),
    ("unknown_flag", {"extra": ["--bogus"]}, ["error: unrecognized arguments: --bogus; see certify.py --help"]),
]


@pytest.mark.parametrize("name,case,needles", BAD_CERTIFY, ids=[c[0] for c in BAD_CERTIFY])
def test_certify_bad_input_one_line_error_and_no_output(ckpt, tmp_path, capsys, monkeypatch, name, case, needles):
    if name != "unwritable":  # everything else must fail before the data set is even opened
        monkeypatch.setattr(srs_runner, "get_dataset", _no_dataset)
    ck = ckpt
    if case.get("ckpt") == "missing":
        ck = tmp_path / "nope" / "missing.pth"
    elif case.get("ckpt") == "corrupt":
        ck = tmp_path / "corrupt.pth"
        ck.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "res" / "out.tsv"
    if case.get("out") == "under_file":
        (tmp_path / "afile").write_text("not a folder")
        out = tmp_path / "afile" / "out.tsv"
    argv = [case.get("dataset", "digits"), str(ck), case.get("sigma", str(SIGMA)), str(out)] + SMALL + case.get("extra", [])
    with pytest.raises(SystemExit) as exc:
        certify_script.main(argv)
    assert_one_line_error(capsys, exc, *needles)
    assert not out.exists() and not (tmp_path / "res").exists()


BAD_PREDICT = [
    ("sigma_zero", ["0"], [], ["sigma must be > 0"]),
    ("N_zero", [str(SIGMA)], ["--N", "0"], ["--N must be >= 1"]),
    ("alpha_one", [str(SIGMA)], ["--alpha", "1"], ["--alpha must be in (0, 1)"]),
    ("conf_drop_gt_N", [str(SIGMA)], ["--srs", "--conf_drop", "61"], ["--conf_drop 61 is larger than --N 60"]),
    ("f_solver", [str(SIGMA)], ["--f_solver", "bogus"], ["'bogus' is not a solver"]),
    # PREDICT has no standard fallback route: its flags are refused, not ignored
    ("route_pilot", [str(SIGMA)], ["--srs", "--route_pilot", "0.2"],
     ["--route_pilot sets the standard fallback route of CERTIFY", "drop --route_pilot"]),
    ("no_fallback", [str(SIGMA)], ["--srs", "--no_fallback"], ["--no_fallback sets the standard fallback route"]),
    ("step_cost", [str(SIGMA)], ["--srs", "--step_cost", "3"], ["--step_cost sets the standard fallback route"]),
    ("N0", [str(SIGMA)], ["--N0", "10"], ["error: unrecognized arguments: --N0 10; see predict.py --help"]),
]


@pytest.mark.parametrize("name,sigma,extra,needles", BAD_PREDICT, ids=[c[0] for c in BAD_PREDICT])
def test_predict_bad_input_one_line_error_and_no_output(ckpt, tmp_path, capsys, monkeypatch, name, sigma, extra, needles):
    monkeypatch.setattr(srs_runner, "get_dataset", _no_dataset)
    out = tmp_path / "p.tsv"
    with pytest.raises(SystemExit) as exc:
        predict_script.main(["digits", ckpt] + sigma + [str(out), "--N", "60", "--quiet"] + extra)
    assert_one_line_error(capsys, exc, *needles)
    assert not out.exists()


def test_wrong_dataset_checkpoint_fails_in_a_real_process_without_download(ckpt, tmp_path):
    """cifar10 on the digits checkpoint: the mismatch is reported; nothing is downloaded or written."""
    out = tmp_path / "out" / "c.tsv"
    res = run_script("certify.py", ["cifar10", ckpt, "0.5", str(out), "--N", "60", "--quiet"], cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert "trained on digits, not cifar10" in lines[0]
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert not out.exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "data").exists()  # the default cifar10 root would be ./data/cifar10


# ----------------------------------------------------------------- 7. non-finite solves
class NaNDEQ(torch.nn.Module):
    """z = z/2 + x on R^d, head sign(w.z): a 2-class DEQ whose solve returns NaN logits (and state)
    for every sample whose first input coordinate exceeds ``thresh``."""

    def __init__(self, d=4, thresh=0.5):
        super().__init__()
        self.w, self.thresh, self.nan_rows, self.calls = torch.ones(d), thresh, 0, 0

    def solve(self, x, solver="naive", max_iter=5, z0=None, tol=None):
        self.calls += 1
        xf = x.flatten(1)
        z0 = torch.zeros_like(xf) if z0 is None else z0
        res = fp_solve(solver, lambda z: 0.5 * z + xf, z0, max_iter, tol=1e-9 if tol is None else tol, stop_mode="abs")
        s = res.z @ self.w
        logits, z = torch.stack([-s, s], 1), res.z.clone()
        bad = xf[:, 0] > self.thresh
        self.nan_rows += int(bad.sum())
        logits[bad] = float("nan")
        z[bad] = float("nan")  # a diverged state also poisons the SRS warm start
        return DEQOutput(logits, z, dataclasses.replace(res, residual=torch.where(bad, torch.full_like(s, float("nan")),
                                                                                 res.residual)))

    def forward(self, x):
        return self.solve(x).logits


def test_nonfinite_logits_abstain_through_python_api():
    x = torch.full((1, 1, 1, 4), 0.3)  # far on the positive side: without NaNs this certifies class 1
    ok_model = NaNDEQ(thresh=float("inf"))
    c = Smooth(ok_model, 2, 0.25, standard=DEQSolve("naive", 20)).certify(x, 10, 60, ALPHA, 30, torch.Generator().manual_seed(0))
    assert c.prediction == 1 and c.status == "ok" and c.radius > 0  # control: the wrapper itself is fine

    model = NaNDEQ(thresh=0.6)  # ~ 11% of the noisy samples give NaN
    smooth = Smooth(model, 2, 0.25, standard=DEQSolve("naive", 20))
    cert = smooth.certify(x, 10, 60, ALPHA, 30, generator=torch.Generator().manual_seed(0))
    assert model.nan_rows > 0
    pred, radius = cert
    assert pred == ABSTAIN and radius == 0.0
    assert cert.status == f"nonfinite_logits({model.nan_rows})"
    assert math.isnan(cert.residual) or math.isfinite(cert.residual)

    p = smooth.predict(x, 60, ALPHA, 30, generator=torch.Generator().manual_seed(1))
    assert p.prediction == ABSTAIN and p.status.startswith("nonfinite")

    srs = SRSConfig(step=DEQSolve("naive", 2), warmup=DEQSolve("naive", 10), conf_drop=20)
    model = NaNDEQ(thresh=0.6)
    smooth = Smooth(model, 2, 0.25, standard=DEQSolve("naive", 20), srs=srs)
    cert = smooth.certify(x, 10, 60, ALPHA, 30, generator=torch.Generator().manual_seed(0))
    assert cert.prediction == ABSTAIN and cert.radius == 0.0 and cert.status.startswith("nonfinite_logits(")
    assert int(cert.status[len("nonfinite_logits("):-1]) > 0
    p = smooth.predict(x, 60, ALPHA, 30, generator=torch.Generator().manual_seed(0))
    assert p.prediction == ABSTAIN and p.status.startswith("nonfinite")


class _NaNOnCalls:
    """Wraps the real DEQ; the solves numbered in ``nan_calls`` return NaN logits for half their rows."""

    def __init__(self, model, nan_calls):
        self.model, self.nan_calls, self.calls = model, set(nan_calls), 0

    def eval(self):
        self.model.eval()
        return self

    def solve(self, x, *a, **k):
        self.calls += 1
        out = self.model.solve(x, *a, **k)
        if self.calls in self.nan_calls:
            out.logits[: x.shape[0] // 2] = float("nan")
        return out


def test_nonfinite_logits_row_through_certify_main(ckpt, tmp_path, monkeypatch):
    real_load = srs_runner.load_model

    def load(path, device="cpu", cfg_path=None):
        loaded = real_load(path, device, cfg_path)
        # standard mode, N0 10 / N 60 / batch 30: 3 solves per image; solve 5 is image 1's first estimation batch
        return dataclasses.replace(loaded, model=_NaNOnCalls(loaded.model, {5}))

    monkeypatch.setattr(srs_runner, "load_model", load)
    out = tmp_path / "nan.tsv"
    summary = run_certify(certify_argv(ckpt, out, "--max", "3"))
    assert summary["images"] == 3
    _, header, rows, _ = read_results(out)
    assert header == CERTIFY_HEADER and [r["idx"] for r in rows] == ["0", "1", "2"]
    bad = rows[1]
    assert bad["predict"] == "-1" and float(bad["radius"]) == 0.0 and bad["correct"] == "0"
    assert bad["status"] == "nonfinite_logits(15)"
    for r in (rows[0], rows[2]):
        assert not r["status"].startswith("nonfinite")
