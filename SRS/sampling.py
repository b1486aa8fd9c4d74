"""Drawing noisy copies of an input and classifying them: the standard model and the SRS chain.

:func:`noisy_batch` and :class:`PhaseLog` (generator state per mini-batch: :func:`regenerate` reproduces any
position's noise bit for bit), :class:`StandardSolver` (solve from zeros), :class:`SRSChain` (warm-started
batches), :func:`draw_counts` (per-class counts of a phase, one host sync) and :class:`SampleStats`.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import time
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
import torch

from DEQ.interface import DEQOutput

from .settings import DEQSolve, SRSConfig

ABSTAIN = -1


class SampleStats:
    """What sampling an image cost and how the solves went.  Residual sums stay on the device
    (no host sync per batch) until the image is done."""

    def __init__(self):
        self.samples = 0
        self.nfe = 0.0                  # evaluations of f summed over samples
        self.std_calls = 0              # solver calls of the standard model (any phase)
        self.std_rows = 0               # ... and the samples they solved
        self.refined = 0                # SRS samples re-solved by the standard model (refine_margin)
        self.pilot = 0                  # SRS samples of the route pilot (route_pilot; in no certificate)
        self.planner_seconds = 0.0      # CPU time of the pairing planner (route choice, pair counts; ``planning``)
        self._res_sum = None
        self._res_n = None

    def add(self, rows: int, nfe: int, residual: Optional[torch.Tensor], paired: bool = False,
            standard: bool = False):
        """Paired standard solves add cost but are not samples of their own."""
        self.nfe += float(nfe) * rows
        if standard:
            self.std_calls += 1
            self.std_rows += rows
        if paired:
            return
        self.samples += rows
        if residual is not None:
            finite = torch.isfinite(residual)
            s, n = torch.where(finite, residual, torch.zeros_like(residual)).sum(), finite.sum()
            self._res_sum = s if self._res_sum is None else self._res_sum + s
            self._res_n = n if self._res_n is None else self._res_n + n

    def add_cost(self, other: "SampleStats") -> None:
        """Add what a side phase cost (``other``: evaluations, standard calls and rows), not its samples: the
        route pilot's and the escape's samples are in no N0 + N of the certificate, their evaluations are."""
        self.nfe += other.nfe
        self.std_calls += other.std_calls
        self.std_rows += other.std_rows

    @contextlib.contextmanager
    def planning(self):
        """Add the time spent inside the ``with`` block (the pairing planner of ``SRS.pairing``) to
        ``planner_seconds``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.planner_seconds += time.perf_counter() - t0

    @property
    def nfe_per_sample(self) -> float:
        return self.nfe / self.samples if self.samples else 0.0

    @property
    def mean_residual(self) -> float:
        if self._res_n is None or int(self._res_n) == 0:
            return float("nan")
        return float(self._res_sum) / int(self._res_n)


class Counts:
    """Per-class counts accumulated on the device (one host sync per phase)."""

    def __init__(self, num_classes: int, device):
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.bad = torch.zeros((), dtype=torch.long, device=device)

    def add(self, logits: torch.Tensor) -> torch.Tensor:
        preds = safe_argmax(logits)
        # shift by one so ABSTAIN (-1) lands in bin 0: no boolean indexing, hence no device sync
        binned = torch.bincount(preds + 1, minlength=self.num_classes + 1)
        self.counts += binned[1:]
        self.bad += binned[0]
        return preds

    def replace(self, old: torch.Tensor, new: torch.Tensor):
        """Move samples counted as predictions ``old`` to predictions ``new`` (same rows, re-solved)."""
        k = self.num_classes + 1
        binned = torch.bincount(new + 1, minlength=k) - torch.bincount(old + 1, minlength=k)
        self.counts += binned[1:]
        self.bad += binned[0]

    def numpy(self) -> Tuple[np.ndarray, int]:
        """(counts per class, samples with non-finite logits)."""
        return self.counts.cpu().numpy(), int(self.bad)


class PhaseLog:
    """What a sampling phase needs to be paired afterwards: the generator state before each
    mini-batch's noise (to regenerate the noisy inputs at any positions) and every prediction."""

    def __init__(self):
        self.batches: List[Tuple[int, int, torch.Tensor]] = []   # (start, rows, generator state)
        self._preds: List[torch.Tensor] = []
        self._flags: List[torch.Tensor] = []

    def record(self, start: int, rows: int, generator: torch.Generator):
        self.batches.append((start, rows, generator.get_state()))

    def add_preds(self, preds: torch.Tensor, flags: Optional[torch.Tensor] = None):
        """Record a batch's predictions, and which of its rows are to be re-solved (``flags``)."""
        self._preds.append(preds)
        if flags is not None:
            self._flags.append(flags)

    def preds(self) -> torch.Tensor:
        if len(self._preds) > 1:
            self._preds = [torch.cat(self._preds)]
        return self._preds[0]

    def exact(self) -> Optional[torch.Tensor]:
        """(n,) bool on the CPU: the flagged positions, whose predictions the phase replaces by the
        standard model's own (``Smooth._refine``); None when the phase flagged nothing."""
        if not self._flags:
            return None
        if len(self._flags) > 1:
            self._flags = [torch.cat(self._flags).cpu()]
        return self._flags[0].cpu()

    def flagged(self) -> torch.Tensor:
        """Sorted positions (CPU) flagged for re-solving; empty when none were flagged."""
        exact = self.exact()
        return torch.zeros(0, dtype=torch.long) if exact is None else torch.nonzero(exact).flatten()

    def replace(self, positions: torch.Tensor, preds: torch.Tensor):
        """The standard model's predictions at ``positions`` replace the chain's."""
        merged = self.preds().clone()
        merged[positions.to(merged.device)] = preds
        self._preds = [merged]


# ----------------------------------------------------------------- classifiers of a batch
class StandardSolver:
    """The standard base classifier f_D: the DEQ solved from zeros with ``settings`` (or any plain
    module's forward).  This is the classifier whose smoothed version every certificate is about."""

    def __init__(self, model: torch.nn.Module, settings: Optional[DEQSolve]):
        self.model, self.settings = model, settings

    def __call__(self, noisy: torch.Tensor, stats: SampleStats, paired: bool = False) -> torch.Tensor:
        """Logits of ``noisy`` (NaN rows for solves that never produced a finite iterate)."""
        if self.settings is None:
            stats.add(noisy.shape[0], 0, None, paired)
            return self.model(noisy)
        s = self.settings
        out = self.model.solve(noisy, s.solver, s.max_iter, None, s.tol)
        stats.add(noisy.shape[0], out.result.nfe, out.result.residual, paired, standard=True)
        return mark_diverged(out)


class SRSChain:
    """The SRS chain of one image: batch t starts from the solutions of batch t - 1.

    Warm-up batches (the first, and every ``warmup_interval``-th if > 0) run the warm-up solve from
    zeros; the others run the (short) SRS step from the warm start.  Sample j of a batch starts
    from sample j of the previous one; a batch larger than the previous one restarts its extra
    rows from the first rows.  With ``SRSConfig.warm_start`` 'mean' every sample starts from the
    mean of the previous batch's solutions instead."""

    def __init__(self, model: torch.nn.Module, cfg: SRSConfig):
        self.model, self.cfg = model, cfg
        self.z: Optional[torch.Tensor] = None
        self.batches = 0

    def restart(self) -> "SRSChain":
        """A fresh chain on the same model and settings (next batch is a warm-up)."""
        return SRSChain(self.model, self.cfg)

    def _start(self, rows: int) -> torch.Tensor:
        if self.cfg.warm_start == "mean":
            # mean over the rows that did not diverge (a NaN row would poison every start; none: zeros),
            # as a masked sum so that no host-device sync enters the sampling loop
            finite = torch.isfinite(self.z).all(dim=1, keepdim=True)
            total = torch.where(finite, self.z, torch.zeros_like(self.z)).sum(dim=0, keepdim=True)
            mean = total / finite.sum().clamp_min(1).to(self.z.dtype)
            return mean.expand(rows, -1).contiguous()
        if rows > self.z.shape[0]:
            reps = math.ceil(rows / self.z.shape[0])
            return self.z.repeat(reps, 1)[:rows]
        return self.z[:rows]

    def is_warmup(self, batch: int) -> bool:
        """Whether chain batch number ``batch`` (0-based) is a warm-up batch."""
        k = self.cfg.warmup_interval
        return batch == 0 or (k > 0 and batch % k == 0)

    def __call__(self, noisy: torch.Tensor, stats: SampleStats) -> torch.Tensor:
        warm = self.z is None or self.is_warmup(self.batches)
        step = self.cfg.warmup if warm else self.cfg.step
        z0 = None if warm else self._start(noisy.shape[0])
        out = self.model.solve(noisy, step.solver, step.max_iter, z0, step.tol)
        stats.add(noisy.shape[0], out.result.nfe, out.result.residual)
        self.z = out.z
        self.batches += 1
        return mark_diverged(out)

    def warmup_rows(self, n: int, batch_size: int) -> int:
        """Samples of the next n-sample phase (batches of ``batch_size``) that will be warm-up batches."""
        rows = 0
        for t in range(math.ceil(n / batch_size)):
            if self.is_warmup(self.batches + t):
                rows += min(batch_size, n - t * batch_size)
        return rows


# ----------------------------------------------------------------- a phase of samples
def small_margin(logits: torch.Tensor, margin: float) -> torch.Tensor:
    """(B,) bool: rows with finite logits whose top-two logit gap is below ``margin``."""
    top = logits.topk(2, dim=1).values
    gap = top[:, 0] - top[:, 1]
    return torch.isfinite(gap) & (gap < margin)


def draw_counts(x: torch.Tensor, num: int, batch_size: int, sigma: float, generator: torch.Generator,
                classify: Callable[[torch.Tensor], torch.Tensor], num_classes: int,
                log: Optional[PhaseLog] = None, refine_margin: float = 0.0, offset: int = 0) -> Counts:
    """Draw ``num`` noisy copies of x in mini-batches, classify each batch, count the predictions.

    Args:
        x: (1, C, H, W) input.
        classify: noisy batch -> logits (a :class:`StandardSolver` or :class:`SRSChain` bound to stats).
        log: if given, records the generator state before each batch and every prediction (pairing).
        refine_margin: with a log, also flags the rows whose top-two logit gap is below it (re-solved
            later by the standard model, ``SRSConfig.refine_margin``).
        offset: position of the first of these samples in the phase (a phase drawn in several parts, as
            sequential CERTIFY does, logs positions that continue where the previous part stopped).

    Returns:
        :class:`Counts` of the phase.
    """
    counts = Counts(num_classes, x.device)
    done = 0
    with torch.no_grad():
        while done < num:
            b = min(batch_size, num - done)
            if log is not None:
                log.record(offset + done, b, generator)
            logits = classify(noisy_batch(x, b, sigma, generator))
            preds = counts.add(logits)
            if log is not None:
                log.add_preds(preds, small_margin(logits, refine_margin) if refine_margin > 0 else None)
            done += b
    return counts


def ensure_generator(generator: Optional[torch.Generator], device) -> torch.Generator:
    """Pairing regenerates noise from recorded generator states, so sampling always uses an explicit
    generator; without one, a fresh one is seeded from the global RNG."""
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2 ** 62, ())))


def derived_seed(seed: int, tag: str) -> int:
    """A 63-bit seed for stream ``tag`` of the image whose generator seed is ``seed``: SHA-256 of
    "seed:tag", so streams of different tags (QCRS's search, an attack) are independent of the
    image's noise stream and of each other."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{tag}".encode()).digest()[:8], "big") & (2 ** 63 - 1)


def side_stream(generator: torch.Generator, tag: str) -> torch.Generator:
    """The generator of stream ``tag`` (:func:`derived_seed`) of the image whose noise stream is ``generator``,
    on the same device: samples that steer or replace a certificate without reusing its noise."""
    return torch.Generator(device=generator.device).manual_seed(derived_seed(generator.initial_seed(), tag))


def noisy_batch(x: torch.Tensor, rows: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    noisy = x.repeat(rows, 1, 1, 1)
    return noisy + torch.randn(noisy.shape, generator=generator, device=x.device, dtype=x.dtype) * sigma


def regenerate(x, sigma, log: PhaseLog, positions: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """The noisy inputs at ``positions`` (sorted), bit-identical to those of the logged phase, in
    chunks of exactly ``batch_size`` rows (the last one shorter)."""
    pending: List[torch.Tensor] = []
    held = 0
    replay = torch.Generator(device=x.device)
    for start, rows, state in log.batches:
        lo = int(torch.searchsorted(positions, start))
        hi = int(torch.searchsorted(positions, start + rows))
        if hi == lo:
            continue
        replay.set_state(state)
        noisy = noisy_batch(x, rows, sigma, replay)
        pending.append(noisy.index_select(0, (positions[lo:hi] - start).to(x.device)))
        held += hi - lo
        while held >= batch_size:
            block = torch.cat(pending)
            yield block[:batch_size]
            pending, held = [block[batch_size:]], held - batch_size
    if held:
        yield torch.cat(pending)


def mark_diverged(out: DEQOutput) -> torch.Tensor:
    """Logits, with NaN rows for samples whose solve never produced a finite iterate (the solvers then
    return the initial state with an infinite residual): such samples make the image abstain."""
    ok = torch.isfinite(out.result.residual)
    return torch.where(ok[:, None], out.logits, torch.full_like(out.logits, float("nan")))


def safe_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class per row; ABSTAIN for rows with non-finite logits."""
    ok = torch.isfinite(logits).all(1)
    return torch.where(ok, logits.argmax(1), torch.full_like(ok, ABSTAIN, dtype=torch.long))


__all__ = ["ABSTAIN", "SampleStats", "Counts", "PhaseLog", "StandardSolver", "SRSChain", "draw_counts",
           "small_margin", "ensure_generator", "derived_seed", "side_stream", "noisy_batch", "regenerate", "mark_diverged", "safe_argmax"]
