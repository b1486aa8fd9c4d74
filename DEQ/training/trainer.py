"""The :class:`Trainer` of one run: data, model and optimisation state, the epoch loop, checkpoint state and
resume, per-rank random streams under torchrun, the cosine schedule's relay, and ``--compile``'s runtime.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Optional

import torch
from tqdm import tqdm

from ..acceleration import compile_report, resolve_runtime, static_rows
from ..checkpoint import load_checkpoint, load_pretrained, load_state_dict, save_checkpoint
from ..config import check_resume_config, config_from_text
from ..data import dataset_info, get_dataset, make_loader
from ..distributed import (RoundRobinBatches, ShardedBatchSampler, World, derived_seed, rank_rng_state,
                           set_rank_rng_state)
from ..errors import UserError
from ..models import build_model, is_trainable_deq
from ..utils import apply_cudnn_flags, get_rng_state, set_rng_state, set_seed
from .optim import build_optimizer, build_scheduler
from .step import EvalStats, TrainForward, evaluate, smoothadv_attacker, train_step_fn

log = logging.getLogger("deq.train")


class Trainer:
    """Owns the model, data, optimisation state and logs of one training run.  ``world``: under torchrun the
    started :class:`DEQ.distributed.World` (DDP training); None or one process: the one-process run."""

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
            raise UserError(f"MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES} but {ds} has {info.num_classes} classes: "
                            f"fix the config")
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
        self.is_deq = is_trainable_deq(self.model)
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
            ids = [device.index] if device.type == "cuda" else None
            self.forward = DistributedDataParallel(self.forward, device_ids=ids, find_unused_parameters=False)
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
        self.steps_per_epoch = min(math.ceil(n * cfg.PERCENT / self.train_sampler.global_batch),
                                   len(self.train_sampler))

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
        """Re-lay the cosine schedule when the checkpoint's plan differs (other steps per epoch or TRAIN.END_EPOCH): the
        learning rate is the one the epoch count calls for in a run planned from TRAIN.BEGIN_EPOCH to the new
        TRAIN.END_EPOCH (a raised end stretches the decay; the old cosine never climbs again past its end)."""
        if self.cfg.TRAIN.LR_SCHEDULER == "step":
            return  # milestones in epochs: a later end only adds epochs at the last factor
        saved = ckpt.get("steps_per_epoch")
        same_steps = (saved == self.steps_per_epoch
                      or (saved is None and int(ckpt.get("world_size", 1)) == self.world.size))
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
            log.info("cosine schedule laid over %d steps per epoch (the checkpoint's run had %s): step %d of %d, "
                     "lr %.3g", self.steps_per_epoch, saved if saved is not None else "another number", pos, total,
                     lrs[0])
        else:
            log.info("cosine schedule re-laid to end at TRAIN.END_EPOCH %d (%d steps; the checkpoint's run "
                     "planned %d): step %d of %d, lr %.3g", t.END_EPOCH, total, old_total, pos, total, lrs[0])

    # --------------------------------------------------------------- the loop
    def set_runtime(self, compile: str = "off") -> None:
        """Solve through the compiled fp32 f of ``DEQ.acceleration`` (``cls_train.py --compile``: 'auto' (on for CUDA),
        'on', 'off'): the evaluation passes (rows padded to the full and last test batch) and the training steps'
        no-gradient fixed-point solves; everything with a gradient stays eager (docs/certification.md, "Compiled and
        bf16 evaluation").  Nothing of it is saved in checkpoints: a run may resume with another ``--compile``."""
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
                raise RuntimeError(f"training diverged at step {self.train_step} (loss {loss}); lower TRAIN.LR or "
                                   f"set TRAIN.CLIP")
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
                    self.writer.add_scalar("train/attack_epsilon", self.attacker.epsilon_at(self.epoch),
                                           self.train_step)
            self.train_step += 1
            if cfg.PRINT_FREQ and self.train_step % cfg.PRINT_FREQ == 0:
                log.info("epoch %d step %d (%d/%d)  loss %.4f  train acc %.2f  lr %.3g", self.epoch + 1,
                         self.train_step, i + 1, self.steps_per_epoch, loss_sum / n, 100.0 * correct / n,
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
                t0 = time.perf_counter()
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
                         self.cfg.TRAIN.NOISE, stats.noisy_acc, solver, time.perf_counter() - t0,
                         "  *best" if is_best else "")
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
