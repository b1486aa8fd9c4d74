"""Train a noise-augmented MDEQ classifier.

    python DEQ/tools/cls_train.py --cfg experiments/digits/cls_mdeq_digits.yaml --noise 0.25
    python DEQ/tools/cls_train.py --cfg experiments/cifar/cls_mdeq_LARGE.yaml --noise 0.5 --data-dir ~/data/cifar10
    python DEQ/tools/cls_train.py --cfg ... --noise 0.5 --resume                   # continue the run folder's last.pth
    python DEQ/tools/cls_train.py --cfg ... --noise 0.5 --resume TRAIN.END_EPOCH 60   # ... to a later end epoch
    python DEQ/tools/cls_train.py --cfg ... --noise 0.5 --resume-from other/run/best.pth --out new/run
    python DEQ/tools/cls_train.py --cfg ... --noise 0.5 --overwrite                # delete the folder's checkpoints, start again
    python DEQ/tools/cls_train.py --cfg ... --noise 0.5 TRAIN.END_EPOCH 10 DEQ.F_THRES 6   # yacs overrides
    python DEQ/tools/cls_train.py --cfg experiments/digits/cls_mdeq_digits_smoothadv.yaml --noise 0.25   # SmoothAdv
    python DEQ/tools/cls_train.py --cfg ... --noise 0.25 ATTACK.ADV_TRAINING True ATTACK.EPSILON 0.5 ATTACK.NUM_STEPS 2
    torchrun --nproc_per_node 8 DEQ/tools/cls_train.py --cfg ... --noise 0.5    # DistributedDataParallel, 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29400 --rdzv-id run1 \
        DEQ/tools/cls_train.py --cfg ... --noise 0.5                           # the same command on every node

A run folder that already holds last.pth / best.pth is never overwritten silently:
pass --resume, --overwrite or another --out.  --threads sets torch's CPU threads
(default: OMP_NUM_THREADS if set, else the usable cores shared among torchrun's
local processes); on a busy machine oversubscribed threads made certification
~50x slower, so lower it there.
Under torchrun each process trains on TRAIN.BATCH_SIZE_PER_GPU rows of every global batch
(WORLD_SIZE x that); rank 0 writes the log and the checkpoints (see DEQ/training/, DEQ/distributed.py).
Flags go before the KEY VALUE overrides.  SmoothAdv training (adversarial training of the
smoothed classifier) is the ``ATTACK`` config section; see DEQ/attacks.py and docs/training.md.
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
