"""Attacks (DEQ/attacks.py) and SmoothAdv training: constraints, closed forms, determinism, errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DIGITS_CFG, TINY
from DEQ.attacks import (SmoothAdvAttack, certificate_contradictions, ddn, draw_noise, get_attack, model_logits, pgd,
                         smooth_pgd, smoothed_nll, warmup_epsilon)
from DEQ.checkpoint import load_checkpoint
from DEQ.config import load_config
from DEQ.data import get_dataset
from DEQ.errors import UserError
from DEQ.training import Trainer


@pytest.fixture(scope="module")
def tiny_deq(tmp_path_factory):
    """A small digits MDEQ trained for three short epochs (about 10 s; far enough that its fixed points
    converge and its implicit gradients are meaningful), in eval mode, and 16 test images with pixels
    at 0 and 1 (so the [0, 1] box binds)."""
    cfg = load_config(DIGITS_CFG, TINY + ["PERCENT", "1.0", "TRAIN.PRETRAIN_STEPS", "30", "LOSS.JAC_LOSS_FREQ", "0.0"],
                      noise=0.25)
    trainer = Trainer(cfg, torch.device("cpu"), str(tmp_path_factory.mktemp("attackmodel")), show_progress=False)
    for _ in range(3):
        trainer.train_epoch()
        trainer.epoch += 1
    data = get_dataset("digits", "test")
    return trainer.model.eval(), data.tensors[0][:16], data.tensors[1][:16]


def _linear(d=6, seed=0):
    """A binary linear classifier (logits W x + b, float64) and an input it classifies as 1 with a margin."""
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(d, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(2, d, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(2, generator=g, dtype=torch.float64))
    w = (lin.weight[1] - lin.weight[0]).detach()
    b = (lin.bias[1] - lin.bias[0]).detach()
    x = torch.randn(1, d, generator=g, dtype=torch.float64)
    x = x + (1.0 - (x[0] @ w + b)) * w / w.dot(w)  # margin w.x + b = 1 for class 1
    return lin, x, torch.tensor([1]), w, b


def _norms(a, b):
    return (a - b).flatten(1).norm(dim=1)


@pytest.mark.parametrize("norm,eps", [("l2", 0.6), ("linf", 0.1)])
def test_pgd_stays_in_the_ball_and_the_box(tiny_deq, norm, eps):
    model, x, y = tiny_deq
    adv = pgd(model, x, y, eps, norm=norm, steps=3, restarts=2, generator=torch.Generator().manual_seed(1))
    size = _norms(adv, x) if norm == "l2" else (adv - x).flatten(1).abs().max(1).values
    assert (size <= eps + 1e-5).all() and (size > 0.5 * eps).all()
    assert adv.min() >= 0 and adv.max() <= 1 and not model.training
    # the box binds: clean pixels at 0 and 1 exist, and some moved coordinates were clipped there
    assert ((x == 0) | (x == 1)).any() and ((adv == 0) | (adv == 1)).any()


def test_pgd_increases_the_loss_of_the_base_deq(tiny_deq):
    model, x, y = tiny_deq
    adv = pgd(model, x, y, 0.5, steps=3, random_start=False)
    with torch.no_grad():
        clean, attacked = F.cross_entropy(model(x), y, reduction="none"), F.cross_entropy(model(adv), y, reduction="none")
    assert attacked.mean() > clean.mean() and (attacked > clean).float().mean() >= 0.9


def test_pgd_works_with_the_phantom_gradient(tiny_deq):
    model, x, y = tiny_deq
    model = copy.deepcopy(model)
    model.grad_mode = "phantom"  # DEQ.GRAD phantom
    adv = pgd(model, x, y, 0.5, steps=2, random_start=False)
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_l2_pgd_on_a_linear_classifier_moves_along_minus_w_and_succeeds_iff_eps_exceeds_the_margin():
    lin, x, y, w, b = _linear()
    margin = (x[0] @ w + b).item() / w.norm().item()  # the distance to the decision boundary
    for factor, success in ((0.98, False), (1.02, True)):
        eps = factor * margin
        adv = pgd(lin, x, y, eps, steps=4, random_start=False, clamp=None)
        delta = (adv - x)[0]
        assert delta.norm().item() == pytest.approx(eps, rel=1e-9)
        assert F.cosine_similarity(delta, -w, dim=0).item() == pytest.approx(1.0, abs=1e-9)
        assert (lin(adv).argmax(1).item() != 1) == success
    # from a random start the iterates converge to the same point (the angle to -w shrinks geometrically)
    adv = pgd(lin, x, y, 0.5 * margin, steps=50, step_size=0.1 * margin, random_start=True, clamp=None,
              generator=torch.Generator().manual_seed(3))
    assert F.cosine_similarity((adv - x)[0], -w, dim=0).item() > 0.999


def test_ddn_on_a_linear_classifier_finds_a_near_minimal_adversarial():
    lin, x, y, w, b = _linear(seed=1)
    margin = (x[0] @ w + b).item() / w.norm().item()
    adv = ddn(lin, x, y, None, steps=40, init_norm=2 * margin, clamp=None)
    assert lin(adv).argmax(1).item() != 1
    assert margin <= _norms(adv, x).item() <= 1.2 * margin
    capped = ddn(lin, x, y, 0.5 * margin, steps=40, init_norm=2 * margin, clamp=None)
    assert _norms(capped, x).item() <= 0.5 * margin + 1e-9  # projected onto the ball


def test_smoothed_nll_is_minus_log_of_the_mean_softmax():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 4, generator=g, dtype=torch.float64) * 3, torch.tensor([1, 3])
    want = -torch.log(F.softmax(logits, 1).view(2, 3, 4).mean(1).gather(1, y[:, None]).squeeze(1))
    assert torch.allclose(smoothed_nll(logits, y, 3), want.float(), atol=1e-6)
    assert torch.allclose(smoothed_nll(logits[:2], y, 1), F.cross_entropy(logits[:2].float(), y, reduction="none"))


def test_smooth_pgd_is_deterministic_given_the_seed_and_stays_in_the_ball(tiny_deq):
    model, x, y = tiny_deq
    x, y = x[:6], y[:6]

    def run(seed):
        noise = draw_noise(x, 0.25, 3, torch.Generator().manual_seed(seed))
        return smooth_pgd(model, x, y, 0.5, noise, steps=2, random_start=True, generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (_norms(a, x) <= 0.5 + 1e-5).all() and a.min() >= 0 and a.max() <= 1
    # the smoothed loss went up at the attack's own noise
    noise = draw_noise(x, 0.25, 3, torch.Generator().manual_seed(7))
    with torch.no_grad():
        before = smoothed_nll(model((x.unsqueeze(1) + noise).flatten(0, 1)), y, 3)
        after = smoothed_nll(model((a.unsqueeze(1) + noise).flatten(0, 1)), y, 3)
    assert after.mean() > before.mean()


def test_smooth_pgd_with_one_zero_noise_vector_is_l2_pgd(tiny_deq):
    model, x, y = tiny_deq
    x, y = x[:4], y[:4]
    a = smooth_pgd(model, x, y, 0.4, torch.zeros(4, 1, *x.shape[1:]), steps=2)
    b = pgd(model, x, y, 0.4, steps=2, random_start=False)
    assert torch.allclose(a, b, atol=1e-5)


def test_gradient_free_direction_estimates_the_gradient_on_a_linear_classifier():
    lin, x, y, w, b = _linear(seed=2)
    x = x.float()
    lin = lin.float()
    noise = draw_noise(x, 0.5, 4000, torch.Generator().manual_seed(0))
    adv = smooth_pgd(lin, x, y, 0.3, noise, steps=1, no_grad=True, clamp=None)
    assert F.cosine_similarity((adv - x)[0], -w.float(), dim=0).item() > 0.9


def test_attacks_restore_the_training_mode(tiny_deq):
    model, x, y = tiny_deq
    model.train()
    try:
        smooth_pgd(model, x[:2], y[:2], 0.3, draw_noise(x[:2], 0.25, 1), steps=1)
        assert model.training
    finally:
        model.eval()


def test_warmup_epsilon_ramps_linearly_as_smoothadv():
    assert [warmup_epsilon(1.0, e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_epsilon(0.5, 0, 1) == warmup_epsilon(0.5, 0, 0) == 0.5


def test_certificate_contradictions():
    # image 0: certified 3 at radius 0.6, attack at 0.5 gives 5 -> contradiction; 1: abstains under attack;
    # 2: radius 0.4 < 0.5, no claim; 3: certificate abstained
    assert certificate_contradictions([3, 3, 3, -1], [0.6, 0.6, 0.4, 0.0], [5, -1, 5, 5], 0.5) == [0]
    with pytest.raises(UserError):
        certificate_contradictions([1], [0.5, 0.2], [1], 0.1)


@pytest.mark.parametrize("call", [
    lambda m, x, y: get_attack("fgsm"),
    lambda m, x, y: pgd(m, x, y, -0.1),
    lambda m, x, y: pgd(m, x, y, float("nan")),
    lambda m, x, y: pgd(m, x, y, 0.1, steps=0),
    lambda m, x, y: pgd(m, x, y, 0.1, norm="l1"),
    lambda m, x, y: pgd(m, x, y, 0.1, restarts=3, random_start=False),
    lambda m, x, y: pgd(m, x * 2 + 1, y, 0.1),
    lambda m, x, y: pgd(m, x, y[:1], 0.1),
    lambda m, x, y: smooth_pgd(m, x, y, 0.1, torch.zeros(2, 0, *x.shape[1:])),
    lambda m, x, y: smooth_pgd(m, x, y, 0.1, torch.zeros(*x.shape)),
    lambda m, x, y: draw_noise(x, 0.25, 0),
    lambda m, x, y: ddn(m, x, y, 0.1, steps=0),
    lambda m, x, y: ddn(m, x, y, 0.1, gamma=1.5),
    lambda m, x, y: SmoothAdvAttack(attack="FGSM"),
    lambda m, x, y: SmoothAdvAttack(epsilon=-1.0),
    lambda m, x, y: SmoothAdvAttack(num_noise_vec=0),
    lambda m, x, y: SmoothAdvAttack(num_steps=0),
    lambda m, x, y: SmoothAdvAttack(attack="DDN", no_grad=True),
], ids=["unknown", "neg-eps", "nan-eps", "steps0", "norm", "restarts", "range", "labels", "m0", "noise-shape",
        "draw-m0", "ddn-steps0", "ddn-gamma", "sa-attack", "sa-eps", "sa-m0", "sa-steps0", "sa-ddn-nograd"])
def test_bad_input_raises_one_line_user_errors(tiny_deq, call):
    model, x, y = tiny_deq
    with pytest.raises(UserError) as err:
        call(model, x[:2], y[:2])
    assert "\n" not in str(err.value) and str(err.value)


@pytest.mark.parametrize("opts,words", [
    (["ATTACK.ATTACK", "'FGSM'"], "ATTACK.ATTACK must be one of PGD, DDN"),
    (["ATTACK.EPSILON", "64.0"], "pixel units"),
    (["ATTACK.NUM_NOISE_VEC", "0"], "ATTACK.NUM_NOISE_VEC must be an integer >= 1"),
    (["ATTACK.NUM_STEPS", "0"], "ATTACK.NUM_STEPS must be an integer >= 1"),
    (["ATTACK.EPSILON", "-0.5"], "ATTACK.EPSILON must be"),
])
def test_bad_attack_config_is_refused_before_the_run_folder_exists(tmp_path, opts, words):
    cfg = load_config(DIGITS_CFG, TINY + ["ATTACK.ADV_TRAINING", "True"] + opts, noise=0.25)
    with pytest.raises(UserError, match=words):
        Trainer(cfg, torch.device("cpu"), str(tmp_path / "run"), show_progress=False)
    assert not (tmp_path / "run").exists()
    cfg = load_config(DIGITS_CFG, TINY + ["ATTACK.ADV_TRAINING", "True", "ATTACK.NO_GRAD_ATTACK", "True"], noise=0.0)
    with pytest.raises(UserError, match="needs --noise > 0"):
        Trainer(cfg, torch.device("cpu"), str(tmp_path / "run"), show_progress=False)


@pytest.mark.parametrize("multi", [True, False])
def test_smoothadv_training_one_short_epoch_records_the_attack(tmp_path, multi):
    opts = TINY + ["TRAIN.END_EPOCH", "1", "TRAIN.PRETRAIN_STEPS", "1", "ATTACK.ADV_TRAINING", "True",
                   "ATTACK.EPSILON", "0.5", "ATTACK.NUM_STEPS", "1", "ATTACK.NUM_NOISE_VEC", "2",
                   "ATTACK.WARM_UP", "2", "ATTACK.TRAIN_MULTI_NOISE", str(multi), "DEQ.F_THRES", "4", "DEQ.B_THRES", "4"]
    cfg = load_config(DIGITS_CFG, opts, noise=0.25)
    trainer = Trainer(cfg, torch.device("cpu"), str(tmp_path), show_progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    calls = []
    real = trainer.attacker.__class__.__call__

    def spy(self, model, x, y, noise, epoch, train_step=-1, generator=None):
        calls.append((x.shape[0], noise.shape[1], epoch, train_step))
        return real(self, model, x, y, noise, epoch, train_step, generator)
    trainer.attacker.__class__.__call__ = spy
    try:
        tr = trainer.train_epoch()
    finally:
        trainer.attacker.__class__.__call__ = real
    assert calls and all(c[1] == 2 and c[2] == 0 for c in calls) and [c[3] for c in calls][:2] == [0, 1]
    assert 0 <= tr["acc"] <= 100 and math.isfinite(tr["loss"])
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    trainer.epoch += 1
    ckpt_path = str(tmp_path / "last.pth")
    from DEQ.checkpoint import save_checkpoint
    save_checkpoint(trainer.state(), ckpt_path)
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["attack"]["attack"] == "PGD" and ckpt["attack"]["epsilon"] == 0.5
    assert ckpt["attack"]["num_noise_vec"] == 2 and ckpt["attack"]["train_multi_noise"] is multi
    assert ckpt["attack"]["epsilon_last_epoch"] == 0.25  # warm-up: epoch 0 of 2
    assert "ADV_TRAINING: true" in ckpt["config"] and "NUM_NOISE_VEC: 2" in ckpt["config"]


def test_smoothadv_fit_with_ddn_writes_a_checkpoint(tmp_path):
    opts = TINY + ["TRAIN.END_EPOCH", "1", "ATTACK.ADV_TRAINING", "True", "ATTACK.ATTACK", "'DDN'",
                   "ATTACK.NUM_STEPS", "2", "DEQ.F_THRES", "4", "DEQ.B_THRES", "4"]
    cfg = load_config(DIGITS_CFG, opts, noise=0.25)
    trainer = Trainer(cfg, torch.device("cpu"), str(tmp_path), show_progress=False)
    stats = trainer.fit()
    assert stats is not None and load_checkpoint(trainer.last_path)["attack"]["attack"] == "DDN"


def test_gaussian_training_has_no_attack_entry(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    assert "attack" not in ckpt and "ADV_TRAINING: false" in ckpt["config"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attacks_on_cuda_match_cpu_with_a_cpu_generator(tiny_deq):
    model, x, y = tiny_deq
    noise = draw_noise(x[:4], 0.25, 2, torch.Generator().manual_seed(0))
    cpu = smooth_pgd(model, x[:4], y[:4], 0.5, noise, steps=2, random_start=True,
                     generator=torch.Generator().manual_seed(1))
    dev = torch.device("cuda")
    model_cuda = copy.deepcopy(model).to(dev).eval()
    gpu = smooth_pgd(model_cuda, x[:4].to(dev), y[:4].to(dev), 0.5, noise.to(dev), steps=2, random_start=True,
                     generator=torch.Generator().manual_seed(1))
    assert gpu.device.type == "cuda" and torch.allclose(gpu.cpu(), cpu, atol=1e-3)
    assert model_logits(model_cuda)(x[:1].to(dev)).shape == (1, 10)


def test_shipped_smoothadv_config_is_the_digits_model_with_attack_on():
    plain = load_config(DIGITS_CFG)
    adv = load_config(DIGITS_CFG.replace("cls_mdeq_digits.yaml", "cls_mdeq_digits_smoothadv.yaml"))
    assert adv.MODEL == plain.MODEL and adv.DEQ == plain.DEQ and adv.DATASET == plain.DATASET
    assert adv.ATTACK.ADV_TRAINING and 0.25 <= adv.ATTACK.EPSILON <= 0.5 and adv.ATTACK.NUM_STEPS <= 2
    assert SmoothAdvAttack.from_config(adv).attack == "PGD" and not plain.ATTACK.ADV_TRAINING
    # MDEQ-style command-line overrides reach the section
    cfg = load_config(DIGITS_CFG, ["ATTACK.ADV_TRAINING", "True", "ATTACK.EPSILON", "0.5", "ATTACK.ATTACK", "DDN"])
    assert cfg.ATTACK.ADV_TRAINING is True and cfg.ATTACK.EPSILON == 0.5 and cfg.ATTACK.ATTACK == "DDN"
