"""Benchmark: time of the all-pairs step for M = 2, 4, 8 models from Gram caches.

Builds M synthetic activation stores and their minibatch Gram caches once (not timed), then
times :func:`ckapipe.analyze.study.analyze_study` over all pairs (every a < b plus each model with
itself) for the first M caches, several repeats, and reports the median. For comparison it
also times reading the same caches once in lockstep (the step's I/O floor) and the step without
the bootstrap. Writes a section "All-pairs step" into bench/RESULTS.md between the markers
``<!-- bench_all_pairs:start/end -->``, replacing an earlier version and leaving the rest of the
file alone.

Run: ``python bench/bench_all_pairs.py [--n 2048 --batch-size 256 --layers 8 --models 2,4,8]``.
Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from report import RESULTS_MD, machine, machine_text, median_time, utc_now, write_section

from ckapipe.analyze.gram_cache import GramCache, build_gram_cache
from ckapipe.analyze.minibatch_pairs import minibatch_pairs, stacked_batches
from ckapipe.analyze.result import StudyResult, jsonable, write_result
from ckapipe.analyze.study import analyze_study
from ckapipe.store import ActivationStore, LayerRecord
from ckapipe.utils import resolve_device


def make_store(path: Path, n: int, layers: int, width: int, seed: int, sample_ids) -> Path:
    rng = np.random.default_rng(seed)
    records = [
        LayerRecord(name=f"block{i}", shape=(width,), reduction="flatten", n_features=width)
        for i in range(layers)
    ]
    store = ActivationStore.create(path, layers=records, sample_ids=sample_ids, dtype="float16")
    with store:
        base = rng.normal(size=(n, width)).astype(np.float32)
        for start in range(0, n, 1024):
            stop = min(n, start + 1024)
            rows = {}
            for i, record in enumerate(records):
                mix = rng.normal(size=(width, width)).astype(np.float32) / np.sqrt(width)
                rows[record.name] = np.maximum(base[start:stop] @ mix + 0.1 * i, 0)
            store.write_rows(start, rows)
            store.set_rows_complete(stop)
        store.mark_complete()
    return path


def write_v1(study: StudyResult, out: Path) -> None:
    """The result writer of format version 1 (a group per pair, attributes set key by key),
    kept here only to time it beside the current writer; its CSV is not written."""
    root = zarr.open_group(str(out), mode="w-", zarr_format=3)
    root.attrs.update(jsonable({**study.provenance, "complete": False}))
    pairs_group = root.create_group("pairs")
    for (a, b), pair in study.pairs.items():
        group = pairs_group.create_group(f"{a}--{b}")
        group.attrs.update(
            {
                "model_a": a,
                "model_b": b,
                "layers_a": pair.layers_a,
                "layers_b": pair.layers_b,
                "diagnostics": pair.diagnostics,
                "n_batches": int(pair.hsic_per_batch.shape[0]),
            }
        )
        for name in ("cka", "ci_low", "ci_high", "hsic_per_batch"):
            group.create_array(name, data=np.asarray(getattr(pair, name)), fill_value=np.nan)
        for name in ("self_a_per_batch", "self_b_per_batch"):
            group.create_array(name, data=np.asarray(getattr(pair, name)), fill_value=np.nan)
    root.attrs["complete"] = True


def _write_v2(study: StudyResult, out: Path) -> None:
    write_result(study, out, overwrite=False)


def build_caches(args: argparse.Namespace, workdir: Path) -> list[GramCache]:
    """One synthetic store and its Gram cache per model, for the largest M (not timed)."""
    sample_ids = np.random.default_rng(0).permutation(args.n)
    caches = []
    for k in range(max(args.counts)):
        store = make_store(workdir / f"m{k}.store", args.n, args.layers, args.width, k, sample_ids)
        caches.append(
            build_gram_cache(
                store, workdir / f"m{k}.grams", batch_size=args.batch_size, device=args.device
            )
        )
    return caches


def time_step(
    args: argparse.Namespace, caches: list[GramCache], device: str, workdir: Path
) -> dict[str, Any]:
    """Median seconds of the all-pairs step over ``caches`` and of its parts."""
    subset = [GramCache.open(cache.path) for cache in caches]
    named = {str(i): cache for i, cache in enumerate(subset)}
    runs = iter(range(10**6))

    def step(bootstrap: int) -> None:
        # a fresh output per run: deleting the previous one is not part of the step
        out = workdir / f"result-{len(subset)}-{next(runs)}.zarr"
        analyze_study(subset, out, n_bootstrap=bootstrap, device=args.device)

    def read_only() -> None:
        for _ in stacked_batches(named, list(named), device):
            pass

    def compute_only() -> None:
        layers = {name: cache.layer_names for name, cache in named.items()}
        names = list(named)
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i:]]
        minibatch_pairs(
            named, layers, pairs, ci_level=0.95, n_bootstrap=args.bootstrap, n_permutations=0,
            seed=0, device=device,
        )  # fmt: skip

    study = analyze_study(subset, workdir / f"w{len(subset)}.zarr", device=device)

    def write(version: int) -> None:
        out = workdir / f"write-v{version}-{len(subset)}-{next(runs)}.zarr"
        (write_v1 if version == 1 else _write_v2)(study, out)

    row: dict[str, Any] = {}
    row["write_old"], _ = median_time(lambda: write(1), args.repeats)
    row["write_new"], _ = median_time(lambda: write(2), args.repeats)
    row["full"], row["full_times"] = median_time(lambda: step(args.bootstrap), args.repeats)
    row["plain"], _ = median_time(lambda: step(0), args.repeats)
    row["reading"], _ = median_time(read_only, args.repeats)
    row["computing"], _ = median_time(compute_only, args.repeats)
    return row


def section_text(
    args: argparse.Namespace, device: str, rows: dict[int, dict[str, Any]], n_batches: int,
    cache_mb: float, setup: float,
) -> str:  # fmt: skip
    """The RESULTS.md section: setup, method, one table row per M."""
    lines = [
        "## All-pairs step",
        "",
        f"Machine: {machine_text(machine(), 'at the end')}; device `{device}`. Date: {utc_now()}.",
        f"Synthetic stores: n = {args.n} samples, {args.layers} layers × {args.width} features "
        f"(float16) per model; minibatch Gram caches with m = {args.batch_size} "
        f"({n_batches} batches, {cache_mb:.0f} MiB per model). Setup (stores + caches, not "
        f"timed below): {setup:.1f} s.",
        f"`analyze_study` over all pairs (a < b plus each model with itself), medians of "
        f'{args.repeats} runs; bootstrap R = {args.bootstrap}. "reading" = iterating the M caches '
        'once in lockstep, the step\'s I/O floor; "without writing" = the same computation '
        '(reading, products, bootstrap) without writing RESULT.zarr/CSV; "write" = writing the '
        "same M-model result alone with the format version 1 writer (a group per pair; kept in "
        "this script) and the current one (version 2 with its CSV).",
        "",
        "| M models | pairs | all-pairs step (s) | without bootstrap (s) | without writing the "
        "result (s) | reading only (s) | write, format v1 (s) | write, format v2 + CSV (s) | "
        "runs of the step (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m_models, r in rows.items():
        runs = ", ".join(f"{t:.2f}" for t in r["full_times"])
        lines.append(
            f"| {m_models} | {m_models * (m_models + 1) // 2} | {r['full']:.3f} | "
            f"{r['plain']:.3f} | {r['computing']:.3f} | {r['reading']:.3f} | "
            f"{r['write_old']:.3f} | {r['write_new']:.3f} | {runs} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="samples per store")
    parser.add_argument("--batch-size", type=int, default=256, help="minibatch size m")
    parser.add_argument("--layers", type=int, default=8, help="layers per model")
    parser.add_argument("--width", type=int, default=64, help="features per layer")
    parser.add_argument("--models", default="2,4,8", help="comma-separated model counts M")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="markdown file")
    args = parser.parse_args()
    args.counts = [int(c) for c in args.models.split(",")]
    device = resolve_device(args.device)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ckapipe-bench-pairs-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        caches = build_caches(args, workdir)
        setup = time.perf_counter() - t0
        n_batches = len(caches[0].batches)
        cache_files = (f for f in (workdir / "m0.grams").rglob("*") if f.is_file())
        cache_mb = sum(f.stat().st_size for f in cache_files) / 2**20
        rows = {}
        for m_models in args.counts:
            r = rows[m_models] = time_step(args, caches[:m_models], device, workdir)
            print(
                f"M={m_models}: {m_models * (m_models + 1) // 2} pairs, all-pairs step "
                f"{r['full']:.3f} s (no bootstrap {r['plain']:.3f} s, without writing "
                f"{r['computing']:.3f} s, reading {r['reading']:.3f} s; writing the result: "
                f"format v1 {r['write_old']:.3f} s, v2 {r['write_new']:.3f} s)",
                flush=True,
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    write_section(
        "bench_all_pairs",
        section_text(args, device, rows, n_batches, cache_mb, setup),
        args.results,
    )
    print(f"wrote the section to {args.results}")


if __name__ == "__main__":
    main()
