"""Memory: peak RSS of one model pair per tool at two n, each in a fresh child process.

Each child reads its own ``VmHWM`` (``resource.getrusage``'s ru_maxrss is recorded too, but
Linux carries it across fork + exec from the parent, so it is not used). On a GPU this is host
memory only (device memory is not counted).

Alone: ``python bench/memory.py [--quick] [--device cuda] [--channels 16,32,64]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from harness import BenchRun, add_arguments, bench_run, standalone_main
from peers import ckatorch_pair, pytorch_cka_pair, tuple_batches
from report import log, proc_status_mb
from workload import CNN_LAYERS, ImageDataset, make_images

KEY = "memory"
MEMORY_TOOLS = ("ckapipe", "pytorch-cka", "ckatorch")


def child(bench: BenchRun, tool: str, n: int) -> dict[str, Any]:
    """One model pair with ``tool`` at ``n`` images; this process's peak RSS (VmHWM), in MB."""
    import ckapipe.analyze.gram_cache  # noqa: F401 - imports count in the baseline, not the work
    import ckapipe.analyze.study  # noqa: F401
    import ckapipe.extract.extraction  # noqa: F401

    m = bench.cfg.m
    dataset = ImageDataset(make_images(n, seed=0))
    models = (bench.cnn(0), bench.cnn(1))
    baseline = proc_status_mb("VmRSS")
    start = time.perf_counter()
    if tool == "ckapipe":
        bench.pair_study(models, dataset, CNN_LAYERS, bench.root, m)
    elif tool == "pytorch-cka":
        loader = torch.utils.data.DataLoader(dataset, batch_size=m, shuffle=False)
        pytorch_cka_pair(*models, loader, CNN_LAYERS, bench.device)
    elif tool == "ckatorch":
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=m, shuffle=False, collate_fn=tuple_batches
        )
        ckatorch_pair(*models, loader, CNN_LAYERS, bench.device)
    else:
        raise ValueError(f"unknown tool {tool!r}; choose one of {MEMORY_TOOLS}")
    seconds = time.perf_counter() - start
    # ru_maxrss only for the record: see proc_status_mb
    return {
        "tool": tool,
        "n": n,
        "baseline_mb": baseline,
        "peak_mb": proc_status_mb("VmHWM"),
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": seconds,
    }


def _child_command(bench: BenchRun, tool: str, n: int, workdir: Path) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "--child", tool, str(n), str(workdir),
        "--device", bench.device, "--channels", ",".join(map(str, bench.channels)),
        *(["--quick"] if bench.cfg.mode == "quick" else []),
    ]  # fmt: skip


def run(bench: BenchRun) -> dict[str, Any]:
    """Every (tool, n) in its own child, two children at a time.

    Running two at once changes no child's peak RSS (each reads its own VmHWM), and the
    timed benchmarks are over by now under bench/run.py, so it only saves wall time.
    """
    jobs = []
    for n in bench.cfg.memory_ns:
        for tool in MEMORY_TOOLS:
            workdir = bench.root / f"mem_{tool}_{n}"
            workdir.mkdir(parents=True, exist_ok=True)
            jobs.append((tool, n, _child_command(bench, tool, n, workdir)))
    log(
        f"memory: {len(jobs)} fresh processes ({', '.join(MEMORY_TOOLS)} at n={bench.cfg.memory_ns})"
    )
    rows = []
    for first in range(0, len(jobs), 2):
        running = [
            (
                tool,
                n,
                subprocess.Popen(
                    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
                ),
            )
            for tool, n, command in jobs[first : first + 2]
        ]
        for tool, n, process in running:
            stdout, stderr = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(
                    f"memory child for {tool} at n={n} failed (exit {process.returncode}):\n"
                    f"{stderr[-3000:]}"
                )
            rows.append(json.loads(stdout.strip().splitlines()[-1]))
    return {"rows": rows}


def table_rows(result: dict[str, Any]) -> list[str]:
    rows = result[KEY]["rows"]
    by = {(row["tool"], row["n"]): row for row in rows}
    ns = sorted({row["n"] for row in rows})
    lines = []
    for tool in MEMORY_TOOLS:
        cells = ", ".join(
            f"n={n}: {by[(tool, n)]['peak_mb']:.0f} MB "
            f"(+{by[(tool, n)]['peak_mb'] - by[(tool, n)]['baseline_mb']:.0f})"
            for n in ns
            if (tool, n) in by
        )
        column = f"{cells} | |" if tool == "ckapipe" else f"| {cells} |"
        lines.append(f"| peak RSS, one pair: {tool} | {column} | |")
    return lines


def notes(result: dict[str, Any]) -> list[str]:
    if not result.get(KEY):
        return []
    return [
        "- **Memory** is each child's VmHWM (its own peak RSS). `resource.getrusage` "
        "(ru_maxrss) is recorded too but is not used: Linux carries it across fork + exec, "
        "so a child of a large parent reports the parent's size. All tools hold the images "
        "(n × 12 KB) in the baseline; the growth (+…) is the tool's working memory."
    ]


def main() -> None:
    if "--child" not in sys.argv:
        standalone_main(sys.modules[__name__])
        return
    # a child: measure one (tool, n) and print its row as the last line of stdout
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parser.add_argument("--child", nargs=3, metavar=("TOOL", "N", "DIR"), required=True)
    args = parser.parse_args()
    tool, n, workdir = args.child
    print(json.dumps(child(bench_run(parser, args, Path(workdir)), tool, int(n))))


if __name__ == "__main__":
    main()
