"""Models by MODEL.NAME (the registry, :mod:`DEQ.models.registry`) and the question a trainer asks of one.

``mdeq`` (the multiscale DEQ, :mod:`DEQ.models.mdeq`) and the randomized-smoothing
ResNet baselines (:mod:`DEQ.models.resnet`): ``resnet_cifar`` (Cohen et al.'s CIFAR
ResNet of depth MODEL.DEPTH = 6n+2), ``resnet110`` (the same, depth 110) and
``resnet50`` (torchvision's, ImageNet).  DEQs have a ``.solve`` method (fixed-point
solve with a chosen solver, budget and warm start, :func:`DEQ.interface.is_deq`) and a
``.forward_train`` (:func:`is_trainable_deq`); ResNets are plain classifiers.
"""
import torch

from ..interface import is_deq
from .mdeq import DEQOutput, MDEQClsNet, TrainOutput
from .registry import MODELS, ModelSpec, model_spec, register_model
from .resnet import ResNetClassifier, build_resnet, resnet50, resnet_cifar

register_model("mdeq", MDEQClsNet, deq=True)
register_model("resnet_cifar", build_resnet, depth=None)
register_model("resnet110", build_resnet, depth=110)
register_model("resnet50", build_resnet, depth=50)


def build_model(cfg) -> torch.nn.Module:
    """Build the model MODEL.NAME names, with random weights.

    Args:
        cfg: a validated config (``DEQ.config.load_config``).

    Returns:
        torch.nn.Module: MDEQClsNet or ResNetClassifier, in train mode.

    Raises:
        UserError: MODEL.NAME is not in :data:`MODELS`.
    """
    return model_spec(cfg.MODEL.NAME).builder(cfg)


def is_trainable_deq(model: torch.nn.Module) -> bool:
    """Whether ``model`` trains as a deep equilibrium model: it has :meth:`DEQ.interface.DEQClassifier.solve`
    (:func:`DEQ.interface.is_deq`) and ``.forward_train`` (unrolled pretraining, fixed point with the implicit
    or phantom gradient, Jacobian term).

    Args:
        model: any classifier.

    Returns:
        bool: True for MDEQClsNet (and wrappers exposing its methods), False for plain classifiers and for
        DEQs that can only be solved.
    """
    return is_deq(model) and hasattr(model, "forward_train")


__all__ = ["MODELS", "MDEQClsNet", "DEQOutput", "ModelSpec", "TrainOutput", "ResNetClassifier", "build_model",
           "build_resnet", "is_trainable_deq", "model_spec", "register_model", "resnet50", "resnet_cifar"]
