"""Shared command-line plumbing of certify.py, predict.py and certify_qcrs.py.

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
import os
from typing import Dict, Tuple

from DEQ.checkpoint import file_sha256, load_model
from DEQ.checks import check_count, check_number
from DEQ.data import DATASETS, dataset_info, get_dataset
from DEQ.errors import UserError
from DEQ.solvers import SOLVERS
from DEQ.utils import pick_device, set_seed, set_threads

from .certification import ResultsFile, image_generator, run_metadata, run_over_images, select_indices
from .core import ABSTAIN, DEQSolve, Smooth, SRSConfig

CERTIFY_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time", "n_A", "n", "p_A_lower", "p_m_upper",
                   "N_A_E", "K", "K_A", "M", "nfe", "residual", "status", "route", "std_calls", "std_rows")
PREDICT_COLUMNS = ("idx", "label", "predict", "correct", "time", "n1", "n2", "pvalue", "p_m_upper", "K", "K_A", "M",
                   "nfe", "std_calls", "status")



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
    p.add_argument("--conf_drop", default="auto",
                   help="paired standard solves of the correlation-eliminated bound: 'auto' (default: adaptive, "
                        "chosen per image from the SRS counts) or a fixed K of the N samples (reference: 400)")
    p.add_argument("--radius_slack", type=float, default=0.05,
                   help="adaptive pairing: aim within this many sigma of the radius the SRS counts alone give (0.05)")
    p.add_argument("--max_pairs", type=int, default=None, help="adaptive pairing: most paired standard solves per image (default N)")
    p.add_argument("--no_fallback", action="store_true",
                   help="adaptive pairing: never certify an image with the standard model outright, even where SRS "
                        "plus its pairs would cost more")
    p.add_argument("--step_cost", type=float, default=None,
                   help="adaptive pairing: evaluations of f one SRS step is expected to cost, for the fallback's cost "
                        "model (default --f_thresh; set it with --step_tol, where --f_thresh is only a cap)")
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
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: OMP_NUM_THREADS, else usable cores / torchrun local "
                        "processes); lower it on a busy machine")


def certify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="certify.py", description="Certify many examples (randomized smoothing / SRS)")
    add_common_args(p)
    p.add_argument("--N0", type=int, default=100, help="samples for selecting the top class")
    p.add_argument("--N", type=int, default=100000, help="samples for estimating p_A")
    return p


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="predict.py", description="Predict with the smoothed classifier (abstains when unsure)")
    add_common_args(p)
    p.add_argument("--N", type=int, default=100000, help="number of noise samples")
    return p


def validate_args(args, n_name: str = "N") -> None:
    """Every argument error, one line each, before any work."""
    # `not (sigma > 0)` rather than `sigma <= 0`: also refuses nan (float("nan") <= 0 is False), which
    # otherwise ran the whole certification and wrote radius nan; inf would make every noisy input nan.
    sigma = getattr(args, "sigma", 1.0)
    if sigma is not None and not (0 < sigma < float("inf")):
        raise UserError(f"sigma must be > 0 and finite, got {args.sigma}")
    dataset_info(args.dataset)
    for name in ("N0", "N"):
        if hasattr(args, name) and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.batch < 1 or args.skip < 1:
        raise UserError(f"--batch and --skip must be >= 1, got {args.batch} and {args.skip}")
    check_count("--max", args.max, 1, allow=-1, hint=" (-1: all images)")
    check_number("--tol", args.tol, 0, hint=" (0: always run the whole budget)")
    check_count("--threads", args.threads, 1)
    for flag in ("f_solver", "warmup_solver", "std_solver"):
        name = getattr(args, flag)
        if name is not None and name not in SOLVERS:
            raise UserError(f"--{flag} {name!r} is not a solver; choose one of {', '.join(sorted(SOLVERS))}")
    for flag in ("f_thresh", "warmup_thresh", "std_thresh"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise UserError(f"--{flag} must be >= 1 evaluation, got {v}")
    n = getattr(args, n_name)
    if args.conf_drop != "auto":
        try:
            args.conf_drop = int(args.conf_drop)
        except (TypeError, ValueError):
            raise UserError(f"--conf_drop must be 'auto' (adaptive pairing) or a whole number K, got {args.conf_drop!r}") from None
        if args.conf_drop < 0:
            raise UserError(f"--conf_drop must be >= 0, got {args.conf_drop}")
        if args.conf_drop > n:
            raise UserError(f"--conf_drop {args.conf_drop} is larger than --{n_name} {n}: the pairs are drawn from those samples; lower it")
    if args.warmup_interval < 0:
        raise UserError(f"--warmup_interval must be >= 0, got {args.warmup_interval}")
    check_number("--radius_slack", args.radius_slack, 0, hint=" (in units of sigma)")
    if args.max_pairs is not None and not 1 <= args.max_pairs <= n:
        raise UserError(f"--max_pairs must be between 1 and --{n_name} {n} (pairs are drawn from those samples), "
                        f"got {args.max_pairs}")
    check_number("--step_tol", args.step_tol, 0)
    check_number("--step_cost", args.step_cost, 0, strict=True, hint=" (evaluations of f)")
    adaptive_only = [f for f, on in (("--radius_slack", args.radius_slack != 0.05), ("--max_pairs", args.max_pairs is not None),
                                     ("--no_fallback", args.no_fallback), ("--step_cost", args.step_cost is not None)) if on]
    if adaptive_only and (not args.srs or args.conf_drop != "auto"):
        raise UserError(f"{adaptive_only[0]} sets adaptive pairing, which needs --srs and --conf_drop auto")


def load_base(args) -> Tuple[object, object, dict, object]:
    """Model, config, checkpoint and device, with a check that the checkpoint fits DATASET."""
    device = pick_device(args.device)
    model, cfg, ckpt = load_model(args.base_classifier, device, cfg_path=args.cfg)
    trained_on = ckpt.get("dataset", cfg.DATASET.DATASET)
    info = dataset_info(args.dataset)
    if trained_on != args.dataset:
        raise UserError(f"checkpoint {args.base_classifier} was trained on {trained_on}, not {args.dataset}: "
                        f"pass the matching DATASET or checkpoint")
    if cfg.MODEL.NUM_CLASSES != info.num_classes:
        raise UserError(f"checkpoint {args.base_classifier} has {cfg.MODEL.NUM_CLASSES} classes but {args.dataset} has "
                        f"{info.num_classes}: use a checkpoint for this data set")
    return model, cfg, ckpt, device


def build_smooth(args, model, cfg, n: int, sigma: float) -> Smooth:
    tol = cfg.DEQ.F_TOL if args.tol is None else args.tol  # explicit, so the header records the tolerance used
    default = DEQSolve(cfg.DEQ.F_SOLVER, cfg.DEQ.F_THRES, tol)
    if not args.srs:
        standard = DEQSolve(args.f_solver or default.solver, args.f_thresh or default.max_iter, tol)
        return Smooth(model, cfg.MODEL.NUM_CLASSES, sigma, standard=standard)
    standard = DEQSolve(args.std_solver or default.solver, args.std_thresh or default.max_iter, tol)
    step = DEQSolve(args.f_solver or "anderson", args.f_thresh or 1, tol if args.step_tol is None else args.step_tol)
    warm = DEQSolve(args.warmup_solver or step.solver, args.warmup_thresh or 10, tol)
    K = None if args.conf_drop == "auto" else args.conf_drop
    if args.certificate == "none":
        K = 0
    srs = SRSConfig(step=step, warmup=warm, warmup_interval=args.warmup_interval, conf_drop=K,
                    certificate=args.certificate, chain_across_phases=not args.no_chain_across_phases,
                    radius_slack=args.radius_slack, max_pairs=args.max_pairs, fallback=not args.no_fallback,
                    step_cost=args.step_cost)
    return Smooth(model, cfg.MODEL.NUM_CLASSES, sigma, standard=standard, srs=srs)


def smooth_settings(smooth: Smooth) -> Dict[str, object]:
    s = smooth.srs
    return {
        "standard": f"{smooth.standard.solver}:{smooth.standard.max_iter}",
        "tol": smooth.standard.tol,
        "srs": "off" if s is None else (f"step={s.step.solver}:{s.step.max_iter} step_tol={s.step.tol} "
                                        f"warmup={s.warmup.solver}:{s.warmup.max_iter} "
                                        f"interval={s.warmup_interval} conf_drop={'auto' if s.adaptive else s.conf_drop} "
                                        f"certificate={s.certificate} chain_across_phases={s.chain_across_phases}"
                                        + (f" radius_slack={s.radius_slack} max_pairs={s.max_pairs} fallback={s.fallback}"
                                           if s.adaptive and s.pairs else "")
                                        + (f" step_cost={s.step_cost}" if s.step_cost is not None else "")),
    }


def open_dataset(args, cfg):
    return get_dataset(args.dataset, args.split, args.data_dir, image_size=cfg.MODEL.IMAGE_SIZE[0])


def certificate_row(c, idx: int, label: int) -> Dict[str, object]:
    """The CERTIFY_COLUMNS of one image (time is added by the runner)."""
    return {"idx": idx, "label": label, "predict": c.prediction, "radius": float(c.radius),
            "correct": int(c.prediction == label), "n_A": c.n_A, "n": c.n, "p_A_lower": c.p_A_lower,
            "p_m_upper": c.p_m_upper, "N_A_E": c.N_A_E, "K": c.K, "K_A": c.K_A, "M": c.M, "nfe": c.nfe,
            "residual": c.residual, "status": c.status, "route": c.route, "std_calls": c.std_calls,
            "std_rows": c.std_rows}


def prepare_run(args):
    """Everything before the first image: validate, load checkpoint and data, build the smoothed classifier."""
    validate_args(args)
    args.threads = set_threads(args.threads)
    if args.srs and args.certificate == "none":
        print("warning: --certificate none certifies the SRS chain as if it were the standard model: NOT a guarantee")
    model, cfg, ckpt, device = load_base(args)
    dataset = open_dataset(args, cfg)
    set_seed(args.seed)
    return build_smooth(args, model, cfg, args.N, args.sigma), dataset, device


def run_settings(args, mode: str, smooth: Smooth, device, **extra) -> Dict[str, object]:
    """The '#' header of a results file: every setting that changes a row, plus provenance.

    On --resume every entry must match except those in SRS.certification.RESUME_IGNORED_KEYS
    (command, versions, date, max, device, checkpoint path, threads, ...), so a setting added
    here (or in smooth_settings) is checked without further work."""
    sampling = {k: getattr(args, k) for k in ("sigma", "N0", "N", "alpha", "skip", "batch", "seed", "max") if hasattr(args, k)}
    return run_metadata(args, {
        "mode": mode, "dataset": args.dataset, "split": args.split, **sampling, **extra,
        "checkpoint": args.base_classifier, "checkpoint_sha256": file_sha256(args.base_classifier),
        "cfg_sha256": file_sha256(args.cfg) if args.cfg else None,
        "data_dir": os.path.abspath(args.data_dir) if args.data_dir and args.dataset != "digits" else None,
        "device": str(device), "threads": args.threads, **smooth_settings(smooth)})


def certify_main(args) -> Dict[str, float]:
    smooth, dataset, device = prepare_run(args)
    meta = run_settings(args, "certify", smooth, device)
    results = ResultsFile(args.outfile, CERTIFY_COLUMNS, meta).open(args.resume, args.overwrite)

    def work(x, label, idx):
        c = smooth.certify(x, args.N0, args.N, args.alpha, args.batch, generator=image_generator(args.seed, idx, device))
        return certificate_row(c, idx, label)

    try:
        summary = run_over_images(dataset, select_indices(len(dataset), args.skip, args.max), results, work, device,
                                  "certify", not args.quiet, f"lower --batch (now {args.batch})")
    finally:
        results.close()
    return summary


def predict_main(args) -> Dict[str, float]:
    smooth, dataset, device = prepare_run(args)
    meta = run_settings(args, "predict", smooth, device)
    results = ResultsFile(args.outfile, PREDICT_COLUMNS, meta).open(args.resume, args.overwrite)

    def work(x, label, idx):
        p = smooth.predict(x, args.N, args.alpha, args.batch, generator=image_generator(args.seed, idx, device))
        return {"idx": idx, "label": label, "predict": p.prediction, "correct": int(p.prediction == label),
                "n1": p.n1, "n2": p.n2, "pvalue": p.pvalue, "p_m_upper": p.p_m_upper, "K": p.K, "K_A": p.K_A, "M": p.M,
                "nfe": p.nfe, "std_calls": p.std_calls, "status": p.status}

    try:
        return run_over_images(dataset, select_indices(len(dataset), args.skip, args.max), results, work, device,
                               "predict", not args.quiet, f"lower --batch (now {args.batch})")
    finally:
        results.close()


__all__ = ["ABSTAIN", "add_common_args", "validate_args", "build_smooth", "certify_main", "predict_main"]
