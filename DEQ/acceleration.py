"""How a model is evaluated: eager or ``torch.compile``d, fp32 or bf16, with or without CUDA graphs.

A :class:`Runtime` says how; :func:`resolve_runtime` turns the ``--compile {auto,on,off}`` and
``--precision {fp32,bf16}`` flags into one for a device (auto: compile on CUDA, not on the CPU),
and :func:`apply_runtime` applies it to a model:

* a DEQ with ``set_runtime`` (the MDEQ) evaluates its stem, f and head through an
  :class:`Engine`: ``model.solve`` keeps the solver (Anderson, Broyden, naive) in eager fp32 and
  evaluates f through a ``torch.compile`` of the *flat* function ``(z, injection) -> f(z)``, built
  once per model (not a closure rebuilt per solve, which would recompile);
* a plain classifier (ResNet) is wrapped in :class:`RuntimeClassifier`, whose forward is the
  compiled forward under the precision (with gradients enabled, e.g. an attack, the eager forward
  under the same autocast: a compiled backward of every attack step shape is not worth it).

Static shapes.  Every compiled function is ``dynamic=False``; with ``pad_rows`` set (the runner
sets :func:`static_rows`: the mini-batch size and the first and last mini-batch of each phase) every
call is padded to the smallest of those row counts that holds it and the padded rows are dropped
after, so a few shapes are compiled per function whatever the paired-solve chunks hold (the padding
repeats the call's own rows, see :func:`pad_to`).  Rows are
independent in eval mode (GroupNorm per sample, BatchNorm with
running statistics, dropout off), so padding changes no other row's result; the padded rows cost
their share of f's arithmetic.  On CUDA the compile uses ``mode="reduce-overhead"`` (CUDA graphs):
a fixed-budget solve replays one graph per f evaluation, and every output is cloned out of the
graph's memory pool before the next replay overwrites it.

Precision.  Under bf16 the stem, f and head run under ``torch.autocast(dtype=torch.bfloat16)`` and
their outputs are cast to fp32: the solver's state z, Anderson's Gram matrix and linear solve,
Broyden's low-rank updates and the residuals stay fp32 (autocast never covers the solver).  The
certified classifier is then that bf16 model, in the standard mode, the SRS chain and the paired
standard solves alike (all go through ``model.solve``).

Compile time.  torch.compile compiles at a function's first call: :class:`Engine` times every first
call (compile plus one evaluation) into ``compile_seconds``; the runner prints it once and, since
the first call happens inside the first image, the first image's ``time`` (and the run's seconds
per image) include it.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from .checks import check_choice

COMPILE_CHOICES = ("auto", "on", "off")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class Runtime:
    """How a model is evaluated.

    Attributes:
        compile: evaluate through ``torch.compile`` (static shapes).
        precision: 'fp32' or 'bf16' (autocast of stem, f and head; the solver stays fp32).
        cuda_graphs: CUDA graphs (``mode="reduce-overhead"``); CUDA and compile only.
        pad_rows: the row counts compiled calls are padded to: a call is padded to the smallest of them that
            holds it (an int: that one count; None, or a call larger than all: no padding, that row count
            is compiled as it comes).  :func:`static_rows` gives those of a sampling run.
    """
    compile: bool = False
    precision: str = "fp32"
    cuda_graphs: bool = False
    pad_rows: Optional[Union[int, Tuple[int, ...]]] = None

    def rows_for(self, rows: int) -> Optional[int]:
        """The row count a call of ``rows`` rows is padded to (None: no padding)."""
        sizes = (self.pad_rows,) if isinstance(self.pad_rows, int) else (self.pad_rows or ())
        fits = [n for n in sizes if n >= rows]
        return min(fits) if fits else None

    @property
    def plain(self) -> bool:
        """Whether this is the eager fp32 evaluation (nothing to change)."""
        return not self.compile and self.precision == "fp32"

    def describe(self) -> str:
        """``compile=on cuda_graphs=on`` style text (the results header's ``compile`` entry)."""
        return f"{'on' if self.compile else 'off'}" + (" cuda_graphs" if self.cuda_graphs else "")


def static_rows(batch: int, *phases: Optional[int]) -> Tuple[int, ...]:
    """The row counts a sampling run calls the model with: full mini-batches of ``batch`` rows, and each
    phase's first (``min(phase, batch)``) and last (``phase % batch``) mini-batch, plus the quarters of
    ``batch``.  Paired-solve chunks and other odd counts are padded to the next of these (a count is
    compiled only when a call needs it).  Padding everything to ``batch`` instead made the compiled
    SRS-1A slower than eager on the CPU (CIFAR MDEQ-SMALL, K 100 pairs padded to a batch of 200).

    Args:
        batch: the mini-batch size.
        phases: sample counts of the phases (N0, N, ...; None entries ignored).

    Returns:
        tuple: the distinct row counts, ascending.
    """
    sizes = {-(-batch * j // 4) for j in range(1, 5)}  # quarters: a pair chunk wastes < batch / 4 rows
    for n in phases:
        if n:
            sizes.add(min(n, batch))
            if n % batch:
                sizes.add(n % batch)
    return tuple(sorted(sizes))


def resolve_runtime(compile: str, precision: str, device: torch.device,
                    pad_rows: Optional[Union[int, Tuple[int, ...]]] = None) -> Runtime:
    """The runtime the flags ask for on ``device``.

    Args:
        compile: 'auto' (on for CUDA, off on the CPU), 'on' or 'off'.
        precision: 'fp32' or 'bf16'.
        device: where the model runs.
        pad_rows: row counts compiled calls are padded to (``Runtime.pad_rows``; e.g. :func:`static_rows`).

    Returns:
        Runtime: CUDA graphs whenever compiling on CUDA (which also turns on ``cudnn.benchmark``, unless
        ``cudnn.deterministic`` is set, e.g. by a config's CUDNN.DETERMINISTIC).
    """
    check_choice("--compile", compile, COMPILE_CHOICES)
    check_choice("--precision", precision, PRECISIONS)
    on = device.type == "cuda" if compile == "auto" else compile == "on"
    if on and device.type == "cuda" and not torch.backends.cudnn.deterministic:
        torch.backends.cudnn.benchmark = True  # every shape repeats (padded rows): autotune once per shape
    return Runtime(compile=on, precision=precision, cuda_graphs=on and device.type == "cuda",
                   pad_rows=pad_rows if on else None)


def autocast(precision: str, device_type: str):
    """The autocast context of ``precision`` (a null context for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def raise_recompile_limit(limit: int = 256) -> None:
    """Allow dynamo ``limit`` compiled versions per code object.  Stem, f and head of every engine share
    one code object (``Compiled._eval``), each with a few row counts, and the first solve after
    compiling recompiles once (the weight-normalised weights are recomputed per solve); dynamo's
    default limit of 8 would fall back to eager within one run, and every model compiled in one
    process (tests, benchmarks) adds entries."""
    import torch._dynamo.config as dcfg
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dcfg, name) and getattr(dcfg, name) < limit:
            setattr(dcfg, name, limit)


def pad_to(t: Optional[torch.Tensor], rows: Optional[int]) -> Optional[torch.Tensor]:
    """``t`` with its own rows repeated (cyclically) up to ``rows`` rows (unchanged if None or long enough).

    Repeated rows rather than zeros: a solve with a tolerance stops when every row has met it, and a
    copy meets it when its original does, so the padding never changes when a solve stops.

    Args:
        t: (B, ...) tensor or None.
        rows: target row count or None.

    Returns:
        (max(B, rows), ...) tensor whose first B rows are ``t``, or None.
    """
    if t is None or rows is None or t.shape[0] >= rows:
        return t
    reps = -(-rows // t.shape[0])
    return t.repeat((reps,) + (1,) * (t.dim() - 1))[:rows]


class Compiled:
    """One function evaluated as the runtime says: compiled (timed first call per shape), autocast, fp32 out.

    Args:
        fn: the eager function (tensors in, one tensor out).
        runtime: how to evaluate it.
        device_type: 'cuda' or 'cpu' (autocast's device).
        name: for the compile-time report.
        clock: where first-call times are added up (name -> seconds).
    """

    def __init__(self, fn: Callable, runtime: Runtime, device_type: str, name: str, clock: Dict[str, float]):
        self.fn, self.runtime, self.device_type, self.name, self.clock = fn, runtime, device_type, name, clock
        self.seen = set()
        if runtime.compile:
            raise_recompile_limit()
            mode = "reduce-overhead" if runtime.cuda_graphs else None
            self.compiled = torch.compile(self._eval, dynamic=False, mode=mode)
        else:
            self.compiled = self._eval

    def _eval(self, *args):
        with autocast(self.runtime.precision, self.device_type):
            out = self.fn(*args)
        return out.float()

    def __call__(self, *args):
        if not self.runtime.compile:
            return self._eval(*args)
        key = tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))
        if self.runtime.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        if key in self.seen:
            out = self.compiled(*args)
        else:
            t0 = time.perf_counter()
            out = self.compiled(*args)
            if self.device_type == "cuda":
                torch.cuda.synchronize()
            self.clock[self.name] = self.clock.get(self.name, 0.0) + time.perf_counter() - t0
            self.seen.add(key)
        return out.clone() if self.runtime.cuda_graphs else out  # the next replay overwrites graph outputs


class Engine:
    """The stem, f and head of a DEQ evaluated under a :class:`Runtime` (what ``model.solve`` uses), and
    optionally f for the no-gradient fixed-point solve of training (``forward_train``).

    Args:
        inject: x -> injection tensor (the stem).
        f_flat: (z, injection) -> f(z), flat (B, D) state.
        head: (z, injection) -> logits.
        runtime: how to evaluate them.
        device_type: the model's device type.
        train: also build ``train_f``: the same ``f_flat`` under the same runtime, called by the training
            solve with its rows as they come (never padded: the dropout masks have the batch dimension)
            and timed on its own clock (``train_clock``; the train-mode graphs differ from the eval-mode
            ones anyway, dropout being on).  Only with ``runtime.compile`` (None otherwise).
    """

    def __init__(self, inject: Callable, f_flat: Callable, head: Callable, runtime: Runtime, device_type: str,
                 train: bool = False):
        self.runtime = runtime
        self.clock: Dict[str, float] = {}
        self.inject = Compiled(inject, runtime, device_type, "stem", self.clock)
        self.f = Compiled(f_flat, runtime, device_type, "f", self.clock)
        self.head = Compiled(head, runtime, device_type, "head", self.clock)
        self.train_clock: Dict[str, float] = {}
        self.train_f = Compiled(f_flat, runtime, device_type, "f", self.train_clock) if train and runtime.compile else None
        self.reported = self.train_reported = False

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in first calls (compilation plus one evaluation) so far."""
        return sum(self.clock.values())

    def compile_report(self) -> Optional[str]:
        """One line on the compile time, the first time there is one to tell (None otherwise)."""
        if self.reported or not self.runtime.compile or "f" not in self.clock:
            return None
        self.reported = True
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.clock.items())
        return f"compiled f in {self.clock['f']:.1f} s ({parts}; included in the first image's time)"

    def train_compile_report(self) -> Optional[str]:
        """One line on the training solve's compile time, the first time there is one (None otherwise)."""
        if self.train_reported or self.train_f is None or "f" not in self.train_clock:
            return None
        self.train_reported = True
        shapes = ", ".join(str(n) for n in sorted({key[0][0][0] for key in self.train_f.seen}))
        return (f"compiled the training solve's f in {self.train_clock['f']:.1f} s (rows {shapes}; "
                f"included in the first DEQ training step's time)")


class RuntimeClassifier(torch.nn.Module):
    """A plain classifier evaluated under a runtime: compiled forward (no-grad calls) and autocast.

    Args:
        model: the classifier (images -> logits).
        runtime: how to evaluate it.
        device_type: the model's device type.
    """

    def __init__(self, model: torch.nn.Module, runtime: Runtime, device_type: str):
        super().__init__()
        self.model, self.runtime = model, runtime
        self.clock: Dict[str, float] = {}
        self._compiled = Compiled(model, runtime, device_type, "f", self.clock)
        self._device_type = device_type
        self.reported = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (fp32)."""
        if torch.is_grad_enabled():
            with autocast(self.runtime.precision, self._device_type):
                return self.model(x).float()
        rows = x.shape[0]
        return self._compiled(pad_to(x, self.runtime.rows_for(rows)))[:rows]

    compile_seconds = Engine.compile_seconds
    compile_report = Engine.compile_report


def apply_runtime(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """``model`` evaluated under ``runtime``.

    Args:
        model: a DEQ with ``set_runtime`` (the MDEQ: changed in place) or a plain classifier.
        runtime: how to evaluate it.

    Returns:
        torch.nn.Module: the model itself (DEQ, or a plain model under the eager fp32 runtime) or a
        :class:`RuntimeClassifier` around it.
    """
    if hasattr(model, "set_runtime"):
        model.set_runtime(runtime)
        return model
    if runtime.plain:
        return model
    device = next(model.parameters()).device
    return RuntimeClassifier(model, runtime, device.type)


def compile_report(model: torch.nn.Module) -> Optional[str]:
    """The one-line compile-time report of a model under a runtime, once (None: nothing to say)."""
    engine = getattr(model, "engine", None) or (model if isinstance(model, RuntimeClassifier) else None)
    return engine.compile_report() if engine is not None else None


__all__ = ["COMPILE_CHOICES", "PRECISIONS", "Runtime", "static_rows", "resolve_runtime", "apply_runtime", "autocast", "pad_to",
           "Compiled", "Engine", "RuntimeClassifier", "compile_report", "raise_recompile_limit"]
