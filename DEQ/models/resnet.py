"""ResNet baselines of randomized smoothing (Cohen, Rosenfeld & Kolter 2019): CIFAR ResNet-6n+2 and ResNet-50.

Each is ``ResNetClassifier(NormalizeLayer(mean, std), net)`` with Cohen's parameter names, so a released
``checkpoint.pth.tar`` loads with a strict ``load_state_dict``; inputs in [0, 1] pixel space.  Plain classifiers
(no ``.solve``; SRS refuses them).  Architecture notes: docs/internals.md, "ResNet baselines".
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn

from ..data import dataset_info
from .mdeq import NormalizeLayer

CIFAR_WIDTHS = (16, 32, 64)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class CifarBasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class CifarResNet(nn.Module):
    """Cohen et al.'s CIFAR ResNet of depth 6n+2 (see the module docstring)."""

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, init_weights: bool = True):
        """``depth`` 6n+2 with n >= 1; ``init_weights``: He init of the convs and unit BN (as Cohen's code),
        False keeps PyTorch's defaults."""
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.inplanes = CIFAR_WIDTHS[0]
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(CIFAR_WIDTHS[0], n, 1)
        self.layer2 = self._make_layer(CIFAR_WIDTHS[1], n, 2)
        self.layer3 = self._make_layer(CIFAR_WIDTHS[2], n, 2)
        self.fc = nn.Linear(CIFAR_WIDTHS[2] * CifarBasicBlock.expansion, num_classes)
        if init_weights:
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                    m.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
                elif isinstance(m, nn.BatchNorm2d):
                    m.weight.data.fill_(1)
                    m.bias.data.zero_()

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * CifarBasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * CifarBasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * CifarBasicBlock.expansion))
        layers = [CifarBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * CifarBasicBlock.expansion
        layers += [CifarBasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))  # global average pool (an 8x8 map on CIFAR-10, as AvgPool2d(8))


def resnet_cifar(depth: int = 110, num_classes: int = 10, in_channels: int = 3, init_weights: bool = True) -> CifarResNet:
    """Cohen et al.'s ``resnet_cifar`` of ``depth`` 6n+2 (20, 110, ...), without the normalisation layer;
    random weights (He init with ``init_weights``, as Cohen's code, else PyTorch's), train mode."""
    return CifarResNet(depth, num_classes, in_channels, init_weights)


def resnet50(num_classes: int = 1000, init_weights: bool = True) -> nn.Module:
    """torchvision's ResNet-50 with random weights (Cohen et al.'s ImageNet base classifier), without the
    normalisation layer; ``init_weights``: torchvision's init, else PyTorch's per-module defaults."""
    from torchvision.models import resnet50 as tv_resnet50

    net = tv_resnet50(weights=None, num_classes=num_classes)
    if not init_weights:
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)):
                m.reset_parameters()
    return net


class ResNetClassifier(nn.Sequential):
    """``Sequential(NormalizeLayer(mean, std), net)``: Cohen et al.'s layout and parameter names."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float], num_classes: int):
        """``net`` takes normalised images; ``mean``, ``std``: per-channel statistics in [0, 1] pixels."""
        super().__init__(NormalizeLayer(mean, std), net)
        self.in_channels = len(mean)
        self.num_classes = num_classes


def build_resnet(cfg) -> ResNetClassifier:
    """The ResNet that MODEL.NAME / MODEL.DEPTH of a validated ``cfg`` name, for DATASET.DATASET, with its
    normalisation: random weights (MODEL.INIT_WEIGHTS picks the init), train mode."""
    info = dataset_info(cfg.DATASET.DATASET)
    name, nc, init = cfg.MODEL.NAME, cfg.MODEL.NUM_CLASSES, cfg.MODEL.INIT_WEIGHTS
    if name == "resnet50":
        net = resnet50(nc, init)
    elif name in ("resnet110", "resnet_cifar"):
        net = resnet_cifar(110 if name == "resnet110" else cfg.MODEL.DEPTH, nc, info.in_channels, init)
    else:
        raise ValueError(f"not a ResNet name: {name!r}")
    return ResNetClassifier(net, info.mean, info.std, nc)


__all__ = ["CifarBasicBlock", "CifarResNet", "resnet_cifar", "resnet50", "ResNetClassifier", "build_resnet"]
