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
are skipped for them (``DEQ.models.is_trainable_deq``).

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

The package, one concern per module (everything below is importable from ``DEQ.training``):

* :mod:`DEQ.training.optim`: the optimiser and learning-rate scheduler factories;
* :mod:`DEQ.training.step`: one training step (noise, SmoothAdv, Jacobian term, update) and the evaluation;
* :mod:`DEQ.training.trainer`: :class:`Trainer` (epoch loop, checkpoint state, resume, per-rank random
  streams, schedule relay, ``--compile``);
* :mod:`DEQ.training.runs`: run folders (name, refusal, undo of a failed start, ``--overwrite``) and the log;
* :mod:`DEQ.training.main`: the training command, :func:`train` (``DEQ/tools/cls_train.py``).
"""
from .main import TrainOutcome, _check_same_run, train, train_main  # noqa: F401  (_check_same_run: tests)
from .optim import build_optimizer, build_scheduler
from .runs import RUN_FILES, check_run_folder, close_logging, run_name, setup_logging, silence_logging
from .step import (EvalStats, TrainForward, evaluate, jac_factor, smoothadv_attacker, smoothadv_batch,
                   train_step_fn)
from .trainer import Trainer

__all__ = ["EvalStats", "RUN_FILES", "TrainForward", "TrainOutcome", "Trainer", "build_optimizer",
           "build_scheduler", "check_run_folder", "close_logging", "evaluate", "jac_factor", "run_name",
           "setup_logging", "silence_logging", "smoothadv_attacker", "smoothadv_batch", "train", "train_main",
           "train_step_fn"]
