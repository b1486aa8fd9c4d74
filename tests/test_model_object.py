"""A model object (not a checkpoint file) certified through ``SRS.runner.run``: the closed-form digits DEQ of
tests/model_object_worker.py (test_smoothing's LinearDEQ with ten logits), whose smoothed class and exact radius
are known, run in full, interrupted and resumed, on two torchrun ranks, and refused where it does not fit.

Identity: the header's ``model`` and ``model_sha256`` (``SRS.source.state_sha256``), checked on --resume and
across ranks like a checkpoint's SHA-256."""
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from DEQ.errors import UserError
from SRS.benchmark import run_methods, standard
from SRS.results import read_rows, shard_files
from SRS.runner import SmoothingSpec, run
from SRS.settings import DEQSolve
from SRS.source import ModelObject, state_sha256
from model_object_worker import DATA, MODE, Interrupted, digits_deq, run_spec
from test_distributed import ENV, TORCHRUN, _free_port, _rows
from test_smoothing import Linear

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_object_worker.py")
PROVENANCE = ("command", "date", "versions")


def _meta(path, drop=PROVENANCE):
    return {k: v for k, v in read_rows(path)[0].items() if k not in drop}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One uninterrupted one-process run of the closed-form DEQ over the 10 images of DATA."""
    out = tmp_path_factory.mktemp("single") / "one.tsv"
    run(run_spec(digits_deq(), out), MODE)
    return out


# ------------------------------------------------------------------ identity of a model object
def test_state_sha256_is_the_weights_dtype_shape_and_names():
    model = digits_deq()
    sha = state_sha256(model)
    assert sha == state_sha256(digits_deq()) and len(sha) == 64  # same weights, another instance
    assert state_sha256(digits_deq(seed=1)) != sha
    nudged = digits_deq()
    nudged.w[5] += 1e-6
    assert state_sha256(nudged) != sha
    for changed in (lambda m: m.w.reshape(8, 8), lambda m: m.w.double()):  # same values, other shape / dtype
        other = digits_deq()
        other.w = changed(other)
        assert state_sha256(other) != sha
    renamed = torch.nn.Module()
    renamed.register_buffer("v", model.w.clone())
    renamed.register_buffer("b", model.b.clone())
    assert state_sha256(renamed) != sha


# ------------------------------------------------------------------ (a) a full run
def test_full_run_certifies_the_closed_form(single):
    model = digits_deq()
    meta, _, rows, _ = read_rows(single)
    assert (meta["model"], meta["model_sha256"]) == ("DigitsDEQ", state_sha256(model))
    assert not {"checkpoint", "checkpoint_sha256", "cfg_sha256"} & set(meta)
    assert (meta["standard"], meta["tol"]) == ("naive:60", "0.0")  # the model's f_solver, f_thres, f_tol
    assert [int(r["idx"]) for r in rows] == DATA.indices(450)
    from DEQ.data import get_dataset
    images = get_dataset("digits", "test")
    certified = []
    for r in rows:
        true_r, true_c = model.true_radius_and_class(images[int(r["idx"])][0])
        if int(r["predict"]) != -1:  # each holds w.p. >= 1 - alpha: the certificate of the closed form
            assert int(r["predict"]) == true_c and float(r["radius"]) <= true_r, r
            certified.append(true_c)
    assert len(certified) >= 6 and set(certified) == {0, 1}


def test_spec_settings_then_model_object_fields_then_attributes(tmp_path):
    """ModelObject.solve replaces the model's f_* attributes; the smoothing settings replace both."""
    one = replace(DATA, max=1)
    obj = ModelObject(digits_deq(), name="mine", solve=DEQSolve("anderson", 7, 1e-4))
    run(run_spec(obj, tmp_path / "a.tsv", data=one), MODE)
    meta = _meta(tmp_path / "a.tsv")
    assert (meta["model"], meta["standard"], meta["tol"]) == ("mine", "anderson:7", "0.0001")
    run(run_spec(obj, tmp_path / "b.tsv", data=one, smoothing=SmoothingSpec(f_solver="naive", f_thresh=9, tol=0.0)),
        MODE)
    assert (_meta(tmp_path / "b.tsv")["standard"], _meta(tmp_path / "b.tsv")["tol"]) == ("naive:9", "0.0")


# ------------------------------------------------------------------ (b) interrupted, limited, resumed
def test_interrupted_and_limited_runs_resume_to_the_uninterrupted_file(single, tmp_path):
    out = tmp_path / "resumed.tsv"
    model = digits_deq()
    model.stop_at = model.solves + 8  # 3 solves per image: stops inside the third image
    with pytest.raises(Interrupted):
        run(run_spec(model, out), MODE)
    assert len(read_rows(out)[2]) == 2
    model.stop_at = None
    run(run_spec(model, out, data=replace(DATA, max=5), resume=True), MODE)  # a limited run: 3 more
    assert len(read_rows(out)[2]) == 5
    summary = run(run_spec(digits_deq(), out, resume=True), MODE)  # another instance of the same weights
    assert (summary["images"], summary["skipped_done"], summary["rows"]) == (5, 5, 10)
    assert _rows(out) == _rows(single) and _meta(out) == _meta(single)


# ------------------------------------------------------------------ (c) two ranks
def _torchrun(out, *extra):
    return subprocess.run(TORCHRUN + ["--nproc_per_node", "2", "--master_port", str(_free_port()), WORKER, str(out),
                                      *extra], env=ENV, capture_output=True, text=True, timeout=600)


def test_two_ranks_write_the_rows_of_one_process(single, tmp_path):
    out = tmp_path / "two.tsv"
    proc = _torchrun(out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _rows(out) == _rows(single) and shard_files(str(out)) == []
    assert _meta(out, PROVENANCE + ("threads", "device")) == _meta(single, PROVENANCE + ("threads", "device"))


@pytest.mark.slow
def test_ranks_with_other_weights_refuse_to_run(tmp_path):
    out = tmp_path / "differ.tsv"
    proc = _torchrun(out, "differ")
    assert proc.returncode != 0
    assert "ranks disagree on settings: rank 0 has model_sha256=" in proc.stderr
    assert not out.exists() and shard_files(str(out)) == []


# ------------------------------------------------------------------ (d) resume refuses other weights
@pytest.mark.parametrize("other, key", [(ModelObject(digits_deq(seed=1)), "model_sha256"),
                                        (ModelObject(digits_deq(), name="renamed"), "model")])
def test_resume_refuses_another_model_in_one_line(single, tmp_path, other, key):
    out = tmp_path / "r.tsv"
    shutil.copy(single, out)
    before = out.read_bytes()
    with pytest.raises(UserError) as err:
        run(run_spec(other, out, resume=True), MODE)
    message = str(err.value)
    assert "\n" not in message and f"was made with {key}=" in message and "rerun with the same settings" in message
    assert out.read_bytes() == before


# ------------------------------------------------------------------ refusals before any work
PLAIN = Linear(torch.ones(64) / 8, 0.0)  # no solve(): a plain classifier


@pytest.mark.parametrize("source, change, match", [
    (ModelObject(digits_deq(), num_classes=2), {}, "the model object DigitsDEQ has 2 classes but digits has 10"),
    (ModelObject(digits_deq(), dataset="cifar10"), {}, "was trained on cifar10, not digits"),
    (digits_deq(), {"cfg": "x.yaml"}, "already built: drop cfg"),
    (digits_deq(), {"compile": "on"}, "compile='on' evaluates a DEQ through its set_runtime"),
    (digits_deq(), {"precision": "bf16"}, "precision='bf16' evaluates a DEQ through its set_runtime"),
    (42, {}, "must be a checkpoint path, a torch.nn.Module or an SRS.source.ModelObject around one, got a int"),
    (PLAIN, {"smoothing": SmoothingSpec(f_thresh=3)}, "but the model object is a Linear \\(one forward pass"),
    (PLAIN, {"smoothing": SmoothingSpec(srs=True)}, "--srs needs a deep equilibrium model, but the model object is a"),
])
def test_model_objects_that_do_not_fit_are_refused_in_one_line(tmp_path, source, change, match):
    out = tmp_path / "o.tsv"
    with pytest.raises(UserError, match=match) as err:
        run(replace(run_spec(source, out), **change), MODE)
    assert "\n" not in str(err.value) and not out.exists()


def test_a_plain_model_object_is_certified_by_its_forward(tmp_path):
    out = tmp_path / "plain.tsv"
    run(run_spec(PLAIN, out, data=replace(DATA, max=2)), MODE)
    meta = _meta(out)
    assert (meta["model"], meta["standard"], meta["model_sha256"]) == ("Linear", "forward", state_sha256(PLAIN))


# ------------------------------------------------------------------ the benchmark takes one too
def test_benchmark_suite_certifies_a_model_object(tmp_path):
    template = run_spec(digits_deq(), "", data=replace(DATA, max=2))
    paths = run_methods(template, [standard(5, "naive"), standard(20, "naive")], str(tmp_path), log=lambda m: None)
    for label, k in (("MDEQ-5N", 5), ("MDEQ-20N", 20)):
        meta, _, rows, _ = read_rows(paths[label])
        assert meta["standard"] == f"naive:{k}" and len(rows) == 2
        assert meta["model_sha256"] == state_sha256(digits_deq())
