"""Certification on many processes with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node G SRS/code/certify.py ...            # one node, G processes (GPUs)
    torchrun --nnodes M --nproc_per_node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT SRS/code/certify.py ...

:class:`World` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); without it the world
is one process and nothing here does anything.  The runner (``SRS.runner.run``) uses it to:

* deal the chosen images to ranks (:func:`deal`: round robin over the images still to do, so every
  rank gets the same share, and the deal is a function of the file and the settings alone);
* check that every rank runs the same settings (:meth:`World.check_same`);
* run the steps that touch OUTFILE on rank 0 only and share their outcome, a one-line error
  included (:meth:`World.on_rank0`);
* wait for all ranks before the final merge (:meth:`World.wait_all`; rank 0 keeps its progress
  bar moving meanwhile).

Each rank writes its rows to its own shard file (``SRS.results.shard_path``) as they come; rank 0
merges them into OUTFILE in image order (``SRS.results.consolidate``).  Noise is seeded per
(seed, idx), so the merged file has the rows a one-process run writes (time aside).  A rank that
dies takes the others down (torchrun's agent stops the group); the rows written so far stay in the
shards and ``--resume`` (with any number of ranks) merges them first and does the rest.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from DEQ.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise UserError("RANK / WORLD_SIZE / LOCAL_RANK are not whole numbers: launch with torchrun") from None

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK when ``device`` is a CUDA device without an index."""
        if self.distributed and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def start(self, device: torch.device, timeout_minutes: float) -> None:
        """Join the process group (NCCL on CUDA, gloo on the CPU); no-op for one process."""
        if not self.distributed or dist.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=timeout_minutes))

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ collective helpers
    def on_rank0(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and give its result to every rank; a UserError there is raised on every rank."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except UserError as exc:
                error = str(exc)
        if self.distributed:
            box = [(result, error)]
            dist.broadcast_object_list(box, src=0)
            result, error = box[0]
        if error is not None:
            raise UserError(error)
        return result

    def check_same(self, settings: Dict[str, str]) -> None:
        """Refuse (one line, every rank) when ranks were started with different settings."""
        if not self.distributed:
            return
        gathered: List[Optional[Dict[str, str]]] = [None] * self.size
        dist.all_gather_object(gathered, settings)
        for rank, other in enumerate(gathered):
            for key in sorted(set(settings) | set(other)):
                if other.get(key) != gathered[0].get(key):
                    raise UserError(f"ranks disagree on settings: rank 0 has {key}={gathered[0].get(key)} but rank {rank} "
                                    f"has {key}={other.get(key)}; start every rank with the same command")

    def wait_all(self, while_waiting: Callable[[], None] = lambda: None, poll: float = 1.0) -> None:
        """Barrier; ``while_waiting`` is called every ``poll`` seconds until every rank arrived."""
        if not self.distributed:
            return
        work = dist.barrier(async_op=True)
        while not work.is_completed():
            while_waiting()
            time.sleep(poll)
        work.wait()


def deal(todo: Sequence[int], rank: int, size: int) -> List[int]:
    """The images of rank ``rank``: every size-th of ``todo`` starting at ``rank`` (round robin)."""
    return list(todo[rank::size])


__all__ = ["World", "deal"]
