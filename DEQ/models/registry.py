"""The model registry: each MODEL.NAME, its builder and what config validation needs to know of it.

The one list of model names: :func:`DEQ.models.build_model` builds from it and
:func:`DEQ.config.check_model` validates MODEL.NAME against it.  A new model is one call (or decorator)::

    @register_model("my_deq", deq=True)
    def build_my_deq(cfg): ...
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from ..errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of one MODEL.NAME.

    Attributes:
        builder: ``builder(cfg) -> torch.nn.Module`` (random weights, train mode).
        deq: whether the model is a DEQ (fixed point, Jacobian term, dropout of f); config validation
            refuses the DEQ-only training keys for the others.
        depth: the MODEL.DEPTH the name implies (0: the model has no depth), or None: MODEL.DEPTH
            chooses it (6n+2, the CIFAR ResNets).
    """
    builder: Callable
    deq: bool = False
    depth: Optional[int] = 0


MODELS: Dict[str, ModelSpec] = {}


def register_model(name: str, builder: Optional[Callable] = None, *, deq: bool = False,
                   depth: Optional[int] = 0):
    """Register ``builder`` under MODEL.NAME ``name``; ``register_model(name, ...)`` without a builder is a
    decorator (it returns the builder unchanged).

    Args:
        name: the MODEL.NAME that picks the model.
        builder: ``builder(cfg) -> torch.nn.Module``.
        deq, depth: see :class:`ModelSpec`.

    Returns:
        the builder (called with one), else the decorator.

    Raises:
        ValueError: ``name`` is already registered with another builder or settings.
    """
    def add(fn: Callable) -> Callable:
        spec = ModelSpec(fn, deq, depth)
        if MODELS.get(name, spec) != spec:
            raise ValueError(f"model name {name!r} is already registered ({MODELS[name]})")
        MODELS[name] = spec
        return fn
    return add if builder is None else add(builder)


def model_spec(name: str) -> ModelSpec:
    """The registry's entry for MODEL.NAME ``name``.

    Raises:
        UserError: ``name`` is not registered (the one line lists the registered names).
    """
    spec = MODELS.get(name)
    if spec is None:
        raise UserError(f"MODEL.NAME={name!r} is not a model; choose one of {', '.join(MODELS)}")
    return spec


__all__ = ["MODELS", "ModelSpec", "model_spec", "register_model"]
