"""Adversarial attacks on a base classifier and on its Gaussian-smoothed version.

Shared by SmoothAdv training (``ATTACK.ADV_TRAINING``, :class:`SmoothAdvAttack`) and by
certification-time attack runs.  Inputs live in pixel space [0, 1] (every model of this
project normalises inside, its first module), perturbations are measured in the same
units as the smoothing noise and the certified radii.

* :func:`pgd`: projected gradient descent on the *base* classifier, l2 or l-inf, with
  random start and restarts, maximising the cross-entropy of its logits.
* :func:`smooth_pgd`: SmoothAdv's attack on the *smoothed soft* classifier (Salman et al.
  2019, ``PGD_L2`` with ``num_noise_vec``): l2 PGD maximising
  -log( (1/m) sum_i softmax(f(x + delta + e_i))_y ) over m Gaussian noise vectors e_i that
  stay fixed across the steps; ``no_grad=True`` is SmoothAdv's gradient-free estimate
  mean_i(-softmax(f(x + delta + e_i))_y e_i) (Stein's lemma), which needs no backward pass.
* :func:`ddn`: decoupled direction and norm (Rony et al. 2019) as SmoothAdv uses it, on the
  base classifier or (with ``noise``) on the smoothed soft classifier.

Deep equilibrium models: the base classifier is the standard model (the configured
solver and budget from zeros, the model's forward in eval mode).  Gradients go through
the fixed point the way training takes them: :func:`model_logits` calls
``model.forward_train``, which solves without a graph and then differentiates one
application of f at the fixed point with the implicit-gradient backward hook
(``DEQ.GRAD implicit``, DEQ/implicit.py) or the one-step phantom gradient
(``DEQ.GRAD phantom``).  Any other ``nn.Module`` is differentiated through its forward.
Every attack runs the model in eval mode (BatchNorm running statistics, no dropout) and
restores the mode it found; parameters receive no gradients.

Randomness (random starts, the random direction that replaces a zero gradient) comes
from ``generator`` (a ``torch.Generator`` on any device; a CPU generator gives the same
draws on CPU and CUDA) or, when it is None, from torch's global generator (training,
so that ``--resume`` replays it).

Step sizes follow the reference code: l2 PGD and Smooth-PGD 2 epsilon / steps
(SmoothAdv), l-inf PGD 2.5 epsilon / steps (Madry et al.); DDN a cosine schedule from 1
to 0.01 with norm factor ``gamma`` 0.05.
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
    """The differentiable logits function attacks use for ``model``.

    Args:
        model: a DEQ of this project (has ``forward_train``) or any classifier module.
        train_step: for a DEQ, the training step whose forward to use: -1 (default) is the
            standard model (solve from zeros with the configured solver and budget); a step
            below ``TRAIN.PRETRAIN_STEPS`` unrolls f NUM_LAYERS times, as training does then.

    Returns:
        ``fn(x) -> logits`` with gradients through the fixed point as training takes them
        (implicit backward hook or phantom gradient, per ``DEQ.GRAD``).
    """
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
    """Per-input loss of the smoothed soft classifier: -log of the mean softmax of the true class.

    Args:
        logits: (B*m, K) logits at B inputs times m noise vectors, input-major.
        y: (B,) true labels.
        num_noise_vec: m.

    Returns:
        (B,) -log((1/m) sum_i softmax(logits_i)_y), computed as a log-sum-exp of log-softmax
        values (exact for every m; m = 1 is the cross-entropy).
    """
    logp = F.log_softmax(logits.float(), dim=1).view(y.shape[0], num_noise_vec, -1)
    logp_y = logp.gather(2, y.view(-1, 1, 1).expand(-1, num_noise_vec, 1)).squeeze(2)
    return math.log(num_noise_vec) - torch.logsumexp(logp_y, dim=1)


def draw_noise(x: torch.Tensor, sigma: float, num_noise_vec: int = 1,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Gaussian noise for the smoothed-classifier attacks.

    Args:
        x: (B, C, H, W) inputs (shape, device and dtype are taken from it).
        sigma: noise standard deviation (pixel units).
        num_noise_vec: m noise vectors per input.
        generator: torch.Generator (any device) or None for the global generator.

    Returns:
        (B, m, C, H, W) noise, N(0, sigma^2 I).
    """
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
        model: the classifier (a DEQ: the standard model, see :func:`model_logits`); run in eval mode.
        x: (B, C, H, W) clean inputs, in ``clamp``'s range.
        y: (B,) true labels.
        epsilon: radius of the ball (pixel units), >= 0.
        norm: ``"l2"`` or ``"linf"``.
        steps: gradient steps per restart, >= 1.
        step_size: default 2 epsilon / steps (l2) or 2.5 epsilon / steps (l-inf).
        random_start: start from a uniform draw in the ball (else from x).
        restarts: independent starts; per input the result that is misclassified, else the one with
            the largest loss, is kept (needs ``random_start`` when > 1).
        clamp: (low, high) image box the adversarial input stays in, or None.
        generator: randomness of the starts (None: torch's global generator).
        logits_fn: differentiable ``x -> logits``; default :func:`model_logits` (model).

    Returns:
        (B, C, H, W) adversarial inputs, detached, with ||x_adv - x|| <= epsilon and inside ``clamp``.
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

    One perturbation delta per input is shared by its m noisy copies; each step moves delta by
    ``step_size`` along the normalised gradient of :func:`smoothed_nll` at x + delta + e_i
    (i = 1..m, the same e_i at every step), projects onto the epsilon ball and clamps x + delta
    into the image box.

    Args:
        model: the base classifier (a DEQ: the standard model, see :func:`model_logits`); eval mode.
        x: (B, C, H, W) clean inputs, in ``clamp``'s range.
        y: (B,) true labels.
        epsilon: l2 radius (pixel units), >= 0.
        noise: (B, m, C, H, W) noise vectors (sigma included), e.g. from :func:`draw_noise`.
        steps: PGD steps, >= 1.
        step_size: default 2 epsilon / steps (SmoothAdv).
        random_start: start from a uniform draw in the ball (SmoothAdv starts from x).
        no_grad: SmoothAdv's gradient-free direction mean_i(-softmax_y(x + delta + e_i) e_i), an
            estimate of the gradient of -E[softmax_y] by Stein's lemma: forward passes only (needs
            noise with sigma > 0).
        clamp: (low, high) image box for x + delta, or None.
        generator: randomness of the start and of zero-gradient directions (None: global generator).
        logits_fn: differentiable ``x -> logits``; default :func:`model_logits` (model).

    Returns:
        (B, C, H, W) adversarial inputs x + delta (noise not added), detached.
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
    """DDN (decoupled direction and norm) as SmoothAdv uses it for training.

    Each step: record delta if it is adversarial and smaller than the best so far; step along the
    normalised loss gradient with a cosine step size from 1 to 0.01; shrink the norm budget by
    (1 - gamma) if the current point is adversarial, else grow it by (1 + gamma) (capped by the
    largest perturbation the box allows); rescale delta to that norm and clamp x + delta into the
    box.  The result is the smallest adversarial delta found, projected onto the epsilon ball; an
    input never misclassified keeps delta = 0 (SmoothAdv's behaviour).  With ``noise``, the loss is
    :func:`smoothed_nll` over the m noisy copies and "adversarial" means that the most frequent
    prediction over them is wrong.

    Args:
        model: the base classifier (a DEQ: the standard model, see :func:`model_logits`); eval mode.
        x: (B, C, H, W) clean inputs, in ``clamp``'s range.
        y: (B,) true labels.
        epsilon: l2 radius of the returned perturbation (pixel units), or None (no projection: the
            minimal-norm adversarial found).
        noise: (B, m, C, H, W) fixed noise vectors (the smoothed soft classifier) or None (base).
        steps: DDN steps, >= 1.
        gamma: norm update factor, in (0, 1).
        init_norm: initial norm budget (default epsilon, as SmoothAdv sets it; 1.0 without epsilon).
        levels: quantise x + delta to this many grey levels (SmoothAdv: 256), or None (default: the
            inputs need not be 8-bit, and rounding can push delta past epsilon).
        clamp: (low, high) image box, or None.
        generator: randomness of zero-gradient directions (None: global generator).
        logits_fn: differentiable ``x -> logits``; default :func:`model_logits` (model).

    Returns:
        (B, C, H, W) adversarial inputs x + delta (noise not added), detached.
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
    (warm_up <= 1: the full epsilon from the first epoch).

    Args:
        epsilon: the final radius.
        epoch: the 0-based epoch being trained.
        warm_up: epochs of the linear ramp (ATTACK.WARM_UP).

    Returns:
        The radius used in that epoch.
    """
    if warm_up <= 1:
        return float(epsilon)
    return float(min(epsilon, (epoch + 1) * epsilon / warm_up))


@dataclass(frozen=True)
class SmoothAdvAttack:
    """The SmoothAdv training attack of one run (the ``ATTACK`` config section).

    Attributes:
        attack: ``"PGD"`` (:func:`smooth_pgd`) or ``"DDN"`` (:func:`ddn` with noise).
        epsilon: final l2 radius in [0, 1] pixel units (the SmoothAdv / SRS code takes 0-255 units and
            divides by 256: their 64 is 0.25 here).
        num_steps: attack steps.
        warm_up: epochs over which epsilon ramps up (:func:`warmup_epsilon`).
        num_noise_vec: m noise vectors per input.
        train_multi_noise: train on all m noisy copies (else on the first one per input).
        no_grad: the gradient-free PGD direction (PGD only).
        random_start: PGD starts from a uniform draw in the ball.
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
        """Attack the smoothed soft classifier at the noisy points x + e_i.

        Args:
            model: the model being trained (attacked in eval mode, mode restored afterwards).
            x: (B, C, H, W) clean inputs in [0, 1].
            y: (B,) labels.
            noise: (B, m, C, H, W) Gaussian noise, m = num_noise_vec.
            epoch: 0-based epoch (sets the warm-up epsilon).
            train_step: the optimiser step, so that the attack differentiates the forward that training
                uses at this step (unrolled during pretraining, the fixed point afterwards).
            generator: randomness of the start (None: the global generator, replayed by --resume).

        Returns:
            (B, C, H, W) adversarial inputs (noise not added).
        """
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
    """Images where an attack of l2 size <= ``epsilon`` contradicts a certificate.

    A certificate (class c, radius R) says the smoothed classifier returns c on the whole ball of
    radius R, so a PREDICT of the attacked input that returns a class other than c (abstaining, -1,
    is no contradiction) while ``epsilon < R`` can only happen with the certificate's or PREDICT's
    failure probability.  Certified accuracy at radius r is therefore a lower bound on the accuracy
    under any attack of size r; use this to cross-check an attack run against a certification run
    of the same images (same order).

    Args:
        certified_predict: per image, the certified class (-1 = abstain).
        certified_radius: per image, the certified radius.
        attacked_predict: per image, PREDICT's answer at the attacked input (-1 = abstain).
        epsilon: the attack's l2 radius.

    Returns:
        Indices (positions in the sequences) of the contradicting images.
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
