"""Gradients through a fixed point by implicit differentiation.

At z* = f(z*, theta), the implicit function theorem gives
dL/dtheta = (dL/dz*) (I - J)^{-1} df/dtheta with J = df/dz at z*.  The row vector
g = (dL/dz*) (I - J)^{-1} solves the adjoint fixed point g = g J + dL/dz*, which a
backward hook on new_z = f(z*) computes with a fixed-point solver (MDEQ's
recipe), so the ordinary backward through the single step new_z = f(z*) then
yields the implicit gradient.
"""
from __future__ import annotations

import torch
import torch.autograd as autograd

from .solvers import solve


def attach_implicit_backward(new_z: torch.Tensor, z_star: torch.Tensor, solver: str, max_iter: int,
                             tol: float = 1e-3, stop_mode: str = "rel") -> torch.Tensor:
    """Register the adjoint solve on ``new_z = f(z_star)`` (z_star a leaf requiring grad)."""
    handle = []

    def backward_hook(grad):
        handle.pop().remove()  # the adjoint solve below backpropagates through new_z again
        res = solve(solver, lambda y: autograd.grad(new_z, z_star, y, retain_graph=True)[0] + grad,
                    torch.zeros_like(grad), max_iter, tol=tol, stop_mode=stop_mode)
        return res.z
    handle.append(new_z.register_hook(backward_hook))
    return new_z
