"""What the four study benchmarks share: modes, targets, one run's settings, the command line.

The benchmarks are ``study_vs_peers``, ``floors``, ``accuracy`` and ``memory``; each module
has ``KEY`` (its entry in a mode's result), ``run(bench) -> dict``, ``table_rows(result)`` and
``notes(result)``, where ``result`` is one mode's whole result (``config``, ``channels`` …).
Each runs alone (``python bench/accuracy.py --quick``: prints its rows of the table, writes
nothing) or all together under ``bench/run.py``, which stores and renders the results.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from report import machine, utc_now
from workload import DEFAULT_CHANNELS, WORKLOADS, make_cnn, workload_layers, workload_model

TARGETS = {
    "study_speedup_at_max_m": 3.0,  # ckapipe end to end vs pytorch-cka, M = 8
    "marginal_speedup": 8.0,  # adding one model vs the peer on the M new pairs
    "gram_pass_over_raw_read": 0.8,
    "ckapipe_max_error": 1e-4,
}
# issue 12: a model with more compute per captured feature must give larger ratios
WORKLOAD_TARGETS = {
    "cnn": {},
    "resnet18": {"study_speedup_at_max_m": 5.0, "marginal_speedup": 10.0},
}


def targets(workload: str = "cnn") -> dict[str, float]:
    """The targets of one workload (:data:`TARGETS` with its own overrides)."""
    return {**TARGETS, **WORKLOAD_TARGETS[workload]}


TABLE_HEADER = ["| what | ckapipe | peer | ratio | target |", "|---|---|---|---|---|"]


@dataclass(frozen=True)
class Config:
    """What one mode runs. ``n`` images, minibatch ``m``; memory at ``memory_ns``."""

    mode: str
    n: int
    m: int
    study_ms: tuple[int, ...]
    repeats: int
    floor_repeats: int
    accuracy_n: int
    accuracy_m: int
    accuracy_widths: tuple[int, ...]
    offset_ratios: tuple[float, ...]
    memory_ns: tuple[int, ...]


# one line per benchmark: study (and the shared n, m), floors, accuracy, memory
QUICK = Config(
    mode="quick", n=1024, m=256, study_ms=(2, 4, 8), repeats=1,
    floor_repeats=3,
    accuracy_n=512, accuracy_m=128, accuracy_widths=(2048, 512), offset_ratios=(0.0, 100.0),
    memory_ns=(512, 1024),
)  # fmt: skip
# the full run: larger n and features, more repeats
FULL = replace(
    QUICK, mode="full", n=2048, repeats=3,
    floor_repeats=5,
    accuracy_n=1024, accuracy_m=256, accuracy_widths=(4096, 512),
    memory_ns=(1024, 4096),
)  # fmt: skip


@dataclass(frozen=True)
class BenchRun:
    """One run's settings: the mode, where every tool runs (``cpu``/``cuda``), the CNN's block
    widths, a scratch folder, the workload (``cnn``/``resnet18``) and the torch threads (None:
    torch's default); with ckapipe's three stages on those settings.

    ckapipe is imported inside the calls: the benchmarks must import while a stage is unfinished.
    """

    cfg: Config
    device: str
    channels: tuple[int, ...]
    root: Path
    workload: str = "cnn"
    threads: int | None = None
    n_default: int | None = None  # the mode's own n when --n changed it

    @property
    def mode(self) -> str:
        """``quick``/``full``, with ``-resnet18`` for that workload, ``-c<widths>`` for other CNN
        widths, ``-n<n>`` for another n, ``-t<threads>`` for set threads, ``-cuda`` on a GPU."""
        widths = (
            "" if self.channels == DEFAULT_CHANNELS else "-c" + "-".join(map(str, self.channels))
        )
        return (
            self.cfg.mode
            + ("" if self.workload == "cnn" else f"-{self.workload}")
            + widths
            + ("" if self.n_default in (None, self.cfg.n) else f"-n{self.cfg.n}")
            + ("" if self.threads is None else f"-t{self.threads}")
            + ("" if self.device == "cpu" else f"-{self.device}")
        )

    def cnn(self, seed: int) -> torch.nn.Module:
        return make_cnn(seed, self.channels)

    def model(self, seed: int) -> torch.nn.Module:
        """The workload's model for ``seed``."""
        return workload_model(self.workload, seed, self.channels)

    @property
    def layers(self) -> list[str]:
        """The workload's compared layers."""
        return workload_layers(self.workload)

    def synchronize(self) -> None:
        """Wait for the device, so a timing includes the work it was given."""
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def forward(self, model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> None:
        """One inference pass of ``model`` over ``loader``, finished on the device."""
        model.to(self.device)
        with torch.inference_mode():
            for batch in loader:
                model(batch.to(self.device))
        self.synchronize()

    def extract(
        self,
        model: torch.nn.Module,
        dataset: torch.utils.data.Dataset,
        layers: list[str],
        out: Path,
        m: int,
        dtype: str = "float16",
        gram_out: Path | None = None,
    ) -> Path:
        """The store of ``model`` at ``out``; with ``gram_out``, also its Gram cache (batch size
        ``m``), fused with the extraction (the same cache ``gram`` builds from the store)."""
        from ckapipe.extract.extraction import extract_activations
        from ckapipe.extract.fused_gram import GramRequest

        gram = GramRequest(out=gram_out, batch_size=m) if gram_out is not None else None
        # order="dataset": the peers iterate the loader in dataset order, so every tool sees the
        # same minibatches (the synthetic inputs are i.i.d., so dataset order is a random order)
        extract_activations(
            model, dataset, layers=layers, out=out, batch_size=m, device=self.device,
            dtype=dtype, order="dataset", progress=False, gram=gram,
        )  # fmt: skip
        return out

    def gram(self, store: Path, out: Path, m: int) -> Path:
        from ckapipe.analyze.gram_cache import build_gram_cache

        build_gram_cache(store, out, batch_size=m, device=self.device)
        return out

    def analyze(
        self, caches: list[Path], out: Path, pairs: Any = "all", n_bootstrap: int = 0,
        include_self: bool = False,
    ) -> Any:  # fmt: skip
        from ckapipe.analyze.study import analyze_study

        return analyze_study(
            caches, out, pairs=pairs, n_bootstrap=n_bootstrap, include_self=include_self,
            device=self.device, overwrite=True,
        )  # fmt: skip

    def pair_study(
        self, models: tuple[torch.nn.Module, torch.nn.Module], dataset: torch.utils.data.Dataset,
        layers: list[str], workdir: Path, m: int, dtype: str = "float16",
    ) -> Any:  # fmt: skip
        """ckapipe end to end on two models: stores, Gram caches, the result of pair "ga"–"gb"."""
        caches = []
        for name, model in zip(("a", "b"), models, strict=True):
            store = self.extract(model, dataset, layers, workdir / f"{name}.zarr", m, dtype)
            caches.append(self.gram(store, workdir / f"g{name}.zarr", m))
        return self.analyze(caches, workdir / "result.zarr")


def import_everything() -> None:
    """Import every tool before anything is timed: import time is not what is compared."""
    import cka  # noqa: F401 - pytorch-cka
    import ckatorch  # noqa: F401

    import ckapipe.analyze.gram_cache  # noqa: F401
    import ckapipe.analyze.study  # noqa: F401
    import ckapipe.extract.extraction  # noqa: F401


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    if met:
        return "met"
    if higher_is_better:
        return f"MISSED by {target / value:.2f}x"
    return f"MISSED by {value / target:.2f}x"


def table_lines(result: dict[str, Any], benchmarks: list[ModuleType]) -> list[str]:
    """The summary table (Markdown) of one mode's result, rows in the order of ``benchmarks``."""
    lines = list(TABLE_HEADER)
    for benchmark in benchmarks:
        if result.get(benchmark.KEY):
            lines += benchmark.table_rows(result)
    return lines


def add_arguments(
    parser: argparse.ArgumentParser, workload_choices: tuple[str, ...] = WORKLOADS
) -> None:
    """The options every study benchmark takes (alone or under bench/run.py, which adds the
    ``--workload`` choice ``all``)."""
    parser.add_argument("--quick", action="store_true", help="the < 3 minute mode (2 CPU cores)")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where every tool runs (default cpu); a cuda run is stored as mode '<mode>-cuda'",
    )
    parser.add_argument(
        "--channels",
        default=",".join(map(str, DEFAULT_CHANNELS)),
        help="the CNN's three block widths (default 8,16,32); other widths are stored as mode "
        "'<mode>-c<widths>'",
    )
    parser.add_argument(
        "--workload",
        default="cnn",
        choices=workload_choices,
        help="the models compared: cnn (small CNNs, default) or resnet18 (CIFAR-style "
        "ResNet-18, stem + 8 block outputs); resnet18 is stored as mode '<mode>-resnet18'"
        + ("; all: each in turn" if "all" in workload_choices else ""),
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (torch.set_num_threads; default: torch's own); stored as mode "
        "'<mode>-t<threads>'",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help="number of images, overriding the mode's (a multiple of its minibatch m = 256); "
        "stored as mode '<mode>-n<n>'",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="repeats of the study (default: the mode's)"
    )


def bench_run(
    parser: argparse.ArgumentParser, args: argparse.Namespace, root: Path | None = None
) -> BenchRun:
    """The settings :func:`add_arguments` parsed; ``root``, the scratch folder, is a new
    temporary folder when not given (made only once the options are found valid)."""
    channels = tuple(int(c) for c in args.channels.split(","))
    if len(channels) != 3 or min(channels) < 1:
        parser.error(f"--channels needs three positive widths, e.g. 16,32,64; got {args.channels}")
    cfg = QUICK if args.quick else FULL
    n_default = cfg.n
    workload = getattr(args, "workload", "cnn")
    if getattr(args, "n", None) is not None:
        if args.n < cfg.m or args.n % cfg.m:
            parser.error(
                f"--n must be a positive multiple of the minibatch m = {cfg.m}; got {args.n}"
            )
        cfg = replace(cfg, n=args.n)
    if getattr(args, "repeats", None) is not None:
        if args.repeats < 1:
            parser.error(f"--repeats must be at least 1; got {args.repeats}")
        cfg = replace(cfg, repeats=args.repeats)
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        parser.error(f"--threads must be at least 1; got {threads}")
    root = root or Path(tempfile.mkdtemp(prefix="ckapipe-bench-study-"))
    return BenchRun(cfg, args.device, channels, root, workload, threads, n_default)


def measure(
    parser: argparse.ArgumentParser, args: argparse.Namespace, benchmarks: list[ModuleType]
) -> dict[str, Any]:
    """Run ``benchmarks`` in order in one process and scratch folder: one mode's result."""
    started = time.perf_counter()
    bench = bench_run(parser, args)
    if bench.threads is not None:
        torch.set_num_threads(bench.threads)
    result: dict[str, Any] = {
        "mode": bench.mode,
        "device": bench.device,
        "workload": bench.workload,
        "layers": bench.layers,
        "channels": list(bench.channels),
        "date": utc_now(),
        "config": asdict(bench.cfg),
        "machine": machine(),
        "targets": targets(bench.workload),
    }
    import_everything()
    try:
        for benchmark in benchmarks:
            result[benchmark.KEY] = benchmark.run(bench)
    finally:
        shutil.rmtree(bench.root, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - started
    return result


def standalone_main(benchmark: ModuleType) -> None:
    """``python bench/<benchmark>.py [--quick] [--device …] [--channels …]``: run it alone and
    print its rows of the table (bench/run.py --only <KEY> stores a result)."""
    parser = argparse.ArgumentParser(description=benchmark.__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args()
    supported = getattr(benchmark, "WORKLOADS", ("cnn",))
    if args.workload not in supported:
        parser.error(f"--workload {args.workload}: this benchmark runs on {', '.join(supported)}")
    result = measure(parser, args, [benchmark])
    print("\n".join(table_lines(result, [benchmark])))
    print("\n".join(["", *benchmark.notes(result)]))
    print(f"\n{result['mode']} mode, wall time {result['wall_s']:.0f} s")
