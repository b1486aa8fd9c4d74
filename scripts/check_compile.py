"""Compiled vs eager on seeded random-init MDEQs: do ``--compile auto``'s compiled predictions equal eager ones?

    python scripts/check_compile.py --cfg experiments/cifar/cls_mdeq_SMALL.yaml --precision fp32 bf16   # a GPU
    python scripts/check_compile.py --cfg experiments/digits/cls_mdeq_digits.yaml --device cpu --compile on

Per config and precision: a batch of seeded uniform-noise images of the config's size (no data set needed)
is solved eagerly and through the runtime ``--compile`` resolves to on the device (auto: CUDA graphs on a
GPU, with the fallback and its first-batch check; ``DEQ.acceleration.compiled_vs_eager``), and the line
printed gives the rows whose predictions differ (ties aside), the largest logit difference and whether
the model fell back to eager.  Exit status 1 when any row differs or a model fell back, else 0.
"""
import torch

from DEQ.acceleration import compiled_vs_eager, resolve_runtime
from DEQ.checks import check_choice
from DEQ.errors import ArgumentParser, UserError, cli_main
from DEQ.models import random_init_mdeq
from DEQ.utils import pick_device, set_threads


@cli_main
def main(argv=None):
    p = ArgumentParser(prog="check_compile.py", description=__doc__.splitlines()[0])
    p.add_argument("--cfg", nargs="+", default=["experiments/cifar/cls_mdeq_SMALL.yaml"], help="MDEQ configs")
    p.add_argument("--precision", nargs="+", default=["fp32"], help="fp32 and/or bf16")
    p.add_argument("--compile", default="auto", help="auto (compiles on CUDA, with the fallback) or on")
    p.add_argument("--batch", type=int, default=200, help="images per solve")
    p.add_argument("--f_thresh", type=int, default=30, help="Anderson evaluations per solve (tolerance 0)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_choice("--compile", args.compile, ("auto", "on"))
    for v in args.precision:
        check_choice("--precision", v, ("fp32", "bf16"))
    set_threads(args.threads)
    device = pick_device(args.device)
    bad = 0
    for cfg_path in args.cfg:
        model, shape = random_init_mdeq(cfg_path, device, args.seed, purpose="pass an MDEQ config")
        x = torch.rand((args.batch,) + shape, generator=torch.Generator().manual_seed(args.seed)).to(device)
        for precision in args.precision:
            runtime = resolve_runtime(args.compile, precision, device, pad_rows=args.batch)
            if not runtime.compile:
                raise UserError(f"--compile {args.compile} compiles nothing on {device}: pass --compile on")
            r = compiled_vs_eager(model, x, runtime, "anderson", args.f_thresh)
            ok = not r["disagreeing"] and not r["fell_back"]
            bad += not ok
            print(f"{cfg_path} {precision} compile={runtime.describe()} on {device}: {r['disagreeing']} of {r['rows']} "
                  f"rows predict differently (argmax equal on {r['argmax_equal']}), max |logit diff| "
                  f"{r['max_abs_diff']:.3g} (logit scale {r['logit_scale']:.3g}), fell back: {r['fell_back']}, "
                  f"compile {r['compile_seconds']:.1f} s: {'ok' if ok else 'FAILED'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
