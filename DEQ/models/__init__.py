"""Models by MODEL.NAME (the registry, :mod:`DEQ.models.registry`) and the question a trainer asks of one.

``mdeq`` (:mod:`DEQ.models.mdeq`) and the ResNet baselines (:mod:`DEQ.models.resnet`: ``resnet_cifar`` of depth
6n+2, ``resnet110``, ``resnet50``).  DEQs have ``.solve`` and ``.forward_train``; ResNets are plain classifiers."""
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
    """Build the model MODEL.NAME of a validated ``cfg`` names, random weights, train mode; UserError if unknown."""
    return model_spec(cfg.MODEL.NAME).builder(cfg)


def random_init_mdeq(cfg_path: str, device, seed: int, purpose: str = "it needs an MDEQ"):
    """(MDEQ in eval mode with seeded random weights, input shape (C, H, W)) of a yaml config: the model of the
    speed checks that need no checkpoint and no data set.  UserError (naming ``purpose``) for a non-MDEQ config."""
    from ..config import load_config
    from ..data import dataset_info
    from ..errors import UserError
    cfg = load_config(cfg_path)
    torch.manual_seed(seed)
    model = build_model(cfg).to(device).eval()
    if not hasattr(model, "set_runtime"):
        raise UserError(f"{cfg_path} is not an MDEQ config (MODEL.NAME {cfg.MODEL.NAME}): {purpose}")
    size = cfg.MODEL.IMAGE_SIZE
    return model, (dataset_info(cfg.DATASET.DATASET).in_channels, size[0], size[1])


def is_trainable_deq(model: torch.nn.Module) -> bool:
    """Whether ``model`` trains as a DEQ: it has ``solve`` (:func:`DEQ.interface.is_deq`) and ``forward_train``
    (True for MDEQClsNet and wrappers exposing its methods; False for plain classifiers and solve-only DEQs)."""
    return is_deq(model) and hasattr(model, "forward_train")


__all__ = ["MODELS", "MDEQClsNet", "DEQOutput", "ModelSpec", "TrainOutput", "ResNetClassifier", "build_model",
           "build_resnet", "is_trainable_deq", "random_init_mdeq", "model_spec", "register_model", "resnet50", "resnet_cifar"]
