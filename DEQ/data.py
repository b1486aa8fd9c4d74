"""Data sets: the embedded digits default, CIFAR-10 and ImageNet.

Images are float tensors in [0, 1] (normalisation is inside the model, so noise and radii are in pixel units).
Digits: scikit-learn's 1797 8x8 images, fixed split (image i is a test image iff i % 4 == 0).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from .errors import UserError

DATASETS = ("digits", "cifar10", "imagenet")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    in_channels: int
    image_size: Tuple[int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


_INFO = {
    # digits mean/std: of the training split, in [0, 1] pixel units.
    "digits": DatasetInfo("digits", 10, 1, (8, 8), (0.3051,), (0.3759,)),
    "cifar10": DatasetInfo("cifar10", 10, 3, (32, 32), (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "imagenet": DatasetInfo("imagenet", 1000, 3, (224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def dataset_info(name: str) -> DatasetInfo:
    if name not in _INFO:
        raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return _INFO[name]


def _check_split(split: str) -> bool:
    if split not in ("train", "test"):
        raise UserError(f"split must be 'train' or 'test', got {split!r}")
    return split == "train"


def digits_dataset(split: str, image_size: Optional[int] = None) -> TensorDataset:
    """scikit-learn's digits with the fixed split documented above."""
    from sklearn.datasets import load_digits

    train = _check_split(split)
    data = load_digits()
    images = data.images.astype(np.float32) / 16.0
    is_test = np.arange(len(images)) % 4 == 0
    keep = ~is_test if train else is_test
    x = torch.from_numpy(images[keep]).unsqueeze(1)
    if image_size and image_size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        x = x.clamp_(0.0, 1.0)
    y = torch.from_numpy(data.target[keep].astype(np.int64))
    return TensorDataset(x, y)


class _LabelAsInt(Dataset):
    """Yield (tensor, int) so results files always hold plain integer labels."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return x, int(y)


def cifar10_dataset(split: str, root: Optional[str], augment: bool = False, download: bool = True):
    import torchvision
    from torchvision import transforms

    train = _check_split(split)
    if not root:  # never create (and download into) ./data/cifar10 in whatever folder the user happens to be in
        root = os.path.join("data", "cifar10")
        if not os.path.isdir(root):
            raise UserError("CIFAR-10 needs --data-dir: the folder holding cifar-10-batches-py (or an existing folder "
                            "to download it into); the default ./data/cifar10 does not exist here")
    tfs = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if (train and augment) else []
    tf = transforms.Compose(tfs + [transforms.ToTensor()])
    present = os.path.isdir(os.path.join(root, "cifar-10-batches-py"))
    try:
        return torchvision.datasets.CIFAR10(root, train=train, transform=tf, download=download and not present)
    except Exception as exc:  # no network, partial download, corrupt archive
        raise UserError(
            f"CIFAR-10 not found under {root!r} and could not be downloaded ({type(exc).__name__}): "
            f"put torchvision's cifar-10-batches-py folder there or pass --data-dir") from None


def imagenet_dataset(split: str, root: Optional[str], augment: bool = False):
    import torchvision
    from torchvision import transforms

    train = _check_split(split)
    if not root:
        raise UserError("ImageNet needs --data-dir pointing at a folder with train/ and val/ in ImageFolder layout")
    folder = os.path.join(root, "train" if train else "val")
    if not os.path.isdir(folder):
        raise UserError(f"ImageNet folder {folder!r} not found: --data-dir must contain train/ and val/ (ImageFolder layout)")
    if train and augment:
        tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    else:
        tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])
    return torchvision.datasets.ImageFolder(folder, tf)


def get_dataset(name: str, split: str, data_dir: Optional[str] = None, augment: bool = False,
                image_size: Optional[int] = None) -> Dataset:
    """Items are (image in [0,1], int label).  ``image_size`` resizes the embedded digits only."""
    dataset_info(name)
    if name == "digits":  # embedded: --data-dir does not apply
        return digits_dataset(split, image_size)
    if data_dir and not os.path.isdir(data_dir):
        raise UserError(f"data directory {data_dir!r} does not exist: check --data-dir")
    if name == "cifar10":
        return _LabelAsInt(cifar10_dataset(split, data_dir, augment))
    return _LabelAsInt(imagenet_dataset(split, data_dir, augment))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int = 0,
                device: Optional[torch.device] = None, seed: int = 0, pin_memory: bool = True,
                batch_sampler: Optional[Sampler] = None) -> DataLoader:
    """DataLoader with a seeded shuffle (``seed``), so a resumed run replays the same order; ``.generator`` is
    set (reseed it per epoch).  ``workers`` is 0 for an in-memory TensorDataset; memory is pinned only for CUDA with
    ``pin_memory``; a ``batch_sampler`` (under torchrun, this rank's share) replaces ``batch_size`` and ``shuffle``."""
    in_memory = isinstance(dataset, TensorDataset)
    gen = torch.Generator().manual_seed(seed)
    cuda = device is not None and torch.device(device).type == "cuda"
    common = dict(generator=gen, num_workers=0 if in_memory else workers, pin_memory=bool(pin_memory) and cuda,
                  persistent_workers=False)
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=False, **common)
