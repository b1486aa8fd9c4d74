"""Settings of a smoothed classifier: how the base DEQ solves, and how SRS samples and pairs.

Every certification option is declared once here (:func:`option`, metadata :class:`Option`): flags, checks,
mode refusals (:meth:`SmoothingSpec.validate`), the results header's ``srs`` entry and benchmark labels all come
from the declarations.  :class:`SRSOptions` -> :class:`SRSConfig` (with the solves) -> :class:`SmoothingSpec`
(:meth:`~SmoothingSpec.resolve`: certified model, SRS settings).  Defaults are the recipe ``--srs --f_thresh 3``
(docs/internals.md, "Certification settings").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, List, Optional, Sequence, Tuple, Union

from DEQ.checks import check_choice, check_number
from DEQ.errors import UserError
from DEQ.solvers import SOLVERS

NEEDS_SRS = "srs"            # sets the SRS chain or its certificate: needs --srs
NEEDS_ADAPTIVE = "adaptive"  # sets adaptive pairing: needs --srs and --conf_drop auto
NEEDS_ROUTE = "route"        # sets CERTIFY's standard fallback route: adaptive pairing in a mode that has the route
WARM_STARTS = ("previous", "mean")
CERTIFICATES = ("eliminated", "reference", "none")
# The stem, head and noise of one sample in evaluations of f: a constant of the fallback's cost model
# (``SRS.pairing.route_costs``), not a setting.
SAMPLE_OVERHEAD = 1.0
# The paper's certified-accuracy table in units of sigma: radius / sigma = 0, 0.5, ..., 3.
DEFAULT_TABLE_Z = tuple(k / 2 for k in range(7))


# ----------------------------------------------------------------------------- the solves
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

    def words(self) -> str:
        """``MDEQ-30A (anderson, 30 evaluations, tol 0)``: the model as a run announces it."""
        tol = "the model's default tol" if self.tol is None else f"tol {self.tol:g}"
        return f"MDEQ-{self.label()} ({self.solver}, {self.max_iter} evaluations, {tol})"


# ----------------------------------------------------------------------------- radii of the table
def default_radii(sigma: float) -> Tuple[float, ...]:
    """The paper's certified-accuracy table at noise ``sigma``: multiples of sigma / 2 from 0 to 3 sigma
    (pixel units, rounded to 12 decimals so that e.g. 3 x 0.06 prints as 0.18)."""
    return tuple(round(z * sigma, 12) for z in DEFAULT_TABLE_Z)


def check_radii(radii: Optional[Sequence[float]]) -> Tuple[float, ...]:
    """The table radii of ``--radii``, sorted without repeats; UserError unless each is finite and >= 0."""
    if not radii:
        raise UserError("--radii needs at least one radius (pixel units), e.g. --radii 0 0.25 0.5")
    for r in radii:
        if not (isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r >= 0):
            raise UserError(f"--radii must be finite numbers >= 0 (pixel units), got {r}")
    return tuple(sorted({float(r) for r in radii}))


def show_radii(radii: Sequence[float]) -> str:
    """``0,0.25,0.5``: radii as the header and the benchmark labels write them."""
    return ",".join(format(r, ".12g") for r in radii)


# ----------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Option:
    """What a declared option is, beyond its field's name, type and default.

    Attributes:
        flag, help: the command-line flag (dest: the field's name) and its help (default appended).
        header: where the results header records it: ``'srs:KEY'`` or a top-level entry (a tuple: by mode);
            None with ``header_free`` saying why it changes no row.  ``header_when(config, routes)``: whether the
            ``srs`` entry holds it; ``changed_only``: only at a non-default value; ``show``: its header text.
        needs: the mode it applies in (None: every mode); outside it a non-default value is refused in one
            line (``why``: the words where those of ``needs`` do not fit).  ``check``: raises UserError.
        advanced, type, nargs, metavar, const, default_text: argparse presentation.
        label: benchmark label suffix for a non-default value (format string or function), or None.
    """
    flag: str
    help: str
    header: Union[None, str, Tuple[str, ...]]
    header_free: str = ""
    header_when: Optional[Callable[["SRSConfig", bool], bool]] = None
    changed_only: bool = False
    show: Callable[[object], str] = str
    advanced: bool = True
    needs: Optional[str] = None
    why: str = ""
    check: Optional[Callable[[object], None]] = None
    type: Optional[Callable] = str
    nargs: Optional[str] = None
    metavar: Optional[str] = None
    const: object = None
    default_text: Optional[str] = None
    label: Union[None, str, Callable[[object], str]] = None

    def header_keys(self) -> Tuple[str, ...]:
        return () if self.header is None else (self.header,) if isinstance(self.header, str) else self.header

    def label_of(self, value) -> str:
        return self.label(value) if callable(self.label) else self.label.format(value)


OPTION = "option"


def option(default, flag: str, help: str, **meta):
    """A dataclass field declaring a certification option (``meta``: the other :class:`Option` fields)."""
    return field(default=default, metadata={OPTION: Option(flag, help, **meta)})


def declared(cls) -> List[Tuple[str, Option, object]]:
    """(name, :class:`Option`, default) of every option ``cls`` declares, in field order."""
    return [(f.name, f.metadata[OPTION], f.default) for f in fields(cls) if OPTION in f.metadata]


# value checks (one UserError line each)
def _budget(flag: str) -> Callable[[object], None]:
    def check(v):
        if v is not None and v < 1:
            raise UserError(f"{flag} must be >= 1 evaluation, got {v}")
    return check


def _at_least_zero(flag: str) -> Callable[[object], None]:
    def check(v):
        if v is not None and v < 0:
            raise UserError(f"{flag} must be >= 0, got {v}")
    return check


def _number(flag: str, minimum: float = 0, strict: bool = False, hint: str = "") -> Callable[[object], None]:
    return lambda v: check_number(flag, v, minimum, strict=strict, hint=hint)


def _solver(flag: str) -> Callable[[object], None]:
    def check(name):
        if name is not None and name not in SOLVERS:
            raise UserError(f"{flag} {name!r} is not a solver; choose one of {', '.join(sorted(SOLVERS))}")
    return check


def _certificate(value) -> None:
    if value not in CERTIFICATES:
        raise UserError(f"--certificate {value!r} is not one of {', '.join(CERTIFICATES)}")


def _second_look(value) -> None:
    if not (value == 0 or (isinstance(value, (int, float)) and math.isfinite(value) and value > 1)):
        raise UserError(f"--second_look must be 0 (off) or a factor > 1 (pairs of both looks over the first "
                        f"look's), got {value}")


def _radii(value) -> None:
    if value is not None:
        check_radii(value)


def parse_conf_drop(value) -> Optional[int]:
    """``--conf_drop``: 'auto' (or None) -> None (adaptive pairing), else a whole number K."""
    if value is None or value == "auto":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"--conf_drop must be 'auto' (adaptive pairing) or a whole number K, got {value!r}") from None


# when the srs entry of the header holds an option
def _pairing(c: "SRSConfig", routes: bool) -> bool:
    return c.adaptive and c.pairs


def _route(c: "SRSConfig", routes: bool) -> bool:
    return c.adaptive and c.pairs and routes


SOLVER_METAVAR = "SOLVER"


@dataclass(frozen=True)
class SRSOptions:
    """The SRS options that pass unchanged from the flags into :class:`SRSConfig` (field order is the order of
    the header's ``srs`` entry; each field's help string says what it does).

    Soundness notes: ``certificate`` 'eliminated' is the sound certificate, 'reference' the reference code's
    weaker variant, 'none' NO guarantee (ablations only).  ``conf_drop`` None (adaptive) and ``radii`` /
    ``radius_slack`` size K_A from the SRS counts alone (``SRS.pairing``).  ``route_pilot`` samples come from a
    stream of their own and enter no certificate.  ``fallback`` also lets an SRS-route image escape after its
    first look of pairs to the standard model on noise of its own (the level split: ``SRS.pairing.escape_alpha``).
    ``second_look`` G > 1 fixes both looks' sizes before any pair is solved and takes each look's bound at
    alpha_1 / 2 (union bound).  With either ``warm_start`` the chain's predictions are a function of the image's
    noise alone (all the pairing argument needs).  ``refine_margin`` re-solves low-margin samples with the
    standard model: exact, never misaligned, never paired.
    """
    warmup_interval: int = option(
        0, "--warmup_interval", "with --srs: every k-th batch is a warm-up from zeros (0: only the first)",
        header="srs:interval", header_when=lambda c, routes: True, needs=NEEDS_SRS, type=int,
        check=_at_least_zero("--warmup_interval"), label=" warmup-every{}")
    conf_drop: Optional[int] = option(
        None, "--conf_drop", "paired standard solves of the correlation-eliminated bound: 'auto' (adaptive, per "
        "image from the SRS counts) or a fixed K of the N samples (the paper: 400)",
        header="srs:conf_drop", header_when=lambda c, routes: True, show=lambda v: "auto" if v is None else str(v),
        needs=NEEDS_SRS, type=parse_conf_drop, metavar="{auto,K}", default_text="auto",
        check=_at_least_zero("--conf_drop"), label=" K={}")
    certificate: str = option(
        "eliminated", "--certificate", "SRS certificate: eliminated (sound), reference (the reference code's weaker "
        "variant), none (no guarantee; ablations only)",
        header="srs:certificate", header_when=lambda c, routes: True, needs=NEEDS_SRS,
        metavar="{" + ",".join(CERTIFICATES) + "}", check=_certificate, label=" ({})")
    chain_across_phases: bool = option(
        True, "--no_chain_across_phases", "with --srs: restart the SRS chain for the estimation samples",
        header="srs:chain_across_phases", header_when=lambda c, routes: True, needs=NEEDS_SRS, const=False,
        default_text="the chain carries on", label=" restart")
    radius_slack: Optional[float] = option(
        None, "--radius_slack", "adaptive pairing aims within this many sigma of the radius the SRS counts alone "
        "give, instead of at the table's radii (--radii)",
        header="srs:radius_slack", header_when=lambda c, routes: _pairing(c, routes) and c.radius_slack is not None,
        needs=NEEDS_ADAPTIVE, type=float, default_text="off: the pairs aim at --radii",
        check=_number("--radius_slack", hint=" (in units of sigma)"), label=" slack{:g}")
    radii: Optional[Tuple[float, ...]] = option(
        None, "--radii", "the radii of your certified-accuracy table (pixel units, as analyze.py's): adaptive "
        "pairing aims each image at the largest of them at or below its SRS radius; --sequential decides "
        "each image's row of that table",
        header="srs:radii", header_when=lambda c, routes: _pairing(c, routes) and c.radius_slack is None,
        show=lambda v: show_radii(v), advanced=False, needs=NEEDS_ADAPTIVE, type=float, nargs="+",
        default_text="multiples of sigma/2 from 0 to 3 sigma",
        why="--radii sets the table that --srs's adaptive pairing aims at and that --sequential decides; "
            "this run does neither (add --sequential, or --srs with --conf_drop auto), or drop --radii "
            "(analyze.py takes a fixed-N run's table radii)",
        check=_radii, label=lambda v: " radii" + show_radii(v))
    max_pairs: Optional[int] = option(
        None, "--max_pairs", "adaptive pairing: most paired standard solves per image",
        header="srs:max_pairs", header_when=_pairing, needs=NEEDS_ADAPTIVE, type=int, default_text="N",
        label=" maxpairs{}")
    fallback: bool = option(
        True, "--no_fallback", "adaptive pairing: never certify an image with the standard model outright, even "
        "where SRS plus its pairs would cost more, nor after a first look of pairs that shows a misaligned chain "
        "(the escape; with it on, an SRS image's certificate runs at 0.9 alpha, an escape at 0.1 alpha)",
        header="srs:fallback", header_when=_route, needs=NEEDS_ROUTE, const=False,
        default_text="the fallback is on", label=" nofallback")
    route_pilot: float = option(
        0.5, "--route_pilot", "adaptive pairing: where the N0 selection samples do not clearly send an image "
        "to SRS, this fraction of N further SRS samples (own noise stream, in no certificate) refine the "
        "route; 0 turns it off",
        header="srs:route_pilot", header_when=lambda c, routes: _route(c, routes) and c.fallback,
        needs=NEEDS_ROUTE, type=float, check=_number("--route_pilot", hint=" (a fraction of N; 0 turns the pilot off)"),
        label=" pilot{:g}")
    second_look: float = option(
        3.0, "--second_look", "adaptive pairing: G > 1 plans a second look of up to G times the first look's "
        "pairs, solved only when the first finds a misaligned pair and the second can still raise the table "
        "row (each look's bound at half the level); 0 off",
        header="srs:second_look", header_when=lambda c, routes: _route(c, routes) and c.looks == 2,
        needs=NEEDS_ADAPTIVE, type=float, check=_second_look, label=" look{:g}")
    warm_start: str = option(
        "previous", "--warm_start", "with --srs: each sample starts from the previous batch's sample at its "
        "position (previous, the paper's chain) or from the mean of the previous batch's solutions (mean)",
        header="srs:warm_start", header_when=lambda c, routes: True, changed_only=True, needs=NEEDS_SRS,
        metavar="{" + ",".join(WARM_STARTS) + "}", check=lambda v: check_choice("--warm_start", v, WARM_STARTS),
        label=" {}")
    step_cost: Optional[float] = option(
        None, "--step_cost", "adaptive pairing: evaluations of f one SRS step is expected to cost, for the "
        "fallback's cost model (set it with --step_tol, where --f_thresh is only a cap)",
        header="srs:step_cost", header_when=lambda c, routes: routes, changed_only=True, needs=NEEDS_ROUTE,
        type=float, default_text="--f_thresh", check=_number("--step_cost", strict=True, hint=" (evaluations of f)"),
        label=" cost{:g}")
    refine_margin: float = option(
        0.0, "--refine_margin", "with --srs: re-solve with the standard model the SRS samples whose top-two logit "
        "margin is below this (their prediction is then exact, never misaligned); 0 turns it off",
        header="srs:refine_margin", header_when=lambda c, routes: True, changed_only=True, needs=NEEDS_SRS,
        type=float, check=_number("--refine_margin", hint=" (a logit margin; 0 turns it off)"), label=" refine{:g}")

    def __post_init__(self):
        # The flags parse these as floats (radii: a list); a caller's 3 and the CLI's 3.0 must describe and
        # resume alike.
        for f in fields(SRSOptions):
            value = getattr(self, f.name)
            if f.metadata[OPTION].type is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
        if self.radii is not None and not isinstance(self.radii, tuple):
            object.__setattr__(self, "radii", tuple(self.radii))

    @property
    def adaptive(self) -> bool:
        return self.conf_drop is None

    @property
    def corrected(self) -> bool:
        """Whether the SRS counts are corrected by paired standard solves (all but 'none'); with no pair
        (``conf_drop=0``) p_m_upper = 1 and the certificate abstains."""
        return self.certificate != "none"

    @property
    def pairs(self) -> bool:
        """Whether this certificate solves any pair ('none' and ``conf_drop=0`` do not)."""
        return self.corrected and (self.adaptive or self.conf_drop > 0)

    @property
    def looks(self) -> int:
        """Planned looks at the misalignment bound: 2 with ``second_look`` (adaptive, eliminated), else 1."""
        return 2 if self.adaptive and self.second_look > 1 and self.certificate == "eliminated" else 1

    def options(self) -> dict:
        """The :class:`SRSOptions` fields of this object, by name."""
        return {f.name: getattr(self, f.name) for f in fields(SRSOptions)}


@dataclass(frozen=True)
class SRSConfig(SRSOptions):
    """SRS settings: the options (:class:`SRSOptions`) with the solves they steer: ``step`` from the warm start
    (its tol may stop it early, the budget a cap) and ``warmup`` from zeros."""
    step: DEQSolve = DEQSolve("anderson", 3)
    warmup: DEQSolve = DEQSolve("anderson", 10)

    def describe(self, routes: bool = True) -> str:
        """The results header's ``srs`` entry: every setting that changes a certificate (the solves, then each
        option its declaration places there; without ``routes``, as in PREDICT, the route's options are left out)."""
        parts = [f"step={self.step.describe()}", f"step_tol={self.step.tol}", f"warmup={self.warmup.describe()}"]
        for name, opt, default in declared(SRSOptions):
            value = getattr(self, name)
            if not opt.header_when(self, routes) or (opt.changed_only and value == default):
                continue
            parts.append(f"{opt.header.split(':', 1)[1]}={opt.show(value)}")
        return " ".join(parts)


SRS_DEFAULTS = SRSConfig()


@dataclass(frozen=True)
class SmoothingSpec(SRSOptions):
    """The smoothed classifier as the flags describe it; None solver fields take the checkpoint config's
    CERTIFY section (the certified model) or the SRS defaults.  Without ``srs``, ``f_solver``/``f_thresh`` name
    the certified model like ``std_solver``/``std_thresh``; with ``srs`` they are the SRS step."""
    srs: bool = option(
        False, "--srs", "serialized randomized smoothing: a warm-started chain whose counts the paired standard "
        "solves correct (the certificate is still the certified model's)",
        header="srs", advanced=False, const=True, default_text="off: standard randomized smoothing")
    f_thresh: Optional[int] = option(
        None, "--f_thresh", "solver budget in evaluations of f: the SRS step with --srs, else the certified model",
        header=("standard", "srs:step"), advanced=False, type=int, check=_budget("--f_thresh"),
        default_text=f"{SRS_DEFAULTS.step.max_iter} with --srs, else CERTIFY.THRES of the checkpoint config")
    f_solver: Optional[str] = option(
        None, "--f_solver", f"solver ({', '.join(sorted(SOLVERS))}): the SRS step with --srs, else the certified model",
        header=("standard", "srs:step"), metavar=SOLVER_METAVAR, check=_solver("--f_solver"),
        default_text=f"{SRS_DEFAULTS.step.solver} with --srs, else CERTIFY.SOLVER of the checkpoint config")
    std_solver: Optional[str] = option(
        None, "--std_solver", "solver of the certified model", header="standard", metavar=SOLVER_METAVAR,
        check=_solver("--std_solver"), default_text="CERTIFY.SOLVER of the checkpoint config")
    std_thresh: Optional[int] = option(
        None, "--std_thresh", "budget of the certified model in evaluations of f", header="standard", type=int,
        check=_budget("--std_thresh"), default_text="CERTIFY.THRES of the checkpoint config")
    tol: Optional[float] = option(
        None, "--tol", "residual tolerance of the certified model's solves (0: always the whole budget)",
        header="tol", type=float, check=_number("--tol", hint=" (0: always run the whole budget)"),
        default_text="CERTIFY.TOL of the checkpoint config")
    step_tol: Optional[float] = option(
        None, "--step_tol", "with --srs: tolerance of the SRS step from the warm start; with a tolerance "
        "--f_thresh is a cap and the step stops once every sample's residual is below it",
        header="srs:step_tol", needs=NEEDS_SRS, type=float, check=_number("--step_tol"), default_text="--tol")
    warmup_solver: Optional[str] = option(
        None, "--warmup_solver", "with --srs: solver of the warm-up batches", header="srs:warmup",
        needs=NEEDS_SRS, metavar=SOLVER_METAVAR, check=_solver("--warmup_solver"), default_text="the step's solver")
    warmup_thresh: Optional[int] = option(
        None, "--warmup_thresh", "with --srs: budget of the warm-up batches", header="srs:warmup", needs=NEEDS_SRS,
        type=int, check=_budget("--warmup_thresh"), default_text=str(SRS_DEFAULTS.warmup.max_iter))

    def changed(self) -> List[Tuple[str, Option]]:
        """(name, Option) of every declared option set to a value other than its default, in field order."""
        return [(name, opt) for name, opt, default in declared(SmoothingSpec) if getattr(self, name) != default]

    def validate(self, n: int, n_name: str = "N", routes: bool = True, table: bool = False) -> None:
        """Raise every setting error as one UserError line before any work: value checks, flags outside their
        mode (``routes``: the mode has CERTIFY's fallback; ``table``: ``--sequential``), and pair counts above
        ``n`` (the samples the pairs are drawn from; ``n_name``: its flag)."""
        for name, opt, _ in declared(SmoothingSpec):
            if opt.check is not None:
                opt.check(getattr(self, name))
        changed = [(name, opt) for name, opt in self.changed() if not (name == "radii" and table)]
        srs_only = [opt for name, opt in changed if opt.needs == NEEDS_SRS]
        if srs_only and not self.srs:
            flag = srs_only[0].flag
            raise UserError(srs_only[0].why or f"{flag} sets the SRS chain or its certificate, which needs --srs "
                            f"(without it --f_solver/--f_thresh/--tol set the certified standard model)")
        if not self.srs:
            for step_flag, std_flag in (("f_solver", "std_solver"), ("f_thresh", "std_thresh")):
                a, b = getattr(self, step_flag), getattr(self, std_flag)
                if a is not None and b is not None and a != b:
                    raise UserError(f"--{step_flag} {a} and --{std_flag} {b} both name the certified model in standard "
                                    f"mode (without --srs); give one of them (with --srs, --{step_flag} is the SRS "
                                    f"step)")
        if self.conf_drop is not None and self.conf_drop > n:
            raise UserError(f"--conf_drop {self.conf_drop} is larger than --{n_name} {n}: the pairs are drawn from "
                            f"those samples; lower it")
        if self.srs and self.conf_drop == 0 and self.certificate != "none":
            raise UserError(f"--conf_drop 0 pairs no sample, so the {self.certificate} certificate has no evidence "
                            f"about the standard model and abstains on every image; use --conf_drop auto or a K > 0")
        adaptive_only = [opt for name, opt in changed if opt.needs in (NEEDS_ADAPTIVE, NEEDS_ROUTE)]
        if adaptive_only and (not self.srs or not self.adaptive):
            opt = adaptive_only[0]
            raise UserError(opt.why or f"{opt.flag} sets adaptive pairing, which needs --srs and --conf_drop auto")
        if self.max_pairs is not None and not 1 <= self.max_pairs <= n:
            raise UserError(f"--max_pairs must be between 1 and --{n_name} {n} (pairs are drawn from those samples), "
                            f"got {self.max_pairs}")
        if self.second_look not in (0, SRS_DEFAULTS.second_look) and self.certificate != "eliminated":
            raise UserError("--second_look splits the eliminated certificate's misalignment bound; it needs "
                            "--certificate eliminated (the other certificates take one look)")
        if self.radius_slack is not None and self.radii is not None and not table:
            raise UserError("--radius_slack replaces aiming the pairs at the table's radii (--radii): give one of them")
        if self.second_look != SRS_DEFAULTS.second_look and not routes:
            raise UserError("--second_look plans a second look of CERTIFY's pairs; PREDICT takes one look (its "
                            "pairs are sized for one bound at alpha / 2): drop --second_look")
        route_only = [opt.flag for name, opt in changed if opt.needs == NEEDS_ROUTE]
        if route_only and not routes:
            raise UserError(f"{route_only[0]} sets the standard fallback route of CERTIFY; PREDICT has no such route "
                            f"(its pairs are sized without it): drop {route_only[0]}")
        if self.route_pilot != SRS_DEFAULTS.route_pilot and not self.fallback:
            raise UserError("--route_pilot refines the standard fallback's decision, which --no_fallback turns off")

    def resolve(self, default: DEQSolve, sigma: Optional[float] = None) -> Tuple[DEQSolve, Optional["SRSConfig"]]:
        """(certified model, SRS settings or None); None solver fields come from ``default`` (the checkpoint
        config's CERTIFY model); ``sigma`` gives :func:`default_radii` when the table is not given."""
        tol = default.tol if self.tol is None else self.tol  # explicit, so the header records the tolerance used
        if not self.srs:
            return DEQSolve(self.std_solver or self.f_solver or default.solver,
                            self.std_thresh or self.f_thresh or default.max_iter, tol), None
        standard = DEQSolve(self.std_solver or default.solver, self.std_thresh or default.max_iter, tol)
        d = SRS_DEFAULTS
        step = DEQSolve(self.f_solver or d.step.solver, self.f_thresh or d.step.max_iter,
                        tol if self.step_tol is None else self.step_tol)
        warm = DEQSolve(self.warmup_solver or step.solver, self.warmup_thresh or d.warmup.max_iter, tol)
        options = self.options()
        if self.radii is not None:
            options["radii"] = check_radii(self.radii)
        elif sigma is not None and self.radius_slack is None:
            options["radii"] = default_radii(sigma)
        return standard, SRSConfig(step=step, warmup=warm, **options)


__all__ = ["DEQSolve", "Option", "option", "declared", "SRSOptions", "SRSConfig", "SmoothingSpec", "SRS_DEFAULTS",
           "WARM_STARTS", "CERTIFICATES", "NEEDS_SRS", "NEEDS_ADAPTIVE", "NEEDS_ROUTE", "SAMPLE_OVERHEAD",
           "DEFAULT_TABLE_Z", "default_radii", "check_radii", "show_radii", "parse_conf_drop"]
