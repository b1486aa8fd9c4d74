"""Small runtime helpers shared by the CLIs."""
from __future__ import annotations

import random

import numpy as np
import torch

from .errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU.  Never hard-codes .cuda()."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu or auto")
    return dev


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`get_rng_state`'s states (a checkpoint loaded with ``map_location`` a GPU holds them
    there; generators take CPU byte tensors)."""
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def default_threads() -> int:
    """CPU threads for one process: ``OMP_NUM_THREADS`` when it is set (an explicit choice is kept),
    else the cores this process may use (``os.sched_getaffinity``) divided by the torchrun processes
    on this node (``LOCAL_WORLD_SIZE``); at least 1."""
    import os
    try:
        omp = int(os.environ.get("OMP_NUM_THREADS", ""))
        if omp >= 1:
            return omp
    except ValueError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, cores // local)


def set_threads(threads=None) -> int:
    """Set torch's intra-op CPU threads (``--threads``; None: :func:`default_threads`) and return the number.
    torch sizes its pool from the machine, not from what is free: on a busy shared machine ``--threads 1`` avoids
    oversubscription, and under torchrun each process gets its share."""
    from .checks import check_count
    check_count("--threads", threads, 1)
    n = default_threads() if threads is None else int(threads)
    torch.set_num_threads(n)
    return n


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError torch raises when an allocation fails (CPU too)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))


def apply_cudnn_flags(cfg) -> None:
    """Set torch's backend flags from ``cfg.CUDNN`` (training runs call this once), each both ways so a later run in the
    same process gets exactly its own config: ENABLED -> ``cudnn.enabled``; BENCHMARK -> ``cudnn.benchmark`` (off
    when DETERMINISTIC); DETERMINISTIC -> ``cudnn.deterministic``, ``use_deterministic_algorithms(True,
    warn_only=True)`` and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set (effective before the first CUDA matmul)."""
    import os
    c = cfg.CUDNN
    deterministic = bool(c.DETERMINISTIC)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.enabled = bool(c.ENABLED)
    torch.backends.cudnn.benchmark = bool(c.BENCHMARK) and not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
