"""Train a noise-augmented MDEQ classifier.

    python DEQ/tools/cls_train.py --cfg experiments/digits/cls_mdeq_digits.yaml --noise 0.25
    python DEQ/tools/cls_train.py --cfg experiments/cifar/cls_mdeq_LARGE.yaml --noise 0.5 --data-dir ~/data/cifar10
    python DEQ/tools/cls_train.py --cfg ... --noise 0.5 --resume          # continue the interrupted run
    python DEQ/tools/cls_train.py --cfg ... --noise 0.5 TRAIN.END_EPOCH 10 DEQ.F_THRES 6   # yacs overrides
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from DEQ.config import load_config  # noqa: E402
from DEQ.errors import cli_main  # noqa: E402
from DEQ.training import Trainer, log, run_name, setup_logging  # noqa: E402
from DEQ.utils import pick_device  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train a noise-augmented MDEQ (Gaussian noise, Jacobian regularisation)")
    p.add_argument("--cfg", required=True, help="yacs yaml, e.g. experiments/digits/cls_mdeq_digits.yaml")
    p.add_argument("--noise", type=float, default=None, help="std of the Gaussian training noise in [0,1] pixel units")
    p.add_argument("--data-dir", "--dataDir", dest="data_dir", default=None, help="local data root (CIFAR-10 or ImageNet)")
    p.add_argument("--out", "--modelDir", dest="out", default=None, help="run folder (default OUTPUT_DIR/<dataset>/<cfg>_noise<sigma>)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from the run folder's last.pth (or the given checkpoint)")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bars or console log (the log file is kept)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides as KEY VALUE pairs")
    return p.parse_args(argv)


@cli_main
def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.cfg, args.opts, noise=args.noise)
    device = pick_device(args.device)
    out = args.out or os.path.join(cfg.OUTPUT_DIR, cfg.DATASET.DATASET, run_name(args.cfg, cfg.TRAIN.NOISE))
    setup_logging(out, quiet=args.quiet)
    trainer = Trainer(cfg, device, out, data_dir=args.data_dir, show_progress=not args.quiet)
    if args.resume is not None:
        trainer.resume(args.resume or None)
    log.info("run folder %s | device %s | noise %.3g | %d parameters", out, device, cfg.TRAIN.NOISE,
             sum(p.numel() for p in trainer.model.parameters()))
    stats = trainer.fit()
    if stats is not None:
        log.info("done: clean %.2f%%  noisy %.2f%%  last checkpoint %s  best %s",
                 stats.clean_acc, stats.noisy_acc, trainer.last_path, trainer.best_path)
    else:
        log.info("nothing to do: the run already reached TRAIN.END_EPOCH=%d (%s)", cfg.TRAIN.END_EPOCH, trainer.last_path)


if __name__ == "__main__":
    main()
