"""Checkpoints: atomic save, validated load, and loading of the MDEQ code's and Cohen et al.'s state_dicts.

Everything loads with ``weights_only=True`` (no pickled code runs); :func:`load_model` reads the file once, so its
SHA-256 is of the bytes the model was built from.  Formats and layout: docs/internals.md, "Checkpoints"."""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

import torch

from .checks import check_input_file
from .errors import UserError
from .files import atomic_write

FORMAT = "deq-certify/1"


TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".pth"


def save_checkpoint(state: dict, path: str) -> None:
    """Write ``state`` atomically (:func:`DEQ.files.atomic_write`): a crash mid-write leaves the previous file
    intact (at worst a ``.tmp-*.pth``, see :func:`remove_stale_temporaries`); mode 0666 minus the umask."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_write(path, "wb", prefix=TMP_PREFIX, suffix=TMP_SUFFIX) as fh:
        torch.save({**state, "format": FORMAT}, fh)


def remove_stale_temporaries(folder: str) -> list:
    """Delete the ``.tmp-*.pth`` files a kill during :func:`save_checkpoint` left in ``folder``; return their names."""
    removed = []
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            full = os.path.join(folder, name)
            if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX) and os.path.isfile(full):
                os.remove(full)
                removed.append(name)
    return removed


def read_checkpoint(path: str, map_location="cpu", what: str = "checkpoint") -> Tuple[dict, str]:
    """Return ``(dict, hex SHA-256)`` of a checkpoint file, both from the same bytes (``weights_only=True``).

    ``what`` names the file in errors.  Raises UserError: missing file, a folder, unreadable / not torch, not a dict."""
    check_input_file(path, what, "train one with DEQ/tools/cls_train.py or check the path", inside="last.pth")
    with open(path, "rb") as fh:
        data = fh.read()
    sha = hashlib.sha256(data).hexdigest()
    try:
        obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"{what} {path} is unreadable ({type(exc).__name__}): it is corrupt, truncated, not a torch "
                        f"file or holds pickled code; use the last good checkpoint or retrain") from None
    finally:
        del data
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} holds a {type(obj).__name__}, not a dict with a state_dict")
    return obj, sha


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """The contents of a checkpoint file; raises UserError as :func:`read_checkpoint`."""
    return read_checkpoint(path, map_location)[0]


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """``state_dict`` without ``prefix`` when every key carries it (a ``DataParallel`` state_dict), else itself."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Strict load of ``state_dict`` into ``model`` (a ``module.`` prefix on every key is dropped).

    Absent BatchNorm ``num_batches_tracked`` counters (old state_dicts) keep the model's own: no model here uses
    ``momentum=None``.  Raises UserError naming a few missing / unexpected / other-shaped keys in one line."""
    state_dict = strip_prefix(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [k for k in own if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[0]}: {tuple(state_dict[shapes[0]].shape)} vs {tuple(own[shapes[0]].shape)})")
        raise UserError(f"{source} does not match the model built from its config: {', '.join(parts)}; "
                        f"use the config the checkpoint was trained with")
    state_dict = dict(state_dict)
    for k in own:
        if k not in state_dict:  # an absent num_batches_tracked: keep the model's own counter
            state_dict[k] = own[k]
    model.load_state_dict(state_dict, strict=True)
    from torchdeq.norm import reset_norm
    reset_norm(model)  # weight-normalised weights are derived from the loaded g and v


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file (for a checkpoint, :func:`load_model` returns it already)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# Cohen et al.'s ``arch`` -> (MODEL.NAME, MODEL.DEPTH, data set, MODEL.IMAGE_SIZE)
COHEN_ARCHS = {
    "cifar_resnet20": ("resnet_cifar", 20, "cifar10", 32),
    "cifar_resnet110": ("resnet110", 0, "cifar10", 32),
    "resnet50": ("resnet50", 0, "imagenet", 224),
}


def is_cohen_checkpoint(ckpt: dict) -> bool:
    """Whether ``ckpt`` is in locuslab/smoothing's format (an ``arch`` and a ``state_dict`` entry)."""
    return "arch" in ckpt and isinstance(ckpt.get("state_dict"), dict)


def cohen_config(arch, source: str):
    """The validated config of Cohen et al.'s ``arch``; UserError if it is not in :data:`COHEN_ARCHS`."""
    from .config import load_config
    from .data import dataset_info

    if arch not in COHEN_ARCHS:
        raise UserError(f"{source} has arch {arch!r}, not one of Cohen et al.'s {', '.join(COHEN_ARCHS)}: "
                        f"pass the yaml of its architecture with --cfg")
    name, depth, dataset, size = COHEN_ARCHS[arch]
    return load_config(None, ["MODEL.NAME", name, "MODEL.DEPTH", str(depth), "DATASET.DATASET", dataset,
                              "MODEL.NUM_CLASSES", str(dataset_info(dataset).num_classes),
                              "MODEL.IMAGE_SIZE", f"[{size}, {size}]"])


def cohen_state_dict(state_dict: dict) -> dict:
    """Cohen et al.'s ``Sequential(normalize_layer, model)`` keys -> ours (same tensors): drop a DataParallel
    ``module.`` after the ``1.`` (``1.module.conv1.weight`` -> ``1.conv1.weight``) or in front of everything."""
    state_dict = strip_prefix(state_dict)
    return {("1." + k[len("1.module."):] if k.startswith("1.module.") else k): v for k, v in state_dict.items()}


def state_dict_of(ckpt: dict, source: str) -> dict:
    """The weights of any supported checkpoint format, with our parameter names; UserError if it has none."""
    if is_cohen_checkpoint(ckpt):
        return cohen_state_dict(ckpt["state_dict"])
    state = ckpt.get("state_dict", ckpt if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()) else None)
    if not isinstance(state, dict):
        raise UserError(f"{source} has no state_dict entry")
    return state


@dataclass
class LoadedModel:
    """What :func:`load_model` returns: ``model`` (on the device, eval mode), ``cfg`` (validated, frozen),
    ``checkpoint`` (as read, CPU tensors), ``sha256`` (of the bytes loaded).  Unpacks as ``model, cfg, checkpoint``."""

    model: torch.nn.Module
    cfg: object
    checkpoint: dict
    sha256: str

    def __iter__(self) -> Iterator:
        return iter((self.model, self.cfg, self.checkpoint))


def load_model(path: str, device="cpu", cfg_path: Optional[str] = None) -> LoadedModel:
    """Build a model from a checkpoint and load its weights, reading the file once.

    The config is ``cfg_path`` if given (required for a bare MDEQ/SRS state_dict), else the one the checkpoint carries
    (validated like a yaml), else Cohen et al.'s ``arch``.  Returns :class:`LoadedModel`.  Raises UserError (one line):
    missing/unreadable file, unusable config, unknown ``arch``, weights that do not fit the model."""
    from .config import config_from_text, load_config
    from .models import build_model

    ckpt, sha = read_checkpoint(path)
    source = f"checkpoint {path}"
    state = state_dict_of(ckpt, source)
    if cfg_path:
        cfg = load_config(cfg_path)
    elif isinstance(ckpt.get("config"), str):
        cfg = config_from_text(ckpt["config"], f"the config stored in {source}",
                               unknown_fix="it was written by another version of this code; pass its yaml with --cfg")
    elif is_cohen_checkpoint(ckpt):
        cfg = cohen_config(ckpt["arch"], source)
    else:
        raise UserError(f"{source} carries no config (a bare MDEQ/SRS reference state_dict?): pass its yaml with --cfg")
    model = build_model(cfg)
    load_state_dict(model, state, source=source)
    return LoadedModel(model.to(device).eval(), cfg, ckpt, sha)


def load_pretrained(model: torch.nn.Module, path: str) -> str:
    """Load a checkpoint's weights (any supported format) into ``model`` (MODEL.PRETRAINED); return the file's
    SHA-256.  Raises UserError: missing/unreadable file, or weights that do not fit ``model``."""
    ckpt, sha = read_checkpoint(path, what="MODEL.PRETRAINED checkpoint")
    source = f"MODEL.PRETRAINED checkpoint {path}"
    load_state_dict(model, state_dict_of(ckpt, source), source=source)
    return sha
