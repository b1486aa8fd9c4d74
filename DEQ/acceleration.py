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

When compiling fails (:class:`CompileGuard`).  ``--compile auto`` never strands a run on a compiler:
an exception from ``torch.compile`` or from one of the first calls of a compiled function (where
dynamo traces, inductor compiles and CUDA graphs are captured) prints the one line
``warning: --compile auto: compiling failed (<ExceptionType>: <first line>); running eager`` and the
model runs eager from then on.  It also checks once, on the model's first mini-batch, that the
compiled predictions are the eager ones (:func:`disagreeing_rows`) and falls back to eager with one
warning line when they are not; the certificates are then those of the eager model.  ``--compile
on`` asks for the compiled model: a failure is the one-line ``error: --compile on: compiling
failed (...)``, and agreement is not checked at run time (the test suite checks it,
``tests/test_compile.py``).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from .checks import check_choice
from .errors import UserError

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
        fallback: with compile, what a failure does (:class:`CompileGuard`): True (``--compile auto``) falls
            back to eager with one warning line, and the first mini-batch's compiled predictions are
            checked against eager ones; False (``--compile on``) makes a failure a one-line error.
    """
    compile: bool = False
    precision: str = "fp32"
    cuda_graphs: bool = False
    pad_rows: Optional[Union[int, Tuple[int, ...]]] = None
    fallback: bool = False

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
        ``cudnn.deterministic`` is set, e.g. by a config's CUDNN.DETERMINISTIC); 'auto' falls back to
        eager where compiling fails (``Runtime.fallback``).
    """
    check_choice("--compile", compile, COMPILE_CHOICES)
    check_choice("--precision", precision, PRECISIONS)
    on = device.type == "cuda" if compile == "auto" else compile == "on"
    if on and device.type == "cuda" and not torch.backends.cudnn.deterministic:
        torch.backends.cudnn.benchmark = True  # every shape repeats (padded rows): autotune once per shape
    return Runtime(compile=on, precision=precision, cuda_graphs=on and device.type == "cuda",
                   pad_rows=pad_rows if on else None, fallback=on and compile == "auto")


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


def exception_line(exc: BaseException) -> str:
    """``<ExceptionType>: <first line of its message>`` (the type alone for an empty message)."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip()[:300] if lines else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def warn(message: str) -> None:
    """One ``warning: ...`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


# Ties: how close (relative to the row's largest |logit|, at least 1) a class's eager logit must be to the eager
# top logit for the compiled model's choice of it to count as the same prediction (see ``disagreeing_rows``).
TIE_TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}


def disagreeing_rows(compiled: torch.Tensor, eager: torch.Tensor, precision: str = "fp32") -> int:
    """How many rows of two (B, classes) logit tensors predict differently (the compiled/eager check).

    A row agrees when the compiled argmax is the eager argmax, or a class whose eager logit is within
    ``TIE_TOLERANCE[precision] * max(1, max |eager logit of the row|)`` of the eager top logit: the
    logits themselves are not compared (no tolerance on them), since fused kernels, reordered
    reductions and autotuned convolutions change them by rounding, which the fixed-point iterations can
    amplify, and a class within that rounding of the top is a tie either evaluation may break; a
    miscompiled model moves predictions by far more.  Logits in half precision (e.g. under AMP) are
    compared with the bf16 tolerance.  A row non-finite in one of them and finite in the other
    disagrees; rows non-finite in both agree (the solve diverged either way).
    """
    if min(compiled.element_size(), eager.element_size()) < 4:
        precision = "bf16"
    compiled, eager = compiled.detach().float(), eager.detach().float()
    fin_c, fin_e = torch.isfinite(compiled).all(1), torch.isfinite(eager).all(1)
    both = fin_c & fin_e
    top = eager.max(1).values
    chosen = eager.gather(1, compiled.argmax(1, keepdim=True)).squeeze(1)
    tol = TIE_TOLERANCE.get(precision, TIE_TOLERANCE["bf16"]) * eager.abs().max(1).values.clamp(min=1.0)
    differ = (fin_c != fin_e) | (both & (chosen < top - tol))
    return int(differ.sum())


class CompileGuard:
    """What the compiled functions of one model do when compiling goes wrong; shared by its stem, f and head.

    * ``Runtime.fallback`` (``--compile auto``): the first failure (:meth:`failed`) or disagreement
      (:meth:`check`) prints one warning line and sets ``eager``: every function of the model then
      evaluates eagerly (same precision, same padding).
    * otherwise (``--compile on``): a failure raises :class:`DEQ.errors.UserError` (one ``error:`` line
      naming the exception and the flags that avoid it); agreement is not checked.

    Attributes:
        eager: fell back to eager evaluation.
        pending: which agreement checks are still to do ('eval': the first ``solve``, 'train': the first
            training solve through the compiled f; empty without fallback).
    """
    WARMUP_CALLS = 3  # calls per shape guarded: tracing and compiling (1st), CUDA graph warm-up and capture (2nd, 3rd)

    def __init__(self, runtime: "Runtime"):
        self.fallback = runtime.compile and runtime.fallback
        self.precision = runtime.precision
        self.eager = False
        self.pending = {"eval", "train"} if self.fallback else set()

    def failed(self, exc: Exception) -> None:
        """Compiling (or a first compiled call) raised ``exc``: fall back to eager (warning once per model), or
        raise the one-line error."""
        if self.eager:
            return
        reason = exception_line(exc)
        if not self.fallback:
            raise UserError(f"--compile on: compiling failed ({reason}); use --compile auto (falls back to eager) "
                            f"or --compile off") from exc
        self.eager = True
        self.pending.clear()
        warn(f"--compile auto: compiling failed ({reason}); running eager")

    def check(self, what: str, compiled: torch.Tensor, eager: Callable[[], torch.Tensor]) -> bool:
        """The agreement check ``what`` ('eval' or 'train'), once: whether the compiled result stands.

        Args:
            compiled: the compiled evaluation's (B, classes) logits.
            eager: computes the eager evaluation's logits of the same rows (called only when checking).

        Returns:
            True when no check is due or the predictions agree (:func:`disagreeing_rows`); False after a
            disagreement, which prints one warning line and falls back to eager (use the eager result).
        """
        if what not in self.pending or self.eager:
            return True
        self.pending.discard(what)
        bad = disagreeing_rows(compiled, eager(), self.precision)
        if not bad:
            return True
        self.eager = True
        self.pending.clear()
        warn(f"--compile auto: compiled and eager predictions differ on {bad} of {compiled.shape[0]} rows of the "
             f"first mini-batch; running eager")
        return False


class Compiled:
    """One function evaluated as the runtime says: compiled (timed first call per shape), autocast, fp32 out.

    Args:
        fn: the eager function (tensors in, one tensor out).
        runtime: how to evaluate it.
        device_type: 'cuda' or 'cpu' (autocast's device).
        name: for the compile-time report.
        clock: where first-call times are added up (name -> seconds).
        guard: what a failure does (shared by the functions of one model; a guard of its own if None).
    """

    def __init__(self, fn: Callable, runtime: Runtime, device_type: str, name: str, clock: Dict[str, float],
                 guard: Optional[CompileGuard] = None):
        self.fn, self.runtime, self.device_type, self.name, self.clock = fn, runtime, device_type, name, clock
        self.guard = guard if guard is not None else CompileGuard(runtime)
        self.seen = set()
        self.warmup: Dict[tuple, int] = {}  # shape -> guarded calls so far (up to CompileGuard.WARMUP_CALLS)
        self.compiled = self._eval
        if runtime.compile:
            raise_recompile_limit()
            mode = "reduce-overhead" if runtime.cuda_graphs else None
            try:
                self.compiled = torch.compile(self._eval, dynamic=False, mode=mode)
            except Exception as exc:  # noqa: BLE001 -- any compiler failure: fall back or one-line error
                self.guard.failed(exc)

    def _eval(self, *args):
        with autocast(self.runtime.precision, self.device_type):
            out = self.fn(*args)
        return out.float()

    def __call__(self, *args):
        if not self.runtime.compile or self.guard.eager:
            return self._eval(*args)
        key = tuple((tuple(a.shape), a.dtype) for a in args if isinstance(a, torch.Tensor))
        if key in self.seen and key not in self.warmup:
            return self._call(args)
        try:  # the first calls of a shape compile it (and warm up and capture its CUDA graph)
            if key in self.seen:
                out = self._call(args)
            else:
                t0 = time.perf_counter()
                out = self._call(args)
                if self.device_type == "cuda":
                    torch.cuda.synchronize()
                self.clock[self.name] = self.clock.get(self.name, 0.0) + time.perf_counter() - t0
                self.seen.add(key)
        except Exception as exc:  # noqa: BLE001 -- any compiler failure: fall back or one-line error
            self.guard.failed(exc)
            return self._eval(*args)
        calls = self.warmup.get(key, 0) + 1
        if calls >= CompileGuard.WARMUP_CALLS:
            self.warmup.pop(key, None)
        else:
            self.warmup[key] = calls
        return out

    def _call(self, args):
        """One call of the compiled function (a CUDA graph's output cloned: the next replay overwrites it)."""
        if self.runtime.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = self.compiled(*args)
        return out.clone() if self.runtime.cuda_graphs else out


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

    All of them share one :class:`CompileGuard` (``guard``): after a failure or a disagreement every one of
    them evaluates eagerly.
    """

    def __init__(self, inject: Callable, f_flat: Callable, head: Callable, runtime: Runtime, device_type: str,
                 train: bool = False):
        self.runtime = runtime
        self.guard = CompileGuard(runtime)
        self.clock: Dict[str, float] = {}
        self.functions = (inject, f_flat, head, device_type)
        self.inject = Compiled(inject, runtime, device_type, "stem", self.clock, self.guard)
        self.f = Compiled(f_flat, runtime, device_type, "f", self.clock, self.guard)
        self.head = Compiled(head, runtime, device_type, "head", self.clock, self.guard)
        self.train_clock: Dict[str, float] = {}
        self.train_f = (Compiled(f_flat, runtime, device_type, "f", self.train_clock, self.guard)
                        if train and runtime.compile else None)
        if self.train_f is None:
            self.guard.pending.discard("train")
        self.reported = self.train_reported = False

    def eager_twin(self) -> "Engine":
        """The same stem, f and head evaluated eagerly at the same precision and padding (the agreement check's
        reference)."""
        inject, f_flat, head, device_type = self.functions
        runtime = Runtime(precision=self.runtime.precision, pad_rows=self.runtime.pad_rows)
        return Engine(inject, f_flat, head, runtime, device_type)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in first calls (compilation plus one evaluation) so far."""
        return sum(self.clock.values())

    def compile_report(self) -> Optional[str]:
        """One line on the compile time, the first time there is one to tell (None otherwise, and after falling
        back to eager, which has its own warning)."""
        if self.reported or not self.runtime.compile or self.guard.eager or "f" not in self.clock:
            return None
        self.reported = True
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.clock.items())
        return f"compiled f in {self.clock['f']:.1f} s ({parts}; included in the first image's time)"

    def train_compile_report(self) -> Optional[str]:
        """One line on the training solve's compile time, the first time there is one (None otherwise)."""
        if self.train_reported or self.train_f is None or self.guard.eager or "f" not in self.train_clock:
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
        self.guard = CompileGuard(runtime)
        self._compiled = Compiled(model, runtime, device_type, "f", self.clock, self.guard)
        self._device_type = device_type
        self.reported = False

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.runtime.precision, self._device_type):
            return self.model(x).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` (fp32); the first no-gradient call is checked against eager (:class:`CompileGuard`)."""
        if torch.is_grad_enabled():
            return self._eager(x)
        rows = x.shape[0]
        out = self._compiled(pad_to(x, self.runtime.rows_for(rows)))[:rows]
        eager = []
        if self.guard.check("eval", out, lambda: eager.append(self._eager(x)) or eager[0]):
            return out
        return eager[0]

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


def compiled_vs_eager(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime, solver: str = "anderson",
                      max_iter: int = 30) -> Dict[str, object]:
    """Solve ``x`` with a DEQ (``set_runtime``) eagerly and under ``runtime``, and compare them
    (``scripts/check_compile.py``).

    The compiled model is solved twice: the first call compiles (and, with ``runtime.fallback``, runs the
    agreement check of :class:`CompileGuard`), the second replays what was compiled (CUDA graphs); the second
    call's logits are compared with the eager ones.  The model's runtime is reset to eager afterwards.

    Args:
        model: a DEQ in eval mode.
        x: (B, C, H, W) inputs on the model's device.
        runtime: the compiled runtime to check (e.g. ``resolve_runtime('auto', ...)``).
        solver, max_iter: the fixed-point solve (tolerance 0: exactly ``max_iter`` evaluations).

    Returns:
        dict: ``rows``; ``disagreeing`` (:func:`disagreeing_rows` of the replay against eager);
        ``argmax_equal`` (rows with the very same argmax); ``max_abs_diff`` of the logits and ``logit_scale``
        (largest |eager logit|); ``fell_back`` (the guard fell back to eager: a compile failure or a
        disagreement, each with its warning line); ``compile_seconds`` (first calls).
    """
    model.set_runtime(None)
    with torch.no_grad():
        eager = model.solve(x, solver, max_iter, None, 0.0).logits
        model.set_runtime(runtime)
        try:
            model.solve(x, solver, max_iter, None, 0.0)
            compiled = model.solve(x, solver, max_iter, None, 0.0).logits
            engine = model.engine
        finally:
            model.set_runtime(None)
    finite = torch.isfinite(eager) & torch.isfinite(compiled)
    return {"rows": int(x.shape[0]), "disagreeing": disagreeing_rows(compiled, eager, runtime.precision),
            "argmax_equal": int((compiled.argmax(1) == eager.argmax(1)).sum()),
            "max_abs_diff": float((compiled - eager)[finite].abs().max()) if finite.any() else float("nan"),
            "logit_scale": float(eager[finite].abs().max()) if finite.any() else float("nan"),
            "fell_back": bool(engine is not None and engine.guard.eager),
            "compile_seconds": engine.compile_seconds if engine is not None else 0.0}


def compile_report(model: torch.nn.Module) -> Optional[str]:
    """The one-line compile-time report of a model under a runtime, once (None: nothing to say)."""
    engine = getattr(model, "engine", None) or (model if isinstance(model, RuntimeClassifier) else None)
    return engine.compile_report() if engine is not None else None


__all__ = ["COMPILE_CHOICES", "PRECISIONS", "TIE_TOLERANCE", "Runtime", "static_rows", "resolve_runtime",
           "apply_runtime", "autocast", "pad_to", "exception_line", "warn", "disagreeing_rows", "CompileGuard", "Compiled",
           "Engine", "RuntimeClassifier", "compiled_vs_eager", "compile_report", "raise_recompile_limit"]
