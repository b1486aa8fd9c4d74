"""Adversarial attacks on a base classifier and on its Gaussian-smoothed version.

:func:`pgd` (base classifier, l2/l-inf), :func:`smooth_pgd` (SmoothAdv's PGD on the smoothed soft classifier)
and :func:`ddn`; :class:`SmoothAdvAttack` for training; :func:`certificate_contradictions` cross-checks an
attack run against certificates.  Inputs are in pixel space [0, 1]; radii in the units of the smoothing noise.
For a DEQ the attacked classifier is the standard model, differentiated through the fixed point as training
does (:func:`model_logits`).  Every attack runs the model in eval mode, restores its mode, and leaves parameter
gradients untouched; randomness comes from ``generator`` (None: torch's global generator).  Step sizes and
references: docs/attacks.md.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .checks import check_count, check_number
from .errors import UserError

ATTACKS = ("PGD", "DDN")          # ATTACK.ATTACK: the SmoothAdv training attacks
NORMS = ("l2", "linf")
Clamp = Optional[Tuple[float, float]]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- helpers
def model_logits(model: torch.nn.Module, train_step: int = -1) -> LogitsFn:
    """The differentiable ``fn(x) -> logits`` attacks use for ``model``.  For a DEQ (``forward_train``),
    ``train_step`` -1 is the standard model; gradients go through the fixed point as training takes them
    (``DEQ.GRAD``).  Any other module is returned as is."""
    forward_train = getattr(model, "forward_train", None)
    if forward_train is None:
        return model
    return lambda x: forward_train(x, train_step=train_step).logits


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training if isinstance(model, torch.nn.Module) else None
    if was:
        model.eval()
    try:
        yield
    finally:
        if was:
            model.train()


def _randn(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def _rand(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=dev, dtype=like.dtype).to(like.device)


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


def _unit(g: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Rows of ``g`` scaled to unit l2 norm; a zero row becomes a random direction (as SmoothAdv)."""
    norms = _flat_norm(g)
    zero = norms == 0
    if bool(zero.any()):
        g = torch.where(_view(zero, g), _randn(g.shape, g, generator), g)
        norms = _flat_norm(g)
    return g / _view(norms, g)


def _random_start(x: torch.Tensor, epsilon: float, norm: str, generator) -> torch.Tensor:
    """A uniform draw from the epsilon ball (l2: uniform direction, radius eps * U^(1/d))."""
    if norm == "linf":
        return (2 * _rand(x.shape, x, generator) - 1) * epsilon
    d = x[0].numel()
    radius = epsilon * _rand((x.shape[0],), x, generator) ** (1.0 / d)
    return _unit(_randn(x.shape, x, generator), generator) * _view(radius, x)


def _project(x: torch.Tensor, delta: torch.Tensor, epsilon: float, norm: str, clamp: Clamp) -> torch.Tensor:
    """Onto the epsilon ball, then into the image box (the box step only shrinks |delta_i|, so the
    result is in both sets when x is in the box)."""
    if norm == "linf":
        delta = delta.clamp(-epsilon, epsilon)
    else:
        n = _flat_norm(delta)
        delta = delta * _view(torch.clamp(epsilon / n.clamp_min(1e-12), max=1.0), delta)
    if clamp is not None:
        delta = (x + delta).clamp(*clamp) - x
    return delta


def _noisy(x: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, C, H, W) + noise (B, m, C, H, W) -> (B*m, C, H, W), input-major (rows i*m .. i*m+m-1 are input i)."""
    if noise is None:
        return x
    return (x.unsqueeze(1) + noise).flatten(0, 1)


def smoothed_nll(logits: torch.Tensor, y: torch.Tensor, num_noise_vec: int = 1) -> torch.Tensor:
    """Per-input loss of the smoothed soft classifier: (B,) -log((1/m) sum_i softmax(logits_i)_y) of (B*m, K)
    input-major ``logits``, exact for every m via log-sum-exp (m = 1: the cross-entropy)."""
    logp = F.log_softmax(logits.float(), dim=1).view(y.shape[0], num_noise_vec, -1)
    logp_y = logp.gather(2, y.view(-1, 1, 1).expand(-1, num_noise_vec, 1)).squeeze(2)
    return math.log(num_noise_vec) - torch.logsumexp(logp_y, dim=1)


def draw_noise(x: torch.Tensor, sigma: float, num_noise_vec: int = 1,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, m, C, H, W) Gaussian noise N(0, sigma^2 I), m = ``num_noise_vec``, shaped like ``x``."""
    check_number("sigma", sigma, 0)
    check_count("num_noise_vec (m)", num_noise_vec, 1)
    return _randn((x.shape[0], num_noise_vec, *x.shape[1:]), x, generator) * sigma


def _check_inputs(name: str, x, y, epsilon, steps, clamp: Clamp, allow_none_eps: bool = False) -> None:
    if not (allow_none_eps and epsilon is None):
        check_number(f"{name}: epsilon", epsilon, 0, hint=" (the l2 / l-inf radius in pixel units)")
    check_count(f"{name}: steps", steps, 1)
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise UserError(f"{name}: inputs must be a batch tensor (B, ...), got {type(x).__name__}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        raise UserError(f"{name}: labels must be a tensor of shape ({x.shape[0]},), one per input, got "
                        f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if clamp is not None:
        lo, hi = clamp
        if not lo < hi:
            raise UserError(f"{name}: clamp must be (low, high) with low < high, got {clamp}")
        if x.numel() and (float(x.min()) < lo or float(x.max()) > hi):
            raise UserError(f"{name}: inputs must lie in [{lo:g}, {hi:g}] (pixel space; the models normalise "
                            f"inside); pass clamp=None for unbounded inputs")


def _check_noise(name: str, x: torch.Tensor, noise: Optional[torch.Tensor]) -> int:
    if noise is None:
        return 1
    if not isinstance(noise, torch.Tensor) or noise.dim() != x.dim() + 1 or noise.shape[0] != x.shape[0] \
            or noise.shape[2:] != x.shape[1:] or noise.shape[1] < 1:
        raise UserError(f"{name}: noise must have shape (B, m, {', '.join(map(str, x.shape[1:]))}) with B = "
                        f"{x.shape[0]} inputs and m >= 1 noise vectors each (see draw_noise), got "
                        f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}")
    return noise.shape[1]


def _step_size(name: str, step_size, default: float) -> float:
    if step_size is None:
        return default
    check_number(f"{name}: step_size", step_size, 0, strict=True)
    return float(step_size)


# --------------------------------------------------------------------------- attacks
def pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, *, norm: str = "l2",
        steps: int = 10, step_size: Optional[float] = None, random_start: bool = True, restarts: int = 1,
        clamp: Clamp = (0.0, 1.0), generator: Optional[torch.Generator] = None,
        logits_fn: Optional[LogitsFn] = None) -> torch.Tensor:
    """PGD on the base classifier: maximise the cross-entropy of its logits in an epsilon ball.

    Args:
        x, y: (B, C, H, W) clean inputs in ``clamp``'s range and (B,) labels; epsilon: radius (pixels), >= 0.
        norm: 'l2' or 'linf'; step_size: default 2 epsilon / steps (l2) or 2.5 epsilon / steps (l-inf).
        restarts: per input keep a misclassified result, else the largest loss (needs ``random_start``).
        clamp: image box (low, high) or None; logits_fn: default :func:`model_logits` (model).

    Returns:
        (B, C, H, W) detached adversarial inputs with ||x_adv - x|| <= epsilon, inside ``clamp``.
    """
    _check_inputs("pgd", x, y, epsilon, steps, clamp)
    if norm not in NORMS:
        raise UserError(f"pgd: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    check_count("pgd: restarts", restarts, 1)
    if restarts > 1 and not random_start:
        raise UserError("pgd: restarts > 1 repeat the same attack without random_start; set random_start=True")
    alpha = _step_size("pgd", step_size, (2.0 if norm == "l2" else 2.5) * epsilon / steps)
    x = x.detach()
    if epsilon == 0:
        return x.clone()
    fn = logits_fn or model_logits(model)
    best = best_score = None
    with _eval_mode(model), torch.enable_grad():
        for _ in range(restarts):
            delta = torch.zeros_like(x)
            if random_start:
                delta = _project(x, _random_start(x, epsilon, norm, generator), epsilon, norm, clamp)
            for _ in range(steps):
                delta.requires_grad_(True)
                loss = F.cross_entropy(fn(x + delta).float(), y, reduction="sum")
                grad, = torch.autograd.grad(loss, delta)
                step = grad.sign() if norm == "linf" else _unit(grad, generator)
                delta = _project(x, delta.detach() + alpha * step, epsilon, norm, clamp)
            adv = x + delta
            if restarts == 1:
                return adv.detach()
            with torch.no_grad():
                logits = fn(adv).float()
                score = F.cross_entropy(logits, y, reduction="none") + 1e6 * (logits.argmax(1) != y).float()
            if best is None:
                best, best_score = adv, score
            else:
                better = score > best_score
                best = torch.where(_view(better, adv), adv, best)
                best_score = torch.maximum(score, best_score)
    return best.detach()


def smooth_pgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: float, noise: torch.Tensor, *,
               steps: int = 10, step_size: Optional[float] = None, random_start: bool = False,
               no_grad: bool = False, clamp: Clamp = (0.0, 1.0), generator: Optional[torch.Generator] = None,
               logits_fn: Optional[LogitsFn] = None) -> torch.Tensor:
    """Smooth-PGD / SmoothAdv's PGD_L2: l2 PGD on the smoothed soft classifier with fixed noise.

    One delta per input, shared by its m noisy copies x + delta + e_i (``noise`` (B, m, C, H, W), the same e_i
    at every step), moved along the normalised gradient of :func:`smoothed_nll`.  ``step_size`` default
    2 epsilon / steps; ``no_grad``: SmoothAdv's gradient-free direction mean_i(-softmax_y e_i) (Stein's lemma;
    needs sigma > 0).  Returns detached x + delta (noise not added) in the ball and ``clamp``.
    """
    _check_inputs("smooth_pgd", x, y, epsilon, steps, clamp)
    m = _check_noise("smooth_pgd", x, noise)
    alpha = _step_size("smooth_pgd", step_size, 2.0 * epsilon / steps)
    x, noise = x.detach(), noise.detach()
    if epsilon == 0:
        return x.clone()
    fn = logits_fn or model_logits(model)
    delta = torch.zeros_like(x)
    if random_start:
        delta = _project(x, _random_start(x, epsilon, "l2", generator), epsilon, "l2", clamp)
    with _eval_mode(model):
        for _ in range(steps):
            if no_grad:
                with torch.no_grad():
                    p_y = torch.exp(-smoothed_nll(fn(_noisy(x + delta, noise)), y.repeat_interleave(m), 1))
                    grad = -(p_y.view(-1, m, *([1] * (x.dim() - 1))).to(noise.dtype) * noise).mean(1)
            else:
                with torch.enable_grad():
                    delta.requires_grad_(True)
                    loss = smoothed_nll(fn(_noisy(x + delta, noise)), y, m).sum()
                    grad, = torch.autograd.grad(loss, delta)
            delta = _project(x, delta.detach() + alpha * _unit(grad, generator), epsilon, "l2", clamp)
    return (x + delta).detach()


def ddn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epsilon: Optional[float],
        noise: Optional[torch.Tensor] = None, *, steps: int = 10, gamma: float = 0.05,
        init_norm: Optional[float] = None, levels: Optional[int] = None, clamp: Clamp = (0.0, 1.0),
        generator: Optional[torch.Generator] = None, logits_fn: Optional[LogitsFn] = None) -> torch.Tensor:
    """DDN (decoupled direction and norm) as SmoothAdv uses it for training (algorithm: docs/attacks.md).

    Returns the smallest adversarial x + delta found (detached, noise not added), projected onto the
    ``epsilon`` ball (None: no projection); an input never misclassified keeps delta = 0.  With ``noise``
    (B, m, C, H, W) the loss is :func:`smoothed_nll` and "adversarial" means the majority prediction over the m
    copies is wrong.  ``gamma`` in (0, 1): norm update factor; ``init_norm``: default epsilon (1.0 without);
    ``levels``: quantise to that many grey levels (SmoothAdv: 256) or None.  Other args as :func:`pgd`.
    """
    _check_inputs("ddn", x, y, epsilon, steps, clamp, allow_none_eps=True)
    m = _check_noise("ddn", x, noise)
    check_number("ddn: gamma", gamma, 0, strict=True, maximum=1)
    if gamma >= 1:
        raise UserError(f"ddn: gamma must be in (0, 1), got {gamma}")
    if levels is not None:
        check_count("ddn: levels", levels, 2)
    init = init_norm if init_norm is not None else (epsilon if epsilon is not None else 1.0)
    check_number("ddn: init_norm", init, 0)
    x = x.detach()
    noise = noise.detach() if noise is not None else None
    if epsilon == 0:
        return x.clone()
    fn = logits_fn or model_logits(model)
    B = x.shape[0]
    if clamp is not None:
        worst = _flat_norm(torch.maximum(x - clamp[0], clamp[1] - x))
    else:
        worst = torch.full((B,), float("inf"), device=x.device, dtype=x.dtype)
    norm = torch.full((B,), float(init), device=x.device, dtype=x.dtype).minimum(worst)
    best_l2, best_delta = worst.clone(), torch.zeros_like(x)
    delta = torch.zeros_like(x)
    with _eval_mode(model), torch.enable_grad():
        for i in range(steps):
            alpha = 0.01 + 0.99 * (1 + math.cos(math.pi * (i + 1) / steps)) / 2
            l2 = _flat_norm(delta)
            delta.requires_grad_(True)
            logits = fn(_noisy(x + delta, noise)).float()
            loss = smoothed_nll(logits, y, m).sum()
            grad, = torch.autograd.grad(loss, delta)
            delta = delta.detach()
            pred = logits.detach().argmax(1).view(B, m)
            pred = pred[:, 0] if m == 1 else pred.mode(1).values
            is_adv = pred != y
            better = is_adv & (l2 < best_l2)
            best_l2 = torch.where(better, l2, best_l2)
            best_delta = torch.where(_view(better, x), delta, best_delta)
            delta = delta + alpha * _unit(grad, generator)
            norm = torch.minimum(norm * (1 - (2 * is_adv.to(x.dtype) - 1) * gamma), worst)
            delta = delta * _view(norm / _flat_norm(delta).clamp_min(1e-12), x)
            adv = x + delta
            if levels is not None:
                adv = torch.round(adv * (levels - 1)) / (levels - 1)
            if clamp is not None:
                adv = adv.clamp(*clamp)
            delta = adv - x
    if epsilon is not None:
        best_delta = _project(x, best_delta, epsilon, "l2", None)
    adv = x + best_delta
    if levels is not None:
        adv = torch.round(adv * (levels - 1)) / (levels - 1)
    if clamp is not None:
        adv = adv.clamp(*clamp)
    if epsilon is not None and levels is not None:  # rounding may have left the ball: project once more
        adv = x + _project(x, adv - x, epsilon, "l2", clamp)
    return adv.detach()


_BY_NAME = {"pgd": pgd, "smooth_pgd": smooth_pgd, "ddn": ddn}


def get_attack(name: str) -> Callable[..., torch.Tensor]:
    """The attack function called ``name``: ``pgd`` (base classifier), ``smooth_pgd`` or ``ddn``
    (case-insensitive; ``smoothpgd``, ``smooth-pgd`` also accepted)."""
    key = str(name).lower().replace("-", "_")
    key = "smooth_pgd" if key == "smoothpgd" else key
    if key not in _BY_NAME:
        raise UserError(f"unknown attack {name!r}; choose one of {', '.join(_BY_NAME)}")
    return _BY_NAME[key]


# --------------------------------------------------------------------------- SmoothAdv training
def warmup_epsilon(epsilon: float, epoch: int, warm_up: int) -> float:
    """SmoothAdv's epsilon schedule: min(epsilon, (epoch + 1) * epsilon / warm_up) at 0-based ``epoch``
    (warm_up <= 1: the full epsilon from the first epoch)."""
    if warm_up <= 1:
        return float(epsilon)
    return float(min(epsilon, (epoch + 1) * epsilon / warm_up))


@dataclass(frozen=True)
class SmoothAdvAttack:
    """The SmoothAdv training attack of one run (the ``ATTACK`` config section; keys as there).

    ``epsilon`` is an l2 radius in [0, 1] pixel units (SmoothAdv's 64/256 is 0.25 here); ``attack`` 'PGD'
    uses :func:`smooth_pgd`, 'DDN' :func:`ddn` with noise.
    """
    attack: str = "PGD"
    epsilon: float = 0.25
    num_steps: int = 10
    warm_up: int = 1
    num_noise_vec: int = 1
    train_multi_noise: bool = True
    no_grad: bool = False
    random_start: bool = True

    def __post_init__(self):
        self.check()

    def check(self, prefix: str = "ATTACK.") -> None:
        """One-line :class:`UserError` for any value out of range (names as the config keys)."""
        if self.attack not in ATTACKS:
            raise UserError(f"{prefix}ATTACK must be one of {', '.join(ATTACKS)}, got {self.attack!r}")
        check_number(f"{prefix}EPSILON", self.epsilon, 0,
                     hint=" (an l2 radius in [0,1] pixel units, like --noise)")
        check_count(f"{prefix}NUM_STEPS", self.num_steps, 1)
        check_count(f"{prefix}WARM_UP", self.warm_up, 0)
        check_count(f"{prefix}NUM_NOISE_VEC", self.num_noise_vec, 1)
        for key, value in (("TRAIN_MULTI_NOISE", self.train_multi_noise), ("NO_GRAD_ATTACK", self.no_grad),
                           ("RANDOM_START", self.random_start)):
            if not isinstance(value, bool):
                raise UserError(f"{prefix}{key} must be True or False, got {value!r}")
        if self.no_grad and self.attack != "PGD":
            raise UserError(f"{prefix}NO_GRAD_ATTACK works with {prefix}ATTACK PGD only (SmoothAdv has no "
                            f"gradient-free DDN); set one of them differently")

    @classmethod
    def from_config(cls, cfg) -> "SmoothAdvAttack":
        """From a config's ``ATTACK`` section (yacs node or a plain object with the same keys)."""
        a = cfg.ATTACK
        return cls(attack=a.ATTACK, epsilon=a.EPSILON, num_steps=a.NUM_STEPS, warm_up=a.WARM_UP,
                   num_noise_vec=a.NUM_NOISE_VEC, train_multi_noise=a.TRAIN_MULTI_NOISE,
                   no_grad=a.NO_GRAD_ATTACK, random_start=a.RANDOM_START)

    def epsilon_at(self, epoch: int) -> float:
        """The radius used in 0-based ``epoch`` (warm-up included)."""
        return warmup_epsilon(self.epsilon, epoch, self.warm_up)

    def as_dict(self) -> dict:
        return asdict(self)

    def __call__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, noise: torch.Tensor,
                 epoch: int, train_step: int = -1, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Attack the smoothed soft classifier at x + e_i (``noise`` (B, m, C, H, W)); returns (B, C, H, W)
        adversarial inputs (noise not added).  ``epoch`` sets the warm-up epsilon; ``train_step`` picks the
        forward training uses at that step (unrolled during pretraining)."""
        eps = self.epsilon_at(epoch)
        fn = model_logits(model, train_step)
        if self.attack == "DDN":
            return ddn(model, x, y, eps, noise, steps=self.num_steps, init_norm=eps, generator=generator,
                       logits_fn=fn)
        return smooth_pgd(model, x, y, eps, noise, steps=self.num_steps, random_start=self.random_start,
                          no_grad=self.no_grad, generator=generator, logits_fn=fn)


# --------------------------------------------------------------------------- cross-check
def certificate_contradictions(certified_predict: Sequence[int], certified_radius: Sequence[float],
                               attacked_predict: Sequence[int], epsilon: float) -> list:
    """Indices of the images where an attack of l2 size <= ``epsilon`` contradicts a certificate.

    A certificate (c, R) says the smoothed classifier returns c on the ball of radius R, so an attacked
    PREDICT returning a class other than c (abstaining is no contradiction) with ``epsilon < R`` happens only
    with the certificate's or PREDICT's failure probability; certified accuracy at r thus lower-bounds
    accuracy under any attack of size r.  The three sequences are per image, same order (-1 = abstain).
    """
    if not (len(certified_predict) == len(certified_radius) == len(attacked_predict)):
        raise UserError(f"certificate_contradictions: {len(certified_predict)} certified predictions, "
                        f"{len(certified_radius)} radii and {len(attacked_predict)} attacked predictions; "
                        f"pass the same images in the same order")
    check_number("certificate_contradictions: epsilon", epsilon, 0)
    return [i for i, (c, r, a) in enumerate(zip(certified_predict, certified_radius, attacked_predict))
            if int(c) >= 0 and float(r) > epsilon and int(a) >= 0 and int(a) != int(c)]


__all__ = ["ATTACKS", "NORMS", "model_logits", "smoothed_nll", "draw_noise", "pgd", "smooth_pgd", "ddn",
           "get_attack", "warmup_epsilon", "SmoothAdvAttack", "certificate_contradictions"]
