"""Multiscale deep equilibrium model (MDEQ) for classification.

Parameter names are those of the MDEQ code's ``MDEQClsNet``: its (and the SRS reference's) state_dicts load with
``strict=True`` and give the same logits; the input normalisation (first module) has non-persistent buffers.
``model(x)``: the standard model f_D's logits; ``model.solve(...)``: :class:`DEQOutput` (logits, flat fixed
point, statistics; for SRS warm starts); ``model.forward_train(...)``: logits and Jacobian loss with gradients
through the fixed point (implicit or phantom) or the unrolled f (pretraining).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
from torchdeq.dropout import VariationalDropout2d as _TorchdeqVariationalDropout2d
from torchdeq.loss import jac_reg
from torchdeq.norm import apply_norm, reset_norm

from ..acceleration import Engine, Runtime, pad_to
from ..interface import DEQOutput
from ..data import dataset_info
from ..implicit import attach_implicit_backward
from ..solvers import SolverResult, solve, trim_result

BN_MOMENTUM = 0.1


def conv3x3(in_planes, out_planes, stride=1, bias=False):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv5x5(in_planes, out_planes, stride=1, bias=False):
    return nn.Conv2d(in_planes, out_planes, kernel_size=5, stride=stride, padding=2, bias=bias)


class VariationalDropout2d(_TorchdeqVariationalDropout2d):
    """torchdeq's per-(sample, channel) dropout, mask fixed over solver steps, built on the input's device and
    dtype (torchdeq builds it on the CPU, which fails for CUDA inputs)."""

    def __init__(self, dropout=0.0):
        super().__init__(dropout, token_first=False)

    def reset_mask(self, x):
        B, D = x.shape[:2]
        keep = torch.empty(B, D, 1, 1, device=x.device, dtype=x.dtype).bernoulli_(1 - self.dropout)
        self.mask = keep / (1 - self.dropout)


class NormalizeLayer(nn.Module):
    """Standardise channels inside the model, so noise is added in [0,1] pixel space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean) / self.std


class BasicBlock(nn.Module):
    """Residual block of f_theta: conv(c -> E*c), GN, ReLU, conv(E*c -> c), dropout, + injection, GN, + x, ReLU, GN."""

    def __init__(self, planes, expansion, groups, affine, n_big_kernels=0, dropout=0.0):
        super().__init__()
        inner = int(expansion * planes)
        self.conv1 = (conv5x5 if n_big_kernels >= 1 else conv3x3)(planes, inner)
        self.gn1 = nn.GroupNorm(groups, inner, affine=affine)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = (conv5x5 if n_big_kernels >= 2 else conv3x3)(inner, planes)
        self.gn2 = nn.GroupNorm(groups, planes, affine=affine)
        self.gn3 = nn.GroupNorm(groups, planes, affine=affine)
        self.relu3 = nn.ReLU(inplace=True)
        self.drop = VariationalDropout2d(dropout)

    def forward(self, x, injection=None):
        out = self.relu(self.gn1(self.conv1(x)))
        out = self.drop(self.conv2(out))
        if injection is not None:
            out = out + injection
        out = self.gn2(out) + x
        return self.gn3(self.relu3(out))


class BranchNet(nn.Module):
    def __init__(self, blocks: nn.ModuleList):
        super().__init__()
        self.blocks = blocks

    def forward(self, x, injection=None):
        y = self.blocks[0](x, injection)
        for block in self.blocks[1:]:
            y = block(y)
        return y


class DownsampleModule(nn.Module):
    """Branch j -> coarser branch i: (i - j) strided 3x3 convs."""

    def __init__(self, num_channels, in_res, out_res, groups, affine):
        super().__init__()
        inp, out = num_channels[in_res], num_channels[out_res]
        level_diff = out_res - in_res
        convs = []
        for k in range(level_diff):
            last = k == level_diff - 1
            mid = out if last else inp
            parts = [("conv", nn.Conv2d(inp, mid, kernel_size=3, stride=2, padding=1, bias=False)),
                     ("gnorm", nn.GroupNorm(groups, mid, affine=affine))]
            if not last:
                parts.append(("relu", nn.ReLU(inplace=True)))
            convs.append(nn.Sequential(OrderedDict(parts)))
        self.net = nn.Sequential(*convs)

    def forward(self, x):
        return self.net(x)


class UpsampleModule(nn.Module):
    """Branch j -> finer branch i: 1x1 conv, GN, nearest upsampling."""

    def __init__(self, num_channels, in_res, out_res, groups, affine):
        super().__init__()
        self.net = nn.Sequential(OrderedDict([
            ("conv", nn.Conv2d(num_channels[in_res], num_channels[out_res], kernel_size=1, bias=False)),
            ("gnorm", nn.GroupNorm(groups, num_channels[out_res], affine=affine)),
            ("upsample", nn.Upsample(scale_factor=2 ** (in_res - out_res), mode="nearest"))]))

    def forward(self, x):
        return self.net(x)


class MDEQModule(nn.Module):
    """f_theta: per-branch residual blocks, then multiscale fusion (sum), then ReLU-1x1conv-GN per branch."""

    def __init__(self, num_channels, num_blocks, big_kernels, expansion, groups,
                 block_affine, fuse_affine, post_affine, dropout):
        super().__init__()
        self.num_branches = nb = len(num_channels)
        self.branches = nn.ModuleList([
            BranchNet(nn.ModuleList([BasicBlock(num_channels[i], expansion, groups, block_affine,
                                                big_kernels[i], dropout) for _ in range(num_blocks[i])]))
            for i in range(nb)])
        if nb > 1:
            self.fuse_layers = nn.ModuleList([
                nn.ModuleList([None if i == j else
                               (UpsampleModule if j > i else DownsampleModule)(num_channels, j, i, groups, fuse_affine)
                               for j in range(nb)])
                for i in range(nb)])
        else:
            self.fuse_layers = None
        self.post_fuse_layers = nn.ModuleList([nn.Sequential(OrderedDict([
            ("relu", nn.ReLU(False)),
            ("conv", nn.Conv2d(c, c, kernel_size=1, bias=False)),
            ("gnorm", nn.GroupNorm(max(groups // 2, 1), c, affine=post_affine))])) for c in num_channels])

    def wnorm_modules(self) -> List[nn.Module]:
        """The convs MDEQ weight-normalises: block conv1/conv2 and the post-fuse 1x1 convs."""
        mods = [b.conv1 for br in self.branches for b in br.blocks] + [b.conv2 for br in self.branches for b in br.blocks]
        return mods + [p.conv for p in self.post_fuse_layers]

    def forward(self, x: List[torch.Tensor], injection: List[Optional[torch.Tensor]]):
        blocks = [self.branches[i](x[i], injection[i]) for i in range(self.num_branches)]
        if self.num_branches == 1:
            return blocks  # as in MDEQ: a single branch skips fusion and the post-fuse layer
        out = []
        for i in range(self.num_branches):
            y = blocks[i]
            for j in range(self.num_branches):
                if j != i:
                    y = y + self.fuse_layers[i][j](blocks[j])
            out.append(self.post_fuse_layers[i](y))
        return out


class Bottleneck(nn.Module):
    """Head block (not part of f): 1x1, 3x3, 1x1 (x4 channels) with affine-free BN."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM, affine=False)
        self.conv2 = conv3x3(planes, planes, stride=stride)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM, affine=False)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=BN_MOMENTUM, affine=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


@dataclass
class TrainOutput:
    logits: torch.Tensor
    jac_loss: torch.Tensor
    result: Optional[SolverResult]


class MDEQClsNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        m, fs, deq = cfg.MODEL, cfg.MODEL.EXTRA.FULL_STAGE, cfg.DEQ
        info = dataset_info(cfg.DATASET.DATASET)
        self.num_classes = m.NUM_CLASSES
        self.num_branches = fs.NUM_BRANCHES
        self.num_channels = list(fs.NUM_CHANNELS)
        self.num_layers = m.NUM_LAYERS
        self.pretrain_steps = cfg.TRAIN.PRETRAIN_STEPS
        self.f_solver, self.b_solver = deq.F_SOLVER, deq.B_SOLVER
        self.f_thres, self.b_thres = deq.F_THRES, deq.B_THRES
        self.f_tol, self.b_tol = deq.F_TOL, deq.B_TOL
        self.stop_mode, self.grad_mode = deq.STOP_MODE, deq.GRAD
        self.engine = None  # set_runtime: compiled / bf16 evaluation of solve (DEQ.acceleration)
        self.in_channels = info.in_channels
        init = self.num_channels[0]
        ds = m.DOWNSAMPLE_TIMES

        self.norm_layer = NormalizeLayer(info.mean, info.std)
        self.downsample = nn.Sequential(
            conv3x3(info.in_channels, init, stride=2 if ds >= 1 else 1),
            nn.BatchNorm2d(init, momentum=BN_MOMENTUM, affine=True), nn.ReLU(inplace=True),
            conv3x3(init, init, stride=2 if ds >= 2 else 1),
            nn.BatchNorm2d(init, momentum=BN_MOMENTUM, affine=True), nn.ReLU(inplace=True))
        for i in range(3, ds + 1):
            self.downsample.add_module(f"DS{i}", conv3x3(init, init, stride=2))
            self.downsample.add_module(f"DS{i}-BN", nn.BatchNorm2d(init, momentum=BN_MOMENTUM, affine=True))
            self.downsample.add_module(f"DS{i}-RELU", nn.ReLU(inplace=True))
        if ds == 0 and self.num_branches <= 2:
            self.stage0 = None  # the stem itself is the injection transform, as in MDEQ
        else:
            self.stage0 = nn.Sequential(nn.Conv2d(init, init, kernel_size=1, bias=False),
                                        nn.BatchNorm2d(init, momentum=BN_MOMENTUM, affine=True),
                                        nn.ReLU(inplace=True))
        self.fullstage = MDEQModule(self.num_channels, fs.NUM_BLOCKS, fs.BIG_KERNELS, m.EXPANSION_FACTOR,
                                    m.NUM_GROUPS, m.BLOCK_GN_AFFINE, m.FUSE_GN_AFFINE, m.POST_GN_AFFINE, m.DROPOUT)
        self.head_channels = list(fs.HEAD_CHANNELS)
        self.final_chansize = fs.FINAL_CHANSIZE
        self.incre_modules, self.downsamp_modules, self.final_layer = self._make_head()
        self.classifier = nn.Linear(self.final_chansize, self.num_classes)
        if m.INIT_WEIGHTS:  # False: PyTorch's default init of every layer
            self._init_weights()
        if m.WNORM:
            for conv in self.fullstage.wnorm_modules():
                apply_norm(conv, "weight_norm")

    # ----------------------------------------------------------------- building
    def _make_head(self):
        hc = self.head_channels
        incre = nn.ModuleList()
        for c, h in zip(self.num_channels, hc):
            down = nn.Sequential(nn.Conv2d(c, h * Bottleneck.expansion, kernel_size=1, bias=False),
                                 nn.BatchNorm2d(h * Bottleneck.expansion, momentum=BN_MOMENTUM)) \
                if c != h * Bottleneck.expansion else None
            incre.append(nn.Sequential(Bottleneck(c, h, 1, down)))
        downs = nn.ModuleList([nn.Sequential(
            conv3x3(hc[i] * Bottleneck.expansion, hc[i + 1] * Bottleneck.expansion, stride=2, bias=True),
            nn.BatchNorm2d(hc[i + 1] * Bottleneck.expansion, momentum=BN_MOMENTUM), nn.ReLU(inplace=True))
            for i in range(len(hc) - 1)])
        final = nn.Sequential(nn.Conv2d(hc[-1] * Bottleneck.expansion, self.final_chansize, kernel_size=1),
                              nn.BatchNorm2d(self.final_chansize, momentum=BN_MOMENTUM), nn.ReLU(inplace=True))
        return incre, downs, final

    def _init_weights(self):
        # MDEQ's init: N(0, 0.01) convs, unit BN.  MDEQ applies weight norm first, so its
        # normalised convs keep PyTorch's default init; we init before weight norm and skip them.
        wn = set(map(id, self.fullstage.wnorm_modules()))
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d) and id(mod) not in wn:
                mod.weight.data.normal_(0, 0.01)
                if mod.bias is not None:
                    mod.bias.data.normal_(0, 0.01)
            elif isinstance(mod, nn.BatchNorm2d) and mod.weight is not None:
                nn.init.constant_(mod.weight, 1)
                nn.init.constant_(mod.bias, 0)

    # ------------------------------------------------------------------ pieces
    def inject(self, x: torch.Tensor):
        """Normalise, run the stem; injection into the highest-resolution branch only."""
        x = self.downsample(self.norm_layer(x))
        inj = self.stage0(x) if self.stage0 is not None else x
        return [inj] + [None] * (self.num_branches - 1)

    def state_shapes(self, injection) -> List[torch.Size]:
        bsz, _, H, W = injection[0].shape
        return [torch.Size((self.num_channels[i], H // 2 ** i, W // 2 ** i)) for i in range(self.num_branches)]

    def state_dim(self, injection) -> int:
        return sum(s.numel() for s in self.state_shapes(injection))

    def _reset(self, bsz_like: torch.Tensor):
        """Recompute weight-normalised weights (they depend on g, v) and draw fresh dropout masks."""
        reset_norm(self.fullstage)
        if self.training:
            for br, c in zip(self.fullstage.branches, self.num_channels):
                for b in br.blocks:
                    if b.drop.dropout > 0:
                        b.drop.reset_mask(bsz_like.new_empty(bsz_like.shape[0], c, 1, 1))

    def make_func(self, injection):
        """(f as a function of the flat state z alone, the per-branch state shapes) for ``injection``."""
        shapes = self.state_shapes(injection)

        def func(z: torch.Tensor) -> torch.Tensor:
            return self.f_flat(z.reshape(z.shape[0], -1), injection[0])
        return func, shapes

    def f_flat(self, z: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        """f_theta on the flat (B, D) state ``z`` given the (B, C, H, W) ``injection`` (``inject(x)[0]``):
        the function ``torch.compile`` sees (built once, no closure)."""
        shapes = self.state_shapes([injection])
        bsz = z.shape[0]
        zs = [part.view(bsz, *s) for part, s in zip(torch.split(z, [s.numel() for s in shapes], dim=1), shapes)]
        inj = [injection] + [None] * (self.num_branches - 1)
        return torch.cat([o.reshape(bsz, -1) for o in self.fullstage(zs, inj)], dim=1)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The injection tensor of ``x`` (``inject(x)[0]``)."""
        return self.inject(x)[0]

    def head(self, z: torch.Tensor, shapes) -> torch.Tensor:
        bsz = z.shape[0]
        ys = [p.view(bsz, *s) for p, s in zip(torch.split(z, [s.numel() for s in shapes], dim=1), shapes)]
        y = self.incre_modules[0](ys[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](ys[i + 1]) + down(y)
        y = self.final_layer(y)
        return self.classifier(y.flatten(2).mean(2))

    def head_flat(self, z: torch.Tensor, injection: torch.Tensor) -> torch.Tensor:
        """:meth:`head` with the state shapes taken from ``injection`` (the compiled head)."""
        return self.head(z, self.state_shapes([injection]))

    # --------------------------------------------------------------- inference
    def set_runtime(self, runtime: Optional[Runtime], train: bool = False) -> None:
        """Evaluate stem, f and head of later :meth:`solve` calls under ``runtime`` (``DEQ.acceleration``; None or eager
        fp32: the plain path).  ``train``: a compiling runtime also evaluates :meth:`forward_train`'s no-gradient
        solve through the compiled ``f_flat`` (``Engine.train_f``); False leaves ``forward_train`` untouched."""
        if runtime is None or runtime.plain:
            self.engine = None
            return
        device = next(self.parameters()).device
        self.engine = Engine(self.stem, self.f_flat, self.head_flat, runtime, device.type, train=train)

    def solve(self, x: torch.Tensor, solver: Optional[str] = None, max_iter: Optional[int] = None,
              z0: Optional[torch.Tensor] = None, tol: Optional[float] = None,
              rungs: Sequence[int] = ()) -> DEQOutput:
        """Solve for the fixed point (no gradient) from z0 (zeros if None) and classify.

        ``rungs``: budgets k <= max_iter whose answers to keep (``DEQOutput.rungs``): the head applied to
        what a budget-k solve from the same start returns, from this one solve (``DEQ.solvers``)."""
        self._reset(x)
        solver, max_iter = solver or self.f_solver, max_iter or self.f_thres
        tol = self.f_tol if tol is None else tol
        with torch.no_grad():
            if getattr(self, "engine", None) is not None:
                return self._solve_engine(x, solver, max_iter, z0, tol, rungs)
            injection = self.inject(x)
            func, shapes = self.make_func(injection)
            if z0 is None:
                z0 = x.new_zeros(x.shape[0], sum(s.numel() for s in shapes))
            res = solve(solver, func, z0, max_iter, tol=tol, stop_mode=self.stop_mode, record=rungs)
            logits = self.head(res.z, shapes)
            out = DEQOutput(logits, res.z, res)
            self._rung_logits(out, res, logits, max_iter, lambda z: self.head(z, shapes))
            return out

    @staticmethod
    def _rung_logits(out: DEQOutput, res, logits, max_iter: int, head, rows: Optional[int] = None) -> None:
        """Fill ``out.rungs`` (k -> (logits, residual)) from the recorded budgets, and ``out.rung_seconds``
        with the time the heads of the lower rungs took (the work a plain solve does not do)."""
        if res.snapshots is None:
            return
        t0 = time.perf_counter()
        rungs = {}
        for k, (z, r) in res.snapshots.items():
            rungs[k] = ((logits if k == max_iter else head(z))[:rows].clone(), r[:rows])
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        out.rungs, out.rung_seconds = rungs, time.perf_counter() - t0

    def _solve_engine(self, x: torch.Tensor, solver: str, max_iter: int, z0: Optional[torch.Tensor],
                      tol: float, rungs: Sequence[int] = ()) -> DEQOutput:
        """:meth:`solve` through the runtime's engine.  Under ``--compile auto`` the first call is also solved
        eagerly and the predictions compared (``CompileGuard.check``): on disagreement the engine falls back
        to eager and this call returns the eager solve."""
        engine = self.engine
        out = self._solve_with(engine, x, solver, max_iter, z0, tol, rungs)
        eager = []

        def eager_logits():
            eager.append(self._solve_with(engine.eager_twin(), x, solver, max_iter, z0, tol, rungs))
            return eager[0].logits
        return out if engine.guard.check("eval", out.logits, eager_logits) else eager[0]

    def _solve_with(self, engine: Engine, x: torch.Tensor, solver: str, max_iter: int, z0: Optional[torch.Tensor],
                    tol: float, rungs: Sequence[int] = ()) -> DEQOutput:
        """:meth:`solve` through ``engine``: rows padded to the static size, state and solver fp32,
        stem / f / head as the runtime says, padded rows dropped from every output."""
        rows = x.shape[0]
        pad = engine.runtime.rows_for(rows)
        xp = pad_to(x, pad)
        injection = engine.inject(xp)
        if z0 is None:
            z0 = xp.new_zeros(xp.shape[0], self.state_dim([injection]), dtype=torch.float32)
        else:
            z0 = pad_to(z0.float(), pad)
        res = solve(solver, lambda z: engine.f(z, injection), z0, max_iter, tol=tol, stop_mode=self.stop_mode,
                    record=rungs)
        logits = engine.head(res.z, injection)
        out = DEQOutput(logits[:rows], None, None)
        self._rung_logits(out, res, logits, max_iter, lambda z: engine.head(z, injection), rows)
        res = trim_result(res, rows)
        out.z, out.result = res.z, res
        return out

    def forward(self, x: torch.Tensor, solver: Optional[str] = None, max_iter: Optional[int] = None,
                z0: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.training:
            return self.forward_train(x).logits
        return self.solve(x, solver, max_iter, z0).logits

    # ---------------------------------------------------------------- training
    def forward_train(self, x: torch.Tensor, train_step: int = -1, compute_jac_loss: bool = False,
                      f_thres: Optional[int] = None) -> TrainOutput:
        """Training forward.  train_step < PRETRAIN_STEPS (and >= 0): unroll f NUM_LAYERS times.

        With a training runtime (``set_runtime(runtime, train=True)``) only the no-gradient fixed-point solve runs
        through the compiled ``f_flat``, under the same autocast; everything with a gradient stays eager
        (docs/certification.md, "Compiled and bf16 evaluation")."""
        self._reset(x)
        injection = self.inject(x)
        func, shapes = self.make_func(injection)
        z0 = x.new_zeros(x.shape[0], sum(s.numel() for s in shapes))
        jac_loss = x.new_zeros(())
        result = None
        if 0 <= train_step < self.pretrain_steps:
            z = z0
            for _ in range(self.num_layers):
                z = func(z)
            new_z = z
            if compute_jac_loss:
                z2 = z.detach().requires_grad_()
                jac_loss = jac_reg(func(z2), z2, vecs=1)
        else:
            train_f = self.engine.train_f if getattr(self, "engine", None) is not None else None
            with torch.no_grad():
                if train_f is not None:
                    inj = injection[0].detach()
                    fn = lambda z: train_f(z, inj)  # noqa: E731
                else:
                    fn = func
                result = solve(self.f_solver, fn, z0, f_thres or self.f_thres, tol=self.f_tol, stop_mode=self.stop_mode)
                if train_f is not None:
                    result = self._check_train_solve(result, func, z0, shapes, f_thres)
            z_star = result.z.detach().requires_grad_()
            new_z = func(z_star)
            if compute_jac_loss:
                jac_loss = jac_reg(new_z, z_star, vecs=1)
            if self.grad_mode == "implicit" and torch.is_grad_enabled():
                new_z = attach_implicit_backward(new_z, z_star, self.b_solver, self.b_thres, self.b_tol, self.stop_mode)
        return TrainOutput(self.head(new_z, shapes), jac_loss, result)

    def _check_train_solve(self, result, func, z0: torch.Tensor, shapes, f_thres: Optional[int]):
        """The training solve's agreement check (``--compile auto``, once): compiled vs eager fixed point (same dropout
        masks) compared by the eval-mode head's predictions; returns the eager solve after a disagreement."""
        guard = self.engine.guard
        if "train" not in guard.pending:
            return result
        eager = solve(self.f_solver, func, z0, f_thres or self.f_thres, tol=self.f_tol, stop_mode=self.stop_mode)
        modes = [(m, m.training) for m in self.modules()]
        try:
            self.eval()
            compiled_logits, eager_logits = self.head(result.z, shapes), self.head(eager.z, shapes)
        finally:
            for m, training in modes:
                m.training = training
        return result if guard.check("train", compiled_logits, lambda: eager_logits) else eager



def build_model(cfg) -> torch.nn.Module:
    """The model registry's builder (``DEQ.models.build_model``) for a validated ``cfg``, kept importable here."""
    from . import build_model as registry_build
    return registry_build(cfg)
