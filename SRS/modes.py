"""The certification modes the runner (``SRS.runner.run``) executes: what each writes per image.

* :class:`CertifyMode`: CERTIFY (c_A and its certified radius) per image, ``SRS/code/certify.py``;
* :class:`PredictMode`: PREDICT (the smoothed prediction or abstain), ``SRS/code/predict.py``;
* :class:`QCRSMode`: CERTIFY at an input-specific sigma found by search, with the fixed-sigma
  certificate alongside (``SRS.qcrs``), ``SRS/code/certify_qcrs.py``.

A mode names its columns (owned by ``SRS.results``), adds header entries of its own (checked on
``--resume``), turns one image into one row, and summarises the file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from .certificates import Certificate
from .qcrs import QCRS, QCRSSettings
from .results import CERTIFY_COLUMNS, PREDICT_COLUMNS, QCRS_COLUMNS
from .smooth import Smooth


def certificate_row(c: Certificate, idx: int, label: int) -> Dict[str, object]:
    """The CERTIFY_COLUMNS of one image (``time`` is added by the runner)."""
    return {"idx": idx, "label": label, "predict": c.prediction, "radius": float(c.radius),
            "correct": int(c.prediction == label), "n_A": c.n_A, "n": c.n, "p_A_lower": c.p_A_lower,
            "p_m_upper": c.p_m_upper, "N_A_E": c.N_A_E, "K": c.K, "K_A": c.K_A, "M": c.M, "nfe": c.nfe,
            "residual": c.residual, "status": c.status, "route": c.route, "std_calls": c.std_calls,
            "std_rows": c.std_rows}


@dataclass
class CertifyMode:
    """CERTIFY with N0 selection and N estimation samples (Cohen et al.; SRS with the eliminated bound)."""
    N0: int
    N: int
    alpha: float
    batch: int
    name: str = "certify"
    columns = CERTIFY_COLUMNS

    def header(self) -> Dict[str, object]:
        return {}

    def work(self, smooth: Smooth, x: torch.Tensor, label: int, idx: int, generator: torch.Generator):
        c = smooth.certify(x, self.N0, self.N, self.alpha, self.batch, generator=generator)
        return certificate_row(c, idx, label)

    def summary(self, rows: List[Dict[str, str]]) -> Dict[str, float]:
        return {}


@dataclass
class PredictMode:
    """PREDICT with N samples: the smoothed classifier's class, or abstain (-1)."""
    N: int
    alpha: float
    batch: int
    name: str = "predict"
    columns = PREDICT_COLUMNS

    def header(self) -> Dict[str, object]:
        return {}

    def work(self, smooth: Smooth, x: torch.Tensor, label: int, idx: int, generator: torch.Generator):
        p = smooth.predict(x, self.N, self.alpha, self.batch, generator=generator)
        return {"idx": idx, "label": label, "predict": p.prediction, "correct": int(p.prediction == label),
                "n1": p.n1, "n2": p.n2, "pvalue": p.pvalue, "p_m_upper": p.p_m_upper, "K": p.K, "K_A": p.K_A,
                "M": p.M, "nfe": p.nfe, "std_calls": p.std_calls, "status": p.status}

    def summary(self, rows: List[Dict[str, str]]) -> Dict[str, float]:
        return {}


@dataclass
class QCRSMode:
    """QCRS: search sigma per input, CERTIFY there and at the fixed sigma0 (see ``SRS.qcrs``)."""
    search: QCRSSettings
    N0: int
    N: int
    alpha: float
    batch: int
    name: str = "certify_qcrs"
    columns = QCRS_COLUMNS
    GUARANTEE = ("predict/radius: per-input certificate for g_{best_sigma} at that input only (w.p. >= 1 - alpha); "
                 "the input-dependent classifier is NOT certified; fixed_*: ordinary certificate for g_{sigma}")

    def header(self) -> Dict[str, object]:
        # the search settings are header entries, so --resume refuses other ones
        s = self.search
        return {"left": s.left, "right": s.right, "epsilon": s.epsilon, "epsilon_step": s.epsilon_step,
                "gradient_n": s.gradient_n, "guarantee": self.GUARANTEE}

    def work(self, smooth: Smooth, x: torch.Tensor, label: int, idx: int, generator: torch.Generator):
        r = QCRS(smooth).certify(x, self.search, self.N0, self.N, self.alpha, self.batch, generator=generator)
        c, f, s = r.certificate, r.fixed, r.search
        return {**certificate_row(c, idx, label), "best_sigma": float(s.best_sigma), "search_samples": s.samples_used,
                "search_evals": s.evaluations, "search_nfe": float(s.nfe), "search_time": s.seconds,
                "fixed_predict": f.prediction, "fixed_radius": float(f.radius), "fixed_correct": int(f.prediction == label),
                "fixed_p_A_lower": f.p_A_lower, "fixed_samples": r.fixed_samples, "fixed_time": r.fixed_seconds}

    def summary(self, rows: List[Dict[str, str]]) -> Dict[str, float]:
        """ACR (QCRS and fixed sigma), rows whose sigma moved, and the search cost, over all rows of the file."""
        n, certify_samples = len(rows), self.N0 + self.N
        if not n:
            return {"mean_search_samples": float("nan"), "search_overhead": float("nan"), "acr": float("nan"),
                    "fixed_acr": float("nan"), "moved": 0}
        search = sum(float(r["search_samples"]) for r in rows)
        return {"mean_search_samples": search / n, "search_overhead": search / (n * certify_samples),
                "acr": sum(float(r["radius"]) * int(r["correct"]) for r in rows) / n,
                "fixed_acr": sum(float(r["fixed_radius"]) * int(r["fixed_correct"]) for r in rows) / n,
                "moved": sum(int(r["fixed_samples"]) > 0 for r in rows)}  # 0 iff best_sigma == sigma0


__all__ = ["certificate_row", "CertifyMode", "PredictMode", "QCRSMode"]
