"""Benchmark (not a test): exact full-mode CKA out of core at large n.

Two synthetic models over the same n samples, each with a narrow and a wide layer (default
128 and 4096 features, float16 stores sharing a 32-dim latent so that CKA is not ~0). Each step
runs in a fresh subprocess with one torch thread, and reports its wall time and peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``):

1. the full-mode Gram pass of each model (``build_gram_cache(mode="full")``, tiles on disk);
2. the exact debiased analysis of the pair with its 16-block jackknife interval
   (``analyze_study(estimator="debiased")``).

Optionally (``--cross-check``) the linear debiased CKA of every layer pair from the feature-space
form (||XᵀY||_F² etc., no n×n Gram; :func:`ckapipe.analyze.estimators.cka` with
``unbiased=True``), as an independent check of the tiled result at this n; it holds the
centered features in memory, so it is reported apart from the pipeline's memory.

Usage::

    python bench/bench_exact_out_of_core.py --n 50000 --root /tmp/ooc --cross-check
    python bench/bench_exact_out_of_core.py --n 4000 --widths 32,256 --tile-size 512   # minutes

Needs free disk of about 2 · layers · n² bytes with float32 tiles (n = 50 000: 5 GB per layer).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

_STEP = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
args = json.loads(sys.argv[1])
start = time.perf_counter()
if args["step"] == "gram":
    from ckapipe.analyze.gram_cache import build_gram_cache
    build_gram_cache(args["store"], args["out"], mode="full", device="cpu",
                     tile_size=args["tile"], storage=args["storage"],
                     precision=args["precision"], threads=1)
    extra = {}
elif args["step"] == "analyze":
    from ckapipe.analyze.study import analyze_study
    study = analyze_study(args["caches"], args["out"], names=["a", "b"], pairs="a:b",
                          estimator="debiased", ci_level=0.95, device="cpu")
    pair = study.pair("a", "b")
    extra = {"cka": pair.cka.tolist(), "ci_low": pair.ci_low.tolist(),
             "ci_high": pair.ci_high.tolist()}
else:  # feature-space cross-check: per-layer terms once, cross terms per pair
    import numpy as np
    from ckapipe.analyze.full_build import stored_block
    from ckapipe.store import ActivationStore
    stores = {name: ActivationStore.open(path) for name, path in args["stores"].items()}
    n = stores["a"].n_samples

    def centered(store, layer):
        x = stored_block(store, layer, slice(None))  # the values the Grams are made of
        x -= x[:1]
        return x - x.mean(axis=0)

    def hsic1(x, y, cross):  # Song et al. HSIC1 in feature form, x, y column-centered
        dx, dy = (x * x).sum(axis=1), (y * y).sum(axis=1)
        dd = float(dx @ dy)
        total = float(dx.sum()) * float(dy.sum()) / ((n - 1) * (n - 2))
        return (cross - dd + total - 2 * dd / (n - 2)) / (n * (n - 3))

    feats = {(m, l): centered(s, l) for m, s in stores.items() for l in s.layer_names}
    self_terms = {}
    for key, x in feats.items():
        gram = x.T @ x  # numpy: syrk
        self_terms[key] = hsic1(x, x, float((gram * gram).sum()))
        del gram
    values = []
    for la in stores["a"].layer_names:
        row = []
        for lb in stores["b"].layer_names:
            x, y = feats[("a", la)], feats[("b", lb)]
            if min(x.shape[1], y.shape[1]) > args["max_cross_width"]:
                row.append(None)  # skipped: too slow on this machine
                continue
            cross = hsic1(x, y, float(np.square(x.T @ y).sum()))
            row.append(cross / np.sqrt(self_terms[("a", la)] * self_terms[("b", lb)]))
        values.append(row)
    extra = {"cka": values}
wall = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"wall_s": wall, "peak_rss_bytes": peak, **extra}))
"""


def make_store(path: Path, n: int, widths: list[int], seed: int) -> None:
    """A float16 store of post-ReLU-like layers driven by a shared 32-dim latent (seed 0)."""
    import numpy as np
    import torch

    from ckapipe.store import ActivationStore, LayerRecord

    records = [LayerRecord(f"layer{p}", (p,), "flatten", p) for p in widths]
    latent_rng = torch.Generator().manual_seed(0)  # the same samples for every model
    model_rng = torch.Generator().manual_seed(seed)
    mixes = [torch.randn(32, p, generator=model_rng) / 4 for p in widths]
    store = ActivationStore.create(path, layers=records, sample_ids=np.arange(n), row_block=512)
    step = 1024
    for start in range(0, n, step):
        z = torch.randn(min(step, n - start), 32, generator=latent_rng)
        rows = {}
        for record, mix in zip(records, mixes, strict=True):
            noise = torch.randn(z.shape[0], mix.shape[1], generator=model_rng)
            rows[record.name] = torch.relu(z @ mix + noise + 0.5).numpy()
        store.write_rows(start, rows)
    store.set_rows_complete(n)
    store.mark_complete()
    store.close()


def step(args: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", _STEP, json.dumps(args)], capture_output=True, text=True, env=env
    )
    if run.returncode:
        raise RuntimeError(f"step {args['step']} failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def cross_check(stores: dict[str, Path], max_cross_width: int) -> dict:
    """Linear debiased CKA of every layer pair in feature form (no n×n Gram), in float64."""
    stores = {name: str(path) for name, path in stores.items()}
    return step({"step": "check", "stores": stores, "max_cross_width": max_cross_width})


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--widths", default="128,4096", help="layer widths of each model")
    parser.add_argument("--tile-size", type=int, default=2048)
    parser.add_argument("--storage", default="float32")
    parser.add_argument("--precision", default="float32", help="Gram products (full mode)")
    parser.add_argument("--root", type=Path, default=Path("/tmp/ckapipe-bench-ooc"))
    parser.add_argument("--cross-check", action="store_true")
    parser.add_argument(
        "--max-cross-width",
        type=int,
        default=1024,
        help="cross-check: skip layer pairs whose narrower layer is wider than this (their "
        "p×q product over n samples is the slow part)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the stores and caches")
    parser.add_argument(
        "--check-only",
        nargs=2,
        type=Path,
        metavar=("STORE_A", "STORE_B"),
        help="only the feature-form cross-check of two existing stores",
    )
    options = parser.parse_args()
    if options.check_only:
        stores = dict(zip(("a", "b"), options.check_only, strict=True))
        print("CHECK " + json.dumps(cross_check(stores, options.max_cross_width)), flush=True)
        return
    widths = [int(w) for w in options.widths.split(",")]
    root = options.root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    report: dict = {"n": options.n, "widths": widths, "tile": options.tile_size,
                    "storage": options.storage, "precision": options.precision}  # fmt: skip
    stores = {}
    t0 = time.perf_counter()
    for seed, name in enumerate(("a", "b"), start=1):
        stores[name] = root / f"{name}.store"
        make_store(stores[name], options.n, widths, seed)
    report["store_write_s"] = time.perf_counter() - t0
    print(json.dumps({"stores_written_s": report["store_write_s"]}), flush=True)
    caches = {}
    for name in ("a", "b"):
        caches[name] = root / f"{name}.grams"
        result = step(
            {
                "step": "gram",
                "store": str(stores[name]),
                "out": str(caches[name]),
                "tile": options.tile_size,
                "storage": options.storage,
                "precision": options.precision,
            }  # fmt: skip
        )
        report[f"gram_{name}"] = result
        report[f"cache_bytes_{name}"] = du(caches[name])
        print(json.dumps({f"gram_{name}": result}), flush=True)
    result = step(
        {
            "step": "analyze",
            "caches": [str(caches["a"]), str(caches["b"])],
            "out": str(root / "result.zarr"),
        }  # fmt: skip
    )
    report["analyze"] = result
    print(json.dumps({"analyze": result}), flush=True)
    if options.cross_check:
        report["cross_check"] = check = cross_check(stores, options.max_cross_width)
        report["max_abs_diff_vs_feature_form"] = max(
            abs(c - r)
            for crow, rrow in zip(check["cka"], result["cka"], strict=True)
            for c, r in zip(crow, rrow, strict=True)
            if c is not None
        )
        print(json.dumps({"cross_check": report["cross_check"]}), flush=True)
    print("REPORT " + json.dumps(report), flush=True)
    if not options.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
