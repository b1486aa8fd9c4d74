"""The interface between a DEQ classifier and the smoothing layer (``SRS/``).

Smoothing needs only ``model(x) -> logits``; SRS also chooses solver, budget, tolerance and start per batch and
reads back the fixed point and the solver statistics: :class:`DEQClassifier`, whose ``solve`` returns
:class:`DEQOutput`.  Models without ``solve`` are smoothed as ordinary classifiers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Tuple, runtime_checkable

import torch

from .solvers import SolverResult


@dataclass
class DEQOutput:
    """What :meth:`DEQClassifier.solve` returns: ``logits`` (B, num_classes) at the final iterate, ``z`` (B, D) flat
    final iterate (a later ``z0``), ``result`` (``nfe`` on the batch, per-sample ``residual``; inf: no finite
    iterate), ``rungs`` (k -> (logits, residual) of a budget-k solve from the same start, or None) and
    ``rung_seconds``."""
    logits: torch.Tensor
    z: torch.Tensor
    result: Optional[SolverResult]
    rungs: Optional[Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = None
    rung_seconds: float = 0.0


@runtime_checkable
class DEQClassifier(Protocol):
    """A classifier defined by a fixed point, solvable on demand."""

    def solve(self, x: torch.Tensor, solver: Optional[str] = None, max_iter: Optional[int] = None,
              z0: Optional[torch.Tensor] = None, tol: Optional[float] = None) -> DEQOutput:
        """Solve for the fixed point of ``x`` (no gradient) and classify it; return :class:`DEQOutput`.

        ``solver`` (:data:`DEQ.solvers.SOLVERS`), ``max_iter`` (evaluations of f) and ``tol`` (0: spend the whole
        budget) default to the model's; ``z0`` None starts from zeros (the standard model)."""
        ...


def is_deq(model) -> bool:
    """Whether ``model`` offers :meth:`DEQClassifier.solve` (SRS needs it; training a DEQ also needs
    ``forward_train``, :func:`DEQ.models.is_trainable_deq`)."""
    return isinstance(model, DEQClassifier)


__all__ = ["DEQOutput", "DEQClassifier", "is_deq"]
