"""Benchmark: minibatch Gram caches stored in float64 vs float32 (``--storage``).

Builds M synthetic stores (those of ``bench_all_pairs.py``) and, from each, one minibatch Gram
cache per storage dtype (same float32-product precision, not timed). Reports each cache's size on
disk and times, interleaved (float64, float32, float32, float64, ... so that drift in the
machine's load hits both alike), in one process with 1 torch thread:

* the all-pairs step, :func:`~ckapipe.analyze.study.analyze_study` over every pair of the M
  caches (a < b plus each model with itself; default intervals, result written);
* reading alone: iterating the M caches once in lockstep (:func:`stacked_batches`).

Also prints the largest |CKA(float32 storage) − CKA(float64 storage)| over all layer pairs.
Prints a markdown table; not a test (nothing asserts).

Run: ``OMP_NUM_THREADS=1 python bench/bench_gram_storage.py [--n 2048 --models 4 --repeats 5]``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_all_pairs import make_store
from report import machine, machine_text, utc_now

from ckapipe.analyze.gram_cache import GramCache, build_gram_cache
from ckapipe.analyze.minibatch_pairs import stacked_batches
from ckapipe.analyze.study import analyze_study

STORAGES = ("float64", "float32")


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="samples per store")
    parser.add_argument("--batch-size", type=int, default=256, help="minibatch size m")
    parser.add_argument("--layers", type=int, default=8, help="layers per model")
    parser.add_argument("--width", type=int, default=64, help="features per layer")
    parser.add_argument("--models", type=int, default=4, help="model count M")
    parser.add_argument("--repeats", type=int, default=5, help="runs per storage (interleaved)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="ckapipe-bench-storage-"))
    try:
        sample_ids = np.random.default_rng(0).permutation(args.n)
        caches: dict[str, list[GramCache]] = {storage: [] for storage in STORAGES}
        for k in range(args.models):
            store = make_store(
                workdir / f"m{k}.store", args.n, args.layers, args.width, k, sample_ids
            )
            for storage in STORAGES:
                caches[storage].append(
                    build_gram_cache(
                        store,
                        workdir / f"m{k}.{storage}.grams",
                        batch_size=args.batch_size,
                        device="cpu",
                        storage=storage,
                    )
                )
        sizes = {s: disk_bytes(caches[s][0].path) / 2**20 for s in STORAGES}
        runs = iter(range(10**6))
        times: dict[tuple[str, str], list[float]] = {
            (what, s): [] for what in ("step", "read") for s in STORAGES
        }
        results = {}

        def step(storage: str) -> None:
            out = workdir / f"result-{storage}-{next(runs)}.zarr"
            names = [f"m{k}" for k in range(args.models)]
            results[storage] = analyze_study(caches[storage], out, names=names, device="cpu")

        def read(storage: str) -> None:
            named = {str(i): cache for i, cache in enumerate(caches[storage])}
            for _ in stacked_batches(named, list(named), torch.device("cpu")):
                pass

        for storage in STORAGES:  # warm-up: page cache and first-call costs, not timed
            step(storage)
            read(storage)
        for repeat in range(args.repeats):
            order = STORAGES if repeat % 2 == 0 else STORAGES[::-1]
            for what, fn in (("step", step), ("read", read)):
                for storage in order:
                    t0 = time.perf_counter()
                    fn(storage)
                    times[what, storage].append(time.perf_counter() - t0)
        worst = max(
            float(np.abs(pair.cka - results["float64"].pairs[key].cka).max())
            for key, pair in results["float32"].pairs.items()
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    median = {key: statistics.median(values) for key, values in times.items()}
    pairs = args.models * (args.models + 1) // 2
    print(f"Machine: {machine_text(machine(), 'at the end')}. Date: {utc_now()}.")
    print(
        f"n = {args.n}, m = {args.batch_size}, {args.layers} layers x {args.width} features, "
        f"M = {args.models} models ({pairs} pairs), {args.threads} torch thread(s), "
        f"{args.repeats} interleaved repeats; max |dCKA| float32 vs float64 storage {worst:.2e}"
    )
    print("| storage | cache on disk per model (MiB) | all-pairs step (s) | reading only (s) |")
    print("|---|---:|---:|---:|")
    for s in STORAGES:
        step_runs = ", ".join(f"{t:.3f}" for t in times["step", s])
        print(
            f"| {s} | {sizes[s]:.1f} | {median['step', s]:.3f} ({step_runs}) | "
            f"{median['read', s]:.3f} |"
        )


if __name__ == "__main__":
    main()
