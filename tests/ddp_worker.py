"""What tests/test_ddp.py runs under ``torchrun --nproc_per_node 2`` (gloo, CPU); not a test module itself.

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_worker.py MODE OUTDIR

MODE ``check``: every rank
  1. takes three DDP steps of a tiny MDEQ (pretraining step, implicit-gradient DEQ step, and a phantom-
     gradient DEQ step of a second run), each with the Jacobian term, threshold jitter, dropout and noise,
     and compares the all-reduced gradient with the mean of the gradients each rank's rows give alone
     (computed on a copy of the model from the same random state);
  2. trains two epochs with noise, dropout, Jacobian term and jitter on, gathering every rank's
     parameters and buffers after each epoch; trains one epoch in another folder and resumes it (same
     world size) to the second;
  3. trains two epochs in float64 with BatchNorm frozen (eval mode), no noise, no dropout, no Jacobian
     term, exact solver budgets and absolute residuals (:func:`exact_trainer`): the run whose result a
     one-process run with the global batch reproduces up to rounding.
Rank 0 writes OUTDIR/check.json (the measurements) and OUTDIR/*.pt (final state_dicts); the pytest side
asserts on them.

MODE ``fail``: rank 1 raises after joining the process group while rank 0 waits in a collective (torchrun
must stop rank 0).  MODE ``hang``: rank 1 sleeps while rank 0 waits with a 3-second process-group
timeout (rank 0 must stop with a timeout error).
"""
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # conftest (TINY, DIGITS_CFG)

from conftest import DIGITS_CFG, TINY  # noqa: E402
from DEQ.checkpoint import load_state_dict  # noqa: E402
from DEQ.config import load_config  # noqa: E402
from DEQ.distributed import World  # noqa: E402
from DEQ.models import build_model  # noqa: E402
from DEQ.training import Trainer, TrainForward, train_step_fn  # noqa: E402

CPU = torch.device("cpu")
# 2 branches, 5 steps per epoch of 2 x 32 rows: 2 pretraining steps, then the DEQ phase
BASE = TINY + ["TRAIN.BATCH_SIZE_PER_GPU", "32", "PERCENT", "0.2", "TRAIN.PRETRAIN_STEPS", "2",
               "TEST.BATCH_SIZE_PER_GPU", "100"]
FULL = BASE + ["LOSS.JAC_LOSS_FREQ", "0.5", "LOSS.JAC_LOSS_WEIGHT", "0.5", "MODEL.DROPOUT", "0.05",
               "DEQ.RAND_F_THRES_DELTA", "2"]
# what a one-process run reproduces up to rounding (with exact_trainer: float64, BatchNorm frozen)
EXACT = BASE + ["LOSS.JAC_LOSS_FREQ", "0.0", "MODEL.DROPOUT", "0.0", "DEQ.F_TOL", "0.0", "DEQ.B_TOL", "0.0",
                "DEQ.STOP_MODE", "abs"]


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """BatchNorm stays in eval mode (its running statistics: an affine map per channel) through model.train()."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.train = lambda mode=True, m=m: torch.nn.Module.train(m, False)
    model.train(model.training)


def exact_trainer(per_process_batch: int, out: str, world=None) -> Trainer:
    """The run a DDP run and a one-process run with the same global batch must agree on to rounding.

    Why each setting: BatchNorm in training mode normalises by each rank's own rows (no SyncBatchNorm),
    so it is frozen; noise, dropout masks and Hutchinson vectors are drawn per rank, so they are off;
    with ``rel`` residuals the best-iterate choice of the adjoint Broyden solve depends on the scale of
    dL/dz (the 1e-8 in ||f(z) - z|| / (||f(z)|| + 1e-8)), which is 1/64 of a row's gradient in one
    process and 1/32 on a rank, so ``abs`` residuals (scale-equivariant) with exact budgets; and in
    float32 this tiny model amplifies rounding (a 1e-7 relative change of the weights moves the
    gradient by 0.3% at initialisation), so float64.  Call ``torch.set_default_dtype(torch.float64)``
    first.

    Args:
        per_process_batch: TRAIN.BATCH_SIZE_PER_GPU.
        out: run folder.
        world: the DDP world, or None for one process.

    Returns:
        Trainer: ready to ``fit()``.
    """
    cfg = load_config(DIGITS_CFG, EXACT + ["TRAIN.BATCH_SIZE_PER_GPU", str(per_process_batch)], noise=0.0)
    trainer = Trainer(cfg, CPU, out, show_progress=False, world=world)
    for ds in (trainer.train_set, trainer.test_set):
        ds.tensors = (ds.tensors[0].double(), ds.tensors[1])
    freeze_batchnorm(trainer.model)
    return trainer


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def state_vector(model) -> torch.Tensor:
    return flat([v for v in model.state_dict().values() if v.dtype.is_floating_point])


def step_check(trainer: Trainer, world: World, x, y, train_step: int) -> dict:
    """One DDP step against the mean of the ranks' own gradients (same random state, copy of the model)."""
    cfg = trainer.cfg
    ref = build_model(cfg).train()  # a copy (weight-normalised modules cannot be deep-copied)
    load_state_dict(ref, trainer.model.state_dict())
    rng, draws = torch.get_rng_state(), trainer.draws.get_state()
    opt = torch.optim.SGD(ref.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    _, jac_ref, _, _ = train_step_fn(ref, opt, sched, None, cfg, x, y, 0, train_step, CPU,
                                     forward=TrainForward(ref), draws=trainer.draws)
    local = flat(p.grad for p in ref.parameters())
    torch.set_rng_state(rng)
    trainer.draws.set_state(draws)
    _, jac, _, _ = train_step_fn(trainer.model, trainer.optimizer, trainer.scheduler, None, cfg, x, y, 0, train_step,
                                 CPU, forward=trainer.forward, draws=trainer.draws)
    synced = flat(p.grad for p in trainer.model.parameters())
    locals_ = world.gather(local)
    synced_all = world.gather(synced)
    params_all = world.gather(flat(trainer.model.parameters()))
    mean = torch.stack(locals_).mean(0)
    return {"train_step": train_step, "jac": [jac, jac_ref],
            "max_rel_err_vs_mean": ((synced - mean).abs().max() / mean.abs().max()).item(),
            "ranks_local_differ_rel": ((locals_[0] - locals_[1]).abs().max() / mean.abs().max()).item(),
            "grads_equal_on_ranks": all(torch.equal(g, synced_all[0]) for g in synced_all),
            "params_equal_on_ranks": all(torch.equal(p, params_all[0]) for p in params_all),
            "grad_norm": mean.norm().item()}


def check(out: str, world: World) -> None:
    result = {"world": world.size, "steps": []}
    # 1. single steps: pretraining (step 0), implicit DEQ step (step 2); phantom gradient in a second run
    cfg = load_config(DIGITS_CFG, FULL + ["LOSS.JAC_LOSS_FREQ", "1.0", "LOSS.PRETRAIN_JAC_LOSS_WEIGHT", "0.3"],
                      noise=0.25)
    trainer = Trainer(cfg, CPU, os.path.join(out, "steps"), show_progress=False, world=world)
    state = torch.get_rng_state()
    draws = world.gather((torch.randn(4), torch.rand(4, generator=trainer.draws)))  # noise stream, shared stream
    torch.set_rng_state(state)
    trainer.draws.manual_seed(trainer.draws.initial_seed())
    result["noise_streams_differ"] = not torch.equal(draws[0][0], draws[1][0])
    result["shared_draws_agree"] = torch.equal(draws[0][1], draws[1][1])
    trainer.model.train()
    batches = iter(trainer.train_loader)
    for step in (0, 2):
        x, y = next(batches)
        result["steps"].append(step_check(trainer, world, x, y, step))
    cfg = load_config(DIGITS_CFG, FULL + ["LOSS.JAC_LOSS_FREQ", "1.0", "DEQ.GRAD", "phantom"], noise=0.25)
    trainer = Trainer(cfg, CPU, os.path.join(out, "steps"), show_progress=False, world=world)
    trainer.model.train()
    x, y = next(iter(trainer.train_loader))
    result["steps"].append(dict(step_check(trainer, world, x, y, 2), grad="phantom"))

    # 2. two epochs of the full recipe; ranks compared after each; resumed run (same world size) compared
    cfg = load_config(DIGITS_CFG, FULL, noise=0.25)
    trainer = Trainer(cfg, CPU, os.path.join(out, "full"), show_progress=False, world=world)
    result["full"] = []
    for epoch in (1, 2):
        t0 = time.time()
        stats = trainer.fit(end_epoch=epoch)
        seconds = time.time() - t0
        states = world.gather(state_vector(trainer.model))
        result["full"].append({"epoch": epoch, "seconds": seconds, "eval": vars(stats),
                               "equal_on_ranks": all(torch.equal(s, states[0]) for s in states)})
    part = Trainer(cfg, CPU, os.path.join(out, "part"), show_progress=False, world=world)
    part.fit(end_epoch=1)
    resumed = Trainer(cfg, CPU, os.path.join(out, "part"), show_progress=False, world=world)
    resumed.resume()
    resumed.fit(end_epoch=2)
    result["resume_same_world_identical"] = torch.equal(state_vector(resumed.model), state_vector(trainer.model))

    # 3. the run a one-process run reproduces
    torch.set_default_dtype(torch.float64)
    exact = exact_trainer(32, os.path.join(out, "exact"), world)
    exact.fit()
    if world.is_main:
        torch.save(exact.model.state_dict(), os.path.join(out, "exact.pt"))
        with open(os.path.join(out, "check.json"), "w") as fh:
            json.dump(result, fh, indent=1)


def fail(world: World, timeout_minutes: float, hang: bool) -> None:
    world.start(CPU, timeout_minutes)
    if world.rank == 1:
        if hang:
            time.sleep(120)
        raise RuntimeError("rank 1 fails on purpose")
    world.sum([1.0])  # rank 0 waits here for rank 1


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    world = World.from_env()
    if mode in ("fail", "hang"):
        fail(world, 0.05 if mode == "hang" else 10.0, hang=mode == "hang")
        return
    world.start(CPU, 10.0)
    try:
        check(out, world)
    finally:
        world.stop()


if __name__ == "__main__":
    main()
