"""Benchmark (not a test): CKA error of float16 storage, before and after the offset/scale encoding.

End to end: activations → a real float16 store on disk → CKA, against float64 CKA on the
unrounded (float32) activations. "before" is the previous storage rule, a plain cast to float16
(what the store's encoder did); "after" is the current store, read the way the analysis reads it
(the raw stored residuals) and through ``ActivationStore.read`` (reconstructed values).
CKA is HSIC₁ over all n samples (``ckapipe.analyze.estimators.cka(unbiased=True)``), linear and
RBF (median bandwidth); each row reports the largest |error| over its layer pairs.

Cases: post-ReLU features whose mean is 100× their spread (``workload.offset_features``); the
bench CNNs' real activations (``workload.make_cnn`` seeds 0 and 1, 4 layers each, all 16 pairs);
the same CNN layers multiplied by 1e-6 and 1e-8 (tiny-magnitude layers).

Also the costs on the extraction hot path, per batch of 64: the forward pass of the bench CNN,
the input fingerprint (``input_sample_digests``, main thread) for 3×32×32 and 3×224×224 inputs,
and the float16 encoding of a 256-row block (plain cast vs offset/scale + rounding check).

Usage::

    python bench/bench_float16_storage.py            # n = 1024
    python bench/bench_float16_storage.py --quick    # n = 512
    python bench/bench_float16_storage.py --costs-only
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import workload  # noqa: E402

from ckapipe.analyze.estimators import cka  # noqa: E402
from ckapipe.extract.extraction import input_sample_digests  # noqa: E402
from ckapipe.store import ActivationStore, LayerRecord  # noqa: E402

ROW_BLOCK = 256


def _cka(x: np.ndarray, y: np.ndarray, kernel: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a degenerate (constant) layer gives NaN, reported
        try:
            return cka(x, y, kernel=kernel, unbiased=True)
        except ValueError:  # RBF bandwidth 0: the layer is constant (all flushed to zero)
            return float("nan")


def _through_store(root: Path, layers: dict[str, np.ndarray]) -> ActivationStore:
    n = next(iter(layers.values())).shape[0]
    records = [
        LayerRecord(name, (v.shape[1],), "flatten", v.shape[1]) for name, v in layers.items()
    ]
    path = Path(tempfile.mkdtemp(dir=root)) / "store"
    with ActivationStore.create(
        path, layers=records, sample_ids=np.arange(n), dtype="float16", row_block=ROW_BLOCK
    ) as store:
        for start in range(0, n, ROW_BLOCK):
            store.write_rows(start, {k: v[start : start + ROW_BLOCK] for k, v in layers.items()})
            store.set_rows_complete(min(n, start + ROW_BLOCK))
        store.mark_complete()
    return ActivationStore.open(path)


def _errors(
    root: Path, a: dict[str, np.ndarray], b: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    """Largest |CKA − float64 CKA| over all pairs a × b, per storage rule and kernel."""
    store = _through_store(
        root, {**{f"a.{k}": v for k, v in a.items()}, **{f"b.{k}": v for k, v in b.items()}}
    )
    versions = {
        "before: plain float16 cast": lambda name, v: v.astype(np.float16),
        "after: stored residuals (as the analysis reads)": lambda name, v: store.array(name)[:],
        "after: ActivationStore.read": lambda name, v: store.read(name),
    }
    result: dict[str, dict[str, float]] = {}
    for kernel in ("linear", "rbf"):
        for label, stored in versions.items():
            worst = 0.0
            for ka, va in a.items():
                for kb, vb in b.items():
                    exact = _cka(va.astype(np.float64), vb.astype(np.float64), kernel)
                    got = _cka(stored(f"a.{ka}", va), stored(f"b.{kb}", vb), kernel)
                    error = abs(got - exact) if np.isfinite(got) else float("nan")
                    worst = error if not np.isfinite(error) else max(worst, error)
                    if not np.isfinite(worst):
                        break
            result.setdefault(label, {})[kernel] = worst
    return result


def _cnn_layers(seed: int, images: torch.Tensor) -> dict[str, np.ndarray]:
    net = workload.make_cnn(seed)
    captured: dict[str, np.ndarray] = {}
    hooks = [
        net.get_submodule(name).register_forward_hook(
            lambda module, inputs, output, name=name: captured.__setitem__(
                name, output.reshape(output.shape[0], -1).numpy().copy()
            )
        )
        for name in workload.CNN_LAYERS
    ]
    with torch.no_grad():
        net(images)
    for hook in hooks:
        hook.remove()
    return captured


def accuracy(n: int, root: Path) -> list[tuple[str, dict[str, dict[str, float]]]]:
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(n, 8))
    offset_a = {"x": workload.offset_features(n, 512, seed=1, shared=shared)}
    offset_b = {"y": workload.offset_features(n, 256, seed=2, shared=shared)}
    images = workload.make_images(n, seed=0)
    m0, m1 = _cnn_layers(0, images), _cnn_layers(1, images)
    rows = [
        (
            "post-ReLU features, mean 100× spread (512 vs 256 features)",
            _errors(root, offset_a, offset_b),
        ),
        ("bench CNNs m0 vs m1, real activations (4 × 4 layers)", _errors(root, m0, m1)),
    ]
    for factor in (1e-6, 1e-8):
        tiny = {k: (v * factor).astype(np.float32) for k, v in m0.items()}
        rows.append((f"CNN m0 layers × {factor:g} vs m1 (4 × 4 layers)", _errors(root, tiny, m1)))
    return rows


def _median_time(function, repeats: int = 7) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def costs() -> list[tuple[str, float]]:
    net = workload.make_cnn(0)
    small = workload.make_images(64, seed=1)
    large = torch.randn(64, 3, 224, 224)
    with torch.no_grad():
        forward = _median_time(lambda: net(small))
    block = (
        np.maximum(np.random.default_rng(0).normal(size=(ROW_BLOCK, 2048)), 0).astype(np.float32)
        + 3
    )
    root = Path(tempfile.mkdtemp())
    store = ActivationStore.create(
        root / "s",
        layers=[LayerRecord("l", (2048,), "flatten", 2048)],
        sample_ids=np.arange(ROW_BLOCK),
        row_block=ROW_BLOCK,
    )
    store.write_rows(0, {"l": block})  # records the layer's offsets and scale
    tensor = torch.from_numpy(block)
    result = [
        ("bench CNN forward pass, 64 × 3×32×32", forward),
        ("input fingerprint, 64 × 3×32×32", _median_time(lambda: input_sample_digests(small))),
        (
            "input fingerprint, 64 × 3×224×224",
            _median_time(lambda: input_sample_digests(large)),
        ),
        (
            "float16 encode 256 × 2048, before: plain cast",
            _median_time(lambda: tensor.to(torch.float16)),
        ),
        (
            "float16 encode 256 × 2048, after: offset/scale + check",
            _median_time(lambda: store._encode("l", block, 0)),
        ),
    ]
    store.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 512 instead of 1024")
    parser.add_argument("--costs-only", action="store_true", help="only the cost table")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    n = 512 if args.quick else 1024
    if not args.costs_only:
        with tempfile.TemporaryDirectory() as tmp:
            rows = accuracy(n, Path(tmp))
        print("## float16 storage: CKA error before/after the offset/scale encoding")
        print()
        print(
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch threads "
            f"{torch.get_num_threads()}; {dt.date.today().isoformat()}; n = {n}, HSIC₁ over all n; "
            "max |CKA − float64 CKA on the unrounded activations| over the layer pairs."
        )
        print()
        labels = list(rows[0][1])
        print("| case | kernel | " + " | ".join(labels) + " |")
        print("|---|---|" + "---|" * len(labels))
        for case, errors in rows:
            for kernel in ("linear", "rbf"):
                cells = []
                for label in labels:
                    value = errors[label][kernel]
                    cells.append(
                        "NaN (layer constant)" if not np.isfinite(value) else f"{value:.1e}"
                    )
                print(f"| {case} | {kernel} | " + " | ".join(cells) + " |")
    print()
    print("| cost per batch / block | median |")
    print("|---|---|")
    for label, seconds in costs():
        print(f"| {label} | {seconds * 1e3:.2f} ms |")


if __name__ == "__main__":
    main()
