"""Benchmark (not a test): store read throughput vs Gram-pass throughput, and peak memory.

On the same synthetic float16 stores, side by side in one run:

(a) raw chunk reads: every chunk of every layer into a reused buffer, one thread (the I/O floor),
    and the same through ``ckapipe.analyze.loader`` (thread pool + read-ahead, no compute);
(b) the minibatch Gram pass (``build_gram_cache``), float64 and float32 products, as store
    bytes per second, and its ratio to (a) (target ≥ 0.8);
(d) peak RSS of a minibatch Gram pass at n and 4n, each in a fresh subprocess (target: ≤ 20 %
    growth), next to the RSS of a process that only imported everything and opened the store.
Also the accuracy of float32 products: largest |CKA(float32) − CKA(float64)| over layer pairs.

``--gemm-floor`` measures instead the pass against its *GEMM floor* (issue 12: ≥ 80 % at
n ≥ 5000): the time of the very products the pass makes (each batch's column tiles X' X'ᵀ, in
the product dtype, accumulated into a float64 m×m Gram by the pass's ``add_tile_products``) on
tiles already in memory, already converted and shifted, with nothing else around them. Pass and
floor run interleaved in one process, for each precision and each torch thread count; the table
gives floor time ÷ pass time.

Usage::

    python bench/bench_gram_pass.py            # n = 4096 / 16384, layers of 4k–32k features
    python bench/bench_gram_pass.py --quick    # seconds: n = 1024 / 4096, smaller layers
    python bench/bench_gram_pass.py --write    # also replace this benchmark's section of RESULTS.md
    python bench/bench_gram_pass.py --gemm-floor             # n = 5120, layers 512/4096/16384
    python bench/bench_gram_pass.py --gemm-floor --profile   # plus a cProfile of one pass

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
from typing import Any

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


def floor_tiles(path: Path, m: int, precision: str) -> list[list[Any]]:
    """The operands of every product an epoch-0 minibatch pass makes, ready to multiply.

    One list per (layer, batch), store order: the batch's column tiles (the store's column
    chunks, as the pass reads them), converted to the product dtype and shifted by the batch's
    first row exactly as :func:`~ckapipe.analyze.estimators.add_shifted_products` does,
    contiguous in memory.
    """
    import torch

    from ckapipe.analyze.loader import column_ranges
    from ckapipe.analyze.partition import batch_span, make_partition
    from ckapipe.store import ActivationStore

    dtype = torch.float64 if precision == "float64" else torch.float32
    store = ActivationStore.open(path)
    partition = make_partition(store.n_samples, m, 1, 0)
    batches = []
    for name in store.layer_names:
        array = store.array(name)
        columns = column_ranges(store.layer(name).n_features, store.chunk_shape(name)[1])
        for k in range(partition["batches_per_epoch"]):
            a, b = batch_span(partition, k)
            rows = torch.from_numpy(np.asarray(array[a:b]))
            tiles = []
            for c0, c1 in columns:
                x = rows[:, c0:c1].to(dtype)
                tiles.append((x - x[:1]).contiguous())
            batches.append(tiles)
    return batches


def gemm_floor(batches: list[list[Any]]) -> float:
    """Seconds of the pass's products alone: per batch, X' X'ᵀ of each tile summed into a
    float64 m×m Gram with the call the pass makes
    (:func:`~ckapipe.analyze.estimators.add_tile_products`: float64 ``addmm_``; float32: the
    float32 product added to the float64 Gram)."""
    import torch

    from ckapipe.analyze.estimators import add_tile_products

    start = time.perf_counter()
    for tiles in batches:
        rows = tiles[0].shape[0]
        gram = torch.zeros(rows, rows, dtype=torch.float64)
        for x in tiles:
            add_tile_products(gram, x)
    return time.perf_counter() - start


def _floor_runs(
    path: Path, work: Path, m: int, repeats: int, threads: list[int]
) -> dict[tuple[int, str], dict[str, list[float]]]:
    """Seconds of the pass and of its GEMM floor, per (torch threads, precision); within each
    thread count the four measurements alternate in every repeat."""
    import torch

    tiles = {precision: floor_tiles(path, m, precision) for precision in ("float64", "float32")}
    timings: dict[tuple[int, str], dict[str, list[float]]] = {}
    for count in threads:
        torch.set_num_threads(count)
        for precision in tiles:  # warm-up: allocator, page cache, MKL's kernels
            gemm_floor(tiles[precision])
            gram_pass(path, work / f"g-{precision}", m, "cpu", precision)
        for repeat in range(repeats):
            for precision in tiles:
                runs = timings.setdefault((count, precision), {"floor": [], "pass": []})
                runs["floor"].append(gemm_floor(tiles[precision]))
                runs["pass"].append(gram_pass(path, work / f"g-{precision}", m, "cpu", precision))
                print(f"threads {count}, {precision}, repeat {repeat}: floor "
                      f"{runs['floor'][-1]:.2f} s, pass {runs['pass'][-1]:.2f} s",
                      flush=True)  # fmt: skip
    return timings


def _floor_table(timings: dict[tuple[int, str], dict[str, list[float]]], flops: float) -> list[str]:
    """Medians (min) of pass and floor, the floor's GFLOP/s, and floor ÷ pass three ways: of the
    medians, the median of each repeat's own ratio (floor and pass ran back to back, so the
    least affected by a shared machine's changing load), and of the fastest runs."""
    lines = [
        "| torch threads | products | GEMM floor: median (min) | floor GFLOP/s | Gram pass: "
        "median (min) | floor ÷ pass: medians | per-repeat ratios: median | fastest runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (count, precision), runs in timings.items():
        floor, full = median(runs["floor"]), median(runs["pass"])
        paired = median([f / p for f, p in zip(runs["floor"], runs["pass"], strict=True)])
        lines.append(
            f"| {count} | {precision} | {floor:.2f} s ({min(runs['floor']):.2f}) | "
            f"{flops / floor / 1e9:.0f} | {full:.2f} s ({min(runs['pass']):.2f}) | "
            f"{100 * floor / full:.0f} % | **{100 * paired:.0f} %** | "
            f"{100 * min(runs['floor']) / min(runs['pass']):.0f} % |"
        )
    return lines


def profile_pass(path: Path, work: Path, m: int, precision: str, top: int = 25) -> str:
    """cProfile of one pass (main thread only: reader threads show as waits), by own time."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    gram_pass(path, work / "g-profile", m, "cpu", precision)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def run_gemm_floor(args: argparse.Namespace) -> str:
    """The pass vs its GEMM floor on a fresh float16 store (``--gemm-floor``)."""
    import torch

    n, features, m = args.n, args.features, args.batch_size
    work = Path(tempfile.mkdtemp(prefix="ckapipe-bench-", dir=args.dir))
    try:
        path = work / "store"
        start = time.perf_counter()
        make_store(path, n, features)
        print(f"store n={n}: {store_bytes(path) / 1e9:.2f} GB written in "
              f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
        from ckapipe.store import ActivationStore

        store = ActivationStore.open(path)
        chunks = {name: list(store.chunk_shape(name)) for name in store.layer_names}
        batches = n // m
        flops = 2.0 * m * m * sum(features) * batches
        timings = _floor_runs(path, work, m, args.repeats, args.threads)
        profiles = []
        if args.profile:
            for count in args.threads:
                torch.set_num_threads(count)
                report = profile_pass(path, work, m, "float32")
                profiles += [f"cProfile, float32 pass, {count} torch thread(s):", report]
                print(profiles[-2], profiles[-1], sep="\n", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return "\n".join(
        [
            f"Run {utc_now()} on {machine_text(machine(), 'at the end')}; device `cpu`.",
            f"Store: float16 (as extraction writes by default), no codec, n = {n}, layers "
            f"{features} features, chunks {chunks}. Minibatch m = {m} ({batches} batches), "
            f"1 epoch; {flops / 1e9:.1f} GFLOP of tile products per pass. Warm page cache; "
            f"medians of {args.repeats} interleaved repeats.",
            "",
            *_floor_table(timings, flops),
        ]
    )


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


FLOOR_HEADING = (
    "## Gram pass vs its GEMM floor at n ≥ 5000 (issue 12)\n\n"
    "Script: `python bench/bench_gram_pass.py --gemm-floor` (`--profile` adds a cProfile)."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny stores, seconds")
    parser.add_argument("--n", type=int, default=None, help="rows of the (smaller) store")
    parser.add_argument("--features", type=int, nargs="+", default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--gemm-floor",
        action="store_true",
        help="measure the pass against its GEMM floor instead (defaults: n 5120, layers "
        "512 4096 16384)",
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch threads (--gemm-floor)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="--gemm-floor: also cProfile one float32 pass"
    )
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
    if args.gemm_floor:
        args.n = args.n or 5120
        args.features = args.features or [512, 4096, 16384]
        body = run_gemm_floor(args)
        print(body)
        if args.write:
            write_section("bench_gram_floor", f"{FLOOR_HEADING}\n\n{body}\n\n{args.analysis}")
            print(f"updated {RESULTS_MD}")
        return
    args.n = args.n or 4096
    args.features = args.features or [4096, 16384, 32768]
    body = run(args)
    print(body)
    if args.write:
        write_results(body, args.analysis)
        print(f"updated {RESULTS_MD}")


if __name__ == "__main__":
    main()
