"""The ladder of standard models: rung certificates equal separate certify runs, the ladder file, and
the equal-accuracy baseline."""
import dataclasses

import pandas as pd
import pytest
import torch

from DEQ.config import load_config
from DEQ.models.mdeq import build_model
from SRS.ladder import LadderMode, certify_ladder, equal_accuracy_rung, ladder_table, rung_frames
from SRS.runner import DataSpec, RunSpec, Sampling, SmoothingSpec, run
from SRS.settings import DEQSolve
from SRS.smooth import Smooth
from conftest import DIGITS_CFG


@pytest.fixture(scope="module")
def tiny_model():
    from conftest import TINY
    torch.manual_seed(0)
    return build_model(load_config(DIGITS_CFG, list(TINY))).eval()


@pytest.mark.parametrize("solver", ["anderson", "naive", "broyden"])
def test_rung_certificates_equal_separate_certify_runs(tiny_model, solver):
    x = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(3))
    top = Smooth(tiny_model, 10, 0.25, standard=DEQSolve(solver, 12, 0.0))
    ladder = certify_ladder(top, x, 20, 90, 0.01, 40, (1, 3, 5), generator=torch.Generator().manual_seed(7))
    certs = ladder.certificates
    assert ladder.rung_seconds > 0
    assert sorted(certs) == [1, 3, 5, 12]
    for k, cert in certs.items():
        alone = Smooth(tiny_model, 10, 0.25, standard=DEQSolve(solver, k, 0.0)).certify(
            x, 20, 90, 0.01, 40, generator=torch.Generator().manual_seed(7))
        assert (cert.prediction, cert.radius, cert.n_A, cert.p_A_lower) == \
            (alone.prediction, alone.radius, alone.n_A, alone.p_A_lower), (solver, k)
        assert list(cert.counts) == list(alone.counts)
        assert cert.nfe == alone.nfe == k


def test_ladder_refuses_srs_and_budgets_above_the_certified_model(tiny_model):
    from SRS.settings import SRSConfig
    x = torch.rand(1, 8, 8)
    with pytest.raises(ValueError, match="standard DEQ"):
        certify_ladder(Smooth(tiny_model, 10, 0.25, srs=SRSConfig()), x, 5, 5, 0.1, 5, (1,))
    with pytest.raises(ValueError, match="must lie in"):
        certify_ladder(Smooth(tiny_model, 10, 0.25, standard=DEQSolve("anderson", 5, 0.0)), x, 5, 5, 0.1, 5, (8,))


def test_ladder_file_reads_as_the_certified_model_and_as_rungs(tiny_checkpoint, tmp_path):
    """Through the runner: the ladder file's own rows are certify.py's MDEQ-kA rows for the same seed."""
    data, sampling = DataSpec("digits", skip=90, max=3), Sampling(0.25, 60, 0.01, 30, 10)
    spec = RunSpec(data=data, checkpoint=tiny_checkpoint, outfile=str(tmp_path / "ladder.tsv"), sampling=sampling,
                   smoothing=SmoothingSpec(f_solver="anderson", f_thresh=8, tol=0.0), progress=False)
    run(spec, LadderMode(10, 60, 0.01, 30, rungs=(1, 2, 8)))
    frames = rung_frames(spec.outfile)
    assert sorted(frames) == [1, 2, 8]
    from SRS.modes import CertifyMode
    from SRS.results import read_results
    for k in (2, 8):
        alone = dataclasses.replace(spec, outfile=str(tmp_path / f"k{k}.tsv"),
                                    smoothing=SmoothingSpec(f_solver="anderson", f_thresh=k, tol=0.0))
        run(alone, CertifyMode(10, 60, 0.01, 30))
        ref = read_results(alone.outfile)
        for col in ("idx", "predict", "radius", "n_A", "nfe"):
            assert list(frames[k][col]) == pytest.approx(list(ref[col]), rel=1e-5), (k, col)
    top = read_results(spec.outfile)
    assert list(top["radius"]) == pytest.approx(list(frames[8]["radius"]), rel=1e-5)


def _frame(certified_radii, labels=None):
    n = len(certified_radii)
    labels = labels or [0] * n
    return pd.DataFrame({"idx": range(n), "label": labels, "predict": [0 if r >= 0 else -1 for r in certified_radii],
                         "radius": [max(r, 0.0) for r in certified_radii],
                         "correct": [int(r >= 0) for r in certified_radii], "nfe": 1.0, "time": float("nan")})


def test_equal_accuracy_rung_is_the_cheapest_within_one_image_everywhere():
    radii = [0.0, 0.25, 0.5]
    top = _frame([0.6, 0.6, 0.3, 0.3, 0.1, -1])               # certified: 5, 4, 2
    frames = {1: _frame([0.6, -1, -1, 0.3, 0.1, -1]),          # 3, 2, 1: two images short at r = 0
              3: _frame([0.6, 0.4, 0.2, 0.3, 0.1, -1]),        # 5, 3, 1: one image short at 0.25 and 0.5
              5: _frame([0.6, 0.6, 0.3, 0.3, 0.1, -1]),
              30: top}
    assert equal_accuracy_rung(frames, radii) == 3
    assert equal_accuracy_rung(frames, radii, tolerance=0) == 5
    table = ladder_table(frames, radii)
    assert list(table["largest gap (images)"]) == [2, 1, 0, 0]
    frames[3] = _frame([0.6, 0.4, 0.2, 0.2, 0.1, -1])          # 5, 2, 1: two short at 0.25
    assert equal_accuracy_rung(frames, radii) == 5
