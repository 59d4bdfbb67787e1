"""The demo dataset: procedurally generated 16×16 grayscale images of oriented gratings.

Class ``c`` of ``n_classes`` is a sinusoidal grating at orientation ``c · 180° / n_classes``,
with a random phase, a jittered spatial frequency and contrast, plus Gaussian pixel noise. The
random phase makes the classes impossible to separate linearly from pixels (the mean image of
every class is ~0), so a network has to build orientation-selective, phase-invariant features —
enough structure for layers to differ, small enough to train on a CPU in seconds.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same arguments give
byte-identical arrays on every machine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["make_gratings", "write_split"]


def make_gratings(
    n: int, *, n_classes: int = 6, image_size: int = 16, noise: float = 0.6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Generate ``n`` labelled grating images.

    Parameters
    ----------
    n:
        Number of images (≥ 1).
    n_classes:
        Number of orientations (classes), 2–12.
    image_size:
        Height and width in pixels (≥ 8).
    noise:
        Standard deviation of the additive Gaussian pixel noise (the grating amplitude is ~1).
    seed:
        Seed of the generator; the output is a pure function of the arguments.

    Returns
    -------
    images:
        (n, 1, image_size, image_size) float32.
    labels:
        (n,) int64 in ``[0, n_classes)``, balanced (each class appears ``n // n_classes`` or one
        more times), in random order.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 2 <= n_classes <= 12:
        raise ValueError(f"n_classes must be in [2, 12], got {n_classes}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    if noise < 0 or not math.isfinite(noise):
        raise ValueError(f"noise must be a finite number >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % n_classes).astype(np.int64)
    angle = labels * (math.pi / n_classes) + rng.uniform(-0.08, 0.08, n)  # (n,)
    # cycles per image: 2.5–4 keeps several stripes visible at 16 px without aliasing
    frequency = rng.uniform(2.5, 4.0, n) * 2 * math.pi / image_size  # (n,)
    phase = rng.uniform(0, 2 * math.pi, n)  # (n,)
    contrast = rng.uniform(0.7, 1.3, n)  # (n,)
    coords = np.arange(image_size, dtype=np.float64) - (image_size - 1) / 2
    yy, xx = np.meshgrid(coords, coords, indexing="ij")  # (s, s) each
    projection = (
        np.cos(angle)[:, None, None] * xx[None] + np.sin(angle)[:, None, None] * yy[None]
    )  # (n, s, s)
    images = contrast[:, None, None] * np.sin(
        frequency[:, None, None] * projection + phase[:, None, None]
    )
    images += rng.normal(0.0, noise, images.shape)
    return images[:, None].astype(np.float32), labels


def write_split(
    out_dir: str | Path,
    split: str,
    n: int,
    *,
    n_classes: int,
    image_size: int,
    noise: float,
    seed: int,
) -> tuple[Path, Path]:
    """Write one split as ``<split>_images.npy`` (n, 1, s, s) and ``<split>_labels.npy`` (n,)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = make_gratings(
        n, n_classes=n_classes, image_size=image_size, noise=noise, seed=seed
    )
    image_path = out_dir / f"{split}_images.npy"
    label_path = out_dir / f"{split}_labels.npy"
    np.save(image_path, images)
    np.save(label_path, labels)
    return image_path, label_path
