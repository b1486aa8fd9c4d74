"""Training on many processes (GPUs, nodes) with DistributedDataParallel, launched by torchrun.

:class:`World` (torchrun's environment; one process and no effect without it), :class:`ShardedBatchSampler`
(rank r's slice of each global batch: the union of the ranks' k-th batches is a one-process run's k-th batch),
:class:`RoundRobinBatches` (evaluation batch b to rank b mod WORLD_SIZE), per-rank streams (:func:`derived_seed`,
:func:`rank_rng_state`) and :func:`check_ranks_agree`.  ``DEQ/`` never imports ``SRS/``
(``SRS.distributed`` is the certification counterpart).  Launch lines: docs/training.md.
"""
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
    """This process's place in a torchrun job (rank 0 of 1 without torchrun).

    Args:
        rank: global rank (RANK).
        size: number of processes (WORLD_SIZE).
        local_rank: rank on this node (LOCAL_RANK); picks the GPU.
        local_size: processes on this node (LOCAL_WORLD_SIZE).
    """

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1):
        if size < 1 or not 0 <= rank < size or not 0 <= local_rank < max(local_size, 1):
            raise UserError(f"RANK {rank} / WORLD_SIZE {size} / LOCAL_RANK {local_rank} / LOCAL_WORLD_SIZE "
                            f"{local_size} do not fit together: launch with torchrun")
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size
        self.device: Optional[torch.device] = None  # set by start(): where collective tensors live

    @classmethod
    def from_env(cls) -> "World":
        """The world torchrun describes in the environment (one process when it is absent).

        Returns:
            World

        Raises:
            UserError: the variables are not whole numbers or contradict each other.
        """
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
        """This rank's device: cuda:LOCAL_RANK for ``cuda`` without an index, ``device`` otherwise.

        Args:
            device: what ``--device`` asked for (after ``DEQ.utils.pick_device``).

        Returns:
            torch.device

        Raises:
            UserError: ``cuda:N`` with several processes on this node (they would share one GPU), or
                more local processes than visible GPUs.
        """
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
        """Join the process group (NCCL on CUDA, gloo on the CPU); no-op for one process.

        Args:
            device: this rank's device (:meth:`pick_device`).
            timeout_minutes: how long a collective waits for the other ranks before this rank stops
                with an error (a dead or stuck rank never makes the others hang for ever).
        """
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
        """Run ``fn`` on rank 0 only and give its result to every rank; a UserError there is raised on
        every rank (the others wait meanwhile: this is also a barrier).

        Args:
            fn: the work (file-system changes of the run folder, checkpoint writes).

        Returns:
            ``fn()``'s (picklable) result, on every rank.
        """
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
        """Element-wise sum over ranks (float64; nan stays nan).

        Args:
            values: this rank's numbers.

        Returns:
            list of float: the sums (``values`` itself for one process).
        """
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
    """Refuse, with the same one line on every rank, ranks whose values differ from rank 0's (a torchrun
    launch types the command on every node; a rank started otherwise would compute something else).

    Args:
        world: the job (one process: nothing to compare).
        mine: this rank's values by name (picklable; compared with ``!=``).
        describe: ``describe(rank, name, rank 0's value, that rank's value)`` -> the error line (the name
            and the fix); a name one side lacks has the value None there.

    Raises:
        UserError: ``describe(...)`` of the first rank (in rank order) and, within it, the first name (rank
            0's order, then names only that rank has) whose value is not rank 0's.
    """
    ranks = world.gather(mine)
    ref = ranks[0]
    for rank, other in enumerate(ranks):
        for key in list(ref) + [k for k in other if k not in ref]:
            if other.get(key) != ref.get(key):
                raise UserError(describe(rank, key, ref.get(key), other.get(key)))


# ---------------------------------------------------------------------- seeds and generator states
def derived_seed(*parts) -> int:
    """A 63-bit seed from any parts (numbers, strings): distinct parts give independent streams.

    Args:
        *parts: e.g. ``(SEED, "rank", r)``.

    Returns:
        int: a seed for ``torch.manual_seed`` / ``Generator.manual_seed``.
    """
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rank_rng_state(device: Optional[torch.device]) -> dict:
    """This rank's generator states: torch's CPU generator and, on CUDA, the generator of its own GPU.

    Args:
        device: the rank's device.

    Returns:
        dict: ``{"torch": ByteTensor[, "cuda": ByteTensor]}`` (checkpoint-safe).
    """
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rank_rng_state(state: dict, device: Optional[torch.device]) -> None:
    """Restore what :func:`rank_rng_state` returned.

    Args:
        state: the saved states.
        device: the rank's device.
    """
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

    The global order of an epoch is the order a one-process :func:`DEQ.data.make_loader` draws when its
    generator is seeded with ``seed + epoch`` (the same DataLoader machinery computes it, so it stays
    equal in every torch version), cut into global batches of ``size * per_rank`` indices.  A last
    global batch with fewer indices than ranks is skipped (every rank needs at least one row);
    otherwise a short last batch is split as evenly as possible (:meth:`loss_weight` makes the
    all-reduced gradient the mean over the global batch).

    Args:
        n: items in the data set.
        per_rank: TRAIN.BATCH_SIZE_PER_GPU.
        rank, size: this rank and the number of ranks.
        shuffle: TRAIN.SHUFFLE (False: the data set's order).
        seed: base seed; epoch e uses ``seed + e`` (:meth:`set_epoch`).
    """

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
        """Factor on rank ``rank``'s loss at batch ``step`` of an epoch so that DDP's mean over ranks is the
        mean over the global batch: 1.0 unless the batch is split unevenly.

        Args:
            step: batch number within the epoch.

        Returns:
            float
        """
        m = self.global_sizes[step]
        if m % self.size == 0:
            return 1.0
        mine = m // self.size + (1 if self.rank < m % self.size else 0)
        return mine * self.size / m


class RoundRobinBatches(Sampler):
    """Evaluation batches of a one-process run (sequential, ``batch_size`` each), batch b to rank b mod size.

    Args:
        n: items in the data set.
        batch_size: TEST.BATCH_SIZE_PER_GPU.
        rank, size: this rank and the number of ranks.
    """

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
