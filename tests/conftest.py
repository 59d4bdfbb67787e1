"""Shared pytest configuration. Fixtures that belong to one stage live in that stage's test files."""

from __future__ import annotations

import os

from slurm_cluster import slurm_cluster  # noqa: F401  (session fixture: real SLURM on loopback)

# Plots render headless everywhere (CI has no display).
os.environ.setdefault("MPLBACKEND", "Agg")
