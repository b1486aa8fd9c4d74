"""Where the certified model comes from: a checkpoint file, or a model object built by the caller.

``SRS.runner.RunSpec.checkpoint`` is either the path of a checkpoint (``DEQ.checkpoint.load_model``: its
config gives the certified model (its CERTIFY section), the number of classes, the image size and the data set it was trained
on) or a model object: a ``torch.nn.Module`` as it is, or wrapped in :class:`ModelObject` to name it and
give what it does not expose.  Either way the runner sees a :class:`ModelInfo`: the defaults the smoothing
flags fall back to, the checks against the data set, and the results header's entries that identify the
model (a file's SHA-256, or the SHA-256 of a model object's state_dict, :func:`state_sha256`), which
``--resume`` and the ranks of a distributed run compare like every other setting.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Optional, Union

import torch

from DEQ.acceleration import Runtime, resolve_runtime
from DEQ.checkpoint import LoadedModel, file_sha256
from DEQ.checks import check_count
from DEQ.data import dataset_info
from DEQ.errors import UserError
from DEQ.interface import is_deq

from .settings import DEQSolve


@dataclass(frozen=True)
class ModelObject:
    """A model object certified in place of a checkpoint file (``RunSpec.checkpoint``).

    The model is any ``torch.nn.Module`` mapping a batch of images (B, C, H, W), pixels in [0, 1] as the
    data set gives them, to logits (B, num_classes); a DEQ implements :class:`DEQ.interface.DEQClassifier`
    (``solve(x, solver, max_iter, z0, tol) -> DEQOutput``), which standard smoothing of a DEQ and ``--srs``
    need.  The runner moves it to the run's device and puts it in eval mode (in place); its weights are
    identified by :func:`state_sha256` of its ``state_dict`` (so every tensor that changes a prediction
    belongs in a parameter or buffer).  A compiled or bf16 runtime (``RunSpec.compile``/``precision``)
    needs a DEQ with ``set_runtime(runtime)`` (as ``DEQ.models.mdeq.MDEQClsNet``); for a DEQ without it,
    ``compile='auto'`` means off, and ``'on'`` or ``bf16`` are refused.

    Every field left None is read from the model's attribute of the same meaning where it has one (the
    names ``DEQ.models.mdeq.MDEQClsNet`` uses), else it takes the stated default.

    Attributes:
        model: the classifier.
        name: the results header's ``model`` entry (attribute: none; default ``type(model).__name__``).
        num_classes: its classes, checked against the data set (attribute ``num_classes``; default: the data
            set's, unchecked).
        solve: the solver, budget and tolerance that unset smoothing settings (``f_solver``, ``f_thresh``,
            ``tol``, ``std_solver``, ``std_thresh``) fall back to (attributes ``f_solver``, ``f_thres``,
            ``f_tol``, each on its own; defaults those of :class:`SRS.settings.DEQSolve`).
        dataset: the data set it was trained on, checked against the run's (attribute ``dataset``; default:
            unchecked).
        image_size: the side the embedded digits images are resized to (attribute ``image_size``; default:
            their own 8 pixels).
    """
    model: torch.nn.Module
    name: Optional[str] = None
    num_classes: Optional[int] = None
    solve: Optional[DEQSolve] = None
    dataset: Optional[str] = None
    image_size: Optional[int] = None


ModelSource = Union[str, os.PathLike, torch.nn.Module, ModelObject]


@dataclass(frozen=True)
class ModelInfo:
    """What the runner takes from the certified model's source, checkpoint or model object.

    Attributes:
        kind: the model in messages ('the checkpoint is a resnet110', 'the model object is a MyDEQ').
        num_classes: the classifier's classes.
        default: the solver, budget and tolerance that unset smoothing settings fall back to.
        image_size: the side the digits images are resized to (None: their own size).
        header: the results header's entries that identify the model: ``checkpoint`` (the path, not
            compared on --resume), ``checkpoint_sha256`` and ``cfg_sha256``; or ``model`` (its name) and
            ``model_sha256`` (:func:`state_sha256`).
    """
    kind: str
    num_classes: int
    default: DEQSolve
    image_size: Optional[int]
    header: Dict[str, object]


def model_object(source: ModelSource) -> Optional[ModelObject]:
    """``source`` as a :class:`ModelObject`, or None for a checkpoint path.

    Raises:
        UserError: ``source`` is neither a path, a ``torch.nn.Module`` nor a :class:`ModelObject`.
    """
    if isinstance(source, (str, os.PathLike)):
        return None
    if isinstance(source, torch.nn.Module):
        return ModelObject(source)
    if isinstance(source, ModelObject) and isinstance(source.model, torch.nn.Module):
        return source
    raise UserError(f"the model to certify must be a checkpoint path, a torch.nn.Module or an SRS.source.ModelObject "
                    f"around one, got a {type(source).__name__}")


def state_sha256(model: torch.nn.Module) -> str:
    """Hex SHA-256 of ``model.state_dict()``: for every entry in key order, its name, dtype, shape and the
    bytes of its values on the CPU (row-major).  Equal for equal weights on any device; a change of any
    value, dtype, shape or name changes it.

    Raises:
        UserError: a state_dict entry that is not a plain (strided) tensor, whose bytes cannot identify it.
    """
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized:
            raise UserError(f"state_dict entry {key!r} of {type(model).__name__} is a {type(value).__name__} "
                            f"(not a dense tensor), so its weights cannot be identified by their bytes; keep that "
                            f"state in parameters or buffers")
        t = value.detach().to("cpu").contiguous()
        digest.update(f"{len(key)}:{key}|{t.dtype}|{tuple(t.shape)}|{t.numel() * t.element_size()}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _attribute(model: torch.nn.Module, name: str, kind) -> Optional[object]:
    """``model.<name>`` when it is a ``kind`` (bool is no int), else None."""
    value = getattr(model, name, None)
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def object_info(source: ModelObject, dataset: str, cfg: Optional[str] = None) -> ModelInfo:
    """The :class:`ModelInfo` of a model object certified on ``dataset``, with its checks.

    Args:
        source: the model object (fields None: the model's attributes or the defaults, see :class:`ModelObject`).
        dataset: the run's data set.
        cfg: ``RunSpec.cfg``, which only a bare checkpoint state_dict needs: refused here.

    Raises:
        UserError: a ``cfg``; a malformed field; a number of classes or a training data set other than
            the data set's.
    """
    model = source.model
    name = source.name if source.name is not None else type(model).__name__
    if cfg:
        raise UserError(f"cfg {cfg} builds a model from a bare checkpoint state_dict, but the model to certify is "
                        f"the model object {name}, already built: drop cfg")
    if not isinstance(name, str) or not name.strip() or "\n" in name:
        raise UserError(f"ModelObject.name must be a one-line, non-empty string, got {name!r}")
    info = dataset_info(dataset)
    num_classes = source.num_classes if source.num_classes is not None else _attribute(model, "num_classes", int)
    check_count("ModelObject.num_classes", num_classes, 1)
    if num_classes is not None and num_classes != info.num_classes:
        raise UserError(f"the model object {name} has {num_classes} classes but {dataset} has {info.num_classes}: "
                        f"certify a model for this data set")
    trained_on = source.dataset if source.dataset is not None else _attribute(model, "dataset", str)
    if trained_on is not None and trained_on != dataset:
        raise UserError(f"the model object {name} was trained on {trained_on}, not {dataset}: pass the matching data "
                        f"set or model")
    image_size = source.image_size if source.image_size is not None else _attribute(model, "image_size", int)
    check_count("ModelObject.image_size", image_size, 1)
    if source.solve is not None and not isinstance(source.solve, DEQSolve):
        raise UserError(f"ModelObject.solve must be an SRS.settings.DEQSolve, got a {type(source.solve).__name__}")
    fallback = DEQSolve()
    default = source.solve or DEQSolve(_attribute(model, "f_solver", str) or fallback.solver,
                                       _attribute(model, "f_thres", int) or fallback.max_iter,
                                       _attribute(model, "f_tol", (int, float)))
    return ModelInfo(kind=f"the model object is a {name}", num_classes=num_classes or info.num_classes,
                     default=default, image_size=image_size,
                     header={"model": name, "model_sha256": state_sha256(model)})


def checkpoint_info(path: Union[str, os.PathLike], loaded: LoadedModel, dataset: str,
                    cfg: Optional[str] = None) -> ModelInfo:
    """The :class:`ModelInfo` of a checkpoint loaded by ``DEQ.checkpoint.load_model``, checked against ``dataset``.

    Args:
        path: the checkpoint file.
        loaded: what ``load_model`` returned for it.
        dataset: the run's data set.
        cfg: the yaml it was built from, if one was given (its SHA-256 goes into the header).

    Raises:
        UserError: the checkpoint was trained on another data set or has another number of classes.
    """
    c = loaded.cfg
    path = os.fspath(path)
    trained_on = loaded.checkpoint.get("dataset", c.DATASET.DATASET)
    info = dataset_info(dataset)
    if trained_on != dataset:
        raise UserError(f"checkpoint {path} was trained on {trained_on}, not {dataset}: "
                        f"pass the matching DATASET or checkpoint")
    if c.MODEL.NUM_CLASSES != info.num_classes:
        raise UserError(f"checkpoint {path} has {c.MODEL.NUM_CLASSES} classes but {dataset} has "
                        f"{info.num_classes}: use a checkpoint for this data set")
    return ModelInfo(kind=f"the checkpoint is a {c.MODEL.NAME}", num_classes=c.MODEL.NUM_CLASSES,
                     default=DEQSolve(c.CERTIFY.SOLVER, c.CERTIFY.THRES, c.CERTIFY.TOL), image_size=c.MODEL.IMAGE_SIZE[0],
                     header={"checkpoint": path, "checkpoint_sha256": loaded.sha256,
                             "cfg_sha256": file_sha256(cfg) if cfg else None})


def object_runtime(model: torch.nn.Module, compile: str, precision: str, device: torch.device,
                   pad_rows=None) -> Runtime:
    """The runtime of a model object: as ``DEQ.acceleration.resolve_runtime``, except that a DEQ without
    ``set_runtime`` (which a compiled or bf16 runtime goes through) runs eager in fp32.

    Raises:
        UserError: ``compile='on'`` or ``precision='bf16'`` for a DEQ without ``set_runtime``.
    """
    if is_deq(model) and not hasattr(model, "set_runtime"):
        asked = [f for f, on in (("compile='on'", compile == "on"), ("precision='bf16'", precision == "bf16")) if on]
        if asked:
            raise UserError(f"{asked[0]} evaluates a DEQ through its set_runtime(runtime) method, which the model "
                            f"object {type(model).__name__} does not have: certify it with compile='off' and "
                            f"precision='fp32'")
        compile = "off"
    return resolve_runtime(compile, precision, device, pad_rows=pad_rows)


__all__ = ["ModelObject", "ModelSource", "ModelInfo", "model_object", "state_sha256", "object_info", "checkpoint_info",
           "object_runtime"]
