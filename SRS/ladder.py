"""The ladder of standard models MDEQ-kA, and the equal-accuracy standard baseline.

One pass of the certified model with the head at the recorded budgets gives every rung's predictions on the
same noise (a budget-k solve equals the first k evaluations, ``DEQ.solvers``), so each rung's certificate is
exactly ``certify.py --f_thresh k`` with the same seed (time aside), each sound at level alpha on its own; no
joint statement over rungs is made.  File format: docs/internals.md, "The ladder"; docs/honest-baseline.md.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .analysis import certified_accuracy
from .certificates import Certificate, bound_standard, decide, record_cost
from .modes import certificate_row
from .results import LADDER_COLUMNS, UNTIMED, read_results
from .sampling import ABSTAIN, Counts, SampleStats, ensure_generator, noisy_batch
from .smooth import Smooth

DEFAULT_RUNGS = (1, 2, 3, 5, 8, 12, 20, 30)


@dataclass
class Ladder:
    """The certificates of a ladder, and the seconds spent on the lower rungs' heads (work that a plain
    run of the certified model does not do, left out of its timing)."""
    certificates: Dict[int, Certificate]
    rung_seconds: float = 0.0


def certify_ladder(smooth: Smooth, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                   rungs: Sequence[int], generator: Optional[torch.Generator] = None) -> Ladder:
    """CERTIFY of every standard model of the ladder from one solve of ``smooth``'s standard model.

    Args:
        smooth: standard mode (no SRS) on a DEQ whose ``solve`` takes ``rungs`` (``DEQ.models.mdeq``).
        rungs: budgets k, each at most the standard budget; the standard budget itself is always included.
        generator: the image's noise stream, drawn exactly as :meth:`SRS.smooth.Smooth.certify` draws it.

    Returns:
        :class:`Ladder`: k -> :class:`SRS.certificates.Certificate` of the standard model with budget k
        (same solver and tolerance); the top rung equals ``smooth.certify`` with the same generator.
    """
    if smooth.srs is not None or not smooth.is_deq:
        raise ValueError("the ladder certifies standard DEQ models: a Smooth without SRS on a DEQ")
    std = smooth.standard
    rungs = sorted(set(int(k) for k in rungs) | {std.max_iter})
    if rungs[0] < 1 or rungs[-1] > std.max_iter:
        raise ValueError(f"ladder budgets {rungs} must lie in [1, {std.max_iter}] (the standard budget)")
    smooth.base_classifier.eval()
    x = x.unsqueeze(0) if x.dim() == 3 else x
    generator = ensure_generator(generator, x.device)
    stats = {k: SampleStats() for k in rungs}
    seconds = [0.0]
    sel = _ladder_counts(smooth, x, n0, batch_size, generator, rungs, stats, seconds)
    est = _ladder_counts(smooth, x, n, batch_size, generator, rungs, stats, seconds)
    out = {}
    for k in rungs:
        s, bad0 = sel[k].numpy()
        e, bad1 = est[k].numpy()
        c_hat = int(s.argmax())
        cert = Certificate(ABSTAIN, 0.0, n_A=int(e[c_hat]), n=n, counts=e, route="standard")
        if bad0 or bad1:
            cert.status = f"nonfinite_logits({bad0 + bad1})"
        else:
            bound_standard(cert, alpha)
        decide(cert, c_hat, smooth.sigma)
        out[k] = record_cost(cert, stats[k])
    return Ladder(out, seconds[0])


def _ladder_counts(smooth: Smooth, x, num: int, batch_size: int, generator, rungs, stats, seconds):
    """Per rung: the class counts of ``num`` noisy copies; each rung's ``stats`` get what its own
    budget-k solves would have cost (min(k, evaluations spent) per batch) and their residuals."""
    std = smooth.standard
    counts = {k: Counts(smooth.num_classes, x.device) for k in rungs}
    done = 0
    with torch.no_grad():
        while done < num:
            b = min(batch_size, num - done)
            res = smooth.base_classifier.solve(noisy_batch(x, b, smooth.sigma, generator), std.solver, std.max_iter,
                                               None, std.tol, rungs=rungs)
            seconds[0] += res.rung_seconds
            for k in rungs:
                logits, residual = res.rungs[k]
                ok = torch.isfinite(residual)
                counts[k].add(torch.where(ok[:, None], logits, torch.full_like(logits, float("nan"))))
                stats[k].add(b, min(k, res.result.nfe), residual, standard=True)
            done += b
    return counts


def ladder_field(certs: Dict[int, Certificate]) -> str:
    """The ``ladder`` column: ``k:predict:radius:n_A:nfe`` per rung, ';'-joined."""
    return ";".join(f"{k}:{c.prediction}:{c.radius:.6g}:{c.n_A}:{c.nfe:.6g}" for k, c in sorted(certs.items()))


@dataclass
class LadderMode:
    """CERTIFY of the certified model, with every rung of the ladder on the same noise (one solve)."""
    N0: int
    N: int
    alpha: float
    batch: int
    rungs: Sequence[int] = DEFAULT_RUNGS
    name: str = "certify_ladder"
    columns = LADDER_COLUMNS
    routes = True  # CERTIFY of standard models: no SRS flag applies (refused without --srs)
    table = False

    def header(self) -> Dict[str, object]:
        return {"rungs": ",".join(str(k) for k in sorted(set(self.rungs)))}

    def work(self, smooth: Smooth, x: torch.Tensor, label: int, idx: int, generator: torch.Generator):
        ladder = certify_ladder(smooth, x, self.N0, self.N, self.alpha, self.batch, self.rungs, generator)
        certs = ladder.certificates
        top = certs[max(certs)]
        return {**certificate_row(top, idx, label), "ladder": ladder_field(certs), UNTIMED: ladder.rung_seconds}

    def summary(self, rows: List[Dict[str, str]]) -> Dict[str, float]:
        return {}


def rung_frames(path: str) -> Dict[int, pd.DataFrame]:
    """k -> frame of rung k (idx, label, predict, radius, correct, n_A, nfe; time NaN) of a ladder file."""
    df = read_results(path)
    if "ladder" not in df.columns:
        raise ValueError(f"{path} has no ladder column: write it with SRS.ladder.LadderMode")
    rows: Dict[int, list] = {}
    for idx, label, field in zip(df["idx"], df["label"], df["ladder"].astype(str)):
        for part in field.split(";"):
            k, pred, radius, n_A, nfe = part.split(":")
            pred = int(pred)
            rows.setdefault(int(k), []).append({"idx": int(idx), "label": int(label), "predict": pred,
                                                "radius": float(radius), "correct": int(pred == int(label)),
                                                "n_A": int(n_A), "nfe": float(nfe), "time": float("nan")})
    return {k: pd.DataFrame(v) for k, v in sorted(rows.items())}


def certified_counts(df: pd.DataFrame, radii: Sequence[float]) -> np.ndarray:
    """Images certified correct at each radius (counts, not fractions)."""
    return np.rint(certified_accuracy(df, list(radii)) * len(df)).astype(int)


def equal_accuracy_rung(frames: Dict[int, pd.DataFrame], radii: Sequence[float], tolerance: int = 1,
                        reference: Optional[int] = None) -> int:
    """The cheapest rung whose certified accuracy is within ``tolerance`` images of the reference rung's
    (default: the top rung, the certified model) at every radius of the table.

    Returns:
        k of that rung (the reference itself when no cheaper rung qualifies).
    """
    reference = max(frames) if reference is None else reference
    ref = certified_counts(frames[reference], radii)
    for k in sorted(frames):
        if k <= reference and np.all(np.abs(certified_counts(frames[k], radii) - ref) <= tolerance):
            return k
    return reference


def ladder_table(frames: Dict[int, pd.DataFrame], radii: Sequence[float], reference: Optional[int] = None,
                 label=lambda k: f"MDEQ-{k}A") -> pd.DataFrame:
    """One row per rung: certified accuracy (%) per radius, evaluations of f per sample, the largest gap
    to the reference rung (images) and the disagreement of its predictions with the reference's."""
    reference = max(frames) if reference is None else reference
    ref = frames[reference]
    ref_counts = certified_counts(ref, radii)
    rows = []
    for k, df in frames.items():
        counts = certified_counts(df, radii)
        row = {"model": label(k), **{f"{r:g}": 100.0 * c / len(df) for r, c in zip(radii, counts)},
               "nfe/sample": float(df["nfe"].mean()), "largest gap (images)": int(np.max(np.abs(counts - ref_counts))),
               "other prediction": float((df["predict"].to_numpy() != ref["predict"].to_numpy()).mean())}
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["DEFAULT_RUNGS", "Ladder", "certify_ladder", "ladder_field", "LadderMode", "rung_frames", "certified_counts",
           "equal_accuracy_rung", "ladder_table"]
