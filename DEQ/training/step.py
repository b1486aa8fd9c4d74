"""One training step and one evaluation pass: the noisy / SmoothAdv batch, the training forward, the loss
with the Jacobian term and the optimiser update (:func:`train_step_fn`), and the clean / noisy test
accuracy with the solver statistics (:func:`evaluate`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..attacks import SmoothAdvAttack
from ..distributed import RoundRobinBatches, World
from ..errors import UserError
from ..models import is_trainable_deq


@dataclass
class EvalStats:
    clean_acc: float
    noisy_acc: float
    mean_steps: float
    mean_residual: float
    nfe: float


def jac_factor(cfg, train_step: int, epoch: int) -> float:
    """The MDEQ schedule of the Jacobian-loss weight."""
    deq_steps = train_step - cfg.TRAIN.PRETRAIN_STEPS
    if deq_steps < 0:
        return cfg.LOSS.PRETRAIN_JAC_LOSS_WEIGHT
    if epoch >= cfg.LOSS.JAC_STOP_EPOCH:
        return 0.0
    return cfg.LOSS.JAC_LOSS_WEIGHT + 0.1 * (deq_steps // cfg.LOSS.JAC_INCREMENTAL)


def smoothadv_batch(model, attacker: SmoothAdvAttack, cfg, x, y, epoch: int, train_step: int):
    """SmoothAdv (Salman et al. 2019, train_pgd.py): draw m noise vectors per input, attack the smoothed
    soft classifier at the noisy points (the model in eval mode, gradients through the fixed point as
    training takes them), and return the rows to train on: all m copies of (adversarial + noise) with
    ATTACK.TRAIN_MULTI_NOISE, else the first copy of each input."""
    m = attacker.num_noise_vec
    noise = torch.randn((x.shape[0], m, *x.shape[1:]), device=x.device, dtype=x.dtype) * cfg.TRAIN.NOISE
    x_adv = attacker(model, x, y, noise, epoch=epoch, train_step=train_step)
    if attacker.train_multi_noise:
        return (x_adv.unsqueeze(1) + noise).flatten(0, 1), y.repeat_interleave(m)
    return x_adv + noise[:, 0], y


def smoothadv_attacker(cfg, input_dim: int) -> Optional[SmoothAdvAttack]:
    """The run's SmoothAdv attack (None unless ATTACK.ADV_TRAINING), with one-line errors for bad ATTACK keys."""
    if not cfg.ATTACK.ADV_TRAINING:
        return None
    attacker = SmoothAdvAttack.from_config(cfg)
    widest = math.sqrt(input_dim)  # the l2 distance between an all-0 and an all-1 image
    if attacker.epsilon > widest:
        raise UserError(f"ATTACK.EPSILON {attacker.epsilon:g} exceeds the largest l2 distance between two inputs "
                        f"({widest:.3g}): it is in [0,1] pixel units (the SmoothAdv code's 0-255 units divided "
                        f"by 256, e.g. 64 -> 0.25)")
    if attacker.no_grad and cfg.TRAIN.NOISE <= 0:
        raise UserError("ATTACK.NO_GRAD_ATTACK estimates gradients from the Gaussian noise: it needs --noise > 0")
    return attacker


class TrainForward(torch.nn.Module):
    """The training forward (``forward_train`` for a DEQ) as a module's ``forward``: DistributedDataParallel
    averages the gradients of what runs inside ``DDP.forward`` only."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, train_step: int, compute_jac_loss: bool, f_thres: int):
        """Args: the batch and ``forward_train``'s settings.

        Returns: (logits, Jacobian loss; None for a plain classifier)."""
        if is_trainable_deq(self.model):
            out = self.model.forward_train(x, train_step=train_step, compute_jac_loss=compute_jac_loss, f_thres=f_thres)
            return out.logits, out.jac_loss
        return self.model(x), None  # a plain classifier (ResNet): no fixed point, no Jacobian term


def train_step_fn(model, optimizer, scheduler, scaler, cfg, x, y, epoch: int, train_step: int, device,
                  attacker: Optional[SmoothAdvAttack] = None, forward: Optional[torch.nn.Module] = None,
                  draws: Optional[torch.Generator] = None, loss_weight: float = 1.0):
    """One optimiser step on a noisy (with ``attacker``: SmoothAdv-perturbed) batch of this process's rows.

    ``forward``: :class:`TrainForward` of ``model`` or its DDP wrapper; ``draws``: generator of the Jacobian-loss coin
    and threshold jitter (None: torch's global one; under torchrun seeded alike on every rank); ``loss_weight``: see
    ``ShardedBatchSampler.loss_weight``.  Returns (loss, jac_loss or None, correct count, rows trained on)."""
    noise = cfg.TRAIN.NOISE
    if attacker is not None:
        x, y = smoothadv_batch(model, attacker, cfg, x, y, epoch, train_step)
    elif noise > 0:
        x = x + torch.randn_like(x) * noise
    deq = is_trainable_deq(model)
    factor = jac_factor(cfg, train_step, epoch) if deq else 0.0
    compute_jac = factor > 0 and torch.rand((), generator=draws).item() < cfg.LOSS.JAC_LOSS_FREQ
    delta = cfg.DEQ.RAND_F_THRES_DELTA
    jitter = torch.randint(-delta, 2, (), generator=draws).item() if (delta > 0 and compute_jac) else 0
    f_thres = cfg.DEQ.F_THRES + jitter
    f_thres = max(1, f_thres)
    amp = scaler is not None
    with torch.autocast(device_type=device.type, enabled=amp):
        run = forward if forward is not None else TrainForward(model)
        logits, jac_loss = run(x, train_step, compute_jac, f_thres)
        loss = F.cross_entropy(logits.float(), y)
        total = loss + factor * jac_loss if compute_jac else loss
        if loss_weight != 1.0:
            total = total * loss_weight
    optimizer.zero_grad(set_to_none=True)
    if amp:
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
    else:
        total.backward()
    if cfg.TRAIN.CLIP > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.TRAIN.CLIP)
    if amp:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if cfg.TRAIN.LR_SCHEDULER != "step":
        scheduler.step()
    correct = (logits.argmax(1) == y).sum().item()
    return loss.item(), (jac_loss.item() if compute_jac else None), correct, x.shape[0]


@torch.no_grad()
def evaluate(model, loader, noise: float, device, seed: int = 1234, solver=None, max_iter=None,
             world: Optional[World] = None) -> EvalStats:
    """Clean accuracy and accuracy under N(0, noise^2) with the standard solver from zeros, as :class:`EvalStats`.

    The noise comes from its own generator seeded by ``seed`` (comparable across epochs); a plain classifier's solver
    statistics are nan.  Under torchrun (``world``) each rank evaluates its batches with the noise a one-process run
    gives them and the counts are all-reduced: every rank returns the one-process figures."""
    model.eval()
    deq = is_trainable_deq(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    plan = loader.batch_sampler if world is not None and world.distributed else None
    if plan is not None and not isinstance(plan, RoundRobinBatches):
        raise ValueError("a sharded evaluation needs a loader built on DEQ.distributed.RoundRobinBatches")
    n = clean = noisy = 0
    steps = resid = nfe = 0.0 if deq else float("nan")
    drawn = 0  # under torchrun: global batches whose noise was drawn (or skipped) so far
    for k, (x, y) in enumerate(loader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if plan is not None and noise > 0:
            for other in range(drawn, plan.mine[k]):  # another rank's batch: same draws, thrown away
                torch.randn((plan.sizes[other], *x.shape[1:]), generator=gen, device=device)
            drawn = plan.mine[k] + 1
        if deq:
            out = model.solve(x, solver, max_iter)
            logits = out.logits
            steps += out.result.nsteps.float().sum().item()
            resid += torch.nan_to_num(out.result.residual, nan=1e9).sum().item()
            nfe += out.result.nfe * x.shape[0]
        else:
            logits = model(x)
        clean += (logits.argmax(1) == y).sum().item()
        if noise > 0:
            eps = torch.randn(x.shape, generator=gen, device=device) * noise
            noisy_logits = model.solve(x + eps, solver, max_iter).logits if deq else model(x + eps)
            noisy += (noisy_logits.argmax(1) == y).sum().item()
        else:
            noisy = clean
        n += x.shape[0]
    if plan is not None:
        n, clean, noisy, steps, resid, nfe = world.sum([n, clean, noisy, steps, resid, nfe])
    return EvalStats(100.0 * clean / n, 100.0 * noisy / n, steps / n, resid / n, nfe / n)
