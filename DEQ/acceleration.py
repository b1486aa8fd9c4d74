"""How a model is evaluated: eager or ``torch.compile``d, fp32 or bf16, with or without CUDA graphs.

:func:`resolve_runtime` turns ``--compile``/``--precision`` into a :class:`Runtime`; :func:`apply_runtime`
applies it (a DEQ's stem, f and head through an :class:`Engine`, the solver staying eager fp32; a plain
classifier wrapped in :class:`RuntimeClassifier`).  Guarantees: padded rows repeat the call's own rows and
rows are independent in eval mode, so padding changes no real row; under bf16 the certified classifier is
the bf16 model in every mode (all go through ``model.solve``); ``--compile auto`` falls back to eager on a
compile failure or a first-batch disagreement (:class:`CompileGuard`).  Details: docs/certification.md,
"Compiled and bf16 evaluation".
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
        compile: evaluate through ``torch.compile`` (static shapes); cuda_graphs: ``mode="reduce-overhead"``.
        precision: 'fp32' or 'bf16' (autocast of stem, f and head; the solver stays fp32).
        pad_rows: row counts a compiled call is padded to (the smallest that holds it; None: no padding).
        fallback: True (``--compile auto``): failures and first-batch disagreements fall back to eager;
            False (``--compile on``): a failure is a one-line error.
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
        """The results header's ``compile`` entry: 'off', 'on' or 'on cuda_graphs', and with ``fallback`` the
        policy of ``--compile auto`` (the header is written before the first image, so it records what a
        fallback would do, never that the run stayed compiled; a fallback itself is warned on stderr)."""
        text = f"{'on' if self.compile else 'off'}" + (" cuda_graphs" if self.cuda_graphs else "")
        if self.compile and self.fallback:
            text += " (auto: eager after a compile failure or a first-batch disagreement, warned on stderr)"
        return text


def static_rows(batch: int, *phases: Optional[int]) -> Tuple[int, ...]:
    """The distinct row counts (ascending) a sampling run calls the model with: ``batch``, its quarters, and
    each phase's first and last mini-batch (``phases``: N0, N, ...; None ignored)."""
    sizes = {-(-batch * j // 4) for j in range(1, 5)}  # quarters: a pair chunk wastes < batch / 4 rows
    for n in phases:
        if n:
            sizes.add(min(n, batch))
            if n % batch:
                sizes.add(n % batch)
    return tuple(sorted(sizes))


def resolve_runtime(compile: str, precision: str, device: torch.device,
                    pad_rows: Optional[Union[int, Tuple[int, ...]]] = None) -> Runtime:
    """The runtime the flags ask for on ``device`` ('auto': compile on CUDA only; CUDA graphs whenever
    compiling on CUDA, with ``cudnn.benchmark`` unless ``cudnn.deterministic``).  ``pad_rows``: see
    :class:`Runtime`.  Raises UserError for an unknown choice."""
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
    """Allow dynamo ``limit`` compiled versions per code object: stem, f and head of every engine share one
    code object (``Compiled._eval``), and dynamo's default of 8 would fall back to eager within one run."""
    import torch._dynamo.config as dcfg
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(dcfg, name) and getattr(dcfg, name) < limit:
            setattr(dcfg, name, limit)


def pad_to(t: Optional[torch.Tensor], rows: Optional[int]) -> Optional[torch.Tensor]:
    """``t`` (B, ...) with its own rows repeated cyclically up to ``rows`` rows (unchanged if None or long
    enough).  Copies rather than zeros: a copy meets a solve's tolerance when its original does, so padding
    never changes when a solve stops."""
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

    A row agrees when the compiled argmax is the eager argmax or a class within
    ``TIE_TOLERANCE[precision] * max(1, max |eager logit|)`` of the eager top logit (rounding may break
    ties either way; logits are not compared).  Half-precision logits use the bf16 tolerance.  A row
    non-finite in exactly one of them disagrees.
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
    """What the compiled functions of one model (stem, f, head) do when compiling goes wrong.

    With ``Runtime.fallback`` the first failure (:meth:`failed`) or disagreement (:meth:`check`) warns once
    and sets ``eager`` for every function of the model; otherwise a failure raises :class:`UserError` and
    agreement is not checked.  ``pending``: agreement checks still due ('eval', 'train').
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
        """The agreement check ``what`` ('eval' or 'train'), once; ``eager()`` computes the reference logits.
        Returns False after a disagreement (warned; use the eager result), True otherwise."""
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
    """One function (tensors in, one tensor out) evaluated as ``runtime`` says: compiled (first call per shape
    timed into ``clock[name]``), autocast, fp32 out.  ``guard``: shared by a model's functions (own if None).
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
    """The stem (``inject``), ``f_flat`` ((z, injection) -> f(z)) and ``head`` of a DEQ under a :class:`Runtime`
    (what ``model.solve`` uses), all sharing one :class:`CompileGuard`.

    With ``train`` and ``runtime.compile``, ``train_f`` is ``f_flat`` for the training no-grad solve: never
    padded (dropout masks have the batch dimension), timed on ``train_clock``; None otherwise.
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
        """The same stem, f and head, eager at the same precision and padding (the agreement reference)."""
        inject, f_flat, head, device_type = self.functions
        runtime = Runtime(precision=self.runtime.precision, pad_rows=self.runtime.pad_rows)
        return Engine(inject, f_flat, head, runtime, device_type)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in first calls (compilation plus one evaluation) so far."""
        return sum(self.clock.values())

    def compile_report(self) -> Optional[str]:
        """One line on the compile time, the first time there is one (None otherwise or after a fallback)."""
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
    """A plain classifier (images -> logits) under a runtime: compiled forward (no-grad calls) and autocast."""

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
    """``model`` under ``runtime``: a DEQ with ``set_runtime`` is changed in place and returned; a plain
    classifier is returned as is (eager fp32) or wrapped in a :class:`RuntimeClassifier`."""
    if hasattr(model, "set_runtime"):
        model.set_runtime(runtime)
        return model
    if runtime.plain:
        return model
    device = next(model.parameters()).device
    return RuntimeClassifier(model, runtime, device.type)


def compiled_vs_eager(model: torch.nn.Module, x: torch.Tensor, runtime: Runtime, solver: str = "anderson",
                      max_iter: int = 30) -> Dict[str, object]:
    """Solve ``x`` with a DEQ eagerly and under ``runtime`` (compile call, then a replay) and compare them
    (``scripts/check_compile.py``); the model is reset to eager afterwards.

    Returns:
        dict: ``rows``, ``disagreeing`` (:func:`disagreeing_rows`), ``argmax_equal``, ``max_abs_diff``,
        ``logit_scale``, ``fell_back`` (the guard fell back to eager), ``compile_seconds``.
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
