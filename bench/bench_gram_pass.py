"""Benchmark (not a test): store read throughput vs Gram-pass throughput, and peak memory.

On the same synthetic float16 stores, side by side in one run:

(a) raw chunk reads: every chunk of every layer into a reused buffer, one thread (the I/O floor),
    and the same through ``ckapipe.analyze.loader`` (thread pool + read-ahead, no compute);
(b) the minibatch Gram pass (``build_gram_cache``), float64 and float32 products, as store
    bytes per second, and its ratio to (a) (target ≥ 0.8);
(d) peak RSS of a minibatch Gram pass at n and 4n, each in a fresh subprocess (target: ≤ 20 %
    growth), next to the RSS of a process that only imported everything and opened the store.
Also the accuracy of float32 products: largest |CKA(float32) − CKA(float64)| over layer pairs.

Usage::

    python bench/bench_gram_pass.py            # n = 4096 / 16384, layers of 4k–32k features
    python bench/bench_gram_pass.py --quick    # seconds: n = 1024 / 4096, smaller layers
    python bench/bench_gram_pass.py --write    # also replace this benchmark's section of RESULTS.md

Timings are warm page cache (stores just written); medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from report import RESULTS_MD, machine, machine_text, median, proc_status_mb, utc_now, write_section


def make_store(path: Path, n: int, features: list[int], seed: int = 0) -> None:
    """A float16 store with post-ReLU-like layers sharing a 32-dim latent (so CKA is not ~0)."""
    import torch

    from ckapipe.store import ActivationStore, LayerRecord

    records = [LayerRecord(f"layer{i}", (p,), "flatten", p) for i, p in enumerate(features)]
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 32, generator=generator)
    mixes = [torch.randn(32, p, generator=generator) / 4 for p in features]
    store = ActivationStore.create(path, layers=records, sample_ids=np.arange(n), row_block=256)
    step = 512
    for start in range(0, n, step):
        z = latent[start : start + step]
        rows = {}
        for record, mix in zip(records, mixes, strict=True):
            noise = torch.randn(z.shape[0], mix.shape[1], generator=generator)
            rows[record.name] = torch.relu(z @ mix + noise + 1.0).numpy()
        store.write_rows(start, rows)
    store.set_rows_complete(n)
    store.mark_complete()
    store.close()


def store_bytes(path: Path) -> int:
    """Bytes of the stored values of every layer (no codec: what a full read moves)."""
    from ckapipe.store import ActivationStore

    store = ActivationStore.open(path)
    itemsize = 2 if store.dtype in ("float16", "bfloat16") else 4
    return sum(store.n_samples * layer.n_features * itemsize for layer in store.layers)


def raw_chunk_read(path: Path) -> float:
    """Seconds to read every chunk once, one thread, into a reused buffer per layer."""
    from zarr.core.buffer import default_buffer_prototype

    from ckapipe.store import ActivationStore

    store = ActivationStore.open(path)
    prototype = default_buffer_prototype()
    start = time.perf_counter()
    for name in store.layer_names:
        array = store.array(name)
        rows, cols = array.chunks
        buffer = np.empty((rows, cols), dtype=array.dtype)
        for r in range(0, array.shape[0], rows):
            for c in range(0, array.shape[1], cols):
                r1, c1 = min(array.shape[0], r + rows), min(array.shape[1], c + cols)
                out = buffer[: r1 - r, : c1 - c]
                array.get_basic_selection(
                    (slice(r, r1), slice(c, c1)), out=prototype.nd_buffer.from_numpy_array(out)
                )
    return time.perf_counter() - start


def loader_read(path: Path, device: str) -> float:
    """Seconds for the loader alone (threads + read-ahead) to deliver the epoch-0 tiles."""
    from ckapipe.analyze.loader import BlockRequest, column_ranges, iter_blocks
    from ckapipe.store import ActivationStore

    store = ActivationStore.open(path)
    requests = []
    for name in store.layer_names:
        rows, cols = store.chunk_shape(name)
        for a in range(0, store.n_samples, rows):
            for c0, c1 in column_ranges(store.layer(name).n_features, cols):
                requests.append(
                    BlockRequest((a, min(store.n_samples, a + rows)), ((name, c0, c1),))
                )
    start = time.perf_counter()
    for block in iter_blocks(store, requests, device=device, prefetch=2, threads=4):
        block.tensors[0].sum() if device != "cpu" else None  # touch on GPU: the copy must finish
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - start


def gram_pass(path: Path, out: Path, m: int, device: str, precision: str) -> float:
    from ckapipe.analyze.gram_cache import build_gram_cache

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    build_gram_cache(path, out, batch_size=m, device=device, precision=precision)
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - start


def max_cka_difference(cache_a: Path, cache_b: Path) -> float:
    from ckapipe.analyze.estimators import MinibatchCKA
    from ckapipe.analyze.gram_cache import GramCache

    results = []
    for path in (cache_a, cache_b):
        cache = GramCache.open(path)
        accumulator = MinibatchCKA(cache.layer_names)
        for _, grams in cache.iter_batches():
            accumulator.update_grams(grams)
        results.append(accumulator.compute())
    return float(np.abs(results[0] - results[1]).max())


def child_peak_rss(argv: list[str]) -> int:
    """Run this script in a fresh interpreter with ``argv``; its peak RSS in bytes."""
    output = subprocess.run(
        [sys.executable, __file__, *argv], check=True, capture_output=True, text=True
    ).stdout
    return int(json.loads(output.strip().splitlines()[-1])["max_rss_bytes"])


def child_main(args: argparse.Namespace) -> None:
    from ckapipe.analyze import gram_cache  # noqa: F401 - import cost belongs to the baseline
    from ckapipe.store import ActivationStore

    ActivationStore.open(args.store)
    if args.child == "gram":
        gram_pass(Path(args.store), Path(args.out), args.batch_size, args.device, "float64")
    print(json.dumps({"max_rss_bytes": peak_rss()}))


def peak_rss() -> int:
    """This process's peak RSS in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    peak_mib = proc_status_mb("VmHWM")
    if not math.isnan(peak_mib):
        return int(peak_mib * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _throughput(
    path: Path, work: Path, m: int, device: str, repeats: int
) -> dict[str, list[float]]:
    """Seconds of each reader and Gram pass over the store at ``path``, interleaved repeats."""
    timings: dict[str, list[float]] = {"raw": [], "loader": [], "f64": [], "f32": []}
    raw_chunk_read(path)  # warm the page cache once
    for repeat in range(repeats):
        timings["raw"].append(raw_chunk_read(path))
        timings["loader"].append(loader_read(path, device))
        timings["f64"].append(gram_pass(path, work / "g64", m, device, "float64"))
        timings["f32"].append(gram_pass(path, work / "g32", m, device, "float32"))
        print(f"repeat {repeat}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in timings.items()),
              flush=True)  # fmt: skip
    return timings


def _throughput_table(timings: dict[str, list[float]], nbytes: int) -> list[str]:
    """Medians (and minima) of each measurement as GB/s of store and as a share of the I/O
    floor (the faster of the two readers)."""
    rate = {key: nbytes / median(values) / 1e9 for key, values in timings.items()}
    floor = max(rate["raw"], rate["loader"])
    best = {key: nbytes / min(values) / 1e9 for key, values in timings.items()}
    best_floor = max(best["raw"], best["loader"])
    labels = (
        ("raw", "(a) raw chunk reads, 1 thread, reused buffer"),
        ("loader", "(a) loader only (4 threads, prefetch 2)"),
        ("f64", "(b) Gram pass, float64 products"),
        ("f32", "(b) Gram pass, float32 products"),
    )
    return [
        "| measurement | time (s): median (min) | GB/s of store (median) | vs I/O floor: "
        "median | vs floor: best runs |",
        "|---|---|---|---|---|",
        *[
            f"| {label} | {median(timings[key]):.2f} ({min(timings[key]):.2f}) | "
            f"{rate[key]:.3f} | **{rate[key] / floor:.3f}** | {best[key] / best_floor:.3f} |"
            for key, label in labels
        ],
    ]


def _memory_table(stores: dict[int, Path], work: Path, m: int, device: str) -> list[str]:
    """Peak RSS of a Gram pass at n and 4n, and of a process that only imported and opened."""
    n = min(stores)
    peaks = {}
    for size, store in stores.items():
        base = ["--child", "open", "--store", str(store)]
        gram = ["--child", "gram", "--store", str(store), "--out", str(work / f"gm-{size}"),
                "--batch-size", str(m), "--device", device]  # fmt: skip
        peaks[size] = (child_peak_rss(base), child_peak_rss(gram))
        print(f"peak RSS n={size}: baseline {peaks[size][0] / 2**20:.0f} MiB, gram pass "
              f"{peaks[size][1] / 2**20:.0f} MiB", flush=True)  # fmt: skip
    growth_total = peaks[4 * n][1] / peaks[n][1] - 1
    above = {size: peaks[size][1] - peaks[size][0] for size in peaks}
    growth_above = above[4 * n] / above[n] - 1
    return [
        f"| (d) peak RSS, minibatch Gram pass | n = {n} | 4n = {4 * n} | growth |",
        "|---|---|---|---|",
        f"| whole process | {peaks[n][1] / 2**20:.0f} MiB | {peaks[4 * n][1] / 2**20:.0f} MiB"
        f" | **{100 * growth_total:+.1f} %** |",
        f"| above import+open baseline ({peaks[n][0] / 2**20:.0f} / "
        f"{peaks[4 * n][0] / 2**20:.0f} MiB) | {above[n] / 2**20:.0f} MiB | "
        f"{above[4 * n] / 2**20:.0f} MiB | {100 * growth_above:+.1f} % |",
    ]


def run(args: argparse.Namespace) -> str:
    import torch
    import zarr

    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    if args.quick:
        n, features, repeats = 1024, [4096, 16384], 2
    else:
        n, features, repeats = args.n, args.features, args.repeats
    m = args.batch_size
    work = Path(tempfile.mkdtemp(prefix="ckapipe-bench-", dir=args.dir))
    try:
        stores = {}
        for size in (n, 4 * n):
            stores[size] = work / f"store-{size}"
            start = time.perf_counter()
            make_store(stores[size], size, features)
            print(f"store n={size}: {store_bytes(stores[size]) / 1e9:.2f} GB written in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
        path, nbytes = stores[n], store_bytes(stores[n])
        chunks = {name: list(zarr.open_array(str(path / "layers" / name)).chunks)
                  for name in (f"layer{i}" for i in range(len(features)))}  # fmt: skip
        timings = _throughput(path, work, m, device, repeats)
        cka_error = max_cka_difference(work / "g64", work / "g32")
        memory_lines = _memory_table(stores, work, m, device)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return "\n".join(
        [
            f"Run {utc_now()}{' (--quick)' if args.quick else ''} on "
            f"{machine_text(machine(), 'at the end')}; device `{device}`.",
            f"Store: float16, no codec, n = {n} (and 4n = {4 * n} for memory), layers "
            f"{features} features, chunks {chunks}; {nbytes / 1e9:.2f} GB at n. "
            f"Minibatch m = {m}, 1 epoch. Warm page cache; medians of {repeats} runs.",
            "",
            *_throughput_table(timings, nbytes),
            "",
            f"float32 products vs float64: max |ΔCKA| over all layer pairs = {cka_error:.2e} "
            "(bar: 1e-4).",
            "",
            *memory_lines,
        ]
    )


def write_results(body: str, analysis: str) -> None:
    """This benchmark's section of RESULTS.md: the tables, then ``analysis``."""
    write_section(
        "bench_gram_pass",
        "## Analyze stage: store read vs Gram pass\n\n"
        "Script: `python bench/bench_gram_pass.py` (`--quick` for a smoke run).\n\n"
        f"{body}\n\n{analysis}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny stores, seconds")
    parser.add_argument("--n", type=int, default=4096, help="rows of the smaller store")
    parser.add_argument("--features", type=int, nargs="+", default=[4096, 16384, 32768])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dir", default=None, help="where to put the temporary stores")
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    parser.add_argument("--analysis", default="", help="text to put under the tables")
    parser.add_argument("--child", choices=["open", "gram"], help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args)
        return
    body = run(args)
    print(body)
    if args.write:
        write_results(body, args.analysis)
        print(f"updated {RESULTS_MD}")


if __name__ == "__main__":
    main()
