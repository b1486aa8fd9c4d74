"""Randomized smoothing for any classifier, and Serialized Randomized Smoothing for DEQs.

Smoothed classifier (Cohen et al. 2019): for a base classifier f and noise level
sigma, g(x) = argmax_c P(f(x + e) = c) with e ~ N(0, sigma^2 I).

:class:`Smooth` implements CERTIFY and PREDICT for any ``nn.Module`` that maps
images to logits.  With a DEQ it can sample in two ways:

* standard: every noisy copy is solved from zeros with the standard solver and
  budget (the classifier f_D whose smoothed version is certified);
* SRS (:class:`SRSConfig`): noisy copies are processed in mini-batches; sample j
  of batch t starts its solve from the solution of sample j of batch t-1 and runs
  only a few steps.  Warm-up batches (the first, and every warmup_interval-th)
  run warmup_thresh steps of warmup_solver from zeros.  SRS predictions are not
  independent draws of f_D(x + e), so they are certified with the
  correlation-eliminated certificate of Gao et al. (2024), see
  :meth:`Smooth.certify`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional

import numpy as np
import torch
from scipy.stats import binomtest, norm
from statsmodels.stats.proportion import proportion_confint

ABSTAIN = -1


# ----------------------------------------------------------------- bounds
def lower_confidence_bound(k: float, n: float, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion k/n."""
    if n <= 0:
        return 0.0
    return float(proportion_confint(k, n, alpha=2 * alpha, method="beta")[0])


def upper_confidence_bound(k: float, n: float, alpha: float) -> float:
    """One-sided (1 - alpha) Clopper-Pearson upper bound on a binomial proportion k/n (1 if n = 0)."""
    if n <= 0:
        return 1.0
    return float(proportion_confint(k, n, alpha=2 * alpha, method="beta")[1])


def radius_from_p(p_lower: float, sigma: float) -> float:
    """R = sigma * PhiInv(p_A_lower)."""
    return float(sigma * norm.ppf(p_lower))


# ----------------------------------------------------------------- configs
@dataclass(frozen=True)
class DEQSolve:
    """How a DEQ base classifier solves: solver name, evaluation budget, tolerance (None: model default)."""
    solver: str = "anderson"
    max_iter: int = 30
    tol: Optional[float] = None

    def label(self) -> str:
        return f"{self.max_iter}{self.solver[0].upper()}"


@dataclass(frozen=True)
class SRSConfig:
    """Serialized randomized smoothing settings (names as the reference flags).

    certificate: 'eliminated' (default; steps 1-5 of the SRS paper as specified:
    N_A_E = N_A * (1 - p_m_upper), then the Clopper-Pearson bound of N_A_E / n);
    'reference' (the reference code's variant, weaker: bound of
    (N_A r)/(n r), r = 1 - p_m_upper, which keeps N_A/n and only shrinks n);
    'none' (no correction: certifies the SRS chain as if it were f_D, NOT a
    guarantee; for ablations only)."""
    step: DEQSolve = DEQSolve("anderson", 1)
    warmup: DEQSolve = DEQSolve("anderson", 10)
    warmup_interval: int = 0        # 0: only the first batch is a warm-up
    conf_drop: int = 400            # K, paired samples for the misalignment bound
    certificate: str = "eliminated"
    chain_across_phases: bool = True  # carry the chain from selection into estimation


class SampleStats:
    """What sampling an image cost and how the solves went.  Residual sums stay on the device
    (no host sync per batch) until the image is done."""

    def __init__(self):
        self.samples = 0
        self.nfe = 0.0                  # evaluations of f summed over samples
        self._res_sum = None
        self._res_n = None

    def add(self, rows: int, nfe: int, residual: Optional[torch.Tensor], paired: bool = False):
        """Paired standard solves add cost but are not samples of their own."""
        self.nfe += float(nfe) * rows
        if paired:
            return
        self.samples += rows
        if residual is not None:
            finite = torch.isfinite(residual)
            s, n = torch.where(finite, residual, torch.zeros_like(residual)).sum(), finite.sum()
            self._res_sum = s if self._res_sum is None else self._res_sum + s
            self._res_n = n if self._res_n is None else self._res_n + n

    @property
    def nfe_per_sample(self) -> float:
        return self.nfe / self.samples if self.samples else 0.0

    @property
    def mean_residual(self) -> float:
        if self._res_n is None or int(self._res_n) == 0:
            return float("nan")
        return float(self._res_sum) / int(self._res_n)


@dataclass
class Certificate:
    """Result of CERTIFY.  Unpacks as (prediction, radius), like locuslab/smoothing's Smooth.certify."""
    prediction: int
    radius: float
    n_A: int = 0                    # estimation samples predicting c_A (SRS predictions in SRS mode)
    n: int = 0
    p_A_lower: float = 0.0
    p_m_upper: float = float("nan")  # SRS: upper bound on the misalignment rate
    N_A_E: float = float("nan")      # SRS: conservative count of f_D predicting c_A
    K: int = 0                       # paired samples
    K_A: int = 0                     # pairs whose SRS prediction is c_A
    M: int = 0                       # ... of which f_D disagrees
    nfe: float = 0.0                 # evaluations of f per noisy sample (all phases, pairs included)
    residual: float = float("nan")   # mean final solver residual
    status: str = "ok"
    counts: Optional[np.ndarray] = field(default=None, repr=False)

    def __iter__(self) -> Iterator:
        return iter((self.prediction, self.radius))


@dataclass
class Prediction:
    prediction: int
    n1: int = 0
    n2: int = 0
    pvalue: float = 1.0
    p_m_upper: float = float("nan")
    nfe: float = 0.0
    status: str = "ok"

    def __int__(self):
        return self.prediction


# ----------------------------------------------------------------- sampling
class _Counts:
    """Per-class counts accumulated on the device (one host sync per phase)."""

    def __init__(self, num_classes: int, device):
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes, dtype=torch.long, device=device)
        self.bad = torch.zeros((), dtype=torch.long, device=device)

    def add(self, logits: torch.Tensor) -> torch.Tensor:
        preds = _safe_argmax(logits)
        # shift by one so ABSTAIN (-1) lands in bin 0: no boolean indexing, hence no device sync
        binned = torch.bincount(preds + 1, minlength=self.num_classes + 1)
        self.counts += binned[1:]
        self.bad += binned[0]
        return preds

    def numpy(self):
        return self.counts.cpu().numpy(), int(self.bad)


class Smooth:
    """A smoothed classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I).

    Guarantee (Cohen et al. 2019, Thm 1 and its Monte Carlo version): if
    ``certify`` returns (c, R) with c != ABSTAIN, then with probability at least
    1 - alpha over its noise draws, g(x) = c and g(x + d) = c for every
    ||d||_2 < R, where g is the smoothed version of the *standard* base
    classifier: ``base_classifier`` itself for plain modules, and for a DEQ the
    model solved from zeros with ``standard`` (solver, budget).  This holds in
    SRS mode too: the correlation-eliminated certificate only ever claims a
    radius for the standard model's smoothed classifier.

    ``predict`` returns g(x) or ABSTAIN; it returns a wrong class (not g(x))
    with probability at most alpha.
    """

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float,
                 standard: Optional[DEQSolve] = None, srs: Optional[SRSConfig] = None):
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma
        self.is_deq = hasattr(base_classifier, "solve")
        if srs is not None and not self.is_deq:
            raise ValueError("SRS needs a DEQ base classifier (a model with a .solve method)")
        self.standard = standard or (DEQSolve() if self.is_deq else None)
        self.srs = srs

    # ----------------------------------------------------------- public API
    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float, batch_size: int,
                generator: Optional[torch.Generator] = None, sigma: Optional[float] = None) -> Certificate:
        """CERTIFY: guess c_A from n0 samples, bound p_A from n fresh samples, return (c_A, R).

        Standard mode: n_A = count of c_A among n draws of f_D(x + e);
        p_A_lower = Clopper-Pearson lower bound of n_A / n at level alpha.

        SRS mode (correlation eliminated): N_A = count of c_A among the n SRS
        predictions; K = conf_drop of the n estimation samples, chosen uniformly at
        random, also get the standard prediction on the same noise; among the K_A
        pairs whose SRS prediction is c_A, M disagree with f_D.  With alpha_1 =
        alpha_2 = alpha / 2: p_m_upper = upper bound of M / K_A at alpha_1 (1 if
        K_A = 0); N_A_E = floor(N_A (1 - p_m_upper)) (the paired samples are a
        uniform subsample, so w.p. >= 1 - alpha_1 at least N_A_E of the n i.i.d.
        draws of f_D(x + e) are c_A); p_A_lower = lower bound of N_A_E / n at
        alpha_2.  Union bound: the guarantee holds w.p. >= 1 - alpha.
        Abstain (ABSTAIN, 0.0) when p_A_lower < 1/2, or when any solve diverged (no finite iterate)
        or produced non-finite logits (status ``nonfinite_logits(k)``, k samples).
        """
        sigma = self.sigma if sigma is None else sigma
        self.base_classifier.eval()
        x = x.unsqueeze(0) if x.dim() == 3 else x
        stats = SampleStats()
        chain = _Chain()
        sel, bad0 = self._sample(x, n0, batch_size, sigma, generator, stats, chain).numpy()
        c_hat = int(sel.argmax())
        if not (self.srs and self.srs.chain_across_phases):
            chain = _Chain()
        K = self.srs.conf_drop if (self.srs and self.srs.certificate != "none") else 0
        pair_pos = _pair_positions(n, K, generator)
        counts_obj = self._sample(x, n, batch_size, sigma, generator, stats, chain, pair_pos)
        counts, bad1 = counts_obj.numpy()
        n_A = int(counts[c_hat])
        cert = Certificate(ABSTAIN, 0.0, n_A=n_A, n=n, counts=counts)
        if bad0 or bad1:
            cert.status = f"nonfinite_logits({bad0 + bad1})"
        elif K:
            srs_p, std_p = chain.paired()
            cert.K = len(srs_p)
            is_a = srs_p == c_hat
            cert.K_A = int(is_a.sum())
            cert.M = int((is_a & (std_p != c_hat)).sum())
            cert.p_m_upper = upper_confidence_bound(cert.M, cert.K_A, alpha / 2)
            r = 1.0 - cert.p_m_upper
            if self.srs.certificate == "reference":
                cert.N_A_E = n_A * r
                cert.p_A_lower = lower_confidence_bound(n_A * r, n * r, alpha / 2) if r > 0 else 0.0
            else:
                cert.N_A_E = float(math.floor(n_A * r))
                cert.p_A_lower = lower_confidence_bound(cert.N_A_E, n, alpha / 2)
        else:
            cert.p_A_lower = lower_confidence_bound(n_A, n, alpha)
        if cert.status == "ok" and cert.p_A_lower >= 0.5:
            cert.prediction, cert.radius = c_hat, radius_from_p(cert.p_A_lower, sigma)
        elif cert.status == "ok":
            cert.status = "abstain_pA_below_half"
        cert.nfe, cert.residual = stats.nfe_per_sample, stats.mean_residual
        return cert

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: Optional[torch.Generator] = None, sigma: Optional[float] = None) -> Prediction:
        """PREDICT: two-sided binomial test of the top two counts; ABSTAIN if p-value > alpha.

        SRS mode: the top count is corrected as in certify (n1_E = floor(n1 (1 -
        p_m_upper)), the discarded n1 - n1_E counted for the runner-up) and the test
        runs at alpha / 2, the misalignment bound taking the other alpha / 2."""
        sigma = self.sigma if sigma is None else sigma
        self.base_classifier.eval()
        x = x.unsqueeze(0) if x.dim() == 3 else x
        stats, chain = SampleStats(), _Chain()
        K = self.srs.conf_drop if (self.srs and self.srs.certificate != "none") else 0
        counts, bad = self._sample(x, n, batch_size, sigma, generator, stats, chain,
                                   _pair_positions(n, K, generator)).numpy()
        top2 = counts.argsort()[::-1][:2]
        n1, n2 = int(counts[top2[0]]), int(counts[top2[1]])
        out = Prediction(ABSTAIN, n1, n2, nfe=stats.nfe_per_sample)
        level = alpha
        if K:
            srs_p, std_p = chain.paired()
            is_a = srs_p == top2[0]
            out.p_m_upper = upper_confidence_bound(int((is_a & (std_p != top2[0])).sum()), int(is_a.sum()), alpha / 2)
            n1_e = math.floor(n1 * (1 - out.p_m_upper))
            n1, n2, level = n1_e, n2 + (out.n1 - n1_e), alpha / 2
        if bad:
            out.status = f"nonfinite_logits({bad})"
            return out
        out.pvalue = float(binomtest(n1, n1 + n2, p=0.5).pvalue) if n1 + n2 > 0 else 1.0
        if out.pvalue <= level:
            out.prediction = int(top2[0])
        else:
            out.status = "abstain_test"
        return out

    # ------------------------------------------------------------- sampling
    def _sample(self, x, num, batch_size, sigma, generator, stats: SampleStats, chain: "_Chain",
                pair_pos: Optional[torch.Tensor] = None) -> _Counts:
        counts = _Counts(self.num_classes, x.device)
        done = 0
        with torch.no_grad():
            while done < num:
                b = min(batch_size, num - done)
                noisy = x.repeat(b, 1, 1, 1)
                noisy = noisy + torch.randn(noisy.shape, generator=generator, device=x.device, dtype=x.dtype) * sigma
                logits = self._classify(noisy, stats, chain)
                preds = counts.add(logits)
                if pair_pos is not None and len(pair_pos):
                    rows = pair_pos[(pair_pos >= done) & (pair_pos < done + b)] - done
                    if len(rows):
                        rows_d = rows.to(x.device)
                        std_logits = self._standard(noisy.index_select(0, rows_d), stats, paired=True)
                        chain.add_pairs(preds.index_select(0, rows_d), _safe_argmax(std_logits))
                done += b
        return counts

    def _standard(self, noisy, stats: SampleStats, paired: bool = False) -> torch.Tensor:
        if not self.is_deq:
            stats.add(noisy.shape[0], 0, None, paired)
            return self.base_classifier(noisy)
        s = self.standard
        out = self.base_classifier.solve(noisy, s.solver, s.max_iter, None, s.tol)
        stats.add(noisy.shape[0], out.result.nfe, out.result.residual, paired)
        return _mark_diverged(out)

    def _classify(self, noisy, stats: SampleStats, chain: "_Chain") -> torch.Tensor:
        if self.srs is None:
            return self._standard(noisy, stats)
        cfg = self.srs
        warm = chain.z is None or (cfg.warmup_interval > 0 and chain.batches % cfg.warmup_interval == 0)
        step = cfg.warmup if warm else cfg.step
        z0 = None if warm else chain.start(noisy.shape[0])
        out = self.base_classifier.solve(noisy, step.solver, step.max_iter, z0, step.tol)
        stats.add(noisy.shape[0], out.result.nfe, out.result.residual)
        chain.advance(out.z)
        return _mark_diverged(out)


class _Chain:
    """SRS chain state: the previous batch's solutions, and the paired predictions."""

    def __init__(self):
        self.z: Optional[torch.Tensor] = None
        self.batches = 0
        self._srs: List[torch.Tensor] = []
        self._std: List[torch.Tensor] = []

    def start(self, rows: int) -> torch.Tensor:
        if rows > self.z.shape[0]:  # batch larger than the previous one: extra rows restart from the first rows
            reps = math.ceil(rows / self.z.shape[0])
            return self.z.repeat(reps, 1)[:rows]
        return self.z[:rows]

    def advance(self, z: torch.Tensor):
        self.z = z
        self.batches += 1

    def add_pairs(self, srs_preds: torch.Tensor, std_preds: torch.Tensor):
        self._srs.append(srs_preds)
        self._std.append(std_preds)

    def paired(self):
        if not self._srs:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return torch.cat(self._srs).cpu().numpy(), torch.cat(self._std).cpu().numpy()


def _mark_diverged(out) -> torch.Tensor:
    """Logits, with NaN rows for samples whose solve never produced a finite iterate (the solvers then
    return the initial state with an infinite residual): such samples make the image abstain."""
    ok = torch.isfinite(out.result.residual)
    return torch.where(ok[:, None], out.logits, torch.full_like(out.logits, float("nan")))


def _safe_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class per row; ABSTAIN for rows with non-finite logits."""
    ok = torch.isfinite(logits).all(1)
    return torch.where(ok, logits.argmax(1), torch.full_like(ok, ABSTAIN, dtype=torch.long))


def _pair_positions(n: int, K: int, generator: Optional[torch.Generator]) -> Optional[torch.Tensor]:
    """K of the n estimation positions, uniformly at random, sorted.

    Drawn on the CPU from a stream derived from the noise generator's seed, so the
    noise itself is the same with and without pairing (standard and SRS runs with
    one seed see the same noise), and no device sync is needed."""
    if not K:
        return None
    seed = (generator.initial_seed() if generator is not None else int(torch.randint(0, 2 ** 62, ()))) ^ 0x5EED5EED
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:K].sort().values
