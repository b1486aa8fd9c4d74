"""Noise-augmented MDEQ training with Jacobian regularisation (the MDEQ recipe).

Every training input gets Gaussian noise N(0, noise^2 I) in pixel space (labels
unchanged), so the base classifier suits randomized smoothing at that sigma.
The first PRETRAIN_STEPS optimiser steps unroll f NUM_LAYERS times; afterwards
the forward pass solves for the fixed point and gradients use implicit
differentiation (DEQ.GRAD=implicit) or a one-step phantom gradient.  On a random
fraction JAC_LOSS_FREQ of steps a Hutchinson estimate of ||df/dz||_F^2 is added
with weight JAC_LOSS_WEIGHT (until JAC_STOP_EPOCH), and the forward budget is
jittered by RAND_F_THRES_DELTA, as in the MDEQ code.

Plain classifiers (the ResNet baselines, ``MODEL.NAME resnet_cifar|resnet110|resnet50``)
train through the same loop with the same noise, optimiser and checkpoints; the
DEQ-only parts (pretraining, Jacobian loss, threshold jitter, solver statistics)
are skipped for them (``DEQ.models.is_deq``).

SmoothAdv (``ATTACK.ADV_TRAINING True``, Salman et al. 2019): each batch gets m =
NUM_NOISE_VEC noise vectors per input, the smoothed soft classifier is attacked at the
noisy points (DEQ/attacks.py: Smooth-PGD or DDN, the model in eval mode, gradients
through the same forward that training uses at that step), and the optimiser step
trains on adversarial + noise (all m copies with TRAIN_MULTI_NOISE, else one).  Off, the
Gaussian training above is unchanged (same random draws).

Resumability: a checkpoint is written atomically after every epoch with the
model, optimiser, scheduler, AMP scaler and RNG states; the shuffle order of
epoch e is seeded by (SEED, e), so ``--resume`` replays exactly the run it
interrupted.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .attacks import SmoothAdvAttack
from .checkpoint import load_checkpoint, load_pretrained, load_state_dict, remove_stale_temporaries, save_checkpoint
from .checks import check_input_file, check_writable_dir
from .data import dataset_info, get_dataset, make_loader
from .errors import UserError
from .models import build_model, is_deq
from .utils import apply_cudnn_flags, get_rng_state, is_out_of_memory, pick_device, set_rng_state, set_seed, set_threads

log = logging.getLogger("deq.train")


@dataclass
class EvalStats:
    clean_acc: float
    noisy_acc: float
    mean_steps: float
    mean_residual: float
    nfe: float


def build_optimizer(cfg, model):
    t = cfg.TRAIN
    if t.OPTIMIZER == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.LR, momentum=t.MOMENTUM, weight_decay=t.WD, nesterov=t.NESTEROV)
    return torch.optim.Adam(model.parameters(), lr=t.LR, weight_decay=t.WD)


def build_scheduler(cfg, optimizer, steps_per_epoch: int):
    """Cosine: per optimiser step over the whole run (as MDEQ). Step: per epoch at LR_STEP."""
    t = cfg.TRAIN
    if t.LR_SCHEDULER == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(t.LR_STEP), t.LR_FACTOR)
    total = max(1, steps_per_epoch * (t.END_EPOCH - t.BEGIN_EPOCH))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=1e-6)


def jac_factor(cfg, train_step: int, epoch: int) -> float:
    """The MDEQ schedule of the Jacobian-loss weight."""
    deq_steps = train_step - cfg.TRAIN.PRETRAIN_STEPS
    if deq_steps < 0:
        return cfg.LOSS.PRETRAIN_JAC_LOSS_WEIGHT
    if epoch >= cfg.LOSS.JAC_STOP_EPOCH:
        return 0.0
    return cfg.LOSS.JAC_LOSS_WEIGHT + 0.1 * (deq_steps // cfg.LOSS.JAC_INCREMENTAL)


def smoothadv_batch(model, attacker: SmoothAdvAttack, cfg, x, y, epoch: int, train_step: int):
    """SmoothAdv (Salman et al. 2019, train_pgd.py): draw m noise vectors per input, attack the smoothed
    soft classifier at the noisy points (the model in eval mode, gradients through the fixed point as
    training takes them), and return the rows to train on: all m copies of (adversarial + noise) with
    ATTACK.TRAIN_MULTI_NOISE, else the first copy of each input."""
    m = attacker.num_noise_vec
    noise = torch.randn((x.shape[0], m, *x.shape[1:]), device=x.device, dtype=x.dtype) * cfg.TRAIN.NOISE
    x_adv = attacker(model, x, y, noise, epoch=epoch, train_step=train_step)
    if attacker.train_multi_noise:
        return (x_adv.unsqueeze(1) + noise).flatten(0, 1), y.repeat_interleave(m)
    return x_adv + noise[:, 0], y


def smoothadv_attacker(cfg, input_dim: int) -> Optional[SmoothAdvAttack]:
    """The run's SmoothAdv attack (None unless ATTACK.ADV_TRAINING), with one-line errors for bad ATTACK keys."""
    if not cfg.ATTACK.ADV_TRAINING:
        return None
    attacker = SmoothAdvAttack.from_config(cfg)
    widest = math.sqrt(input_dim)  # the l2 distance between an all-0 and an all-1 image
    if attacker.epsilon > widest:
        raise UserError(f"ATTACK.EPSILON {attacker.epsilon:g} exceeds the largest l2 distance between two inputs "
                        f"({widest:.3g}): it is in [0,1] pixel units (the SmoothAdv code's 0-255 units divided "
                        f"by 256, e.g. 64 -> 0.25)")
    if attacker.no_grad and cfg.TRAIN.NOISE <= 0:
        raise UserError("ATTACK.NO_GRAD_ATTACK estimates gradients from the Gaussian noise: it needs --noise > 0")
    return attacker


def train_step_fn(model, optimizer, scheduler, scaler, cfg, x, y, epoch: int, train_step: int, device,
                  attacker: Optional[SmoothAdvAttack] = None):
    """One optimiser step on a noisy (with ``attacker``: SmoothAdv-perturbed) batch; returns
    (loss, jac_loss or None, correct count, rows trained on)."""
    noise = cfg.TRAIN.NOISE
    if attacker is not None:
        x, y = smoothadv_batch(model, attacker, cfg, x, y, epoch, train_step)
    elif noise > 0:
        x = x + torch.randn_like(x) * noise
    deq = is_deq(model)
    factor = jac_factor(cfg, train_step, epoch) if deq else 0.0
    compute_jac = factor > 0 and torch.rand(()).item() < cfg.LOSS.JAC_LOSS_FREQ
    delta = cfg.DEQ.RAND_F_THRES_DELTA
    f_thres = cfg.DEQ.F_THRES + (torch.randint(-delta, 2, ()).item() if (delta > 0 and compute_jac) else 0)
    f_thres = max(1, f_thres)
    amp = scaler is not None
    with torch.autocast(device_type=device.type, enabled=amp):
        if deq:
            out = model.forward_train(x, train_step=train_step, compute_jac_loss=compute_jac, f_thres=f_thres)
            logits, jac_loss = out.logits, out.jac_loss
        else:  # a plain classifier (ResNet): no fixed point, no Jacobian term
            logits, jac_loss = model(x), None
        loss = F.cross_entropy(logits.float(), y)
        total = loss + factor * jac_loss if compute_jac else loss
    optimizer.zero_grad(set_to_none=True)
    if amp:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if cfg.TRAIN.CLIP > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.TRAIN.CLIP)
    if amp:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if cfg.TRAIN.LR_SCHEDULER != "step":
        scheduler.step()
    correct = (logits.argmax(1) == y).sum().item()
    return loss.item(), (jac_loss.item() if compute_jac else None), correct, x.shape[0]


@torch.no_grad()
def evaluate(model, loader, noise: float, device, seed: int = 1234, solver=None, max_iter=None) -> EvalStats:
    """Clean accuracy and accuracy under N(0, noise^2) with the standard solver from zeros.
    The evaluation noise comes from its own seeded generator: figures are comparable across epochs.
    A plain classifier (no ``.solve``) is just run; its solver statistics are nan."""
    model.eval()
    deq = is_deq(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    n = clean = noisy = 0
    steps = resid = nfe = 0.0 if deq else float("nan")
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if deq:
            out = model.solve(x, solver, max_iter)
            logits = out.logits
            steps += out.result.nsteps.float().sum().item()
            resid += torch.nan_to_num(out.result.residual, nan=1e9).sum().item()
            nfe += out.result.nfe * x.shape[0]
        else:
            logits = model(x)
        clean += (logits.argmax(1) == y).sum().item()
        if noise > 0:
            eps = torch.randn(x.shape, generator=gen, device=device) * noise
            noisy_logits = model.solve(x + eps, solver, max_iter).logits if deq else model(x + eps)
            noisy += (noisy_logits.argmax(1) == y).sum().item()
        else:
            noisy = clean
        n += x.shape[0]
    return EvalStats(100.0 * clean / n, 100.0 * noisy / n, steps / n, resid / n, nfe / n)


def run_name(cfg_path: Optional[str], noise: float) -> str:
    stem = os.path.splitext(os.path.basename(cfg_path or "default"))[0]
    return f"{stem}_noise{noise:g}"


class Trainer:
    """Owns the model, data, optimisation state and logs of one training run."""

    def __init__(self, cfg, device, out_dir: str, data_dir: Optional[str] = None, show_progress: bool = True):
        self.cfg, self.device, self.out_dir = cfg, device, out_dir
        self.show_progress = show_progress
        set_seed(cfg.SEED)
        apply_cudnn_flags(cfg)
        ds = cfg.DATASET.DATASET
        info = dataset_info(ds)
        if cfg.MODEL.NUM_CLASSES != info.num_classes:
            raise UserError(f"MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES} but {ds} has {info.num_classes} classes: fix the config")
        if ds == "digits":
            data_dir = None
        elif not data_dir:
            key = "DATA_DIR" if cfg.DATA_DIR else "DATASET.ROOT"
            data_dir = cfg.DATA_DIR or cfg.DATASET.ROOT or None
            if data_dir and not os.path.isdir(data_dir):
                raise UserError(f"{ds} needs --data-dir: the config's {key} {data_dir!r} does not exist here")
        size = cfg.MODEL.IMAGE_SIZE[0]
        self.attacker = smoothadv_attacker(cfg, info.in_channels * size * cfg.MODEL.IMAGE_SIZE[1])
        self.train_set = get_dataset(ds, "train", data_dir, augment=cfg.DATASET.AUGMENT, image_size=size)
        self.test_set = get_dataset(ds, "test", data_dir, image_size=size)
        bs = cfg.TRAIN.BATCH_SIZE_PER_GPU
        self.train_loader = make_loader(self.train_set, bs, cfg.TRAIN.SHUFFLE, cfg.WORKERS, device, cfg.SEED,
                                        pin_memory=cfg.PIN_MEMORY)
        self.test_loader = make_loader(self.test_set, cfg.TEST.BATCH_SIZE_PER_GPU, False, cfg.WORKERS, device,
                                       pin_memory=cfg.PIN_MEMORY)
        self.steps_per_epoch = math.ceil(len(self.train_set) * cfg.PERCENT / bs)
        self.model = build_model(cfg)
        self.pretrained_sha256 = load_pretrained(self.model, cfg.MODEL.PRETRAINED) if cfg.MODEL.PRETRAINED else None
        self.model = self.model.to(device)
        self.is_deq = is_deq(self.model)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.steps_per_epoch)
        amp = cfg.TRAIN.AMP and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if amp else None
        self.epoch = cfg.TRAIN.BEGIN_EPOCH
        self.train_step = 0
        self.best_acc = -1.0
        self.writer = None
        os.makedirs(out_dir, exist_ok=True)  # only once the data and model are there: a failed start writes nothing

    # ------------------------------------------------------------ checkpoints
    @property
    def last_path(self):
        return os.path.join(self.out_dir, "last.pth")

    @property
    def best_path(self):
        return os.path.join(self.out_dir, "best.pth")

    def state(self, stats: Optional[EvalStats] = None) -> dict:
        state = {
            "state_dict": self.model.state_dict(),
            "config": self.cfg.dump(),
            "dataset": self.cfg.DATASET.DATASET,
            "num_classes": self.cfg.MODEL.NUM_CLASSES,
            "noise": float(self.cfg.TRAIN.NOISE),
            "epoch": self.epoch,
            "train_step": self.train_step,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": get_rng_state(),
            "best_acc": self.best_acc,
            "eval": vars(stats) if stats else None,
        }
        if self.attacker is not None:  # SmoothAdv settings and the radius of the last epoch trained
            state["attack"] = dict(self.attacker.as_dict(), epsilon_last_epoch=self.attacker.epsilon_at(self.epoch - 1))
        return state

    def resume(self, path: Optional[str] = None) -> None:
        """Continue from ``path`` (default: the run folder's last.pth); one-line errors for anything
        that is not a training checkpoint of this run (missing, a folder, garbage, a bare state_dict)."""
        flag = "--resume" if path is None else "--resume-from"
        path = path or self.last_path
        if not os.path.exists(path):
            raise UserError(f"{flag}: no checkpoint at {path}; start without {flag} or pass --resume-from CKPT")
        ckpt = load_checkpoint(path, map_location=self.device)
        missing = [k for k in ("state_dict", "optimizer", "scheduler", "epoch", "train_step", "rng") if k not in ckpt]
        if missing:
            raise UserError(f"{flag}: {path} is not a training checkpoint of DEQ/tools/cls_train.py (no {missing[0]} "
                            f"entry); resume from a last.pth or best.pth it wrote")
        try:
            noise = float(ckpt.get("noise", -1))
        except (TypeError, ValueError):
            noise = float("nan")
        if noise != float(self.cfg.TRAIN.NOISE):
            raise UserError(f"{flag}: {path} was trained with noise {ckpt.get('noise')} but this run asks for "
                            f"{self.cfg.TRAIN.NOISE}; use the same --noise")
        load_state_dict(self.model, ckpt["state_dict"], source=f"checkpoint {path}")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.epoch, self.train_step = int(ckpt["epoch"]), int(ckpt["train_step"])
            set_rng_state(ckpt["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise UserError(f"{flag}: the optimiser/scheduler state in {path} does not fit this run "
                            f"({type(exc).__name__}); use the config it was trained with") from None
        self.best_acc = ckpt.get("best_acc", -1.0)
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.train_step)

    # --------------------------------------------------------------- the loop
    def train_epoch(self) -> dict:
        cfg, dev = self.cfg, self.device
        self.model.train()
        self.train_loader.generator.manual_seed(cfg.SEED * 100003 + self.epoch)  # replayable order
        n = correct = 0
        loss_sum = 0.0
        jac_sum, jac_n = 0.0, 0
        bar = tqdm(self.train_loader, total=self.steps_per_epoch, disable=not self.show_progress,
                   desc=f"epoch {self.epoch + 1}/{cfg.TRAIN.END_EPOCH}", leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(bar):
            if i >= self.steps_per_epoch:
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            loss, jac, c, rows = train_step_fn(self.model, self.optimizer, self.scheduler, self.scaler, cfg, x, y,
                                               self.epoch, self.train_step, dev, attacker=self.attacker)
            if not math.isfinite(loss):
                raise RuntimeError(f"training diverged at step {self.train_step} (loss {loss}); lower TRAIN.LR or set TRAIN.CLIP")
            n += rows
            correct += c
            loss_sum += loss * rows
            if jac is not None:
                jac_sum, jac_n = jac_sum + jac, jac_n + 1
            if self.writer:
                self.writer.add_scalar("train/loss", loss, self.train_step)
                self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], self.train_step)
                if jac is not None:
                    self.writer.add_scalar("train/jac_loss", jac, self.train_step)
                if self.attacker is not None:
                    self.writer.add_scalar("train/attack_epsilon", self.attacker.epsilon_at(self.epoch), self.train_step)
            self.train_step += 1
            if cfg.PRINT_FREQ and self.train_step % cfg.PRINT_FREQ == 0:
                log.info("epoch %d step %d (%d/%d)  loss %.4f  train acc %.2f  lr %.3g", self.epoch + 1, self.train_step,
                         i + 1, self.steps_per_epoch, loss_sum / n, 100.0 * correct / n,
                         self.optimizer.param_groups[0]["lr"])
            phase = {"phase": "pre" if self.train_step <= cfg.TRAIN.PRETRAIN_STEPS else "deq"} if self.is_deq else {}
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", acc=f"{100.0 * correct / n:.1f}", **phase)
        if cfg.TRAIN.LR_SCHEDULER == "step":
            self.scheduler.step()
        return {"loss": loss_sum / max(n, 1), "acc": 100.0 * correct / max(n, 1),
                "jac_loss": jac_sum / jac_n if jac_n else float("nan")}

    def fit(self, end_epoch: Optional[int] = None) -> EvalStats:
        """Train to END_EPOCH (or ``end_epoch``), evaluating and checkpointing every epoch."""
        from torch.utils.tensorboard import SummaryWriter

        end = end_epoch if end_epoch is not None else self.cfg.TRAIN.END_EPOCH
        self.writer = SummaryWriter(os.path.join(self.out_dir, "tb"))
        stats = None
        try:
            while self.epoch < end:
                t0 = time.time()
                tr = self.train_epoch()
                stats = evaluate(self.model, self.test_loader, self.cfg.TRAIN.NOISE, self.device)
                self.epoch += 1
                for k, v in vars(stats).items():
                    self.writer.add_scalar(f"test/{k}", v, self.epoch)
                score = stats.noisy_acc if self.cfg.TRAIN.NOISE > 0 else stats.clean_acc
                is_best = score > self.best_acc
                self.best_acc = max(self.best_acc, score)
                state = self.state(stats)
                save_checkpoint(state, self.last_path)
                if is_best:
                    save_checkpoint(state, self.best_path)
                jac, solver = "", ""
                if self.is_deq:  # a ResNet has no Jacobian term and no solver
                    jac = f"  jac {tr['jac_loss']:.4f}"
                    solver = f"  steps {stats.mean_steps:.2f}  residual {stats.mean_residual:.2e}  nfe {stats.nfe:.1f}"
                log.info("epoch %d/%d  loss %.4f  train acc %.2f%s | test clean %.2f  noisy(%.2f) %.2f%s | %.1fs%s",
                         self.epoch, end, tr["loss"], tr["acc"], jac, stats.clean_acc,
                         self.cfg.TRAIN.NOISE, stats.noisy_acc, solver, time.time() - t0, "  *best" if is_best else "")
                if self.attacker is not None:
                    log.info("  SmoothAdv %s: epsilon %.4g (of %.4g), %d steps, m %d", self.attacker.attack,
                             self.attacker.epsilon_at(self.epoch - 1), self.attacker.epsilon,
                             self.attacker.num_steps, self.attacker.num_noise_vec)
        finally:
            self.writer.close()
        return stats


def setup_logging(out_dir: str, quiet: bool = False) -> None:
    """Log to ``out_dir/train.log`` (appended) and, unless quiet, the console.  Called once the run
    can start (data and model built), so a refused or failed start leaves no log behind."""
    os.makedirs(out_dir, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("deq")
    root.setLevel(logging.INFO)
    root.handlers.clear()
    fh = logging.FileHandler(os.path.join(out_dir, "train.log"))
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if not quiet:
        sh = logging.StreamHandler()
        sh.setFormatter(fmt)
        root.addHandler(sh)


def close_logging() -> None:
    root = logging.getLogger("deq")
    for h in list(root.handlers):
        h.close()
        root.removeHandler(h)


# --------------------------------------------------------------------------- the training command
RUN_FILES = ("last.pth", "best.pth")


def check_run_folder(out: str, resume: bool, resume_from: Optional[str], overwrite: bool) -> None:
    """Refuse, before any work, a run that would destroy or mix up the checkpoints already in ``out``."""
    if resume and resume_from:
        raise UserError("give --resume (continue the run folder's last.pth) or --resume-from CKPT, not both")
    if overwrite and resume:
        raise UserError("--overwrite deletes the run folder's checkpoints and --resume continues them: give one of them")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a run folder; choose another --out")
    check_writable_dir(out, "--out")
    held = [f for f in RUN_FILES if os.path.isfile(os.path.join(out, f))]
    if resume and "last.pth" not in held:
        raise UserError(f"--resume: no checkpoint at {os.path.join(out, 'last.pth')}; start without --resume "
                        f"or pass --resume-from CKPT")
    if resume_from:
        check_input_file(resume_from, "--resume-from checkpoint", "pass a last.pth or best.pth of DEQ/tools/cls_train.py",
                         inside="last.pth")
    if not held or resume or overwrite:
        return
    if resume_from and any(os.path.samefile(resume_from, os.path.join(out, f)) for f in held
                           if os.path.exists(resume_from)):
        return  # continuing this folder's own checkpoint
    raise UserError(f"run folder {out} already holds {' and '.join(held)}: pass --resume to continue it, "
                    f"--overwrite to replace it, or choose another --out")


def _snapshot(out: str):
    """(topmost folder this run will create or None, the entries ``out`` holds now)."""
    top, probe = None, os.path.abspath(out)
    while not os.path.exists(probe):
        top, probe = probe, os.path.dirname(probe)
    return top, (set(os.listdir(out)) if os.path.isdir(out) else set())


def _undo_failed_start(out: str, top: Optional[str], before: set) -> None:
    """After a failure with no checkpoint written: remove what this run created (log, tb/, the folders)."""
    if not os.path.isdir(out) or any(os.path.isfile(os.path.join(out, f)) for f in RUN_FILES):
        return
    close_logging()
    for name in set(os.listdir(out)) - before:
        full = os.path.join(out, name)
        shutil.rmtree(full, ignore_errors=True) if os.path.isdir(full) else os.remove(full)
    if top is not None:
        folder = os.path.abspath(out)
        while True:
            try:
                os.rmdir(folder)
            except OSError:
                break
            if folder == top:
                break
            folder = os.path.dirname(folder)


@dataclass
class TrainOutcome:
    """What :func:`train` did: the final evaluation (None if the run was already finished), the run
    folder and its last checkpoint."""
    stats: Optional[EvalStats]
    out: str
    last_path: str


def train_main(args) -> Optional[EvalStats]:
    """The whole of ``DEQ/tools/cls_train.py``: :func:`train` with the parsed flags."""
    return train(args.cfg, args.noise, args.opts, out=args.out, data_dir=args.data_dir, resume=args.resume,
                 resume_from=args.resume_from, overwrite=args.overwrite, device=args.device, threads=args.threads,
                 quiet=args.quiet).stats


def train(cfg_path: str, noise: Optional[float] = None, opts: Sequence[str] = (), out: Optional[str] = None,
          data_dir: Optional[str] = None, resume: bool = False, resume_from: Optional[str] = None,
          overwrite: bool = False, device: str = "auto", threads: Optional[int] = None,
          quiet: bool = False, progress: Optional[bool] = None) -> TrainOutcome:
    """Check everything, then train (or continue) one run; the training CLI and ``scripts/reproduce.py``.

    Args:
        cfg_path: yacs yaml; ``opts`` KEY VALUE overrides; ``noise`` overrides TRAIN.NOISE.
        out: run folder (default OUTPUT_DIR/<dataset>/<cfg>_noise<sigma>).
        resume, resume_from, overwrite: continue the folder's last.pth / another checkpoint, or start again
            (a folder holding checkpoints is never overwritten silently).
        device, threads, quiet: as the CLI flags.
        progress: show progress bars (default: not quiet).

    Returns:
        :class:`TrainOutcome`.
    """
    from .config import load_config

    threads = set_threads(threads)
    cfg = load_config(cfg_path, list(opts), noise=noise)
    device = pick_device(device)
    out = out or os.path.join(cfg.OUTPUT_DIR, cfg.DATASET.DATASET, run_name(cfg_path, cfg.TRAIN.NOISE))
    check_run_folder(out, resume, resume_from, overwrite)
    top, before = _snapshot(out)
    try:
        trainer = Trainer(cfg, device, out, data_dir=data_dir, show_progress=not quiet if progress is None else progress)
        setup_logging(out, quiet=quiet)
        stale = remove_stale_temporaries(out)
        if stale:
            log.info("removed %d unfinished checkpoint write(s) of an interrupted run: %s", len(stale), ", ".join(stale))
        if resume or resume_from:
            trainer.resume(resume_from)
        if overwrite:
            for name in RUN_FILES:
                if os.path.isfile(os.path.join(out, name)):
                    os.remove(os.path.join(out, name))
                    log.info("--overwrite: deleted the previous run's %s", name)
        log.info("run folder %s | model %s | device %s | %d CPU threads | noise %.3g | %d parameters", out,
                 cfg.MODEL.NAME, device, threads, cfg.TRAIN.NOISE, sum(p.numel() for p in trainer.model.parameters()))
        if trainer.pretrained_sha256 and not (resume or resume_from):
            log.info("initial weights from MODEL.PRETRAINED %s (sha256 %s)", cfg.MODEL.PRETRAINED, trainer.pretrained_sha256)
        if trainer.attacker is not None:
            a = trainer.attacker
            log.info("SmoothAdv training: %s, epsilon %.4g (warm-up %d epochs), %d steps, m %d, %s, %s, %s", a.attack,
                     a.epsilon, a.warm_up, a.num_steps, a.num_noise_vec,
                     "train on all m copies" if a.train_multi_noise else "train on one copy",
                     "gradient-free direction" if a.no_grad else f"gradients: {cfg.DEQ.GRAD}",
                     "random start" if a.random_start else "start at x")
        try:
            stats = trainer.fit()
        except Exception as exc:
            if is_out_of_memory(exc):
                raise UserError(f"out of memory on {device} with batches of {cfg.TRAIN.BATCH_SIZE_PER_GPU}: lower "
                                f"TRAIN.BATCH_SIZE_PER_GPU (checkpoints so far are kept; continue with --resume)") from None
            raise
    except BaseException:
        _undo_failed_start(out, top, before)
        raise
    if stats is not None:
        log.info("done: clean %.2f%%  noisy %.2f%%  last checkpoint %s  best %s",
                 stats.clean_acc, stats.noisy_acc, trainer.last_path, trainer.best_path)
    else:
        log.info("nothing to do: the run already reached TRAIN.END_EPOCH=%d (%s)", cfg.TRAIN.END_EPOCH, trainer.last_path)
    close_logging()
    return TrainOutcome(stats, out, trainer.last_path)
