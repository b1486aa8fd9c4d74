"""Throughput of the MDEQ on this device: eager vs compiled, fp32 vs bf16.

Seeded random-init weights and images (speed only; certificates mean nothing here).  What is measured:
docs/internals.md, "scripts/bench_gpu.py".
"""
import time

import torch

from DEQ.acceleration import Engine, Runtime, static_rows
from DEQ.checks import check_choice
from DEQ.errors import ArgumentParser, UserError, cli_main
from DEQ.models import random_init_mdeq
from DEQ.utils import pick_device, set_threads


def build(cfg_path: str, device: torch.device, seed: int):
    """(model in eval mode, input shape (C, H, W)) of a config with seeded random weights."""
    return random_init_mdeq(cfg_path, device, seed, purpose="this benchmark times f")


def timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of one ``fn()`` call over ``reps`` calls after one untimed call (synchronised on
    CUDA); the median, not the mean, so that a busy neighbour's bursts on a shared machine do not count."""
    fn()
    times = []
    for _ in range(max(1, reps)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def flops_per_sample(model, x: torch.Tensor) -> float:
    """FLOPs of one evaluation of f per sample (eager fp32, counted by FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad():
        model._reset(x)
        inj = model.stem(x)
        z = torch.zeros(x.shape[0], model.state_dim([inj]), device=x.device)
        counter = FlopCounterMode(display=False)
        with counter:
            model.f_flat(z, inj)
    return counter.get_total_flops() / x.shape[0]


def certify_seconds(model, shape, device, n_images: int, N0: int, N: int, batch: int, K: int, srs: bool,
                    seed: int) -> float:
    """Seconds per image of MDEQ-30A (``srs`` False) or SRS-MDEQ-1A certification, after one warm-up image."""
    from SRS.settings import DEQSolve, SRSConfig
    from SRS.smooth import Smooth
    cfg = SRSConfig(step=DEQSolve("anderson", 1, 0.0), warmup=DEQSolve("anderson", 10, 0.0), conf_drop=K) if srs else None
    smooth = Smooth(model, model.num_classes, 0.5, standard=DEQSolve("anderson", 30, 0.0), srs=cfg)
    images = torch.rand((n_images + 1,) + shape, generator=torch.Generator().manual_seed(seed)).to(device)
    times = []
    for i in range(n_images + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        smooth.certify(images[i], N0, N, 0.001, batch, generator=torch.Generator(device=device).manual_seed(seed + i))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def measure(model, shape, device, runtime: Runtime, args) -> dict:
    """One row of the table: every figure of ``model`` evaluated under ``runtime``."""
    model.set_runtime(runtime)
    engine = model.engine or Engine(model.stem, model.f_flat, model.head_flat, runtime, device.type)
    x = torch.rand((args.batch,) + shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
    with torch.no_grad():
        t0 = time.perf_counter()
        model.solve(x, "anderson", 2, None, 0.0)  # compiles stem, f, head (first calls)
        first = time.perf_counter() - t0
        model._reset(x)
        inj = engine.inject(x)
        z = torch.rand(x.shape[0], model.state_dim([inj]), device=device) * 0.1
        f_s = timed(lambda: engine.f(z, inj), device, args.reps)
        solve1 = timed(lambda: model.solve(x, "anderson", 1, None, 0.0), device, args.reps)
        solve30 = timed(lambda: model.solve(x, "anderson", 30, None, 0.0), device, max(1, args.reps // 5))
    row = {"compile": "on" if runtime.compile else "off", "precision": runtime.precision,
           "first_call_s": first,
           "f_ms": 1e3 * f_s, "step_ms": 1e3 * (solve30 - solve1) / 29}
    for label, srs in (("MDEQ-30A", False), ("SRS-1A", True)):
        row[label] = certify_seconds(model, shape, device, args.images, args.N0, args.N, args.batch, args.K, srs,
                                     args.seed) if label in args.methods else None
    row["compile_s"] = engine.compile_seconds if runtime.compile else None  # every row count compiled so far
    model.set_runtime(None)
    return row


def report(cfg_path: str, rows, gflop: float, args, device) -> None:
    """Print the markdown table of one config."""
    peak = args.peak_tflops
    print(f"\n{cfg_path}: random init (seed {args.seed}), device {device}, batch {args.batch}, N0 {args.N0}, "
          f"N {args.N}, K {args.K}, {args.images} timed image(s); f = {gflop:.4f} GFLOP per sample"
          + (f", peak {peak:g} TFLOP/s" if peak else ""))
    print("| compile | precision | compile s | f ms | step ms | MDEQ-30A s/image | SRS-1A s/image | f TFLOP/s | "
          "f % peak | MDEQ-30A % peak |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    evals_30a = (args.N0 + args.N) * 30
    for r in rows:
        tflops = gflop * args.batch / r["f_ms"]  # GFLOP/ms = TFLOP/s
        cert = gflop * 1e-3 * evals_30a / r["MDEQ-30A"] if r["MDEQ-30A"] else None
        cells = [r["compile"], r["precision"], _fmt(r["compile_s"], 1), _fmt(r["f_ms"], 2), _fmt(r["step_ms"], 2),
                 _fmt(r["MDEQ-30A"], 3), _fmt(r["SRS-1A"], 3), f"{tflops:.3g}",
                 _fmt(100 * tflops / peak if peak else None, 1), _fmt(100 * cert / peak if peak and cert else None, 1)]
        print("| " + " | ".join(cells) + " |")


def _fmt(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@cli_main
def main(argv=None):
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", nargs="+", default=["experiments/cifar/cls_mdeq_LARGE.yaml"], help="MDEQ configs")
    p.add_argument("--batch", type=int, default=400, help="rows per f evaluation / certification mini-batch")
    p.add_argument("--N0", type=int, default=100)
    p.add_argument("--N", type=int, default=10000, help="estimation samples (lower it on the CPU)")
    p.add_argument("--K", type=int, default=400, help="paired standard solves of SRS-1A (the paper's conf_drop)")
    p.add_argument("--images", type=int, default=1, help="timed images per certification (after one warm-up)")
    p.add_argument("--reps", type=int, default=20, help="repetitions of the f / solve timings")
    p.add_argument("--compile", nargs="+", default=["off", "on"], help="runtimes to time: off and/or on")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], help="fp32 and/or bf16")
    p.add_argument("--methods", nargs="*", default=["MDEQ-30A", "SRS-1A"], help="certifications to time (none: skip)")
    p.add_argument("--peak-tflops", dest="peak_tflops", type=float, default=None,
                   help="the device's dense peak in TFLOP/s for the %% columns (H100 SXM: 494.7 TF32, 989.4 bf16)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for v in args.compile:
        check_choice("--compile", v, ("off", "on"))
    for v in args.precision:
        check_choice("--precision", v, ("fp32", "bf16"))
    set_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for cfg_path in args.cfg:
        model, shape = build(cfg_path, device, args.seed)
        x = torch.rand((args.batch,) + shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
        gflop = flops_per_sample(model, x) / 1e9
        rows = []
        for comp in args.compile:
            for prec in args.precision:
                on = comp == "on"
                runtime = Runtime(compile=on, precision=prec, cuda_graphs=on and device.type == "cuda",
                                  pad_rows=static_rows(args.batch, args.N0, args.N) if on else None)
                rows.append(measure(model, shape, device, runtime, args))
                r = rows[-1]
                print(f"{cfg_path} compile {comp} {prec}: f {r['f_ms']:.2f} ms, step {r['step_ms']:.2f} ms, "
                      f"compile {_fmt(r['compile_s'], 1)} s, MDEQ-30A {_fmt(r['MDEQ-30A'], 3)} s/image, "
                      f"SRS-1A {_fmt(r['SRS-1A'], 3)} s/image", flush=True)
        report(cfg_path, rows, gflop, args, device)


if __name__ == "__main__":
    main()
