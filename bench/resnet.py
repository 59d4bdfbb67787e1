"""The realistic benchmark workload: a CIFAR-style ResNet-18, random init from a seed.

The usual CIFAR adaptation of He et al. (2016)'s ResNet-18: a 3×3 stride-1 stem convolution (no
7×7 stride-2 conv, no max-pool, so 3×32×32 inputs keep their 32×32 size), then 4 stages of 2
BasicBlocks with widths 64/128/256/512 (stages 2–4 halve the size with a stride-2 first conv and a
1×1 projection shortcut), global average pooling and a linear classifier. torchvision is not
needed (it is optional in this project); the module names follow torchvision's (``layer1.0`` …).

The compared layers (:data:`RESNET18_LAYERS`) are the stem's output and the 8 BasicBlock
outputs, each after its ReLU, flattened per sample (ckapipe's ``reduce="flatten"``, the
reduction pytorch-cka applies to every hooked output of more than two dimensions):

======== ============ ==================
layer     shape        features / sample
======== ============ ==================
stem      64 × 32 × 32   65 536
layer1.*  64 × 32 × 32   65 536
layer2.* 128 × 16 × 16   32 768
layer3.* 256 × 8 × 8     16 384
layer4.* 512 × 4 × 4      8 192
======== ============ ==================

311 296 features per sample in all: 622 KB per image in float16, 1.27 GB per model at n = 2048.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

ModelT = TypeVar("ModelT", bound=nn.Module)

__all__ = [
    "RESNET18_LAYERS",
    "CifarResNet18",
    "make_resnet18",
    "resnet18_flops_per_feature",
    "resnet18_layer_widths",
    "seeded_eval_model",
]

RESNET18_LAYERS = [
    "stem",
    *(f"layer{stage}.{block}" for stage in (1, 2, 3, 4) for block in (0, 1)),
]
_WIDTHS = (64, 128, 256, 512)
_SIDES = (32, 16, 8, 4)  # each stage's output side for 32×32 inputs


class BasicBlock(nn.Module):
    """Two 3×3 conv + BN, the identity (or a 1×1 conv + BN projection) added, then ReLU.

    ReLUs are not in-place: hooks keep references to block outputs (pytorch-cka stores the
    hooked tensor itself), which an in-place op of a later module must not overwrite.
    """

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    """3×32×32 → stem (3×3 conv 64, BN, ReLU) → layer1..layer4 (2 BasicBlocks each) → pool → fc."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        c_in = 64
        for stage, c_out in enumerate(_WIDTHS, start=1):
            stride = 1 if stage == 1 else 2
            blocks = nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1))
            self.add_module(f"layer{stage}", blocks)
            c_in = c_out
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def make_resnet18(seed: int) -> CifarResNet18:
    """A :class:`CifarResNet18` initialised from ``seed``, in eval mode, non-trivial BN statistics
    (:func:`seeded_eval_model`)."""
    return seeded_eval_model(CifarResNet18, seed)


def seeded_eval_model(build: Callable[[], ModelT], seed: int) -> ModelT:
    """``build()`` under ``torch.manual_seed(seed)`` (PyTorch's default init), in eval mode, with
    BatchNorm running statistics drawn from ``seed`` too: a trained net's are not 0/1, so two
    seeds differ in every layer. The benchmark's small CNNs (``workload.make_cnn``) use it too;
    it lives here because ``tests/test_bench_resnet.py`` loads this file on its own.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = build()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(c, generator=generator))
    return net.eval()


def resnet18_layer_widths() -> list[int]:
    """Features per sample of the 9 compared layers, in :data:`RESNET18_LAYERS` order."""
    return [64 * 32 * 32] + [
        c * side * side for c, side in zip(_WIDTHS, _SIDES, strict=True) for _ in (0, 1)
    ]


def resnet18_flops_per_feature() -> float:
    """Forward FLOP per image (2 per multiply-add; convs and fc) over compared features per image."""
    multiply_adds = 3 * 64 * 9 * 32 * 32  # stem
    c_in = 64
    for c_out, side in zip(_WIDTHS, _SIDES, strict=True):
        pixels = side * side
        multiply_adds += (c_in * c_out + c_out * c_out) * 9 * pixels  # block 0
        if c_in != c_out:
            multiply_adds += c_in * c_out * pixels  # its 1×1 projection
        multiply_adds += 2 * c_out * c_out * 9 * pixels  # block 1
        c_in = c_out
    multiply_adds += 512 * 10
    return 2 * multiply_adds / sum(resnet18_layer_widths())
