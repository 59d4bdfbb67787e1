"""What every benchmark script reports with: timing, the machine, and its RESULTS.md section.

- :func:`timed`, :func:`median_time`: wall time of one call / the median of repeated calls.
- :func:`median_over`, :func:`best_over`: one number out of interleaved repeats (each repeat a
  dict of timings): the median, or the fastest repeat (on a shared machine the least disturbed
  timing of a step is the best estimate of its cost: timeit's rule).
- :func:`proc_status_mb`: this process's own RSS or peak RSS.
- :func:`machine` (a JSON-able dict) and :func:`machine_text` (one line for Markdown).
- :func:`write_section`: a benchmark's section of bench/RESULTS.md, between the lines
  ``<!-- name:start -->`` and ``<!-- name:end -->``, replaced in place or appended; the rest of
  the file is left alone.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_MD = Path(__file__).resolve().with_name("RESULTS.md")
NEW_RESULTS_MD = (
    "# ckapipe benchmark results\n\n"
    "Numbers measured by the scripts in `bench/`; each section names its machine and date.\n"
)


def log(message: str) -> None:
    """A time-stamped progress line on stderr (stdout carries the results)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def utc_now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, value) of one call of ``fn``."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
    """(median seconds, every run's seconds) of ``repeats`` calls of ``fn``."""
    times = [timed(fn)[0] for _ in range(repeats)]
    return median(times), times


def median_over(runs: list[dict[str, Any]], getter: Callable[[dict[str, Any]], float]) -> float:
    """Median over the repeats of one number of each repeat (a time, or a ratio of two)."""
    return median([getter(run) for run in runs])


def best_over(runs: list[dict[str, Any]], getter: Callable[[dict[str, Any]], float]) -> float:
    """The fastest repeat's value of one timing."""
    return min(getter(run) for run in runs)


def proc_status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB; NaN where absent.

    VmHWM is this process image's own peak RSS; ``resource.getrusage``'s ru_maxrss is not:
    Linux carries it across fork + exec, so a child of a large parent reports the parent's.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def package_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """CPU, cores, memory, GPU, threads, versions and the load average now."""
    import numpy as np
    import torch

    return {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        **{name: package_version(name) for name in ("zarr", "ckapipe", "pytorch-cka", "ckatorch")},
        "load_average": os.getloadavg(),
    }


def machine_text(info: dict[str, Any], load_when: str) -> str:
    """One line from :func:`machine`'s dict; keys an older results.json lacks are left out."""
    hardware = [f"{info['cpu']}, {info['logical_cores']} logical cores"]
    if "memory_gib" in info:
        hardware.append(f"{info['memory_gib']:.0f} GiB RAM")
    if info.get("gpu"):
        hardware.append(f"GPU {info['gpu']}")
    software = [f"Python {info['python']}"] if "python" in info else []
    software.append(f"torch {info['torch']} ({info['torch_threads']} threads)")
    software += [
        f"{name} {info[name]}"
        for name in ("numpy", "zarr", "pytorch-cka", "ckatorch")
        if name in info
    ]
    if "omp_num_threads" in info:
        software.append(f"OMP_NUM_THREADS={info['omp_num_threads']}")
    # results.json entries written before this module called it "load_average_at_start"
    averages = info.get("load_average", info.get("load_average_at_start", ()))
    load = ", ".join(f"{value:.1f}" for value in averages)
    return f"{', '.join(hardware)}; {', '.join(software)}; load average {load} {load_when}"


def write_section(name: str, body: str, results_md: Path = RESULTS_MD) -> None:
    """Put ``body`` between ``<!-- name:start -->`` and ``<!-- name:end -->`` in ``results_md``:
    in place of an earlier version, else appended."""
    start_mark, end_mark = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start_mark}\n{body.strip()}\n{end_mark}\n"
    text = results_md.read_text() if results_md.exists() else NEW_RESULTS_MD
    start, end = text.find(start_mark), text.find(end_mark)
    if start >= 0 and end > start:
        rest = text[end + len(end_mark) :].lstrip("\n")
        text = text[:start] + block + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    results_md.write_text(text)
