"""Benchmark: ckapipe side by side with pytorch-cka and ckatorch, and with the hardware floor.

One entry point for the four study benchmarks::

    python bench/run.py --quick     # < 3 minutes on 2 CPU cores
    python bench/run.py             # the full run: larger n, three repeats
    python bench/run.py --quick --no-write   # print only; leave results.json and RESULTS.md
    python bench/run.py --workload resnet18 --threads 1   # the ResNet-18 study (study only)
    python bench/run.py --workload all       # the CNN modes, then the ResNet-18 study

All on the same models and data (``bench/workload.py``: small CNNs by default, CIFAR-style
ResNet-18s with ``--workload resnet18``, for which only the study benchmark runs), in one
process, in this order (each module's docstring says what it measures; each also runs alone,
printing only):

1. ``study_vs_peers.py``: study scaling M = 2, 4, 8 and the marginal model, vs pytorch-cka.
2. ``floors.py``: raw chunk reads vs the Gram pass; forward pass vs extraction.
3. ``accuracy.py``: every tool against the float64 reference of ``reference.py``.
4. ``memory.py``: peak RSS of one model pair per tool, one fresh child process each.

Prints a table last, writes ``bench/results.json`` (one entry per mode) and the section "Study
benchmark vs peers" of ``bench/RESULTS.md`` (other sections are left alone). Not a test:
targets are reported as met or missed, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

import accuracy
import floors
import memory
import study_vs_peers
from harness import add_arguments, measure, table_lines
from report import machine_text, write_section
from workload import DEFAULT_CHANNELS, WORKLOADS, workload_text

BENCHMARKS = [study_vs_peers, floors, accuracy, memory]
# the floors, accuracy and memory benchmarks are written for the small CNN (and its cost):
# the ResNet-18 workload runs the study only
WORKLOAD_BENCHMARKS = {"cnn": BENCHMARKS, "resnet18": [study_vs_peers]}
RESULTS_JSON = Path(__file__).resolve().with_name("results.json")
SECTION_NAME = "bench_run"  # its markers in RESULTS.md
INTRODUCTION = (
    "`python bench/run.py [--quick]` (bench/run.py and the modules it runs, bench/peers.py, "
    "bench/workload.py; raw numbers in bench/results.json). Small CNNs (seeds 0…M; three "
    "two-conv blocks and a dense layer, the 4 compared layers), synthetic 3×32×32 images, "
    "minibatch m = 256. ckapipe end to end = extract each model once (float16 store) + Gram "
    "cache + `analyze_study` over all pairs without self-pairs and without bootstrap (the peer "
    "computes neither); pytorch-cka = `compute_cka` per pair. The two tools are interleaved "
    "model by model in one process; study times for M are sums of the per-model and per-pair "
    "times of that M's models and pairs. Ratios are peer time / ckapipe time: the median over "
    "repeats of each repeat's ratio (times: medians of their own, so with few noisy repeats the "
    "ratio need not equal their quotient) and, with several repeats, the ratio of "
    "best-of-repeats totals (each step's fastest repeat). Targets are judged on the median. "
    "Memory: peak RSS (VmHWM) of one pair in a fresh process (+ growth over that process after "
    "its imports and data). ResNet-18 modes (`--workload resnet18`, study only): CIFAR-style "
    "ResNet-18s (bench/resnet.py: 3×3 stem, no max-pool, 4 stages × 2 BasicBlocks, widths "
    "64/128/256/512, random init from the seed), the stem output + the 8 BasicBlock outputs "
    "flattened (65 536 … 8 192 features per sample; pytorch-cka flattens every hooked map the "
    "same way), same images and m. Modes ending in -t1/-t2 ran with 1/2 torch threads, -n<n> "
    "with that n."
)


def _repeats_text(repeats: int) -> str:
    return "one run of the study" if repeats == 1 else f"{repeats} repeats of the study (medians)"


def mode_text(result: dict[str, Any]) -> list[str]:
    """One mode's subsection: workload, machine, table, notes."""
    channels = tuple(result.get("channels", DEFAULT_CHANNELS))
    workload = workload_text(result.get("workload", "cnn"), channels)
    return [
        f"### {result['mode']} mode — {result['date']}",
        "",
        f"Workload: n = {result['config']['n']} images, {workload}, device "
        f"{result.get('device', 'cpu')}, "
        f"{_repeats_text(result['config']['repeats'])}.",
        "",
        f"Machine: {machine_text(result['machine'], 'at start')} (shared machine). Wall time "
        f"{result['wall_s']:.0f} s.",
        "",
        *table_lines(result, BENCHMARKS),
        "",
        *(line for benchmark in BENCHMARKS for line in benchmark.notes(result)),
        "",
    ]


def section_text(all_results: dict[str, Any]) -> str:
    parts = ["## Study benchmark vs peers", "", INTRODUCTION, ""]

    # CNN before ResNet-18, quick before full, CPU before CUDA
    def order(key: str) -> tuple[bool, bool, bool, str]:
        return ("resnet18" in key, key.endswith("cuda"), not key.startswith("quick"), key)

    for mode in sorted(all_results, key=order):
        if all_results[mode]:
            parts += mode_text(all_results[mode])
    return "\n".join(parts)


def write_outputs(result: dict[str, Any] | None) -> None:
    """Store ``result`` under its mode in results.json (None: keep it) and re-render RESULTS.md."""
    all_results = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    if result is not None:
        all_results[result["mode"]] = result
        RESULTS_JSON.write_text(json.dumps(all_results, indent=1, default=float) + "\n")
    write_section(SECTION_NAME, section_text(all_results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, (*WORKLOADS, "all"))
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave results.json and RESULTS.md"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the result(s) to this JSON file (a dict by mode) instead of results.json and "
        "RESULTS.md; bench/run.py --render leaves it out",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated benchmarks to run, of "
        + ",".join(benchmark.KEY for benchmark in BENCHMARKS)
        + " (default: all the workload runs; resnet18 runs study only)",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only re-write this section of RESULTS.md from results.json (no measurement)",
    )
    args = parser.parse_args()
    if args.render:
        write_outputs(None)
        return
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    plans = []
    for workload in workloads:
        available = WORKLOAD_BENCHMARKS[workload]
        if args.only is None:
            plans.append((workload, available))
            continue
        chosen = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = chosen - {benchmark.KEY for benchmark in BENCHMARKS}
        if unknown:
            parser.error(f"--only: unknown {sorted(unknown)}")
        missing = chosen - {benchmark.KEY for benchmark in available}
        if missing:
            parser.error(
                f"--only: {sorted(missing)} not available for --workload {workload} (it runs "
                f"{', '.join(b.KEY for b in available)})"
            )
        plans.append((workload, [b for b in available if b.KEY in chosen]))
    for workload, benchmarks in plans:
        workload_args = copy.copy(args)
        workload_args.workload = workload
        result = measure(parser, workload_args, benchmarks)
        if args.json is not None:
            kept = json.loads(args.json.read_text()) if args.json.exists() else {}
            kept[result["mode"]] = result
            args.json.write_text(json.dumps(kept, indent=1, default=float) + "\n")
        elif not args.no_write:
            write_outputs(result)
        print("\n".join(table_lines(result, BENCHMARKS)))
        print(f"\n{result['mode']} mode, wall time {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
