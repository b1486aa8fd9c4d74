"""The command lines of certify.py, predict.py, certify_qcrs.py and attack.py: argparse, and flags -> RunSpec.

Parses, builds a typed :class:`SRS.runner.RunSpec` and validates it; the certification flags come from the
options declared in ``SRS.settings``.  The certified classifier is the checkpoint config's CERTIFY section in
both modes unless --std_solver / --std_thresh / --tol name another; with --srs, --f_solver / --f_thresh are the
SRS step.
"""
from __future__ import annotations

import argparse
from typing import Dict

from DEQ.acceleration import COMPILE_CHOICES, PRECISIONS
from DEQ.data import DATASETS
from DEQ.errors import ArgumentParser, UserError

from .modes import AttackMode, AttackSettings, CertifyMode, PredictMode, QCRSMode, SequentialMode
from .qcrs import DEFAULT_LEFT_RATIO, DEFAULT_RIGHT_RATIO, QCRSSettings
from .runner import DataSpec, RunSpec, Sampling, run
from .settings import SmoothingSpec, SRSOptions, declared, default_radii

ADVANCED = "advanced SRS options"
RUN_OPTIONS = "run options"
# Flags that no longer exist, with what replaces them: refused in one line that says so.
REMOVED_FLAGS = {
    "--radius_grid": "--radius_grid is replaced by --radii r1 ... rm, the radii of your certified-accuracy table "
                     "(default: multiples of sigma/2 from 0 to 3 sigma; the pairs aim at the largest of them at or "
                     "below each image's SRS radius): pass --radii instead",
}


class _Removed(argparse.Action):
    """A flag that no longer exists: refused in one line (``message``) while the flags are parsed."""

    def __init__(self, option_strings, dest, message: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.message = message

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(self.message)


def add_smoothing_args(main, advanced) -> None:
    """The flag of every option ``SmoothingSpec`` declares (``SRS.settings``): main options into ``main``,
    the others into ``advanced``; the solver flags first, then the SRS options.  Each flag's argparse
    default is None (not given: the declaration's default)."""
    inherited = {name for name, _, _ in declared(SRSOptions)}
    own = [d for d in declared(SmoothingSpec) if d[0] not in inherited]
    for name, opt, default in own + declared(SRSOptions):
        shown = opt.default_text if opt.default_text is not None else default
        kwargs = dict(dest=name, default=None, help=f"{opt.help} (default: {shown})".replace("%", "%%"))
        if opt.const is not None:
            kwargs.update(action="store_const", const=opt.const)
        else:
            kwargs.update(type=opt.type, metavar=opt.metavar)
            if opt.nargs:
                kwargs["nargs"] = opt.nargs
        (advanced if opt.advanced else main).add_argument(opt.flag, **kwargs)


def add_common_args(p: argparse.ArgumentParser, with_sigma: bool = True) -> None:
    """The arguments every certification CLI shares: the main ones in ``p``'s own group, the other
    certification options in an "advanced SRS options" group, and run settings in "run options"."""
    p.add_argument("dataset", help=f"one of {', '.join(DATASETS)}")
    p.add_argument("base_classifier", help="checkpoint written by DEQ/tools/cls_train.py")
    if with_sigma:
        p.add_argument("sigma", type=float, help="noise level of the smoothed classifier (pixel units)")
    p.add_argument("outfile", help="output TSV")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default: 0.001)")
    p.add_argument("--batch", type=int, default=1000,
                   help="noisy samples per mini-batch, the SRS chain's width (default: 1000)")
    p.add_argument("--skip", type=int, default=1, help="certify every skip-th image (default: 1)")
    p.add_argument("--max", type=int, default=-1, help="stop after this many images (default: -1, all)")
    advanced = p.add_argument_group(ADVANCED, "the certified model, the SRS step and warm-up, and adaptive pairing")
    add_smoothing_args(p, advanced)
    p.add_argument("--resume", action="store_true", help="continue an interrupted OUTFILE")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (default: auto)")
    for flag, message in REMOVED_FLAGS.items():
        p.add_argument(flag, action=_Removed, message=message)
    run_options = p.add_argument_group(RUN_OPTIONS)
    run_options.add_argument("--split", choices=["train", "test"], default="test")
    run_options.add_argument("--seed", type=int, default=0)
    run_options.add_argument("--data-dir", dest="data_dir", default=None,
                             help="local data root for cifar10 / imagenet")
    run_options.add_argument("--cfg", default=None,
                             help="yaml config, only for bare reference state_dicts that carry none")
    run_options.add_argument("--overwrite", action="store_true", help="replace an existing OUTFILE")
    run_options.add_argument("--quiet", action="store_true", help="no progress bar")
    run_options.add_argument("--dist_timeout", type=float, default=120.0,
                             help="under torchrun: minutes a rank waits for the others before the run stops with an "
                                  "error (120)")
    run_options.add_argument("--threads", type=int, default=None,
                             help="CPU threads for torch (default: OMP_NUM_THREADS, else usable cores / torchrun local "
                                  "processes); lower it on a busy machine")
    add_runtime_args(run_options)


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
    p = ArgumentParser(prog="certify.py", description="Certify many examples (randomized smoothing / SRS). The "
                       "recipe: certify.py DATASET CKPT SIGMA OUT --srs --f_thresh 3")
    p.add_argument("--N0", type=int, default=100, help="samples for selecting the top class (default: 100)")
    p.add_argument("--N", type=int, default=100000, help="samples for estimating p_A (default: 100000)")
    add_common_args(p)
    p.add_argument("--sequential", action="store_true",
                   help="sequential CERTIFY for the table at --radii: each image stops sampling at the first look "
                        "(fixed in advance, whole batches, about ten up to N) where its table row is decided; same "
                        "guarantee (level alpha), the bound at N taken at 0.8 alpha")
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
    """The smoothed classifier's flags: every declared option given on the command line (the others keep
    their declared defaults)."""
    given = {name: getattr(args, name) for name, _, _ in declared(SmoothingSpec)}
    return SmoothingSpec(**{name: value for name, value in given.items() if value is not None})


def run_spec(args, routes: bool = True, table: bool = False) -> RunSpec:
    """The typed run description of parsed flags, validated (every error one line, before any work;
    ``routes``, ``table``: whether the mode has CERTIFY's standard fallback route and whether it decides a
    table at ``--radii``, see ``SmoothingSpec.validate``)."""
    sampling = Sampling(sigma=args.sigma, N=args.N, alpha=args.alpha, batch=args.batch, N0=getattr(args, "N0", None))
    sampling.validate()  # sigma and the sample sizes first: the other checks refer to them
    spec = RunSpec(data=DataSpec(args.dataset, args.split, args.data_dir, args.skip, args.max),
                   checkpoint=args.base_classifier, outfile=args.outfile, sampling=sampling,
                   smoothing=smoothing_spec(args), cfg=args.cfg, seed=args.seed, device=args.device,
                   threads=args.threads, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet,
                   dist_timeout=args.dist_timeout, compile=args.compile, precision=args.precision)
    spec.validate(routes=routes, table=table)
    if spec.smoothing.srs and spec.smoothing.certificate == "none":
        print("warning: --certificate none certifies the SRS chain as if it were the standard model: NOT a guarantee")
    return spec


def certify_mode(args, spec: RunSpec):
    """certify.py's mode: CERTIFY, or sequential CERTIFY of the table at --radii (default: multiples of sigma/2
    from 0 to 3 sigma) with --sequential (validated: one-line errors)."""
    if not args.sequential:
        return CertifyMode(args.N0, args.N, args.alpha, args.batch)
    s = spec.smoothing
    mode = SequentialMode(args.N0, args.N, args.alpha, args.batch, s.radii or default_radii(args.sigma))
    mode.validate(s.srs, s.certificate, s.refine_margin)
    return mode


def certify_main(args) -> Dict[str, float]:
    """certify.py: CERTIFY every chosen image (sequentially with --sequential)."""
    spec = run_spec(args, table=args.sequential)
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


__all__ = ["add_common_args", "add_smoothing_args", "add_runtime_args", "smoothing_spec", "certify_parser",
           "predict_parser", "qcrs_parser", "add_qcrs_args", "run_spec", "certify_mode", "certify_main", "predict_main",
           "certify_qcrs_main", "attack_parser", "attack_main"]
