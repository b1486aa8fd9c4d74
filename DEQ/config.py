"""yacs configuration with the key names of the MDEQ code (locuslab/deq, MDEQ-Vision).

:func:`load_config` (yaml file + ``KEY VALUE`` overrides) and :func:`config_from_text` (yaml string, e.g. a
checkpoint's) merge onto a frozen copy of the defaults through :func:`validate`: every mistake (missing file,
bad yaml, unknown key, wrong type, bad value, a value for a key nothing reads) is a one-line UserError.
Every key, what reads it and which values are refused: docs/config.md.
"""
from __future__ import annotations

import re
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
_C.MODEL.NAME = "mdeq"             # mdeq | resnet_cifar | resnet110 | resnet50
_C.MODEL.DEPTH = 0                # resnet_cifar: 6n+2 (20, 32, 44, 56, 110); 0: the depth the name implies
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
_C.MODEL.EXTRA = CN()              # closed: a misspelt key under EXTRA is an error, not silently ignored
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

# SmoothAdv training (DEQ/attacks.py, DEQ/training/).  EPSILON is an l2 radius in [0,1] pixel units.
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


# The certified model of SRS/code/*.py (both modes, unless --std_solver / --std_thresh / --tol); training does
# not read it.  A checkpoint config without the section gets these defaults.
_C.CERTIFY = CN()
_C.CERTIFY.SOLVER = "anderson"     # the paper's MDEQ-30A on CIFAR-10 (ImageNet: broyden, MDEQ-14B)
_C.CERTIFY.THRES = 30
_C.CERTIFY.TOL = 0.0               # 0: every solve runs its whole budget


def get_default_config() -> CN:
    """A mutable, unvalidated copy of the defaults."""
    return _C.clone()


CONFIG_FIX = "check its spelling against DEQ/config.py"


def load_config(path: Optional[str], opts: Iterable[str] = (), noise: Optional[float] = None) -> CN:
    """Defaults <- yaml at ``path`` (None: none) <- ``opts`` (flat ``[KEY, VALUE, ...]``) <- ``noise``
    (TRAIN.NOISE when not None); returns the frozen, validated config.  Raises UserError (one line)."""
    loaded = None
    if path:
        check_input_file(path, "config file", "pass an existing yaml, e.g. experiments/digits/cls_mdeq_digits.yaml")
        with open(path) as fh:
            text = fh.read()
        loaded = _parse_yaml(text, f"config file {path}")
        if not loaded:
            raise UserError(f"config file {path} is empty (no KEY: value): pass a yaml with the run's keys, e.g. "
                            f"experiments/digits/cls_mdeq_digits.yaml")
    return _build(loaded, f"config file {path}", opts, noise)


def config_from_text(text: str, source: str, opts: Iterable[str] = (),
                     unknown_fix: str = CONFIG_FIX) -> CN:
    """The config in yaml ``text`` (``source`` names it in errors), merged and validated as in
    :func:`load_config`; ``unknown_fix``: the fix an unknown-key error suggests."""
    return _build(_parse_yaml(text, source), source, opts, None, unknown_fix)


def _parse_yaml(text: str, source: str) -> dict:
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"{source} is not valid yaml{where}: fix its syntax") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise UserError(f"{source} must hold a yaml mapping of KEY: value, not {type(loaded).__name__}")
    return loaded


def _build(loaded: Optional[dict], source: str, opts: Iterable[str], noise: Optional[float],
           unknown_fix: str = CONFIG_FIX) -> CN:
    cfg = get_default_config()
    if loaded:
        loaded = _floats_where_floats(cfg, loaded)
        _merge(cfg, lambda c: c.merge_from_other_cfg(CN(loaded)), source, unknown_fix)
    opts = list(opts or [])
    if len(opts) % 2:
        raise UserError(f"overrides must come in KEY VALUE pairs; '{opts[-1]}' has no value")
    if opts:
        for i in range(1, len(opts), 2):
            opts[i] = _float_where_float(cfg, opts[i - 1], opts[i])
        _merge(cfg, lambda c: c.merge_from_list(opts), "command-line override")
    if noise is not None:
        check_number("--noise", noise, 0, hint=" (the std of the Gaussian training noise, in [0,1] pixel units)")
        cfg.TRAIN.NOISE = float(noise)
    validate(cfg)
    cfg.freeze()
    return cfg


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _floats_where_floats(defaults: CN, loaded: dict) -> dict:
    """``loaded`` with a whole number turned into a float where the default is a float (``PERCENT: 1``)."""
    out = {}
    for key, value in loaded.items():
        default = defaults.get(key) if isinstance(defaults, CN) else None
        if isinstance(value, dict) and isinstance(default, CN):
            value = _floats_where_floats(default, value)
        elif isinstance(default, float) and _is_int(value):
            value = float(value)
        out[key] = value
    return out


def _float_where_float(cfg: CN, key: str, value):
    """An override's value, written as a float where the key's default is one (``PERCENT 1``)."""
    node = cfg
    for part in str(key).split("."):
        if not isinstance(node, CN) or part not in node:
            return value
        node = node[part]
    if isinstance(node, float) and isinstance(value, str):
        decoded = CN._decode_cfg_value(value)
        if _is_int(decoded):
            return str(float(decoded))
    return value


_TYPE_MISMATCH = re.compile(r"Type mismatch \(<class '(\w+)'> vs\. <class '(\w+)'>\) with values \((.*) vs\. (.*)\) "
                            r"for config key: (\S+)", re.S)


def _merge(cfg: CN, fn, where: str, unknown_fix: str = CONFIG_FIX) -> None:
    try:
        fn(cfg)
    except (KeyError, ValueError, TypeError, AssertionError) as exc:
        msg = str(exc.args[0]) if exc.args else str(exc)
        if msg.startswith("Non-existent"):  # yacs' words for an unknown key
            key = msg.split(":", 1)[1].strip()
            raise UserError(f"{where}: unknown config key {key}; {unknown_fix}") from None
        mismatch = _TYPE_MISMATCH.match(" ".join(msg.split()))
        if mismatch:
            want, got, default, value, key = mismatch.groups()
            a = "an" if want[0] in "aeiou" else "a"
            raise UserError(f"{where}: {key} takes {a} {want} value (e.g. {default}), got {value} ({got}); "
                            f"give {a} {want}") from None
        raise UserError(f"{where}: {' '.join(msg.split())}") from None


# Values that must be positive (or in a range): one line naming the key instead of a traceback later.
_COUNTS = (("TRAIN.BATCH_SIZE_PER_GPU", 1), ("TEST.BATCH_SIZE_PER_GPU", 1), ("TRAIN.BEGIN_EPOCH", 0),
           ("TRAIN.END_EPOCH", 1), ("TRAIN.PRETRAIN_STEPS", 0), ("WORKERS", 0), ("PRINT_FREQ", 0),
           ("MODEL.NUM_CLASSES", 1), ("MODEL.DEPTH", 0),
           ("MODEL.NUM_GROUPS", 1), ("MODEL.NUM_LAYERS", 1), ("MODEL.EXPANSION_FACTOR", 1),
           ("MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", 1), ("MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", 1),
           ("DEQ.F_THRES", 1), ("DEQ.B_THRES", 1), ("DEQ.RAND_F_THRES_DELTA", 0), ("LOSS.JAC_INCREMENTAL", 1),
           ("CERTIFY.THRES", 1))
_NUMBERS = (("TRAIN.NOISE", 0, False, None), ("TRAIN.LR", 0, True, None), ("TRAIN.WD", 0, False, None),
            ("TRAIN.MOMENTUM", 0, False, None), ("TRAIN.LR_FACTOR", 0, True, None), ("PERCENT", 0, True, 1),
            ("DEQ.F_TOL", 0, False, None), ("DEQ.B_TOL", 0, False, None), ("MODEL.DROPOUT", 0, False, 1),
            ("LOSS.JAC_LOSS_FREQ", 0, False, 1), ("LOSS.JAC_LOSS_WEIGHT", 0, False, None),
            ("LOSS.PRETRAIN_JAC_LOSS_WEIGHT", 0, False, None), ("CERTIFY.TOL", 0, False, None))

# Keys the code does not read: a value other than the accepted ones is refused.  (key, accepted, what instead)
_REFUSED = (
    ("LOG_DIR", ("", "log", "log/"),
     "train.log and the tensorboard events (tb/) are written to the run folder; choose it with --out"),
    ("GPUS", ((0,),), "a training process runs on one device; pick it with --device cuda:N (or CUDA_VISIBLE_DEVICES), "
                      "or train on G GPUs with torchrun --nproc_per_node G DEQ/tools/cls_train.py ..."),
    ("MODEL.EXTRA.FULL_STAGE.NUM_MODULES", (1,), "f_theta is one MDEQ module, as in the MDEQ code"),
    ("MODEL.EXTRA.FULL_STAGE.BLOCK", ("BASIC",), "BASIC is the only residual block of f_theta"),
    ("MODEL.EXTRA.FULL_STAGE.FUSE_METHOD", ("SUM",), "SUM is the only multiscale fusion"),
    ("DEQ.SPECTRAL_RADIUS_MODE", (False,), "the MDEQ code's spectral-radius diagnostic is not implemented here"),
    ("DATASET.TRAIN_SET", ("train",), "the splits are fixed (ImageNet: the train/ and val/ folders under --data-dir)"),
    ("DATASET.TEST_SET", ("val",), "the splits are fixed (ImageNet: the train/ and val/ folders under --data-dir)"),
    ("DATASET.DATA_FORMAT", ("jpg",), "images are read as files in ImageFolder layout; zipped ImageNet is not supported"),
    ("TRAIN.RESUME", (False,), "to continue a run pass --resume (or --resume-from CKPT) to DEQ/tools/cls_train.py"),
    ("TEST.MODEL_FILE", ("",), "certify a checkpoint by passing it to SRS/code/certify.py; start training from one "
                              "with MODEL.PRETRAINED"),
    ("DEBUG.DEBUG", (False,), "nothing reads it"),
)

# Keys a --resume may change: the steps still to come (the cosine schedule is re-laid over them), where files
# are, data loading, logging and backend.  Every other key shapes the training: a resume keeps its value.
RESUME_CHANGEABLE = ("TRAIN.END_EPOCH", "PERCENT", "TRAIN.BATCH_SIZE_PER_GPU", "OUTPUT_DIR", "LOG_DIR", "DATA_DIR",
                     "DATASET.ROOT", "WORKERS", "PRINT_FREQ", "PIN_MEMORY", "TEST.BATCH_SIZE_PER_GPU",
                     "CUDNN.BENCHMARK", "CUDNN.DETERMINISTIC", "CUDNN.ENABLED")
RESUME_CHANGEABLE += ("CERTIFY.SOLVER", "CERTIFY.THRES", "CERTIFY.TOL")  # what certification certifies, not training


def _leaves(cfg: CN, prefix: str = ""):
    for key, value in cfg.items():
        if isinstance(value, CN):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", list(value) if isinstance(value, tuple) else value


def check_resume_config(stored: CN, cfg: CN, flag: str, path: str) -> None:
    """Raise a one-line UserError unless ``cfg`` (this run) differs from ``stored`` (the checkpoint's config)
    in :data:`RESUME_CHANGEABLE` keys only; ``flag`` and ``path`` name the resume in the message."""
    old = dict(_leaves(stored))
    for key, value in _leaves(cfg):
        if key in RESUME_CHANGEABLE or key not in old or old[key] == value:
            continue
        raise UserError(f"{flag}: {key} is {value!r} here but {path} was trained with {old[key]!r}; a resume "
                        f"continues that run as trained and may change only TRAIN.END_EPOCH, PERCENT, "
                        f"TRAIN.BATCH_SIZE_PER_GPU and data, log and backend settings: give {key} {old[key]!r} (or "
                        f"drop the override), or start a new run for {key} {value!r} (another --out, or --overwrite)")


NATIVE_SIZE = {"cifar10": 32, "imagenet": 224}


def _get(cfg: CN, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _same(value, accepted) -> bool:
    if isinstance(value, (list, tuple)) and isinstance(accepted, tuple):
        return tuple(value) == accepted
    return type(value) is type(accepted) and value == accepted


def check_refused(cfg: CN) -> None:
    """Raise a one-line UserError for a value of a key nothing reads (the R rows of docs/config.md)."""
    for key, accepted, why in _REFUSED:
        value = _get(cfg, key)
        if not any(_same(value, a) for a in accepted):
            ok = " or ".join(repr(a) for a in accepted)
            raise UserError(f"{key} {value!r} is not used: {why}; remove {key} from the yaml or set it to {ok}")


def check_model(cfg: CN) -> None:
    """Raise a one-line UserError unless MODEL.NAME, DEPTH, IMAGE_SIZE and the DEQ-only training terms fit."""
    from .models import model_spec  # the registry: the one list of model names
    name, depth, ds = cfg.MODEL.NAME, cfg.MODEL.DEPTH, cfg.DATASET.DATASET
    spec = model_spec(name)
    deq, implied = spec.deq, spec.depth
    if implied is None:
        if depth < 8 or (depth - 2) % 6:
            raise UserError(f"MODEL.NAME {name} needs MODEL.DEPTH = 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}")
    elif depth not in (0, implied):
        what = f"{name} has no depth (its f_theta is solved, not stacked)" if deq else f"{name} has depth {implied}"
        raise UserError(f"MODEL.DEPTH {depth} does not apply: {what}; remove MODEL.DEPTH or use MODEL.NAME resnet_cifar")
    if name == "resnet50" and ds != "imagenet":
        raise UserError(f"MODEL.NAME resnet50 is the ImageNet architecture, not one for {ds}: use resnet110 or "
                        f"resnet_cifar (MODEL.DEPTH) for {ds}")
    if not deq:
        if cfg.MODEL.DROPOUT > 0:
            raise UserError(f"MODEL.DROPOUT {cfg.MODEL.DROPOUT} is the variational dropout of an MDEQ's f_theta; "
                            f"{name} has none: set MODEL.DROPOUT 0.0")
        loss = cfg.LOSS
        if loss.JAC_LOSS_FREQ > 0 and (loss.JAC_LOSS_WEIGHT > 0 or loss.PRETRAIN_JAC_LOSS_WEIGHT > 0):
            raise UserError(f"LOSS.JAC_LOSS_FREQ {loss.JAC_LOSS_FREQ} asks for Jacobian regularisation of a fixed point; "
                            f"{name} has none: set LOSS.JAC_LOSS_FREQ 0.0")
    size = list(cfg.MODEL.IMAGE_SIZE)
    if len(size) != 2 or size[0] != size[1]:
        raise UserError(f"MODEL.IMAGE_SIZE {size} must be [S, S] (square images)")
    native = NATIVE_SIZE.get(ds)
    if native is not None and size[0] != native:
        raise UserError(f"MODEL.IMAGE_SIZE {size} does not apply to {ds}: its images are {native}x{native} "
                        f"(only digits is resized); set MODEL.IMAGE_SIZE [{native}, {native}]")


def validate(cfg: CN) -> None:
    """Check every value the code reads and refuse values nobody reads (one-line UserError)."""
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
    if cfg.TRAIN.END_EPOCH <= cfg.TRAIN.BEGIN_EPOCH:
        raise UserError(f"TRAIN.END_EPOCH {cfg.TRAIN.END_EPOCH} must be larger than TRAIN.BEGIN_EPOCH "
                        f"{cfg.TRAIN.BEGIN_EPOCH} (a run trains epochs BEGIN_EPOCH to END_EPOCH - 1): raise "
                        f"TRAIN.END_EPOCH or lower TRAIN.BEGIN_EPOCH")
    for key in ("MODEL.IMAGE_SIZE", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS",
                "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS"):
        for v in _get(cfg, key):
            check_count(f"every entry of {key}", v, 1)
    from .solvers import SOLVERS
    for key in ("DEQ.F_SOLVER", "DEQ.B_SOLVER", "CERTIFY.SOLVER"):
        if _get(cfg, key) not in SOLVERS:
            raise UserError(f"{key}={_get(cfg, key)!r} is not a solver; choose one of {', '.join(sorted(SOLVERS))}")
    if cfg.DEQ.STOP_MODE not in ("abs", "rel"):
        raise UserError(f"DEQ.STOP_MODE must be 'abs' or 'rel', got {cfg.DEQ.STOP_MODE!r}")
    if cfg.DEQ.GRAD not in ("implicit", "phantom"):
        raise UserError(f"DEQ.GRAD must be 'implicit' or 'phantom', got {cfg.DEQ.GRAD!r}")
    if cfg.TRAIN.OPTIMIZER not in ("adam", "sgd"):
        raise UserError(f"TRAIN.OPTIMIZER must be 'adam' or 'sgd', got {cfg.TRAIN.OPTIMIZER!r}")
    if cfg.TRAIN.LR_SCHEDULER not in ("cosine", "step"):
        raise UserError(f"TRAIN.LR_SCHEDULER must be 'cosine' or 'step', got {cfg.TRAIN.LR_SCHEDULER!r}")
    from .data import DATASETS
    if cfg.DATASET.DATASET not in DATASETS:
        raise UserError(f"DATASET.DATASET={cfg.DATASET.DATASET!r} is not a data set; choose one of {', '.join(DATASETS)}")
    check_refused(cfg)
    check_model(cfg)
