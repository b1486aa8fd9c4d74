"""Model registry: MODEL.NAME -> builder.

``mdeq`` (the multiscale DEQ, :mod:`DEQ.models.mdeq`) and the randomized-smoothing
ResNet baselines (:mod:`DEQ.models.resnet`): ``resnet_cifar`` (Cohen et al.'s CIFAR
ResNet of depth MODEL.DEPTH = 6n+2), ``resnet110`` (the same, depth 110) and
``resnet50`` (torchvision's, ImageNet).  DEQs have a ``.solve`` method (fixed-point
solve with a chosen solver, budget and warm start); ResNets are plain classifiers.
"""
from typing import Callable, Dict

import torch

from ..interface import is_deq as is_deq_classifier
from .mdeq import DEQOutput, MDEQClsNet, TrainOutput
from .resnet import ResNetClassifier, build_resnet, resnet50, resnet_cifar

MODELS: Dict[str, Callable] = {
    "mdeq": MDEQClsNet,
    "resnet_cifar": build_resnet,
    "resnet110": build_resnet,
    "resnet50": build_resnet,
}


def build_model(cfg) -> torch.nn.Module:
    """Build the model MODEL.NAME names, with random weights.

    Args:
        cfg: a validated config (``DEQ.config.load_config``).

    Returns:
        torch.nn.Module: MDEQClsNet or ResNetClassifier, in train mode.

    Raises:
        UserError: MODEL.NAME is not in :data:`MODELS`.
    """
    builder = MODELS.get(cfg.MODEL.NAME)
    if builder is None:
        from ..errors import UserError
        raise UserError(f"MODEL.NAME={cfg.MODEL.NAME!r} is not a model; choose one of {', '.join(MODELS)}")
    return builder(cfg)


def is_deq(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a deep equilibrium model (has ``.solve`` and ``.forward_train``).

    Args:
        model: any classifier.

    Returns:
        bool: True for MDEQClsNet (and wrappers exposing its methods), False for plain classifiers.
    """
    return is_deq_classifier(model) and hasattr(model, "forward_train")


__all__ = ["MODELS", "MDEQClsNet", "DEQOutput", "TrainOutput", "ResNetClassifier", "build_model", "build_resnet",
           "is_deq", "resnet50", "resnet_cifar"]
