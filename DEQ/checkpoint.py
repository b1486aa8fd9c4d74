"""Checkpoints: atomic save, validated load, and loading of the MDEQ code's and Cohen et al.'s state_dicts.

A checkpoint is a ``torch.save``d dict (state_dict, full yacs config, optimiser/scheduler/scaler/RNG states,
...) loaded with ``weights_only=True`` (no pickled code); MDEQ/SRS reference state_dicts load given their yaml,
Cohen et al.'s ``checkpoint.pth.tar`` by its ``arch`` entry (:data:`COHEN_ARCHS`).  :func:`load_model` reads the
file once, so its SHA-256 is of the bytes the model was built from.  Layout: docs/internals.md, "Checkpoints".
"""
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
    """Write atomically (:func:`DEQ.files.atomic_write`): a crash mid-write leaves the previous file intact
    (and at worst a ``.tmp-*.pth`` file, removed by :func:`remove_stale_temporaries` at the next start).
    The file gets the mode of an ordinary new file (0666 minus the umask), not mkstemp's 0600."""
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
    """Read a checkpoint file once: its SHA-256 and its contents come from the same bytes.

    Args:
        path: a file written by ``torch.save`` (any of the formats in the module docstring).
        map_location: where tensors go (``torch.load``'s ``map_location``).
        what: how error messages name the file (e.g. ``"MODEL.PRETRAINED checkpoint"``).

    Returns:
        (dict, str): the loaded dict (``weights_only=True``: no pickled code runs) and the
        hex SHA-256 of the file.

    Raises:
        UserError: missing file, a folder, unreadable / not a torch file, not a dict.
    """
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
    """Read a checkpoint file with a one-line error for missing or unreadable files.

    Args:
        path: the checkpoint file.
        map_location: where tensors go.

    Returns:
        dict: the checkpoint's contents.

    Raises:
        UserError: as :func:`read_checkpoint`.
    """
    return read_checkpoint(path, map_location)[0]


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """Drop ``prefix`` from every key when all keys carry it (a ``DataParallel`` state_dict).

    Args:
        state_dict: parameter name -> tensor.
        prefix: the prefix to drop.

    Returns:
        dict: the same dict, or a new one without the prefix.
    """
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Strict load; a mismatch names a few offending keys in one line.

    BatchNorm ``num_batches_tracked`` counters absent from old (pre-0.4.1) state_dicts are
    not counted as missing: they only feed BatchNorm's ``momentum=None`` mode, which no
    model here uses.

    Args:
        model: the model to fill.
        state_dict: parameter name -> tensor (a ``module.`` prefix on every key is dropped).
        source: how error messages name the state_dict.

    Raises:
        UserError: missing / unexpected keys or other shapes.
    """
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
    """Hex SHA-256 of a file (e.g. a yaml).  For a checkpoint, :func:`load_model` returns it already.

    Args:
        path: the file.
        chunk: bytes read at a time.

    Returns:
        str: 64 hex digits.
    """
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
    """Whether ``ckpt`` is in locuslab/smoothing's format (an ``arch`` and a ``state_dict`` entry).

    Args:
        ckpt: a loaded checkpoint.

    Returns:
        bool
    """
    return "arch" in ckpt and isinstance(ckpt.get("state_dict"), dict)


def cohen_config(arch, source: str):
    """The validated config of one of Cohen et al.'s architectures.

    Args:
        arch: the checkpoint's ``arch`` entry.
        source: how error messages name the checkpoint.

    Returns:
        CfgNode: MODEL.NAME / DEPTH / NUM_CLASSES / IMAGE_SIZE and DATASET.DATASET of ``arch``.

    Raises:
        UserError: ``arch`` is not one of :data:`COHEN_ARCHS`.
    """
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
    """Cohen et al.'s ``Sequential(normalize_layer, model)`` keys -> ours: drop a DataParallel
    ``module.`` after the ``1.`` (ImageNet: ``1.module.conv1.weight`` -> ``1.conv1.weight``) or
    in front of everything.

    Args:
        state_dict: the checkpoint's ``state_dict``.

    Returns:
        dict: the renamed state_dict (same tensors).
    """
    state_dict = strip_prefix(state_dict)
    return {("1." + k[len("1.module."):] if k.startswith("1.module.") else k): v for k, v in state_dict.items()}


def state_dict_of(ckpt: dict, source: str) -> dict:
    """The model weights in any supported checkpoint format, with our parameter names.

    Args:
        ckpt: a loaded checkpoint (this code's, a bare state_dict, the MDEQ/SRS code's, Cohen et al.'s).
        source: how error messages name it.

    Returns:
        dict: parameter name -> tensor.

    Raises:
        UserError: no state_dict in it.
    """
    if is_cohen_checkpoint(ckpt):
        return cohen_state_dict(ckpt["state_dict"])
    state = ckpt.get("state_dict", ckpt if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()) else None)
    if not isinstance(state, dict):
        raise UserError(f"{source} has no state_dict entry")
    return state


@dataclass
class LoadedModel:
    """What :func:`load_model` returns.

    Unpacks as ``model, cfg, checkpoint = load_model(...)`` (the earlier tuple API);
    ``sha256`` is read by attribute.

    Attributes:
        model: the model, on the requested device, in eval mode.
        cfg: its validated, frozen config.
        checkpoint: the checkpoint dict as read (tensors on the CPU).
        sha256: hex SHA-256 of the checkpoint file, from the bytes the model was loaded from.
    """

    model: torch.nn.Module
    cfg: object
    checkpoint: dict
    sha256: str

    def __iter__(self) -> Iterator:
        return iter((self.model, self.cfg, self.checkpoint))


def load_model(path: str, device="cpu", cfg_path: Optional[str] = None) -> LoadedModel:
    """Build a model from a checkpoint and load its weights; the file is read once.

    The config comes from ``cfg_path`` if given, else from the config the checkpoint carries
    (merged onto the defaults and validated like a yaml file: ``DEQ.config.config_from_text``),
    else, for Cohen et al.'s ``checkpoint.pth.tar``, from its ``arch`` entry.

    Args:
        path: the checkpoint file.
        device: where the model goes (``torch.device`` or a string).
        cfg_path: a yaml to build the model from instead (required for a bare MDEQ/SRS reference
            state_dict; optional otherwise).

    Returns:
        LoadedModel: ``(model, cfg, checkpoint, sha256)``; tuple-unpacks to ``(model, cfg, checkpoint)``.

    Raises:
        UserError: one line for a missing/unreadable file, an unusable config, an unknown ``arch``
            or weights that do not fit the model.
    """
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
    """Load the weights of a checkpoint into ``model`` (MODEL.PRETRAINED): a checkpoint of this
    code, a bare or MDEQ/SRS state_dict, or Cohen et al.'s ``checkpoint.pth.tar``.

    Args:
        model: a freshly built model of the same architecture.
        path: the checkpoint file.

    Returns:
        str: the file's SHA-256 (for the training log).

    Raises:
        UserError: missing/unreadable file, or weights that do not fit ``model``.
    """
    ckpt, sha = read_checkpoint(path, what="MODEL.PRETRAINED checkpoint")
    source = f"MODEL.PRETRAINED checkpoint {path}"
    load_state_dict(model, state_dict_of(ckpt, source), source=source)
    return sha
