"""yacs configuration with the key names of the MDEQ code (locuslab/deq, MDEQ-Vision).

``load_config(path, opts)`` merges a yaml file and MDEQ-style ``KEY VALUE`` command
line overrides into a frozen copy of the defaults, with one-line errors for the
mistakes people make (missing file, bad yaml, unknown key, odd override list).
"""
from __future__ import annotations

import os
from typing import Iterable, Optional

import yaml
from yacs.config import CfgNode as CN

from .checks import check_count, check_input_file, check_number
from .errors import UserError

_C = CN()
_C.OUTPUT_DIR = "output"
_C.LOG_DIR = "log"
_C.DATA_DIR = ""
_C.GPUS = (0,)
_C.WORKERS = 2
_C.PRINT_FREQ = 20
_C.PIN_MEMORY = True
_C.SEED = 0
_C.PERCENT = 1.0

_C.CUDNN = CN()
_C.CUDNN.BENCHMARK = True
_C.CUDNN.DETERMINISTIC = False
_C.CUDNN.ENABLED = True

_C.MODEL = CN()
_C.MODEL.NAME = "mdeq"
_C.MODEL.INIT_WEIGHTS = True
_C.MODEL.WNORM = True
_C.MODEL.PRETRAINED = ""
_C.MODEL.NUM_LAYERS = 8           # unrolled depth of f during pretraining
_C.MODEL.NUM_GROUPS = 8
_C.MODEL.DROPOUT = 0.0
_C.MODEL.NUM_CLASSES = 10
_C.MODEL.DOWNSAMPLE_TIMES = 0
_C.MODEL.EXPANSION_FACTOR = 5
_C.MODEL.BLOCK_GN_AFFINE = True
_C.MODEL.FUSE_GN_AFFINE = True
_C.MODEL.POST_GN_AFFINE = False
_C.MODEL.IMAGE_SIZE = [32, 32]
_C.MODEL.EXTRA = CN(new_allowed=True)
_C.MODEL.EXTRA.FULL_STAGE = CN()
_C.MODEL.EXTRA.FULL_STAGE.NUM_MODULES = 1
_C.MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES = 3
_C.MODEL.EXTRA.FULL_STAGE.BLOCK = "BASIC"
_C.MODEL.EXTRA.FULL_STAGE.BIG_KERNELS = [0, 0, 0]
_C.MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS = [7, 14, 28]
_C.MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE = 200
_C.MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS = [1, 1, 1]
_C.MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS = [8, 16, 32]
_C.MODEL.EXTRA.FULL_STAGE.FUSE_METHOD = "SUM"

_C.DEQ = CN()
_C.DEQ.F_SOLVER = "broyden"
_C.DEQ.B_SOLVER = "broyden"
_C.DEQ.STOP_MODE = "rel"
_C.DEQ.F_THRES = 8
_C.DEQ.B_THRES = 7
_C.DEQ.F_TOL = 1e-3               # residual tolerance of the forward solve
_C.DEQ.B_TOL = 1e-3
_C.DEQ.RAND_F_THRES_DELTA = 2
_C.DEQ.GRAD = "implicit"          # implicit | phantom (one-step gradient)
_C.DEQ.SPECTRAL_RADIUS_MODE = False

_C.LOSS = CN()
_C.LOSS.JAC_LOSS_FREQ = 0.0
_C.LOSS.JAC_LOSS_WEIGHT = 0.0
_C.LOSS.JAC_INCREMENTAL = int(1e8)
_C.LOSS.JAC_STOP_EPOCH = int(1e8)
_C.LOSS.PRETRAIN_JAC_LOSS_WEIGHT = 0.0

_C.DATASET = CN()
_C.DATASET.ROOT = ""
_C.DATASET.DATASET = "cifar10"
_C.DATASET.TRAIN_SET = "train"
_C.DATASET.TEST_SET = "val"
_C.DATASET.DATA_FORMAT = "jpg"
_C.DATASET.AUGMENT = True

_C.TRAIN = CN()
_C.TRAIN.NOISE = 0.0
_C.TRAIN.CLIP = -1.0
_C.TRAIN.LR_FACTOR = 0.1
_C.TRAIN.LR_STEP = [30, 60, 90]
_C.TRAIN.LR = 0.001
_C.TRAIN.LR_SCHEDULER = "cosine"   # cosine | step
_C.TRAIN.OPTIMIZER = "adam"        # adam | sgd
_C.TRAIN.MOMENTUM = 0.9
_C.TRAIN.WD = 0.0
_C.TRAIN.NESTEROV = False
_C.TRAIN.PRETRAIN_STEPS = 16000
_C.TRAIN.BEGIN_EPOCH = 0
_C.TRAIN.END_EPOCH = 120
_C.TRAIN.RESUME = False
_C.TRAIN.BATCH_SIZE_PER_GPU = 96
_C.TRAIN.SHUFFLE = True
_C.TRAIN.AMP = True                # mixed precision, used on CUDA only

_C.TEST = CN()
_C.TEST.BATCH_SIZE_PER_GPU = 96
_C.TEST.MODEL_FILE = ""

_C.DEBUG = CN()
_C.DEBUG.DEBUG = False

# SmoothAdv training (Salman et al. 2019), keys of the SRS reference's MDEQ code; checked and used by
# DEQ/attacks.py (SmoothAdvAttack) and DEQ/training.py.  EPSILON is an l2 radius in [0,1] pixel units
# (the reference takes 0-255 units / 256: its default 64.0 is 0.25 here).
_C.ATTACK = CN()
_C.ATTACK.ADV_TRAINING = False     # attack every training batch, train on (adversarial + noise)
_C.ATTACK.ATTACK = "PGD"           # PGD (Smooth-PGD, step 2 EPSILON / NUM_STEPS) | DDN
_C.ATTACK.EPSILON = 0.25
_C.ATTACK.NUM_STEPS = 10
_C.ATTACK.WARM_UP = 1              # epoch e (0-based) uses min(EPSILON, (e + 1) EPSILON / WARM_UP)
_C.ATTACK.NUM_NOISE_VEC = 1        # m noise vectors per input (smoothed soft classifier)
_C.ATTACK.TRAIN_MULTI_NOISE = True  # train on all m noisy copies (else one per input)
_C.ATTACK.NO_GRAD_ATTACK = False   # PGD direction from the noise alone (Stein estimate), no backward pass
_C.ATTACK.RANDOM_START = True      # PGD starts from a uniform draw in the epsilon ball


def get_default_config() -> CN:
    return _C.clone()


def load_config(path: Optional[str], opts: Iterable[str] = (), noise: Optional[float] = None) -> CN:
    """Defaults <- yaml at ``path`` <- ``opts`` (``KEY VALUE`` pairs) <- ``noise``; frozen."""
    cfg = get_default_config()
    if path:
        check_input_file(path, "config file", "pass an existing yaml, e.g. experiments/digits/cls_mdeq_digits.yaml")
        try:
            with open(path) as fh:
                loaded = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise UserError(f"config file {path} is not valid yaml{where}: fix its syntax") from None
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a yaml mapping of KEY: value, not {type(loaded).__name__}")
        _merge(cfg, lambda c: c.merge_from_other_cfg(CN(loaded)), f"config file {path}")
    opts = list(opts or [])
    if len(opts) % 2:
        raise UserError(f"overrides must come in KEY VALUE pairs; '{opts[-1]}' has no value")
    if opts:
        _merge(cfg, lambda c: c.merge_from_list(opts), "command-line override")
    if noise is not None:
        check_number("--noise", noise, 0, hint=" (the std of the Gaussian training noise, in [0,1] pixel units)")
        cfg.TRAIN.NOISE = float(noise)
    validate(cfg)
    cfg.freeze()
    return cfg


def _merge(cfg: CN, fn, where: str) -> None:
    try:
        fn(cfg)
    except (KeyError, ValueError, TypeError, AssertionError) as exc:
        msg = str(exc.args[0]) if exc.args else str(exc)
        if msg.startswith("Non-existent"):  # yacs' words for an unknown key
            key = msg.split(":", 1)[1].strip()
            raise UserError(f"{where}: unknown config key {key}; check its spelling against DEQ/config.py") from None
        raise UserError(f"{where}: {msg}") from None


# Values that must be positive (or in a range): one line naming the key instead of a traceback later
# (TRAIN.BATCH_SIZE_PER_GPU 0 crashed the DataLoader; TRAIN.NOISE nan trained a useless model).
_COUNTS = (("TRAIN.BATCH_SIZE_PER_GPU", 1), ("TEST.BATCH_SIZE_PER_GPU", 1), ("TRAIN.BEGIN_EPOCH", 0),
           ("TRAIN.END_EPOCH", 0), ("TRAIN.PRETRAIN_STEPS", 0), ("WORKERS", 0), ("MODEL.NUM_CLASSES", 1),
           ("MODEL.NUM_GROUPS", 1), ("MODEL.NUM_LAYERS", 1), ("MODEL.EXPANSION_FACTOR", 1),
           ("MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", 1), ("MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", 1),
           ("DEQ.F_THRES", 1), ("DEQ.B_THRES", 1), ("DEQ.RAND_F_THRES_DELTA", 0), ("LOSS.JAC_INCREMENTAL", 1))
_NUMBERS = (("TRAIN.NOISE", 0, False, None), ("TRAIN.LR", 0, True, None), ("TRAIN.WD", 0, False, None),
            ("TRAIN.MOMENTUM", 0, False, None), ("TRAIN.LR_FACTOR", 0, True, None), ("PERCENT", 0, True, 1),
            ("DEQ.F_TOL", 0, False, None), ("DEQ.B_TOL", 0, False, None), ("MODEL.DROPOUT", 0, False, 1),
            ("LOSS.JAC_LOSS_FREQ", 0, False, 1), ("LOSS.JAC_LOSS_WEIGHT", 0, False, None),
            ("LOSS.PRETRAIN_JAC_LOSS_WEIGHT", 0, False, None))


def _get(cfg: CN, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def validate(cfg: CN) -> None:
    fs = cfg.MODEL.EXTRA.FULL_STAGE
    nb = fs.NUM_BRANCHES
    for key in ("NUM_CHANNELS", "NUM_BLOCKS", "BIG_KERNELS", "HEAD_CHANNELS"):
        if len(fs[key]) != nb:
            raise UserError(f"MODEL.EXTRA.FULL_STAGE.{key} has {len(fs[key])} entries but NUM_BRANCHES is {nb}: make them agree")
    for c in fs.NUM_CHANNELS:
        if c % cfg.MODEL.NUM_GROUPS:  # GroupNorm over c (and E*c, and c with NUM_GROUPS // 2 groups)
            raise UserError(f"channel count {c} is not divisible by MODEL.NUM_GROUPS={cfg.MODEL.NUM_GROUPS}: change one of them")
    for key, minimum in _COUNTS:
        check_count(key, _get(cfg, key), minimum)
    for key, minimum, strict, maximum in _NUMBERS:
        check_number(key, _get(cfg, key), minimum, strict, maximum)
    for key in ("MODEL.IMAGE_SIZE", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS",
                "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS"):
        for v in _get(cfg, key):
            check_count(f"every entry of {key}", v, 1)
    from .solvers import SOLVERS
    for key in ("F_SOLVER", "B_SOLVER"):
        if cfg.DEQ[key] not in SOLVERS:
            raise UserError(f"DEQ.{key}={cfg.DEQ[key]!r} is not a solver; choose one of {', '.join(sorted(SOLVERS))}")
    if cfg.DEQ.STOP_MODE not in ("abs", "rel"):
        raise UserError(f"DEQ.STOP_MODE must be 'abs' or 'rel', got {cfg.DEQ.STOP_MODE!r}")
    if cfg.DEQ.GRAD not in ("implicit", "phantom"):
        raise UserError(f"DEQ.GRAD must be 'implicit' or 'phantom', got {cfg.DEQ.GRAD!r}")
    if cfg.TRAIN.OPTIMIZER not in ("adam", "sgd"):
        raise UserError(f"TRAIN.OPTIMIZER must be 'adam' or 'sgd', got {cfg.TRAIN.OPTIMIZER!r}")
    if cfg.TRAIN.LR_SCHEDULER not in ("cosine", "step"):
        raise UserError(f"TRAIN.LR_SCHEDULER must be 'cosine' or 'step', got {cfg.TRAIN.LR_SCHEDULER!r}")
