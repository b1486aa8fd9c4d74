"""Certification on many processes with torch.distributed, launched by torchrun.

The runner deals images round robin (:func:`deal`, a function of the file and settings alone), checks that
every rank runs the same settings (:func:`check_same`), runs OUTFILE steps on rank 0 (``World.on_rank0``) and
waits before the merge (:func:`wait_all`).  Guarantee: noise is seeded per (seed, idx), so the merged file has
the rows a one-process run writes (time aside); ``--resume`` merges surviving shards first.  Details:
docs/internals.md, "Distributed certification".
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
