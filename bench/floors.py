"""Floors: raw chunk reads of a store vs the Gram pass over it, forward pass vs extraction.

On one CNN (seed 100) over the study's n images: bytes/s of raw chunk reads of its float16
store (warm page cache) vs ckapipe's Gram pass and vs the pass's arithmetic alone; seconds of
the forward pass alone vs forward + plain hooks vs ckapipe's extraction (forward + capture +
store write), vs the fused extraction that also writes the Gram cache, vs extraction then
``gram``, at 1 and 2 torch threads; store creation, and one chunk write through zarr vs a raw
write of the same bytes. Medians of ``floor_repeats`` interleaved repeats.

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


def _write_floor(root: Path, store_path: Path, repeats: int) -> dict[str, float]:
    """Store creation (empty store of the same layers), and one chunk of the widest layer
    written through zarr (checksummed, as the extraction does) vs a raw write of its bytes."""
    import os

    import zarr

    from ckapipe.store import ActivationStore

    source = ActivationStore.open(store_path)
    widest = max(source.layers, key=lambda layer: layer.n_features)
    rows, columns = source.chunk_shape(widest.name)
    chunk = np.asarray(source.array(widest.name)[:rows, :columns])
    times: dict[str, list[float]] = {"create": [], "zarr_chunk": [], "raw_chunk": []}
    for repeat in range(repeats):
        path = root / f"floor_create{repeat}.zarr"
        start = time.perf_counter()
        created = ActivationStore.create(
            path, layers=source.layers, sample_ids=source.sample_ids, dtype=source.dtype,
            row_block=source.row_block,
        )  # fmt: skip
        times["create"].append(time.perf_counter() - start)
        array = zarr.open_array(str(path / "layers" / widest.name), mode="r+")
        start = time.perf_counter()
        array[:rows, :columns] = chunk
        times["zarr_chunk"].append(time.perf_counter() - start)
        created.close()
        raw = root / f"floor_raw{repeat}.bin"
        start = time.perf_counter()
        with open(raw, "wb") as handle:
            handle.write(chunk.tobytes())
        times["raw_chunk"].append(time.perf_counter() - start)
        os.unlink(raw)
        shutil.rmtree(path, ignore_errors=True)
    return {
        "store_create_s": median(times["create"]),
        "zarr_chunk_write_s": median(times["zarr_chunk"]),
        "raw_chunk_write_s": median(times["raw_chunk"]),
        "chunk_bytes": int(chunk.nbytes),
    }


def _extraction_by_threads(
    bench: BenchRun, model: torch.nn.Module, dataset: Any, loader: Any, repeats: int
) -> dict[str, dict[str, float]]:
    """Forward, forward + hooks, extraction, fused extraction + Gram cache, and extraction then
    `gram`, interleaved, at 1 and 2 torch threads (medians)."""
    m, root = bench.cfg.m, bench.root
    before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {
                key: [] for key in ("forward", "hooks", "extract", "fused", "gram")
            }
            for repeat in range(repeats):
                out, cache = root / f"t{threads}_{repeat}.zarr", root / f"t{threads}_{repeat}.g"
                times["forward"].append(timed(lambda: bench.forward(model, loader))[0])
                times["hooks"].append(timed(lambda: _forward_with_hooks(bench, model, loader))[0])
                times["extract"].append(
                    timed(lambda out=out: bench.extract(model, dataset, CNN_LAYERS, out, m))[0]
                )
                times["gram"].append(timed(lambda out=out, c=cache: bench.gram(out, c, m))[0])
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
                times["fused"].append(
                    timed(
                        lambda out=out, c=cache: bench.extract(
                            model, dataset, CNN_LAYERS, out, m, gram_out=c
                        )
                    )[0]
                )
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(cache, ignore_errors=True)
            s = {key: median(values) for key, values in times.items()}
            results[str(threads)] = {
                **{f"{key}_s": value for key, value in s.items()},
                "extract_over_hooks": s["extract"] / s["hooks"],
                "fused_over_hooks": s["fused"] / s["hooks"],
                "extract_then_gram_s": s["extract"] + s["gram"],
                "fused_over_extract_then_gram": s["fused"] / (s["extract"] + s["gram"]),
            }
            log(f"  {threads} thread(s): {results[str(threads)]}")
    finally:
        torch.set_num_threads(before)
    return results


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
    by_threads = _extraction_by_threads(bench, model, dataset, loader, cfg.floor_repeats)
    writes = _write_floor(root, store, cfg.floor_repeats)
    return {
        "threads": by_threads,
        **writes,
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
        *(
            f"| extraction vs forward + hooks, {threads} torch thread(s) (fused with the Gram "
            f"cache: {row['fused_s']:.2f} s = {row['fused_over_hooks']:.2f}×; extract then gram "
            f"{row['extract_then_gram_s']:.2f} s) | {row['extract_s']:.2f} s | "
            f"{row['hooks_s']:.2f} s (forward + hooks) | {row['extract_over_hooks']:.2f}× | "
            f"≤ 1.25: {verdict(row['extract_over_hooks'], 1.25, higher_is_better=False)} |"
            for threads, row in floors.get("threads", {}).items()
        ),
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
