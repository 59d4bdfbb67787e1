"""Small models and datasets for the extract-stage tests.

Imported as the top-level module ``models``: pytest puts ``tests/`` on ``sys.path`` (rootdir
``prepend`` import mode, no ``__init__.py``), and the subprocess tests set ``PYTHONPATH`` to this
folder, so specs read ``models:make_cnn``.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch
from torch import nn


def make_cnn(channels: int = 8, seed: int = 0) -> nn.Module:
    """(B, 3, 8, 8) → 10 logits; conv outputs are 4-D."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * channels, 10),
    )


def make_mlp(in_features: int = 12, hidden: int = 16, seed: int = 0) -> nn.Module:
    """(B, in_features) → 4; every output is 2-D."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.Tanh(),
        nn.Linear(hidden, hidden),
        nn.Tanh(),
        nn.Linear(hidden, 4),
    )


class ReorderedNet(nn.Module):
    """Registration order late, early; execution order early → late (hooks fire early first)."""

    def __init__(self, in_features: int = 12, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.late = nn.Linear(8, 5)
        self.early = nn.Linear(in_features, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(torch.relu(self.early(x)))


def make_reordered(in_features: int = 12, seed: int = 0) -> nn.Module:
    return ReorderedNet(in_features, seed)


class TwiceNet(nn.Module):
    """``block`` runs twice per forward; ``unused`` never runs."""

    def __init__(self, in_features: int = 12, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(in_features, 6)
        self.block = nn.Linear(6, 6)
        self.unused = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        return self.block(torch.tanh(self.block(h)))


def make_twice(in_features: int = 12, seed: int = 0) -> nn.Module:
    return TwiceNet(in_features, seed)


class TupleNet(nn.Module):
    """A GRU (returns ``(output, h_n)``) on (B, T, D) sequences, then a linear head."""

    def __init__(self, features: int = 6, hidden: int = 5, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.gru = nn.GRU(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output, _ = self.gru(x)
        return self.head(output[:, -1])


def make_tuple_net(features: int = 6, hidden: int = 5, seed: int = 0) -> nn.Module:
    return TupleNet(features, hidden, seed)


class SqrtNet(nn.Module):
    """``root`` is sqrt of the input: NaN for every sample holding a negative value."""

    def __init__(self):
        super().__init__()
        self.root = Sqrt()
        self.fc = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.root(x))


class Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


def make_sqrt_net() -> nn.Module:
    torch.manual_seed(0)
    return SqrtNet()


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def make_scaled_mlp(factor: float = 1e6) -> nn.Module:
    """An MLP whose ``scale`` layer multiplies by ``factor`` (beyond float16's range)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 4), Scale(factor))


def make_tiny_bert(seed: int = 0) -> nn.Module:
    """A randomly initialised 2-layer BERT (hidden 32), built from a config: no download."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertModel(config).eval()


# -- datasets ---------------------------------------------------------------------------------
def _rng_tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def image_dataset(n: int = 40, size: int = 8, seed: int = 0) -> torch.utils.data.Dataset:
    """Items ``(image (3, size, size), label)``: the input is element 0 of a tuple."""
    images = _rng_tensor((n, 3, size, size), seed)
    labels = torch.arange(n) % 10
    return torch.utils.data.TensorDataset(images, labels)


class VectorDataset(torch.utils.data.Dataset):
    """Items are plain (features,) non-negative tensors; sample ``negative`` gets a -1.

    If the environment variable ``CKAPIPE_TEST_STALL_AT`` names a dataset index, loading that
    item blocks for 10 minutes: a child process then stops at a known row, without changing the
    spec, until the test kills it. ``CKAPIPE_TEST_FAIL_AT`` makes loading that item raise.
    """

    def __init__(self, n: int = 40, features: int = 12, seed: int = 0, negative: int | None = None):
        self.data = _rng_tensor((n, features), seed).abs()
        if negative is not None:
            self.data[negative, 0] = -1.0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> torch.Tensor:
        if os.environ.get("CKAPIPE_TEST_STALL_AT") == str(index):
            time.sleep(600)
        if os.environ.get("CKAPIPE_TEST_FAIL_AT") == str(index):
            raise RuntimeError(f"test failure loading item {index}")
        return self.data[index]


def vector_dataset(
    n: int = 40, features: int = 12, seed: int = 0, negative: int | None = None
) -> VectorDataset:
    return VectorDataset(n, features, seed, negative)


def sequence_dataset(
    n: int = 24, length: int = 7, features: int = 6, seed: int = 0
) -> torch.utils.data.Dataset:
    """Items are (length, features) sequences."""
    return torch.utils.data.TensorDataset(_rng_tensor((n, length, features), seed))


class TokenDataset(torch.utils.data.Dataset):
    """Dict items ``input_ids``, ``attention_mask`` (length ``seq_len``, right padding)."""

    def __init__(self, n: int = 24, seq_len: int = 10, vocab: int = 100, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ids = torch.from_numpy(rng.integers(1, vocab, size=(n, seq_len)))
        lengths = rng.integers(3, seq_len + 1, size=n)
        self.mask = torch.from_numpy(
            (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int64)
        )
        self.ids = self.ids * self.mask  # pad id 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": self.mask[index]}


def token_dataset(n: int = 24, seq_len: int = 10, vocab: int = 100, seed: int = 0) -> TokenDataset:
    return TokenDataset(n, seq_len, vocab, seed)


def add_offset(offset: float = 1.0):
    """A transform factory: adds ``offset`` to the input (a changed preprocessing)."""

    def transform(x: torch.Tensor) -> torch.Tensor:
        return x + offset

    return transform


def double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def string_dataset(n: int = 4) -> list[str]:
    """Items that cannot be batched into tensors."""
    return [f"item {i}" for i in range(n)]
