"""Tests for SRS.analysis and the SRS/code/analyze.py CLI on tiny hand-made result files."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo is not installed into the venv; make DEQ/SRS importable
    sys.path.insert(0, str(ROOT))

from DEQ.errors import UserError  # noqa: E402
from SRS import analysis  # noqa: E402
from SRS.results import REQUIRED_COLUMNS  # noqa: E402

# Ours: metadata comments, float seconds, extra columns (including an unknown one).
OURS = """# model: mdeq-small
# sigma: 0.25
idx\tlabel\tpredict\tradius\tcorrect\ttime\tn_A\tn\tp_A_lower\tstatus\tmystery
0\t3\t3\t0.8\t1\t1.5\t95\t100\t0.9\tok\tx
1\t2\t2\t0.3\t1\t0.5\t80\t100\t0.7\tok\ty
2\t1\t-1\t0.0\t0\t1.0\t40\t100\t0.3\tabstain\tz
3\t4\t5\t0.6\t0\t1.0\t90\t100\t0.8\tok\tw
"""

# Reference six-column format with datetime.timedelta times (and one plain-seconds value).
REFERENCE = """idx\tlabel\tpredict\tradius\tcorrect\ttime
0\t3\t3\t0.9\t1\t0:00:02.500000
1\t2\t2\t0.2\t1\t0:01:00
2\t1\t-1\t0.0\t0\t3.25
3\t4\t4\t0.6\t1\t1 day, 0:00:00
"""

QCRS = """# method: qcrs
idx\tlabel\tpredict\tradius\tcorrect\ttime\tbest_sigma\tp_A_lower\tfixed_predict\tfixed_radius\tfixed_correct
0\t3\t3\t1.2\t1\t2.0\t0.5\t0.9\t3\t0.7\t1
1\t2\t2\t0.4\t1\t2.0\t0.25\t0.8\t-1\t0.0\t0
2\t1\t0\t0.3\t0\t2.0\t0.25\t0.7\t0\t0.2\t0
3\t4\t4\t0.1\t1\t2.0\t0.12\t0.6\t4\t0.3\t1
"""

HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"


def rows_tsv(radii, correct=None, times=None, idx=None):
    """A six-column TSV with given radii (predict = label = 0; abstain where radius is 0 and not correct)."""
    idx = list(range(len(radii))) if idx is None else idx
    correct = [1] * len(radii) if correct is None else correct
    times = [1.0] * len(radii) if times is None else times
    lines = [f"{i}\t0\t{0 if (r > 0 or c) else -1}\t{r}\t{c}\t{t}" for i, r, c, t in zip(idx, radii, correct, times)]
    return HEADER + "\n".join(lines) + "\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "SRS/code/analyze.py"), *map(str, args)],
                          cwd=cwd, capture_output=True, text=True)


# ----------------------------------------------------------------------------- reading + metrics


def test_certified_accuracy_acr_abstain_time(tmp_path):
    df = analysis.read_results(write(tmp_path, "ours.tsv", OURS))
    assert df.attrs["meta"] == {"model": "mdeq-small", "sigma": "0.25"}
    assert list(df.columns[:6]) == list(REQUIRED_COLUMNS) and "mystery" in df.columns
    np.testing.assert_allclose(analysis.certified_accuracy(df, [0, 0.25, 0.3, 0.5, 0.8, 1.0]),
                               [2 / 4, 2 / 4, 2 / 4, 1 / 4, 1 / 4, 0])
    assert analysis.average_certified_radius(df) == pytest.approx((0.8 + 0.3) / 4)
    assert analysis.abstain_rate(df) == 0.25
    assert analysis.mean_time(df) == pytest.approx(1.0)


def test_reference_format_timedelta(tmp_path):
    df = analysis.read_results(write(tmp_path, "ref.tsv", REFERENCE))
    np.testing.assert_allclose(df["time"], [2.5, 60.0, 3.25, 86400.0])
    assert df["predict"].dtype.kind == "i" and df.attrs["meta"] == {}
    np.testing.assert_allclose(analysis.certified_accuracy(df, [0, 0.5, 1.0]), [0.75, 0.5, 0.0])
    assert analysis.average_certified_radius(df) == pytest.approx((0.9 + 0.2 + 0.6) / 4)


def test_hp_certified_accuracy_matches_statsmodels(tmp_path):
    from statsmodels.stats.proportion import proportion_confint

    df = analysis.read_results(write(tmp_path, "a.tsv", rows_tsv([0.1 * i for i in range(20)])))
    radii, alpha = [0, 0.5, 1.0, 5.0], 0.001
    expected = [proportion_confint(k, 20, alpha=2 * alpha, method="beta")[0] for k in (20, 15, 10, 0)]
    np.testing.assert_allclose(analysis.hp_certified_accuracy(df, radii, alpha), np.nan_to_num(expected))
    assert np.all(analysis.hp_certified_accuracy(df, radii, alpha) <= analysis.certified_accuracy(df, radii))


def test_summary_table_speedup_fixed_and_hp(tmp_path):
    runs = {"std": analysis.read_results(write(tmp_path, "ours.tsv", OURS)),
            "qcrs": analysis.read_results(write(tmp_path, "q.tsv", QCRS))}
    table = analysis.summary_table(runs, [0, 0.5], baseline=None, hp_alpha=0.01, compare_fixed=True)
    assert list(table.columns) == ["0.0", "0.5", "ACR", "abstain", "time (s)", "speedup"]
    assert table.loc["qcrs", "speedup"] == pytest.approx(1.0 / 2.0)
    assert table.loc["qcrs", "0.5"] == pytest.approx(25.0)
    fixed = table.loc["qcrs [fixed sigma]"]
    assert fixed["0.0"] == pytest.approx(50.0) and fixed["0.5"] == pytest.approx(25.0)
    assert fixed["ACR"] == pytest.approx((0.7 + 0.3) / 4) and fixed["abstain"] == pytest.approx(25.0)
    assert "std [HP lower bound, alpha=0.01]" in table.index
    assert "std [fixed sigma]" not in table.index  # no fixed columns there
    md = analysis.to_markdown(table)
    assert md.splitlines()[0] == "| model | 0.0 | 0.5 | ACR | abstain | time (s) | speedup |"
    assert "| std | 50 | 25 | 0.275 | 25.0% | 1 | 1.00x |" in md
    tex = analysis.to_latex(table)
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"25.0\%" in tex


def test_rounding_is_half_up():
    assert analysis._round_half_up(100 * 29 / 40) == 73
    assert analysis._round_half_up(72.49) == 72


# ----------------------------------------------------------------------------- RRD


def test_relative_radius_difference_known_values(tmp_path):
    std = analysis.read_results(write(tmp_path, "std.tsv", rows_tsv([1.0, 0.5, 0.0, 0.0, 0.2], [1, 1, 0, 0, 1])))
    srs = analysis.read_results(write(tmp_path, "srs.tsv", rows_tsv([0.95, 0.6, 0.3, 0.0, 0.0], [1, 1, 1, 0, 0])))
    rrd = analysis.relative_radius_difference(std, srs)
    assert list(rrd["idx"]) == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(rrd["rrd"], [0.05, 0.2, np.nan, np.nan, 1.0])
    s = analysis.rrd_summary(rrd)
    assert s["n_defined"] == 3 and s["mean"] == pytest.approx(1.25 / 3)
    assert s["median"] == pytest.approx(0.2) and s["max"] == pytest.approx(1.0)
    assert s["frac_below"] == pytest.approx(1 / 3)
    assert (s["std_zero_srs_positive"], s["both_zero"], s["srs_larger"]) == (1, 1, 2)
    assert list(analysis.larger_radius_images(rrd)["idx"]) == [1, 2]


def test_rrd_refuses_different_image_sets(tmp_path):
    a = analysis.read_results(write(tmp_path, "a.tsv", rows_tsv([0.5, 0.5], idx=[0, 1])))
    b = analysis.read_results(write(tmp_path, "b.tsv", rows_tsv([0.5, 0.5], idx=[0, 2])))
    with pytest.raises(UserError, match="image sets differ"):
        analysis.relative_radius_difference(a, b)
    lines = analysis.rrd_report({"std": a, "SRS-1A": b}, "std")
    assert lines == ["RRD SRS-1A vs std: skipped, image sets differ (2 idx in only one file)"]
    with pytest.raises(UserError, match="a.tsv and .*b.tsv cover different images.*--allow-different-images"):
        analysis.check_same_images({"a": a, "b": b}, "a", allow=False)
    note = analysis.check_same_images({"a": a, "b": b}, "a", allow=True)
    assert len(note) == 1 and "different images" in note[0] and "b: 2 idx" in note[0]


def _headed(srs, sigma, mode="certify"):
    return f"# mode: {mode}\n# sigma: {sigma}\n# srs: {srs}\n" + rows_tsv([0.5, 0.4], idx=[0, 1])


@pytest.mark.parametrize("files,expected", [
    # header: a standard run and an SRS run of the same sigma -> RRD (either one may be the baseline)
    ({"std": _headed("off", 0.25), "fast": _headed("step=anderson:1", 0.25)}, ["RRD fast vs std"]),
    ({"fast": _headed("step=anderson:1", 0.25), "std": _headed("off", 0.25)}, ["RRD fast vs std"]),
    # another sigma, two standard runs, two SRS runs, a QCRS file: no RRD
    ({"std": _headed("off", 0.25), "fast": _headed("step=anderson:1", 0.5)}, []),
    ({"std": _headed("off", 0.25), "std2": _headed("off", 0.25)}, []),
    ({"srs": _headed("step=anderson:1", 0.25), "srs2": _headed("step=anderson:3", 0.25)}, []),
    ({"std": _headed("off", 0.25), "q": _headed("step=anderson:1", 0.25, "certify_qcrs")}, []),
    # headerless reference files: Cohen's sigma files are no pair; a label saying SRS makes one
    ({"sigma_0.25": rows_tsv([0.5, 0.4]), "sigma_0.50": rows_tsv([0.7, 0.2])}, []),
    ({"MDEQ-30A": rows_tsv([0.5, 0.4]), "SRS-MDEQ-1A": rows_tsv([0.7, 0.2])}, ["RRD SRS-MDEQ-1A vs MDEQ-30A"]),
])
def test_rrd_only_for_a_standard_and_an_srs_run_of_one_sigma(tmp_path, files, expected):
    runs = {label: analysis.read_results(write(tmp_path, f"{i}.tsv", text)) for i, (label, text) in enumerate(files.items())}
    lines = analysis.rrd_report(runs, next(iter(runs)))
    assert [line.split(":")[0] for line in lines] == expected


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name, text, pattern", [
    ("empty.tsv", "", "empty"),
    ("comments.tsv", "# only: metadata\n", "holds only '#' header lines, no column line and no rows"),
    ("header.tsv", HEADER, "no result rows"),
    ("cols.tsv", "idx\tlabel\tpredict\tcorrect\n0\t1\t1\t1\n", "missing required column.*radius, time"),
    ("spaces.tsv", "idx label predict radius correct time\n0 1 1 0.5 1 1.0\n", "tab-separated"),
    ("nan.tsv", HEADER + "0\t1\t1\tbig\t1\t1.0\n", "line 2: column 'radius' has 'big'"),
    ("time.tsv", HEADER + "0\t1\t1\t0.5\t1\tyesterday\n", "column 'time'"),
    ("short.tsv", HEADER + "0\t1\t1\t0.5\t1\n", "line 2 has 5 fields"),
    ("correct.tsv", HEADER + "0\t1\t1\t0.5\t2\t1.0\n", "'correct' must be 0 or 1"),
    ("dup.tsv", HEADER + "0\t1\t1\t0.5\t1\t1.0\n0\t1\t1\t0.5\t1\t1.0\n", "idx 0 appears more than once"),
])
def test_bad_files_raise_user_error(tmp_path, name, text, pattern):
    path = write(tmp_path, name, text)
    with pytest.raises(UserError, match=pattern) as exc:
        analysis.read_results(path)
    assert name in str(exc.value) and "\n" not in str(exc.value)


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(UserError, match="file not found"):
        analysis.read_results(tmp_path / "nope.tsv")
    runs = {"a": analysis.read_results(write(tmp_path, "a.tsv", rows_tsv([0.5])))}
    with pytest.raises(UserError, match="--baseline 'z'"):
        analysis.summary_table(runs, [0], baseline="z")
    with pytest.raises(UserError, match="--compare-fixed"):
        analysis.summary_table(runs, [0], compare_fixed=True)
    with pytest.raises(UserError, match="--hp-alpha"):
        analysis.summary_table(runs, [0], hp_alpha=0.7)


def test_parse_spec(tmp_path):
    assert analysis.parse_spec("dir/run_1.tsv") == ("dir/run_1.tsv", "run_1")
    assert analysis.parse_spec("dir/run_1.tsv:SRS k=2") == ("dir/run_1.tsv", "SRS k=2")
    with pytest.raises(UserError, match="label 'x' is used twice"):
        path = write(tmp_path, "a.tsv", rows_tsv([0.5]))
        analysis.load_runs([f"{path}:x", f"{path}:x"])


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path):
    write(tmp_path, "a.tsv", rows_tsv([1.0, 0.5, 0.0, 0.0, 0.2], [1, 1, 0, 0, 1], times=[2.0] * 5))
    write(tmp_path, "b.tsv", "# sigma: 0.25\n" + rows_tsv([0.95, 0.6, 0.3, 0.0, 0.0], [1, 1, 1, 0, 0], times=[0.5] * 5))
    out = tmp_path / "out"
    proc = run_cli("a.tsv:std", "b.tsv:srs", "--out", out, "--hp-alpha", "0.001", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| model | 0.0 | 0.25 | 0.5 | 0.75 | 1.0 | 1.25 | 1.5 | ACR | abstain | time (s) | speedup |" in proc.stdout
    assert "| srs | 60 | 60 | 40 | 20 | 0 | 0 | 0 | 0.370 | 40.0% | 0.5 | 4.00x |" in proc.stdout
    assert "RRD srs vs std: 3/5 images" in proc.stdout
    for name in ["table.md", "table.tex", "table.csv", "curves.png", "curves.pdf", "rrd_srs.png", "rrd_srs_larger.csv"]:
        assert (out / name).stat().st_size > 0, name
    assert (out / "rrd_srs_larger.csv").read_text().splitlines() == [
        "idx,radius_std,radius_srs", "1,0.5,0.6", "2,0.0,0.3"]
    assert "model,0.0,0.25" in (out / "table.csv").read_text()


def test_cli_different_images_refused_unless_allowed_and_then_said(tmp_path):
    write(tmp_path, "a.tsv", rows_tsv([0.5, 0.5, 0.5], idx=[0, 1, 2], times=[2.0] * 3))
    write(tmp_path, "b.tsv", rows_tsv([0.5, 0.5, 0.5], idx=[0, 2, 4]))  # a skip-2 run next to a skip-1 run
    proc = run_cli("a.tsv", "b.tsv", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "different images" in lines[0], proc.stderr
    assert "--allow-different-images" in lines[0] and "a.tsv" in lines[0] and "b.tsv" in lines[0]
    proc = run_cli("a.tsv", "b.tsv", "--allow-different-images", "--out", "o", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| b |" in proc.stdout and "note: these runs cover different images (b: 2 idx" in proc.stdout
    assert "different images" in (tmp_path / "o" / "table.md").read_text()


def test_cli_checks_out_before_printing(tmp_path):
    write(tmp_path, "a.tsv", rows_tsv([0.5, 0.5]))
    write(tmp_path, "afile", "not a folder")
    for out in ("afile", "afile/sub"):
        proc = run_cli("a.tsv", "--out", out, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stdout == "", proc.stdout
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: --out") and "afile" in lines[0], proc.stderr


@pytest.mark.parametrize("content", [None, "idx\tlabel\tpredict\n0\t1\t1\n"])
def test_cli_bad_file_exits_2_one_line(tmp_path, content):
    if content is not None:
        write(tmp_path, "bad.tsv", content)
    proc = run_cli("bad.tsv", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    assert "bad.tsv" in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


def _analyze_main():
    import importlib.util
    spec = importlib.util.spec_from_file_location("analyze_script", ROOT / "SRS" / "code" / "analyze.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize("radii,needle", [
    (["nan"], "error: --radii must be finite numbers >= 0, got nan; e.g. --radii 0 0.25 0.5"),
    (["0", "inf"], "error: --radii must be finite numbers >= 0, got inf; e.g. --radii 0 0.25 0.5"),
    (["0", "-0.5"], "error: --radii must be finite numbers >= 0, got -0.5; e.g. --radii 0 0.25 0.5"),
    (["abc"], "error: argument --radii: invalid float value: 'abc'; see analyze.py --help"),
])
def test_cli_bad_radii_one_line(tmp_path, capsys, radii, needle):
    path = write(tmp_path, "a.tsv", rows_tsv([0.5, 0.4]))
    with pytest.raises(SystemExit) as exc:
        _analyze_main()([str(path), "--radii", *radii])
    captured = capsys.readouterr()
    assert exc.value.code == 2 and captured.out == ""
    assert captured.err.strip().splitlines() == [needle], captured.err
