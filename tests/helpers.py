"""Small helpers shared by several test modules (no fixtures: those live in conftest.py)."""

from __future__ import annotations


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a Snakemake run or dry run as {rule: count}, the total dropped;
    {} when there is no table (nothing to do)."""
    lines = output.splitlines()
    if "Job stats:" not in lines:
        return {}
    counts = {}
    for line in lines[lines.index("Job stats:") + 3 :]:
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            break
        counts[parts[0]] = int(parts[1])
    counts.pop("total", None)
    return counts
