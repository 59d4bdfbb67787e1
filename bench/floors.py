"""Floors: raw chunk reads of a store vs the Gram pass over it, forward pass vs extraction.

On one CNN (seed 100) over the study's n images: bytes/s of raw chunk reads of its float16
store (warm page cache) vs ckapipe's Gram pass and vs the pass's arithmetic alone; seconds of
the forward pass alone vs forward + plain hooks vs ckapipe's extraction (forward + capture +
store write). Medians of ``floor_repeats`` interleaved repeats.

Alone: ``python bench/floors.py [--quick] [--device cuda] [--channels 16,32,64]``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_gram_pass import raw_chunk_read, store_bytes
from harness import TARGETS, BenchRun, standalone_main, verdict
from report import log, median, timed
from workload import CNN_LAYERS, ImageDataset, make_images

KEY = "floors"


def _gram_compute_seconds(bench: BenchRun, store_path: Path, m: int) -> float:
    """The Gram pass's arithmetic alone: float64 centered (m, m) Grams of data already in memory."""
    from ckapipe.store import ActivationStore

    store = ActivationStore.open(store_path)
    layers = [
        torch.from_numpy(np.asarray(store.read(name))).to(bench.device)
        for name in store.layer_names
    ]
    bench.synchronize()
    start = time.perf_counter()
    for x in layers:
        for row in range(0, x.shape[0] - m + 1, m):
            batch = x[row : row + m].double()
            batch = batch - batch.mean(dim=0)
            batch @ batch.T
    bench.synchronize()
    return time.perf_counter() - start


def _forward_with_hooks(
    bench: BenchRun, model: torch.nn.Module, loader: torch.utils.data.DataLoader
) -> None:
    """Forward + plain hooks keeping a float32 (B, p) copy per layer: what a hook tool pays."""
    modules = dict(model.named_modules())
    kept: dict[str, torch.Tensor] = {}
    handles = [
        modules[name].register_forward_hook(
            lambda mod, args, out, name=name: kept.__setitem__(name, out.flatten(1).float().clone())
        )
        for name in CNN_LAYERS
    ]
    try:
        bench.forward(model, loader)
    finally:
        for handle in handles:
            handle.remove()


def run(bench: BenchRun) -> dict[str, Any]:
    cfg, root = bench.cfg, bench.root
    log(f"floors (n={cfg.n}, {cfg.floor_repeats} repeats)")
    dataset = ImageDataset(make_images(cfg.n, seed=0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.m, shuffle=False)
    model = bench.cnn(100)
    store = bench.extract(model, dataset, CNN_LAYERS, root / "floor_store.zarr", cfg.m)
    raw_chunk_read(store)  # warm the page cache: both readers then read warm
    times: dict[str, list[float]] = {
        key: [] for key in ("raw", "gram", "compute", "forward", "hooks", "extract")
    }
    for repeat in range(cfg.floor_repeats):
        times["raw"].append(raw_chunk_read(store))
        times["compute"].append(_gram_compute_seconds(bench, store, cfg.m))
        cache = root / f"floor_gram{repeat}.zarr"
        times["gram"].append(timed(lambda cache=cache: bench.gram(store, cache, cfg.m))[0])
        shutil.rmtree(cache, ignore_errors=True)
        times["forward"].append(timed(lambda: bench.forward(model, loader))[0])
        times["hooks"].append(timed(lambda: _forward_with_hooks(bench, model, loader))[0])
        out = root / f"floor_extract{repeat}.zarr"
        times["extract"].append(
            timed(lambda out=out: bench.extract(model, dataset, CNN_LAYERS, out, cfg.m))[0]
        )
        shutil.rmtree(out, ignore_errors=True)
    s = {key: median(values) for key, values in times.items()}
    megabytes = store_bytes(store) / 1e6
    return {
        "n": cfg.n,
        "store_mb": megabytes,
        "raw_read_s": s["raw"],
        "gram_pass_s": s["gram"],
        "raw_read_mb_s": megabytes / s["raw"],
        "gram_pass_mb_s": megabytes / s["gram"],
        "gram_over_raw": s["raw"] / s["gram"],
        "gram_compute_only_s": s["compute"],
        "gram_compute_only_mb_s": megabytes / s["compute"],
        "forward_s": s["forward"],
        "forward_hooks_s": s["hooks"],
        "extract_s": s["extract"],
        "extract_over_forward": s["extract"] / s["forward"],
        "extract_overhead_s": s["extract"] - s["forward"],
        "raw": times,
    }


def table_rows(result: dict[str, Any]) -> list[str]:
    floors = result[KEY]
    bar = TARGETS["gram_pass_over_raw_read"]
    return [
        f"| Gram pass vs raw chunk read ({floors['store_mb']:.0f} MB float16 store; "
        f"its float64 arithmetic alone: {floors['gram_compute_only_mb_s']:.0f} MB/s) | "
        f"{floors['gram_pass_mb_s']:.0f} MB/s | {floors['raw_read_mb_s']:.0f} MB/s (read) | "
        f"{floors['gram_over_raw']:.2f} | ≥ {bar:g}: {verdict(floors['gram_over_raw'], bar)} |",
        f"| extraction vs forward only (n={floors['n']}; forward+hooks "
        f"{floors['forward_hooks_s']:.2f} s) | {floors['extract_s']:.2f} s | "
        f"{floors['forward_s']:.2f} s (forward) | {floors['extract_over_forward']:.2f}× | |",
    ]


def notes(result: dict[str, Any]) -> list[str]:
    floors = result.get(KEY)
    if not floors:
        return []
    return [
        f"- **Floors** (n = {floors['n']}). Forward only {floors['forward_s']:.2f} s, forward "
        f"+ plain hooks {floors['forward_hooks_s']:.2f} s, ckapipe extraction "
        f"{floors['extract_s']:.2f} s (overhead {floors['extract_overhead_s']:.2f} s over the "
        f"forward pass: capture, input fingerprint, float16 store write). Raw chunk read "
        f"{floors['raw_read_s']:.3f} s vs Gram pass {floors['gram_pass_s']:.3f} s for "
        f"{floors['store_mb']:.0f} MB (warm page cache). The Gram pass's arithmetic alone "
        f"(float64 centering + (m×m) products on data already in memory) takes "
        f"{floors['gram_compute_only_s']:.3f} s = {floors['gram_compute_only_mb_s']:.0f} MB/s: "
        f"m = {result['config']['m']} multiply-adds per stored value make the pass "
        f"compute-bound on a CPU, so the 80 % of raw-read target cannot be met here by any "
        f'implementation (see the section "Analyze stage: store read vs Gram pass": it '
        f"applies on a GPU)."
    ]


if __name__ == "__main__":
    standalone_main(sys.modules[__name__])
