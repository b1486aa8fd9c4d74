"""Checkpoints: atomic save, validated load, and loading of the MDEQ code's state_dicts.

A checkpoint is a dict (``torch.save``) holding everything needed to certify or
resume: ``state_dict``, ``config`` (the full yacs yaml), ``dataset``,
``num_classes``, ``noise``, ``epoch``, ``train_step``, ``optimizer``,
``scheduler``, ``scaler``, ``rng`` (torch CPU/CUDA generator states), ``best_acc``
and ``format``.  It loads with ``torch.load(weights_only=True)``: no pickled code.

A bare ``state_dict`` saved by the MDEQ / SRS reference code (``final_state.pth``
or ``checkpoint.pth.tar`` with a ``state_dict`` entry) also loads, given its yaml
config; parameter names are identical, so no mapping beyond dropping a
``module.`` (DataParallel) prefix is applied.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Optional, Tuple

import torch

from .checks import check_input_file
from .errors import UserError

FORMAT = "deq-certify/1"


TMP_PREFIX, TMP_SUFFIX = ".tmp-", ".pth"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_checkpoint(state: dict, path: str) -> None:
    """Write atomically: a crash mid-write leaves the previous file intact (and at worst a
    ``.tmp-*.pth`` file, removed by :func:`remove_stale_temporaries` at the next start).
    The file gets the mode of an ordinary new file (0666 minus the umask), not mkstemp's 0600."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=TMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({**state, "format": FORMAT}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint file with a one-line error for missing or unreadable files."""
    check_input_file(path, "checkpoint", "train one with DEQ/tools/cls_train.py or check the path", inside="last.pth")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UserError(f"checkpoint {path} is unreadable ({type(exc).__name__}): it is corrupt, truncated or not a torch file; "
                        f"use the last good checkpoint or retrain") from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict with a state_dict")
    return obj


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def load_state_dict(model: torch.nn.Module, state_dict: dict, source: str = "checkpoint") -> None:
    """Strict load; a mismatch names a few offending keys in one line."""
    state_dict = strip_prefix(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
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
    model.load_state_dict(state_dict, strict=True)
    from torchdeq.norm import reset_norm
    reset_norm(model)  # weight-normalised weights are derived from the loaded g and v


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_model(path: str, device="cpu", cfg_path: Optional[str] = None) -> Tuple[torch.nn.Module, object, dict]:
    """Build the model from the checkpoint's own config (or ``cfg_path`` for a bare
    reference state_dict), load the weights and return (model in eval mode, cfg, checkpoint)."""
    from .config import load_config
    from .models import build_model
    import yaml
    from yacs.config import CfgNode as CN

    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt if all(isinstance(v, torch.Tensor) for v in ckpt.values()) else None)
    if state is None:
        raise UserError(f"checkpoint {path} has no state_dict entry")
    if cfg_path:
        cfg = load_config(cfg_path)
    elif isinstance(ckpt.get("config"), str):
        cfg = load_config(None)
        cfg.defrost()
        try:
            cfg.merge_from_other_cfg(CN(yaml.safe_load(ckpt["config"])))
        except Exception as exc:
            raise UserError(f"checkpoint {path} carries a config this version cannot read ({exc}); pass --cfg") from None
        cfg.freeze()
    else:
        raise UserError(f"checkpoint {path} carries no config (a bare MDEQ/SRS reference state_dict?): pass its yaml with --cfg")
    model = build_model(cfg)
    load_state_dict(model, state, source=f"checkpoint {path}")
    return model.to(device).eval(), cfg, ckpt
