"""Batched fixed-point solvers (naive, Anderson, Broyden) for deep equilibrium models.

Contract: z = f(z) per sample from any ``z0``; ``max_iter = k`` costs exactly k evaluations of f ("kA" = k
evaluations); each sample returns the evaluated f(z) of lowest residual seen; convergence is checked after
every evaluation and the solve stops once every sample is below ``tol``.  A budget-k solve equals the first k
evaluations of a longer one from the same z0, so ``record=(k1, ...)`` gives every smaller budget's answer
from one solve.  Why these and not torchdeq's: docs/design.md, "Solvers: budgets and the ladder".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor
FixedPointFn = Callable[[Tensor], Tensor]


@dataclass
class SolverResult:
    """Output of a fixed-point solve on a batch of B problems."""

    z: Tensor            # (B, ...) solution estimate, same shape as z0
    nsteps: Tensor       # (B,) evaluations until the sample met tol (max_iter if never)
    residual: Tensor     # (B,) residual of z in the stop mode
    abs_residual: Tensor  # (B,) ||f(z) - z||
    rel_residual: Tensor  # (B,) ||f(z) - z|| / ||f(z)||
    nfe: int             # evaluations of f on the whole batch
    converged: Tensor    # (B,) bool, residual below tol
    snapshots: Optional[Dict[int, Tuple[Tensor, Tensor]]] = None  # record: k -> (z, residual) of budget k


_EPS = 1e-8


def _residuals(fx: Tensor, x: Tensor):
    abs_diff = (fx - x).norm(dim=1)
    rel_diff = abs_diff / (fx.norm(dim=1) + _EPS)
    return abs_diff, rel_diff


class _Tracker:
    """Keeps, per sample, the lowest-residual image f(z) and when tol was met."""

    def __init__(self, x0: Tensor, stop_mode: str, tol: float, max_iter: int, record: Sequence[int] = ()):
        bsz = x0.shape[0]
        self.record = sorted(set(int(k) for k in record))
        if self.record and not 1 <= self.record[0] <= self.record[-1] <= max_iter:
            raise ValueError(f"recorded budgets {self.record} must lie in [1, max_iter={max_iter}]")
        self.snapshots: Dict[int, Tuple[Tensor, Tensor]] = {}
        self.stop_mode, self.tol, self.max_iter = stop_mode, tol, max_iter
        self.best = x0.clone()
        inf = torch.full((bsz,), float("inf"), device=x0.device, dtype=x0.dtype)
        self.best_res, self.best_abs, self.best_rel = inf.clone(), inf.clone(), inf.clone()
        self.nsteps = torch.full((bsz,), max_iter, device=x0.device, dtype=torch.long)
        self.nfe = 0

    def update(self, fx: Tensor, x: Tensor) -> bool:
        """Record evaluation f(x) = fx; return True when every sample has met tol."""
        self.nfe += 1
        abs_diff, rel_diff = _residuals(fx, x)
        res = rel_diff if self.stop_mode == "rel" else abs_diff
        better = res < self.best_res  # NaN never wins, so a diverging step is never returned
        self.best = torch.where(better[:, None], fx, self.best)
        self.best_res = torch.where(better, res, self.best_res)
        self.best_abs = torch.where(better, abs_diff, self.best_abs)
        self.best_rel = torch.where(better, rel_diff, self.best_rel)
        if self.nfe in self.record:
            self.snapshots[self.nfe] = (self.best.clone(), self.best_res.clone())
        if self.tol <= 0:  # exact budget: no residual is below 0, so nsteps stays max_iter; no early
            return False   # stop, hence no host-device sync and no bookkeeping in the loop
        newly = (res < self.tol) & (self.nsteps == self.max_iter)
        self.nsteps = torch.where(newly, torch.full_like(self.nsteps, self.nfe), self.nsteps)
        return bool((self.best_res < self.tol).all())  # one sync per step buys early stopping

    def result(self, shape) -> SolverResult:
        snaps = None
        if self.record:  # budgets past an early stop return what the stopped solve returns
            snaps = {k: self.snapshots.get(k, (self.best, self.best_res)) for k in self.record}
            snaps = {k: (z.view(shape), r) for k, (z, r) in snaps.items()}
        return SolverResult(self.best.view(shape), self.nsteps, self.best_res,
                            self.best_abs, self.best_rel, self.nfe, self.best_res < self.tol, snaps)


def _work(z0: Tensor) -> Tensor:
    """Flat (B, D) state; half precision (mixed-precision training) is solved in float32,
    since the Anderson/Broyden linear algebra is unstable or unsupported in fp16."""
    x = z0.reshape(z0.shape[0], -1)
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _flat(f: FixedPointFn, shape):
    return lambda x: f(x.view(shape)).reshape(x.shape[0], -1).to(x.dtype)


def _check(max_iter: int, stop_mode: str):
    if max_iter < 1:
        raise ValueError(f"solver budget must be at least 1 evaluation, got {max_iter}")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")


def naive_solver(f: FixedPointFn, z0: Tensor, max_iter: int = 50, tol: float = 1e-3,
                 stop_mode: str = "rel", record: Sequence[int] = (), **_) -> SolverResult:
    """Plain fixed-point iteration z <- f(z)."""
    _check(max_iter, stop_mode)
    shape, g = z0.shape, _flat(f, z0.shape)
    x = _work(z0)
    track = _Tracker(x, stop_mode, tol, max_iter, record)
    for _ in range(max_iter):
        fx = g(x)
        if track.update(fx, x):
            break
        x = fx
    return track.result(shape)


def anderson_solver(f: FixedPointFn, z0: Tensor, max_iter: int = 50, tol: float = 1e-3,
                    stop_mode: str = "rel", m: int = 6, lam: float = 1e-4, beta: float = 1.0,
                    record: Sequence[int] = (), **_) -> SolverResult:
    """Anderson acceleration with memory m and ridge lam (one evaluation per step)."""
    _check(max_iter, stop_mode)
    shape, g = z0.shape, _flat(f, z0.shape)
    x = _work(z0)
    bsz, dim = x.shape
    m = max(1, min(m, max_iter - 1))  # a k-step solve never mixes more than k-1 pairs: smaller buffers for SRS
    # Stored per pair: F = f(x_i) and G = f(x_i) - x_i (computed once when the pair is stored, not
    # recomputed for every pair at every step); X only when beta != 1 mixes the iterates in.
    X = torch.zeros(bsz, m, dim, dtype=x.dtype, device=x.device) if beta != 1 else None
    F = torch.zeros(bsz, m, dim, dtype=x.dtype, device=x.device)
    G = torch.zeros_like(F)
    H = torch.zeros(bsz, m + 1, m + 1, dtype=x.dtype, device=x.device)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = torch.zeros(bsz, m + 1, 1, dtype=x.dtype, device=x.device)
    y[:, 0] = 1
    eye = lam * torch.eye(m, dtype=x.dtype, device=x.device)[None]
    track = _Tracker(x, stop_mode, tol, max_iter, record)
    for k in range(max_iter):
        if k > 0:
            n = min(k, m)
            Gn = G[:, :n]
            H[:, 1:n + 1, 1:n + 1] = torch.bmm(Gn, Gn.transpose(1, 2)) + eye[:, :n, :n]
            alpha = torch.linalg.solve(H[:, :n + 1, :n + 1], y[:, :n + 1])[:, 1:n + 1, 0]
            x = (alpha[:, None] @ F[:, :n])[:, 0]
            if X is not None:
                x = beta * x + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        fx = g(x)
        F[:, k % m] = fx
        torch.sub(fx, x, out=G[:, k % m])
        if X is not None:
            X[:, k % m] = x
        if track.update(fx, x):
            break
    return track.result(shape)


def broyden_solver(f: FixedPointFn, z0: Tensor, max_iter: int = 50, tol: float = 1e-3,
                   stop_mode: str = "rel", record: Sequence[int] = (), **_) -> SolverResult:
    """Broyden's method on g(z) = f(z) - z; inverse Jacobian -I + U V^T (rank <= max_iter)."""
    _check(max_iter, stop_mode)
    shape, fn = z0.shape, _flat(f, z0.shape)
    x = _work(z0)
    bsz, dim = x.shape
    Us = torch.zeros(bsz, dim, max_iter, dtype=x.dtype, device=x.device)
    VTs = torch.zeros(bsz, max_iter, dim, dtype=x.dtype, device=x.device)
    track = _Tracker(x, stop_mode, tol, max_iter, record)
    fx = fn(x)
    gx = fx - x
    if track.update(fx, x):
        return track.result(shape)
    update = gx  # -J^{-1} g with J^{-1} = -I: the first step is a naive step
    for step in range(1, max_iter):
        dx = update
        x = x + dx
        fx = fn(x)
        gx_new = fx - x
        dg, gx = gx_new - gx, gx_new
        if track.update(fx, x):
            break
        t = step - 1
        vT = _rmatvec(Us[:, :, :t], VTs[:, :t], dx)
        u = (dx - _matvec(Us[:, :, :t], VTs[:, :t], dg)) / torch.einsum("bd,bd->b", vT, dg)[:, None]
        VTs[:, t] = torch.nan_to_num(vT, nan=0.0, posinf=0.0, neginf=0.0)
        Us[:, :, t] = torch.nan_to_num(u, nan=0.0, posinf=0.0, neginf=0.0)
        update = -_matvec(Us[:, :, :step], VTs[:, :step], gx)
    return track.result(shape)


def _rmatvec(Us: Tensor, VTs: Tensor, x: Tensor) -> Tensor:
    """x^T (-I + U V^T)."""
    if Us.shape[-1] == 0:
        return -x
    return -x + torch.einsum("bt,btd->bd", torch.einsum("bd,bdt->bt", x, Us), VTs)


def _matvec(Us: Tensor, VTs: Tensor, x: Tensor) -> Tensor:
    """(-I + U V^T) x."""
    if Us.shape[-1] == 0:
        return -x
    return -x + torch.einsum("bdt,bt->bd", Us, torch.einsum("btd,bd->bt", VTs, x))


def _torchdeq(name: str):
    """Adapter: run a torchdeq solver and report its result in our format."""
    def run(f: FixedPointFn, z0: Tensor, max_iter: int = 50, tol: float = 1e-3,
            stop_mode: str = "rel", record: Sequence[int] = (), **kw) -> SolverResult:
        from torchdeq.solver import get_solver
        _check(max_iter, stop_mode)
        if record:
            raise ValueError(f"torchdeq_{name} cannot record intermediate budgets: its iterates are not exposed")
        calls = [0]

        def counted(z):
            calls[0] += 1
            return f(z)
        z, _, info = get_solver(name)(counted, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **kw)
        fz = f(z).reshape(z.shape[0], -1)  # residual of the returned state (not counted as solver work)
        abs_diff, rel_diff = _residuals(fz, z.reshape(z.shape[0], -1))
        res = rel_diff if stop_mode == "rel" else abs_diff
        nsteps = info["nstep"].long() if "nstep" in info else torch.full_like(res, max_iter, dtype=torch.long)
        return SolverResult(z, nsteps, res, abs_diff, rel_diff, calls[0], res < tol)
    return run


SOLVERS: Dict[str, Callable[..., SolverResult]] = {
    "anderson": anderson_solver,
    "broyden": broyden_solver,
    "naive": naive_solver,
    "torchdeq_anderson": _torchdeq("anderson"),
    "torchdeq_broyden": _torchdeq("broyden"),
    "torchdeq_naive": _torchdeq("fixed_point_iter"),
}


def trim_result(res: SolverResult, rows: int) -> SolverResult:
    """The result of the first ``rows`` problems of a batch (padding rows dropped; ``nfe`` unchanged).

    Args:
        res: a solve's result on B >= rows problems.
        rows: how many leading problems to keep.

    Returns:
        SolverResult: ``res`` itself when it has ``rows`` rows.
    """
    if res.z.shape[0] == rows:
        return res
    snaps = None if res.snapshots is None else {k: (z[:rows], r[:rows]) for k, (z, r) in res.snapshots.items()}
    return SolverResult(res.z[:rows], res.nsteps[:rows], res.residual[:rows], res.abs_residual[:rows],
                        res.rel_residual[:rows], res.nfe, res.converged[:rows], snaps)


def register_solver(name: str, solver: Callable[..., SolverResult]) -> None:
    """Add a solver under ``name`` (same call signature as :func:`anderson_solver`)."""
    SOLVERS[name] = solver


def get_solver(name: str) -> Callable[..., SolverResult]:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def solve(name: str, f: FixedPointFn, z0: Tensor, max_iter: int, tol: float = 1e-3,
          stop_mode: str = "rel", **kwargs) -> SolverResult:
    """Solve z = f(z) from z0 with the named solver and a budget of max_iter evaluations."""
    return get_solver(name)(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, **kwargs)
