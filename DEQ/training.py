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

Many processes (``torchrun --nproc_per_node G DEQ/tools/cls_train.py ...``; :mod:`DEQ.distributed`):
DistributedDataParallel over WORLD_SIZE ranks, each with TRAIN.BATCH_SIZE_PER_GPU rows of every
global batch (global batch = WORLD_SIZE x BATCH_SIZE_PER_GPU).

* Data: the global batches of epoch e are the batches a one-process run with the global batch size
  draws (same seeded order, :class:`DEQ.distributed.ShardedBatchSampler`), each rank taking a
  contiguous slice; a last global batch with fewer images than ranks is skipped.
* Gradients: the training forward (``forward_train``: unrolled pretraining, fixed point with the
  implicit-gradient hook or the phantom gradient, Jacobian term) runs inside
  ``DistributedDataParallel.forward`` through :class:`TrainForward`, so the ranks' gradients,
  adjoint solves and Jacobian term included, are averaged by DDP's all-reduce.  Every parameter
  gets a gradient in both phases, so ``find_unused_parameters`` stays off.  BatchNorm normalises
  by each rank's own rows (no SyncBatchNorm, as MDEQ's DataParallel); DDP copies rank 0's running
  statistics to all ranks at every forward and again after each epoch.
* Random draws: the Jacobian-loss coin and the threshold jitter come from a generator seeded
  identically on every rank (so all ranks run the same graph); the noise, dropout masks, Hutchinson
  vectors and attack starts come from torch's generator seeded per rank (``derived_seed(SEED,
  "rank", r)``): each rank draws the noise of its own rows, reproducibly.
* Evaluation is sharded: test batch b (as a one-process run forms them, with the noise it draws
  for them) is evaluated by rank b mod WORLD_SIZE and the counts are all-reduced, so the figures
  equal a one-process evaluation of the same model.
* Rank 0 alone writes train.log, tensorboard and the checkpoints (the bare model's state_dict: it
  loads without DDP); epoch lines sum every rank's rows, step lines (PRINT_FREQ) and the per-step
  tensorboard loss are rank 0's rows.  A checkpoint also holds every rank's generator states.  ``--resume`` with the
  same world size restores each rank's states (the run continues as if uninterrupted); with another
  world size (or from a one-process checkpoint) rank r reseeds from (SEED, r, epoch), the shared draw
  generator continues, and the cosine schedule is re-laid over the new steps per epoch.  A
  one-process ``--resume`` of a torchrun checkpoint continues rank 0's generator.
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
from .checks import check_choice, check_input_file, check_number, check_writable_dir
from .data import dataset_info, get_dataset, make_loader
from .acceleration import COMPILE_CHOICES, compile_report, resolve_runtime, static_rows
from .distributed import (DEFAULT_TIMEOUT_MINUTES, RoundRobinBatches, ShardedBatchSampler, World, derived_seed,
                          rank_rng_state, set_rank_rng_state)
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


class TrainForward(torch.nn.Module):
    """The training forward as a module's ``forward``: DistributedDataParallel averages the gradients
    of what runs inside ``DDP.forward`` only, and a DEQ trains through ``forward_train`` (pretraining
    unroll, fixed point with the implicit-gradient hook or phantom gradient, Jacobian term).

    Args:
        model: the classifier (DEQ or plain).
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, train_step: int, compute_jac_loss: bool, f_thres: int):
        """Args: the batch and ``forward_train``'s settings.  Returns: (logits, Jacobian loss; None for a plain classifier)."""
        if is_deq(self.model):
            out = self.model.forward_train(x, train_step=train_step, compute_jac_loss=compute_jac_loss, f_thres=f_thres)
            return out.logits, out.jac_loss
        return self.model(x), None  # a plain classifier (ResNet): no fixed point, no Jacobian term


def train_step_fn(model, optimizer, scheduler, scaler, cfg, x, y, epoch: int, train_step: int, device,
                  attacker: Optional[SmoothAdvAttack] = None, forward: Optional[torch.nn.Module] = None,
                  draws: Optional[torch.Generator] = None, loss_weight: float = 1.0):
    """One optimiser step on a noisy (with ``attacker``: SmoothAdv-perturbed) batch.

    Args:
        model: the bare model (the attack and the optimiser's parameters).
        optimizer, scheduler, scaler: the run's optimisation state (``scaler`` None without AMP).
        cfg: the run's config.
        x, y: this process's rows of the batch, on ``device``.
        epoch, train_step: position in the run (Jacobian schedule, pretraining, attack warm-up).
        device: where the batch is.
        attacker: SmoothAdv's attack, or None for Gaussian training.
        forward: the module the training forward runs through: :class:`TrainForward` of ``model``
            (the default) or that wrapped in DistributedDataParallel.
        draws: generator of the Jacobian-loss coin and the threshold jitter (None: torch's global
            generator, as a one-process run draws them; under torchrun one seeded alike on every rank).
        loss_weight: factor on the loss (unevenly split last global batch under torchrun; else 1).

    Returns:
        tuple: (loss, jac_loss or None, correct count, rows trained on), for this process's rows.
    """
    noise = cfg.TRAIN.NOISE
    if attacker is not None:
        x, y = smoothadv_batch(model, attacker, cfg, x, y, epoch, train_step)
    elif noise > 0:
        x = x + torch.randn_like(x) * noise
    deq = is_deq(model)
    factor = jac_factor(cfg, train_step, epoch) if deq else 0.0
    compute_jac = factor > 0 and torch.rand((), generator=draws).item() < cfg.LOSS.JAC_LOSS_FREQ
    delta = cfg.DEQ.RAND_F_THRES_DELTA
    f_thres = cfg.DEQ.F_THRES + (torch.randint(-delta, 2, (), generator=draws).item() if (delta > 0 and compute_jac) else 0)
    f_thres = max(1, f_thres)
    amp = scaler is not None
    with torch.autocast(device_type=device.type, enabled=amp):
        logits, jac_loss = (forward if forward is not None else TrainForward(model))(x, train_step, compute_jac, f_thres)
        loss = F.cross_entropy(logits.float(), y)
        total = loss + factor * jac_loss if compute_jac else loss
        if loss_weight != 1.0:
            total = total * loss_weight
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
def evaluate(model, loader, noise: float, device, seed: int = 1234, solver=None, max_iter=None,
             world: Optional[World] = None) -> EvalStats:
    """Clean accuracy and accuracy under N(0, noise^2) with the standard solver from zeros.
    The evaluation noise comes from its own seeded generator: figures are comparable across epochs.
    A plain classifier (no ``.solve``) is just run; its solver statistics are nan.

    Args:
        model: the (bare) model.
        loader: the test loader; under torchrun one built on :class:`DEQ.distributed.RoundRobinBatches`.
        noise: std of the evaluation noise (0: the noisy accuracy is the clean one).
        device: where the model is.
        seed: seed of the noise generator.
        solver, max_iter: the solve (default: the model's).
        world: under torchrun, each rank evaluates its batches, skipping the noise draws of the
            others' batches so every batch gets the noise a one-process run gives it, and the counts
            are all-reduced: every rank returns the one-process figures.

    Returns:
        EvalStats
    """
    model.eval()
    deq = is_deq(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    plan = loader.batch_sampler if world is not None and world.distributed else None
    if plan is not None and not isinstance(plan, RoundRobinBatches):
        raise ValueError("a sharded evaluation needs a loader built on DEQ.distributed.RoundRobinBatches")
    n = clean = noisy = 0
    steps = resid = nfe = 0.0 if deq else float("nan")
    drawn = 0  # under torchrun: global batches whose noise was drawn (or skipped) so far
    for k, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if plan is not None and noise > 0:
            for other in range(drawn, plan.mine[k]):  # another rank's batch: same draws, thrown away
                torch.randn((plan.sizes[other], *x.shape[1:]), generator=gen, device=device)
            drawn = plan.mine[k] + 1
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
    if plan is not None:
        n, clean, noisy, steps, resid, nfe = world.sum([n, clean, noisy, steps, resid, nfe])
    return EvalStats(100.0 * clean / n, 100.0 * noisy / n, steps / n, resid / n, nfe / n)


def run_name(cfg_path: Optional[str], noise: float) -> str:
    stem = os.path.splitext(os.path.basename(cfg_path or "default"))[0]
    return f"{stem}_noise{noise:g}"


class Trainer:
    """Owns the model, data, optimisation state and logs of one training run.

    Args:
        cfg: the validated config.
        device: this process's device.
        out_dir: the run folder.
        data_dir: data root (CIFAR-10 / ImageNet).
        show_progress: progress bars (rank 0's only under torchrun).
        world: under torchrun, the started :class:`DEQ.distributed.World` (DDP training); None or a
            one-process world: the one-process run.
    """

    def __init__(self, cfg, device, out_dir: str, data_dir: Optional[str] = None, show_progress: bool = True,
                 world: Optional[World] = None):
        self.cfg, self.device, self.out_dir = cfg, device, out_dir
        self.world = world if world is not None else World()
        self.show_progress = show_progress and self.world.is_main
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
        if self.world.distributed:
            self._distributed_loaders()
        else:
            self.train_sampler = None
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
        self.forward = TrainForward(self.model)  # what train_step_fn runs the training forward through
        self.draws: Optional[torch.Generator] = None  # Jacobian coin / jitter (None: torch's global generator)
        self.rng_note = ""  # how --resume restored the random streams (for the log)
        if self.world.distributed:
            from torch.nn.parallel import DistributedDataParallel
            # Construction copies rank 0's weights and buffers to every rank (they are equal already:
            # every rank built the model from set_seed(SEED)).  Every parameter gets a gradient in the
            # pretraining and in the DEQ phase, so no unused-parameter search is needed.
            # DDP's default buffer broadcast at every forward keeps BatchNorm's running statistics rank 0's.
            self.forward = DistributedDataParallel(self.forward, device_ids=[device.index] if device.type == "cuda" else None,
                                                   find_unused_parameters=False)
            self.draws = torch.Generator().manual_seed(derived_seed(cfg.SEED, "draws"))
            torch.manual_seed(derived_seed(cfg.SEED, "rank", self.world.rank))  # this rank's noise, dropout, ...
        os.makedirs(out_dir, exist_ok=True)  # only once the data and model are there: a failed start writes nothing

    def _distributed_loaders(self) -> None:
        """This rank's training batches (:class:`ShardedBatchSampler`: slices of the global batches, in
        the one-process order of the global batch size) and test batches (:class:`RoundRobinBatches`)."""
        cfg, world = self.cfg, self.world
        bs, n = cfg.TRAIN.BATCH_SIZE_PER_GPU, len(self.train_set)
        self.train_sampler = ShardedBatchSampler(n, bs, world.rank, world.size, cfg.TRAIN.SHUFFLE, cfg.SEED * 100003)
        if len(self.train_sampler) == 0:
            raise UserError(f"the training set has {n} images, fewer than the {world.size} processes: start fewer "
                            f"processes (torchrun --nproc_per_node)")
        self.train_loader = make_loader(self.train_set, bs, False, cfg.WORKERS, self.device, cfg.SEED,
                                        pin_memory=cfg.PIN_MEMORY, batch_sampler=self.train_sampler)
        tests = RoundRobinBatches(len(self.test_set), cfg.TEST.BATCH_SIZE_PER_GPU, world.rank, world.size)
        self.test_loader = make_loader(self.test_set, cfg.TEST.BATCH_SIZE_PER_GPU, False, cfg.WORKERS, self.device,
                                       pin_memory=cfg.PIN_MEMORY, batch_sampler=tests)
        self.steps_per_epoch = min(math.ceil(n * cfg.PERCENT / self.train_sampler.global_batch), len(self.train_sampler))

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
            "world_size": self.world.size,
            "steps_per_epoch": self.steps_per_epoch,
        }
        if self.world.distributed:  # a collective: every rank builds the state, rank 0 writes it
            state["rng_ranks"] = self.world.gather(rank_rng_state(self.device))
            state["rng_draws"] = self.draws.get_state()
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
        if isinstance(ckpt.get("config"), str):
            from .config import check_resume_config, config_from_text
            stored = config_from_text(ckpt["config"], f"the config stored in {path}")
            check_resume_config(stored, self.cfg, flag, path)
        load_state_dict(self.model, ckpt["state_dict"], source=f"checkpoint {path}")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
            self.epoch, self.train_step = int(ckpt["epoch"]), int(ckpt["train_step"])
            if self.world.distributed:
                self._restore_rank_streams(ckpt)
            else:
                set_rng_state(ckpt["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise UserError(f"{flag}: the optimiser/scheduler state in {path} does not fit this run "
                            f"({type(exc).__name__}); use the config it was trained with") from None
        self.best_acc = ckpt.get("best_acc", -1.0)
        self._relay_schedule(ckpt)
        log.info("resumed from %s at epoch %d (step %d)%s", path, self.epoch, self.train_step, self.rng_note)

    def _restore_rank_streams(self, ckpt: dict) -> None:
        """Under torchrun: each rank's generator states from a checkpoint of the same world size, else
        rank r reseeds from (SEED, r, epoch); the shared draw generator continues where it was."""
        world, seed = self.world, self.cfg.SEED
        saved = ckpt.get("rng_ranks")
        if isinstance(saved, list) and int(ckpt.get("world_size", 1)) == world.size == len(saved):
            set_rank_rng_state(saved[world.rank], self.device)
            self.rng_note = f"; every rank's random streams restored ({world.size} processes, as saved)"
        else:
            torch.manual_seed(derived_seed(seed, "rank", world.rank, "epoch", self.epoch))
            self.rng_note = (f"; saved by {ckpt.get('world_size', 1)} process(es), continued by {world.size}: "
                             f"rank r's random stream reseeded from (SEED, r, epoch {self.epoch})")
        if ckpt.get("rng_draws") is not None:
            self.draws.set_state(ckpt["rng_draws"].cpu())
        else:
            self.draws.manual_seed(derived_seed(seed, "draws", "epoch", self.epoch))

    def _relay_schedule(self, ckpt: dict) -> None:
        """Re-lay the cosine schedule over the run as now planned when the checkpoint's plan differs: other
        steps per epoch (another world size, PERCENT or batch size) or another TRAIN.END_EPOCH.  Position and
        length in steps follow the epochs, so the learning rate is the one the epoch count calls for in a
        run planned from TRAIN.BEGIN_EPOCH to the new TRAIN.END_EPOCH (raised: the decay is stretched to the
        new end instead of the old schedule's cosine climbing again past its own end)."""
        if self.cfg.TRAIN.LR_SCHEDULER == "step":
            return  # milestones in epochs: a later end only adds epochs at the last factor
        saved = ckpt.get("steps_per_epoch")
        same_steps = saved == self.steps_per_epoch or (saved is None and int(ckpt.get("world_size", 1)) == self.world.size)
        t, sched = self.cfg.TRAIN, self.scheduler
        total = max(1, self.steps_per_epoch * (t.END_EPOCH - t.BEGIN_EPOCH))
        if same_steps and sched.T_max == total:
            return
        old_total = sched.T_max
        pos = min(total, self.steps_per_epoch * max(0, self.epoch - t.BEGIN_EPOCH))
        lrs = [sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * pos / total)) / 2
               for base in sched.base_lrs]
        sched.T_max, sched.last_epoch, sched._last_lr = total, pos, lrs
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        if not same_steps:
            log.info("cosine schedule laid over %d steps per epoch (the checkpoint's run had %s): step %d of %d, lr %.3g",
                     self.steps_per_epoch, saved if saved is not None else "another number", pos, total, lrs[0])
        else:
            log.info("cosine schedule re-laid to end at TRAIN.END_EPOCH %d (%d steps; the checkpoint's run planned %d): "
                     "step %d of %d, lr %.3g", t.END_EPOCH, total, old_total, pos, total, lrs[0])

    # --------------------------------------------------------------- the loop
    def set_runtime(self, compile: str = "off") -> None:
        """Solve through the compiled f of ``DEQ.acceleration`` (fp32): the evaluation passes and the
        training steps' no-gradient fixed-point solves (``cls_train.py --compile``).

        * Evaluation (``evaluate``'s ``model.solve``): stem, f and head compiled, rows padded to the full
          and the last test batch.
        * Training (``forward_train``, ``MDEQClsNet.set_runtime(runtime, train=True)``): the no-gradient
          fixed-point solve, most of a DEQ step's f evaluations, evaluates f through the same compiled
          ``f_flat``, the rows as they come (the dropout masks have the batch dimension, so no padding;
          each row count compiles once, at its first DEQ step, after pretraining) and under the run's
          AMP autocast on CUDA as the eager f would be.  Everything with a gradient stays eager: the
          differentiable f(z*), the Jacobian term, the implicit backward and the unrolled pretraining
          (a compiled backward, called repeatedly with ``retain_graph`` by the implicit-backward hook,
          is not worth its compile time).  The fresh dropout masks and weight-normalised weights of
          every step are graph inputs: no recompiles per step.

        Nothing of it is saved in checkpoints: a run may be resumed with another ``--compile``.

        Args:
            compile: 'auto' (on for CUDA), 'on', 'off'.
        """
        rows = static_rows(self.cfg.TEST.BATCH_SIZE_PER_GPU, len(self.test_set))  # full and last test batch
        runtime = resolve_runtime(compile, "fp32", self.device, pad_rows=rows)
        if self.is_deq and hasattr(self.model, "set_runtime"):
            self.model.set_runtime(runtime, train=True)
        elif runtime.compile:
            log.info("--compile: %s is not a DEQ; its training and evaluation stay eager", self.cfg.MODEL.NAME)

    def train_epoch(self) -> dict:
        cfg, dev = self.cfg, self.device
        self.model.train()
        if self.train_sampler is not None:  # torchrun: the global batches of this epoch, seeded alike
            self.train_sampler.set_epoch(self.epoch)
        else:
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
            weight = self.train_sampler.loss_weight(i) if self.train_sampler is not None else 1.0
            loss, jac, c, rows = train_step_fn(self.model, self.optimizer, self.scheduler, self.scaler, cfg, x, y,
                                               self.epoch, self.train_step, dev, attacker=self.attacker,
                                               forward=self.forward, draws=self.draws, loss_weight=weight)
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
        if self.world.distributed:  # the epoch's figures over every rank's rows
            n, correct, loss_sum, jac_sum, jac_n = self.world.sum([n, correct, loss_sum, jac_sum, jac_n])
        return {"loss": loss_sum / max(n, 1), "acc": 100.0 * correct / max(n, 1),
                "jac_loss": jac_sum / jac_n if jac_n else None}  # None: no step of the epoch drew the Jacobian term

    def fit(self, end_epoch: Optional[int] = None) -> EvalStats:
        """Train to END_EPOCH (or ``end_epoch``), evaluating and checkpointing every epoch."""
        from torch.utils.tensorboard import SummaryWriter

        end = end_epoch if end_epoch is not None else self.cfg.TRAIN.END_EPOCH
        self.writer = SummaryWriter(os.path.join(self.out_dir, "tb")) if self.world.is_main else None
        stats = None
        try:
            while self.epoch < end:
                t0 = time.time()
                tr = self.train_epoch()
                self.world.sync_buffers(self.model)  # rank 0's BatchNorm statistics everywhere (evaluation, checkpoint)
                stats = evaluate(self.model, self.test_loader, self.cfg.TRAIN.NOISE, self.device, world=self.world)
                note = compile_report(self.model)  # --compile: once, after the first evaluation compiled f
                if note:
                    log.info("evaluation: %s", note.replace("the first image's time", "the first epoch's time"))
                engine = getattr(self.model, "engine", None)
                note = engine.train_compile_report() if engine is not None else None
                if note:  # once, after the first epoch with DEQ steps (pretraining is eager)
                    log.info("training: %s", note)
                self.epoch += 1
                if self.writer:
                    for k, v in vars(stats).items():
                        self.writer.add_scalar(f"test/{k}", v, self.epoch)
                score = stats.noisy_acc if self.cfg.TRAIN.NOISE > 0 else stats.clean_acc
                is_best = score > self.best_acc
                self.best_acc = max(self.best_acc, score)
                state = self.state(stats)
                self.world.on_rank0(lambda: self._save(state, is_best))  # the others wait for the write
                jac, solver = "", ""
                if self.is_deq:  # a ResNet has no Jacobian term and no solver
                    jac = "  jac -" if tr["jac_loss"] is None else f"  jac {tr['jac_loss']:.4f}"
                    solver = f"  steps {stats.mean_steps:.2f}  residual {stats.mean_residual:.2e}  nfe {stats.nfe:.1f}"
                log.info("epoch %d/%d  loss %.4f  train acc %.2f%s | test clean %.2f  noisy(%.2f) %.2f%s | %.1fs%s",
                         self.epoch, end, tr["loss"], tr["acc"], jac, stats.clean_acc,
                         self.cfg.TRAIN.NOISE, stats.noisy_acc, solver, time.time() - t0, "  *best" if is_best else "")
                if self.attacker is not None:
                    log.info("  SmoothAdv %s: epsilon %.4g (of %.4g), %d steps, m %d", self.attacker.attack,
                             self.attacker.epsilon_at(self.epoch - 1), self.attacker.epsilon,
                             self.attacker.num_steps, self.attacker.num_noise_vec)
        finally:
            if self.writer:
                self.writer.close()
        return stats

    def _save(self, state: dict, is_best: bool) -> None:
        save_checkpoint(state, self.last_path)
        if is_best:
            save_checkpoint(state, self.best_path)


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


class _HeldLog(logging.Handler):
    """Holds the ``deq`` log records of a block run before the log file may be created; ``replay`` hands
    them to the handlers set up afterwards."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> "_HeldLog":
        root = logging.getLogger("deq")
        self._saved = root.level, list(root.handlers)
        root.handlers[:] = [self]
        root.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        root = logging.getLogger("deq")
        root.setLevel(self._saved[0])
        root.handlers[:] = self._saved[1]

    def replay(self) -> None:
        root = logging.getLogger("deq")
        for record in self.records:
            root.handle(record)


def silence_logging() -> None:
    """Under torchrun, ranks other than 0 write no log (warnings still reach stderr)."""
    root = logging.getLogger("deq")
    root.handlers.clear()
    root.addHandler(logging.NullHandler())
    root.setLevel(logging.WARNING)


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
                 quiet=args.quiet, dist_timeout=args.dist_timeout, compile=args.compile).stats


def train(cfg_path: str, noise: Optional[float] = None, opts: Sequence[str] = (), out: Optional[str] = None,
          data_dir: Optional[str] = None, resume: bool = False, resume_from: Optional[str] = None,
          overwrite: bool = False, device: str = "auto", threads: Optional[int] = None,
          quiet: bool = False, progress: Optional[bool] = None,
          dist_timeout: float = DEFAULT_TIMEOUT_MINUTES, compile: str = "auto") -> TrainOutcome:
    """Check everything, then train (or continue) one run; the training CLI and ``scripts/reproduce.py``.

    Under torchrun (RANK / WORLD_SIZE in the environment) every process calls this: DistributedDataParallel
    over the ranks (see the module docstring); without torchrun, one process as always.

    Args:
        cfg_path: yacs yaml; ``opts`` KEY VALUE overrides; ``noise`` overrides TRAIN.NOISE.
        out: run folder (default OUTPUT_DIR/<dataset>/<cfg>_noise<sigma>); under torchrun on a file system
            every rank reads (``--resume``).
        compile: 'auto' (on for CUDA), 'on', 'off': the evaluation passes and the training steps'
            no-gradient fixed-point solves evaluate f through torch.compile (``Trainer.set_runtime``;
            gradients, the Jacobian term and pretraining stay eager).
        resume, resume_from, overwrite: continue the folder's last.pth / another checkpoint, or start again
            (a folder holding checkpoints is never overwritten silently).
        device, threads, quiet: as the CLI flags.
        progress: show progress bars (default: not quiet; rank 0 only).
        dist_timeout: under torchrun, minutes a rank waits in a collective for the others before it stops
            with an error (the process-group timeout).

    Returns:
        :class:`TrainOutcome` (every rank: the same figures).
    """
    from .config import load_config

    threads = set_threads(threads)
    check_number("--dist-timeout", dist_timeout, 0, strict=True, hint=" (minutes)")
    check_choice("--compile", compile, COMPILE_CHOICES)
    world = World.from_env()
    cfg = load_config(cfg_path, list(opts), noise=noise)
    device = world.pick_device(pick_device(device))
    out = out or os.path.join(cfg.OUTPUT_DIR, cfg.DATASET.DATASET, run_name(cfg_path, cfg.TRAIN.NOISE))
    world.start(device, dist_timeout)
    try:
        if world.distributed:
            _check_same_run(world, cfg, out, resume, resume_from, overwrite)
        return _train(world, cfg, out, data_dir, resume, resume_from, overwrite, device, threads, quiet, progress,
                      compile)
    finally:
        world.stop()


def _check_same_run(world: World, cfg, out: str, resume: bool, resume_from: Optional[str], overwrite: bool) -> None:
    """Refuse (the same line on every rank) ranks started with another config, run folder or resume flag
    than rank 0 (a multi-node launch types the command on every node)."""
    mine = {"run folder": os.path.abspath(out), "--resume": resume, "--resume-from": resume_from,
            "--overwrite": overwrite, "config": cfg.dump()}
    ranks = world.gather(mine)
    for rank, other in enumerate(ranks):
        for key, value in other.items():
            ref = ranks[0][key]
            if value != ref:
                if key == "config":
                    ref, value = next(((a.strip(), b.strip()) for a, b in zip(ref.splitlines(), value.splitlines())
                                       if a != b), ("?", "?"))
                raise UserError(f"rank {rank} was started with {key} {value!r}, rank 0 with {ref!r}: start every rank "
                                f"with the same command")


def _train(world: World, cfg, out: str, data_dir, resume, resume_from, overwrite, device, threads, quiet,
           progress, compile: str = "auto") -> TrainOutcome:
    """:func:`train` after the checks of its arguments (and, under torchrun, inside the process group)."""
    world.on_rank0(lambda: check_run_folder(out, resume, resume_from, overwrite))
    top, before = _snapshot(out)
    try:
        with _HeldLog() as held:  # refusals (a checkpoint that does not fit) come before the log file exists
            trainer = Trainer(cfg, device, out, data_dir=data_dir,
                              show_progress=not quiet if progress is None else progress, world=world)
            trainer.set_runtime(compile)
            if resume or resume_from:
                trainer.resume(resume_from)
        if world.is_main:
            setup_logging(out, quiet=quiet)
        else:
            silence_logging()
        held.replay()
        stale = world.on_rank0(lambda: remove_stale_temporaries(out))
        if stale:
            log.info("removed %d unfinished checkpoint write(s) of an interrupted run: %s", len(stale), ", ".join(stale))
        if overwrite:
            for name in world.on_rank0(lambda: _delete_run_files(out)):
                log.info("--overwrite: deleted the previous run's %s", name)
        log.info("run folder %s | model %s | device %s | %d CPU threads | noise %.3g | %d parameters", out,
                 cfg.MODEL.NAME, device, threads, cfg.TRAIN.NOISE, sum(p.numel() for p in trainer.model.parameters()))
        if world.distributed:
            log.info("torchrun: %d processes (%s), DistributedDataParallel; global batch %d = %d x %d per process, "
                     "%d steps per epoch", world.size, "nccl" if device.type == "cuda" else "gloo",
                     trainer.train_sampler.global_batch, world.size, cfg.TRAIN.BATCH_SIZE_PER_GPU, trainer.steps_per_epoch)
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
        if world.is_main:
            _undo_failed_start(out, top, before)
        raise
    if stats is not None:
        log.info("done: clean %.2f%%  noisy %.2f%%  last checkpoint %s  best %s",
                 stats.clean_acc, stats.noisy_acc, trainer.last_path, trainer.best_path)
    else:
        log.info("nothing to do: the run already reached TRAIN.END_EPOCH=%d (%s)", cfg.TRAIN.END_EPOCH, trainer.last_path)
    close_logging()
    return TrainOutcome(stats, out, trainer.last_path)


def _delete_run_files(out: str) -> list:
    """--overwrite: remove the run folder's checkpoints; return the names removed."""
    removed = []
    for name in RUN_FILES:
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
            removed.append(name)
    return removed
