"""Train a noise-augmented MDEQ classifier.

    python DEQ/tools/cls_train.py --cfg experiments/digits/cls_mdeq_digits.yaml --noise 0.25

A run folder holding last.pth / best.pth is never overwritten silently (--resume, --overwrite or another
--out).  Flags go before the KEY VALUE overrides.  More examples: docs/training.md, docs/internals.md.
"""
import argparse

from DEQ.acceleration import COMPILE_CHOICES
from DEQ.distributed import DEFAULT_TIMEOUT_MINUTES
from DEQ.errors import ArgumentParser, UserError, cli_main
from DEQ.training import train_main


def parse_args(argv=None):
    p = ArgumentParser(prog="cls_train.py", description="Train a noise-augmented MDEQ (Gaussian noise, Jacobian regularisation; SmoothAdv with ATTACK.ADV_TRAINING True)")
    p.add_argument("--cfg", required=True, help="yacs yaml, e.g. experiments/digits/cls_mdeq_digits.yaml")
    p.add_argument("--noise", type=float, default=None, help="std of the Gaussian training noise in [0,1] pixel units")
    p.add_argument("--data-dir", "--dataDir", dest="data_dir", default=None, help="local data root (CIFAR-10 or ImageNet)")
    p.add_argument("--out", "--modelDir", dest="out", default=None, help="run folder (default OUTPUT_DIR/<dataset>/<cfg>_noise<sigma>)")
    p.add_argument("--resume", action="store_true", help="continue the run folder's last.pth")
    p.add_argument("--resume-from", dest="resume_from", default=None, metavar="CKPT",
                   help="continue from this checkpoint (written by this script) into the run folder")
    p.add_argument("--overwrite", action="store_true", help="delete the run folder's last.pth / best.pth and start again")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: OMP_NUM_THREADS, else usable cores / torchrun local processes)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N (under torchrun: auto or cuda, "
                   "rank r on cuda:LOCAL_RANK)")
    p.add_argument("--dist-timeout", dest="dist_timeout", type=float, default=DEFAULT_TIMEOUT_MINUTES,
                   metavar="MINUTES", help="under torchrun: minutes a process waits for the others before the run stops "
                   f"with an error ({DEFAULT_TIMEOUT_MINUTES:g})")
    p.add_argument("--compile", default="auto", metavar="{" + ",".join(COMPILE_CHOICES) + "}",
                   help="torch.compile of f for the evaluation passes and the no-gradient fixed-point solve of "
                        "every DEQ training step: auto (on for CUDA, off on the CPU), on, off (gradients, the "
                        "Jacobian term and the unrolled pretraining stay eager)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or console log (the log file is kept)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    args = p.parse_args(argv)
    flags = [o for o in args.opts if o.startswith("--")]
    if flags:
        raise UserError(f"{flags[0]} comes after the KEY VALUE overrides: put the flags first")
    return args


@cli_main
def main(argv=None):
    train_main(parse_args(argv))


if __name__ == "__main__":
    main()
