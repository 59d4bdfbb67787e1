"""Unit costs of a study at the target's n: ckapipe per model vs pytorch-cka per pair.

``study_vs_peers.py`` times whole M = 2, 4, 8 studies. At the ResNet-18 target's n = 2048 on a
2-core CPU that is about 80 minutes per repeat (36 peer pairs of ~100 s), so the repeats the
targets ask for do not fit a session. The study is linear in its units, though: ckapipe pays
one fused extraction (store + Gram cache) per model plus one all-pairs step, the peer one
``compute_cka`` (both models re-run) per pair. This script times the units, interleaved in one
process: per repeat, a bare forward pass (the unit of "where the time goes"), one ckapipe
fused extraction of a new model, one peer pair, and the all-pairs step over M caches (copies of
real caches under M names: the step's work does not depend on the values). It prints the
ratios they imply, with the formulas:

- M-model study: M(M−1)/2 · peer_pair / (M · ckapipe_model + all_pairs(M));
- adding model M + 1: M · peer_pair / (ckapipe_model + all_pairs over its M new pairs).

These are projections from measured units, not end-to-end timings of a whole study; the
study benchmark's own rows at small n show the units add up (flat per-model times).

Usage: ``python bench/unit_costs.py --workload resnet18 --threads 1 --n 2048 --repeats 3``
(``--json PATH`` writes the numbers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from harness import add_arguments, bench_run, targets
from peers import pytorch_cka_pair
from report import log, machine, machine_text, timed
from workload import ImageDataset, make_images, workload_text

STUDY_M = 8


def _all_pairs_seconds(bench: Any, cache: Path, workdir: Path, m: int, new_pairs: bool) -> float:
    """The all-pairs step over ``m`` + 1 (new pairs) or ``m`` caches named c0, c1, …"""
    from ckapipe.analyze.study import analyze_study

    count = m + 1 if new_pairs else m
    caches = []
    for k in range(count):
        copy = workdir / f"c{k}.zarr"
        if not copy.exists():
            shutil.copytree(cache, copy)
        caches.append(copy)
    names = [c.stem for c in caches]
    pairs: Any = [(names[i], names[m]) for i in range(m)] if new_pairs else "all"
    seconds, _ = timed(
        lambda: analyze_study(
            caches, workdir / "study.zarr", pairs=pairs, n_bootstrap=0, include_self=False,
            device=bench.device, overwrite=True,
        )
    )  # fmt: skip
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    args = parser.parse_args()
    bench = bench_run(parser, args)
    if bench.threads is not None:
        torch.set_num_threads(bench.threads)
    cfg = bench.cfg
    info = machine()
    log(f"unit costs: {bench.workload}, n={cfg.n}, m={cfg.m}, {cfg.repeats} repeats")
    dataset = ImageDataset(make_images(cfg.n, seed=0))
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.m, shuffle=False)
    root = bench.root
    times: dict[str, list[float]] = {k: [] for k in ("forward", "model", "pair", "study", "new")}
    try:
        for repeat in range(cfg.repeats):
            # fresh seeds every repeat: nothing is reused between repeats
            a, b = bench.model(2 * repeat), bench.model(2 * repeat + 1)
            times["forward"].append(timed(lambda a=a: bench.forward(a, loader))[0])
            store, cache = root / f"s{repeat}.zarr", root / f"g{repeat}.zarr"
            times["model"].append(
                timed(
                    lambda a=a, s=store, c=cache: bench.extract(
                        a, dataset, bench.layers, s, cfg.m, gram_out=c
                    )
                )[0]
            )
            times["pair"].append(
                timed(lambda a=a, b=b: pytorch_cka_pair(a, b, loader, bench.layers, bench.device))[
                    0
                ]
            )
            steps = root / f"steps{repeat}"
            steps.mkdir()
            times["study"].append(_all_pairs_seconds(bench, cache, steps, STUDY_M, False))
            times["new"].append(_all_pairs_seconds(bench, cache, steps, STUDY_M, True))
            shutil.rmtree(steps)
            shutil.rmtree(store)
            latest = {k: round(v[-1], 2) for k, v in times.items()}
            log(f"  repeat {repeat + 1}: {latest}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    pairs = STUDY_M * (STUDY_M - 1) // 2
    study_ratio = pairs * med["pair"] / (STUDY_M * med["model"] + med["study"])
    new_ratio = STUDY_M * med["pair"] / (med["model"] + med["new"])
    bars = targets(bench.workload)
    result = {
        "workload": bench.workload,
        "n": cfg.n,
        "m": cfg.m,
        "repeats": cfg.repeats,
        "threads": torch.get_num_threads(),
        "machine": info,
        "seconds": times,
        "medians": med,
        "projected_study_ratio_m8": study_ratio,
        "projected_new_model_ratio_m8": new_ratio,
    }
    print(f"{workload_text(bench.workload)}; n = {cfg.n}, m = {cfg.m}, {cfg.repeats} repeats")
    print(machine_text(info, "at the end"))
    print("| unit (median of repeats) | seconds | in forward passes |")
    print("|---|---|---|")
    for key, label in (
        ("forward", "bare forward pass of one model"),
        ("model", "ckapipe: one model, fused extraction (store + Gram cache)"),
        ("pair", "pytorch-cka: one pair (both models re-run)"),
        ("study", f"ckapipe: all-pairs step over {STUDY_M} caches ({pairs} pairs)"),
        ("new", f"ckapipe: all-pairs step, model {STUDY_M + 1}'s {STUDY_M} new pairs"),
    ):
        print(f"| {label} | {med[key]:.2f} | {med[key] / med['forward']:.2f} |")
    print(
        f"\nProjected M = {STUDY_M} study: {pairs} × {med['pair']:.2f} / ({STUDY_M} × "
        f"{med['model']:.2f} + {med['study']:.2f}) = **{study_ratio:.2f}×** (target ≥ "
        f"{bars['study_speedup_at_max_m']:g}×)."
    )
    print(
        f"Projected model {STUDY_M + 1}: {STUDY_M} × {med['pair']:.2f} / ({med['model']:.2f} + "
        f"{med['new']:.2f}) = **{new_ratio:.2f}×** (target ≥ {bars['marginal_speedup']:g}×)."
    )
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
