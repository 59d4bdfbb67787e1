"""The benchmark workload: small models and synthetic data, built locally (nothing downloaded).

Every tool in the study benchmarks (``bench/run.py``) sees exactly these models and inputs:

- :func:`make_cnn` — a small convolutional net (3×32×32 input), one per seed. Its four studied
  layers are the outputs of three two-conv blocks (2048, 1024, 512 features per sample with the
  default channels) and a dense layer (128): spatial maps, then a dense head, as in practice.
- :func:`make_images` — n synthetic 3×32×32 images: smooth random fields plus a few
  oriented-stripe patterns, so that layers respond with structured, correlated features
  (white noise would make every CKA value near 0 and hide estimator errors).
- :func:`offset_features` — post-ReLU-like float32 features whose mean is ~100× their spread,
  the case where uncentered float32 Gram products cancel catastrophically.
- :class:`FeatureTable` — a model whose "layers" return fixed feature matrices looked up by
  sample index, so hook-based tools can be run on exactly the features of the accuracy test.
- :data:`WORKLOADS` and the ``workload_*`` functions — the study's model family by name: ``cnn``
  (the small CNN above) or ``resnet18`` (the CIFAR-style ResNet-18 of ``bench/resnet.py``, its
  stem and 8 block outputs), on the same images.
"""

from __future__ import annotations

import numpy as np
import torch
from resnet import (
    RESNET18_LAYERS,
    make_resnet18,
    resnet18_flops_per_feature,
    resnet18_layer_widths,
    seeded_eval_model,
)
from torch import nn

__all__ = [
    "CNN_LAYERS",
    "DEFAULT_CHANNELS",
    "WORKLOADS",
    "FeatureTable",
    "ImageDataset",
    "IndexDataset",
    "cnn_flops_per_feature",
    "cnn_layer_widths",
    "make_cnn",
    "make_images",
    "offset_features",
    "workload_flops_per_feature",
    "workload_layer_widths",
    "workload_layers",
    "workload_model",
    "workload_text",
]

# the layers every tool compares, in order; output features per sample in the comment
DEFAULT_CHANNELS = (8, 16, 32)
CNN_LAYERS = [
    "block1",  # c1 × 16 × 16 (block outputs: after ReLU and pooling); 2048 for c1 = 8
    "block2",  # c2 × 8 × 8; 1024
    "block3",  # c3 × 4 × 4; 512
    "head.relu",  # 128
]


class _ConvBlock(nn.Module):
    """Two 3×3 conv + BN layers (VGG style), ReLU, then 2×2 max pooling: the captured output."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, padding=1)
        self.norm2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm1(self.conv1(x)))
        return self.pool(self.relu(self.norm2(self.conv2(x))))


class _Head(nn.Module):
    def __init__(self, p_in: int, width: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(p_in, width)
        self.relu = nn.ReLU()
        self.out = nn.Linear(width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.relu(self.fc(x.flatten(1))))


class SmallCNN(nn.Module):
    """3×32×32 → three two-conv blocks (``channels``; each halves the size) → dense head.

    With the default (8, 16, 32) channels: about 5.3 MFLOP per image, ~1400 FLOP per captured
    feature (ResNet-18's block outputs at 224²: ~4800), a small model on the cheap side of real
    ones; (16, 32, 64): ~20 MFLOP per image, ~2700 FLOP per captured feature.
    """

    def __init__(self, channels: tuple[int, int, int] = DEFAULT_CHANNELS) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.block1 = _ConvBlock(3, c1)
        self.block2 = _ConvBlock(c1, c2)
        self.block3 = _ConvBlock(c2, c3)
        self.head = _Head(c3 * 4 * 4, 128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block3(self.block2(self.block1(x))))


def make_cnn(seed: int, channels: tuple[int, int, int] = DEFAULT_CHANNELS) -> SmallCNN:
    """A :class:`SmallCNN` initialised from ``seed``, in eval mode, with non-trivial BN statistics.

    The BatchNorm running statistics are set from the seed as well (as a trained net's would be
    non-default), so two seeds differ in every layer.
    """
    return seeded_eval_model(lambda: SmallCNN(channels), seed)


def cnn_layer_widths(channels: tuple[int, ...] | list[int]) -> list[int]:
    """Features per sample of the four compared layers (block outputs are 16², 8², 4² maps)."""
    return [c * side for c, side in zip(channels, (256, 64, 16), strict=True)] + [128]


def cnn_flops_per_feature(channels: tuple[int, ...] | list[int]) -> float:
    """Forward FLOP per image of the CNN, over its compared features per image."""
    c1, c2, c3 = channels
    multiply_adds = (
        (3 * c1 + c1 * c1) * 9 * 32 * 32  # block 1: two 3×3 convs at 32²
        + (c1 * c2 + c2 * c2) * 9 * 16 * 16
        + (c2 * c3 + c3 * c3) * 9 * 8 * 8
        + c3 * 16 * 128
        + 128 * 10
    )
    return 2 * multiply_adds / sum(cnn_layer_widths(channels))


def make_images(n: int, seed: int = 0) -> torch.Tensor:
    """``n`` synthetic images, float32 tensor (n, 3, 32, 32), deterministic in ``seed``.

    Each image is a low-frequency random field (bilinear upsampling of 4×4 noise) plus one of 8
    oriented stripe patterns with a random phase, plus a little pixel noise.
    """
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.normal(size=(n, 3, 4, 4)).astype(np.float32))
    fields = nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    angles = rng.integers(0, 8, size=n) * (np.pi / 8)
    phases = rng.uniform(0, 2 * np.pi, size=n)
    stripes = np.sin(
        0.6 * (np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy)
        + phases[:, None, None]
    ).astype(np.float32)
    noise = rng.normal(scale=0.1, size=(n, 3, 32, 32)).astype(np.float32)
    return fields + torch.from_numpy(stripes)[:, None] + torch.from_numpy(noise)


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset over an image tensor; item ``i`` is the tensor ``images[i]`` (3, 32, 32)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def offset_features(
    n: int, p: int, *, seed: int, offset_ratio: float = 100.0, shared: np.ndarray | None = None
) -> np.ndarray:
    """Post-ReLU-like float32 features (n, p) whose mean is ``offset_ratio`` × their spread.

    ``relu(z) + offset`` with z a mix of a shared latent (n, k) (so two calls with the same
    ``shared`` give related layers) and independent noise. With offset ≫ spread, uncentered
    Gram entries are ~p·offset² while the signal is ~p·spread²: HSIC's terms cancel.
    """
    rng = np.random.default_rng(seed)
    if shared is None:
        shared = np.zeros((n, 1))
    mixing = rng.normal(size=(shared.shape[1], p)) / np.sqrt(shared.shape[1])
    z = shared @ mixing + rng.normal(size=(n, p))
    relu = np.maximum(z, 0.0)
    # relu(standard normal-ish) has spread ~0.6–1; scale the offset to the measured spread
    offset = offset_ratio * float(relu.std())
    return (relu + offset).astype(np.float32)


class IndexDataset(torch.utils.data.Dataset):
    """Item ``i`` is the int64 scalar tensor ``i`` (the input of a :class:`FeatureTable`)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(index, dtype=torch.int64)


class _Lookup(nn.Module):
    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.table[index]


class FeatureTable(nn.Module):
    """A "model" whose layer ``layerK`` outputs row ``index`` of the K-th fixed feature matrix.

    Lets hook-based tools (and ckapipe's extraction) see exactly the given float32 features:
    input an int64 index batch (B,), layer outputs (B, p_K).
    """

    def __init__(self, tables: list[np.ndarray]):
        super().__init__()
        self.layers = nn.ModuleList(_Lookup(torch.from_numpy(t)) for t in tables)

    @property
    def layer_names(self) -> list[str]:
        return [f"layers.{k}" for k in range(len(self.layers))]

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        outputs = [layer(index) for layer in self.layers]
        return outputs[-1]


# the study's model families (bench/run.py --workload)
WORKLOADS = ("cnn", "resnet18")


def _check_workload(name: str) -> None:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOADS}")


def workload_layers(name: str) -> list[str]:
    """The layers every tool compares in workload ``name``, in order."""
    _check_workload(name)
    return list(CNN_LAYERS if name == "cnn" else RESNET18_LAYERS)


def workload_model(name: str, seed: int, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> nn.Module:
    """Workload ``name``'s model for ``seed`` (eval mode); ``channels`` only shape the CNN."""
    _check_workload(name)
    return make_cnn(seed, tuple(channels)) if name == "cnn" else make_resnet18(seed)


def workload_layer_widths(name: str, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> list[int]:
    """Features per sample of the compared layers of workload ``name``."""
    _check_workload(name)
    return cnn_layer_widths(channels) if name == "cnn" else resnet18_layer_widths()


def workload_flops_per_feature(name: str, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> float:
    """Forward FLOP per image over compared features per image, for workload ``name``."""
    _check_workload(name)
    return cnn_flops_per_feature(channels) if name == "cnn" else resnet18_flops_per_feature()


def workload_text(name: str, channels: tuple[int, ...] = DEFAULT_CHANNELS) -> str:
    """One phrase for RESULTS.md: the model family and its compared layers' widths."""
    widths = ", ".join(str(w) for w in workload_layer_widths(name, channels))
    if name == "cnn":
        return f"CNN block channels {tuple(channels)} (layer widths {widths})"
    return (
        "CIFAR-style ResNet-18 (random init; stem + 8 BasicBlock outputs, flattened; layer "
        f"widths {widths})"
    )
