"""The ladder of standard models on a checkpoint: how many solver steps does certification need?

    python scripts/bench_ladder.py --ckpt output/digits/cls_mdeq_digits32_noise0.5/last.pth --sigma 0.5 --top 60

Re-running resumes the ladder file.  What it prints: docs/internals.md.
"""
import os

from DEQ.errors import ArgumentParser, UserError, cli_main


@cli_main
def main():
    p = ArgumentParser(prog="bench_ladder.py", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--sigma", type=float, required=True)
    p.add_argument("--N0", type=int, default=100)
    p.add_argument("--N", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--skip", type=int, default=15)
    p.add_argument("--max", type=int, default=-1)
    p.add_argument("--top", type=int, default=30, help="budget of the solve the ladder is read from")
    p.add_argument("--reference", type=int, default=30, help="the certified model's budget (a rung)")
    p.add_argument("--rungs", type=int, nargs="+", default=[1, 2, 3, 5, 8, 12, 20, 30])
    p.add_argument("--radii", type=float, nargs="+", default=None)
    p.add_argument("--out", default=None, help="ladder TSV (default output/bench_ladder/<ckpt run>_sigma<S>_top<D>.tsv)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    rungs = sorted(set(args.rungs) | {args.reference, args.top})
    if not 1 <= args.reference <= args.top or rungs[0] < 1:
        raise UserError(f"--reference {args.reference} must be a budget between 1 and --top {args.top}")
    from SRS.benchmark import equal_accuracy_baseline, ladder_markdown
    from SRS.ladder import LadderMode
    from SRS.runner import DataSpec, RunSpec, Sampling, SmoothingSpec, run
    run_dir = os.path.basename(os.path.dirname(os.path.abspath(args.ckpt)))
    out = args.out or f"output/bench_ladder/{run_dir}_sigma{args.sigma:g}_top{args.top}.tsv"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    spec = RunSpec(data=DataSpec(args.dataset, skip=args.skip, max=args.max), checkpoint=args.ckpt, outfile=out,
                   sampling=Sampling(args.sigma, args.N, args.alpha, args.batch, args.N0),
                   smoothing=SmoothingSpec(f_solver="anderson", f_thresh=args.top, tol=0.0), device=args.device,
                   threads=args.threads, resume=os.path.isfile(out) and os.path.getsize(out) > 0, progress=False)
    run(spec, LadderMode(args.N0, args.N, args.alpha, args.batch, rungs))
    radii = args.radii or [round(args.sigma * k / 2, 4) for k in range(7)]
    base = equal_accuracy_baseline(out, radii, reference=args.reference)
    print(f"\n{args.ckpt}, sigma {args.sigma:g}, {len(base.frames[args.top])} images (every {args.skip}-th), "
          f"N0 {args.N0}, N {args.N}, alpha {args.alpha:g}; certified accuracy in %, gaps against MDEQ-{args.reference}A\n")
    print(ladder_markdown(base))
    print(f"\nequal-accuracy baseline of MDEQ-{args.reference}A: {base.label}; ladder file {out}")

if __name__ == "__main__":
    main()
