"""Training under torchrun (DistributedDataParallel, gloo on the CPU).

What is compared, and why not everything bit for bit: a 2-rank run and a one-process run with the same
global batch see the same batches in the same order (the sampler reproduces the one-process order), but
they cannot agree bit for bit in general: BatchNorm normalises by each rank's own rows, each rank draws
the noise / dropout masks / Hutchinson vectors of its own rows from its own stream, the adjoint Broyden
solve's best-iterate choice with ``rel`` residuals depends on the scale of dL/dz (1/64 vs 1/32 per row),
and in float32 this tiny model amplifies reduction-order rounding (a 1e-7 relative weight change moves
its gradient by 0.3%).  So the tests check

* per step (float32, the full recipe: noise, dropout, Jacobian term, jitter; pretraining, implicit and
  phantom gradient): the all-reduced gradient is the mean of the gradients each rank's rows give alone,
  and every rank holds the same gradient and parameters afterwards;
* per epoch (float32, full recipe): every rank holds identical parameters and buffers; a resumed run
  (same world size) is bit-identical to the uninterrupted one;
* end to end (float64, BatchNorm frozen, no noise, absolute residuals: ``ddp_worker.exact_trainer``): two
  epochs on 2 ranks x 32 equal two epochs of one process x 64 to rounding;
* the CLI: torchrun trains, the checkpoint loads in one process, --resume with 1 and 3 processes
  continues the epoch count; a failing or stuck rank stops the run.

The torchrun tests are marked slow (``pytest -m slow``); the sampler, evaluation sharding, schedule and
argument checks run in the fast suite.
"""
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import DIGITS_CFG, ROOT, TINY
from DEQ.checkpoint import load_checkpoint, load_model
from DEQ.data import get_dataset, make_loader
from DEQ.distributed import RoundRobinBatches, ShardedBatchSampler, World, derived_seed, rank_rng_state, set_rank_rng_state
from DEQ.errors import UserError

WORKER = os.path.join(ROOT, "tests", "ddp_worker.py")
TRAIN = os.path.join(ROOT, "DEQ", "tools", "cls_train.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
# 2 x 32 rows per step, 5 steps per epoch: 2 pretraining steps, then the DEQ phase
DDP_OPTS = TINY + ["TRAIN.BATCH_SIZE_PER_GPU", "32", "PERCENT", "0.2", "TRAIN.PRETRAIN_STEPS", "2",
                   "TEST.BATCH_SIZE_PER_GPU", "100", "LOSS.JAC_LOSS_FREQ", "0.5"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, argv, timeout=600):
    return subprocess.run(TORCHRUN + ["--nproc_per_node", str(nproc), "--master_port", str(_free_port()), *argv],
                          env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ------------------------------------------------------------------ samplers (no process group)
def _one_process_batches(n, batch, epoch, seed=0, shuffle=True):
    """The index batches a one-process run draws in ``epoch`` (Trainer.train_epoch's seeding)."""
    ds = torch.utils.data.TensorDataset(torch.arange(n))
    loader = make_loader(ds, batch, shuffle, 0, None, seed)
    loader.generator.manual_seed(seed * 100003 + epoch)
    return [b[0].tolist() for b in loader]


@pytest.mark.parametrize("n,per_rank,size", [(1347, 32, 2), (1347, 32, 3), (100, 7, 4), (10, 2, 3), (64, 8, 1)])
@pytest.mark.parametrize("shuffle", [True, False])
def test_rank_batches_are_slices_of_the_one_process_batches(n, per_rank, size, shuffle):
    for epoch in (0, 1, 5):
        samplers = [ShardedBatchSampler(n, per_rank, r, size, shuffle, seed=3 * 100003) for r in range(size)]
        for s in samplers:
            s.set_epoch(epoch)
        parts = [list(s) for s in samplers]
        single = _one_process_batches(n, per_rank * size, epoch, seed=3, shuffle=shuffle)
        kept = single if len(single[-1]) >= size else single[:-1]  # a last batch smaller than the world is skipped
        assert [len(p) for p in parts] == [len(kept)] * size == [len(samplers[0])] * size
        for k, batch in enumerate(kept):
            rows = [p[k] for p in parts]
            assert sum(rows, []) == batch  # contiguous slices, in rank order
            assert max(map(len, rows)) - min(map(len, rows)) <= 1 and min(map(len, rows)) >= 1
    other = ShardedBatchSampler(n, per_rank, 0, size, True, seed=3 * 100003)
    other.set_epoch(7)
    if shuffle and n > 20:
        assert list(other) != parts[0]  # a new order every epoch


def test_loss_weights_make_the_mean_over_ranks_the_global_mean():
    n, per_rank, size = 10, 2, 3  # global batches of 6 and 4: the last splits 2/1/1
    samplers = [ShardedBatchSampler(n, per_rank, r, size, False) for r in range(size)]
    assert samplers[0].global_sizes == [6, 4]
    losses = torch.rand(n, dtype=torch.float64)
    for step, batch in enumerate(samplers[0].global_batches()):
        per_rank_means = [losses[s_batch].mean() * s.loss_weight(step)
                          for s, s_batch in zip(samplers, [list(s)[step] for s in samplers])]
        assert torch.stack(per_rank_means).mean().item() == pytest.approx(losses[batch].mean().item(), rel=1e-12)
    assert [s.loss_weight(0) for s in samplers] == [1.0] * 3
    assert [s.loss_weight(1) for s in samplers] == [1.5, 0.75, 0.75]


def test_round_robin_evaluation_batches():
    plans = [RoundRobinBatches(450, 100, r, 2) for r in range(2)]
    assert plans[0].sizes == [100, 100, 100, 100, 50]
    assert plans[0].mine == [0, 2, 4] and plans[1].mine == [1, 3]
    assert sorted(sum((list(p) for p in plans), []), key=lambda b: b[0]) == [
        list(range(s, min(s + 100, 450))) for s in range(0, 450, 100)]
    assert list(RoundRobinBatches(450, 450, 1, 2)) == []  # a rank may have no batch


class _Shard(World):
    """A rank of a pretend world: ``sum`` records this rank's sums instead of all-reducing them."""

    def __init__(self, rank, size):
        super().__init__(rank, size, rank, size)
        self.sums = None

    def sum(self, values):
        self.sums = list(values)
        return self.sums


@pytest.mark.parametrize("size", [2, 3])
def test_sharded_evaluation_gives_the_one_process_figures(tiny_checkpoint, size):
    """Each rank evaluates its batches with the noise a one-process run gives them; summed, the counts are
    the one-process counts."""
    from DEQ.training import evaluate
    model = load_model(tiny_checkpoint).model
    test = get_dataset("digits", "test")
    one = evaluate(model, make_loader(test, 100, False), 0.5, torch.device("cpu"))
    totals = [0.0] * 6
    for rank in range(size):
        world = _Shard(rank, size)
        loader = make_loader(test, 100, False, batch_sampler=RoundRobinBatches(len(test), 100, rank, size))
        evaluate(model, loader, 0.5, torch.device("cpu"), world=world)
        totals = [a + b for a, b in zip(totals, world.sums)]
    n, clean, noisy, steps, resid, nfe = totals
    assert n == len(test)
    assert 100.0 * clean / n == pytest.approx(one.clean_acc, abs=1e-9)
    assert 100.0 * noisy / n == pytest.approx(one.noisy_acc, abs=1e-9)
    assert steps / n == pytest.approx(one.mean_steps, rel=1e-9) and resid / n == pytest.approx(one.mean_residual, rel=1e-6)
    assert nfe / n == pytest.approx(one.nfe, rel=1e-9)
    with pytest.raises(ValueError, match="RoundRobinBatches"):
        evaluate(model, make_loader(test, 100, False), 0.5, torch.device("cpu"), world=_Shard(0, 2))


# ------------------------------------------------------------------ the world, seeds, schedule (no process group)
@pytest.mark.parametrize("env,msg", [
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not a whole number"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, "do not fit together"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "do not fit together"),
])
def test_bad_torchrun_environment_is_one_line(monkeypatch, env, msg):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(UserError, match=msg):
        World.from_env()


def test_world_without_torchrun_is_one_process(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    world = World.from_env()
    assert not world.distributed and world.is_main and world.size == 1
    cpu = torch.device("cpu")
    assert world.pick_device(cpu) == cpu and world.on_rank0(lambda: 5) == 5 and world.sum([1, 2.5]) == [1.0, 2.5]
    world.start(cpu)  # no process group for one process
    assert not torch.distributed.is_initialized()
    world.stop()


def test_several_processes_never_share_one_gpu():
    with pytest.raises(UserError, match="puts all 2 processes of this node on one GPU"):
        World(1, 2, 1, 2).pick_device(torch.device("cuda", 0))
    if torch.cuda.device_count() < 8:
        with pytest.raises(UserError, match="GPU\\(s\\) are visible"):
            World(7, 8, 7, 8).pick_device(torch.device("cuda"))


def test_rank_streams_are_distinct_and_restorable():
    seeds = {derived_seed(0, "rank", r) for r in range(64)} | {derived_seed(1, "rank", r) for r in range(64)}
    assert len(seeds) == 128 and all(0 <= s < 2 ** 63 for s in seeds)
    assert derived_seed(0, "rank", 1) == derived_seed(0, "rank", 1)
    torch.manual_seed(5)
    state = rank_rng_state(torch.device("cpu"))
    a = torch.rand(3)
    set_rank_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(3), a)


def test_cosine_schedule_is_relaid_when_the_steps_per_epoch_change(tmp_path, tiny_opts):
    """A checkpoint of another world size (or PERCENT) continues with the learning rate of its epoch."""
    import math
    from DEQ.config import load_config
    from DEQ.training import Trainer
    opts = tiny_opts + ["TRAIN.END_EPOCH", "4"]
    first = Trainer(load_config(DIGITS_CFG, opts, noise=0.25), torch.device("cpu"), str(tmp_path / "a"), show_progress=False)
    first.fit(end_epoch=1)
    assert first.steps_per_epoch == 3
    more = Trainer(load_config(DIGITS_CFG, opts + ["PERCENT", "0.3"], noise=0.25), torch.device("cpu"),
                   str(tmp_path / "b"), show_progress=False)
    more.resume(first.last_path)
    assert more.steps_per_epoch == 7 and more.scheduler.T_max == 28 and more.scheduler.last_epoch == 7
    lr = 1e-6 + (0.002 - 1e-6) * (1 + math.cos(math.pi * 7 / 28)) / 2
    assert more.optimizer.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)
    more.fit(end_epoch=2)  # continues smoothly along the new schedule
    expected = 1e-6 + (0.002 - 1e-6) * (1 + math.cos(math.pi * 14 / 28)) / 2
    assert more.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9)
    same = Trainer(load_config(DIGITS_CFG, opts, noise=0.25), torch.device("cpu"), str(tmp_path / "c"), show_progress=False)
    same.resume(first.last_path)  # same steps per epoch: the saved schedule as it was
    assert same.scheduler.state_dict() == first.scheduler.state_dict()


class _Gathered(World):
    """Rank 0 of a pretend 2-process world whose rank 1 reports ``other`` for every gathered key."""

    def __init__(self, **other):
        super().__init__(0, 2, 0, 2)
        self.other = other

    def gather(self, obj):
        return [obj, {**obj, **self.other}]


@pytest.mark.parametrize("other,words", [
    ({"run folder": "/elsewhere"}, "rank 1 was started with run folder '/elsewhere', rank 0 with"),
    ({"--resume": True}, "rank 1 was started with --resume True, rank 0 with False"),
    ({"config": "X: 1\n"}, "rank 1 was started with config 'X: 1'"),
])
def test_ranks_started_with_another_command_are_refused(tmp_path, other, words):
    from DEQ.config import load_config
    from DEQ.training import _check_same_run
    cfg = load_config(DIGITS_CFG, TINY)
    with pytest.raises(UserError, match=re.escape(words)):
        _check_same_run(_Gathered(**other), cfg, str(tmp_path), False, None, False)
    _check_same_run(_Gathered(), cfg, str(tmp_path), False, None, False)  # the same command: fine


def test_dist_timeout_must_be_positive(tmp_path):
    from DEQ.tools.cls_train import main
    with pytest.raises(SystemExit) as exc:
        main(["--cfg", DIGITS_CFG, "--out", str(tmp_path / "run"), "--dist-timeout", "0", *TINY])
    assert exc.value.code == 2 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ torchrun, gloo
@pytest.fixture(scope="module")
def ddp_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpcheck")
    proc = _torchrun(2, [WORKER, "check", str(out)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "check.json") as fh:
        return out, json.load(fh)


@pytest.mark.slow
def test_ddp_gradients_are_the_mean_of_the_ranks_gradients(ddp_check):
    _, result = ddp_check
    assert result["noise_streams_differ"] and result["shared_draws_agree"]
    phases = [(s["train_step"], s.get("grad", "implicit")) for s in result["steps"]]
    assert phases == [(0, "implicit"), (2, "implicit"), (2, "phantom")]  # pretraining, implicit, phantom
    for step in result["steps"]:
        assert step["jac"][0] is not None and step["jac"][0] == step["jac"][1]  # Jacobian term on, same draws
        assert step["ranks_local_differ_rel"] > 1e-2  # the ranks' own gradients differ ...
        assert step["max_rel_err_vs_mean"] < 1e-6  # ... and DDP's gradient is their mean
        assert step["grads_equal_on_ranks"] and step["params_equal_on_ranks"]


@pytest.mark.slow
def test_ddp_ranks_stay_identical_and_resume_replays(ddp_check):
    out, result = ddp_check
    assert [e["epoch"] for e in result["full"]] == [1, 2]
    assert all(e["equal_on_ranks"] for e in result["full"])
    assert result["resume_same_world_identical"]
    ckpt = load_checkpoint(str(out / "full" / "last.pth"))
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2 and ckpt["epoch"] == 2
    assert not any(k.startswith("module.") for k in ckpt["state_dict"])
    # the sharded evaluation logged in the checkpoint is the one-process evaluation of the saved model
    from DEQ.training import evaluate
    model = load_model(str(out / "full" / "last.pth")).model
    one = evaluate(model, make_loader(get_dataset("digits", "test"), 100, False), 0.25, torch.device("cpu"))
    assert one.clean_acc == ckpt["eval"]["clean_acc"] and one.noisy_acc == ckpt["eval"]["noisy_acc"]
    assert one.mean_residual == pytest.approx(ckpt["eval"]["mean_residual"], rel=1e-5)


@pytest.mark.slow
def test_ddp_two_epochs_equal_one_process_with_the_global_batch(ddp_check, tmp_path):
    sys.path.insert(0, os.path.dirname(WORKER))
    from ddp_worker import exact_trainer
    out, _ = ddp_check
    ddp = torch.load(out / "exact.pt", weights_only=True)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        single = exact_trainer(64, str(tmp_path / "one"))
        start = {k: v.clone() for k, v in single.model.state_dict().items()}
        single.fit()
    finally:
        torch.set_default_dtype(before)
    one = single.model.state_dict()
    floats = [k for k in one if one[k].dtype.is_floating_point]
    assert single.train_step == 10  # 2 pretraining + 8 DEQ steps
    moved = max((one[k] - start[k]).abs().max().item() for k in floats)
    diff = max((one[k] - ddp[k]).abs().max().item() for k in floats)
    assert moved > 1e-3 and diff < 1e-11, (moved, diff)


@pytest.mark.slow
def test_torchrun_cli_trains_and_resumes_with_other_world_sizes(tmp_path):
    from DEQ.tools.cls_train import main
    run = tmp_path / "run"
    argv = [TRAIN, "--cfg", DIGITS_CFG, "--noise", "0.25", "--out", str(run), "--quiet", "--threads", "1"]
    proc = _torchrun(2, argv + DDP_OPTS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = load_checkpoint(str(run / "last.pth"))
    assert ckpt["epoch"] == 2 and ckpt["train_step"] == 10 and ckpt["world_size"] == 2 and ckpt["steps_per_epoch"] == 5
    assert load_model(str(run / "last.pth")).model is not None and (run / "tb").is_dir()
    log = (run / "train.log").read_text()
    assert log.count("epoch 1/2 ") == 1 and "2 processes (gloo)" in log and "global batch 64 = 2 x 32" in log
    # one process continues the two-process run ...
    main(argv[1:] + ["--resume", *DDP_OPTS, "TRAIN.END_EPOCH", "3"])
    ckpt = load_checkpoint(str(run / "last.pth"))
    assert ckpt["epoch"] == 3 and ckpt["world_size"] == 1 and ckpt["train_step"] == 10 + 9  # ceil(269.4 / 32)
    log = (run / "train.log").read_text()
    assert "at epoch 2 (step 10)" in log and "cosine schedule laid over 9 steps per epoch" in log
    # ... and three processes continue that
    proc = _torchrun(3, argv + ["--resume", *DDP_OPTS, "TRAIN.END_EPOCH", "4"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    ckpt = load_checkpoint(str(run / "last.pth"))
    assert ckpt["epoch"] == 4 and ckpt["world_size"] == 3 and len(ckpt["rng_ranks"]) == 3
    assert ckpt["train_step"] == 19 + 3 and ckpt["scheduler"]["T_max"] == 3 * 4  # ceil(269.4 / 96) steps per epoch
    log = (run / "train.log").read_text()
    assert "saved by 1 process(es), continued by 3" in log and log.count("epoch 4/4 ") == 1
    assert [int(e) for e in re.findall(r"epoch (\d)/\d  loss", log)] == [1, 2, 3, 4]


def test_torchrun_refuses_an_occupied_run_folder(tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "last.pth").write_bytes(b"x")
    proc = _torchrun(2, [TRAIN, "--cfg", DIGITS_CFG, "--out", str(run), "--quiet", *DDP_OPTS], timeout=300)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    # every rank raises the line rank 0 found; torchrun may stop the second before it prints it
    assert proc.returncode != 0 and errors and all("already holds last.pth" in e for e in errors), proc.stderr[-3000:]
    assert sorted(os.listdir(run)) == ["last.pth"]


@pytest.mark.parametrize("mode,needle", [("fail", "rank 1 fails on purpose"), ("hang", "")])
def test_a_failing_or_stuck_rank_stops_the_run(tmp_path, mode, needle):
    t0 = time.time()
    proc = _torchrun(2, [WORKER, mode, str(tmp_path)], timeout=240)
    took = time.time() - t0
    assert proc.returncode != 0 and took < 100, (took, proc.stderr[-3000:])
    if needle:
        assert needle in proc.stderr
    else:  # rank 0 gave up after the 3-second process-group timeout, long before rank 1 woke up (120 s)
        assert re.search(r"[Tt]imed? ?out|timeout", proc.stderr), proc.stderr[-3000:]
