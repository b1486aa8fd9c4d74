"""Summarise certification results: certified-accuracy table, curves, HP bounds, SRS radius differences.

Example:
    python SRS/code/analyze.py std.tsv:std srs.tsv:SRS --out results/analysis --hp-alpha 0.001

Runs must cover the same images (else one error line; --allow-different-images compares them
anyway and says so).  RRD lines are printed for a standard and an SRS run of the same sigma
(from the files' headers; a headerless reference file counts as SRS when its label says SRS).
"""
import argparse
import math
import sys

from DEQ.errors import ArgumentParser, UserError, cli_main
from SRS import analysis
from SRS.results import PREDICTION_COLUMNS


def parse_args(argv=None):
    p = ArgumentParser(prog="analyze.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", metavar="RESULT.tsv[:LABEL]",
                   help="certification TSV files; LABEL defaults to the file stem")
    p.add_argument("--radii", type=float, nargs="+", default=list(analysis.DEFAULT_RADII),
                   help="radii for the certified-accuracy columns")
    p.add_argument("--baseline", help="label to compute speedup and RRD against (default: the first file)")
    p.add_argument("--out", metavar="DIR", help="write table.md/.tex/.csv, curves.png/.pdf and RRD outputs here")
    p.add_argument("--hp-alpha", type=float, metavar="A",
                   help="add one-sided Clopper-Pearson lower bounds on certified accuracy at level A")
    p.add_argument("--compare-fixed", action="store_true",
                   help="for QCRS files, add the fixed-sigma rows computed from the same images")
    p.add_argument("--attack-table", action="store_true",
                   help="the RESULT files are attack.py / predict.py runs: print (and with --out write) the attack "
                        "table, smoothed accuracy under each attack and radius")
    p.add_argument("--allow-different-images", action="store_true",
                   help="compare runs over different image sets (refused otherwise); the output says so")
    return p.parse_args(argv)


@cli_main(interrupted="interrupted: files in --out may be incomplete; rerun to write them all")
def main(argv=None):
    args = parse_args(argv)
    bad = [r for r in args.radii if not (0 <= r < math.inf)]  # nan fails every comparison
    if bad:
        raise UserError(f"--radii must be finite numbers >= 0, got {bad[0]}; e.g. --radii 0 0.25 0.5")
    if args.attack_table:
        if args.out:
            analysis.check_out_dir(args.out)
        runs = analysis.load_runs(args.results, required=PREDICTION_COLUMNS)
        table = analysis.attack_table(runs)
        print(analysis.attack_markdown(table))
        if args.out:
            analysis.write_attack_outputs(table, args.out)
            print(f"wrote attack_table.md/.tex/.csv to {args.out}", file=sys.stderr)
        return
    runs = analysis.load_runs(args.results)
    baseline = args.baseline or next(iter(runs))
    if baseline not in runs:
        raise UserError(f"--baseline {baseline!r} is not one of the labels {', '.join(runs)}; pass one of them")
    notes = analysis.check_same_images(runs, baseline, args.allow_different_images)
    if args.out:
        analysis.check_out_dir(args.out)  # before anything is printed
    table = analysis.summary_table(runs, args.radii, baseline, args.hp_alpha, args.compare_fixed)
    lines = analysis.rrd_report(runs, baseline, args.out)
    for note in notes:
        print(note)
    print(analysis.to_markdown(table))
    for line in lines:
        print(line)
    if args.out:
        analysis.write_outputs(table, runs, args.out, notes)
        print(f"wrote tables, curves and RRD outputs to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
