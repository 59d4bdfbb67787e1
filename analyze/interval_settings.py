"""The confidence-interval methods and their batch floors: constants only (no torch).

:mod:`ckapipe.analyze.intervals` computes the intervals; the CLI, whose every command module
is imported by ``ckapipe``, names these without importing torch (~2.4 s of CPU per process).
"""

from __future__ import annotations

__all__ = ["DEFAULT_INTERVAL_METHOD", "INTERVAL_METHODS", "MIN_BATCHES_FOR_INTERVAL"]

INTERVAL_METHODS = ("jackknife", "bootstrap")
DEFAULT_INTERVAL_METHOD = "jackknife"

# Fewest batches for which an interval is reported; below it the interval is withheld, since an
# interval that claims more than it delivers is worse than none. Derived from bench/coverage.py
# (table in docs/STATISTICS.md): the smallest B from which on the simulated coverage stays
# within 5 points of nominal (95 % and 90 %) in every setting. Bootstrap: 128 (64 missed by
# 5.0–6.2 points). Jackknife: valid from B = 2 with equal batches, floored at 4 because with 2–3
# batches a short last batch is a third to a half of the data (the simulation has equal batch
# sizes, the jackknife assumes exchangeable batches) and the t quantile on 1–2 df (12.7, 4.3)
# makes the interval uninformative anyway.
MIN_BATCHES_FOR_INTERVAL = {"jackknife": 4, "bootstrap": 128}
