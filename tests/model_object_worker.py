"""The closed-form digits DEQ of tests/test_model_object.py, and what that test runs under torchrun; not a test
module itself.

    python -m torch.distributed.run --nproc_per_node 2 tests/model_object_worker.py OUTFILE

certifies the closed-form DEQ (:func:`digits_deq`) through ``SRS.runner.run`` as a model object with
:func:`run_spec` (every rank builds the same model; rank 0 merges the shards into OUTFILE).  With a third
argument ``differ`` rank r builds the model of seed r instead (the ranks must refuse to run).
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # test_smoothing (LinearDEQ), the repository

import torch  # noqa: E402

from SRS.modes import CertifyMode  # noqa: E402
from SRS.runner import DataSpec, RunSpec, Sampling, SmoothingSpec, run  # noqa: E402
from test_smoothing import LinearDEQ  # noqa: E402

SIGMA, N0, N, ALPHA, BATCH = 0.25, 10, 100, 0.01, 50
MODE = CertifyMode(N0, N, ALPHA, BATCH)
DATA = DataSpec("digits", skip=45)  # 10 of the 450 test images


class Interrupted(Exception):
    """Raised by :class:`DigitsDEQ` at its ``stop_at``-th solve (an interrupted run)."""


class DigitsDEQ(LinearDEQ):
    """test_smoothing's closed-form DEQ z = a z + x on the 64 pixels of a digits image: z* = x / (1 - a), score
    s = w.z* + b, logits (-s, s) for classes 0 and 1 and min(-s, s) - 1 for the eight others.  Its smoothed
    classifier is class 1 iff w.x / (1 - a) + b > 0, with the exact radius of the linear classifier
    (``true_radius_and_class``).  w and b are buffers (so its state_dict holds its weights); it exposes the
    runner's defaults (``num_classes``, ``f_solver``, ``f_thres``, ``f_tol``).  ``stop_at`` (not a weight):
    raise :class:`Interrupted` at that solve, to interrupt a run."""

    num_classes = 10
    f_solver, f_thres, f_tol = "naive", 60, 0.0

    def __init__(self, w: torch.Tensor, b: float, a: float):
        torch.nn.Module.__init__(self)
        self.register_buffer("w", w)
        self.register_buffer("b", torch.tensor(float(b)))
        self.a, self.solves, self.stop_at = a, 0, None

    def solve(self, x, solver="naive", max_iter=50, z0=None, tol=None):
        self.solves += 1
        if self.stop_at is not None and self.solves >= self.stop_at:
            raise Interrupted(f"solve {self.solves}")
        out = super().solve(x, solver, max_iter, z0, tol)
        rest = out.logits.min(1, keepdim=True).values - 1
        out.logits = torch.cat([out.logits, rest.expand(-1, 8)], 1)
        return out


def digits_deq(seed: int = 0, a: float = 0.5) -> DigitsDEQ:
    """w a seeded unit vector, b = -1.4: on the 10 images of :data:`DATA` both classes, radii 0 to 0.5."""
    w = torch.randn(64, generator=torch.Generator().manual_seed(seed))
    return DigitsDEQ(w / w.norm(), -0.7 / (1 - a), a)


def run_spec(model, outfile: str, **kw) -> RunSpec:
    """Standard smoothing of ``model`` (solver settings: its own defaults) on :data:`DATA`, on the CPU."""
    return RunSpec(data=kw.pop("data", DATA), checkpoint=model, outfile=str(outfile),
                   sampling=Sampling(SIGMA, N, ALPHA, BATCH, N0), smoothing=kw.pop("smoothing", SmoothingSpec()),
                   device="cpu", threads=1, progress=False, **kw)


if __name__ == "__main__":
    differ = sys.argv[2:] == ["differ"]
    run(run_spec(digits_deq(int(os.environ.get("RANK", 0)) if differ else 0), sys.argv[1]), MODE)
