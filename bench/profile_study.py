"""Where ckapipe's time goes on a study workload: a cProfile of one model pair, by stage.

Runs ckapipe's path for two models of the workload (seeds 0 and 1) under cProfile: extract each
(float16 store), build each Gram cache, ``analyze_study`` of the pair; then splits the profiled
time into stages from the cumulative times of the functions that do them:

- forward: the model's forward passes inside the extraction (``capture.call_model`` less the
  capture hooks it calls);
- capture: the forward hooks that copy each studied layer's output (``capture.hook``);
- float16 encoding: per-feature offset + layer scale and the cast (``store._encode``);
- store write: ``store.write_rows`` less the encoding (zarr chunk writes, checksums);
- extraction, other: the rest of ``extract_activations`` (store creation, probe, input
  fingerprint, model hash);
- Gram pass: ``build_gram_cache``; analyze: ``analyze_study``.

A bare forward pass of each model (``torch.inference_mode``, no hooks) is timed before, outside
the profiler, as the unit. Prints the stage table (Markdown: seconds, share of the profiled time,
seconds per model in bare forward passes; on a shared machine the share is the robust column, the load can change
between the bare pass and the profile) and the top functions by own time.

Usage: ``python bench/profile_study.py --workload resnet18 --threads 1 --n 256 [--quick]``.
Stage names that a future ckapipe renames are reported as missing, not guessed.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import time

import torch
from harness import add_arguments, bench_run, import_everything
from report import machine, machine_text
from workload import ImageDataset, make_images

# stage → (file name ending, function name) whose cumulative time measures it
_FUNCTIONS = {
    "call_model": ("extract/capture.py", "call_model"),
    "hook": ("extract/capture.py", "hook"),
    "encode": ("pipeline/store.py", "_encode"),
    "write_rows": ("pipeline/store.py", "write_rows"),
    "extract": ("extract/extraction.py", "extract_activations"),
    "gram": ("analyze/gram_build.py", "build_gram_cache"),
    "analyze": ("analyze/study.py", "analyze_study"),
}


def _cumulative(stats: pstats.Stats) -> dict[str, float | None]:
    """Cumulative seconds of each function of :data:`_FUNCTIONS` (None: not called / not found)."""
    found: dict[str, float | None] = dict.fromkeys(_FUNCTIONS)
    for (filename, _line, name), (_cc, _nc, _tt, cumulative, _callers) in stats.stats.items():
        for key, (suffix, function) in _FUNCTIONS.items():
            if name == function and filename.endswith(suffix):
                found[key] = (found[key] or 0.0) + cumulative
    return found


def stage_rows(found: dict[str, float | None]) -> list[tuple[str, float | None]]:
    """(stage, seconds) rows from :func:`_cumulative`; None where a function was missing."""

    def minus(a: float | None, *rest: float | None) -> float | None:
        if a is None:
            return None
        return a - sum(value or 0.0 for value in rest)

    return [
        ("forward (in the extraction)", minus(found["call_model"], found["hook"])),
        ("capture hooks", found["hook"]),
        ("float16 encoding", found["encode"]),
        ("store write (less the encoding)", minus(found["write_rows"], found["encode"])),
        (
            "extraction, other (store creation, probe, fingerprints)",
            minus(found["extract"], found["call_model"], found["write_rows"]),
        ),
        ("Gram pass (build_gram_cache)", found["gram"]),
        ("analyze_study (the pair)", found["analyze"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--top", type=int, default=15, help="functions listed by own time")
    args = parser.parse_args()
    bench = bench_run(parser, args)
    if bench.threads is not None:
        torch.set_num_threads(bench.threads)
    import_everything()
    cfg = bench.cfg
    dataset = ImageDataset(make_images(cfg.n, seed=0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.m, shuffle=False)
    models = [bench.model(seed) for seed in (0, 1)]
    try:
        forward_s = []
        for model in models:
            start = time.perf_counter()
            bench.forward(model, loader)
            forward_s.append(time.perf_counter() - start)
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        caches = []
        for k, model in enumerate(models):
            store = bench.extract(model, dataset, bench.layers, bench.root / f"m{k}.zarr", cfg.m)
            caches.append(bench.gram(store, bench.root / f"g{k}.zarr", cfg.m))
        bench.analyze(caches, bench.root / "pair.zarr")
        profile.disable()
        total = time.perf_counter() - start
    finally:
        shutil.rmtree(bench.root, ignore_errors=True)

    stats = pstats.Stats(profile)
    forward = sum(forward_s) / len(forward_s)  # one model's bare pass: the unit
    models = len(models)
    print(f"{bench.mode}: n = {cfg.n}, m = {cfg.m}, layers {', '.join(bench.layers)}")
    print(machine_text(machine(), "at the end"))
    print(f"\nbare forward pass per model (outside the profiler): {forward:.2f} s\n")
    print(
        "| stage (2 models + their pair, cProfile) | seconds | share | per model, in bare forwards |"
    )
    print("|---|---|---|---|")
    for stage, seconds in stage_rows(_cumulative(stats)):
        if seconds is None:
            print(f"| {stage} | missing (function renamed?) | | |")
        else:
            per_model = seconds / models / forward
            print(f"| {stage} | {seconds:.2f} | {seconds / total:.0%} | {per_model:.2f} |")
    print(f"| total profiled | {total:.2f} | 100% | {total / models / forward:.2f} |")
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.top)
    print("\n" + text.getvalue().split("\n\n", 1)[-1].strip())


if __name__ == "__main__":
    main()
