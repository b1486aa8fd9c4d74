"""``--compile auto`` never strands a run, ``--compile on`` fails in one line (``DEQ.acceleration.CompileGuard``).

Every failure is forced on the CPU by replacing ``torch.compile``: one whose compiled function raises at its
first call (as inductor does without a C++ compiler, or a CUDA graph capture that fails), one that raises
when asked to compile, and one whose compiled head returns different logits (a miscompiled model).  No
inductor and no GPU are needed: the replaced compiles are instant.
"""
import pytest
import torch

from DEQ.acceleration import (CompileGuard, Runtime, apply_runtime, disagreeing_rows, resolve_runtime)
from DEQ.checkpoint import load_model
from DEQ.data import get_dataset
from DEQ.errors import UserError, cli_main

AUTO = Runtime(compile=True, fallback=True)   # what --compile auto resolves to on CUDA (no CUDA graphs here)
ON = Runtime(compile=True)                    # --compile on
WARNING = "warning: --compile auto: compiling failed (RuntimeError: no C++ compiler found); running eager"


def _raising_at_first_call(fn, **kwargs):
    def compiled(*args):
        raise RuntimeError("no C++ compiler found\nInductor needs one to build its kernels")
    return compiled


def _raising_at_compile(fn, **kwargs):
    raise RuntimeError("no C++ compiler found")


def _negated_head(fn, **kwargs):
    """A 'compile' that returns the stem and f as they are and the head's logits negated (argmax -> argmin)."""
    if getattr(getattr(fn, "__self__", None), "name", "") == "head":
        return lambda *args: -fn(*args)
    return fn


def _constant_f(fn, **kwargs):
    """A 'compile' whose f is a constant large random state: every solve ends there, whatever the input."""
    if getattr(getattr(fn, "__self__", None), "name", "") == "f":
        def f(*args):
            out = fn(*args)
            return 100 * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        return f
    return fn


@pytest.fixture(scope="module")
def digits_batch():
    """Eight test images of the digits set with distinct labels (the tiny model tells most of them apart)."""
    data = get_dataset("digits", "test")
    seen, xs = set(), []
    for i in range(len(data)):
        x, y = data[i]
        if int(y) not in seen:
            seen.add(int(y))
            xs.append(x)
        if len(xs) == 8:
            break
    return torch.stack(xs)


def _model(ckpt):
    return load_model(ckpt, "cpu").model.eval()


def _stderr_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ------------------------------------------------------------------ compiling fails
@pytest.mark.parametrize("fake", [_raising_at_first_call, _raising_at_compile])
def test_auto_falls_back_to_eager_with_one_warning(tiny_checkpoint, digits_batch, monkeypatch, capsys, fake):
    """The compiled function raising at its first call, or torch.compile itself raising: one warning line,
    the same predictions as eager, and the model stays eager (no second warning on later solves)."""
    model = _model(tiny_checkpoint)
    ref = model.solve(digits_batch, "anderson", 8, None, 0.0)
    monkeypatch.setattr(torch, "compile", fake)
    model.set_runtime(AUTO)
    out = [model.solve(digits_batch, "anderson", 8, None, 0.0) for _ in range(2)]
    assert model.engine.guard.eager
    assert _stderr_lines(capsys) == [WARNING]
    for o in out:
        assert torch.equal(o.logits.argmax(1), ref.logits.argmax(1))
        assert torch.allclose(o.logits, ref.logits, atol=1e-5)


@pytest.mark.parametrize("fake", [_raising_at_first_call, _raising_at_compile])
def test_on_refuses_in_one_line(tiny_checkpoint, digits_batch, monkeypatch, fake):
    """--compile on: the failure is a UserError naming the exception and the flags that avoid it."""
    model = _model(tiny_checkpoint)
    monkeypatch.setattr(torch, "compile", fake)
    with pytest.raises(UserError) as err:
        model.set_runtime(ON)
        model.solve(digits_batch, "anderson", 8, None, 0.0)
    msg = str(err.value)
    assert msg.startswith("--compile on: compiling failed (RuntimeError: no C++ compiler found); ")
    assert "--compile auto" in msg and "--compile off" in msg and "\n" not in msg


def test_certify_compile_on_failure_is_one_error_line(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """certify.py --compile on with a compiler that fails: exit 2 and one 'error:' line, no traceback."""
    from SRS.cli import certify_main, certify_parser
    monkeypatch.setattr(torch, "compile", _raising_at_first_call)
    argv = ["digits", tiny_checkpoint, "0.25", str(tmp_path / "on.tsv"), "--N0", "10", "--N", "20", "--batch", "10",
            "--max", "1", "--f_thresh", "3", "--tol", "0", "--quiet", "--device", "cpu", "--compile", "on"]
    with pytest.raises(SystemExit) as exc:
        cli_main(lambda: certify_main(certify_parser().parse_args(argv)))()
    assert exc.value.code == 2
    err = _stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: --compile on: compiling failed (RuntimeError: no C++ compiler")


def test_resolve_runtime_auto_is_the_one_that_falls_back(monkeypatch):
    """auto resolves to a falling-back runtime where it compiles (CUDA), on to a strict one; the CPU's auto
    compiles nothing.  (No GPU is touched: resolving only reads the device type.)"""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    cuda = torch.device("cuda")
    assert resolve_runtime("auto", "fp32", cuda).fallback and not resolve_runtime("on", "fp32", cuda).fallback
    assert not resolve_runtime("auto", "fp32", torch.device("cpu")).compile
    assert not resolve_runtime("on", "fp32", torch.device("cpu")).fallback


def test_header_records_the_fallback_policy_not_a_compiled_run(monkeypatch):
    """The results header is written before the first image: with auto it states the fallback policy, so a run
    that fell back is never recorded as compiled without qualification; on and off say just that."""
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    cuda = torch.device("cuda")
    assert "auto: eager after" in resolve_runtime("auto", "fp32", cuda).describe()
    assert resolve_runtime("on", "fp32", cuda).describe() == "on cuda_graphs"
    assert resolve_runtime("auto", "fp32", torch.device("cpu")).describe() == "off"


# ------------------------------------------------------------------ compiled and eager disagree
def test_auto_checks_the_first_batch_and_falls_back_on_disagreement(tiny_checkpoint, digits_batch, monkeypatch,
                                                                    capsys):
    """A compiled head with negated logits: the first solve is checked against eager, disagrees, warns once
    and returns the eager solve; the model is eager from then on."""
    model = _model(tiny_checkpoint)
    ref = model.solve(digits_batch, "anderson", 8, None, 0.0)
    monkeypatch.setattr(torch, "compile", _negated_head)
    model.set_runtime(AUTO)
    first, second = (model.solve(digits_batch, "anderson", 8, None, 0.0) for _ in range(2))
    err = _stderr_lines(capsys)
    assert len(err) == 1 and err[0].startswith("warning: --compile auto: compiled and eager predictions differ on ")
    assert err[0].endswith(f" of {len(digits_batch)} rows of the first mini-batch; running eager")
    assert model.engine.guard.eager
    for out in (first, second):
        assert torch.allclose(out.logits, ref.logits, atol=1e-5)


def test_on_trusts_the_compiled_model(tiny_checkpoint, digits_batch, monkeypatch, capsys):
    """--compile on does not check: the (here wrong) compiled logits come back, silently."""
    model = _model(tiny_checkpoint)
    ref = model.solve(digits_batch, "anderson", 8, None, 0.0)
    monkeypatch.setattr(torch, "compile", _negated_head)
    model.set_runtime(ON)
    out = model.solve(digits_batch, "anderson", 8, None, 0.0)
    assert torch.allclose(out.logits, -ref.logits, atol=1e-5) and not _stderr_lines(capsys)


def test_agreeing_compile_is_kept(tiny_checkpoint, digits_batch, monkeypatch, capsys):
    """A 'compile' that changes nothing passes the check: no warning, the engine stays compiled."""
    model = _model(tiny_checkpoint)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    model.set_runtime(AUTO)
    model.solve(digits_batch, "anderson", 8, None, 0.0)
    assert not model.engine.guard.eager and not model.engine.guard.pending
    assert not _stderr_lines(capsys)


def test_plain_classifier_falls_back_on_disagreement(monkeypatch, capsys):
    """A plain module (RuntimeClassifier): the first no-gradient call is checked and falls back the same way."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: (lambda *args: -fn(*args)))
    wrapped = apply_runtime(net, AUTO)
    x = torch.rand(6, 1, 8, 8)
    with torch.no_grad():
        out, again = wrapped(x), wrapped(x)
        assert torch.equal(out, net(x)) and torch.equal(again, net(x))
    assert len(_stderr_lines(capsys)) == 1 and wrapped.guard.eager


def test_training_solve_is_checked_without_touching_the_step(tiny_checkpoint, digits_batch, monkeypatch, capsys):
    """The training solve through a compiled f that is wrong (a constant): the first DEQ step compares its fixed
    point's predictions with the eager solve's (same dropout masks), warns once and uses the eager solve,
    so the step's logits and the batch-norm statistics are those of the eager model's step."""
    eager, model = (load_model(tiny_checkpoint, "cpu").model.train() for _ in range(2))
    monkeypatch.setattr(torch, "compile", _constant_f)
    model.set_runtime(AUTO, train=True)
    outs = []
    for m in (eager, model):
        torch.manual_seed(7)
        with torch.no_grad():
            outs.append(m.forward_train(digits_batch, train_step=m.pretrain_steps + 1))
    assert model.engine.guard.eager
    err = _stderr_lines(capsys)
    assert len(err) == 1 and "compiled and eager predictions differ" in err[0]
    assert torch.equal(outs[0].logits, outs[1].logits)
    for a, b in zip(eager.buffers(), model.buffers()):
        assert torch.equal(a, b)
    assert all(m.training for m in model.modules())


def test_disagreeing_rows_counts_predictions_not_rounding():
    """Rounding that leaves the argmax, or moves it within a tie, is agreement; a different class is not;
    a row non-finite in only one of them disagrees."""
    eager = torch.tensor([[3.0, 1.0, 0.0], [2.0, 2.0 - 1e-5, 0.0], [0.0, 1.0, 5.0], [float("nan"), 0.0, 0.0]])
    close = eager + 1e-6
    swapped = eager.clone()
    swapped[1] = torch.tensor([2.0 - 1e-5, 2.0, 0.0])          # a tie broken the other way
    assert disagreeing_rows(close, eager) == 0 and disagreeing_rows(swapped, eager) == 0
    wrong = eager.clone()
    wrong[2] = torch.tensor([5.0, 1.0, 0.0])
    assert disagreeing_rows(wrong, eager) == 1
    finite = eager.clone()
    finite[3] = torch.tensor([1.0, 0.0, 0.0])
    assert disagreeing_rows(finite, eager) == 1
    assert disagreeing_rows(-eager[:3], eager[:3]) == 3


def test_guard_checks_once_and_not_after_falling_back():
    guard = CompileGuard(AUTO)
    calls = []
    logits = torch.eye(3)
    assert guard.check("eval", logits, lambda: calls.append(1) or logits)
    assert guard.check("eval", logits, lambda: calls.append(1) or -logits) and calls == [1]  # checked once
    assert CompileGuard(ON).check("eval", logits, lambda: -logits)                             # on: never checked


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.compile with CUDA graphs)")
def test_auto_keeps_a_real_compile_on_cuda(tiny_checkpoint, digits_batch, capsys):
    """The real thing on a GPU: --compile auto (inductor, CUDA graphs) compiles the tiny MDEQ, its first batch
    passes the agreement check, nothing falls back and nothing is printed but the compile note."""
    from DEQ.acceleration import compiled_vs_eager
    dev = torch.device("cuda")
    model = load_model(tiny_checkpoint, dev).model.eval()
    for precision in ("fp32", "bf16"):
        runtime = resolve_runtime("auto", precision, dev, pad_rows=len(digits_batch))
        assert runtime.compile and runtime.cuda_graphs and runtime.fallback
        r = compiled_vs_eager(model, digits_batch.to(dev), runtime, "anderson", 8)
        assert not r["fell_back"] and r["disagreeing"] == 0, r
    assert not [line for line in _stderr_lines(capsys) if line.startswith("warning:")]
