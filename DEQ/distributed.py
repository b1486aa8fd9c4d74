"""Training on many processes (GPUs, nodes) with DistributedDataParallel, launched by torchrun.

Without torchrun the world is one process and nothing here has any effect.  ``DEQ/`` never imports ``SRS/``
(``SRS.distributed`` is the certification counterpart).  Overview: docs/internals.md; launch lines: docs/training.md."""
from __future__ import annotations

import datetime
import hashlib
import os
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from .errors import UserError

T = TypeVar("T")

DEFAULT_TIMEOUT_MINUTES = 30.0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} is not a whole number: launch with torchrun (or unset {name})") from None


class World:
    """This process's place in a torchrun job: ``rank`` (RANK), ``size`` (WORLD_SIZE), ``local_rank``
    (LOCAL_RANK, picks the GPU), ``local_size`` (LOCAL_WORLD_SIZE); rank 0 of 1 without torchrun."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1):
        if size < 1 or not 0 <= rank < size or not 0 <= local_rank < max(local_size, 1):
            raise UserError(f"RANK {rank} / WORLD_SIZE {size} / LOCAL_RANK {local_rank} / LOCAL_WORLD_SIZE "
                            f"{local_size} do not fit together: launch with torchrun")
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size
        self.device: Optional[torch.device] = None  # set by start(): where collective tensors live

    @classmethod
    def from_env(cls) -> "World":
        """The world torchrun's environment describes (one process without it); UserError if the
        variables are not whole numbers or contradict each other."""
        size = _env_int("WORLD_SIZE", 1)
        return cls(_env_int("RANK", 0), size, _env_int("LOCAL_RANK", 0), _env_int("LOCAL_WORLD_SIZE", 1))

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, local_size={self.local_size})"

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def pick_device(self, device: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK for an index-less ``cuda``, ``device`` otherwise.

        Raises UserError: ``cuda:N`` with several processes on this node, or more local processes than visible GPUs."""
        if not self.distributed or device.type != "cuda":
            return device
        if device.index is not None:
            if self.local_size > 1:
                raise UserError(f"--device {device} under torchrun puts all {self.local_size} processes of this node "
                                f"on one GPU: pass --device cuda (or auto); rank r uses cuda:LOCAL_RANK")
            return device
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise UserError(f"torchrun started {self.local_size} processes on this node but {count} GPU(s) are "
                            f"visible: use --nproc_per_node {count} or fewer")
        return torch.device("cuda", self.local_rank)

    def start(self, device: torch.device, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> None:
        """Join the process group (NCCL on CUDA, gloo on the CPU); no-op for one process.  A collective
        waits ``timeout_minutes`` for the other ranks, then this rank stops with an error (no rank hangs for ever)."""
        self.device = device
        if not self.distributed or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))

    def stop(self) -> None:
        """Leave the process group (no-op for one process)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def on_rank0(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and return its (picklable) result on every rank; a UserError there is
        raised on every rank.  Also a barrier."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UserError as exc:
                if not self.distributed:
                    raise
                error = str(exc)
        if self.distributed:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if error is not None:
            raise UserError(error)
        return result

    def sum(self, values: Sequence[float]) -> List[float]:
        """Element-wise float64 sum of ``values`` over ranks (nan stays nan); ``values`` itself for one process."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def sync_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
        if self.distributed:
            for buf in module.buffers():
                dist.broadcast(buf.data, src=0)


def check_ranks_agree(world: World, mine: Dict[str, object],
                      describe: Callable[[int, str, object, object], str]) -> None:
    """Refuse, with the same one line on every rank, a rank whose ``mine`` values differ (``!=``) from
    rank 0's (a rank started with another command would compute something else).

    Raises UserError ``describe(rank, name, rank 0's value, its value)`` (None where a side lacks the name) for the
    first differing rank, and within it the first name (rank 0's order, then names only that rank has)."""
    ranks = world.gather(mine)
    ref = ranks[0]
    for rank, other in enumerate(ranks):
        for key in list(ref) + [k for k in other if k not in ref]:
            if other.get(key) != ref.get(key):
                raise UserError(describe(rank, key, ref.get(key), other.get(key)))


# ---------------------------------------------------------------------- seeds and generator states
def derived_seed(*parts) -> int:
    """A 63-bit seed from any parts (e.g. ``(SEED, "rank", r)``): distinct parts give independent streams."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rank_rng_state(device: Optional[torch.device]) -> dict:
    """This rank's generator states ``{"torch": ..., ["cuda": ...]}`` (CPU, and its own GPU on CUDA)."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rank_rng_state(state: dict, device: Optional[torch.device]) -> None:
    """Restore what :func:`rank_rng_state` returned."""
    torch.set_rng_state(state["torch"].cpu())  # a checkpoint loaded onto a GPU holds them there
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


# ---------------------------------------------------------------------- samplers
def _split(batch: List[int], rank: int, size: int) -> List[int]:
    """Rank ``rank``'s contiguous slice of ``batch`` (sizes differ by at most one, larger first)."""
    q, r = divmod(len(batch), size)
    start = rank * q + min(rank, r)
    return batch[start:start + q + (1 if rank < r else 0)]


class ShardedBatchSampler(Sampler):
    """Rank ``rank``'s slices of the global training batches (a batch sampler: yields index lists).

    Epoch e's global order is the one-process :func:`DEQ.data.make_loader` order with its generator seeded by
    ``seed + e`` (computed by the same DataLoader code), cut into global batches of ``size * per_rank``.  The union of
    the ranks' k-th batches is the one-process k-th batch.  A last global batch with fewer indices than ranks is
    skipped; a short one is split as evenly as possible, :meth:`loss_weight` keeping the gradient the global mean."""

    def __init__(self, n: int, per_rank: int, rank: int, size: int, shuffle: bool = True, seed: int = 0):
        super().__init__()
        self.n, self.per_rank, self.rank, self.size = n, per_rank, rank, size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.global_batch = per_rank * size
        full, rest = divmod(n, self.global_batch)
        self.global_sizes = [self.global_batch] * full + ([rest] if rest >= size else [])

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s order (seeded by ``seed + epoch``)."""
        self.epoch = epoch

    def global_batches(self) -> List[List[int]]:
        """Every global batch of the current epoch (index lists), skipped short last batch included."""
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = DataLoader(range(self.n), batch_size=self.global_batch, shuffle=self.shuffle, generator=gen)
        return [b.tolist() for b in order]

    def __iter__(self):
        for batch in self.global_batches()[:len(self.global_sizes)]:
            yield _split(batch, self.rank, self.size)

    def __len__(self) -> int:
        return len(self.global_sizes)

    def loss_weight(self, step: int) -> float:
        """Factor on this rank's loss at batch ``step`` of an epoch so that DDP's mean over
        ranks is the mean over the global batch (1.0 unless the batch is split unevenly)."""
        m = self.global_sizes[step]
        if m % self.size == 0:
            return 1.0
        mine = m // self.size + (1 if self.rank < m % self.size else 0)
        return mine * self.size / m


class RoundRobinBatches(Sampler):
    """Evaluation batches of a one-process run (sequential, ``batch_size`` each), batch b to rank b mod size."""

    def __init__(self, n: int, batch_size: int, rank: int, size: int):
        super().__init__()
        self.n, self.batch_size, self.rank, self.size = n, batch_size, rank, size
        self.sizes = [min(batch_size, n - s) for s in range(0, n, batch_size)]  # every batch, in order
        self.mine = list(range(rank, len(self.sizes), size))  # the global numbers of this rank's batches

    def __iter__(self):
        for b in self.mine:
            yield list(range(b * self.batch_size, b * self.batch_size + self.sizes[b]))

    def __len__(self) -> int:
        return len(self.mine)


__all__ = ["World", "derived_seed", "rank_rng_state", "set_rank_rng_state", "ShardedBatchSampler",
           "RoundRobinBatches", "DEFAULT_TIMEOUT_MINUTES"]
