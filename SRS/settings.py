"""Settings of a smoothed classifier: how the base DEQ solves, and how SRS samples and pairs.

Plain frozen dataclasses, built by the command lines (``SRS.cli``), the benchmark and
tests alike; :class:`SRS.smooth.Smooth` takes them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DEQSolve:
    """How a DEQ base classifier solves: solver name, evaluation budget, tolerance (None: model default)."""
    solver: str = "anderson"
    max_iter: int = 30
    tol: Optional[float] = None

    def label(self) -> str:
        return f"{self.max_iter}{self.solver[0].upper()}"

    def describe(self) -> str:
        """``solver:budget``, as in the results header."""
        return f"{self.solver}:{self.max_iter}"


@dataclass(frozen=True)
class SRSConfig:
    """Serialized randomized smoothing settings (names as the reference flags).

    Attributes:
        step: the SRS solve from the warm start (``--f_solver/--f_thresh``; its tol lets it stop
            early, the budget acting as a cap).
        warmup, warmup_interval: warm-up batches from zeros (the first; and every k-th if k > 0).
        warm_start: where a (non-warm-up) batch starts: 'previous' (the paper's chain: sample j starts
            from sample j of the previous batch) or 'mean' (every sample starts from the mean of the
            previous batch's solutions).  The noise of consecutive samples is independent, so under a
            linear response z*(x + d) ~ z_bar + J d a converged previous solution is off by J (d - d'),
            twice the variance of the mean's J d (a short step's solutions are pulled toward the mean,
            which narrows the gap: ``tests/test_pairing.py`` has the closed form).  Digits MDEQ, one
            Anderson step: 28% smaller start and final errors, 14% fewer misaligned samples.  Either way the
            chain's predictions are a function of the image's noise alone, which is all the pairing
            argument needs (``SRS.pairing``), so the certificates are unchanged in kind.
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
        refine_margin: SRS samples whose top-two logit margin after the step is below this are
            re-solved by the standard model (after the pass, in full batches), and their prediction
            is the standard model's own: such samples cannot be misaligned, so the pairs come from
            the others only (``SRS.bounds.eliminated_count``).  Misaligned samples sit almost all at
            small margins, so this removes most misalignment for the cost of the re-solved rows.
            0 turns it off (the paper's chain).
        radius_grid: adaptive pairing aims at radii on this grid (pixel units; e.g. the 0.25 steps of
            a certified-accuracy table) instead of within ``radius_slack`` of the SRS counts' radius:
            the fewest pairs with which, if none is misaligned, the eliminated radius reaches the
            largest grid radius at or below that radius (``SRS.pairing.grid_pair_count``).  An image
            then keeps its place in a table on that grid at a fraction of the pairs the slack costs
            when its radius is not just above a grid radius; the reported radius is the certificate's
            own (at least that grid radius when no pair is misaligned).  None: the slack rule.
        second_look: adaptive pairing: G > 1 plans a second look at the pairs, up to G times the first
            look's in all, solved only when the first look finds a misaligned pair (one misaligned pair
            among the fewest pairs that reach the target is enough to miss it).  Both looks' sizes are
            fixed before any pair is solved and each look's misalignment bound is taken at
            alpha_1 / 2, so all hold at once with probability >= 1 - alpha_1 whichever is reported
            (union bound; ``SRS.bounds.eliminated_p_lower``).  The first look then needs about
            ln(4/alpha) / ln(2/alpha) (9% at alpha 0.001) more pairs.  0 turns it off.
        route_pilot: adaptive pairing with the fallback: where the n0 selection samples alone send
            an image to the standard model, ceil(route_pilot * n) further SRS samples (a fraction
            of the estimation samples n), drawn from a stream of their own
            (``derived_seed(seed, 'route_pilot')``) and used by no certificate, refine the decision
            (``SRS.pairing.choose_route`` on selection + pilot counts).  100 selection samples
            cannot tell p = 0.99 (a few thousand pairs, SRS pays) from p = 0.9995 (more pairs than
            N); 1000 more (0.1 of N 10000) can, for about 0.7% of a standard run at SRS-1A.  0 turns
            it off.
    """
    step: DEQSolve = DEQSolve("anderson", 1)
    warmup: DEQSolve = DEQSolve("anderson", 10)
    warmup_interval: int = 0
    warm_start: str = "previous"
    conf_drop: Optional[int] = None
    certificate: str = "eliminated"
    chain_across_phases: bool = True
    radius_slack: float = 0.05
    max_pairs: Optional[int] = None
    fallback: bool = True
    overhead: float = 1.0
    step_cost: Optional[float] = None
    refine_margin: float = 0.0
    route_pilot: float = 0.1
    radius_grid: Optional[float] = None
    second_look: float = 0.0

    def __post_init__(self):
        # The flags parse these as floats; a caller's 3 and the CLI's 3.0 must describe (and resume) alike.
        for name in ("radius_slack", "refine_margin", "route_pilot", "second_look", "radius_grid", "step_cost"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))

    @property
    def adaptive(self) -> bool:
        return self.conf_drop is None

    @property
    def looks(self) -> int:
        """Looks at the misalignment bound planned per image (2 with ``second_look``)."""
        return 2 if self.adaptive and self.second_look > 1 else 1

    @property
    def corrected(self) -> bool:
        """Whether the SRS counts are corrected by paired standard solves ('eliminated', 'reference').

        Only ``certificate='none'`` skips the correction.  A corrected certificate with no pair
        (``conf_drop=0``) has p_m_upper = 1 and abstains: zero pairs say nothing about f_D."""
        return self.certificate != "none"

    @property
    def pairs(self) -> bool:
        """Whether this certificate solves any pair ('none' and ``conf_drop=0`` do not)."""
        return self.corrected and (self.adaptive or self.conf_drop > 0)

    def describe(self, routes: bool = True) -> str:
        """One line with every setting that changes a certificate (the results header's ``srs`` entry).

        Args:
            routes: whether the mode has CERTIFY's standard fallback route; without it (PREDICT)
                ``fallback``, ``route_pilot`` and ``step_cost`` shape no row and are left out."""
        text = (f"step={self.step.describe()} step_tol={self.step.tol} warmup={self.warmup.describe()} "
                f"interval={self.warmup_interval} conf_drop={'auto' if self.adaptive else self.conf_drop} "
                f"certificate={self.certificate} chain_across_phases={self.chain_across_phases}")
        if self.adaptive and self.pairs:
            text += f" radius_slack={self.radius_slack} max_pairs={self.max_pairs}"
            if routes:
                text += f" fallback={self.fallback}"
            if routes and self.fallback:
                text += f" route_pilot={self.route_pilot}"
            if self.radius_grid is not None:
                text += f" radius_grid={self.radius_grid}"
            if self.second_look > 1:
                text += f" second_look={self.second_look}"
        if self.warm_start != "previous":  # files written before the option keep their header
            text += f" warm_start={self.warm_start}"
        if self.step_cost is not None and routes:
            text += f" step_cost={self.step_cost}"
        if self.refine_margin > 0:
            text += f" refine_margin={self.refine_margin}"
        return text


WARM_STARTS = ("previous", "mean")

__all__ = ["DEQSolve", "SRSConfig", "WARM_STARTS"]
