"""Coverage of CKA confidence intervals against a closed-form truth, and the bias of biased CKA.

Runnable: ``python bench/coverage.py`` prints Markdown tables; ``--write`` also puts them into
bench/RESULTS.md between the markers ``<!-- coverage:start/end -->`` (replacing an earlier
version of this section, or appended; the other sections are kept). ``--quick`` is a smoke run.

Truth. Samples x ~ (0, c·diag(λ)), λ_k = 1/k (k = 1 … p), and y = x + σ ε with ε ~ N(0, I_p).
For linear kernels HSIC = ||Cov(x, y)||²_F for any distribution with finite fourth moments, and
HSIC₁ is unbiased for it in every batch, so the target of minibatch CKA (ratio of summed
HSIC₁) as B → ∞ is the population CKA

    CKA = ||Σ_xy||²_F / (||Σ_xx||_F ||Σ_yy||_F) = sqrt(Σ c²λ_k² / Σ (cλ_k + σ²)²),

solved for σ to give the truth levels 0.2 and 0.9. The ratio of sums is biased at finite B;
the table reports that bias (mean estimate − truth) beside the coverage, so one sees it is
small against the interval width. "gauss": x Gaussian (c = 1); "t5": x multivariate Student t
with 5 degrees of freedom (c = 5/3), heavy tails (a few samples with huge norms); "relu":
x = max(z, 0) coordinate-wise for Gaussian z with covariance diag(λ), so the coordinates stay
independent (c = 1/2 − 1/(2π)): sparse, skewed, non-zero mean, like post-ReLU activations.

Minibatch intervals. Every batch is independent, so one pool of per-batch HSIC₁ triples
(cross, self x, self y) is drawn per setting and split into replicates of B batches
(disjoint within one B; the cells of different B reuse the pool). Methods: the delete-one
jackknife with t quantiles on B − 1 df (``batch_interval(method="jackknife")``, the library
code), the same with normal quantiles, and the percentile bootstrap over batches (1000
resamples; replicates share resampling counts in groups of 250).

Full mode. Exact HSIC₁ CKA over n samples and a delete-one-block jackknife over G random
sample blocks (``full_block_jackknife``), t quantiles on G − 1 df.

Bias. Independent Gaussian x, y (population CKA 0): minibatch CKA from HSIC₀ (biased,
per batch) and HSIC₁ (debiased) over 16 batches of m samples, p features each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import reference
from report import RESULTS_MD, machine, machine_text, utc_now, write_section

from ckapipe.analyze.intervals import (
    FULL_MODE_BLOCKS,
    MIN_BATCHES_FOR_INTERVAL,
    FullBlockJackknife,
    _jackknife_se,
    student_t_quantile,
)

BATCH_COUNTS = (2, 3, 4, 8, 16, 32, 64, 128)
TRUTHS = (0.2, 0.9)
LEVELS = (0.95, 0.9)
# (name, distribution, m, p, pool of batches)
SETTINGS = (
    ("gauss m=32 p=64", "gauss", 32, 64, 64_000),
    ("gauss m=128 p=16", "gauss", 128, 16, 32_000),
    ("t5 m=32 p=64", "t5", 32, 64, 64_000),
    ("relu m=32 p=64", "relu", 32, 64, 64_000),
    ("t5 m=8 p=64", "t5", 8, 64, 64_000),
)
MAX_REPS = 4000  # replicates per cell (fewer where the pool holds fewer)
BOOT_REPS = 1000  # replicates per bootstrap cell
N_BOOTSTRAP = 1000
T_DF = 5.0


# ----------------------------------------------------------------------------- data


def spectrum(p: int) -> np.ndarray:
    return 1.0 / np.arange(1, p + 1)


def scale_of(dist: str) -> float:
    """Variance of one coordinate of x over λ_k."""
    if dist == "t5":
        return T_DF / (T_DF - 2)
    if dist == "relu":  # var(max(z, 0)) for z ~ N(0, 1)
        return 0.5 - 1.0 / (2.0 * np.pi)
    return 1.0


def population_cka(p: int, dist: str, sigma2: float) -> float:
    cov = scale_of(dist) * spectrum(p)
    return float(np.sqrt((cov**2).sum() / ((cov + sigma2) ** 2).sum()))


def noise_for(truth: float, p: int, dist: str) -> float:
    """σ² with population CKA = truth (CKA falls monotonically in σ²)."""
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if population_cka(p, dist, mid) > truth:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sample(rng: np.random.Generator, shape: tuple[int, int, int], dist: str) -> np.ndarray:
    """(c, m, p) samples of x with covariance scale_of(dist) · diag(1/k)."""
    z = rng.standard_normal(shape) * np.sqrt(spectrum(shape[2]))
    if dist == "t5":
        z /= np.sqrt(rng.chisquare(T_DF, size=shape[:2] + (1,)) / T_DF)
    elif dist == "relu":
        z = np.maximum(z, 0.0)
    return z


def hsic_terms(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(c, 3) per-batch HSIC₁ (cross, self x, self y) of (c, m, p) batches, linear kernel."""
    return reference.hsic_terms(reference.gram(x), reference.gram(y))


def batch_pool(
    rng: np.random.Generator, dist: str, m: int, p: int, sigma2: float, n_batches: int
) -> np.ndarray:
    """(n_batches, 3) per-batch HSIC₁ triples, drawn in chunks to bound memory."""
    out = np.empty((n_batches, 3))
    chunk = max(1, 2_000_000 // (m * max(m, p)))
    for start in range(0, n_batches, chunk):
        c = min(chunk, n_batches - start)
        x = sample(rng, (c, m, p), dist)
        y = x + np.sqrt(sigma2) * rng.standard_normal((c, m, p))
        out[start : start + c] = hsic_terms(x, y)
    return out


# ----------------------------------------------------------------------------- intervals


def ratio(h: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return h / np.sqrt(np.where(a > 0, a, np.nan) * np.where(b > 0, b, np.nan))


def minibatch_cell(
    pool: np.ndarray, n_batches: int, truth: float, rng: np.random.Generator
) -> dict[str, float]:
    """Coverage of each method over the replicates of B = n_batches batches of the pool."""
    reps = min(MAX_REPS, pool.shape[0] // n_batches)
    terms = pool[: reps * n_batches].reshape(reps, n_batches, 3).transpose(1, 0, 2)  # (B, R, 3)
    h, a, b = terms[..., 0], terms[..., 1], terms[..., 2]
    estimate = ratio(h.sum(0), a.sum(0), b.sum(0))
    se, _ = _jackknife_se(h, a, b)
    row: dict[str, float] = {
        "reps": reps,
        "bias": float(np.nanmean(estimate) - truth),
        "sd": float(np.nanstd(estimate)),
    }
    for level in LEVELS:
        for name, quantile in (
            ("jack-t", student_t_quantile((1 + level) / 2, n_batches - 1)),
            ("jack-z", student_t_quantile((1 + level) / 2, 1e7)),
        ):
            half = quantile * se
            row[f"{name} {level}"] = float(np.mean(np.abs(estimate - truth) <= half))
            row[f"{name} width {level}"] = float(np.nanmean(2 * half))
    # percentile bootstrap over batches on the first BOOT_REPS replicates
    nb = min(reps, BOOT_REPS)
    hits = {level: 0 for level in LEVELS}
    outside = 0
    for start in range(0, nb, 250):
        part = slice(start, min(nb, start + 250))
        draws = rng.integers(0, n_batches, size=(N_BOOTSTRAP, n_batches))
        counts = np.zeros((N_BOOTSTRAP, n_batches))
        np.add.at(counts, (np.arange(N_BOOTSTRAP)[:, None], draws), 1.0)
        boot = ratio(counts @ h[:, part], counts @ a[:, part], counts @ b[:, part])
        for level in LEVELS:
            alpha = (1 - level) / 2
            low, high = np.nanquantile(boot, [alpha, 1 - alpha], axis=0)
            hits[level] += int(((low <= truth) & (truth <= high)).sum())
            if level == 0.95:
                est = estimate[part]
                outside += int(((est < low) | (est > high)).sum())
    for level in LEVELS:
        row[f"boot {level}"] = hits[level] / nb
    row["boot reps"] = nb
    row["boot estimate outside"] = outside / nb
    return row


def minibatch_table(quick: bool, seed: int) -> str:
    rng = np.random.default_rng(seed)
    lines = [
        "| setting | truth | B | reps | bias | sd | **jackknife-t 95 %** | jackknife-z 95 % | "
        "bootstrap 95 % | jackknife-t 90 % | jackknife-z 90 % | bootstrap 90 % | "
        "jack-t width 95 % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    worst: dict[int, dict[str, float]] = {b: {} for b in BATCH_COUNTS}
    for name, dist, m, p, pool_size in SETTINGS:
        if quick:
            pool_size = max(BATCH_COUNTS) * 100
        for truth in TRUTHS:
            sigma2 = noise_for(truth, p, dist)
            pool = batch_pool(rng, dist, m, p, sigma2, pool_size)
            for n_batches in BATCH_COUNTS:
                row = minibatch_cell(pool, n_batches, truth, rng)
                for method in ("jack-t", "jack-z", "boot"):
                    for level in LEVELS:
                        key = f"{method} {level}"
                        gap = row[key] - level
                        worst[n_batches][key] = min(worst[n_batches].get(key, 1.0), gap)
                lines.append(
                    f"| {name} | {truth} | {n_batches} | {row['reps']} | {row['bias']:+.4f} | "
                    f"{row['sd']:.4f} | **{row['jack-t 0.95']:.3f}** | {row['jack-z 0.95']:.3f} | "
                    f"{row['boot 0.95']:.3f} | {row['jack-t 0.9']:.3f} | {row['jack-z 0.9']:.3f} | "
                    f"{row['boot 0.9']:.3f} | {row['jack-t width 0.95']:.4f} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
    lines += [
        "",
        "Worst coverage minus nominal over all settings and truths (points):",
        "",
        "| B | jackknife-t 95 % | jackknife-z 95 % | bootstrap 95 % | jackknife-t 90 % | "
        "jackknife-z 90 % | bootstrap 90 % |",
        "|---|---|---|---|---|---|---|",
    ]
    for n_batches in BATCH_COUNTS:
        w = worst[n_batches]
        cells = " | ".join(
            f"{100 * w[f'{m} {lv}']:+.1f}" for lv in LEVELS for m in ("jack-t", "jack-z", "boot")
        )
        lines.append(f"| {n_batches} | {cells} |")
    derived = {method: derive_threshold(worst, method) for method in ("jack-t", "jack-z", "boot")}
    lines += [
        "",
        "Derived rule (smallest B from which on the worst coverage of every setting, truth and "
        f"level is within 5 points of nominal): jackknife-t {derived['jack-t']}, "
        f"jackknife-z {derived['jack-z']}, bootstrap {derived['boot']}. "
        f"Library: MIN_BATCHES_FOR_INTERVAL = {MIN_BATCHES_FOR_INTERVAL} (the jackknife "
        "floored at 4: see docs/STATISTICS.md).",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- full mode

FULL_SETTINGS = (("gauss n=512 p=64", "gauss", 512, 64), ("t5 n=512 p=64", "t5", 512, 64))
FULL_BLOCKS = (8, 16, 32)
FULL_REPS = 400


def full_table(quick: bool, seed: int) -> str:
    rng = np.random.default_rng(seed + 1)
    reps = 40 if quick else FULL_REPS
    lines = [
        "| setting | truth | G blocks | reps | bias | sd | **95 %** | 90 % | mean width 95 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, dist, n, p in FULL_SETTINGS:
        for truth in TRUTHS:
            sigma2 = noise_for(truth, p, dist)
            hits = {(g, lv): 0 for g in FULL_BLOCKS for lv in LEVELS}
            widths = {g: 0.0 for g in FULL_BLOCKS}
            estimates = []
            for rep in range(reps):
                x = sample(rng, (1, n, p), dist)
                y = x + np.sqrt(sigma2) * rng.standard_normal((1, n, p))
                grams = reference.u_center(reference.gram(np.concatenate([x, y])))  # (2, n, n)
                for g in FULL_BLOCKS:
                    jack = FullBlockJackknife(n, 2, n_blocks=g, seed=rep)
                    jack.update(grams, 0)
                    for level in LEVELS:
                        iv = jack.interval(np.array([0]), np.array([1]), level)
                        hits[(g, level)] += bool(iv.low[0, 0] <= truth <= iv.high[0, 0])
                        if level == 0.95:
                            widths[g] += float(iv.high[0, 0] - iv.low[0, 0]) / reps
                inner = jack.inner()
                estimates.append(inner[0, 1] / np.sqrt(inner[0, 0] * inner[1, 1]))
            estimates = np.asarray(estimates)
            for g in FULL_BLOCKS:
                lines.append(
                    f"| {name} | {truth} | {g} | {reps} | {estimates.mean() - truth:+.4f} | "
                    f"{estimates.std():.4f} | **{hits[(g, 0.95)] / reps:.3f}** | "
                    f"{hits[(g, 0.9)] / reps:.3f} | {widths[g]:.4f} |"
                )
                print(lines[-1], file=sys.stderr, flush=True)
    lines += ["", f"Library default: FULL_MODE_BLOCKS = {FULL_MODE_BLOCKS}."]
    return "\n".join(lines)


def derive_threshold(worst: dict[int, dict[str, float]], method: str) -> int | None:
    """Smallest B such that at it and every larger B of the table both levels are within 5
    points of nominal (None: not even the largest)."""
    found = None
    for n_batches in sorted(worst, reverse=True):
        if all(worst[n_batches][f"{method} {level}"] >= -0.05 for level in LEVELS):
            found = n_batches
        else:
            break
    return found


# ----------------------------------------------------------------------------- bias


def bias_table(quick: bool, seed: int) -> str:
    rng = np.random.default_rng(seed)
    sizes = (8, 16, 32, 64, 256)
    widths = (16, 256, 2048)
    n_batches, total = 16, 128 if not quick else 16
    lines = [
        "| m | p | biased (HSIC₀) CKA: mean | debiased (HSIC₁) CKA: mean | debiased: sd of one "
        "estimate |",
        "|---|---|---|---|---|",
    ]
    for p in widths:
        for m in sizes:
            terms0, terms1 = [], []
            for _ in range(total // 8):
                x = rng.standard_normal((8, m, p))
                y = rng.standard_normal((8, m, p))
                kx, ky = reference.gram(x), reference.gram(y)
                terms0.append(reference.hsic_terms(kx, ky, unbiased=False))
                terms1.append(reference.hsic_terms(kx, ky))
            t0 = np.concatenate(terms0).reshape(-1, n_batches, 3).sum(1)
            t1 = np.concatenate(terms1).reshape(-1, n_batches, 3).sum(1)
            c0 = ratio(t0[:, 0], t0[:, 1], t0[:, 2])
            c1 = ratio(t1[:, 0], t1[:, 1], t1[:, 2])
            lines.append(f"| {m} | {p} | {c0.mean():.3f} | {c1.mean():+.4f} | {c1.std():.4f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report

# (--only name, heading, the function that computes the table)
TABLES = (
    ("minibatch", "### Minibatch CKA: coverage of intervals over batches", minibatch_table),
    ("full", "### Full mode: delete-one-block jackknife", full_table),
    (
        "bias",
        "### Bias of biased vs debiased minibatch CKA, independent data (truth 0)",
        bias_table,
    ),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small pools: a smoke run")
    parser.add_argument("--write", action="store_true", help="write the section to RESULTS.md")
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--only", choices=[name for name, _, _ in TABLES], default=None)
    parser.add_argument("--results", type=Path, default=RESULTS_MD, help="markdown file")
    args = parser.parse_args()
    started = time.perf_counter()
    parts = []
    for name, title, table in TABLES:
        if args.only in (None, name):
            parts += [title, "", table(args.quick, args.seed), ""]
    elapsed = time.perf_counter() - started
    body = "\n".join(
        [
            "## Interval coverage and estimator bias",
            "",
            "Script: `python bench/coverage.py` (`--quick` for a smoke run); method and reading "
            "in docs/STATISTICS.md.",
            "",
            f"Run {utc_now()} on {machine_text(machine(), 'at the end')}; {elapsed:.0f} s"
            f"{' (quick)' if args.quick else ''}, seed {args.seed}.",
            "",
            *parts,
        ]
    )
    print(body)
    if args.write:
        write_section("coverage", body, args.results)


if __name__ == "__main__":
    main()
