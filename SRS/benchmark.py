"""Run the paper's standard-vs-SRS comparison: several certify runs over the same images, one table.

Every run goes through the certify CLI's own code path (``certify_main``), so its
TSV is exactly what ``SRS/code/certify.py`` writes, and re-running a suite resumes
each file instead of recomputing it.  Method labels follow the paper: MDEQ-kA is
the standard model with k Anderson evaluations from zeros; SRS-MDEQ-kA / -kN the
serialized model with k Anderson / naive evaluations from the warm start.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .analysis import certified_accuracy, read_results, summary_table, to_markdown
from .cli import certify_main, certify_parser

_LETTER = {"anderson": "A", "naive": "N", "broyden": "B"}


@dataclass(frozen=True)
class Method:
    label: str
    flags: Tuple[str, ...]


def standard(k: int, solver: str = "anderson") -> Method:
    return Method(f"MDEQ-{k}{_LETTER[solver]}", ("--f_solver", solver, "--f_thresh", str(k)))


def srs(k: int, solver: str = "anderson", std: Tuple[str, int] = ("anderson", 30), conf_drop: int = 200,
        warmup: Tuple[str, int] = ("anderson", 10), certificate: str = "eliminated") -> Method:
    suffix = "" if certificate == "eliminated" else f" ({certificate})"
    return Method(f"SRS-MDEQ-{k}{_LETTER[solver]}{suffix}",
                  ("--srs", "--f_solver", solver, "--f_thresh", str(k), "--warmup_solver", warmup[0],
                   "--warmup_thresh", str(warmup[1]), "--std_solver", std[0], "--std_thresh", str(std[1]),
                   "--conf_drop", str(conf_drop), "--certificate", certificate))


def paper_methods(conf_drop: int, std: Tuple[str, int] = ("anderson", 30)) -> List[Method]:
    """The six rows of the paper's CIFAR-10 table."""
    return [standard(1), standard(5), standard(std[1], std[0]), srs(1, "naive", std, conf_drop),
            srs(1, "anderson", std, conf_drop), srs(3, "anderson", std, conf_drop)]


def file_name(label: str, sigma: float) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", label).strip("_") + f"_sigma{sigma:g}.tsv"


def run_methods(dataset: str, ckpt: str, sigma: float, methods: Sequence[Method], out_dir: str,
                common: Sequence[str], log: Callable[[str], None] = print) -> Dict[str, str]:
    """Certify with every method (resuming files already there); return label -> TSV path."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for m in methods:
        path = os.path.join(out_dir, file_name(m.label, sigma))
        argv = [dataset, ckpt, str(sigma), path, *common, *m.flags]
        if os.path.isfile(path) and os.path.getsize(path) > 0:
            argv.append("--resume")
        t0 = time.time()
        log(f"[sigma {sigma:g}] {m.label}: certifying -> {path}")
        summary = certify_main(certify_parser().parse_args(argv))
        log(f"[sigma {sigma:g}] {m.label}: {summary['images']} new images in {time.time() - t0:.0f}s "
            f"({summary['skipped_done']} reused), {summary['seconds_per_image']:.2f} s/image")
        paths[m.label] = path
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


__all__ = ["Method", "standard", "srs", "paper_methods", "run_methods", "comparison", "max_gap", "mean_column",
           "to_markdown"]
