"""Certification speed benchmark: standard MDEQ-30A vs SRS-MDEQ-1A / -3A on the same images, same n.

    python scripts/bench_certify.py --ckpt output/digits/cls_mdeq_digits_noise0.25/last.pth --sigma 0.25

Prints the wall-clock ratio of MDEQ-30A to each SRS run, certified accuracy side by side, the largest
certified-accuracy gap over the radii, and evaluations of f per noisy sample (pairs and warm-ups
included).  Every run uses --tol 0 so that "kA" means exactly k Anderson evaluations (the paper's
notation); --tol T lets the standard model stop early instead.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from DEQ.errors import cli_main  # noqa: E402
from SRS.benchmark import comparison, max_gap, mean_column, run_methods, srs, standard, to_markdown  # noqa: E402

RADII = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


@cli_main
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="output/digits/cls_mdeq_digits_noise0.25/last.pth")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--N0", type=int, default=100)
    p.add_argument("--N", type=int, default=10000)
    p.add_argument("--conf_drop", type=int, default=400)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--skip", type=int, default=15)
    p.add_argument("--max", type=int, default=-1)
    p.add_argument("--tol", type=float, default=0.0)
    p.add_argument("--reference", action="store_true", help="also run SRS-1A with the reference code's weaker certificate")
    p.add_argument("--out", default="output/bench_certify")
    p.add_argument("--radii", type=float, nargs="+", default=RADII)
    args = p.parse_args()
    common = ["--N0", str(args.N0), "--N", str(args.N), "--batch", str(args.batch), "--skip", str(args.skip),
              "--max", str(args.max), "--tol", str(args.tol), "--quiet"]
    methods = [standard(30), srs(1, conf_drop=args.conf_drop), srs(3, conf_drop=args.conf_drop)]
    if args.reference:
        methods.append(srs(1, conf_drop=args.conf_drop, certificate="reference"))
    paths = run_methods(args.dataset, args.ckpt, args.sigma, methods, args.out, common)
    table, runs = comparison(paths, args.radii, baseline="MDEQ-30A")
    print()
    print(to_markdown(table))
    base = runs["MDEQ-30A"]
    print(f"\nimages: {len(base)}, N0={args.N0}, N={args.N}, K={args.conf_drop}, sigma={args.sigma}, tol={args.tol}")
    for label, df in runs.items():
        gap, at = max_gap(runs, label, "MDEQ-30A", args.radii)
        ratio = base["time"].mean() / df["time"].mean()
        print(f"{label:32s} time ratio (MDEQ-30A / this) {ratio:5.2f}x | f evaluations per sample "
              f"{mean_column(df, 'nfe'):6.2f} | largest gap to MDEQ-30A {gap:4.1f} points (at r={at:g})")


if __name__ == "__main__":
    main()
