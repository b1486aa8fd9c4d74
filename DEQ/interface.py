"""The interface between a DEQ classifier and the smoothing layer (``SRS/``).

Randomized smoothing needs nothing but ``model(x) -> logits``.  Serialized randomized
smoothing also needs to choose the solver, its budget, its tolerance and its starting point
for every batch of noisy inputs, and to read back the fixed point (to warm-start the next
batch) and the solver's statistics (evaluations of f, residual).  That is
:class:`DEQClassifier`; :class:`DEQOutput` is what its ``solve`` returns.  Any model with
such a ``solve`` works (the MDEQ in :mod:`DEQ.models.mdeq`, or a closed-form DEQ in a
test); models without one (ResNets, plain modules) are smoothed as ordinary classifiers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Protocol, Tuple, runtime_checkable

import torch

from .solvers import SolverResult


@dataclass
class DEQOutput:
    """What :meth:`DEQClassifier.solve` returns.

    Attributes:
        logits: (B, num_classes) class scores at the solver's final iterate.
        z: (B, D) flat final iterate, to warm-start a later solve (``z0``).
        result: the solver's statistics (``nfe`` evaluations of f on the whole batch, per-sample
            ``residual``; an infinite residual means no finite iterate was ever produced).
        rungs: with ``solve(..., rungs=(k1, ...))``: k -> (logits, residual) that a budget-k solve from
            the same start returns (``DEQ.solvers``, the ladder); None otherwise.
        rung_seconds: time spent on the rungs' heads (work a plain solve does not do).
    """
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
        """Solve for the fixed point of the batch ``x`` (no gradient) and classify it.

        Args:
            x: (B, C, H, W) inputs.
            solver: a name of :data:`DEQ.solvers.SOLVERS` (None: the model's default).
            max_iter: budget in evaluations of f (None: the model's default).
            z0: (B, D) starting point (None: zeros, i.e. the standard model).
            tol: residual tolerance (None: the model's default; 0: always spend the whole budget).

        Returns:
            :class:`DEQOutput` with logits, the final iterate and the solver statistics.
        """
        ...


def is_deq(model) -> bool:
    """Whether ``model`` offers :meth:`DEQClassifier.solve` (SRS needs it; training a DEQ also needs
    ``forward_train``, :func:`DEQ.models.is_trainable_deq`)."""
    return isinstance(model, DEQClassifier)


__all__ = ["DEQOutput", "DEQClassifier", "is_deq"]
