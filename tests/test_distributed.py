"""Certification under torchrun: the deal of images to ranks, the merge of shard files, resume across
world sizes and after a killed rank, and the one-line error when ranks disagree on settings.

The end-to-end tests launch ``torchrun --nproc_per_node 2`` with the gloo backend on the CPU and
compare the merged OUTFILE with a one-process run of the same seed (time column aside)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from DEQ.errors import UserError
from SRS.distributed import deal
from SRS.results import consolidate, read_rows, shard_files, shard_path

CERTIFY = os.path.join(ROOT, "SRS", "code", "certify.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")
META = {"command": "x", "mode": "certify", "sigma": 0.25, "max": 5, "threads": 1}


def _argv(ckpt, out, *extra):
    return ["digits", ckpt, "0.25", str(out), "--N0", "10", "--N", "60", "--batch", "30", "--skip", "45",
            "--f_thresh", "4", "--threads", "1", "--quiet", *extra]


def _rows(path):
    """Rows without the time column, in file order."""
    return [{k: v for k, v in r.items() if k != "time"} for r in read_rows(path)[2]]


def _torchrun(argv, nproc=2, **kw):
    return subprocess.run(TORCHRUN + ["--nproc_per_node", str(nproc), "--master_port", str(_free_port()), CERTIFY,
                                      *argv], env=ENV, capture_output=True, text=True, timeout=600, **kw)


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ the deal and the merge
def test_deal_is_a_balanced_partition():
    todo = list(range(0, 450, 7))
    for size in (1, 2, 3, 8):
        parts = [deal(todo, r, size) for r in range(size)]
        assert sorted(i for p in parts for i in p) == todo
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert parts == [deal(todo, r, size) for r in range(size)]  # deterministic


def _write(path, rows, meta=META, torn=""):
    with open(path, "w") as fh:
        for k, v in meta.items():
            fh.write(f"# {k}: {v}\n")
        fh.write("\t".join(COLUMNS) + "\n")
        for r in rows:
            fh.write("\t".join(map(str, r)) + "\n")
        fh.write(torn)


def test_consolidate_merges_in_image_order_once_each_and_removes_shards(tmp_path):
    out = str(tmp_path / "o.tsv")
    _write(out, [(0, 1, 1, 0.5, 1, 1.0)])
    _write(shard_path(out, 1, 2), [(9, 3, 3, 0.1, 1, 1.0), (3, 2, 2, 0.2, 1, 1.0)], torn="12\t1\t")
    _write(shard_path(out, 0, 2), [(6, 0, 0, 0.3, 1, 1.0), (0, 1, 1, 0.5, 1, 1.0)])  # idx 0 again: kept once
    _write(shard_path(out, 0, 3), [])  # a rank that stopped before its first row
    consolidate(out, COLUMNS, META, resume=True, overwrite=False)
    assert [r["idx"] for r in read_rows(out)[2]] == ["0", "3", "6", "9"]
    assert shard_files(out) == []


def test_consolidate_refuses_other_settings_and_existing_results(tmp_path):
    out = str(tmp_path / "o.tsv")
    _write(shard_path(out, 0, 2), [(0, 1, 1, 0.5, 1, 1.0)], meta={**META, "sigma": 0.5})
    with pytest.raises(UserError, match="sigma=0.5 but this run has sigma=0.25"):
        consolidate(out, COLUMNS, META, resume=True, overwrite=False)
    assert shard_files(out) and not os.path.exists(out)  # nothing changed
    with pytest.raises(UserError, match="shard file.*--resume"):
        consolidate(out, COLUMNS, META, resume=False, overwrite=False)
    consolidate(out, COLUMNS, META, resume=False, overwrite=True)
    assert shard_files(out) == [] and not os.path.exists(out)


# ------------------------------------------------------------------ end to end with torchrun (gloo)
@pytest.fixture(scope="module")
def single_run(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "one.tsv"
    proc = subprocess.run([sys.executable, CERTIFY, *_argv(tiny_checkpoint, out)], env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return out


def test_two_ranks_write_the_rows_of_one_process(tiny_checkpoint, single_run, tmp_path):
    out = tmp_path / "two.tsv"
    proc = _torchrun(_argv(tiny_checkpoint, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _rows(out) == _rows(single_run) and len(_rows(out)) == 10
    assert shard_files(str(out)) == []
    assert proc.stdout.count("certified 10 images") == 1  # rank 0 reports, once
    # resume with another world size: nothing to do, nothing changed
    before = _rows(out)
    assert subprocess.run([sys.executable, CERTIFY, *_argv(tiny_checkpoint, out, "--resume")], env=ENV,
                          capture_output=True, text=True, timeout=600).returncode == 0
    assert _rows(out) == before


def _children(pid):
    """Process ids whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    if int(fh.read().rsplit(")", 1)[1].split()[1]) == pid:
                        kids.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return kids


@pytest.mark.slow
@pytest.mark.parametrize("resume_nproc", [1, 2, 3])
def test_kill_one_rank_then_resume_loses_and_duplicates_nothing(tiny_checkpoint, single_run, tmp_path, resume_nproc):
    """kill -9 one rank once it has written a row; torchrun stops the other; --resume with 1, 2 or 3
    processes merges the shards and finishes: the rows of the one-process run, each once."""
    out = tmp_path / "k.tsv"
    argv = _argv(tiny_checkpoint, out)
    proc = subprocess.Popen(TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(_free_port()), CERTIFY, *argv],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shard = shard_path(str(out), 1, 2)
    deadline = time.time() + 300
    while time.time() < deadline and not (os.path.exists(shard) and len(read_rows(shard)[2]) >= 1):
        time.sleep(0.2)
    agents = _children(proc.pid)
    workers = [k for a in [proc.pid] + agents for k in _children(a)]
    victim = max(workers)  # one of the two rank processes
    os.kill(victim, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert proc.returncode != 0
    partial = {r["idx"] for f in shard_files(str(out)) for r in read_rows(f)[2]}
    assert 1 <= len(partial) < 10
    if resume_nproc == 1:
        res = subprocess.run([sys.executable, CERTIFY, *argv, "--resume"], env=ENV, capture_output=True, text=True,
                             timeout=600)
    else:
        res = _torchrun(argv + ["--resume"], nproc=resume_nproc)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = _rows(out)
    assert rows == _rows(single_run)  # none lost, none duplicated, image order
    assert shard_files(str(out)) == []


RANKS_DISAGREE = """
import os, sys
from DEQ.errors import UserError, cli_main
from SRS.distributed import World, check_same

@cli_main
def main():
    world = World.from_env()
    import torch
    world.start(torch.device("cpu"), 1.0)
    try:
        check_same(world, {"sigma": "0.25" if world.rank == 0 else "0.5", "N": "100"})
    finally:
        world.stop()

main()
"""


def test_ranks_with_other_settings_stop_with_one_line(tmp_path):
    script = tmp_path / "disagree.py"
    script.write_text(RANKS_DISAGREE)
    proc = subprocess.run(TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(_free_port()), str(script)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines and all("ranks disagree on settings: rank 0 has sigma=0.25 but rank 1 has sigma=0.5" in line
                         for line in lines)
