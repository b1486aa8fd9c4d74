"""One runner for every certification mode: a typed run description (:class:`RunSpec`), executed image by image.

:func:`run` executes a spec for a :class:`Mode`.  Noise is seeded per image from (seed, idx)
(:func:`image_generator`), so a resumed run writes the same rows as an uninterrupted one.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Protocol, Sequence

import torch
from tqdm import tqdm

from DEQ.acceleration import (COMPILE_CHOICES, PRECISIONS, Runtime, apply_runtime, compile_report,
                              resolve_runtime, static_rows)
from DEQ.checkpoint import load_model
from DEQ.checks import check_choice, check_count, check_number
from DEQ.data import dataset_info, get_dataset
from DEQ.errors import UserError
from DEQ.interface import is_deq
from DEQ.utils import is_out_of_memory, pick_device, set_seed, set_threads

from .distributed import World, check_same, deal, wait_all
from .results import (PLANNER, RESUME_IGNORED_KEYS, UNTIMED, ResultsFile, consolidate, count_rows, header_value,
                      provenance, read_rows, shard_files, shard_path)
from .settings import DEQSolve, SmoothingSpec, SRSConfig, parse_conf_drop
from .smooth import Smooth
from .source import (ModelInfo, ModelSource, certified_model, checkpoint_info, model_object, object_info,
                     object_runtime)

# ----------------------------------------------------------------------------- the run description
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
class RunSpec:
    """Everything one run needs; built by ``SRS.cli`` from the flags, or directly (benchmark, tests).

    ``checkpoint``: a checkpoint path (``cfg``: the yaml of a bare reference state_dict) or a model object
    (``torch.nn.Module`` or ``SRS.source.ModelObject``).  ``outfile``: the results TSV; ``seed``: per-image noise is
    seeded from (seed, idx); ``device``: auto, cpu, cuda, cuda:N; ``threads`` None: ``DEQ.utils.default_threads``;
    ``resume`` / ``overwrite`` an existing outfile; ``progress``: a bar on rank 0; ``dist_timeout``: torchrun
    minutes; ``compile``: auto/on/off (``DEQ.acceleration``); ``precision``: fp32/bf16 (checked on --resume);
    ``announce``: print the certified-model line (rank 0)."""
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
    announce: bool = True

    def validate(self, routes: bool = True, table: bool = False) -> None:
        """Every error in the description, one line each, before any work (``routes``, ``table``: as
        :meth:`SmoothingSpec.validate`)."""
        if self.resume and self.overwrite:
            raise UserError("--resume continues OUTFILE and --overwrite replaces it: give one of them")
        check_choice("--compile", self.compile, COMPILE_CHOICES)
        check_choice("--precision", self.precision, PRECISIONS)
        self.sampling.validate()
        self.data.validate()
        check_count("--threads", self.threads, 1)
        check_number("--dist_timeout", self.dist_timeout, 0, strict=True, hint=" (minutes)")
        self.smoothing.validate(self.sampling.N, routes=routes, table=table)


# ----------------------------------------------------------------------------- modes
class Mode(Protocol):
    """What a mode adds to the runner: ``name`` (the header's ``mode``), ``columns`` (``SRS.results``),
    ``routes`` (CERTIFY's standard fallback route applies: ``--no_fallback``, ``--route_pilot``, ``--step_cost``) and
    ``table`` (it decides each image's row at ``--radii``, so ``--radii`` applies without adaptive pairing)."""
    name: str
    columns: Sequence[str]
    routes: bool
    table: bool

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


SOLVER_FLAGS = ("f_thresh", "f_solver", "std_solver", "std_thresh", "tol")


def build_smooth(spec: RunSpec, model: torch.nn.Module, info: ModelInfo) -> Smooth:
    """The smoothed classifier of ``spec`` on ``model`` (the certified model's defaults from its source,
    ``info``: a checkpoint's CERTIFY section, :func:`certified_model`)."""
    standard, srs = spec.smoothing.resolve(info.default, spec.sampling.sigma)
    solver_flags = [opt.flag for name, opt in spec.smoothing.changed() if name in SOLVER_FLAGS]
    if solver_flags and srs is None and not is_deq(model):
        raise UserError(f"{solver_flags[0]} sets the fixed-point solver of a deep equilibrium model, but {info.kind} "
                        f"(one forward pass, no solver): drop {solver_flags[0]}")
    if srs is not None and not is_deq(model):
        raise UserError(f"--srs needs a deep equilibrium model, but {info.kind} (no fixed point to warm-start); "
                        f"certify it without --srs (standard randomized smoothing)")
    return Smooth(model, info.num_classes, spec.sampling.sigma, standard=standard, srs=srs)


def smoothing_header(standard: Optional[DEQSolve], srs: Optional[SRSConfig], routes: bool = True) -> Dict[str, object]:
    """The header entries of a smoothed classifier: the certified model (``standard``; None for a plain
    classifier, which has no solver), its tolerance and the SRS settings (``SRSConfig.describe``; the
    fallback route's settings only where the mode has that route, ``routes``)."""
    if standard is None:
        return {"standard": "forward", "tol": None, "srs": "off"}
    return {"standard": standard.describe(), "tol": standard.tol,
            "srs": "off" if srs is None else srs.describe(routes=routes)}


def smooth_header(smooth: Smooth, routes: bool = True) -> Dict[str, object]:
    """:func:`smoothing_header` of ``smooth``."""
    return smoothing_header(smooth.standard if smooth.is_deq else None, smooth.srs, routes)


def certified_line(smooth: Smooth, source: str, model_name: str, routes: bool = True) -> str:
    """The line a run prints before its work: ``certifying MDEQ-30A (anderson, 30 evaluations, tol 0) of CKPT
    with SRS-3A steps`` (``predicting with ...`` in a mode without CERTIFY's route; a plain classifier is
    named by ``model_name``)."""
    verb = "certifying" if routes else "predicting with"
    what = smooth.standard.words() if smooth.is_deq else f"{model_name} (one forward pass)"
    line = f"{verb} {what} of {source}"
    if smooth.srs is not None:
        step = smooth.srs.step
        line += f" with SRS-{step.label()} steps"
        if step.tol != smooth.standard.tol:
            line += f" (step tol {step.tol:g})"
    return line


def run_header(spec: RunSpec, mode: Mode, smooth: Smooth, loaded: Loaded, threads: int) -> Dict[str, object]:
    """The '#' header of a results file: every setting that changes a row, plus provenance.  On --resume
    every entry outside ``SRS.results.RESUME_IGNORED_KEYS`` must match, so a new entry is checked without further work.
    """
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

    Under torchrun the images still to do are dealt to the ranks, whose shard files rank 0 merges in image order
    (``SRS.distributed``).  Returns a summary of the whole file (``rows``, ``accuracy``, ``seconds_per_image``,
    ``images`` computed now, ``skipped_done``, ``main``, the mode's entries, ``planner_seconds`` of the images computed
    now).  Running out of memory is a one-line error saying what to lower; rows written so far stay."""
    spec.validate(routes=mode.routes, table=mode.table)
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
    _announce(spec, mode, smooth, loaded, True)
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
    _announce(spec, mode, smooth, loaded, world.is_main)
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


def _announce(spec: RunSpec, mode: Mode, smooth: Smooth, loaded: Loaded, main: bool) -> None:
    """Print :func:`certified_line` (once: rank 0, and only with ``spec.announce``)."""
    if spec.announce and main:
        info = loaded.info
        source = info.header.get("checkpoint") or f"the model object {info.header.get('model')}"
        print(certified_line(smooth, source, info.kind.rsplit(" ", 1)[-1], mode.routes), flush=True)


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
           "certified_model", "smoothing_header", "smooth_header", "certified_line", "run_header", "image_generator",
           "run"]
