"""Our MDEQ classifier is drop-in compatible with the published SRS reference code.

The fixture ``tests/fixtures/ref_mdeq_cifar_small.pt`` was produced once, outside
this repository, by a throwaway script that ran the SRS reference code
(github.com/WeizhiGao/Serialized-Randomized-Smoothing, ``SRS/code/implicit_model``,
commit 94802d6843c1240aea20f55424cbcdd390f7231a) on the CPU (its ``.cuda()`` calls
replaced by the identity):

* the CIFAR-10 MDEQ-SMALL classifier was built from that code's
  ``config/cls_mdeq_SMALL.yaml`` with its own builder after ``torch.manual_seed(0)``
  and put in eval mode;
* so that the comparison is not vacuous, all BatchNorm running statistics and
  affine parameters, all GroupNorm affine parameters, the plain (not
  weight-normalised) conv/linear weights and biases (N(0, 1/fan_in)) and the
  weight-norm scales ``weight_g`` were re-drawn with a ``torch.Generator`` seeded
  with 1;
* ``x = torch.rand(4, 3, 32, 32)`` after ``torch.manual_seed(2)``;
* the reference logits are the reference head applied to ``f^K(0)``: K = 6 plain
  iterations, from zeros, of the reference equilibrium function (input
  normalisation, stem and injection into the highest-resolution branch only,
  zero injection elsewhere, weight-normalised weights recomputed first).

The file stores ``state_dict`` (exactly the keys the reference
``model.state_dict()`` returns), ``x``, ``logits``, ``k`` and a ``note``.  No
reference code is part of this repository or of this test.
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo is not installed into the venv; make DEQ importable
    sys.path.insert(0, str(ROOT))

from DEQ.checkpoint import load_state_dict  # noqa: E402
from DEQ.config import load_config  # noqa: E402
from DEQ.errors import UserError  # noqa: E402
from DEQ.models import build_model  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "ref_mdeq_cifar_small.pt"
CFG = ROOT / "experiments" / "cifar" / "cls_mdeq_SMALL.yaml"


@pytest.fixture(scope="module")
def ref():
    return torch.load(FIXTURE, map_location="cpu", weights_only=True)


def _model():
    return build_model(load_config(str(CFG)))


def _logits_after_k_iterations(model, x, k):
    model.eval()
    with torch.no_grad():
        model._reset(x)
        inj = model.inject(x)
        func, shapes = model.make_func(inj)
        z = torch.zeros(x.shape[0], model.state_dim(inj))
        for _ in range(k):
            z = func(z)
        return model.head(z, shapes)


def test_fixture_is_small_and_complete(ref):
    assert FIXTURE.stat().st_size < 3 * 1024 * 1024
    assert {"state_dict", "x", "logits", "k", "note"} <= set(ref)
    assert ref["k"] == 6
    assert ref["x"].shape == (4, 3, 32, 32)
    assert ref["logits"].shape == (4, 10)


def test_reference_state_dict_loads_strictly_with_same_keys_and_shapes(ref):
    model = _model()
    own = model.state_dict()
    sd = ref["state_dict"]
    assert set(sd) == set(own), (
        f"missing in reference: {sorted(set(own) - set(sd))}; unexpected: {sorted(set(sd) - set(own))}")
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in own.items()}
    load_state_dict(model, sd)
    loaded = model.state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v), k


def test_reference_logits_reproduced(ref):
    model = _model()
    load_state_dict(model, ref["state_dict"])
    logits = _logits_after_k_iterations(model, ref["x"], ref["k"])
    # The reference logits differ between the four inputs by far more than the tolerance.
    assert (ref["logits"] - ref["logits"][:1]).abs().max() > 1e-2
    assert torch.allclose(logits, ref["logits"], atol=1e-5, rtol=1e-4), (logits - ref["logits"]).abs().max()


def test_dataparallel_prefix_is_stripped(ref):
    model = _model()
    load_state_dict(model, {f"module.{k}": v for k, v in ref["state_dict"].items()})
    logits = _logits_after_k_iterations(model, ref["x"], ref["k"])
    assert torch.allclose(logits, ref["logits"], atol=1e-5, rtol=1e-4)


def test_missing_key_is_a_user_error_naming_the_key(ref):
    sd = dict(ref["state_dict"])
    dropped = "fullstage.branches.1.blocks.0.conv1.weight_g"
    del sd[dropped]
    with pytest.raises(UserError, match=dropped.replace(".", r"\.")):
        load_state_dict(_model(), sd)
