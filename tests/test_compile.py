"""Compiled and bf16 evaluation (``DEQ.acceleration``, issue 11).

* Eager and compiled (inductor's C++ backend on the CPU; CUDA graphs on a GPU) give the same
  certificates: predictions equal, radii within floating-point tolerance, standard and SRS.
* Padding a call to the static row count changes no real row's result.
* bf16 runs end to end; the header records precision and compile; --resume refuses a precision change
  (and accepts a file made before the precision entry existed as fp32); bad values are one-line errors.
* Training (``cls_train.py --compile``): a DEQ training step whose no-gradient solve goes through the
  compiled f gives the eager step's logits and gradients (same dropout masks); the next step, with fresh
  masks and updated weights, still does and compiles nothing new.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from DEQ.acceleration import Runtime, apply_runtime, pad_to, resolve_runtime
from DEQ.checkpoint import load_model
from DEQ.config import load_config
from DEQ.data import get_dataset
from SRS.results import parse_header
from SRS.settings import DEQSolve, SRSConfig
from SRS.smooth import Smooth
from conftest import DIGITS_CFG, TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMA = 0.25
BATCH = 40


def _inductor_works() -> str:
    """'' when torch.compile (inductor) compiles and runs a small function here, else the reason."""
    try:
        fn = torch.compile(lambda a: torch.relu(a) * 2 + 1, dynamic=False)
        out = fn(torch.arange(4.0))
        return "" if torch.equal(out, torch.relu(torch.arange(4.0)) * 2 + 1) else "inductor gave a wrong result"
    except Exception as exc:  # no C++ compiler, unsupported platform, ...
        return f"inductor cannot compile here: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


@pytest.fixture(scope="module")
def inductor():
    reason = _inductor_works()
    if reason:
        pytest.skip(reason)


def _certificates(model, runtime, device, images, srs):
    """(prediction, radius, n_A) of every image, certified with ``model`` under ``runtime``."""
    apply_runtime(model, runtime)
    smooth = Smooth(model, 10, SIGMA, standard=DEQSolve("anderson", 6, 0.0),
                    srs=SRSConfig(step=DEQSolve("anderson", 1, 0.0), warmup=DEQSolve("anderson", 4, 0.0),
                                  conf_drop=30) if srs else None)
    out = []
    for i, x in enumerate(images):
        gen = torch.Generator(device=device).manual_seed(1000 + i)
        c = smooth.certify(x.to(device), 20, 100, 0.001, BATCH, generator=gen)  # 100 = 40 + 40 + 20: padded
        out.append((c.prediction, c.radius, c.n_A))
    model.set_runtime(None)
    return out


def _agreement(ckpt, device):
    model = load_model(ckpt, device).model.eval()
    data = get_dataset("digits", "test")
    images = [data[i][0] for i in (0, 7, 13)]
    for srs in (False, True):
        eager = _certificates(model, Runtime(), device, images, srs)
        compiled = _certificates(model, resolve_runtime("on", "fp32", device, pad_rows=BATCH), device, images, srs)
        assert model.engine is None
        for (p0, r0, n0), (p1, r1, n1) in zip(eager, compiled):
            assert p0 == p1, (srs, eager, compiled)
            assert n0 == n1 and abs(r0 - r1) <= 1e-6 * max(1.0, abs(r0)), (srs, eager, compiled)


def test_eager_and_compiled_certificates_agree_cpu(tiny_checkpoint, inductor):
    """Standard and SRS certification, eager vs torch.compile (inductor C++), same noise."""
    _agreement(tiny_checkpoint, torch.device("cpu"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled path with CUDA graphs)")
def test_eager_and_compiled_certificates_agree_cuda(tiny_checkpoint):
    """The same on the GPU: torch.compile with CUDA graphs (mode reduce-overhead) against eager."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _agreement(tiny_checkpoint, torch.device("cuda"))


DIGITS_CKPT = os.path.join(ROOT, "output", "digits", "cls_mdeq_digits_noise0.25", "last.pth")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(DIGITS_CKPT), reason=f"needs the digits checkpoint {DIGITS_CKPT} "
                    "(python DEQ/tools/cls_train.py --cfg experiments/digits/cls_mdeq_digits.yaml --noise 0.25)")
def test_eager_and_compiled_certificates_agree_digits_checkpoint(inductor):
    """The trained digits MDEQ (the main job's checkpoint): the same agreement at its real size."""
    _agreement(DIGITS_CKPT, torch.device("cpu"))


def test_padding_changes_no_row(tiny_checkpoint):
    """7 rows padded to 16 (bf16 engine, eager): every real row's logits, state and steps are those of the
    unpadded solve, with a tolerance (the padded copies meet it together with their originals)."""
    model = load_model(tiny_checkpoint, "cpu").model.eval()
    x = torch.rand(7, 1, 8, 8)
    outs = []
    for pad in (None, 16):
        model.set_runtime(Runtime(precision="bf16", pad_rows=pad))
        outs.append(model.solve(x, "anderson", 20, None, 1e-3))
    model.set_runtime(None)
    a, b = outs
    assert b.logits.shape == (7, 10) and b.z.shape == a.z.shape and b.result.residual.shape == (7,)
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.z, b.z, atol=1e-5)
    assert torch.equal(a.result.nsteps, b.result.nsteps) and a.result.nfe == b.result.nfe
    assert torch.equal(pad_to(torch.arange(3)[:, None], 7)[:, 0], torch.tensor([0, 1, 2, 0, 1, 2, 0]))


def test_bf16_keeps_the_solver_fp32(tiny_checkpoint):
    """Under bf16 the state, residuals and logits are fp32 and close to the fp32 model's."""
    model = load_model(tiny_checkpoint, "cpu").model.eval()
    x = torch.rand(5, 1, 8, 8)
    ref = model.solve(x, "anderson", 10, None, 0.0)
    model.set_runtime(Runtime(precision="bf16"))
    out = model.solve(x, "anderson", 10, None, 0.0)
    model.set_runtime(None)
    assert out.z.dtype == out.logits.dtype == out.result.residual.dtype == torch.float32
    assert (out.logits - ref.logits).abs().max() < 0.25 * ref.logits.abs().max()


# ----------------------------------------------------------------- the command lines
def _certify(argv):
    from SRS.cli import certify_main, certify_parser
    return certify_main(certify_parser().parse_args(argv))


def _argv(ckpt, out, *extra):
    return ["digits", ckpt, str(SIGMA), str(out), "--N0", "10", "--N", "60", "--batch", "30", "--skip", "150",
            "--max", "2", "--f_thresh", "4", "--tol", "0", "--quiet", "--device", "cpu", *extra]


def test_bf16_certify_end_to_end_and_resume_refuses_precision_change(tiny_checkpoint, tmp_path, capsys):
    from DEQ.errors import UserError
    out = tmp_path / "bf16.tsv"
    summary = _certify(_argv(tiny_checkpoint, out, "--precision", "bf16", "--compile", "off", "--max", "1"))
    assert summary["rows"] == 1
    meta = parse_header(out.read_text().splitlines())
    assert meta["precision"] == "bf16" and meta["compile"] == "off"
    with pytest.raises(UserError, match="precision=bf16 but this run has precision=fp32"):
        _certify(_argv(tiny_checkpoint, out, "--resume", "--precision", "fp32"))
    summary = _certify(_argv(tiny_checkpoint, out, "--resume", "--precision", "bf16"))
    assert summary["rows"] == 2 and summary["skipped_done"] == 1


def test_resume_of_file_without_precision_line_is_fp32(tiny_checkpoint, tmp_path):
    from DEQ.errors import UserError
    out = tmp_path / "old.tsv"
    _certify(_argv(tiny_checkpoint, out, "--max", "1"))
    text = out.read_text()
    out.write_text("".join(line for line in text.splitlines(True) if not line.startswith("# precision:")))
    assert "precision" not in parse_header(out.read_text().splitlines())
    assert _certify(_argv(tiny_checkpoint, out, "--resume"))["rows"] == 2
    with pytest.raises(UserError, match="precision"):
        _certify(_argv(tiny_checkpoint, out, "--resume", "--precision", "bf16", "--max", "3"))


@pytest.mark.parametrize("flag,value", [("--compile", "yes"), ("--precision", "fp16")])
def test_bad_compile_or_precision_is_a_one_line_error(tiny_checkpoint, tmp_path, capsys, flag, value):
    from DEQ.errors import cli_main
    out = tmp_path / "bad.tsv"
    with pytest.raises(SystemExit) as exc:
        cli_main(_certify)(_argv(tiny_checkpoint, out, flag, value))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {flag} must be one of") and repr(value) in err[0], err
    assert not out.exists()


def test_plain_classifier_is_wrapped_and_agrees():
    """A plain module under bf16: wrapped, fp32 logits, rows padded and dropped, gradients eager."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    wrapped = apply_runtime(net, Runtime(precision="bf16", pad_rows=8))
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        out = wrapped(x)
    assert out.shape == (3, 10) and out.dtype == torch.float32
    assert torch.allclose(out, net(x), atol=0.05)
    assert apply_runtime(net, Runtime()) is net


# ----------------------------------------------------------------- the training solve
def _tiny_train_model(device):
    """The tiny digits MDEQ in train mode with dropout 0.2 (masks matter), seeded alike every call."""
    from DEQ.models import build_model
    cfg = load_config(DIGITS_CFG, TINY + ["MODEL.DROPOUT", "0.2"], noise=0.25)
    torch.manual_seed(0)
    return build_model(cfg).to(device).train()


def _train_step(model, x, y, step, amp=False):
    """(logits, gradients, solver result) of DEQ training step ``step`` (the second with the Jacobian term),
    its dropout masks (and Hutchinson vector) drawn from a seed of its own."""
    torch.manual_seed(100 + step)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type=x.device.type, enabled=amp):
        res = model.forward_train(x, train_step=model.pretrain_steps + 1, compute_jac_loss=step == 1)
        loss = F.cross_entropy(res.logits.float(), y) + 0.5 * res.jac_loss
    loss.backward()
    return res.logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], res.result


def _close(a, b, rtol, atol):
    """Whether ``b`` is ``a`` to ``rtol`` of ``a``'s largest magnitude plus ``atol`` (per tensor, not per element:
    the solver's rounding differences move a gradient element by ~1e-5 of the gradient's scale, whatever
    the element's own size)."""
    return bool((a - b).abs().max() <= rtol * a.abs().max() + atol)


def _compiled_training_agrees(device, runtime, amp=False, rtol=5e-5, atol=1e-6):
    """Two training steps, eager and with the compiled training solve, from the same weights (the eager
    model's, an SGD step apart: new weights and weight-normalised weights for the second step) and the
    same dropout masks (fresh for the second step): the solve's state fp32 with the same evaluation
    count, logits and gradients close, and no graph compiled for the second step.

    The input is seeded: an untrained MDEQ's gradient can amplify a 1e-6 change of z* a thousandfold for
    some inputs, eager or compiled alike (the f-side gradients then move by ~5%; measured by perturbing
    the eager z* by 1e-6); on this seeded input eager and compiled agree to ~1e-5 of each tensor's scale."""
    from torch._dynamo.utils import counters
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 8, 8, generator=gen).to(device)
    y = torch.randint(0, 10, (6,), generator=gen).to(device)
    eager, model = _tiny_train_model(device), _tiny_train_model(device)
    model.set_runtime(runtime, train=True)
    assert model.engine.train_f is not None
    opt = torch.optim.SGD(eager.parameters(), lr=0.05)
    graphs, logits = [counters["stats"]["unique_graphs"]], []
    for step in range(2):
        model.load_state_dict(eager.state_dict())
        l0, g0, r0 = _train_step(eager, x, y, step, amp)
        l1, g1, r1 = _train_step(model, x, y, step, amp)
        graphs.append(counters["stats"]["unique_graphs"])
        assert r0.z.dtype == r1.z.dtype == torch.float32 and r0.nfe == r1.nfe
        assert _close(r0.z, r1.z, rtol, atol) and _close(l0, l1, rtol, atol), ((r0.z - r1.z).abs().max(), (l0 - l1).abs().max())
        assert len(g0) == len(g1)
        for a, b in zip(g0, g1):
            assert _close(a, b, rtol, atol), ((a - b).abs().max(), a.abs().max())
        masks = [b.drop.mask for br in model.fullstage.branches for b in br.blocks]
        assert all(m.shape[0] == 6 for m in masks) and any(bool((m == 0).any()) for m in masks)
        logits.append(l0)
        opt.step()
    assert graphs[1] > graphs[0], "the first step compiled nothing"
    assert graphs[2] == graphs[1], "the second step (fresh masks, new weights) recompiled"
    assert len(model.engine.train_f.seen) == 1 and "rows 6" in model.engine.train_compile_report()
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # the steps differ (masks, weights): a real check
    return model


def test_compiled_training_step_agrees_cpu(inductor):
    """forward_train + backward with the no-grad solve through the compiled f (inductor C++) against eager:
    logits and gradients within 5e-5 of their scale (measured: under 1e-5), two steps, one compiled graph."""
    model = _compiled_training_agrees(torch.device("cpu"), resolve_runtime("on", "fp32", torch.device("cpu")))
    model.set_runtime(resolve_runtime("on", "fp32", torch.device("cpu")))  # certify.py / attack.py: training eager
    assert model.engine.train_f is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (compiled training solve, CUDA graphs)")
def test_compiled_training_step_agrees_cuda():
    """The same on the GPU (CUDA graphs), fp32 and under AMP's fp16 autocast (state fp32 in both)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    _compiled_training_agrees(dev, resolve_runtime("on", "fp32", dev))
    _compiled_training_agrees(dev, resolve_runtime("on", "fp32", dev), amp=True, rtol=2e-2, atol=1e-3)


def test_trainer_compile_flag_covers_the_training_solve(tiny_opts, tmp_path):
    """Trainer.set_runtime (cls_train.py --compile): 'on' compiles evaluation and the training solve,
    'auto' on the CPU and 'off' leave the model eager."""
    from DEQ.training import Trainer
    cfg = load_config(DIGITS_CFG, tiny_opts, noise=0.25)
    trainer = Trainer(cfg, torch.device("cpu"), str(tmp_path), show_progress=False)
    trainer.set_runtime("on")
    engine = trainer.model.engine
    assert engine.runtime.compile and engine.train_f is not None and engine.runtime.pad_rows
    for flag in ("auto", "off"):
        trainer.set_runtime(flag)
        assert trainer.model.engine is None
