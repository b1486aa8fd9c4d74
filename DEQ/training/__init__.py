"""Noise-augmented MDEQ training with Jacobian regularisation (the MDEQ recipe), SmoothAdv optional.

One concern per module, all importable from ``DEQ.training``: :mod:`.optim` (optimiser, scheduler), :mod:`.step`
(one training step, evaluation), :mod:`.trainer` (:class:`Trainer`: epoch loop, checkpoints, resume, per-rank
streams), :mod:`.runs` (run folders, log), :mod:`.main` (:func:`train`, the command).  Guarantees: ``--resume``
replays the interrupted run exactly (atomic per-epoch checkpoints with every RNG state, shuffle seeded by
(SEED, e)); under torchrun the global batches and the evaluation figures equal a one-process run's.  Recipe,
SmoothAdv and many-process details: docs/internals.md, "Training".
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
