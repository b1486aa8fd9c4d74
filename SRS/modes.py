"""The certification modes the runner (``SRS.runner.run``) executes: what each writes per image.

:class:`CertifyMode`, :class:`SequentialMode`, :class:`PredictMode`, :class:`QCRSMode`, :class:`AttackMode`: each
names its columns, adds header entries (checked on ``--resume``), turns one image into one row and summarises.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from DEQ.attacks import NORMS, draw_noise, model_logits, pgd, smooth_pgd
from DEQ.checks import check_count, check_number
from DEQ.errors import UserError

from .certificates import Certificate, Prediction
from .qcrs import QCRS, QCRSSettings
from .sampling import side_stream
from .bounds import FUTILITY_LEVEL, LAST_LOOK_SHARE, sequential_looks
from .results import ATTACK_COLUMNS, CERTIFY_COLUMNS, PLANNER, PREDICT_COLUMNS, QCRS_COLUMNS, SEQUENTIAL_COLUMNS
from .settings import check_radii
from .smooth import Smooth


def certificate_row(c: Certificate, idx: int, label: int) -> Dict[str, object]:
    """The CERTIFY_COLUMNS of one image (``time`` is added by the runner), and the planner's seconds (``PLANNER``,
    no column)."""
    return {"idx": idx, "label": label, "predict": c.prediction, "radius": float(c.radius),
            "correct": int(c.prediction == label), "n_A": c.n_A, "n": c.n, "p_A_lower": c.p_A_lower,
            "p_m_upper": c.p_m_upper, "N_A_E": c.N_A_E, "K": c.K, "K_A": c.K_A, "M": c.M, "nfe": c.nfe,
            "residual": c.residual, "status": c.status, "route": c.route, "std_calls": c.std_calls,
            "std_rows": c.std_rows, PLANNER: c.planner_seconds}


def prediction_row(p: Prediction, idx: int, label: int) -> Dict[str, object]:
    """The PREDICT_COLUMNS of one image (``time`` is added by the runner), and the planner's seconds (``PLANNER``,
    no column)."""
    return {"idx": idx, "label": label, "predict": p.prediction, "correct": int(p.prediction == label),
            "n1": p.n1, "n2": p.n2, "pvalue": p.pvalue, "p_m_upper": p.p_m_upper, "K": p.K, "K_A": p.K_A,
            "M": p.M, "nfe": p.nfe, "std_calls": p.std_calls, "status": p.status, PLANNER: p.planner_seconds}


class _NoExtras:
    """Modes without header entries or summary entries of their own."""

    def header(self) -> Dict[str, object]:
        return {}

    def summary(self, rows: List[Dict[str, str]]) -> Dict[str, float]:
        return {}


@dataclass
class CertifyMode(_NoExtras):
    """CERTIFY with N0 selection and N estimation samples (Cohen et al.; SRS with the eliminated bound)."""
    N0: int
    N: int
    alpha: float
    batch: int
    name: str = "certify"
    columns = CERTIFY_COLUMNS
    routes = True
    table = False

    def work(self, smooth: Smooth, x: torch.Tensor, label: int, idx: int, generator: torch.Generator):
        c = smooth.certify(x, self.N0, self.N, self.alpha, self.batch, generator=generator)
        return certificate_row(c, idx, label)


@dataclass
class SequentialMode:
    """Sequential CERTIFY (``SRS.sequential``): each image's estimation samples stop at the first look
    (batch, 2 batch, ..., N, fixed in advance) where no threshold Phi(r_k / sigma) of the table at
    ``radii`` (nor 1/2) lies between its anytime-valid bounds.  Same guarantee as CERTIFY at level
    alpha; the bound at N is taken at alpha / 2."""
    N0: int
    N: int
    alpha: float
    batch: int
    radii: Tuple[float, ...]
    name: str = "certify_sequential"
    columns = SEQUENTIAL_COLUMNS
    routes = True  # CERTIFY's standard fallback route applies
    table = True   # --radii is the table it decides

    def validate(self, srs: bool = False, certificate: str = "eliminated", refine_margin: float = 0.0) -> None:
        """One-line errors before any work: the radii, and SRS settings sequential SRS cannot certify
        (``SRS.sequential.check_sequential_srs``); the arguments are the run's ``SmoothingSpec`` fields."""
        self.radii = check_radii(self.radii)
        if srs and certificate != "eliminated":
            raise UserError(f"--sequential with --srs needs --certificate eliminated (got {certificate}): only its "
                            f"bound has a sequential argument")
        if srs and refine_margin > 0:
            raise UserError("--sequential with --srs does not take --refine_margin (its re-solves are done per "
                            "phase); drop it")

    def header(self) -> Dict[str, object]:
        looks = sequential_looks(self.N, self.batch)
        levels = f"{LAST_LOOK_SHARE:g} alpha at N, {1 - LAST_LOOK_SHARE:g} alpha/(L-1) at each earlier look"
        return {"sequential": True, "radii": list(self.radii), "looks": list(looks),
                "look_levels": levels if len(looks) > 1 else "alpha", "futility_level": FUTILITY_LEVEL}

    def work(self, smooth: Smooth, x: torch.Tensor, label: int, idx: int, generator: torch.Generator):
        c = smooth.certify_sequential(x, self.N0, self.N, self.alpha, self.batch, self.radii, generator=generator)
        return {**certificate_row(c, idx, label), "samples": c.samples, "stop": c.stop}

    def summary(self, rows: List[Dict[str, str]]) -> Dict[str, float]:
        """Mean noisy samples per image, and that over the fixed-N CERTIFY's N0 + N."""
        n = len(rows)
        mean = sum(int(r["samples"]) for r in rows) / n if n else float("nan")
        return {"mean_samples": mean, "sample_fraction": mean / (self.N0 + self.N)}


@dataclass
class PredictMode(_NoExtras):
    """PREDICT with N samples: the smoothed classifier's class, or abstain (-1)."""
    N: int
    alpha: float
    batch: int
    name: str = "predict"
    columns = PREDICT_COLUMNS
    routes = False  # PREDICT has no standard fallback route
    table = False

    def work(self, smooth: Smooth, x: torch.Tensor, label: int, idx: int, generator: torch.Generator):
        p = smooth.predict(x, self.N, self.alpha, self.batch, generator=generator)
        return prediction_row(p, idx, label)


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
    routes = True
    table = False
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




ATTACK_KINDS = ("pgd", "smooth_pgd")


@dataclass(frozen=True)
class AttackSettings:
    """One attack run (SmoothAdv's flag names): ``attack`` 'pgd' (the base model, standard solve from zeros)
    or 'smooth_pgd' (the smoothed soft classifier, m = ``num_noise_vec`` fixed noise vectors, l2, optionally
    ``no_grad``); ``epsilon`` in pixels; ``norm`` l2/linf (pgd); ``step_size`` None: 2 epsilon / steps (2.5 for
    l-inf); ``restarts`` (pgd)."""
    attack: str
    epsilon: float
    norm: str = "l2"
    steps: int = 20
    step_size: Optional[float] = None
    restarts: int = 1
    num_noise_vec: int = 1
    no_grad: bool = False

    def validate(self) -> None:
        if self.attack not in ATTACK_KINDS:
            raise UserError(f"--attack {self.attack!r} is not an attack; choose one of {', '.join(ATTACK_KINDS)}")
        check_number("--epsilon", self.epsilon, 0, hint=" (the attack's radius in pixel units)")
        if self.norm not in NORMS:
            raise UserError(f"--norm {self.norm!r} is not a norm; choose one of {', '.join(NORMS)}")
        if self.attack == "smooth_pgd" and self.norm != "l2":
            raise UserError("--attack smooth_pgd is an l2 attack (SmoothAdv); drop --norm linf or use --attack pgd")
        check_count("--steps", self.steps, 1)
        check_number("--step_size", self.step_size, 0, strict=True)
        check_count("--restarts", self.restarts, 1)
        check_count("--num_noise_vec (m)", self.num_noise_vec, 1)
        if self.no_grad and self.attack != "smooth_pgd":
            raise UserError("--no_grad_attack is SmoothAdv's estimate for --attack smooth_pgd; drop it for pgd")
        if self.num_noise_vec != 1 and self.attack != "smooth_pgd":
            raise UserError(f"--num_noise_vec {self.num_noise_vec} sets the noise vectors of --attack smooth_pgd; "
                            f"pgd attacks the base model without noise: drop it for pgd")
        if self.restarts != 1 and self.attack != "pgd":
            raise UserError(f"--restarts {self.restarts} restarts --attack pgd; smooth_pgd runs once from x: drop it "
                            f"for smooth_pgd")

    def label(self) -> str:
        """'PGD' / 'PGD-linf' / 'Smooth-PGD m=<m>': the row of the attack table."""
        if self.attack == "pgd":
            return "PGD" if self.norm == "l2" else "PGD-linf"
        return f"Smooth-PGD m={self.num_noise_vec}"


def attack_generator(image: torch.Generator) -> torch.Generator:
    """The attack's own stream for an image (random starts, Smooth-PGD's noise), derived from the image
    generator's seed (``SRS.sampling.derived_seed``) without advancing it: independent of the PREDICT
    noise, so the prediction's guarantee is untouched."""
    return side_stream(image, "attack")


@dataclass
class AttackMode:
    """Attack each image, then PREDICT with the smoothed classifier at the attacked input.

    The attack sees the label (white box) and the base model's gradients; for a DEQ the attacked
    base model is the standard model (the certified one), differentiated as training does
    (``DEQ.attacks.model_logits``) with the standard solve's budget.  PREDICT then draws fresh noise
    from the image's stream, so its answer is the smoothed classifier's at x_adv with the usual
    guarantee (wrong with probability at most alpha)."""
    settings: AttackSettings
    sigma: float
    N: int
    alpha: float
    batch: int
    name: str = "attack"
    columns = ATTACK_COLUMNS
    routes = False  # PREDICT at the attacked input
    table = False

    def header(self) -> Dict[str, object]:
        s = self.settings
        return {"attack": s.attack, "epsilon": s.epsilon, "norm": s.norm, "steps": s.steps, "step_size": s.step_size,
                "restarts": s.restarts, "num_noise_vec": s.num_noise_vec, "no_grad_attack": s.no_grad,
                "attack_label": s.label()}

    def _logits_fn(self, smooth: Smooth):
        model = smooth.base_classifier
        if hasattr(model, "forward_train") and smooth.standard is not None:
            budget = smooth.standard.max_iter
            return lambda x: model.forward_train(x, f_thres=budget).logits
        return model_logits(model)

    def attack(self, smooth: Smooth, x1: torch.Tensor, label: int, generator: torch.Generator) -> torch.Tensor:
        """The attacked input (1, C, H, W) for the image ``x1`` (1, C, H, W) with true class ``label``
        (``generator``: the image's noise stream, only read)."""
        s = self.settings
        y = torch.tensor([label], device=x1.device)
        g = attack_generator(generator)
        fn = self._logits_fn(smooth)
        if s.attack == "pgd":
            return pgd(smooth.base_classifier, x1, y, s.epsilon, norm=s.norm, steps=s.steps, step_size=s.step_size,
                       random_start=s.restarts > 1, restarts=s.restarts, generator=g, logits_fn=fn)
        noise = draw_noise(x1, self.sigma, s.num_noise_vec, generator=g)
        return smooth_pgd(smooth.base_classifier, x1, y, s.epsilon, noise, steps=s.steps, step_size=s.step_size,
                          no_grad=s.no_grad, generator=g, logits_fn=fn)

    def work(self, smooth: Smooth, x: torch.Tensor, label: int, idx: int, generator: torch.Generator):
        x1 = x.unsqueeze(0) if x.dim() == 3 else x
        x_adv = self.attack(smooth, x1, label, generator)
        base = int(smooth.base_predict(x_adv)[0])
        p = smooth.predict(x_adv[0], self.N, self.alpha, self.batch, generator=generator)
        return {**prediction_row(p, idx, label),
                "adv_norm": float((x_adv - x1).flatten().norm(p=2 if self.settings.norm == "l2" else float("inf"))),
                "base_predict_adv": base}

    def summary(self, rows: List[Dict[str, str]]) -> Dict[str, float]:
        n = len(rows)
        return {"max_adv_norm": max((float(r["adv_norm"]) for r in rows), default=float("nan")),
                "base_accuracy_adv": sum(int(r["base_predict_adv"]) == int(r["label"]) for r in rows) / n if n else
                float("nan")}


__all__ = ["certificate_row", "CertifyMode", "SequentialMode", "check_radii", "PredictMode", "QCRSMode", "AttackSettings", "AttackMode", "ATTACK_KINDS",
           "attack_generator"]
