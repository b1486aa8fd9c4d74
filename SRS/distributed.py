"""Certification on many processes with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node G SRS/code/certify.py ...            # one node, G processes (GPUs)
    torchrun --nnodes M --nproc_per_node G --rdzv-backend c10d --rdzv-endpoint HOST:PORT SRS/code/certify.py ...

:class:`DEQ.distributed.World` (shared with DDP training) reads torchrun's environment (RANK,
WORLD_SIZE, LOCAL_RANK); without it the world is one process and nothing here does anything.  The
runner (``SRS.runner.run``) uses it to:

* deal the chosen images to ranks (:func:`deal`: round robin over the images still to do, so every
  rank gets the same share, and the deal is a function of the file and the settings alone);
* check that every rank runs the same settings (:func:`check_same`);
* run the steps that touch OUTFILE on rank 0 only and share their outcome, a one-line error
  included (:meth:`World.on_rank0`);
* wait for all ranks before the final merge (:func:`wait_all`; rank 0 keeps its progress bar
  moving meanwhile).

Each rank writes its rows to its own shard file (``SRS.results.shard_path``) as they come; rank 0
merges them into OUTFILE in image order (``SRS.results.consolidate``).  Noise is seeded per
(seed, idx), so the merged file has the rows a one-process run writes (time aside).  A rank that
dies takes the others down (torchrun's agent stops the group); the rows written so far stay in the
shards and ``--resume`` (with any number of ranks) merges them first and does the rest.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence

import torch.distributed as dist

from DEQ.distributed import World, check_ranks_agree


def check_same(world: World, settings: Dict[str, str]) -> None:
    """Refuse (one line, every rank) when ranks were started with different settings.

    Args:
        world: the job.
        settings: this rank's settings (the results header's resume-checked entries), compared by
            :func:`DEQ.distributed.check_ranks_agree` in the order of their names.
    """
    def describe(rank: int, key: str, ref, value) -> str:
        return (f"ranks disagree on settings: rank 0 has {key}={ref} but rank {rank} has {key}={value}; start every "
                f"rank with the same command")

    check_ranks_agree(world, dict(sorted(settings.items())), describe)


def wait_all(world: World, while_waiting: Callable[[], None] = lambda: None, poll: float = 1.0) -> None:
    """Barrier; ``while_waiting`` is called every ``poll`` seconds until every rank arrived (rank 0's
    progress bar keeps counting the others' rows meanwhile)."""
    if not world.distributed:
        return
    work = dist.barrier(async_op=True)
    while not work.is_completed():
        while_waiting()
        time.sleep(poll)
    work.wait()


def deal(todo: Sequence[int], rank: int, size: int) -> List[int]:
    """The images of rank ``rank``: every size-th of ``todo`` starting at ``rank`` (round robin)."""
    return list(todo[rank::size])


__all__ = ["World", "check_same", "wait_all", "deal"]
