"""The model registry: each MODEL.NAME, its builder and what config validation needs to know of it.

The one list of model names (:func:`DEQ.models.build_model`, :func:`DEQ.config.check_model`); a new model is
``@register_model("my_deq", deq=True)`` on ``def build_my_deq(cfg)``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from ..errors import UserError


@dataclass(frozen=True)
class ModelSpec:
    """A MODEL.NAME's ``builder(cfg)`` (random weights, train mode), ``deq`` (validation refuses DEQ-only training
    keys for the others) and ``depth`` (the MODEL.DEPTH the name implies, 0: none, None: MODEL.DEPTH chooses it)."""
    builder: Callable
    deq: bool = False
    depth: Optional[int] = 0


MODELS: Dict[str, ModelSpec] = {}


def register_model(name: str, builder: Optional[Callable] = None, *, deq: bool = False,
                   depth: Optional[int] = 0):
    """Register ``builder`` under MODEL.NAME ``name`` (see :class:`ModelSpec`) and return it; without a builder,
    return a decorator.  Raises ValueError: ``name`` already registered with another builder or settings."""
    def add(fn: Callable) -> Callable:
        spec = ModelSpec(fn, deq, depth)
        if MODELS.get(name, spec) != spec:
            raise ValueError(f"model name {name!r} is already registered ({MODELS[name]})")
        MODELS[name] = spec
        return fn
    return add if builder is None else add(builder)


def model_spec(name: str) -> ModelSpec:
    """The registry's entry for ``name``; UserError (listing the registered names) if there is none."""
    spec = MODELS.get(name)
    if spec is None:
        raise UserError(f"MODEL.NAME={name!r} is not a model; choose one of {', '.join(MODELS)}")
    return spec


__all__ = ["MODELS", "ModelSpec", "model_spec", "register_model"]
