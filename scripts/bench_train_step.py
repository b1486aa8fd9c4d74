"""Seconds per training step of a config on this machine (forward solve, implicit backward, optimiser).

    python scripts/bench_train_step.py --cfg experiments/cifar/cls_mdeq_SMALL.yaml --batch 96 --steps 3

Random inputs, no data set.  ``--compile`` and ``--adv`` variants: docs/internals.md.
"""
import time


import torch
import torch.nn.functional as F

from DEQ.acceleration import resolve_runtime
from DEQ.config import load_config
from DEQ.errors import ArgumentParser
from DEQ.models import build_model
from DEQ.training import build_optimizer
from DEQ.utils import pick_device


def time_steps(model, opt, x, y, steps, train_step, jac):
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels
        t0 = time.perf_counter()
        out = model.forward_train(x, train_step=train_step, compute_jac_loss=jac)
        loss = F.cross_entropy(out.logits, y) + (0.5 * out.jac_loss if jac else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def main():
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cfg", default="experiments/cifar/cls_mdeq_SMALL.yaml")
    p.add_argument("--batch", type=int, default=96)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", default="off", choices=("off", "on", "both"),
                   help="the DEQ step's no-gradient solve eager (off), compiled (on), or both, timed one after the other")
    p.add_argument("--adv", action="store_true", help="also time SmoothAdv attack steps (the config's ATTACK section)")
    p.add_argument("--m", type=int, default=None, help="with --adv: noise vectors per input (default ATTACK.NUM_NOISE_VEC)")
    args = p.parse_args()
    cfg = load_config(args.cfg)
    dev = pick_device(args.device)
    torch.manual_seed(0)
    model = build_model(cfg).to(dev).train()
    opt = build_optimizer(cfg, model)
    size = cfg.MODEL.IMAGE_SIZE[0]
    x = torch.rand(args.batch, model.in_channels, size, size, device=dev)
    y = torch.randint(0, cfg.MODEL.NUM_CLASSES, (args.batch,), device=dev)
    print(f"{args.cfg}: {sum(p.numel() for p in model.parameters())} parameters, batch {args.batch}, "
          f"{size}x{size}, device {dev}, {torch.get_num_threads()} threads")
    pre = time_steps(model, opt, x, y, args.steps, 0, False)
    print(f"pretraining step (f unrolled {cfg.MODEL.NUM_LAYERS}x, always eager): {pre:.3f} s")
    runs = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.compile]
    figures = {}
    for mode in runs:
        if mode == "on":
            model.set_runtime(resolve_runtime("on", "fp32", dev), train=True)
        deq = time_steps(model, opt, x, y, args.steps, cfg.TRAIN.PRETRAIN_STEPS + 1, False)
        jac = time_steps(model, opt, x, y, args.steps, cfg.TRAIN.PRETRAIN_STEPS + 1, True)
        figures[mode] = deq
        label = "compiled solve" if mode == "on" else "eager solve"
        if mode == "on":
            print(f"compile: the training solve's f compiled in {model.engine.train_clock['f']:.1f} s (first call: "
                  f"compilation plus one evaluation; in the untimed warm-up step, not in the figures below)")
        print(f"DEQ step, {label} ({cfg.DEQ.F_SOLVER} {cfg.DEQ.F_THRES} fwd / {cfg.DEQ.B_SOLVER} {cfg.DEQ.B_THRES} "
              f"bwd): {deq:.3f} s")
        print(f"DEQ step with Jacobian term, {label}: {jac:.3f} s")
    if len(figures) == 2:
        print(f"compiled / eager DEQ step: {figures['on'] / figures['off']:.2f}")
    if args.adv:
        time_adversarial(cfg, model, opt, x, y, args, figures[runs[-1]])


def time_adversarial(cfg, model, opt, x, y, args, deq_step):
    from DEQ.attacks import SmoothAdvAttack, smooth_pgd

    a = cfg.ATTACK
    m = args.m or a.NUM_NOISE_VEC
    attacker = SmoothAdvAttack.from_config(cfg)
    noise = torch.randn(x.shape[0], m, *x.shape[1:], device=x.device) * 0.25
    step = cfg.TRAIN.PRETRAIN_STEPS + 1
    fn = lambda v: model.forward_train(v, train_step=step).logits  # noqa: E731

    def attack_step(no_grad):
        times = []
        for _ in range(args.steps + 1):
            t0 = time.perf_counter()
            smooth_pgd(model, x, y, a.EPSILON, noise, steps=1, no_grad=no_grad, logits_fn=fn)
            if x.is_cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sum(times[1:]) / args.steps

    grad_step, free_step = attack_step(False), attack_step(True)
    rows = x.shape[0] * m if a.TRAIN_MULTI_NOISE else x.shape[0]
    xt = x.repeat_interleave(m, 0)[:rows] if a.TRAIN_MULTI_NOISE else x
    yt = y.repeat_interleave(m, 0)[:rows] if a.TRAIN_MULTI_NOISE else y
    train_rows = time_steps(model, opt, xt, yt, args.steps, step, False)
    whole = a.NUM_STEPS * (free_step if a.NO_GRAD_ATTACK else grad_step) + train_rows
    print(f"SmoothAdv {attacker.attack}, m = {m} noise vectors ({x.shape[0] * m} rows per attack step), "
          f"DEQ.GRAD {cfg.DEQ.GRAD}:")
    print(f"  one attack step (solve + {cfg.DEQ.GRAD} backward): {grad_step:.3f} s = {grad_step / deq_step:.2f} "
          f"DEQ training steps")
    print(f"  one gradient-free attack step (NO_GRAD_ATTACK): {free_step:.3f} s = {free_step / deq_step:.2f} "
          f"DEQ training steps")
    print(f"  adversarial training step ({a.NUM_STEPS} attack steps + optimiser step on {rows} rows): {whole:.3f} s "
          f"= {whole / deq_step:.2f} DEQ training steps")


if __name__ == "__main__":
    main()
