"""One runner for every certification mode: a typed run description, executed image by image.

:class:`RunSpec` says everything a run needs (data, checkpoint, images, seed, device, sampling
and the smoothed classifier); the command lines (``SRS.cli``) and the benchmark
(``SRS.benchmark``) build it alike.  :func:`run` executes it for a :class:`Mode` (certify,
predict, QCRS, ...), which supplies its columns, its extra header entries (checked on
``--resume``) and the work on one image:

    validate -> threads -> checkpoint + data set -> smoothed classifier -> results file
    -> for each chosen image not yet in the file: mode.work -> one row -> summary

Noise is seeded per image from (seed, idx) (:func:`image_generator`), so a resumed run writes
the same rows as an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch
from tqdm import tqdm

from DEQ.acceleration import (COMPILE_CHOICES, PRECISIONS, Runtime, apply_runtime, compile_report,
                              resolve_runtime, static_rows)
from DEQ.checkpoint import load_model
from DEQ.checks import check_choice, check_count, check_number
from DEQ.data import dataset_info, get_dataset
from DEQ.errors import UserError
from DEQ.interface import is_deq
from DEQ.solvers import SOLVERS
from DEQ.utils import is_out_of_memory, pick_device, set_seed, set_threads

from .distributed import World, check_same, deal, wait_all
from .results import (PLANNER, RESUME_IGNORED_KEYS, UNTIMED, ResultsFile, consolidate, count_rows, header_value,
                      provenance, read_rows, shard_files, shard_path)
from .settings import WARM_STARTS, DEQSolve, SRSConfig
from .smooth import Smooth
from .source import ModelInfo, ModelSource, checkpoint_info, model_object, object_info, object_runtime

SRS_DEFAULTS = SRSConfig()   # the defaults the flags fall back to (one place: SRSConfig)

CERTIFICATES = ("eliminated", "reference", "none")


# ----------------------------------------------------------------------------- the run description
def parse_conf_drop(value) -> Optional[int]:
    """``--conf_drop``: 'auto' (or None) -> None (adaptive pairing), else a whole number K."""
    if value is None or value == "auto":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"--conf_drop must be 'auto' (adaptive pairing) or a whole number K, got {value!r}") from None


@dataclass(frozen=True)
class DataSpec:
    """Which images: data set, split, local root, every ``skip``-th image, at most ``max`` (-1: all)."""
    dataset: str
    split: str = "test"
    data_dir: Optional[str] = None
    skip: int = 1
    max: int = -1

    def indices(self, n_items: int) -> List[int]:
        """Every skip-th image (idx % skip == 0); stop after ``max`` of them (max < 0: all), as the reference."""
        idx = list(range(0, n_items, self.skip))
        return idx if self.max is None or self.max < 0 else idx[:self.max]

    def validate(self) -> None:
        dataset_info(self.dataset)
        if self.skip < 1:
            raise UserError(f"--skip must be >= 1, got {self.skip}")
        check_count("--max", self.max, 1, allow=-1, hint=" (-1: all images)")


@dataclass(frozen=True)
class Sampling:
    """Noise level and sample sizes: N0 selection samples (None: the mode has none), N estimation samples."""
    sigma: Optional[float]
    N: int
    alpha: float = 0.001
    batch: int = 1000
    N0: Optional[int] = None

    def validate(self) -> None:
        # `not (0 < sigma < inf)` also refuses nan, which otherwise ran the whole certification and wrote
        # radius nan; inf would make every noisy input nan.
        if self.sigma is not None and not (0 < self.sigma < float("inf")):
            raise UserError(f"sigma must be > 0 and finite, got {self.sigma}")
        for name in ("N0", "N"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be >= 1, got {value}")
        if not 0 < self.alpha < 1:
            raise UserError(f"--alpha must be in (0, 1), got {self.alpha}")
        if self.batch < 1:
            raise UserError(f"--batch must be >= 1, got {self.batch}")


@dataclass(frozen=True)
class SmoothingSpec:
    """The smoothed classifier as the flags describe it; None fields take the checkpoint config's value.

    Standard mode: ``f_solver``/``f_thresh`` are the standard model.  ``srs``: they are the SRS step
    from the warm start and ``std_solver``/``std_thresh`` the standard model (see ``SRS.cli``).
    ``conf_drop`` None is adaptive pairing (``--conf_drop auto``)."""
    srs: bool = False
    f_solver: Optional[str] = None
    f_thresh: Optional[int] = None
    tol: Optional[float] = None
    std_solver: Optional[str] = None
    std_thresh: Optional[int] = None
    step_tol: Optional[float] = None
    warmup_solver: Optional[str] = None
    warmup_thresh: Optional[int] = None
    warmup_interval: int = 0
    warm_start: str = "previous"
    conf_drop: Optional[int] = None
    certificate: str = "eliminated"
    chain_across_phases: bool = True
    radius_slack: float = SRS_DEFAULTS.radius_slack
    max_pairs: Optional[int] = None
    fallback: bool = True
    step_cost: Optional[float] = None
    refine_margin: float = 0.0
    route_pilot: float = SRS_DEFAULTS.route_pilot
    radius_grid: Optional[float] = None
    second_look: float = 0.0

    def validate(self, n: int, n_name: str = "N", routes: bool = True) -> None:
        """Every setting error, one line each (``n``: the samples the pairs are drawn from; ``routes``: whether
        the mode has the standard fallback route; PREDICT has none, so its flags are refused there)."""
        check_number("--tol", self.tol, 0, hint=" (0: always run the whole budget)")
        for flag in ("f_solver", "warmup_solver", "std_solver"):
            name = getattr(self, flag)
            if name is not None and name not in SOLVERS:
                raise UserError(f"--{flag} {name!r} is not a solver; choose one of {', '.join(sorted(SOLVERS))}")
        for flag in ("f_thresh", "warmup_thresh", "std_thresh"):
            v = getattr(self, flag)
            if v is not None and v < 1:
                raise UserError(f"--{flag} must be >= 1 evaluation, got {v}")
        if self.certificate not in CERTIFICATES:
            raise UserError(f"--certificate {self.certificate!r} is not one of {', '.join(CERTIFICATES)}")
        if self.conf_drop is not None:
            if self.conf_drop < 0:
                raise UserError(f"--conf_drop must be >= 0, got {self.conf_drop}")
            if self.conf_drop > n:
                raise UserError(f"--conf_drop {self.conf_drop} is larger than --{n_name} {n}: the pairs are drawn "
                                f"from those samples; lower it")
        if self.srs and self.conf_drop == 0 and self.certificate != "none":
            raise UserError(f"--conf_drop 0 pairs no sample, so the {self.certificate} certificate has no evidence "
                            f"about the standard model and abstains on every image; use --conf_drop auto or a K > 0")
        check_choice("--warm_start", self.warm_start, WARM_STARTS)
        srs_only = [f for f, on in (("--std_solver", self.std_solver is not None),
                                    ("--std_thresh", self.std_thresh is not None),
                                    ("--certificate", self.certificate != "eliminated"),
                                    ("--conf_drop", self.conf_drop is not None),
                                    ("--warmup_solver", self.warmup_solver is not None),
                                    ("--warmup_thresh", self.warmup_thresh is not None),
                                    ("--warmup_interval", self.warmup_interval != 0),
                                    ("--step_tol", self.step_tol is not None),
                                    ("--no_chain_across_phases", not self.chain_across_phases),
                                    ("--warm_start", self.warm_start != "previous")) if on]
        if srs_only and not self.srs:
            raise UserError(f"{srs_only[0]} sets the SRS chain or its certificate, which needs --srs (without it "
                            f"--f_solver/--f_thresh/--tol set the certified standard model)")
        if self.warmup_interval < 0:
            raise UserError(f"--warmup_interval must be >= 0, got {self.warmup_interval}")
        check_number("--radius_slack", self.radius_slack, 0, hint=" (in units of sigma)")
        if self.max_pairs is not None and not 1 <= self.max_pairs <= n:
            raise UserError(f"--max_pairs must be between 1 and --{n_name} {n} (pairs are drawn from those samples), "
                            f"got {self.max_pairs}")
        check_number("--step_tol", self.step_tol, 0)
        check_number("--step_cost", self.step_cost, 0, strict=True, hint=" (evaluations of f)")
        check_number("--refine_margin", self.refine_margin, 0, hint=" (a logit margin; 0 turns it off)")
        if self.refine_margin > 0 and not self.srs:
            raise UserError("--refine_margin re-solves low-margin SRS samples, which needs --srs")
        check_number("--route_pilot", self.route_pilot, 0, hint=" (a fraction of N; 0 turns the pilot off)")
        check_number("--radius_grid", self.radius_grid, 0, strict=True, hint=" (pixel units, e.g. a table's radius step)")
        if not (self.second_look == 0 or (math.isfinite(self.second_look) and self.second_look > 1)):
            raise UserError(f"--second_look must be 0 (off) or a factor > 1 (pairs of both looks over the first "
                            f"look's), got {self.second_look}")
        if self.second_look and self.certificate != "eliminated":
            raise UserError("--second_look splits the eliminated certificate's misalignment bound; it needs "
                            "--certificate eliminated")
        adaptive_only = [f for f, on in (("--radius_grid", self.radius_grid is not None),
                                         ("--second_look", self.second_look != 0),
                                         ("--radius_slack", self.radius_slack != SRS_DEFAULTS.radius_slack),
                                         ("--max_pairs", self.max_pairs is not None),
                                         ("--no_fallback", not self.fallback),
                                         ("--step_cost", self.step_cost is not None),
                                         ("--route_pilot", self.route_pilot != SRS_DEFAULTS.route_pilot)) if on]
        if adaptive_only and (not self.srs or self.conf_drop is not None):
            raise UserError(f"{adaptive_only[0]} sets adaptive pairing, which needs --srs and --conf_drop auto")
        if self.radius_grid is not None and self.radius_slack != SRS_DEFAULTS.radius_slack:
            raise UserError("--radius_grid replaces --radius_slack (pairs aim at grid radii); give one of them")
        route_only = [f for f, on in (("--no_fallback", not self.fallback),
                                      ("--route_pilot", self.route_pilot != SRS_DEFAULTS.route_pilot),
                                      ("--step_cost", self.step_cost is not None)) if on]
        if route_only and not routes:
            raise UserError(f"{route_only[0]} sets the standard fallback route of CERTIFY; PREDICT has no such route "
                            f"(its pairs are sized without it): drop {route_only[0]}")
        if self.route_pilot != SRS_DEFAULTS.route_pilot and not self.fallback:
            raise UserError("--route_pilot refines the standard fallback's decision, which --no_fallback turns off")

    def resolve(self, default: DEQSolve) -> Tuple[DEQSolve, Optional[SRSConfig]]:
        """(standard model, SRS settings or None), the None fields filled from ``default`` (the checkpoint
        config's solver, budget and tolerance)."""
        tol = default.tol if self.tol is None else self.tol  # explicit, so the header records the tolerance used
        if not self.srs:
            return DEQSolve(self.f_solver or default.solver, self.f_thresh or default.max_iter, tol), None
        standard = DEQSolve(self.std_solver or default.solver, self.std_thresh or default.max_iter, tol)
        step = DEQSolve(self.f_solver or "anderson", self.f_thresh or 1, tol if self.step_tol is None else self.step_tol)
        warm = DEQSolve(self.warmup_solver or step.solver, self.warmup_thresh or 10, tol)
        return standard, SRSConfig(step=step, warmup=warm, warmup_interval=self.warmup_interval,
                                   warm_start=self.warm_start, conf_drop=self.conf_drop,
                                   certificate=self.certificate, chain_across_phases=self.chain_across_phases,
                                   radius_slack=self.radius_slack, max_pairs=self.max_pairs, fallback=self.fallback,
                                   step_cost=self.step_cost, refine_margin=self.refine_margin,
                                   route_pilot=self.route_pilot, radius_grid=self.radius_grid,
                                   second_look=self.second_look)


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs.  Built by ``SRS.cli`` from the flags, or directly (benchmark, tests).

    Attributes:
        data: which images.
        checkpoint: the model to certify: a checkpoint path (written by ``DEQ/tools/cls_train.py``, or a bare
            reference state_dict with ``cfg``), or a model object (a ``torch.nn.Module``, or an
            ``SRS.source.ModelObject`` around one; what it must provide is said there).
        outfile: the results TSV (``SRS.results``).
        sampling: sigma, N0, N, alpha, batch.
        smoothing: the smoothed classifier's settings.
        cfg: yaml config, only for bare reference state_dicts that carry none.
        seed: per-image noise is seeded from (seed, idx).
        device: auto (CUDA if present), cpu, cuda, cuda:N.
        threads: torch CPU threads (None: ``DEQ.utils.default_threads``).
        resume, overwrite: continue / replace an existing OUTFILE.
        progress: show a progress bar (rank 0 only under torchrun, counting every rank's rows).
        dist_timeout: minutes a torchrun rank waits for the others (process group timeout).
        compile: 'auto' (on for CUDA), 'on', 'off': evaluate the model through torch.compile
            (``DEQ.acceleration``; the row counts of ``static_rows(batch, N0, N)`` are compiled, other calls
            padded to the next of them).
        precision: 'fp32' or 'bf16': the certified model's precision (a header entry, checked on --resume).
    """
    data: DataSpec
    checkpoint: ModelSource
    outfile: str
    sampling: Sampling
    smoothing: SmoothingSpec = field(default_factory=SmoothingSpec)
    cfg: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    threads: Optional[int] = None
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    dist_timeout: float = 120.0
    compile: str = "auto"
    precision: str = "fp32"

    def validate(self, routes: bool = True) -> None:
        """Every error in the description, one line each, before any work (``routes``: as
        :meth:`SmoothingSpec.validate`)."""
        if self.resume and self.overwrite:
            raise UserError("--resume continues OUTFILE and --overwrite replaces it: give one of them")
        check_choice("--compile", self.compile, COMPILE_CHOICES)
        check_choice("--precision", self.precision, PRECISIONS)
        self.sampling.validate()
        self.data.validate()
        check_count("--threads", self.threads, 1)
        check_number("--dist_timeout", self.dist_timeout, 0, strict=True, hint=" (minutes)")
        self.smoothing.validate(self.sampling.N, routes=routes)


# ----------------------------------------------------------------------------- modes
class Mode(Protocol):
    """What a mode adds to the runner.

    Attributes:
        name: the header's ``mode`` entry (certify, predict, certify_qcrs, ...).
        columns: the results columns (``SRS.results``).
        routes: whether the mode certifies with CERTIFY's standard fallback route (``--no_fallback``,
            ``--route_pilot`` and ``--step_cost`` apply); False for PREDICT-based modes.
    """
    name: str
    columns: Sequence[str]
    routes: bool

    def header(self) -> Dict[str, object]:
        """Extra header entries (checked on --resume like every other setting)."""

    def work(self, smooth: Smooth, x: torch.Tensor, label: int, idx: int, generator: torch.Generator) -> Dict[str, object]:
        """The row of one image (without ``time``, which the runner adds)."""

    def summary(self, rows: List[Dict[str, str]]) -> Dict[str, float]:
        """Extra summary entries over all rows of the file."""


# ----------------------------------------------------------------------------- running
@dataclass
class Loaded:
    """The model, what the run takes from its source (``SRS.source``), the data set and the device of a run."""
    model: torch.nn.Module
    info: ModelInfo
    dataset: object
    device: torch.device
    runtime: Runtime = Runtime()


def load(spec: RunSpec, device: torch.device) -> Loaded:
    """Model, what the run takes from its source, data set and device, with the checks that the model (checkpoint
    or model object, ``SRS.source``) fits the data set."""
    rows = static_rows(spec.sampling.batch, spec.sampling.N0, spec.sampling.N)
    obj = model_object(spec.checkpoint)
    if obj is None:
        loaded = load_model(spec.checkpoint, device, cfg_path=spec.cfg)  # read once: weights and sha256
        info = checkpoint_info(spec.checkpoint, loaded, spec.data.dataset, spec.cfg)
        model = loaded.model
        runtime = resolve_runtime(spec.compile, spec.precision, device, pad_rows=rows)
    else:
        info = object_info(obj, spec.data.dataset, spec.cfg)
        model = obj.model.to(device)
        runtime = object_runtime(model, spec.compile, spec.precision, device, pad_rows=rows)
    dataset = get_dataset(spec.data.dataset, spec.data.split, spec.data.data_dir, image_size=info.image_size)
    return Loaded(apply_runtime(model.eval(), runtime), info, dataset, device, runtime)


def build_smooth(spec: RunSpec, model: torch.nn.Module, info: ModelInfo) -> Smooth:
    """The smoothed classifier of ``spec`` on ``model`` (defaults from its source, ``info``)."""
    default = info.default
    standard, srs = spec.smoothing.resolve(default)
    sm = spec.smoothing
    solver_flags = [f for f, v in (("--f_solver", sm.f_solver), ("--f_thresh", sm.f_thresh), ("--tol", sm.tol)) if v is not None]
    if solver_flags and srs is None and not is_deq(model):
        raise UserError(f"{solver_flags[0]} sets the fixed-point solver of a deep equilibrium model, but {info.kind} "
                        f"(one forward pass, no solver): drop {solver_flags[0]}")
    if srs is not None and not is_deq(model):
        raise UserError(f"--srs needs a deep equilibrium model, but {info.kind} (no fixed point to warm-start); "
                        f"certify it without --srs (standard randomized smoothing)")
    return Smooth(model, info.num_classes, spec.sampling.sigma, standard=standard, srs=srs)


def smooth_header(smooth: Smooth, routes: bool = True) -> Dict[str, object]:
    """The header entries of the smoothed classifier (standard model, tolerance, SRS settings; the fallback
    route's settings only where the mode has that route, ``routes``)."""
    if not smooth.is_deq:  # a plain classifier (ResNet): no solver settings
        return {"standard": "forward", "tol": None, "srs": "off"}
    return {"standard": smooth.standard.describe(), "tol": smooth.standard.tol,
            "srs": "off" if smooth.srs is None else smooth.srs.describe(routes=routes)}


def run_header(spec: RunSpec, mode: Mode, smooth: Smooth, loaded: Loaded, threads: int) -> Dict[str, object]:
    """The '#' header of a results file: every setting that changes a row, plus provenance.

    On --resume every entry must match except those in ``SRS.results.RESUME_IGNORED_KEYS``
    (command, versions, date, max, device, checkpoint path, threads, ...), so an entry added here,
    in a mode's header or in ``SRSConfig.describe`` is checked without further work."""
    s, d = spec.sampling, spec.data
    sampling = {"sigma": s.sigma, **({"N0": s.N0} if s.N0 is not None else {}), "N": s.N, "alpha": s.alpha,
                "skip": d.skip, "batch": s.batch, "seed": spec.seed, "max": d.max}
    return {**provenance(), "mode": mode.name, "dataset": d.dataset, "split": d.split, **sampling, **mode.header(),
            **loaded.info.header,
            "data_dir": os.path.abspath(d.data_dir) if d.data_dir and d.dataset != "digits" else None,
            "device": str(loaded.device), "threads": threads, **smooth_header(smooth, mode.routes),
            "precision": loaded.runtime.precision, "compile": loaded.runtime.describe()}


def image_generator(seed: int, idx: int, device) -> torch.Generator:
    """Per-image noise stream: a resumed run redraws exactly the same noise."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + idx)


def run(spec: RunSpec, mode: Mode, world: Optional[World] = None) -> Dict[str, float]:
    """Execute ``spec`` in ``mode``: one row per chosen image not yet in OUTFILE, written as it comes.

    Under torchrun (``world``: default from the environment) the images still to do are dealt to
    the ranks, each writes its own shard file, and rank 0 merges them into OUTFILE in image order
    (``SRS.distributed``); without torchrun, and without shards of an earlier distributed run to
    merge, OUTFILE is written directly.

    Returns:
        Summary over the whole file (after --resume too): ``rows``, ``accuracy`` and
        ``seconds_per_image`` over all its rows, ``images`` computed now, ``skipped_done`` already
        there, ``main`` (whether this is rank 0, the process that should report), plus the mode's
        own entries; and ``planner_seconds``, the pairing planner's mean seconds per image over the
        images this process computed now (NaN when none; in no column of the file).  Running out of
        memory is a one-line error saying what to lower; the rows written so far stay.
    """
    spec.validate(routes=mode.routes)
    world = World.from_env() if world is None else world
    threads = set_threads(spec.threads)
    device = world.pick_device(pick_device(spec.device))
    world.start(device, spec.dist_timeout)
    try:
        loaded = load(spec, device)
        set_seed(spec.seed)
        smooth = build_smooth(spec, loaded.model, loaded.info)
        header = run_header(spec, mode, smooth, loaded, threads)
        check_same(world, {k: header_value(v) for k, v in header.items() if k not in RESUME_IGNORED_KEYS})
        if not world.distributed and not shard_files(spec.outfile):
            summary = _run_single(spec, mode, smooth, loaded, header)
        else:
            summary = _run_sharded(spec, mode, smooth, loaded, header, world)
    finally:
        world.stop()
    summary["main"] = world.is_main
    return summary


def _run_single(spec: RunSpec, mode: Mode, smooth: Smooth, loaded: Loaded, header) -> Dict[str, float]:
    """One process writing OUTFILE itself (appending on --resume)."""
    results = ResultsFile(spec.outfile, mode.columns, header).open(spec.resume, spec.overwrite)
    done = len(results.done)
    todo = [i for i in spec.data.indices(len(loaded.dataset)) if i not in results.done]
    progress = _Progress(mode.name, len(todo), spec.progress)
    try:
        new = _loop(spec, mode, smooth, loaded, results, todo, progress)
    finally:
        progress.close()
        results.close()
    return {**_summary(mode, results.rows, new, done), "planner_seconds": progress.planner_mean}


def _run_sharded(spec: RunSpec, mode: Mode, smooth: Smooth, loaded: Loaded, header, world: World) -> Dict[str, float]:
    """Every rank its share of the images, in its own shard file; rank 0 merges before and after."""
    out, columns = spec.outfile, mode.columns

    def merge_done() -> List[int]:
        consolidate(out, columns, header, spec.resume, spec.overwrite)
        return sorted(int(r["idx"]) for r in read_rows(out)[2]) if os.path.isfile(out) else []

    done = set(world.on_rank0(merge_done))
    todo = [i for i in spec.data.indices(len(loaded.dataset)) if i not in done]
    shard_names = [shard_path(out, r, world.size) for r in range(world.size)]
    results = ResultsFile(shard_names[world.rank], columns, header).open(resume=False, overwrite=True)
    progress = _Progress(mode.name, len(todo), spec.progress and world.is_main,
                         lambda: sum(count_rows(p) for p in shard_names))
    try:
        try:
            _loop(spec, mode, smooth, loaded, results, deal(todo, world.rank, world.size), progress)
        finally:
            results.close()
        wait_all(world, progress.refresh)
    finally:
        progress.close()

    def merge_all() -> List[Dict[str, str]]:
        consolidate(out, columns, header, resume=True, overwrite=False)
        return read_rows(out)[2]

    rows = world.on_rank0(merge_all)
    return {**_summary(mode, rows, len(rows) - len(done), len(done)), "planner_seconds": progress.planner_mean}


class _Progress:
    """A tqdm bar over ``total`` images; ``count`` (if given) reads the rows written by every rank."""

    def __init__(self, label: str, total: int, show: bool, count: Optional[Callable[[], int]] = None):
        self.bar = tqdm(total=total, desc=label, unit="img", disable=not show, dynamic_ncols=True)
        self.count, self.correct, self.new, self.seconds = count, 0, 0, 0.0
        self.planner = 0.0

    def image_done(self, row: Dict[str, object]) -> None:
        self.new += 1
        self.correct += int(row["correct"])
        self.seconds += float(row["time"])
        self.bar.set_postfix(acc=f"{100.0 * self.correct / self.new:.1f}%", s_per_img=f"{self.seconds / self.new:.2f}")
        self.refresh()

    @property
    def planner_mean(self) -> float:
        """The planner's mean seconds per image done here (NaN: none)."""
        return self.planner / self.new if self.new else float("nan")

    def refresh(self) -> None:
        n = self.count() if self.count is not None else self.new
        self.bar.update(n - self.bar.n)

    def close(self) -> None:
        self.refresh()
        self.bar.close()


def _loop(spec: RunSpec, mode: Mode, smooth: Smooth, loaded: Loaded, results: ResultsFile, todo: Sequence[int],
          progress: _Progress) -> int:
    """Run ``mode`` on the images ``todo`` in order, one row each into ``results``; returns the rows written."""
    device = loaded.device
    for idx in todo:
        x, label = loaded.dataset[idx]
        x = x.to(device)
        t0 = time.perf_counter()
        try:
            row = mode.work(smooth, x, int(label), idx, image_generator(spec.seed, idx, device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            raise UserError(f"out of memory on {device} at image {idx}: lower --batch (now {spec.sampling.batch}) "
                            f"(the {len(results.rows)} rows written so far are kept; continue with --resume)") from None
        # the first image's time includes compiling (--compile); UNTIMED work belongs to no method
        row["time"] = time.perf_counter() - t0 - row.pop(UNTIMED, 0.0)
        progress.planner += row.pop(PLANNER, 0.0)
        note = compile_report(smooth.base_classifier)
        if note:
            print(note, flush=True)
        results.write(row)
        progress.image_done(row)
    return progress.new


def _summary(mode: Mode, rows: List[Dict[str, str]], new: int, done_before: int) -> Dict[str, float]:
    return {"images": new, "skipped_done": done_before, "rows": len(rows), "accuracy": _mean(rows, "correct"),
            "seconds_per_image": _mean(rows, "time"), **mode.summary(rows)}


def _mean(rows: List[Dict[str, str]], column: str) -> float:
    values = [float(r[column]) for r in rows]
    return sum(values) / len(values) if values else float("nan")


__all__ = ["parse_conf_drop", "DataSpec", "Sampling", "SmoothingSpec", "RunSpec", "Mode", "Loaded", "load", "build_smooth",
           "smooth_header", "run_header", "image_generator", "run"]
