"""Fixed-point solvers: convergence, warm starts, budgets and per-sample statistics."""
import pytest
import torch

from DEQ.solvers import SOLVERS, get_solver, solve

OURS = ["naive", "anderson", "broyden"]


def contractive_map(bsz=5, dim=40, rho=0.8, seed=0):
    """f(z) = tanh(W z + u) with ||W||_2 = rho < 1: a contraction with a unique fixed point."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    W = rho * W / torch.linalg.matrix_norm(W, ord=2)
    u = torch.randn(bsz, dim, generator=g, dtype=torch.float64)
    return lambda z: torch.tanh(z @ W.T + u), torch.zeros(bsz, dim, dtype=torch.float64)


def reference_fixed_point(f, z0, iters=2000):
    z = z0
    for _ in range(iters):
        z = f(z)
    return z


@pytest.mark.parametrize("name", OURS)
def test_solvers_reach_the_fixed_point(name):
    f, z0 = contractive_map()
    z_star = reference_fixed_point(f, z0)
    res = solve(name, f, z0, max_iter=100, tol=1e-10, stop_mode="abs")
    assert torch.allclose(res.z, z_star, atol=1e-8)
    assert (res.abs_residual < 1e-9).all() and res.converged.all()
    assert res.nfe <= 100 and (res.nsteps <= res.nfe).all()


def test_acceleration_beats_plain_iteration():
    """z = A z + u with eigenvalues of A up to 0.97: plain iteration is slow, quasi-Newton is not."""
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(torch.linspace(0.3, 0.97, 30, dtype=torch.float64)) @ Q.T
    # DEQ-sized states (|z| ~ 1e3): Anderson's absolute ridge lam = 1e-4 (as in MDEQ and torchdeq)
    # stalls it once |f(z) - z|^2 falls near lam, so tiny states would make this comparison meaningless.
    u = 100 * torch.randn(4, 30, generator=g, dtype=torch.float64)
    f = lambda z: z @ A.T + u
    steps = {n: solve(n, f, torch.zeros_like(u), max_iter=1000, tol=1e-6, stop_mode="rel").nfe for n in OURS}
    assert steps["naive"] > 300
    assert steps["anderson"] < steps["naive"] * 0.7 and steps["broyden"] < steps["naive"] / 5


@pytest.mark.parametrize("name", OURS)
def test_warm_start_at_the_solution_returns_at_once(name):
    f, z0 = contractive_map()
    z_star = reference_fixed_point(f, z0)
    res = solve(name, f, z_star, max_iter=30, tol=1e-6, stop_mode="rel")
    assert res.nfe == 1
    assert (res.nsteps == 1).all()
    assert torch.allclose(res.z, z_star, atol=1e-10)


@pytest.mark.parametrize("name", OURS)
def test_budget_is_counted_in_evaluations(name):
    f, z0 = contractive_map(rho=0.99)
    calls = []

    def counted(z):
        calls.append(1)
        return f(z)
    res = solve(name, counted, z0, max_iter=4, tol=0.0)
    assert res.nfe == len(calls) == 4
    assert (res.nsteps == 4).all() and not res.converged.any()


def test_one_anderson_step_is_one_naive_step():
    f, z0 = contractive_map()
    z1 = solve("anderson", f, z0 + 0.3, max_iter=1).z
    assert torch.allclose(z1, f(z0 + 0.3))


def test_per_sample_statistics_and_nan_safety():
    f, z0 = contractive_map(bsz=3)

    def bad(z):  # sample 1 diverges to NaN from the second evaluation on
        out = f(z)
        if bad.calls > 0:
            out[1] = float("nan")
        bad.calls += 1
        return out
    bad.calls = 0
    res = solve("anderson", bad, z0, max_iter=10, tol=1e-12)
    assert torch.isfinite(res.z[0]).all() and torch.isfinite(res.z[2]).all()
    assert torch.isfinite(res.z[1]).all(), "the lowest-residual (finite) iterate is returned, never a NaN one"
    assert res.residual[0] < res.residual[1]


def test_unknown_solver_and_bad_budget():
    f, z0 = contractive_map()
    with pytest.raises(ValueError, match="unknown solver"):
        get_solver("newton")
    with pytest.raises(ValueError, match="at least 1"):
        solve("anderson", f, z0, max_iter=0)


@pytest.mark.parametrize("name", ["torchdeq_anderson", "torchdeq_broyden", "torchdeq_naive"])
def test_torchdeq_solvers_agree_with_ours(name):
    f, z0 = contractive_map()
    z_star = reference_fixed_point(f, z0)
    res = SOLVERS[name](lambda z: f(z.double()).to(z.dtype), z0.float(), max_iter=80, tol=1e-6, stop_mode="abs")
    assert torch.allclose(res.z.double(), z_star, atol=1e-4)
    assert res.nfe >= 1


@pytest.mark.parametrize("name", OURS)
def test_half_precision_states_are_solved_in_float32(name):
    """Under mixed precision f returns half tensors; the solvers keep their state in float32."""
    f, z0 = contractive_map()
    res = solve(name, lambda z: f(z.double()).to(torch.bfloat16), z0.to(torch.bfloat16), max_iter=20, tol=1e-2)
    assert res.z.dtype == torch.float32 and torch.isfinite(res.z).all()


LADDER = (1, 2, 3, 5, 8, 12, 20, 30)


@pytest.mark.parametrize("name", OURS)
@pytest.mark.parametrize("tol", [0.0, 1e-4])
def test_ladder_rungs_equal_separate_budget_k_solves(name, tol):
    """One budget-30 solve recording the ladder gives, bit for bit, what each budget-k solve returns
    (with a tolerance too: budgets past the early stop return the stopped answer)."""
    f, z0 = contractive_map(rho=0.95, dim=60)
    full = solve(name, f, z0, max_iter=30, tol=tol, stop_mode="rel", record=LADDER)
    assert sorted(full.snapshots) == list(LADDER)
    for k in LADDER:
        alone = solve(name, f, z0, max_iter=k, tol=tol, stop_mode="rel")
        z, res = full.snapshots[k]
        assert torch.equal(z, alone.z), (name, k)
        assert torch.equal(res, alone.residual), (name, k)
    assert torch.equal(full.snapshots[30][0], full.z)


def test_ladder_refuses_budgets_outside_the_solve():
    f, z0 = contractive_map()
    with pytest.raises(ValueError, match="must lie in"):
        solve("anderson", f, z0, max_iter=5, record=(3, 8))
    with pytest.raises(ValueError, match="cannot record"):
        solve("torchdeq_anderson", f, z0, max_iter=5, record=(3,))


def test_mdeq_ladder_logits_equal_separate_solves(tiny_opts):
    """The MDEQ's rung logits (head applied at the recorded answers) equal budget-k solves' logits."""
    from DEQ.config import load_config
    from DEQ.models.mdeq import build_model
    from conftest import DIGITS_CFG
    torch.manual_seed(0)
    model = build_model(load_config(DIGITS_CFG, tiny_opts)).eval()
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    for solver in OURS:
        out = model.solve(x, solver, 12, None, 0.0, rungs=(1, 3, 5, 12))
        for k in (1, 3, 5, 12):
            alone = model.solve(x, solver, k, None, 0.0)
            assert torch.equal(out.rungs[k][0], alone.logits), (solver, k)
