"""The training command (``DEQ/tools/cls_train.py``): argument checks, the process group under torchrun,
the check that every rank runs the same command, and one run from the run-folder checks to the final log.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from ..acceleration import COMPILE_CHOICES
from ..checkpoint import remove_stale_temporaries
from ..checks import check_choice, check_number
from ..config import load_config
from ..distributed import DEFAULT_TIMEOUT_MINUTES, World, check_ranks_agree
from ..errors import UserError
from ..utils import is_out_of_memory, pick_device, set_threads
from .runs import (HeldLog, check_run_folder, close_logging, delete_run_files, run_name, setup_logging,
                   silence_logging, snapshot, undo_failed_start)
from .step import EvalStats
from .trainer import Trainer

log = logging.getLogger("deq.train")


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

    Under torchrun every process calls this (DDP over the ranks; every rank returns the same :class:`TrainOutcome`).
    ``out`` default: OUTPUT_DIR/<dataset>/<cfg>_noise<sigma>; ``compile``: as :meth:`Trainer.set_runtime`; ``resume``
    / ``resume_from`` / ``overwrite``: continue last.pth or another checkpoint, or start again (a folder with
    checkpoints is never overwritten silently); ``dist_timeout``: torchrun collective timeout in minutes."""
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
    def describe(rank: int, key: str, ref, value) -> str:
        if key == "config":  # the first line of the yaml dumps that differs
            ref, value = next(((a.strip(), b.strip()) for a, b in zip(ref.splitlines(), value.splitlines())
                               if a != b), ("?", "?"))
        return (f"rank {rank} was started with {key} {value!r}, rank 0 with {ref!r}: start every rank with the "
                f"same command")

    mine = {"run folder": os.path.abspath(out), "--resume": resume, "--resume-from": resume_from,
            "--overwrite": overwrite, "config": cfg.dump()}
    check_ranks_agree(world, mine, describe)


def _train(world: World, cfg, out: str, data_dir, resume, resume_from, overwrite, device, threads, quiet,
           progress, compile: str = "auto") -> TrainOutcome:
    """:func:`train` after the checks of its arguments (and, under torchrun, inside the process group)."""
    world.on_rank0(lambda: check_run_folder(out, resume, resume_from, overwrite))
    top, before = snapshot(out)
    try:
        with HeldLog() as held:  # refusals (a checkpoint that does not fit) come before the log file exists
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
            log.info("removed %d unfinished checkpoint write(s) of an interrupted run: %s", len(stale),
                     ", ".join(stale))
        if overwrite:
            for name in world.on_rank0(lambda: delete_run_files(out)):
                log.info("--overwrite: deleted the previous run's %s", name)
        log.info("run folder %s | model %s | device %s | %d CPU threads | noise %.3g | %d parameters", out,
                 cfg.MODEL.NAME, device, threads, cfg.TRAIN.NOISE, sum(p.numel() for p in trainer.model.parameters()))
        if world.distributed:
            log.info("torchrun: %d processes (%s), DistributedDataParallel; global batch %d = %d x %d per process, "
                     "%d steps per epoch", world.size, "nccl" if device.type == "cuda" else "gloo",
                     trainer.train_sampler.global_batch, world.size, cfg.TRAIN.BATCH_SIZE_PER_GPU,
                     trainer.steps_per_epoch)
        if trainer.pretrained_sha256 and not (resume or resume_from):
            log.info("initial weights from MODEL.PRETRAINED %s (sha256 %s)", cfg.MODEL.PRETRAINED,
                     trainer.pretrained_sha256)
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
                                f"TRAIN.BATCH_SIZE_PER_GPU (checkpoints so far are kept; continue with --resume)"
                                ) from None
            raise
    except BaseException:
        if world.is_main:
            undo_failed_start(out, top, before)
        raise
    if stats is not None:
        log.info("done: clean %.2f%%  noisy %.2f%%  last checkpoint %s  best %s",
                 stats.clean_acc, stats.noisy_acc, trainer.last_path, trainer.best_path)
    else:
        log.info("nothing to do: the run already reached TRAIN.END_EPOCH=%d (%s)", cfg.TRAIN.END_EPOCH,
                 trainer.last_path)
    close_logging()
    return TrainOutcome(stats, out, trainer.last_path)
