"""What keeping the per-batch Grams of Gram-only layers in the store costs an extraction.

``ckapipe extract --gram-out G --gram-only LAYER`` now also writes each batch's Ũ Gram of the
Gram-only layers into the store (one m×m float64 chunk per batch and layer) and holds
``rows_complete`` to batch boundaries, so that a killed run resumes. This times the same fused
extraction with the Grams kept (the default) and not kept (the store created without
``gram_only_grams``, as before), interleaved, in one process, with 1 and 2 torch threads.

    OMP_NUM_THREADS=1 python bench/bench_gram_only_keep.py [--n 1024] [--repeats 5]

Workload: tests/models.make_cnn (32 channels) on 32×32 images; layer "0" (conv, 32 768 features)
Gram-only, layer "6" (logits) stored; extraction batch 64, m = 256, float16 store.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import ckapipe.store as store_module  # noqa: E402
from ckapipe.extract.extraction import extract_activations  # noqa: E402
from ckapipe.extract.fused_gram import GramRequest  # noqa: E402

_create = store_module.ActivationStore.create.__func__  # type: ignore[attr-defined]


def _create_without_kept_grams(cls, path, **options):
    options["gram_only_grams"] = None
    return _create(cls, path, **options)


def run_once(root: Path, n: int, keep: bool) -> float:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    if not keep:
        store_module.ActivationStore.create = classmethod(_create_without_kept_grams)
    try:
        start = time.perf_counter()
        store = extract_activations(
            {"factory": "models:make_cnn", "kwargs": {"channels": 32}},
            {"factory": "models:image_dataset", "kwargs": {"n": n, "size": 32}},
            layers=["0", "6"],
            out=root / "store",
            batch_size=64,
            device="cpu",
            progress=False,
            gram=GramRequest(out=root / "grams", batch_size=256),
            gram_only=["0"],
        )
        elapsed = time.perf_counter() - start
    finally:
        store_module.ActivationStore.create = classmethod(_create)
    assert (store.gram_only_grams is not None) == keep
    return elapsed


def gram_write_ms(root: Path, m: int = 256, batches: int = 40) -> tuple[float, float]:
    """(median, min) ms of one :meth:`ActivationStore.write_gram_only_gram` (an m×m chunk)."""
    import numpy as np

    from ckapipe.store import ActivationStore, LayerRecord

    record = LayerRecord("g", (4,), "flatten", 4)
    with ActivationStore.create(
        root / "micro", layers=[LayerRecord("a", (4,), "flatten", 4)], gram_only=[record],
        sample_ids=np.arange(m * batches), dtype="float32", gram_only_grams={"batch_size": m},
    ) as store:  # fmt: skip
        gram = np.random.default_rng(0).normal(size=(m, m))
        times = []
        for k in range(batches):
            start = time.perf_counter()
            store.write_gram_only_gram("g", k, gram)
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times), 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        median, fastest = gram_write_ms(root)
        print(f"one kept Gram (m = 256, 512 KiB): median {median:.2f} ms, min {fastest:.2f} ms")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            run_once(root / "warm", options.n, True)
            times: dict[bool, list[float]] = {True: [], False: []}
            for repeat in range(options.repeats):
                for keep in (True, False) if repeat % 2 == 0 else (False, True):
                    times[keep].append(run_once(root / "run", options.n, keep))
            kept, plain = statistics.median(times[True]), statistics.median(times[False])
            print(
                f"threads {threads}: kept {kept:.3f} s, not kept {plain:.3f} s "
                f"(median of {options.repeats}; ratio {kept / plain:.3f}); "
                f"all kept {[round(t, 3) for t in times[True]]}, "
                f"not kept {[round(t, 3) for t in times[False]]}"
            )


if __name__ == "__main__":
    main()
