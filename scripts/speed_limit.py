"""The most sound SRS could save on a setting, in evaluations of f, read from a ladder file.

    python scripts/speed_limit.py reports/digits32/tsv/MDEQ-30A_ladder_sigma0.5.tsv --steps 1 3

For each SRS step budget S and each rung D that certifies the certified model's table (within --tolerance
images at every radius), the bound ``SRS.benchmark.limit_evaluations``: a perfectly aligned chain plus the
fewest clean pairs that reach each image's table row, against the equal-accuracy baseline and the certified
model.  No chain beats it; where it is below a target, no recipe reaches that target on these images.
"""

from DEQ.errors import ArgumentParser, UserError, cli_main


@cli_main
def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ladder", help="a ladder TSV written by scripts/bench_certify.py or scripts/bench_ladder.py")
    p.add_argument("--certified", type=int, default=30, help="budget of the certified model MDEQ-kA (a rung)")
    p.add_argument("--steps", type=float, nargs="+", default=[1, 3], help="SRS step budgets (evaluations per sample)")
    p.add_argument("--radii", type=float, nargs="+", default=None,
                   help="the table's radii (default: multiples of sigma/2 from 0 to 3 sigma)")
    p.add_argument("--tolerance", type=int, default=1, help="images a rung may differ by and still have the table")
    p.add_argument("--project_N", type=int, default=None,
                   help="also bound the same images at this N, each image's top-class share kept (a projection)")
    args = p.parse_args()
    import os
    if not os.path.isfile(args.ladder):
        raise UserError(f"ladder file not found: {args.ladder}")
    from SRS.analysis import read_results
    from SRS.benchmark import limit_evaluations
    from SRS.ladder import certified_counts, equal_accuracy_rung, rung_frames
    from SRS.settings import default_radii
    meta = read_results(args.ladder).attrs["meta"]
    sigma, N0, N, alpha = float(meta["sigma"]), int(meta["N0"]), int(meta["N"]), float(meta["alpha"])
    radii = args.radii or list(default_radii(sigma))
    frames = rung_frames(args.ladder)
    if args.certified not in frames:
        raise UserError(f"--certified {args.certified} is not a rung of {args.ladder} (rungs {sorted(frames)})")
    base = equal_accuracy_rung(frames, radii, args.tolerance, args.certified)
    ref = certified_counts(frames[args.certified], radii)
    models = [k for k in sorted(frames) if base <= k <= args.certified
              and max(abs(certified_counts(frames[k], radii) - ref)) <= args.tolerance]
    images = len(frames[args.certified])
    print(f"{args.ladder}: {images} images, sigma {sigma:g}, N0 {N0}, N {N}, alpha {alpha:g}; radii "
          f"{' '.join(f'{r:g}' for r in radii)}; equal-accuracy baseline MDEQ-{base}A, certified model "
          f"MDEQ-{args.certified}A")
    for project in [None] + ([args.project_N] if args.project_N else []):
        n = project or N
        samples = N0 + n
        what = f"at N {n}" + (" (projection: each image's top-class share kept)" if project else " (measured)")
        print(f"\nSpeed limit of sound SRS {what}, in evaluations of f per image:\n")
        print(f"| SRS step | certified rung (pairs) | limit vs MDEQ-{base}A (equal-acc.) | "
              f"limit vs MDEQ-{args.certified}A | images on the fallback |")
        print("|---:|---|---:|---:|---:|")
        for step in args.steps:
            for k in models:
                costs = limit_evaluations(frames[k], N, samples, alpha, radii, sigma, step, k, project)
                total = costs.sum()
                fallback = int((costs >= samples * k).sum())
                print(f"| {step:g} | MDEQ-{k}A | {images * samples * base / total:.2f}x | "
                      f"{images * samples * args.certified / total:.2f}x | {fallback} |")


if __name__ == "__main__":
    main()
