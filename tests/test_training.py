"""Model construction, training, checkpoints, resume, configs and their errors."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import DIGITS_CFG, ROOT
from DEQ.checkpoint import load_checkpoint, load_model, save_checkpoint
from DEQ.config import load_config
from DEQ.data import get_dataset
from DEQ.errors import UserError
from DEQ.models import build_model
from DEQ.training import Trainer

CONFIGS = ["experiments/digits/cls_mdeq_digits.yaml", "experiments/digits/cls_mdeq_digits32.yaml",
           "experiments/digits/cls_mdeq_digits32b2.yaml",
           "experiments/cifar/cls_mdeq_SMALL.yaml",
           "experiments/cifar/cls_mdeq_LARGE.yaml", "experiments/imagenet/cls_mdeq_SMALL.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_each_shipped_config_builds_and_runs_forward(path):
    cfg = load_config(os.path.join(ROOT, path))
    model = build_model(cfg).eval()
    size = cfg.MODEL.IMAGE_SIZE[0] if "imagenet" not in path else 64  # any size divisible by 2^(branches+stem)
    x = torch.rand(2, model.in_channels, size, size)
    out = model.solve(x, "anderson", 2)
    assert out.logits.shape == (2, cfg.MODEL.NUM_CLASSES) and torch.isfinite(out.logits).all()
    assert out.z.shape[0] == 2 and out.result.nfe == 2
    # chaining: the returned state warm-starts the next solve
    again = model.solve(x, "naive", 1, z0=out.z)
    assert again.z.shape == out.z.shape


@pytest.mark.parametrize("name", ["cls_mdeq_digits32.yaml", "cls_mdeq_digits32b2.yaml"])
def test_digits32_config_trains_on_32x32_digits(tmp_path, name):
    """The 32x32 settings (digits resized; depth matters there): a tiny-epoch run trains, and its
    checkpoint certifies 32x32 inputs."""
    cfg = load_config(os.path.join(ROOT, "experiments/digits", name),
                      ["TRAIN.END_EPOCH", "1", "PERCENT", "0.05", "TRAIN.PRETRAIN_STEPS", "1"], noise=0.5)
    assert list(cfg.MODEL.IMAGE_SIZE) == [32, 32]
    trainer = Trainer(cfg, torch.device("cpu"), str(tmp_path), show_progress=False)
    trainer.fit()
    model = load_model(trainer.last_path, torch.device("cpu")).model.eval()
    x, _ = get_dataset("digits", "test", image_size=32)[0]
    assert x.shape == (1, 32, 32)
    out = model.solve(x[None], "anderson", 3, None, 0.0)
    assert out.logits.shape == (1, 10) and torch.isfinite(out.logits).all()


def test_training_steps_reduce_the_loss(tiny_opts):
    import torch.nn.functional as F
    from DEQ.training import build_optimizer
    cfg = load_config(DIGITS_CFG, tiny_opts + ["TRAIN.PRETRAIN_STEPS", "0", "LOSS.JAC_LOSS_FREQ", "1.0"], noise=0.1)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    data = get_dataset("digits", "train")
    x, y = data.tensors[0][:128], data.tensors[1][:128]
    opt = build_optimizer(cfg, model)
    losses = []
    for _ in range(15):
        out = model.forward_train(x, train_step=100, compute_jac_loss=True)
        loss = F.cross_entropy(out.logits, y)
        opt.zero_grad()
        (loss + 0.1 * out.jac_loss).backward()
        opt.step()
        losses.append(loss.item())
    assert out.result is not None and out.jac_loss.item() > 0
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("solver", ["anderson", "broyden", "naive"])
def test_implicit_gradient_matches_finite_differences(solver):
    """On a contraction z = tanh(W z + U x), the adjoint-solve gradient equals central differences."""
    from DEQ.implicit import attach_implicit_backward
    from DEQ.solvers import solve
    g = torch.Generator().manual_seed(0)
    W = torch.randn(12, 12, generator=g, dtype=torch.float64)
    W = (0.7 * W / torch.linalg.matrix_norm(W, ord=2)).requires_grad_()
    U = torch.randn(12, 5, generator=g, dtype=torch.float64)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    c = torch.randn(3, 12, generator=g, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + x @ U.T)

    def loss_at(weight):
        z = solve("anderson", lambda z: torch.tanh(z @ weight.T + x @ U.T), torch.zeros(3, 12, dtype=torch.float64),
                  200, tol=1e-13, stop_mode="abs").z
        return (c * z).sum()
    with torch.no_grad():
        z_star = solve("anderson", f, torch.zeros(3, 12, dtype=torch.float64), 200, tol=1e-13, stop_mode="abs").z
    z_star.requires_grad_()
    new_z = attach_implicit_backward(f(z_star), z_star, solver, 300, tol=1e-12, stop_mode="abs")
    (c * new_z).sum().backward()
    V = torch.randn(12, 12, generator=g, dtype=torch.float64)
    eps = 1e-6
    with torch.no_grad():
        numeric = (loss_at(W + eps * V) - loss_at(W - eps * V)) / (2 * eps)
    assert (W.grad * V).sum().item() == pytest.approx(numeric.item(), rel=1e-6)
    # the one-step gradient (no adjoint solve) is a different, approximate number
    W.grad = None
    (c * f(z_star.detach())).sum().backward()
    assert (W.grad * V).sum().item() != pytest.approx(numeric.item(), rel=1e-3)


@pytest.mark.parametrize("grad", ["implicit", "phantom"])
def test_gradients_reach_every_parameter(grad, tiny_opts):
    cfg = load_config(DIGITS_CFG, tiny_opts + ["DEQ.GRAD", grad, "MODEL.DROPOUT", "0.1"])
    model = build_model(cfg).train()
    x = torch.rand(4, 1, 8, 8)
    out = model.forward_train(x, train_step=100, compute_jac_loss=True)
    (out.logits.sum() + out.jac_loss).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_checkpoint_round_trip_and_atomic_write(tmp_path, tiny_opts):
    cfg = load_config(DIGITS_CFG, tiny_opts, noise=0.25)
    trainer = Trainer(cfg, torch.device("cpu"), str(tmp_path), show_progress=False)
    trainer.fit()
    model, cfg2, ckpt = load_model(trainer.last_path)
    assert ckpt["epoch"] == 2 and ckpt["noise"] == 0.25 and ckpt["dataset"] == "digits"
    assert cfg2.dump() == cfg.dump()
    x = torch.rand(3, 1, 8, 8)
    trainer.model.eval()
    assert torch.allclose(model(x), trainer.model(x))
    # a crash in the middle of writing leaves the previous file intact
    before = open(trainer.last_path, "rb").read()

    class Boom(dict):
        def __reduce_ex__(self, proto):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        save_checkpoint({"state_dict": Boom()}, trainer.last_path)
    assert open(trainer.last_path, "rb").read() == before
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []


def test_resume_reproduces_the_uninterrupted_run(tmp_path, tiny_opts):
    opts = tiny_opts + ["TRAIN.END_EPOCH", "3"]
    cfg = load_config(DIGITS_CFG, opts, noise=0.25)
    full = Trainer(cfg, torch.device("cpu"), str(tmp_path / "full"), show_progress=False)
    full.fit()
    part = Trainer(cfg, torch.device("cpu"), str(tmp_path / "part"), show_progress=False)
    part.fit(end_epoch=1)  # "interrupted" after one epoch
    resumed = Trainer(cfg, torch.device("cpu"), str(tmp_path / "part"), show_progress=False)
    resumed.resume()
    assert resumed.epoch == 1
    resumed.fit()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.train_step == full.train_step


def test_config_overrides_parse_in_mdeq_style():
    cfg = load_config(DIGITS_CFG, ["DEQ.F_THRES", "12", "TRAIN.LR", "0.01", "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16, 16]"])
    assert cfg.DEQ.F_THRES == 12 and cfg.TRAIN.LR == 0.01 and list(cfg.MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS) == [8, 16, 16]
    assert load_config(DIGITS_CFG, noise=0.5).TRAIN.NOISE == 0.5


@pytest.mark.parametrize("opts,noise,msg", [
    (["DEQ.NOT_A_KEY", "1"], None, "unknown config key DEQ.NOT_A_KEY"),
    (["DEQ.F_THRES"], None, "KEY VALUE pairs"),
    (["DEQ.F_SOLVER", "newton"], None, "not a solver"),
    (["DEQ.F_THRES", "abc"], None, "command-line override"),
    ([], -0.1, "--noise must be a finite number >= 0"),
])
def test_bad_config_input_gives_a_clear_error(opts, noise, msg):
    with pytest.raises(UserError, match=msg):
        load_config(DIGITS_CFG, opts, noise=noise)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  NAME: [unclosed\n")
    with pytest.raises(UserError, match="not valid yaml"):
        load_config(str(bad))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("MODEL:\n  NOPE: 1\n")
    with pytest.raises(UserError, match="NOPE"):
        load_config(str(unknown))


def test_unreadable_checkpoint_and_missing_data_dir(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        load_checkpoint(str(junk))
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    with pytest.raises(UserError, match="does not exist"):
        get_dataset("cifar10", "test", str(tmp_path / "no-such-dir"))
    with pytest.raises(UserError, match="ImageNet"):
        get_dataset("imagenet", "test", str(tmp_path))


def _run(args, cwd):
    return subprocess.run([sys.executable] + args, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("extra,msg", [
    (["--cfg", "nope.yaml"], "config file not found"),
    (["--cfg", DIGITS_CFG, "--noise", "-1"], "--noise must be a finite number >= 0"),
    (["--cfg", DIGITS_CFG, "DEQ.BAD_KEY", "3"], "unknown config key"),
    (["--cfg", DIGITS_CFG, "--resume"], "--resume: no checkpoint"),
    (["--cfg", os.path.join(ROOT, "experiments/cifar/cls_mdeq_SMALL.yaml"), "--data-dir", "/no/such/dir"], "does not exist"),
])
def test_train_cli_bad_input_is_one_line(tmp_path, extra, msg):
    res = _run([os.path.join(ROOT, "DEQ/tools/cls_train.py"), "--out", str(tmp_path / "run"), "--quiet"] + extra, tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], res.stderr
