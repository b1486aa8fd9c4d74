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
  :meth:`Smooth.certify`.  The paired standard solves run after the SRS pass, in
  full mini-batches, on noise regenerated from the recorded generator states;
  which samples are paired, how many (adaptive by default) and when an image is
  better certified by the standard model outright is decided in
  :mod:`SRS.pairing`, whose docstring holds the soundness argument.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from scipy.stats import binomtest

from .bounds import (eliminated_count, eliminated_p_lower, lower_confidence_bound, radius_from_p,
                     upper_confidence_bound)
from .pairing import (PairPlan, RouteCosts, adaptive_pair_count, choose_route, first_in_A, fixed_pairs,
                      pair_permutation)

ABSTAIN = -1


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

    Attributes:
        step: the SRS solve from the warm start (``--f_solver/--f_thresh``; its tol lets it stop
            early, the budget acting as a cap).
        warmup, warmup_interval: warm-up batches from zeros (the first; and every k-th if k > 0).
        conf_drop: K, the paired samples of the correlation-eliminated bound; None = adaptive
            (``--conf_drop auto``, the default): K_A = ``SRS.pairing.pairs_needed`` per image.
        certificate: 'eliminated' (default; steps 1-5 of the SRS paper as specified:
            N_A_E = N_A (1 - p_m_upper), then the Clopper-Pearson bound of N_A_E / n);
            'reference' (the reference code's variant, weaker: bound of (N_A r)/(n r),
            r = 1 - p_m_upper, which keeps N_A/n and only shrinks n); 'none' (no correction:
            certifies the SRS chain as if it were f_D, NOT a guarantee; for ablations only).
        chain_across_phases: carry the chain from selection into estimation.
        radius_slack: adaptive K aims within this many sigma of the radius the SRS counts alone give.
        max_pairs: most paired standard solves per image (None: N).
        fallback: adaptive mode only: certify with the standard model outright when the selection
            samples predict that SRS plus its pairs would cost more (see ``SRS.pairing.choose_route``).
        overhead: stem, head and noise of one sample in evaluations of f (cost model of the fallback).
        step_cost: evaluations of f an SRS step is expected to spend (cost model only; None: its
            budget). Set it for a step with a tolerance, whose budget is only a cap.
    """
    step: DEQSolve = DEQSolve("anderson", 1)
    warmup: DEQSolve = DEQSolve("anderson", 10)
    warmup_interval: int = 0
    conf_drop: Optional[int] = None
    certificate: str = "eliminated"
    chain_across_phases: bool = True
    radius_slack: float = 0.05
    max_pairs: Optional[int] = None
    fallback: bool = True
    overhead: float = 1.0
    step_cost: Optional[float] = None

    @property
    def adaptive(self) -> bool:
        return self.conf_drop is None

    @property
    def pairs(self) -> bool:
        """Whether this certificate pairs at all ('none' does not)."""
        return self.certificate != "none" and (self.adaptive or self.conf_drop > 0)


class SampleStats:
    """What sampling an image cost and how the solves went.  Residual sums stay on the device
    (no host sync per batch) until the image is done."""

    def __init__(self):
        self.samples = 0
        self.nfe = 0.0                  # evaluations of f summed over samples
        self.std_calls = 0              # solver calls of the standard model (any phase)
        self.std_rows = 0               # ... and the samples they solved
        self._res_sum = None
        self._res_n = None

    def add(self, rows: int, nfe: int, residual: Optional[torch.Tensor], paired: bool = False,
            standard: bool = False):
        """Paired standard solves add cost but are not samples of their own."""
        self.nfe += float(nfe) * rows
        if standard:
            self.std_calls += 1
            self.std_rows += rows
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
    K: int = 0                       # positions of the uniform pairing order scanned
    K_A: int = 0                     # pairs whose SRS prediction is c_A (each solved by f_D)
    M: int = 0                       # ... of which f_D disagrees
    nfe: float = 0.0                 # evaluations of f per noisy sample (all phases, pairs included)
    residual: float = float("nan")   # mean final solver residual
    status: str = "ok"
    route: str = "standard"          # standard | srs | fallback (SRS selection, standard estimation)
    std_calls: int = 0               # solver calls of the standard model (pairs, fallback, standard mode)
    std_rows: int = 0                # samples solved by the standard model
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
    K: int = 0
    K_A: int = 0
    M: int = 0
    std_calls: int = 0

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


class _PhaseLog:
    """What a sampling phase needs to be paired afterwards: the generator state before each
    mini-batch's noise (to regenerate the noisy inputs at any positions) and every prediction."""

    def __init__(self):
        self.batches: List[Tuple[int, int, torch.Tensor]] = []   # (start, rows, generator state)
        self._preds: List[torch.Tensor] = []

    def record(self, start: int, rows: int, generator: torch.Generator):
        self.batches.append((start, rows, generator.get_state()))

    def add_preds(self, preds: torch.Tensor):
        self._preds.append(preds)

    def preds(self) -> torch.Tensor:
        return torch.cat(self._preds)


class Smooth:
    """A smoothed classifier g(x) = argmax_c P(f(x + e) = c), e ~ N(0, sigma^2 I).

    Guarantee (Cohen et al. 2019, Thm 1 and its Monte Carlo version): if
    ``certify`` returns (c, R) with c != ABSTAIN, then with probability at least
    1 - alpha over its noise draws, g(x) = c and g(x + d) = c for every
    ||d||_2 < R, where g is the smoothed version of the *standard* base
    classifier: ``base_classifier`` itself for plain modules, and for a DEQ the
    model solved from zeros with ``standard`` (solver, budget).  This holds in
    SRS mode too, with fixed or adaptive pairing and with the standard
    fallback: the correlation-eliminated certificate only ever claims a radius
    for the standard model's smoothed classifier (argument in ``SRS.pairing``).

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
        predictions; K_A of those N_A samples, a uniform subsample (``SRS.pairing``),
        also get the standard prediction on the same noise, and M of them disagree
        with c_A.  With alpha_1 = alpha_2 = alpha / 2: p_m_upper = upper bound of
        M / K_A at alpha_1 (1 if K_A = 0); N_A_E = floor(N_A (1 - p_m_upper)) (w.p.
        >= 1 - alpha_1 at least N_A_E of the n i.i.d. draws of f_D(x + e) are c_A);
        p_A_lower = lower bound of N_A_E / n at alpha_2.  Union bound: level alpha.
        Adaptive pairing (``conf_drop=None``) picks K_A from N_A alone; with
        ``fallback`` the selection counts may route the image to the standard
        model on fresh noise (``route='fallback'``), which is ordinary CERTIFY.
        Abstain (ABSTAIN, 0.0) when p_A_lower < 1/2, or when any solve diverged (no finite iterate)
        or produced non-finite logits (status ``nonfinite_logits(k)``, k samples).
        """
        sigma = self.sigma if sigma is None else sigma
        self.base_classifier.eval()
        x = x.unsqueeze(0) if x.dim() == 3 else x
        generator = _ensure_generator(generator, x.device)
        stats, chain = SampleStats(), _Chain()
        sel, bad0 = self._sample(x, n0, batch_size, sigma, generator, stats, chain).numpy()
        c_hat = int(sel.argmax())
        if not (self.srs and self.srs.chain_across_phases):
            chain = _Chain()
        warm = 0 if self.srs is None else self._warm_rows(n, batch_size, chain.batches)
        route = "standard" if self.srs is None else self._route(int(sel[c_hat]), n0, n, alpha, warm)
        log = _PhaseLog() if route == "srs" and self.srs.pairs else None
        counts, bad1 = self._sample(x, n, batch_size, sigma, generator, stats, chain, log=log,
                                    standard=route != "srs").numpy()
        n_A = int(counts[c_hat])
        cert = Certificate(ABSTAIN, 0.0, n_A=n_A, n=n, counts=counts, route=route)
        if bad0 or bad1:
            cert.status = f"nonfinite_logits({bad0 + bad1})"
        elif log is not None:
            cap = self._pair_cap(n, warm)
            plan = self._plan(log, c_hat, n, n_A, alpha, generator, cap)
            M = self._misaligned(x, sigma, log, plan, c_hat, batch_size, stats)
            self._eliminate(cert, plan, M, alpha)
        else:
            cert.p_A_lower = lower_confidence_bound(n_A, n, alpha)
        if cert.status == "ok" and cert.p_A_lower >= 0.5:
            cert.prediction, cert.radius = c_hat, radius_from_p(cert.p_A_lower, sigma)
        elif cert.status == "ok":
            cert.status = "abstain_pA_below_half"
        cert.nfe, cert.residual = stats.nfe_per_sample, stats.mean_residual
        cert.std_calls, cert.std_rows = stats.std_calls, stats.std_rows
        return cert

    def predict(self, x: torch.Tensor, n: int, alpha: float, batch_size: int,
                generator: Optional[torch.Generator] = None, sigma: Optional[float] = None) -> Prediction:
        """PREDICT: two-sided binomial test of the top two counts; ABSTAIN if p-value > alpha.

        SRS mode: the top count is corrected as in certify (n1_E = floor(n1 (1 -
        p_m_upper)), the discarded n1 - n1_E counted for the runner-up) and the test
        runs at alpha / 2, the misalignment bound taking the other alpha / 2.  The
        pairs are a uniform subsample of the samples predicting the top class;
        adaptive pairing sizes them with the certify rule applied to n1 (no fallback)."""
        sigma = self.sigma if sigma is None else sigma
        self.base_classifier.eval()
        x = x.unsqueeze(0) if x.dim() == 3 else x
        generator = _ensure_generator(generator, x.device)
        stats, chain = SampleStats(), _Chain()
        log = _PhaseLog() if self.srs is not None and self.srs.pairs else None
        counts, bad = self._sample(x, n, batch_size, sigma, generator, stats, chain, log=log).numpy()
        top2 = counts.argsort()[::-1][:2]
        n1, n2 = int(counts[top2[0]]), int(counts[top2[1]])
        out = Prediction(ABSTAIN, n1, n2)
        level = alpha
        if log is not None and not bad:
            plan = self._plan(log, int(top2[0]), n, n1, alpha, generator, self._pair_cap(n, 0, use_budget=False))
            out.K, out.K_A = plan.K, plan.K_A
            out.M = self._misaligned(x, sigma, log, plan, int(top2[0]), batch_size, stats)
            out.p_m_upper, n1_e = eliminated_count(n1, plan.K_A, out.M, alpha / 2)
            n1, n2, level = n1_e, n2 + (out.n1 - n1_e), alpha / 2
        out.nfe, out.std_calls = stats.nfe_per_sample, stats.std_calls
        if bad:
            out.status = f"nonfinite_logits({bad})"
            return out
        out.pvalue = float(binomtest(n1, n1 + n2, p=0.5).pvalue) if n1 + n2 > 0 else 1.0
        if out.pvalue <= level:
            out.prediction = int(top2[0])
        else:
            out.status = "abstain_test"
        return out

    # ------------------------------------------------------------- pairing
    def _costs(self) -> RouteCosts:
        cfg, o = self.srs, self.srs.overhead
        step = cfg.step.max_iter if cfg.step_cost is None else cfg.step_cost
        return RouteCosts(self.standard.max_iter + o, step + o, cfg.warmup.max_iter + o)

    def _warm_rows(self, n: int, batch_size: int, first_batch: int) -> int:
        """Samples of an n-sample phase that are warm-up batches (first_batch: chain batches so far)."""
        cfg, rows = self.srs, 0
        for t in range(math.ceil(n / batch_size)):
            b = first_batch + t
            if b == 0 or (cfg.warmup_interval > 0 and b % cfg.warmup_interval == 0):
                rows += min(batch_size, n - t * batch_size)
        return rows

    def _route(self, k0: int, n0: int, n: int, alpha: float, warm: int) -> str:
        """'srs', or 'fallback' (standard model for the estimation samples) when adaptive pairing
        predicts, from the selection count k0 alone, that SRS would cost more (warm: warm-up rows)."""
        cfg = self.srs
        if not (cfg.adaptive and cfg.fallback and cfg.pairs):
            return "srs"
        route = choose_route(k0, n0, n, alpha, cfg.radius_slack, self._costs(), warm, cfg.max_pairs or n)
        return "srs" if route == "srs" else "fallback"

    def _pair_cap(self, n: int, warm: int, use_budget: bool = True) -> int:
        """Most pairs an image may spend: --max_pairs, and in adaptive mode with the fallback on, no
        more than keeps the SRS route cheaper than the standard model (warm: warm-up rows)."""
        cfg = self.srs
        cap = min(cfg.max_pairs or n, n)
        if cfg.adaptive and cfg.fallback and use_budget:
            cap = min(cap, max(self._costs().pair_budget(n, warm), 1))
        return cap

    def _plan(self, log: _PhaseLog, c_hat: int, n: int, n_A: int, alpha: float,
              generator: torch.Generator, cap: int) -> PairPlan:
        """Choose the paired positions: fixed K, or adaptive K_A from n_A alone (``SRS.pairing``)."""
        in_A = (log.preds() == c_hat).cpu()
        perm = pair_permutation(n, generator)
        cfg = self.srs
        if not cfg.adaptive:
            return fixed_pairs(perm, in_A, cfg.conf_drop)
        return first_in_A(perm, in_A, adaptive_pair_count(n_A, n, alpha, cfg.radius_slack, cap))

    def _misaligned(self, x, sigma, log: _PhaseLog, plan: PairPlan, c_hat: int, batch_size: int,
                    stats: SampleStats) -> int:
        """M: paired positions whose standard prediction is not c_hat (all paired positions are in A).

        The paired noisy inputs are regenerated from the recorded generator states and solved by the
        standard model in full mini-batches of ``batch_size`` rows: ceil(K_A / batch_size) calls."""
        if plan.K_A == 0:
            return 0
        misaligned = torch.zeros((), dtype=torch.long, device=x.device)
        for chunk in _regenerate(x, sigma, log, plan.positions, batch_size):
            std = _safe_argmax(self._standard(chunk, stats, paired=True))
            misaligned += (std != c_hat).sum()
        return int(misaligned)

    def _eliminate(self, cert: Certificate, plan: PairPlan, M: int, alpha: float):
        cert.K, cert.K_A, cert.M = plan.K, plan.K_A, M
        if self.srs.certificate == "reference":
            cert.p_m_upper = upper_confidence_bound(M, plan.K_A, alpha / 2)
            r = 1.0 - cert.p_m_upper
            cert.N_A_E = cert.n_A * r
            cert.p_A_lower = lower_confidence_bound(cert.n_A * r, cert.n * r, alpha / 2) if r > 0 else 0.0
        else:
            cert.p_m_upper, n_a_e, cert.p_A_lower = eliminated_p_lower(cert.n_A, cert.n, plan.K_A, M, alpha)
            cert.N_A_E = float(n_a_e)

    # ------------------------------------------------------------- sampling
    def _sample(self, x, num, batch_size, sigma, generator, stats: SampleStats, chain: "_Chain",
                log: Optional[_PhaseLog] = None, standard: bool = False) -> _Counts:
        """Draw ``num`` noisy copies of x in mini-batches and count the predictions.

        ``standard``: solve with the standard model even in SRS mode (the fallback route).
        ``log``: record the generator state before each batch and every prediction, for pairing."""
        counts = _Counts(self.num_classes, x.device)
        done = 0
        with torch.no_grad():
            while done < num:
                b = min(batch_size, num - done)
                if log is not None:
                    log.record(done, b, generator)
                noisy = _noisy_batch(x, b, sigma, generator)
                logits = self._standard(noisy, stats) if (standard or self.srs is None) else \
                    self._classify(noisy, stats, chain)
                preds = counts.add(logits)
                if log is not None:
                    log.add_preds(preds)
                done += b
        return counts

    def _standard(self, noisy, stats: SampleStats, paired: bool = False) -> torch.Tensor:
        if not self.is_deq:
            stats.add(noisy.shape[0], 0, None, paired)
            return self.base_classifier(noisy)
        s = self.standard
        out = self.base_classifier.solve(noisy, s.solver, s.max_iter, None, s.tol)
        stats.add(noisy.shape[0], out.result.nfe, out.result.residual, paired, standard=True)
        return _mark_diverged(out)

    def _classify(self, noisy, stats: SampleStats, chain: "_Chain") -> torch.Tensor:
        cfg = self.srs
        warm = chain.z is None or (cfg.warmup_interval > 0 and chain.batches % cfg.warmup_interval == 0)
        step = cfg.warmup if warm else cfg.step
        z0 = None if warm else chain.start(noisy.shape[0])
        out = self.base_classifier.solve(noisy, step.solver, step.max_iter, z0, step.tol)
        stats.add(noisy.shape[0], out.result.nfe, out.result.residual)
        chain.advance(out.z)
        return _mark_diverged(out)


class _Chain:
    """SRS chain state: the previous batch's solutions."""

    def __init__(self):
        self.z: Optional[torch.Tensor] = None
        self.batches = 0

    def start(self, rows: int) -> torch.Tensor:
        if rows > self.z.shape[0]:  # batch larger than the previous one: extra rows restart from the first rows
            reps = math.ceil(rows / self.z.shape[0])
            return self.z.repeat(reps, 1)[:rows]
        return self.z[:rows]

    def advance(self, z: torch.Tensor):
        self.z = z
        self.batches += 1


def _ensure_generator(generator: Optional[torch.Generator], device) -> torch.Generator:
    """Pairing regenerates noise from recorded generator states, so sampling always uses an explicit
    generator; without one, a fresh one is seeded from the global RNG."""
    if generator is not None:
        return generator
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2 ** 62, ())))


def _noisy_batch(x: torch.Tensor, rows: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    noisy = x.repeat(rows, 1, 1, 1)
    return noisy + torch.randn(noisy.shape, generator=generator, device=x.device, dtype=x.dtype) * sigma


def _regenerate(x, sigma, log: _PhaseLog, positions: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """The noisy inputs at ``positions`` (sorted), bit-identical to those of the logged phase, in
    chunks of exactly ``batch_size`` rows (the last one shorter)."""
    pending: List[torch.Tensor] = []
    held = 0
    replay = torch.Generator(device=x.device)
    for start, rows, state in log.batches:
        lo = int(torch.searchsorted(positions, start))
        hi = int(torch.searchsorted(positions, start + rows))
        if hi == lo:
            continue
        replay.set_state(state)
        noisy = _noisy_batch(x, rows, sigma, replay)
        pending.append(noisy.index_select(0, (positions[lo:hi] - start).to(x.device)))
        held += hi - lo
        while held >= batch_size:
            block = torch.cat(pending)
            yield block[:batch_size]
            pending, held = [block[batch_size:]], held - batch_size
    if held:
        yield torch.cat(pending)


def _mark_diverged(out) -> torch.Tensor:
    """Logits, with NaN rows for samples whose solve never produced a finite iterate (the solvers then
    return the initial state with an infinite residual): such samples make the image abstain."""
    ok = torch.isfinite(out.result.residual)
    return torch.where(ok[:, None], out.logits, torch.full_like(out.logits, float("nan")))


def _safe_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class per row; ABSTAIN for rows with non-finite logits."""
    ok = torch.isfinite(logits).all(1)
    return torch.where(ok, logits.argmax(1), torch.full_like(ok, ABSTAIN, dtype=torch.long))


__all__ = ["ABSTAIN", "DEQSolve", "SRSConfig", "SampleStats", "Certificate", "Prediction", "Smooth",
           "lower_confidence_bound", "upper_confidence_bound", "radius_from_p"]
