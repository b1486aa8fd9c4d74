"""Run the paper's standard-vs-SRS comparison: several certify runs over the same images, one table.

Every run is a ``SRS.runner.RunSpec`` run by the runner of ``SRS/code/certify.py`` (same TSV; a re-run resumes each
file).  Labels: MDEQ-kA is the standard model with k Anderson evaluations from zeros; SRS-MDEQ-kA / -kN the
serialized model with k Anderson / naive evaluations from the warm start."""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from .analysis import certified_accuracy, read_results, summary_table, to_markdown
from .pairing import count_z, pairs_needed
from .modes import AttackMode, AttackSettings, CertifyMode, PredictMode, SequentialMode
from .ladder import DEFAULT_RUNGS, LadderMode, equal_accuracy_rung, ladder_table, rung_frames
from .runner import RunSpec, Sampling, SmoothingSpec, run
from .settings import DEQSolve, SRSConfig, SRSOptions, declared, parse_conf_drop
from .smooth import Smooth

_LETTER = {"anderson": "A", "naive": "N", "broyden": "B"}


@dataclass(frozen=True)
class Method:
    """A row of the comparison: its label and the ``SmoothingSpec`` fields it sets; ``rungs``: a standard method
    that also certifies the ladder MDEQ-k (k in rungs) from its own solves (``SRS.ladder``), in its own file;
    ``radii``: sequential CERTIFY of the table at these radii (``SRS.sequential``) instead of fixed-N CERTIFY."""
    label: str
    settings: Tuple[Tuple[str, object], ...]
    rungs: Tuple[int, ...] = ()
    radii: Tuple[float, ...] = ()

    def smoothing(self, base: SmoothingSpec) -> SmoothingSpec:
        """``base`` (common settings such as tol) with this method's settings."""
        return replace(base, **dict(self.settings))

    def file_name(self, sigma: float) -> str:
        """The method's TSV name (a ladder file is named apart: its header differs from a plain run's)."""
        return file_name(self.label + (" ladder" if self.rungs else ""), sigma)

    def mode(self, s: Sampling):
        """The runner mode of this row: CERTIFY, or CERTIFY with the ladder."""
        if self.rungs:
            return LadderMode(s.N0, s.N, s.alpha, s.batch, self.rungs)
        if self.radii:
            mode = SequentialMode(s.N0, s.N, s.alpha, s.batch, self.radii)
            given = dict(self.settings)
            mode.validate(bool(given.get("srs")), given.get("certificate", "eliminated"),
                          given.get("refine_margin", 0.0))
            return mode
        return CertifyMode(s.N0, s.N, s.alpha, s.batch)


def sequential(method: Method, radii: Sequence[float]) -> Method:
    """``method``'s sequential twin '<label> seq': sequential CERTIFY of the table at ``radii`` (no ladder)."""
    return Method(f"{method.label} seq", method.settings, (), tuple(float(r) for r in radii))


def standard_label(label: str) -> Optional[Tuple[int, str]]:
    """(k, solver) of a standard-model label 'MDEQ-kA' / 'MDEQ-kB' / 'MDEQ-kN'; None for any other label."""
    m = re.fullmatch(r"MDEQ-(\d+)([ABN])", label)
    if not m:
        return None
    return int(m.group(1)), {v: k for k, v in _LETTER.items()}[m.group(2)]


def standard(k: int, solver: str = "anderson", rungs: Sequence[int] = ()) -> Method:
    """MDEQ-k<solver> (from zeros, k evaluations); with ``rungs`` the ladder below it too."""
    return Method(f"MDEQ-{k}{_LETTER[solver]}", (("srs", False), ("f_solver", solver), ("f_thresh", k)),
                  tuple(sorted(set(rungs))))


def srs(k: int, solver: str = "anderson", std: Tuple[str, int] = ("anderson", 30),
        warmup: Tuple[str, int] = ("anderson", 10), step_tol: Optional[float] = None, **options) -> Method:
    """SRS-MDEQ-k<solver>: the SRS step of k evaluations certifying the standard model ``std``.

    ``step_tol``: run the step to that tolerance with k as a cap.  ``options``: ``SRSOptions`` fields (default: the
    declared ones); each non-default value adds its declared label suffix.  Raises TypeError for an undeclared name."""
    names = [name for name, _, _ in declared(SRSOptions)]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"srs() got options that SRS.settings does not declare: {', '.join(unknown)}")
    if "conf_drop" in options:
        options["conf_drop"] = parse_conf_drop(options["conf_drop"])
    given = SRSOptions(**options)  # the declared types (3 -> 3.0, a list of radii -> a tuple)
    suffix = "".join(opt.label_of(getattr(given, name)) for name, opt, default in declared(SRSOptions)
                     if name in options and opt.label is not None and getattr(given, name) != default)
    budget = f"{k}{_LETTER[solver]}" if step_tol is None else f"tol{step_tol:g}-{k}{_LETTER[solver]}"
    settings = (("srs", True), ("f_solver", solver), ("f_thresh", k), ("warmup_solver", warmup[0]),
                ("warmup_thresh", warmup[1]), ("std_solver", std[0]), ("std_thresh", std[1]), ("step_tol", step_tol))
    return Method(f"SRS-MDEQ-{budget}{suffix}", settings + tuple((name, getattr(given, name)) for name in names
                                                                if name in options))


def paper_methods(conf_drop: Union[int, str] = "auto", std: Tuple[str, int] = ("anderson", 30),
                  rungs: Sequence[int] = DEFAULT_RUNGS, radii: Optional[Sequence[float]] = None) -> List[Method]:
    """The rows of the paper's CIFAR-10 table: the certified model with its ladder, SRS-1N, SRS-1A, SRS-3A,
    pairing as ``conf_drop`` says (fixed K, or 'auto' aimed at ``radii``, None: multiples of sigma / 2)."""
    table = {"radii": tuple(radii)} if radii is not None and conf_drop == "auto" else {}
    return [standard(std[1], std[0], rungs=[k for k in rungs if k <= std[1]]),
            srs(1, "naive", std, conf_drop=conf_drop, **table), srs(1, "anderson", std, conf_drop=conf_drop, **table),
            srs(3, "anderson", std, conf_drop=conf_drop, **table)]


def file_name(label: str, sigma: float) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_") + f"_sigma{sigma:g}.tsv"


def run_resuming(spec: RunSpec, mode, label: str, log: Callable[[str], None] = print) -> Dict[str, float]:
    """``run(spec, mode)``, continuing ``spec.outfile`` when it already holds rows; logs what it did."""
    path = spec.outfile
    spec = replace(spec, resume=os.path.isfile(path) and os.path.getsize(path) > 0)
    t0 = time.perf_counter()
    log(f"[sigma {spec.sampling.sigma:g}] {label}: {mode.name} -> {path}")
    summary = run(spec, mode)
    log(f"[sigma {spec.sampling.sigma:g}] {label}: {summary['images']} new images in {time.perf_counter() - t0:.0f}s "
        f"({summary['skipped_done']} reused), {summary['seconds_per_image']:.2f} s/image")
    return summary


def run_methods(template: RunSpec, methods: Sequence[Method], out_dir: str,
                log: Callable[[str], None] = print, interleave: bool = True,
                planner: Optional[Dict[str, List[float]]] = None) -> Dict[str, str]:
    """Certify with every method (resuming files already there); return label -> TSV path.

    ``interleave`` (default): each image goes through every method before the next (one resumed run per image, so the
    certificates are those of one uninterrupted run), so machine load affects every method alike.  ``template``'s
    ``outfile`` becomes one file per method in ``out_dir``; ``planner`` collects label -> planner seconds per new image.
    """
    def record(label: str, summary: Dict[str, float]) -> None:
        if planner is not None and summary["images"]:
            planner.setdefault(label, []).extend([summary["planner_seconds"]] * summary["images"])

    os.makedirs(out_dir, exist_ok=True)
    s = template.sampling
    paths = {m.label: os.path.join(out_dir, m.file_name(s.sigma)) for m in methods}
    specs = {m.label: replace(template, outfile=paths[m.label], smoothing=m.smoothing(template.smoothing))
             for m in methods}
    if not interleave:
        for m in methods:
            record(m.label, run_resuming(specs[m.label], m.mode(s), m.label, log))
        return paths
    total = image_count(template)
    t0 = time.perf_counter()
    for j in range(1, total + 1):
        for m in methods:
            spec = specs[m.label]
            spec = replace(spec, data=replace(spec.data, max=j), announce=spec.announce and j == 1,
                           resume=os.path.isfile(spec.outfile) and os.path.getsize(spec.outfile) > 0)
            record(m.label, run(spec, m.mode(s)))
        if j == total or j % max(1, total // 10) == 0:
            log(f"[sigma {s.sigma:g}] {j}/{total} images through {len(methods)} methods, interleaved "
                f"({time.perf_counter() - t0:.0f}s)")
    return paths


def image_count(template: RunSpec) -> int:
    """How many images the template's data selection holds."""
    from DEQ.data import get_dataset
    d = template.data
    return len(d.indices(len(get_dataset(d.dataset, d.split, d.data_dir))))


def run_attacks(template: RunSpec, attacks: Sequence[AttackSettings], out_dir: str,
                log: Callable[[str], None] = print) -> Dict[str, str]:
    """PREDICT on the clean images, then every attack followed by PREDICT (``SRS.modes.AttackMode``),
    resuming files already there; return label -> TSV path (for ``SRS.analysis.attack_table``)."""
    os.makedirs(out_dir, exist_ok=True)
    s = template.sampling
    path = os.path.join(out_dir, file_name("clean", s.sigma))
    run_resuming(replace(template, outfile=path), PredictMode(s.N, s.alpha, s.batch), "clean", log)
    paths = {"clean": path}
    for a in attacks:
        label = f"{a.label()} eps={a.epsilon:g}"
        path = os.path.join(out_dir, file_name(label, s.sigma))
        run_resuming(replace(template, outfile=path), AttackMode(a, s.sigma, s.N, s.alpha, s.batch), label, log)
        paths[label] = path
    return paths


def comparison(paths: Dict[str, str], radii: Sequence[float], baseline: Optional[str] = None):
    """Summary table (DataFrame) and the loaded runs."""
    runs = {label: read_results(p) for label, p in paths.items()}
    table = summary_table(runs, list(radii), baseline or next(iter(runs)))
    return table, runs


def max_gap(runs, a: str, b: str, radii: Sequence[float]) -> Tuple[float, float]:
    """Largest |certified accuracy of a - of b| over the radii (points), and the radius where it happens."""
    ca, cb = certified_accuracy(runs[a], list(radii)), certified_accuracy(runs[b], list(radii))
    gaps = [100.0 * abs(x - y) for x, y in zip(ca, cb)]
    i = max(range(len(gaps)), key=gaps.__getitem__)
    return gaps[i], radii[i]


def mean_column(df, column: str) -> float:
    return float(df[column].astype(float).mean()) if column in df.columns else float("nan")


def _col(df, column: str, default: float = 0.0) -> np.ndarray:
    return df[column].astype(float).to_numpy() if column in df.columns else np.full(len(df), default)


def _routes(df, route: str) -> int:
    """Images of ``df`` on ``route`` (``fallback``: standard model outright; ``escape``: after the first look)."""
    return int((df["route"].astype(str) == route).sum()) if "route" in df.columns else 0


def evaluations_per_image(df, samples: int) -> np.ndarray:
    """Evaluations of f spent on each image: ``nfe`` (per drawn sample, pairs included) times the samples drawn
    (the ``samples`` column of a sequential run, else ``samples`` = N0 + N)."""
    return _col(df, "nfe", float("nan")) * _col(df, "samples", float(samples))


def table_goal(radius: float, correct: bool, radii: Sequence[float]) -> Optional[float]:
    """The largest table radius an image is certified at (None: it counts at none of them)."""
    if not correct or radius < 0:
        return None
    below = [r for r in radii if r <= radius + 1e-12]
    return max(below) if below else None


def cheapest_sound_cost(n_A: int, n: int, alpha: float, goal_z: Optional[float], pass_cost: float,
                        pair_cost: float, alone: float) -> float:
    """The cheapest sound certificate of one image at its table row: the SRS pass alone where no table radius is
    certified (``goal_z`` None), else the pass plus the fewest clean pairs (``pairs_needed``) that carry the
    eliminated bound to ``goal_z`` (radius / sigma), each costing ``pair_cost``; never more than the certified
    model alone (``alone``, the fallback)."""
    if goal_z is None:
        return min(pass_cost, alone)
    K = pairs_needed(n_A, n, alpha, 0.0, n_A, z_goal=goal_z)
    return alone if K is None else min(pass_cost + K * pair_cost, alone)


def limit_evaluations(rows: "pd.DataFrame", n: int, samples: int, alpha: float, radii: Sequence[float], sigma: float,
                      step: float, model_cost: float, project_N: Optional[int] = None) -> np.ndarray:
    """Per image, the fewest evaluations of f a sound SRS certificate of the model whose CERTIFY ``rows`` these
    are (``n`` estimation samples each, ``samples`` = N0 + N drawn) can spend and still certify the image at its
    table row: a perfectly aligned chain of ``step`` evaluations per sample plus the K pairs of ``model_cost``
    evaluations each that the eliminated certificate needs with no misaligned pair (``pairs_needed``, aimed at the
    largest table radius at or below the model's radius), never more than the model alone (the fallback,
    ``samples * model_cost``).  A bound no real chain beats: misaligned pairs, warm-up and routing only add.

    ``project_N``: the same images at N = ``project_N`` estimation samples, each image's top-class share n_A / n
    kept (an assumption, to be labelled as such wherever it is shown); ``samples`` then counts that N."""
    out = []
    for _, r in rows.iterrows():
        n_A, N = int(r["n_A"]), n
        radius = float(r["radius"])
        if project_N is not None:
            n_A, N = int(round(n_A * project_N / n)), project_N
            z = count_z(n_A, N, alpha)
            radius = sigma * z if z > -math.inf else -1.0
        goal = table_goal(radius, bool(r["correct"]), radii)
        out.append(cheapest_sound_cost(n_A, N, alpha, None if goal is None else goal / sigma, samples * step,
                                       model_cost, samples * model_cost))
    return np.asarray(out, dtype=float)


def srs_step(label: str) -> Optional[int]:
    """Evaluations per sample of the SRS step a label 'SRS-MDEQ-kA...' names (k); None for any other label."""
    m = re.match(r"SRS-MDEQ-(\d+)[ABN]\b", label)
    return int(m.group(1)) if m else None


def speed_limit(base: "pd.DataFrame", label: str, samples: int, alpha: float, radii: Sequence[float],
                sigma: float) -> float:
    """The speed limit of sound SRS with the step ``label`` names over the standard run ``base`` of the same
    images, in evaluations of f: base's evaluations over the sum of ``limit_evaluations`` (a perfectly aligned
    chain plus the fewest clean pairs at each image's table row, or the model alone); nan where the label names
    no SRS step."""
    step = srs_step(label)
    if step is None:
        return float("nan")
    bound = limit_evaluations(base, int(base["n"].max()), samples, alpha, radii, sigma, step,
                              float(_col(base, "nfe").mean()))
    return float(evaluations_per_image(base, samples).sum() / bound.sum())


def method_summary(runs: Dict[str, "pd.DataFrame"], baseline: str, radii: Sequence[float], samples: int,
                   alpha: float, sigma: float) -> "pd.DataFrame":
    """Per method: s/image, speedups over ``baseline`` (wall clock, f evaluations), largest accuracy gap
    over the radii, mean K / K_A, misalignment rate, standard calls per image, fallbacks and escapes (``route``), and
    the sound speed limit in evaluations (``speed_limit``) with the share of it the f-evaluation speedup reaches
    (fixed-N rows only: the bound counts all N0 + N samples, which a sequential row need not draw)."""
    base = runs[baseline].sort_values("idx").reset_index(drop=True)
    rows = []
    for label, df in runs.items():
        df = df.sort_values("idx").reset_index(drop=True)
        if list(df["idx"]) != list(base["idx"]):
            raise ValueError(f"{label} and {baseline} cover different images; compare runs over the same images")
        gap, at = max_gap({label: df, baseline: base}, label, baseline, radii)
        speedup = base["time"].sum() / df["time"].sum()
        K_A = _col(df, "K_A")
        per_image = evaluations_per_image(df, samples).mean()
        evals = evaluations_per_image(base, samples).mean() / per_image
        limit = float("nan") if "samples" in df.columns else speed_limit(base, label, samples, alpha, radii, sigma)
        rows.append({"method": label, "s/image": df["time"].mean(), "evals/image": per_image, "speedup": speedup,
                     "f-eval speedup": evals,
                     "largest gap (points)": gap, "at radius": at, "mean K": _col(df, "K").mean(),
                     "mean K_A": K_A.mean(), "misaligned": _col(df, "M").sum() / K_A.sum() if K_A.sum() else float("nan"),
                     "std calls/image": _col(df, "std_calls", float("nan")).mean(),
                     "fallbacks": _routes(df, "fallback"), "escapes": _routes(df, "escape"),
                     "speed limit": limit, "of limit": evals / limit})
    return pd.DataFrame(rows)


@dataclass
class EqualAccuracy:
    """The equal-accuracy standard baseline on the certified model's ladder: ``label`` 'MDEQ-kA' of the
    cheapest rung within ``tolerance`` images of it at every table radius, ``k``, ``nfe`` per sample, the ``ladder``
    table and ``frames`` (k -> the rung's rows)."""
    label: str
    k: int
    nfe: float
    ladder: "pd.DataFrame"
    frames: Dict[int, "pd.DataFrame"]


def equal_accuracy_baseline(ladder_path: str, radii: Sequence[float], tolerance: int = 1,
                            solver: str = "anderson", reference: Optional[int] = None) -> EqualAccuracy:
    """The equal-accuracy baseline of the ladder file ``ladder_path`` (a :class:`Method` with rungs) against
    the rung ``reference`` (default: the top one, the certified model)."""
    frames = rung_frames(ladder_path)
    k = equal_accuracy_rung(frames, radii, tolerance, reference)
    letter = _LETTER.get(solver, solver)
    table = ladder_table(frames, radii, reference, label=lambda r: f"MDEQ-{r}{letter}")
    return EqualAccuracy(f"MDEQ-{k}{letter}", k, float(frames[k]["nfe"].mean()), table, frames)


def add_equal_accuracy(summary: "pd.DataFrame", runs: Dict[str, "pd.DataFrame"], base: EqualAccuracy,
                       timed: Optional[Dict[str, "pd.DataFrame"]] = None, samples: int = 1) -> "pd.DataFrame":
    """``method_summary`` with the speedups over the equal-accuracy baseline in front: in f evaluations per image
    (the baseline's from the ladder, at ``samples`` = N0 + N per image), and in wall clock where ``timed`` holds the
    baseline timed beside the method (NaN otherwise)."""
    out = summary.copy()
    per_image = [evaluations_per_image(runs[m], samples).mean() for m in out["method"]]
    out.insert(1, "f-eval vs equal-acc.", [base.nfe * samples / v if v else float("nan") for v in per_image])
    wall = []
    for m in out["method"]:
        if m == base.label:
            wall.append(1.0)
        elif timed and base.label in timed and m in timed:
            wall.append(timed[base.label]["time"].sum() / timed[m]["time"].sum())
        else:
            wall.append(float("nan"))
    out.insert(2, "wall vs equal-acc.", wall)
    return out.rename(columns={"f-eval speedup": "f-eval vs 30A", "speedup": "wall vs 30A"})


def summary_markdown(table: "pd.DataFrame") -> str:
    """The method summary as a markdown table."""
    fmt = {"s/image": "{:.2f}", "evals/image": "{:,.0f}", "speedup": "{:.2f}x", "f-eval speedup": "{:.2f}x", "f-eval vs equal-acc.": "{:.2f}x",
           "wall vs equal-acc.": "{:.2f}x", "f-eval vs 30A": "{:.2f}x", "wall vs 30A": "{:.2f}x", "largest gap (points)": "{:.1f}", "at radius": "{:g}",
           "planner s/image": "{:.4f}", "mean K": "{:.0f}", "mean K_A": "{:.0f}", "misaligned": "{:.2%}", "std calls/image": "{:.1f}",
           "fallbacks": "{:d}", "escapes": "{:d}", "speed limit": "{:.2f}x", "of limit": "{:.0%}"}
    head = "| " + " | ".join(table.columns) + " |\n|" + "|".join(["---"] + ["---:"] * (len(table.columns) - 1)) + "|"
    lines = [head]
    for _, r in table.iterrows():
        cells = [str(r["method"])]
        for c in table.columns[1:]:
            v = r[c]
            cells.append("-" if isinstance(v, float) and v != v else fmt[c].format(int(v) if c in ("fallbacks", "escapes") else v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)




@dataclass
class Honest:
    """An honest comparison (:func:`honest_comparison`): runs, summary, baseline and the timing pass's runs."""
    paths: Dict[str, str]
    runs: Dict[str, "pd.DataFrame"]
    summary: "pd.DataFrame"
    baseline: EqualAccuracy
    timed: Dict[str, "pd.DataFrame"]


def honest_comparison(template: RunSpec, methods: Sequence[Method], out_dir: str, radii: Sequence[float],
                      time_baseline: bool = True, tolerance: int = 1, timed_labels: Optional[Sequence[str]] = None,
                      log: Callable[[str], None] = print) -> Honest:
    """Certify ``methods`` interleaved, find the equal-accuracy baseline on the ladder of the first method
    (the certified model, ``standard(D, rungs=...)``; ValueError otherwise), and compare every method with both.

    With ``time_baseline`` and a cheaper baseline, a second interleaved pass (``out_dir/vs_<baseline>``) times it
    beside the methods in ``timed_labels`` (default all); its certificates equal the first pass's (same seeds)."""
    top = methods[0]
    if not top.rungs:
        raise ValueError("the first method must be the certified model with its ladder: standard(D, rungs=...)")
    s = template.sampling
    planner: Dict[str, List[float]] = {}
    paths = run_methods(template, methods, out_dir, log, planner=planner)
    runs = {label: read_results(p) for label, p in paths.items()}
    solver = dict(top.settings).get("f_solver", "anderson")
    base = equal_accuracy_baseline(paths[top.label], radii, tolerance, solver)
    timed: Dict[str, "pd.DataFrame"] = {}
    if time_baseline and base.label != top.label and base.label not in runs:
        k_method = standard(base.k, solver)
        others = [m for m in methods[1:] if m.label != base.label and (timed_labels is None or m.label in timed_labels)]
        if others:
            log(f"[sigma {s.sigma:g}] equal-accuracy baseline {base.label}: timing it beside the other methods")
            timed_paths = run_methods(template, [k_method] + others, os.path.join(out_dir, f"vs_{base.label}"), log)
            timed = {label: read_results(p) for label, p in timed_paths.items()}
    elif base.label in runs:
        timed = runs  # the baseline ran among the methods, interleaved with them
    samples = (s.N0 or 0) + s.N
    summary = method_summary(runs, top.label, radii, samples, s.alpha, s.sigma)
    summary.insert(summary.columns.get_loc("s/image") + 1, "planner s/image",
                   [float(np.mean(planner[m])) if planner.get(m) else float("nan") for m in summary["method"]])
    return Honest(paths, runs, add_equal_accuracy(summary, runs, base, timed, samples), base, timed)


def ladder_markdown(base: EqualAccuracy) -> str:
    """The ladder table as markdown, the equal-accuracy baseline marked."""
    t = base.ladder
    cols = list(t.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] + ["---:"] * (len(cols) - 1)) + "|"]
    for _, r in t.iterrows():
        cells = [f"**{r['model']}** (equal-acc.)" if r["model"] == base.label else str(r["model"])]
        for c in cols[1:]:
            v = r[c]
            cells.append(f"{v:.1%}" if c == "other prediction" else f"{v:d}" if c == "largest gap (images)"
                         else f"{v:.2f}" if c == "nfe/sample" else f"{v:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RANDOM_INIT_METHODS = ("MDEQ-30A", "SRS-MDEQ-1A", "SRS-MDEQ-3A", "SRS-MDEQ-1N")


def random_init_timing(cfg_path: str, n_images: int, N0: int, N: int, batch: int, device, seed: int = 0,
                       conf_drop: Union[int, str] = 400, log: Callable[[str], None] = print,
                       methods: Optional[Sequence[str]] = None) -> "pd.DataFrame":
    """Seconds per image of MDEQ-30A (always) and ``methods`` of ``RANDOM_INIT_METHODS`` on a seeded
    random-init model of ``cfg_path`` and seeded noise images: a speed measurement only (no certificates reported).
    Budgets are exact (tol 0); each method's first image is an untimed warm-up."""
    import torch
    from DEQ.models import random_init_mdeq
    model, shape = random_init_mdeq(cfg_path, device, seed, purpose="this benchmark times MDEQ certification")
    images = torch.rand((n_images + 1, *shape), generator=torch.Generator().manual_seed(seed))
    std = DEQSolve("anderson", 30, 0.0)
    warm = DEQSolve("anderson", 10, 0.0)
    K = None if conf_drop == "auto" else int(conf_drop)
    chosen = {"MDEQ-30A": None}
    for k, solver in ((1, "anderson"), (3, "anderson"), (1, "naive")):
        label = f"SRS-MDEQ-{k}{_LETTER[solver]}"
        if methods is None or label in methods:
            chosen[label] = SRSConfig(step=DEQSolve(solver, k, 0.0), warmup=warm, conf_drop=K)
    rows = []
    for label, srs_cfg in chosen.items():
        smooth = Smooth(model, model.num_classes, 0.5, standard=std, srs=srs_cfg)
        times, calls, planner = [], [], []
        for i in range(n_images + 1):
            x = images[i].to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            c = smooth.certify(x, N0, N, 0.001, batch, generator=torch.Generator(device=device).manual_seed(seed + i))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - t0)
                calls.append(c.std_calls)
                planner.append(c.planner_seconds)
        rows.append({"method": label, "s/image": float(np.mean(times)), "std calls/image": float(np.mean(calls)),
                     "planner s/image": float(np.mean(planner))})
        log(f"{label}: {rows[-1]['s/image']:.3f} s/image")
    df = pd.DataFrame(rows)
    df["speedup"] = df["s/image"].iloc[0] / df["s/image"]
    return df

__all__ = ["Method", "standard", "srs", "sequential", "standard_label", "evaluations_per_image", "cheapest_sound_cost",
           "limit_evaluations", "paper_methods", "run_resuming", "run_methods", "image_count", "run_attacks",
           "comparison", "max_gap", "mean_column", "to_markdown", "speed_limit", "srs_step", "method_summary",
           "EqualAccuracy", "equal_accuracy_baseline", "add_equal_accuracy", "summary_markdown", "ladder_markdown",
           "Honest", "honest_comparison", "RANDOM_INIT_METHODS", "random_init_timing"]
