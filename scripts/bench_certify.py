"""Certification speed benchmark: standard MDEQ-30A vs sound SRS on the same images, same N, one table.

    python scripts/bench_certify.py --ckpt output/digits/cls_mdeq_digits_noise0.25/last.pth --sigma 0.25

Methods, flags and the printed columns: docs/internals.md, "scripts/bench_certify.py".
"""

from DEQ.errors import ArgumentParser, UserError, cli_main
from DEQ.utils import pick_device


@cli_main
def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="output/digits/cls_mdeq_digits_noise0.25/last.pth")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--N0", type=int, default=100)
    p.add_argument("--N", type=int, default=10000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--fixed_K", type=int, default=400, help="K of the fixed-K SRS-1A row (0: leave the row out)")
    p.add_argument("--step_tol", type=float, default=None, help="also run SRS with the step run to this tolerance")
    p.add_argument("--step_cost", type=float, default=8.0,
                   help="with --step_tol: evaluations per SRS step assumed by the fallback's cost model (about 7 "
                        "measured at tol 1e-3 on the digits model)")
    p.add_argument("--refine_margin", type=float, default=None,
                   help="also run SRS-1A, -3A and -1N with low-margin samples re-solved by the standard model")
    p.add_argument("--route_pilot", type=float, default=None,
                   help="also run SRS-1A, -3A and -1N with this route pilot (a fraction of N)")
    p.add_argument("--radius_slack", type=float, default=None,
                   help="also run SRS-1A, -3A and -1N whose pairs aim within this many sigma of each image's SRS "
                        "radius instead of at the table's radii")
    p.add_argument("--mean_start", action="store_true",
                   help="also run SRS-1A, -3A and -1N with --warm_start mean (each sample starts from the previous "
                        "batch's mean solution)")
    p.add_argument("--rungs", type=int, nargs="+", default=[1, 2, 3, 5, 8, 12, 20],
                   help="budgets of the standard-model ladder certified from MDEQ-30A's own solves (30 is always in)")
    p.add_argument("--no_time_baseline", action="store_true",
                   help="do not time the equal-accuracy baseline beside the other methods (a second interleaved pass)")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--skip", type=int, default=30)
    p.add_argument("--max", type=int, default=-1)
    p.add_argument("--methods", nargs="+", default=None,
                   help="subset of method labels to run, plus any standard model MDEQ-kA to run beside them (e.g. "
                        "the equal-accuracy baseline, then timed in the same interleaved pass; --random-init: of "
                        "MDEQ-30A, SRS-MDEQ-1A, -3A, -1N)")
    p.add_argument("--sequential", action="store_true",
                   help="also run each method's sequential twin '<label> seq' (sequential CERTIFY of the table at "
                        "--radii), interleaved with the fixed-N runs")
    p.add_argument("--out", default=None, help="TSV folder (default output/bench_certify/sigma<S>)")
    p.add_argument("--radii", type=float, nargs="+", default=None,
                   help="the table's radii (pixel units; default multiples of sigma/2 from 0 to 3 sigma): the "
                        "adaptive pairs aim at them and the summary compares at them")
    p.add_argument("--device", default="auto")
    p.add_argument("--random-init", dest="random_init", default=None, metavar="CFG")
    p.add_argument("--images", type=int, default=3, help="--random-init: timed images per method")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: on a shared 2-core machine more threads oversubscribe and make "
                        "timings noisy and up to 50x slower)")
    args = p.parse_args()
    import torch
    torch.set_num_threads(max(args.threads, 1))
    from SRS.benchmark import (RANDOM_INIT_METHODS, comparison, honest_comparison, ladder_markdown, random_init_timing,
                               sequential, srs, standard, summary_markdown, to_markdown)
    if args.random_init:
        unknown = set(args.methods or ()) - set(RANDOM_INIT_METHODS)
        if unknown:
            raise UserError(f"unknown --methods {sorted(unknown)} with --random-init; choose from "
                            f"{list(RANDOM_INIT_METHODS)}")
        device = pick_device(args.device)
        table = random_init_timing(args.random_init, args.images, args.N0, args.N, args.batch, device,
                                   conf_drop=args.fixed_K or "auto", methods=args.methods)
        print(f"\n{args.random_init}, random init, device {device}, N0={args.N0}, N={args.N}, batch={args.batch}, "
              f"K={args.fixed_K or 'auto'}, {args.images} images")
        print("| method | s/image | planner s/image | speedup | std calls/image |\n|---|---:|---:|---:|---:|")
        for _, r in table.iterrows():
            print(f"| {r['method']} | {r['s/image']:.3f} | {r['planner s/image']:.4f} | {r['speedup']:.2f}x | "
                  f"{r['std calls/image']:.1f} |")
        return
    from SRS.runner import DataSpec, RunSpec, Sampling, SmoothingSpec
    from SRS.settings import default_radii
    template = RunSpec(data=DataSpec(args.dataset, skip=args.skip, max=args.max), checkpoint=args.ckpt, outfile="",
                       sampling=Sampling(args.sigma, args.N, args.alpha, args.batch, args.N0),
                       smoothing=SmoothingSpec(tol=0.0), device=args.device, threads=max(args.threads, 1),
                       progress=False)
    table = {} if args.radii is None else {"radii": tuple(args.radii)}

    def chains(**kw):
        """SRS-1A, -3A and -1N with the same settings (adaptive rows aim at the table's radii)."""
        kw = {**(table if "radius_slack" not in kw else {}), **kw}
        return [srs(1, **kw), srs(3, **kw), srs(1, "naive", **kw)]

    rungs = sorted(set(args.rungs) | {30})
    methods = [standard(30, rungs=rungs)] + chains()
    if args.fixed_K:
        methods.append(srs(1, conf_drop=args.fixed_K))
    if args.step_tol is not None:
        methods.append(srs(30, step_tol=args.step_tol, step_cost=args.step_cost, **table))
    if args.refine_margin:
        methods += chains(refine_margin=args.refine_margin)
    if args.route_pilot is not None:
        methods += chains(route_pilot=args.route_pilot)
    if args.radius_slack is not None:
        methods += chains(radius_slack=args.radius_slack)
    if args.mean_start:
        methods += chains(warm_start="mean")
    radii = args.radii or list(default_radii(args.sigma))
    if args.methods:
        methods = chosen_methods(methods, args.methods, args.sequential, radii)
    elif args.sequential:
        methods += [sequential(m, radii) for m in methods]
    out = args.out or f"output/bench_certify/sigma{args.sigma:g}"
    honest = honest_comparison(template, methods, out, radii, time_baseline=not args.no_time_baseline)
    table, runs = comparison(honest.paths, radii, baseline="MDEQ-30A")
    base = honest.baseline
    print()
    print(f"Ladder of MDEQ-30A (one solve per sample; rung k = MDEQ-kA from zeros on the same noise), "
          f"equal-accuracy baseline {base.label} (within one image of MDEQ-30A at every radius):\n")
    print(ladder_markdown(base))
    print()
    print(to_markdown(table))
    print(f"\nimages: {len(runs['MDEQ-30A'])}, N0={args.N0}, N={args.N}, alpha={args.alpha}, sigma={args.sigma}, "
          f"batch={args.batch}, tol=0, device={pick_device(args.device)}; methods run interleaved image by image"
          + ("; '<label> seq': sequential CERTIFY of the table" if args.sequential else "") + "\n")
    print(summary_markdown(honest.summary))


def chosen_methods(methods, labels, with_twins, radii):
    """The rows --methods names: MDEQ-30A always, the listed labels, any standard model 'MDEQ-kA', and with
    --sequential the listed '<label> seq' twins (every kept method's twin when no twin is listed)."""
    from SRS.benchmark import sequential, standard, standard_label
    bases = {label[:-len(" seq")] if label.endswith(" seq") else label for label in labels}
    candidates = methods + [standard(*standard_label(label)) for label in sorted(bases)
                            if label not in {m.label for m in methods} and standard_label(label)]
    twins = [sequential(m, radii) for m in candidates] if with_twins else []
    unknown = set(labels) - {m.label for m in candidates + twins}
    if unknown:
        raise UserError(f"unknown --methods {sorted(unknown)}; choose from {[m.label for m in methods + twins]}, any "
                        f"standard model MDEQ-kA" + ("" if with_twins else ", or '<label> seq' with --sequential"))
    kept = [m for m in candidates if m.label in labels or m.label == "MDEQ-30A"]
    listed = [t for t in twins if t.label in labels]
    if not listed:
        kept_labels = {m.label for m in kept}
        listed = [t for t, m in zip(twins, candidates) if m.label in kept_labels]
    return kept + listed


if __name__ == "__main__":
    main()
