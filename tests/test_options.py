"""Every certification option is declared once (``SRS.settings``): its flag, spec field, header entry, resume
check, group and label all come from that declaration.  These tests walk every declared option, so an option
added without a test case (or without a header entry or a reason for none) fails here."""
import argparse

import pytest

from conftest import ROOT

from DEQ.errors import UserError
from SRS.cli import ADVANCED, certify_parser, predict_parser, smoothing_spec
from SRS.results import ResultsFile, read_rows
from SRS.runner import smoothing_header
from SRS.settings import SRS_DEFAULTS, DEQSolve, SmoothingSpec, SRSOptions, declared

POS = ["digits", "ckpt.pth", "0.25", "out.tsv"]
SRS = ["--srs"]
CERTIFIED = DEQSolve("anderson", 30, 0.0)   # CERTIFY's defaults
N = 1000
# name -> [(mode flags, the option's flags, the value it lands as)]: the option is tested in each mode
CASES = {
    "srs": [([], ["--srs"], True)],
    "f_thresh": [([], ["--f_thresh", "7"], 7), (SRS, ["--f_thresh", "1"], 1)],
    "f_solver": [([], ["--f_solver", "naive"], "naive"), (SRS, ["--f_solver", "naive"], "naive")],
    "std_solver": [([], ["--std_solver", "broyden"], "broyden"), (SRS, ["--std_solver", "broyden"], "broyden")],
    "std_thresh": [([], ["--std_thresh", "12"], 12), (SRS, ["--std_thresh", "12"], 12)],
    "tol": [([], ["--tol", "0.01"], 0.01), (SRS, ["--tol", "0.01"], 0.01)],
    "step_tol": [(SRS, ["--step_tol", "0.01"], 0.01)],
    "warmup_solver": [(SRS, ["--warmup_solver", "naive"], "naive")],
    "warmup_thresh": [(SRS, ["--warmup_thresh", "4"], 4)],
    "warmup_interval": [(SRS, ["--warmup_interval", "5"], 5)],
    "conf_drop": [(SRS, ["--conf_drop", "40"], 40)],
    "certificate": [(SRS, ["--certificate", "reference"], "reference"),
                    (SRS + ["--conf_drop", "40"], ["--certificate", "reference"], "reference")],
    "chain_across_phases": [(SRS, ["--no_chain_across_phases"], False)],
    "radius_slack": [(SRS, ["--radius_slack", "0.1"], 0.1)],
    "radii": [(SRS, ["--radii", "0.5", "0", "0.3"], (0.5, 0.0, 0.3))],
    "max_pairs": [(SRS, ["--max_pairs", "50"], 50)],
    "fallback": [(SRS, ["--no_fallback"], False)],
    "route_pilot": [(SRS, ["--route_pilot", "0.2"], 0.2)],
    "second_look": [(SRS, ["--second_look", "2"], 2.0), (SRS, ["--second_look", "0"], 0.0)],
    "warm_start": [(SRS, ["--warm_start", "mean"], "mean")],
    "step_cost": [(SRS, ["--step_cost", "4"], 4.0)],
    "refine_margin": [(SRS, ["--refine_margin", "1"], 1.0)],
}
WALK = [(name, mode, flags, value) for name, cases in CASES.items() for mode, flags, value in cases]
META = {"command": "x", "versions": "v", "date": "d", "mode": "certify", "sigma": 0.25, "N": N}


def test_every_declared_option_has_a_case():
    assert set(CASES) == {name for name, _, _ in declared(SmoothingSpec)}


def _header(argv, routes=True):
    spec = smoothing_spec(certify_parser().parse_args(POS + argv))
    spec.validate(N, routes=routes)
    return spec, smoothing_header(*spec.resolve(CERTIFIED, 0.25), routes=routes)


def _entries(header):
    """Top-level entries, and the KEY=value tokens of the srs entry as 'srs:KEY'."""
    out = dict(header)
    if header["srs"] != "off":
        out.update({f"srs:{k}": v for k, v in (t.split("=", 1) for t in header["srs"].split())})
    return out


@pytest.mark.parametrize("name,mode,flags,value", WALK, ids=[f"{w[0]}-{'srs' if w[1] else 'std'}-{i}"
                                                            for i, w in enumerate(WALK)])
def test_option_parses_lands_in_the_spec_the_header_and_the_resume_check(tmp_path, name, mode, flags, value):
    opt = dict((n, o) for n, o, _ in declared(SmoothingSpec))[name]
    assert flags[0] == opt.flag
    base, base_header = _header(mode)
    spec, header = _header(mode + flags)
    # the flag lands in its field, and only there
    assert getattr(spec, name) == value and getattr(base, name) != value
    assert [n for n, _ in spec.changed()] == sorted({n for n, _ in base.changed()} | {name},
                                                    key=[d[0] for d in declared(SmoothingSpec)].index)
    # the header records it where its declaration says
    if opt.header is None:
        assert opt.header_free, f"{name} is in no header and gives no reason"
        assert header == base_header
        return
    old, new = _entries(base_header), _entries(header)
    assert any(old.get(key) != new.get(key) for key in opt.header_keys()), (name, opt.header, base_header, header)
    # so a file written with the default refuses to resume with the option, and resumes without it
    path = tmp_path / "r.tsv"
    f = ResultsFile(str(path), ("idx", "correct", "time"), {**META, **base_header}).open(False, False)
    f.write({"idx": 0, "correct": 1, "time": 0.5})
    f.close()
    with pytest.raises(UserError, match="--resume: .* made with .* but this run has"):
        ResultsFile(str(path), ("idx", "correct", "time"), {**META, **header}).open(True, False)
    ResultsFile(str(path), ("idx", "correct", "time"), {**META, **base_header}).open(True, False).close()


def test_the_main_group_holds_the_main_options_only():
    """certify.py --help: the main options first; every other certification option under the advanced group."""
    p = certify_parser()
    groups = {g.title: {s for a in g._group_actions if a.help != argparse.SUPPRESS for s in a.option_strings}
              for g in p._action_groups}
    main = next(flags for title, flags in groups.items() if title in ("options", "optional arguments"))
    assert main == {"-h", "--help", "--N0", "--N", "--alpha", "--batch", "--skip", "--max", "--srs", "--f_thresh",
                    "--radii", "--sequential", "--resume", "--device"}
    advanced = {opt.flag for _, opt, _ in declared(SmoothingSpec) if opt.advanced}
    assert groups[ADVANCED] == advanced and not advanced & main


def test_the_recipe_is_the_default():
    """--srs --f_thresh 3 with nothing else: MDEQ-30A (CERTIFY's defaults) certified through SRS-3A steps, adaptive
    pairing aimed at the paper's table with the fallback, a second look of 3 and a 0.5 N route pilot."""
    spec = smoothing_spec(certify_parser().parse_args(POS + ["--srs", "--f_thresh", "3"]))
    assert spec == SmoothingSpec(srs=True, f_thresh=3)
    standard, srs = spec.resolve(CERTIFIED, 0.5)
    assert standard == DEQSolve("anderson", 30, 0.0) and srs.step == DEQSolve("anderson", 3, 0.0)
    assert (srs.adaptive, srs.fallback, srs.second_look, srs.route_pilot) == (True, True, 3.0, 0.5)
    assert srs.radius_slack is None
    assert srs.radii == (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5) and srs.looks == 2
    assert smoothing_spec(certify_parser().parse_args(POS + ["--srs"])).resolve(CERTIFIED, 0.5)[1].step.max_iter == 3


@pytest.mark.parametrize("tsv,flags", [
    ("SRS-MDEQ-3A_sigma0.5.tsv", ["--srs", "--f_thresh", "3", "--radius_slack", "0.05", "--route_pilot", "0.1",
                                  "--second_look", "0"]),
    ("SRS-MDEQ-1N_sigma0.25.tsv", ["--srs", "--f_solver", "naive", "--f_thresh", "1", "--warmup_solver", "anderson",
                                   "--radius_slack", "0.05", "--route_pilot", "0.1", "--second_look", "0"]),
    ("SRS-MDEQ-1A_K_400_reference_sigma0.5.tsv", ["--srs", "--f_thresh", "1", "--conf_drop", "400",
                                                  "--certificate", "reference"]),
    ("MDEQ-30A_sigma0.5.tsv", ["--f_thresh", "30"]),
])
def test_files_written_before_resume_with_the_same_settings(tsv, flags):
    """The committed report files (written before the options were declared once, with the slack rule and a 0.1 N
    pilot as defaults) get the same certified-model and SRS header entries from the same settings given as
    flags, so they resume."""
    meta = read_rows(f"{ROOT}/reports/digits/tsv/{tsv}")[0]
    spec = smoothing_spec(certify_parser().parse_args(POS + flags))
    spec.validate(N)
    header = smoothing_header(*spec.resolve(CERTIFIED, float(meta["sigma"])))
    assert {k: str(v) for k, v in header.items()} == {k: meta[k] for k in header}


def test_predict_refuses_the_route_options_the_declarations_mark():
    """PREDICT has no fallback route and takes one look at the misalignment bound: the options declared for the
    route, and a second look, are refused there, the others accepted."""
    from SRS.settings import NEEDS_ROUTE
    route = [opt for _, opt, _ in declared(SRSOptions) if opt.needs == NEEDS_ROUTE]
    assert {o.flag for o in route} == {"--no_fallback", "--route_pilot", "--step_cost"}
    for name, cases in CASES.items():
        for mode, flags, value in cases:
            spec = smoothing_spec(predict_parser().parse_args(POS + mode + flags))
            if any(o.flag == flags[0] for o in route):
                with pytest.raises(UserError, match="PREDICT has no such route"):
                    spec.validate(N, routes=False)
            elif flags[0] == "--second_look" and spec.second_look != SRS_DEFAULTS.second_look:
                with pytest.raises(UserError, match="PREDICT takes one look"):
                    spec.validate(N, routes=False)
            else:
                spec.validate(N, routes=False)
