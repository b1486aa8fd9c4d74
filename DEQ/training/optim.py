"""Optimiser and learning-rate scheduler factories of a training run (TRAIN.OPTIMIZER, TRAIN.LR_SCHEDULER)."""
from __future__ import annotations

import torch


def build_optimizer(cfg, model):
    """SGD (TRAIN.MOMENTUM, TRAIN.NESTEROV) or Adam over ``model``'s parameters, at TRAIN.LR, weight decay TRAIN.WD."""
    t = cfg.TRAIN
    if t.OPTIMIZER == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.LR, momentum=t.MOMENTUM, weight_decay=t.WD, nesterov=t.NESTEROV)
    return torch.optim.Adam(model.parameters(), lr=t.LR, weight_decay=t.WD)


def build_scheduler(cfg, optimizer, steps_per_epoch: int):
    """Cosine: per optimiser step over the whole run (as MDEQ). Step: per epoch at LR_STEP."""
    t = cfg.TRAIN
    if t.LR_SCHEDULER == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, list(t.LR_STEP), t.LR_FACTOR)
    total = max(1, steps_per_epoch * (t.END_EPOCH - t.BEGIN_EPOCH))
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=1e-6)
