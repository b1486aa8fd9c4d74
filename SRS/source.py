"""Where the certified model comes from: a checkpoint file, or a model object built by the caller.

Either way the runner sees a :class:`ModelInfo`: smoothing defaults, checks against the data set, and header
entries identifying the weights (file SHA-256, or :func:`state_sha256`) that --resume and the ranks compare.
Use: docs/certification.md, "Your own model from Python"."""
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

    ``model`` maps images (B, C, H, W) in [0, 1] to logits; ``--srs`` and DEQ smoothing need a
    :class:`DEQ.interface.DEQClassifier`.  The runner moves it to the device in eval mode; its weights are identified
    by :func:`state_sha256` (keep whatever changes a prediction in parameters or buffers).  A compiled or bf16 runtime
    needs ``set_runtime``, else ``compile='auto'`` is off and ``'on'`` / bf16 are refused.  A None field
    (``name``, ``num_classes``, ``solve``, ``dataset``, ``image_size``) is read from the model's attribute of that
    meaning (``num_classes``, ``f_solver``/``f_thres``/``f_tol``, ``dataset``, ``image_size``) or defaults:
    ``type(model).__name__``, the data set's classes, :class:`SRS.settings.DEQSolve`, unchecked, 8 pixels."""
    model: torch.nn.Module
    name: Optional[str] = None
    num_classes: Optional[int] = None
    solve: Optional[DEQSolve] = None
    dataset: Optional[str] = None
    image_size: Optional[int] = None


ModelSource = Union[str, os.PathLike, torch.nn.Module, ModelObject]


@dataclass(frozen=True)
class ModelInfo:
    """What the runner takes from the model's source: ``kind`` (for messages), ``num_classes``, ``default``
    solve settings, ``image_size`` (None: the digits' own) and ``header`` (``checkpoint`` path, ``checkpoint_sha256``,
    ``cfg_sha256``; or ``model`` and ``model_sha256``)."""
    kind: str
    num_classes: int
    default: DEQSolve
    image_size: Optional[int]
    header: Dict[str, object]


def model_object(source: ModelSource) -> Optional[ModelObject]:
    """``source`` as a :class:`ModelObject`, None for a path; UserError for anything else."""
    if isinstance(source, (str, os.PathLike)):
        return None
    if isinstance(source, torch.nn.Module):
        return ModelObject(source)
    if isinstance(source, ModelObject) and isinstance(source.model, torch.nn.Module):
        return source
    raise UserError(f"the model to certify must be a checkpoint path, a torch.nn.Module or an SRS.source.ModelObject "
                    f"around one, got a {type(source).__name__}")


def state_sha256(model: torch.nn.Module) -> str:
    """Hex SHA-256 of ``model.state_dict()``: per entry in key order, name, dtype, shape and CPU bytes.
    Equal for equal weights on any device; any change of value, dtype, shape or name changes it.  UserError for an
    entry that is not a plain strided tensor."""
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
    """The :class:`ModelInfo` of a model object certified on ``dataset``.  Raises UserError: a ``cfg``, a
    malformed field, or another number of classes or training data set than ``dataset``'s."""
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


def certified_model(cfg) -> DEQSolve:
    """The certified model a checkpoint config names: its CERTIFY section (solver, budget, tolerance); a config
    written before the section existed has its defaults (``DEQ.config``)."""
    return DEQSolve(cfg.CERTIFY.SOLVER, cfg.CERTIFY.THRES, cfg.CERTIFY.TOL)


def checkpoint_info(path: Union[str, os.PathLike], loaded: LoadedModel, dataset: str,
                    cfg: Optional[str] = None) -> ModelInfo:
    """The :class:`ModelInfo` of a checkpoint ``loaded`` by ``load_model`` (``cfg``: its yaml, hashed if
    given).  Raises UserError: trained on another data set or with another number of classes."""
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
                     default=certified_model(c), image_size=c.MODEL.IMAGE_SIZE[0],
                     header={"checkpoint": path, "checkpoint_sha256": loaded.sha256,
                             "cfg_sha256": file_sha256(cfg) if cfg else None})


def object_runtime(model: torch.nn.Module, compile: str, precision: str, device: torch.device,
                   pad_rows=None) -> Runtime:
    """A model object's runtime: as ``DEQ.acceleration.resolve_runtime``, but a DEQ without
    ``set_runtime`` runs eager fp32, and UserError for its ``compile='on'`` or ``precision='bf16'``."""
    if is_deq(model) and not hasattr(model, "set_runtime"):
        asked = [f for f, on in (("compile='on'", compile == "on"), ("precision='bf16'", precision == "bf16")) if on]
        if asked:
            raise UserError(f"{asked[0]} evaluates a DEQ through its set_runtime(runtime) method, which the model "
                            f"object {type(model).__name__} does not have: certify it with compile='off' and "
                            f"precision='fp32'")
        compile = "off"
    return resolve_runtime(compile, precision, device, pad_rows=pad_rows)


__all__ = ["certified_model", "ModelObject", "ModelSource", "ModelInfo", "model_object", "state_sha256",
           "object_info", "checkpoint_info", "object_runtime"]
