"""Reproduce the paper's standard-vs-SRS comparison in one command.

    python scripts/reproduce.py                      # sigma 0.25 and 0.5 -> reports/digits/report.md
    python scripts/reproduce.py --paper --ckpt CKPT --data-dir ~/data/cifar10

Re-running resumes (finished TSVs and checkpoints are reused).  Methods and outputs: docs/internals.md.
"""
import os
import re
import sys
import time

from DEQ.errors import ArgumentParser, UserError, cli_main

DIGITS_CFG = "experiments/digits/cls_mdeq_digits.yaml"
SMOOTHADV_CFG = "experiments/digits/cls_mdeq_digits_smoothadv.yaml"
RESNET_CFG = "experiments/digits/resnet_digits.yaml"


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def digits_checkpoint(sigma: float, retrain: bool, device: str, cfg_path: str = DIGITS_CFG) -> tuple:
    """Train (or reuse) the digits checkpoint of ``cfg_path`` at this noise with the training CLI's own
    code (``DEQ.training.train``); return (path, training seconds or None)."""
    from DEQ.checkpoint import load_checkpoint
    from DEQ.config import load_config
    from DEQ.training import run_name, train
    cfg = load_config(cfg_path, noise=sigma)
    out = os.path.join(cfg.OUTPUT_DIR, "digits", run_name(cfg_path, sigma))
    last = os.path.join(out, "last.pth")
    exists = os.path.isfile(last)
    if exists and not retrain and load_checkpoint(last).get("epoch") == cfg.TRAIN.END_EPOCH:
        log(f"reusing {last}")
        return last, None
    log(f"training {cfg_path} at noise {sigma:g} -> {out} (log: {out}/train.log)")
    t0 = time.perf_counter()
    outcome = train(cfg_path, sigma, out=out, resume=exists and not retrain, overwrite=exists and retrain,
                    device=device, quiet=True, progress=sys.stdout.isatty())
    secs = time.perf_counter() - t0
    stats = outcome.stats
    log(f"trained in {secs / 60:.1f} min: clean {stats.clean_acc:.1f}%, noisy {stats.noisy_acc:.1f}%")
    return outcome.last_path, secs


def default_report_dir(cfg_path: str) -> str:
    """reports/digits for the 8x8 config, reports/<name> (e.g. digits32) for another digits config."""
    stem = os.path.splitext(os.path.basename(cfg_path))[0]
    return "reports/digits" if cfg_path == DIGITS_CFG else "reports/" + stem.replace("cls_mdeq_", "")


def cifar_present(data_dir) -> bool:
    return bool(data_dir) and os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py"))


def table_methods(radii=None) -> list:
    """SRS rows beside the paper's, set up for a certified-accuracy table: SRS-MDEQ-1A / -1N that also re-solve
    rows of logit margin below 3 (``--refine_margin 3``) and keep a 0.1 N route pilot (with which they sent fewer
    images to the standard model on the digits model), pairs aimed at ``radii`` (pixel units; None: the default
    table).  The recipe itself (``--srs --f_thresh 3``) is the paper's SRS-MDEQ-3A row."""
    from SRS.benchmark import srs
    table = {} if radii is None else {"radii": tuple(radii)}
    return [srs(1, refine_margin=3, route_pilot=0.1, **table),
            srs(1, "naive", refine_margin=3, route_pilot=0.1, **table)]


def section(sigma, honest, radii, out_dir, train_secs, ckpt, samples, alpha=0.001):
    """Markdown for one sigma: ladder, table, speedups over the equal-accuracy baseline and MDEQ-30A,
    curves and RRD figures; and the headline entries {label: (f-eval and wall speedups, gap, radius)}."""
    from SRS.analysis import plot_curves, relative_radius_difference, rrd_summary, summary_table, write_rrd_outputs
    from SRS.benchmark import ladder_markdown, max_gap, mean_column, summary_markdown, to_markdown
    runs, base_eq = honest.runs, honest.baseline
    top = next(iter(runs))
    frames = base_eq.frames
    rung_rows = {f"MDEQ-{k}A": frames[k] for k in sorted({1, 5, base_eq.k} & set(frames)) if f"MDEQ-{k}A" != top}
    table = summary_table({**rung_rows, **runs}, radii, baseline=top)
    curves = f"curves_sigma{sigma:g}.png"
    plot_curves(runs, os.path.join(out_dir, curves))
    plot_curves(runs, os.path.join(out_dir, curves.replace(".png", ".pdf")))
    base = runs[top]
    timed = (f" {base_eq.label} was timed for real beside the other methods in a second interleaved pass "
             f"(`tsv/vs_{base_eq.label}/`)." if honest.timed else "")
    lines = [f"## sigma = {sigma:g}", "",
             f"Checkpoint `{ckpt}`" + (f" (trained in {train_secs / 60:.1f} min)" if train_secs else " (reused)") +
             f"; {len(base)} test images; certified accuracy in %, radius in pixel units.", "",
             f"The ladder of {top}: rung k is MDEQ-kA (k Anderson evaluations from zeros) certified on the same "
             f"noise from {top}'s own solves (bit for bit what a separate MDEQ-kA run gives). The equal-accuracy "
             f"baseline is the cheapest rung within one image of {top} at every radius of the table: "
             f"**{base_eq.label}**.", "", ladder_markdown(base_eq), "",
             "Certified accuracy (rung rows from the ladder, not timed on their own):", "", to_markdown(table), "",
             f"Per method, speedups over the equal-accuracy baseline {base_eq.label} and over {top}: in evaluations "
             f"of f per sample (which no machine load changes) and in wall clock, all methods run interleaved "
             f"image by image.{timed} Then the largest certified-accuracy gap to {top}, pairing (mean K, mean K_A "
             f"paired standard solves, misaligned fraction), standard-solver calls per image, images certified by "
             f"the standard model outright (fallbacks) or after a first look of pairs that showed a misaligned "
             f"chain (escapes), and the sound speed limit over {top} at equal accuracy "
             f"(docs) with the fraction of it reached. For refine rows the re-solved samples count as standard "
             f"solves, so their limit is that of the plain chain.", "",
             summary_markdown(honest.summary), "",
             "| model | f evaluations / sample |", "|---|---:|"]
    for label, df in runs.items():
        lines.append(f"| {label} | {mean_column(df, 'nfe'):.2f} |")
    lines += ["", f"![certified accuracy, sigma {sigma:g}]({curves})", ""]
    for label in [m for m in runs if m.startswith("SRS-MDEQ-1A")]:
        rrd = relative_radius_difference(base, runs[label])
        s = rrd_summary(rrd)
        write_rrd_outputs(rrd, f"{label}_sigma{sigma:g}", top, out_dir)
        lines += [f"RRD {label} vs {top}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                                       for k, v in s.items()), ""]
    headline = {}
    summ = honest.summary.set_index("method")
    for label in runs:
        if label.startswith("SRS-MDEQ-") and "K=" not in label:
            gap, at = max_gap(runs, label, top, radii)
            r = summ.loc[label]
            headline[label] = (r["f-eval vs equal-acc."], r["wall vs equal-acc."], r["f-eval vs 30A"],
                               r["wall vs 30A"], gap, at)
    return "\n".join(lines), headline


def headline_lines(sigma, headline, baseline: str) -> list:
    """One line per SRS method: evaluations first, wall clock beside, against both baselines."""
    out = []
    for label, (fe_eq, wall_eq, fe_top, wall_top, gap, at) in headline.items():
        wall = "not timed" if wall_eq != wall_eq else f"{wall_eq:.2f}x"
        verdict = "fewer" if fe_eq >= 1 else "MORE"
        ratio = fe_eq if fe_eq >= 1 else 1 / fe_eq
        out.append(f"- sigma {sigma:g}: {label} spends {ratio:.2f}x {verdict} evaluations of f than the equal-accuracy "
                   f"baseline {baseline} (wall clock {wall}), {fe_top:.2f}x fewer than MDEQ-30A (wall clock "
                   f"{wall_top:.2f}x, interleaved); largest certified-accuracy gap to MDEQ-30A {gap:.1f} points "
                   f"(at radius {at:g}).")
    return out


def adversarial_report(args) -> None:
    """The adversarial side of the paper on digits: Gaussian- vs SmoothAdv-trained MDEQ and the ResNet
    baseline, certified (standard randomized smoothing, MDEQ-30A), and the attack table (PREDICT under
    PGD and Smooth-PGD m = 1/4/8/16 at radii sigma and 2 sigma) of both MDEQs."""
    from SRS.analysis import attack_markdown, attack_table, certified_accuracy, to_markdown, summary_table
    from SRS.benchmark import Method, run_attacks, run_methods, standard
    from SRS.modes import AttackSettings
    from SRS.results import PREDICTION_COLUMNS, read_results
    from SRS.runner import DataSpec, RunSpec, Sampling, SmoothingSpec
    out_dir = args.out or "reports/digits_adversarial"
    t_start = time.perf_counter()
    lines = ["# Gaussian vs SmoothAdv training, the ResNet baseline, and attacks (digits)", "",
             f"Command: `{' '.join(['python'] + sys.argv)}`. Certification: standard randomized smoothing of the "
             f"standard model (MDEQ-30A; the ResNet's forward), N0 {args.N0}, N {args.adv_N}, alpha 0.001, every "
             f"{args.skip}-th test image. Attacks: every {args.attack_skip}-th test image, {args.attack_steps} steps, "
             f"then PREDICT (N {args.attack_N}, alpha 0.001) at the attacked input; accuracy in %. Certified "
             f"accuracy at radius r is a lower bound on the accuracy under any attack of size r.", ""]
    for sigma in args.sigmas:
        models = {"MDEQ (Gaussian)": digits_checkpoint(sigma, args.retrain, args.device)[0],
                  "MDEQ (SmoothAdv)": digits_checkpoint(sigma, args.retrain, args.device, SMOOTHADV_CFG)[0],
                  "ResNet-20 (Gaussian)": digits_checkpoint(sigma, args.retrain, args.device, RESNET_CFG)[0]}
        radii = [round(sigma * k, 4) for k in (0, 0.5, 1, 1.5, 2, 2.5, 3)]
        runs = {}
        for name, ckpt in models.items():
            tag = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
            template = RunSpec(data=DataSpec("digits", skip=args.skip, max=args.max), checkpoint=ckpt, outfile="",
                               sampling=Sampling(sigma, args.adv_N, 0.001, args.batch, args.N0),
                               smoothing=SmoothingSpec(tol=0.0), device=args.device, progress=False)
            method = standard(30) if "MDEQ" in name else Method("ResNet-20", (("srs", False),))
            path = run_methods(template, [method], os.path.join(out_dir, "tsv", tag), log=log)[method.label]
            runs[name] = read_results(path)
        lines += [f"## sigma = {sigma:g}", "", "Certified accuracy (%):", "",
                  to_markdown(summary_table(runs, radii, next(iter(runs)))), ""]
        for name, ckpt in list(models.items())[:2]:
            tag = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")
            template = RunSpec(data=DataSpec("digits", skip=args.attack_skip, max=args.max), checkpoint=ckpt,
                               outfile="", sampling=Sampling(sigma, args.attack_N, 0.001, args.batch),
                               smoothing=SmoothingSpec(tol=0.0), device=args.device, progress=False)
            attacks = [AttackSettings(kind, eps, steps=args.attack_steps, num_noise_vec=m)
                       for eps in (sigma, 2 * sigma)
                       for kind, m in [("pgd", 1)] + [("smooth_pgd", m) for m in args.attack_m]]
            paths = run_attacks(template, attacks, os.path.join(out_dir, "tsv", tag + "_attacks"), log=log)
            table = attack_table({k: read_results(p, PREDICTION_COLUMNS) for k, p in paths.items()})
            cert = runs[name][runs[name]["idx"] % args.attack_skip == 0]
            bound = ", ".join(f"{100 * a:.1f} at {r:g}" for r, a in zip((sigma, 2 * sigma),
                                                                        certified_accuracy(cert, [sigma, 2 * sigma])))
            lines += [f"Attack table, {name} (certified accuracy of the same images: {bound}):", "",
                      attack_markdown(table), ""]
        print("\n".join(lines[-12:]), flush=True)
    report = os.path.join(out_dir, "report.md")
    os.makedirs(out_dir, exist_ok=True)
    with open(report, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    log(f"report written to {report} ({(time.perf_counter() - t_start) / 60:.1f} min)")


@cli_main
def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    p.add_argument("--out", default=None, help="report folder (default reports/digits, or reports/quick with --quick)")
    p.add_argument("--N0", type=int, default=100)
    p.add_argument("--N", type=int, default=2000)
    p.add_argument("--conf_drop", default="auto", help="pairing of the SRS rows: auto (default, adaptive) or a fixed K")
    p.add_argument("--reference_K", type=int, default=100,
                   help="fixed K of the two fixed-K SRS-1A rows, sound and reference bound (the paper's 400 at N 10000)")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--skip", type=int, default=15, help="every skip-th test image (digits has 450)")
    p.add_argument("--max", type=int, default=-1)
    p.add_argument("--radii", type=float, nargs="+", default=None)
    p.add_argument("--no_table_rows", action="store_true",
                   help="leave out the SRS-1A/-1N rows that re-solve low margins (refine margin 3, route pilot 0.1)")
    p.add_argument("--retrain", action="store_true", help="train again even if a finished checkpoint exists")
    p.add_argument("--cfg", default=DIGITS_CFG, help="digits config to train and certify (e.g. "
                   "experiments/digits/cls_mdeq_digits32.yaml, the 32x32 setting where depth matters)")
    p.add_argument("--quick", action="store_true", help="sigma 0.25, MDEQ-30A vs SRS-MDEQ-1A/3A on a subset (< 10 min)")
    p.add_argument("--paper", action="store_true", help="the paper's CIFAR-10 setting (needs --ckpt and --data-dir)")
    p.add_argument("--ckpt", default=None, help="checkpoint for --paper (an MDEQ-LARGE trained at sigma 0.5)")
    p.add_argument("--data-dir", dest="data_dir", default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--adversarial", action="store_true",
                   help="Gaussian vs SmoothAdv MDEQ and the ResNet baseline, certified, plus the attack table "
                        "-> reports/digits_adversarial")
    p.add_argument("--adv_N", type=int, default=1000, help="--adversarial: N of the certification")
    p.add_argument("--attack_N", type=int, default=500, help="--adversarial: N of PREDICT at attacked inputs")
    p.add_argument("--attack_skip", type=int, default=45, help="--adversarial: every k-th test image is attacked")
    p.add_argument("--attack_steps", type=int, default=10, help="--adversarial: attack steps")
    p.add_argument("--attack_m", type=int, nargs="+", default=[1, 4, 8, 16], help="--adversarial: Smooth-PGD m")
    args = p.parse_args()
    if args.adversarial:
        return adversarial_report(args)

    from SRS.benchmark import honest_comparison, paper_methods, srs, standard
    from SRS.ladder import DEFAULT_RUNGS
    from SRS.runner import DataSpec, RunSpec, Sampling, SmoothingSpec
    if args.paper:
        if not cifar_present(args.data_dir):
            raise UserError(f"CIFAR-10 is not available here (no cifar-10-batches-py under --data-dir {args.data_dir!r}): "
                            f"the paper setting needs the data set and an MDEQ-LARGE checkpoint; nothing was run")
        if not args.ckpt:
            raise UserError("--paper needs --ckpt: train one with DEQ/tools/cls_train.py --cfg experiments/cifar/cls_mdeq_LARGE.yaml --noise 0.5")
        sigmas, radii = [0.5], args.radii or [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
        data, N0, N, batch = DataSpec("cifar10", "test", args.data_dir, skip=20), 100, 10000, 400
        methods = paper_methods(radii=args.radii) + [srs(1, conf_drop=400, certificate="reference")]
        table_rows = not args.no_table_rows
        out_dir = args.out or "reports/cifar10"
    else:
        sigmas = [0.25] if args.quick else args.sigmas
        N, skip, K = (1000, 25, args.conf_drop) if args.quick else (args.N, args.skip, args.conf_drop)
        data, N0, batch = DataSpec("digits", "test", None, skip=skip, max=args.max), args.N0, args.batch
        methods = [standard(30, rungs=DEFAULT_RUNGS), srs(1, conf_drop=K), srs(3, conf_drop=K)] if args.quick else \
            paper_methods(K, radii=args.radii) + [srs(1, conf_drop=args.reference_K),
                                                  srs(1, conf_drop=args.reference_K, certificate="reference")]
        table_rows = not args.quick and K == "auto" and not args.no_table_rows
        out_dir = args.out or ("reports/quick" if args.quick else default_report_dir(args.cfg))
        radii = args.radii
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    sections, headlines = [], {}
    for sigma in sigmas:
        if args.paper:
            ckpt, secs = args.ckpt, None
        else:
            ckpt, secs = digits_checkpoint(sigma, args.retrain, args.device, args.cfg)
        sigma_radii = radii or [round(sigma * k, 4) for k in (0, 0.5, 1, 1.5, 2, 2.5, 3)]
        template = RunSpec(data=data, checkpoint=ckpt, outfile="", sampling=Sampling(sigma, N, 0.001, batch, N0),
                           smoothing=SmoothingSpec(tol=0.0), device=args.device, progress=False)
        rows = methods + (table_methods(args.radii) if table_rows else [])
        # the quick run times the baseline beside its headline method only (the main job's time budget)
        honest = honest_comparison(template, rows, os.path.join(out_dir, "tsv"), sigma_radii, log=log,
                                   timed_labels=["SRS-MDEQ-3A"] if args.quick else None)
        samples = N0 + N
        text, headline = section(sigma, honest, sigma_radii, out_dir, secs, ckpt, samples)
        sections.append(text)
        headlines[sigma] = (headline, honest.baseline.label)
        from SRS.benchmark import ladder_markdown, summary_markdown
        print(f"\nsigma {sigma:g}: ladder of MDEQ-30A, equal-accuracy baseline {honest.baseline.label}\n\n"
              f"{ladder_markdown(honest.baseline)}\n\n{summary_markdown(honest.summary)}\n\n" +
              "\n".join(headline_lines(sigma, headline, honest.baseline.label)) + "\n", flush=True)
    total = time.perf_counter() - t_start
    summary = ["# Standard randomized smoothing vs SRS" + (" (CIFAR-10)" if args.paper else " on the embedded digits"), "",
               f"Command: `{' '.join(['python'] + sys.argv)}` ({total / 60:.1f} min on this machine for this "
               f"invocation; result files already in the folder are reused, and the tables give the seconds per image "
               f"measured when each row was computed).", "",
               "Labels as in the paper: MDEQ-kA solves each noisy sample from zeros with k Anderson evaluations; "
               "SRS-MDEQ-kA/kN warm-starts from the previous batch's solutions with k Anderson/naive evaluations "
               "(first batch: 10 Anderson evaluations from zeros). SRS rows use the correlation-eliminated "
               "certificate for MDEQ-30A (alpha split in halves) with adaptive pairing: per image, K_A paired "
               "standard solves chosen from the SRS counts, or the standard model outright where the selection "
               "samples predict that SRS would cost more (see the summary table), so every radius is a "
               "guarantee for the smoothed MDEQ-30A; the row marked (reference) uses the reference code's weaker "
               "bound (fixed K) for comparison with the paper. With K_A pairs and no misaligned pair, the sound "
               "certificate cannot exceed p_A_lower = (alpha/2)^(1/K_A), i.e. radius sigma * PhiInv(that): "
               "see docs/results-digits.md for the speed limit this implies. The adaptive rows use the defaults of "
               "certify.py --srs: their pairs aim at the table's radii (--radii), a second look at up to 3 times the "
               "pairs is solved only when the first finds a misaligned pair and the second can still raise the row "
               "(--second_look 3), and 0.5 N further SRS samples refine the route to the standard model where the "
               "selection samples alone send the image there (--route_pilot 0.5); rows marked pilot0.1 refine3 keep "
               "a 0.1 N pilot and re-solve with the standard model the rows whose logit margin is below 3 "
               "(--refine_margin 3); each is still a sound certificate of MDEQ-30A.", ""]
    for sigma, (h, baseline) in headlines.items():
        summary += headline_lines(sigma, h, baseline)
    report = os.path.join(out_dir, "report.md")
    with open(report, "w") as fh:
        fh.write("\n".join(summary + [""] + sections) + "\n")
    log(f"report written to {report} ({total / 60:.1f} min)")


if __name__ == "__main__":
    main()
