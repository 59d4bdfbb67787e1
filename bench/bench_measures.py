"""Benchmark (not a test): ckapipe's Gram-based similarity measures against published libraries,
and the time of every measure at n = 5000 for a study of 4 models × 3 layers.

Part 1 (``--agreement``): on float64 features (several shapes, incl. p > n and rank-deficient),
the largest |ckapipe − library| per measure, where ckapipe gets only the two Grams:

- rsa / rsa_spearman: rsatoolbox ``calc_rdm(method="euclidean")`` (squared Euclidean / p) +
  ``compare(method="corr" / "spearman")``; the 1/p scale does not change a correlation.
- procrustes: ``scipy.spatial.procrustes`` on zero-padded features: its disparity is 1 − s².
- cca (Yanai), cca_pillai, svcca (99 % variance, Yanai), pwcca: ``repsim``.
- regression: scikit-learn ``LinearRegression`` + ``r2_score(multioutput="variance_weighted")``.
- knn: scikit-learn ``NearestNeighbors(metric="cosine")`` on centered features, overlap of the
  neighbour sets (the alignment score itself is Huh et al.'s, not in a package on the index).
- cka (linear, debiased / biased): ``repsim.cka(kernel_type="linear", estimator="song" /
  "gretton")``.

Part 2 (``--timing``): Grams of 4 models × 3 layers (widths 64–512, n = 5000) in memory; the
per-layer work (spectrum; RDM ranks for Spearman; k-NN sets) and the all-pairs work (10 model
pairs incl. self-pairs, 90 layer pairs) per measure; medians of interleaved repeats, BLAS at 1
and 2 threads (threadpoolctl) in one process.

Usage::

    python bench/bench_measures.py --agreement
    python bench/bench_measures.py --timing --n 5000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import numpy as np

from ckapipe.analyze import measures as ms


def _shapes():
    rng = np.random.default_rng(2026)
    cases = {}
    for label, (n, p, q, rank) in {
        "n=200,p=20,q=30": (200, 20, 30, None),
        "n=300,p=64,q=48": (300, 64, 48, None),
        "n=150,p=12(rank 5),q=9": (150, 12, 9, 5),
    }.items():
        base = rng.normal(size=(n, rank or p))
        x = base @ rng.normal(size=(rank or p, p)) if rank else base
        x = x + 2.0
        y = np.tanh(x @ rng.normal(size=(p, q)) / np.sqrt(p)) + 0.3 * rng.normal(size=(n, q))
        cases[label] = (x, y)
    return cases


def agreement() -> None:
    import repsim
    import scipy.spatial
    from rsatoolbox.data import Dataset
    from rsatoolbox.rdm import calc_rdm, compare
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    from sklearn.neighbors import NearestNeighbors

    def library(x, y):
        rx, ry = (calc_rdm(Dataset(z), method="euclidean") for z in (x, y))
        width = max(x.shape[1], y.shape[1])
        pad = [np.pad(z, ((0, 0), (0, width - z.shape[1]))) for z in (x, y)]
        disparity = scipy.spatial.procrustes(*pad)[2]
        fit = LinearRegression().fit(x, y)
        xc, yc = x - x.mean(0), y - y.mean(0)
        sets = [
            NearestNeighbors(n_neighbors=11, metric="cosine").fit(z).kneighbors(z)[1][:, 1:]
            for z in (xc, yc)
        ]
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(*sets, strict=True)])
        return {
            "rsa": float(compare(rx, ry, method="corr")[0, 0]),
            "rsa_spearman": float(compare(rx, ry, method="spearman")[0, 0]),
            "procrustes": float(np.sqrt(1.0 - disparity)),
            "cca": float(repsim.cca([x, y], "yanai")[0, 1]),
            # repsim's "pillai" summary is the mean canonical correlation (checked here)
            "cca_mean_rho": float(repsim.cca([x, y], "pillai")[0, 1]),
            "svcca": float(repsim.svcca([x, y], "pillai")[0, 1]),  # mean ρ, as Raghu et al.
            "pwcca": float(repsim.pwcca([x, y])[0, 1]),
            "regression": float(r2_score(y, fit.predict(x), multioutput="variance_weighted")),
            "knn": float(overlap),
            "cka (debiased)": float(repsim.cka([x, y], "linear", "song")[0, 1]),
            "cka (biased)": float(repsim.cka([x, y], "linear", "gretton")[0, 1]),
        }, {
            # repsim's "song" CKA normalises HSIC₁(K, L) by biased self terms: reproduce it
            "repsim song = HSIC1/sqrt(HSIC0 HSIC0)": float(
                repsim.cka([x, y], "linear", "song")[0, 1]
            ),
        }

    def ours(x, y):
        k, l = ms.features_gram(x), ms.features_gram(y)  # noqa: E741
        return {
            "rsa": ms.rsa(k, l),
            "rsa_spearman": ms.rsa(k, l, method="spearman"),
            "procrustes": ms.procrustes(k, l),
            "cca": ms.cca(k, l),
            "cca_mean_rho": ms.cca(k, l, summary="mean_rho"),
            "svcca": ms.svcca(k, l, keep=0.99),
            "pwcca": ms.pwcca(k, l),
            "regression": ms.regression_r2(k, l),
            "knn": ms.mutual_knn(k, l, n_neighbors=10),
            "cka (debiased)": ms.cka(k, l),
            "cka (biased)": ms.cka(k, l, biased=True),
        }

    def mixed_cka(x, y):
        from ckapipe.analyze.estimators import hsic0, hsic1

        k, l = ms.features_gram(x), ms.features_gram(y)  # noqa: E741
        return {
            "repsim song = HSIC1/sqrt(HSIC0 HSIC0)": hsic1(k, l)
            / np.sqrt(hsic0(k, k) * hsic0(l, l))
        }

    cases = _shapes()
    table: dict[str, list[str]] = {}
    for x, y in cases.values():
        theirs, extra = library(x, y)
        mine = {**ours(x, y), **mixed_cka(x, y)}
        for name, value in {**theirs, **extra}.items():
            table.setdefault(name, []).append(
                f"{abs(mine[name] - value):.1e} ({mine[name]:.4f} vs {value:.4f})"
            )
    print("| measure | " + " | ".join(cases) + " |")
    print("|---" * (len(cases) + 1) + "|")
    for name, cells in table.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


def timing(n: int, repeats: int) -> None:
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    shared = rng.normal(size=(n, 32))
    grams = {}
    for model in range(4):
        for layer, width in enumerate((64, 192, 512)):
            x = np.tanh(shared @ rng.normal(size=(32, width)) + 0.5 * rng.normal(size=(n, width)))
            grams[f"m{model}/l{layer}"] = ms.features_gram(x)
    models = [[f"m{m}/l{j}" for j in range(3)] for m in range(4)]
    pairs = [(a, b) for a in range(4) for b in range(a, 4)]
    options = ms.MeasureOptions()
    cheap = ["procrustes", "rsa", "cca", "cca_pillai", "cca_mean_rho", "pwcca", "svcca"]
    cheap += ["regression", "regression_reverse"]

    def run() -> dict[str, float]:
        times: dict[str, float] = {}
        start = time.perf_counter()
        geo = {k: ms.LayerGeometry.from_gram(g, k, options=options) for k, g in grams.items()}
        times["per layer: spectrum (12 layers)"] = time.perf_counter() - start
        start = time.perf_counter()
        for geometry, gram in zip(geo.values(), grams.values(), strict=True):
            geometry.rdm_ranks = ms._rdm_ranks(ms._double_center(gram))
        times["per layer: RDM ranks (rsa_spearman)"] = time.perf_counter() - start
        start = time.perf_counter()
        for geometry, gram in zip(geo.values(), grams.values(), strict=True):
            centered = ms._double_center(gram)
            geometry.neighbours = ms._nearest(centered, np.diagonal(centered).copy(), 10)
        times["per layer: 10-NN sets (knn)"] = time.perf_counter() - start
        for name in [*cheap, "rsa_spearman", "knn"]:
            start = time.perf_counter()
            for a, b in pairs:
                ms.pairwise_measures(
                    [geo[k] for k in models[a]], [geo[k] for k in models[b]], [name], options
                )
            times[f"all pairs: {name}"] = time.perf_counter() - start
        start = time.perf_counter()
        for a, b in pairs:
            ms.pairwise_measures(
                [geo[k] for k in models[a]], [geo[k] for k in models[b]], ms.GRAM_MEASURES, options
            )
        times["all pairs: all 11 together"] = time.perf_counter() - start
        return times

    results: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    for _ in range(repeats):
        for threads in (1, 2):
            with threadpool_limits(threads), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[threads].append(run())
            # each run as it ends: a loaded machine may not let all repeats finish
            print(json.dumps({"threads": threads, **results[threads][-1]}), flush=True)
    print(f"n = {n}, 4 models x 3 layers (widths 64, 192, 512), 10 model pairs, {repeats} repeats")
    print("| step | 1 thread, median (min) | 2 threads, median (min) |")
    print("|---|---|---|")
    for key in results[1][0]:
        cells = []
        for threads in (1, 2):
            values = [r[key] for r in results[threads]]
            cells.append(f"{statistics.median(values):.2f} s ({min(values):.2f})")
        print(f"| {key} | {cells[0]} | {cells[1]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agreement", action="store_true", help="compare with the libraries")
    parser.add_argument("--timing", action="store_true", help="time all measures at --n")
    parser.add_argument("--n", type=int, default=5000, help="samples for --timing")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats")
    args = parser.parse_args()
    if args.agreement:
        agreement()
    if args.timing:
        timing(args.n, args.repeats)


if __name__ == "__main__":
    main()
