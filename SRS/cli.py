"""The command lines of certify.py, predict.py and certify_qcrs.py: argparse, and flags -> RunSpec.

The work itself is ``SRS.runner.run`` with a mode of ``SRS.modes``; this module only parses,
turns the flags into a typed :class:`SRS.runner.RunSpec` and validates it.

Flags keep the names of the SRS reference code (--batch --skip --max --split
--N0 --N --alpha --f_solver --f_thresh --srs --warmup_solver --warmup_thresh
--warmup_interval --conf_drop).  Which classifier is certified:

* standard mode: the DEQ solved from zeros with --f_solver / --f_thresh
  (default: the checkpoint config's DEQ.F_SOLVER / DEQ.F_THRES);
* --srs: --f_solver / --f_thresh are the SRS step from the warm start; the
  certified classifier is the standard model --std_solver / --std_thresh
  (default: the checkpoint config's), used on the --conf_drop paired samples.
"""
from __future__ import annotations

import argparse
from typing import Dict

from DEQ.acceleration import COMPILE_CHOICES, PRECISIONS
from DEQ.data import DATASETS
from DEQ.errors import ArgumentParser, UserError
from DEQ.solvers import SOLVERS

from .modes import AttackMode, AttackSettings, CertifyMode, PredictMode, QCRSMode, SequentialMode
from .qcrs import DEFAULT_LEFT_RATIO, DEFAULT_RIGHT_RATIO, QCRSSettings
from .runner import SRS_DEFAULTS, DataSpec, RunSpec, Sampling, SmoothingSpec, parse_conf_drop, run
from .settings import WARM_STARTS


def add_common_args(p: argparse.ArgumentParser, with_sigma: bool = True) -> None:
    p.add_argument("dataset", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("base_classifier", help="checkpoint written by DEQ/tools/cls_train.py")
    if with_sigma:
        p.add_argument("sigma", type=float, help="noise level of the smoothed classifier (pixel units)")
    p.add_argument("outfile", help="output TSV")
    p.add_argument("--batch", type=int, default=1000, help="noisy samples per mini-batch (SRS chain width)")
    p.add_argument("--skip", type=int, default=1, help="certify every skip-th image")
    p.add_argument("--max", type=int, default=-1, help="stop after this many images (-1: all)")
    p.add_argument("--split", choices=["train", "test"], default="test")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability")
    p.add_argument("--f_solver", default=None, help=f"solver ({', '.join(sorted(SOLVERS))}); standard model in standard mode, SRS step with --srs")
    p.add_argument("--f_thresh", type=int, default=None, help="solver budget in evaluations of f")
    p.add_argument("--srs", action="store_true", help="serialized randomized smoothing (warm-started chain)")
    p.add_argument("--warmup_solver", default=None, help="solver of the warm-up batches (default: --f_solver)")
    p.add_argument("--warmup_thresh", type=int, default=None, help="budget of the warm-up batches (default 10)")
    p.add_argument("--warmup_interval", type=int, default=0, help="every k-th batch is a warm-up (0: only the first)")
    p.add_argument("--warm_start", default="previous", metavar="{" + ",".join(WARM_STARTS) + "}",
                   help="with --srs: each sample starts from the previous batch's sample at its position (previous, "
                        "the paper's chain, default) or from the mean of the previous batch's solutions (mean)")
    p.add_argument("--conf_drop", default="auto",
                   help="paired standard solves of the correlation-eliminated bound: 'auto' (default: adaptive, "
                        "chosen per image from the SRS counts) or a fixed K of the N samples (reference: 400)")
    p.add_argument("--radius_slack", type=float, default=SRS_DEFAULTS.radius_slack,
                   help="adaptive pairing: aim within this many sigma of the radius the SRS counts alone give (0.05)")
    p.add_argument("--radius_grid", type=float, default=None,
                   help="adaptive pairing: aim at the largest multiple of this radius (pixel units, e.g. the step of "
                        "your certified-accuracy table) at or below the SRS counts' radius, instead of --radius_slack")
    p.add_argument("--second_look", type=float, default=0.0,
                   help="adaptive pairing: G > 1 plans a second look of up to G times the first look's pairs, solved "
                        "only when the first finds a misaligned pair (each look's bound at half the level); 0 (default) off")
    p.add_argument("--max_pairs", type=int, default=None, help="adaptive pairing: most paired standard solves per image (default N)")
    p.add_argument("--no_fallback", action="store_true",
                   help="adaptive pairing: never certify an image with the standard model outright, even where SRS "
                        "plus its pairs would cost more")
    p.add_argument("--step_cost", type=float, default=None,
                   help="adaptive pairing: evaluations of f one SRS step is expected to cost, for the fallback's cost "
                        "model (default --f_thresh; set it with --step_tol, where --f_thresh is only a cap)")
    p.add_argument("--refine_margin", type=float, default=0.0,
                   help="with --srs: re-solve with the standard model the SRS samples whose top-two logit margin is "
                        "below this (their prediction is then exact, never misaligned); 0 (default) turns it off")
    p.add_argument("--route_pilot", type=float, default=SRS_DEFAULTS.route_pilot,
                   help="adaptive pairing: where the N0 selection samples send an image to the standard model, this "
                        "fraction of N further SRS samples (own noise stream, in no certificate) refine that decision; "
                        "0 turns it off (default 0.1)")
    p.add_argument("--step_tol", type=float, default=None,
                   help="with --srs: tolerance of the SRS step from the warm start (default --tol); with a tolerance "
                        "--f_thresh is a cap and the step stops once every sample's residual is below it")
    p.add_argument("--certificate", choices=["eliminated", "reference", "none"], default="eliminated",
                   help="SRS certificate: eliminated (sound, default), reference (the reference code's weaker variant), none (no guarantee)")
    p.add_argument("--std_solver", default=None, help="standard model's solver in SRS mode (default: checkpoint config)")
    p.add_argument("--std_thresh", type=int, default=None, help="standard model's budget in SRS mode (default: checkpoint config)")
    p.add_argument("--tol", type=float, default=None, help="solver residual tolerance (default: checkpoint config DEQ.F_TOL)")
    p.add_argument("--no_chain_across_phases", action="store_true", help="restart the SRS chain for the estimation samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--data-dir", dest="data_dir", default=None, help="local data root for cifar10 / imagenet")
    p.add_argument("--cfg", default=None, help="yaml config, only for bare reference state_dicts that carry none")
    p.add_argument("--resume", action="store_true", help="continue an interrupted OUTFILE")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUTFILE")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--dist_timeout", type=float, default=120.0,
                   help="under torchrun: minutes a rank waits for the others before the run stops with an error (120)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: OMP_NUM_THREADS, else usable cores / torchrun local "
                        "processes); lower it on a busy machine")
    add_runtime_args(p)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--compile and --precision (``DEQ.acceleration``); a bad value is refused by ``RunSpec.validate`` in one
    line (``error: --compile must be one of auto, on, off, got 'x'``), as every other setting."""
    p.add_argument("--compile", default="auto", metavar="{" + ",".join(COMPILE_CHOICES) + "}",
                   help="torch.compile the model's stem, f and head (static shapes; CUDA graphs on CUDA): auto (on "
                        "for CUDA, off on the CPU), on, off; the compile time is printed and counted in s/image")
    p.add_argument("--precision", default="fp32", metavar="{" + ",".join(PRECISIONS) + "}",
                   help="precision of the certified model: fp32, or bf16 (stem, f and head under bf16 autocast; "
                        "the solver state and arithmetic stay fp32)")


def certify_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="certify.py", description="Certify many examples (randomized smoothing / SRS)")
    add_common_args(p)
    p.add_argument("--N0", type=int, default=100, help="samples for selecting the top class")
    p.add_argument("--N", type=int, default=100000, help="samples for estimating p_A")
    p.add_argument("--sequential", action="store_true",
                   help="sequential CERTIFY for a table at --radii: each image stops sampling at the first look "
                        "(batch, 2 batch, 4 batch, ..., N) where its table row is decided; same guarantee (level "
                        "alpha), the bound at N taken at alpha / 2")
    p.add_argument("--radii", type=float, nargs="+", default=None,
                   help="with --sequential: the radii of the certified-accuracy table (pixel units, as analyze.py)")
    return p


def predict_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="predict.py", description="Predict with the smoothed classifier (abstains when unsure)")
    add_common_args(p)
    p.add_argument("--N", type=int, default=100000, help="number of noise samples")
    return p


def add_qcrs_args(p: argparse.ArgumentParser) -> None:
    """The QCRS flags (names of the reference code's certify_qcrs.py)."""
    p.add_argument("--sigma", type=float, required=True,
                   help="fixed noise level sigma0: the base classifier's training noise; also certified for comparison")
    p.add_argument("--left", type=float, default=None,
                   help=f"smallest sigma searched (default {DEFAULT_LEFT_RATIO} * sigma)")
    p.add_argument("--right", type=float, default=None,
                   help=f"largest sigma searched (default {DEFAULT_RIGHT_RATIO} * sigma)")
    p.add_argument("--epsilon", type=float, default=0.01, help="stop bisecting when the interval is this narrow")
    p.add_argument("--epsilon_step", type=float, default=2.0,
                   help="finite-difference step h = epsilon / epsilon_step (>= 2 keeps the result within epsilon)")
    p.add_argument("--gradient_n", type=int, default=500, help="noisy samples per radius estimate of the search")


def qcrs_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="certify_qcrs.py", description="Certify many examples with QCRS (input-specific sigma)")
    add_common_args(p, with_sigma=False)
    add_qcrs_args(p)
    p.add_argument("--N0", type=int, default=100, help="samples for selecting the top class")
    p.add_argument("--N", type=int, default=100000, help="samples for estimating p_A")
    return p


def attack_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="attack.py", description="Attack each image, then predict with the smoothed "
                                "classifier at the attacked input (empirical robustness)")
    add_common_args(p)
    p.add_argument("--N", type=int, default=100000, help="noise samples of PREDICT at the attacked input")
    p.add_argument("--attack", default="smooth_pgd", help="pgd (base model) or smooth_pgd (SmoothAdv, smoothed soft classifier)")
    p.add_argument("--epsilon", type=float, required=True, help="attack radius (pixel units, l2 unless --norm linf)")
    p.add_argument("--norm", default="l2", help="l2 or linf (pgd only)")
    p.add_argument("--steps", type=int, default=20, help="attack steps")
    p.add_argument("--step_size", type=float, default=None, help="default 2 epsilon / steps (2.5 epsilon / steps for linf)")
    p.add_argument("--restarts", type=int, default=1, help="pgd: random restarts (the strongest is kept)")
    p.add_argument("--num_noise_vec", type=int, default=1, help="smooth_pgd: m noise vectors (1, 4, 8, 16 in the paper)")
    p.add_argument("--no_grad_attack", action="store_true", help="smooth_pgd: SmoothAdv's gradient-free estimate")
    return p


def smoothing_spec(args) -> SmoothingSpec:
    """The smoothed classifier's flags."""
    return SmoothingSpec(
        srs=args.srs, f_solver=args.f_solver, f_thresh=args.f_thresh, tol=args.tol, std_solver=args.std_solver,
        std_thresh=args.std_thresh, step_tol=args.step_tol, warmup_solver=args.warmup_solver,
        warmup_thresh=args.warmup_thresh, warmup_interval=args.warmup_interval, warm_start=args.warm_start,
        conf_drop=parse_conf_drop(args.conf_drop), certificate=args.certificate,
        chain_across_phases=not args.no_chain_across_phases, radius_slack=args.radius_slack,
        max_pairs=args.max_pairs, fallback=not args.no_fallback, step_cost=args.step_cost,
        refine_margin=args.refine_margin, route_pilot=args.route_pilot, radius_grid=args.radius_grid,
        second_look=args.second_look)


def run_spec(args, routes: bool = True) -> RunSpec:
    """The typed run description of parsed flags, validated (every error one line, before any work;
    ``routes``: whether the mode has CERTIFY's standard fallback route, see ``RunSpec.validate``)."""
    sampling = Sampling(sigma=args.sigma, N=args.N, alpha=args.alpha, batch=args.batch, N0=getattr(args, "N0", None))
    sampling.validate()  # sigma and the sample sizes first: the other checks refer to them
    spec = RunSpec(data=DataSpec(args.dataset, args.split, args.data_dir, args.skip, args.max),
                   checkpoint=args.base_classifier, outfile=args.outfile, sampling=sampling,
                   smoothing=smoothing_spec(args), cfg=args.cfg, seed=args.seed, device=args.device,
                   threads=args.threads, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                   dist_timeout=args.dist_timeout, compile=args.compile, precision=args.precision)
    spec.validate(routes=routes)
    if spec.smoothing.srs and spec.smoothing.certificate == "none":
        print("warning: --certificate none certifies the SRS chain as if it were the standard model: NOT a guarantee")
    return spec


def certify_mode(args, spec: RunSpec):
    """certify.py's mode: CERTIFY, or sequential CERTIFY with --sequential (validated: one-line errors)."""
    if not args.sequential:
        if args.radii is not None:
            raise UserError("--radii sets the table of --sequential; add --sequential, or drop --radii (analyze.py "
                            "takes the table's radii of a fixed-N run)")
        return CertifyMode(args.N0, args.N, args.alpha, args.batch)
    mode = SequentialMode(args.N0, args.N, args.alpha, args.batch, args.radii)
    s = spec.smoothing
    mode.validate(s.srs, s.certificate, s.refine_margin)
    return mode


def certify_main(args) -> Dict[str, float]:
    """certify.py: CERTIFY every chosen image (sequentially with --sequential)."""
    spec = run_spec(args)
    return run(spec, certify_mode(args, spec))


def predict_main(args) -> Dict[str, float]:
    """predict.py: PREDICT every chosen image."""
    spec = run_spec(args, routes=PredictMode.routes)
    return run(spec, PredictMode(args.N, args.alpha, args.batch))


def certify_qcrs_main(args) -> Dict[str, float]:
    """certify_qcrs.py: certify.py with a per-input sigma (search settings validated before any work)."""
    spec = run_spec(args)
    search = QCRSSettings.around(args.sigma, args.left, args.right, epsilon=args.epsilon,
                                 epsilon_step=args.epsilon_step, gradient_n=args.gradient_n)
    search.validate()
    return run(spec, QCRSMode(search, args.N0, args.N, args.alpha, args.batch))


def attack_main(args) -> Dict[str, float]:
    """attack.py: attack every chosen image and PREDICT at the attacked input."""
    spec = run_spec(args, routes=AttackMode.routes)
    settings = AttackSettings(args.attack, args.epsilon, args.norm, args.steps, args.step_size, args.restarts,
                              args.num_noise_vec, args.no_grad_attack)
    settings.validate()
    return run(spec, AttackMode(settings, args.sigma, args.N, args.alpha, args.batch))


__all__ = ["add_common_args", "add_runtime_args", "certify_parser", "predict_parser", "qcrs_parser", "add_qcrs_args",
           "run_spec",
           "certify_mode", "certify_main", "predict_main", "certify_qcrs_main", "attack_parser",
           "attack_main"]
