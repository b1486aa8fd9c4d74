"""ResNet baselines: Cohen et al.'s architectures, their checkpoint format, training and certification."""
import os

import pytest
import torch
import torch.nn as nn

from conftest import ROOT
from DEQ.checkpoint import COHEN_ARCHS, file_sha256, load_model, load_pretrained
from DEQ.config import load_config
from DEQ.data import dataset_info
from DEQ.errors import UserError
from DEQ.interface import is_deq
from DEQ.models import ResNetClassifier, build_model, resnet50, resnet_cifar

RESNET_DIGITS = os.path.join(ROOT, "experiments", "digits", "resnet_digits.yaml")


class CohenNormalizeLayer(nn.Module):
    """The normalisation of locuslab/smoothing's datasets.py, as it is there: plain tensor attributes,
    so nothing of it reaches the state_dict."""

    def __init__(self, means, sds):
        super().__init__()
        self.means, self.sds = torch.tensor(means), torch.tensor(sds)

    def forward(self, x):
        b, c, h, w = x.shape
        means = self.means.repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        sds = self.sds.repeat((b, h, w, 1)).permute(0, 3, 1, 2)
        return (x - means) / sds


def _randomise_bn(net, seed):
    """Non-trivial BatchNorm statistics and affine parameters, so a mix-up of layers shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(1 + 0.2 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return net


def _save_cohen(path, arch, dataset, net, legacy=False):
    """A checkpoint as locuslab/smoothing's train.py writes it: Sequential(normalize_layer, model)."""
    info = dataset_info(dataset)
    original = nn.Sequential(CohenNormalizeLayer(info.mean, info.std), net).eval()
    optimizer = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch.save({"epoch": 90, "arch": arch, "state_dict": original.state_dict(), "optimizer": optimizer.state_dict()},
               str(path), _use_new_zipfile_serialization=not legacy)
    return original


def test_cifar_resnet110_has_cohens_layout():
    net = resnet_cifar(depth=110)
    shapes = {k: tuple(v.shape) for k, v in nn.Sequential(nn.Identity(), net).state_dict().items()}
    assert sum(p.numel() for p in net.parameters()) == 1730714  # the published 1.7M of ResNet-110
    assert [len(net.layer1), len(net.layer2), len(net.layer3)] == [18, 18, 18]
    assert shapes["1.conv1.weight"] == (16, 3, 3, 3) and shapes["1.fc.weight"] == (10, 64)
    assert shapes["1.layer1.0.conv1.weight"] == (16, 16, 3, 3) and "1.layer1.0.downsample.0.weight" not in shapes
    assert shapes["1.layer2.0.conv1.weight"] == (32, 16, 3, 3) and shapes["1.layer2.0.downsample.0.weight"] == (32, 16, 1, 1)
    assert shapes["1.layer3.0.downsample.1.running_var"] == (64,) and shapes["1.layer3.17.bn2.weight"] == (64,)
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer3[0].downsample[0].stride == (2, 2)
    assert len(shapes) == 1 + 5 + 54 * 12 + 2 * 6 + 2  # conv1, bn1 (5 entries each BN), 54 blocks of 2+2, 2 shortcuts, fc
    with pytest.raises(ValueError, match="6n\\+2"):
        resnet_cifar(depth=21)


@pytest.mark.parametrize("name,depth,dataset,size,classes", [
    ("resnet110", 0, "cifar10", 32, 10), ("resnet_cifar", 20, "digits", 8, 10), ("resnet50", 0, "imagenet", 64, 1000)])
def test_registry_builds_resnets_behind_the_normalisation(name, depth, dataset, size, classes):
    native = {"cifar10": 32, "digits": 8, "imagenet": 224}[dataset]
    cfg = load_config(None, ["MODEL.NAME", name, "MODEL.DEPTH", str(depth), "DATASET.DATASET", dataset,
                             "MODEL.NUM_CLASSES", str(classes), "MODEL.IMAGE_SIZE", f"[{native}, {native}]"])
    model = build_model(cfg).eval()
    info = dataset_info(dataset)
    assert isinstance(model, ResNetClassifier) and not is_deq(model) and not hasattr(model, "solve")
    assert model.in_channels == info.in_channels and model.num_classes == classes
    x = torch.rand(2, info.in_channels, size, size)
    with torch.no_grad():
        expected = model[1]((x - torch.tensor(info.mean).view(1, -1, 1, 1)) / torch.tensor(info.std).view(1, -1, 1, 1))
        assert torch.allclose(model(x), expected, atol=1e-5) and expected.shape == (2, classes)


@pytest.mark.parametrize("arch,legacy", [("cifar_resnet110", False), ("cifar_resnet20", True)])
def test_cohen_cifar_checkpoint_loads_without_a_yaml(tmp_path, arch, legacy):
    torch.manual_seed(0)
    net = _randomise_bn(resnet_cifar(depth=110 if arch.endswith("110") else 20, num_classes=10), seed=1)
    path = tmp_path / "checkpoint.pth.tar"
    original = _save_cohen(path, arch, "cifar10", net, legacy=legacy)
    loaded = load_model(str(path))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = original(x), loaded.model(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert want.std() > 0.1  # not a degenerate comparison
    name, depth, dataset, _ = COHEN_ARCHS[arch]
    assert (loaded.cfg.MODEL.NAME, loaded.cfg.DATASET.DATASET, loaded.cfg.MODEL.NUM_CLASSES) == (name, "cifar10", 10)
    assert loaded.checkpoint["arch"] == arch and loaded.sha256 == file_sha256(str(path))
    assert not loaded.model.training and not hasattr(loaded.model, "solve")


def test_cohen_imagenet_checkpoint_with_dataparallel_names_loads(tmp_path):
    from torchvision.models import resnet50 as tv_resnet50
    torch.manual_seed(0)
    net = _randomise_bn(tv_resnet50(weights=None), seed=3)
    path = tmp_path / "checkpoint.pth.tar"
    original = _save_cohen(path, "resnet50", "imagenet", nn.DataParallel(net))  # keys '1.module.conv1.weight', ...
    assert "1.module.conv1.weight" in torch.load(str(path), weights_only=True)["state_dict"]
    loaded = load_model(str(path))
    assert loaded.cfg.MODEL.NAME == "resnet50" and loaded.cfg.DATASET.DATASET == "imagenet"
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), original(x), atol=1e-4)


def test_cohen_checkpoint_errors_are_one_line(tmp_path):
    path = tmp_path / "checkpoint.pth.tar"
    _save_cohen(path, "wide_resnet", "cifar10", resnet_cifar(depth=20))
    with pytest.raises(UserError, match="arch 'wide_resnet', not one of Cohen et al.'s cifar_resnet20, cifar_resnet110, "
                                        "resnet50: pass the yaml of its architecture with --cfg"):
        load_model(str(path))
    _save_cohen(path, "cifar_resnet110", "cifar10", resnet_cifar(depth=20))  # arch and weights disagree
    with pytest.raises(UserError, match="does not match the model built from its config: .*unexpected|missing"):
        load_model(str(path))


def test_cohen_checkpoint_as_pretrained_weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "checkpoint.pth.tar"
    original = _save_cohen(path, "cifar_resnet20", "cifar10", _randomise_bn(resnet_cifar(depth=20), seed=5))
    cfg = load_config(None, ["MODEL.NAME", "resnet_cifar", "MODEL.DEPTH", "20"])
    model = build_model(cfg).eval()
    assert load_pretrained(model, str(path)) == file_sha256(str(path))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), atol=1e-5)


def test_resnet50_init_flag():
    torch.manual_seed(0)
    own = resnet50(10, init_weights=True).conv1.weight.std().item()
    default = resnet50(10, init_weights=False).conv1.weight.std().item()
    assert own == pytest.approx((2.0 / (64 * 49)) ** 0.5, rel=0.1)  # Kaiming normal, fan_out
    assert default == pytest.approx((3.0 * 3 * 49) ** -0.5, rel=0.1)  # PyTorch's kaiming_uniform(a=sqrt(5))


def test_digits_resnet_trains_one_epoch_through_the_cli_and_certifies(tmp_path):
    from DEQ.tools.cls_train import main as train
    run = tmp_path / "run"
    train(["--cfg", RESNET_DIGITS, "--noise", "0.25", "--out", str(run), "--quiet", "--threads", "1",
           "TRAIN.END_EPOCH", "1"])
    log = (run / "train.log").read_text()
    assert "model resnet_cifar" in log and "epoch 1/1" in log and "steps" not in log.split("epoch 1/1")[1]
    loaded = load_model(str(run / "last.pth"))
    assert isinstance(loaded.model, ResNetClassifier) and loaded.cfg.MODEL.DEPTH == 20
    assert loaded.checkpoint["epoch"] == 1 and loaded.checkpoint["eval"]["clean_acc"] > 20  # chance is 10
    assert loaded.checkpoint["train_step"] == 22  # ceil(1347 / 64): every batch, no pretraining phase
    assert list(loaded.model.state_dict())[0] == "1.conv1.weight"  # Cohen's names

    # standard randomized smoothing treats it as a plain classifier
    from SRS.cli import certify_main, certify_parser
    out = tmp_path / "cert.tsv"
    common = ["--N0", "20", "--N", "100", "--batch", "100", "--skip", "150", "--quiet", "--threads", "1"]
    summary = certify_main(certify_parser().parse_args(["digits", str(run / "last.pth"), "0.25", str(out), *common]))
    assert summary["images"] == 3
    rows = [line for line in out.read_text().splitlines() if line and not line.startswith("#")]
    assert rows[0].split("\t")[:6] == ["idx", "label", "predict", "radius", "correct", "time"] and len(rows) == 1 + 3
    # SRS warm-starts fixed-point solves: a ResNet is refused
    with pytest.raises(UserError, match="--srs needs a deep equilibrium model"):
        certify_main(certify_parser().parse_args(["digits", str(run / "last.pth"), "0.25", str(tmp_path / "srs.tsv"),
                                                  "--srs", *common]))
    # nor do the solver flags of the standard DEQ apply: refused, not ignored
    for flag, value in (("--f_thresh", "5"), ("--f_solver", "anderson"), ("--tol", "0")):
        with pytest.raises(UserError, match=f"{flag} sets the fixed-point solver .* a resnet_cifar .* drop {flag}"):
            certify_main(certify_parser().parse_args(["digits", str(run / "last.pth"), "0.25",
                                                      str(tmp_path / "solver.tsv"), flag, value, *common]))
    assert not (tmp_path / "solver.tsv").exists()
