"""``ckapipe analyze``: CKA of every model pair from Gram caches (a thin layer over
:func:`ckapipe.analyze.study.analyze_study`)."""

from __future__ import annotations

import warnings
from pathlib import Path

import click
import numpy as np

__all__ = ["analyze", "commands"]


class _PairsType(click.ParamType):
    """``all`` or ``a:b,c:d``."""

    name = "PAIRS"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if not isinstance(value, str) or value == "all":
            return value
        pairs = []
        for item in value.split(","):
            parts = item.strip().split(":")
            if len(parts) != 2 or not all(parts):
                self.fail(f"{item!r} is not of the form model_a:model_b (e.g. a:b,a:c)", param, ctx)
            pairs.append((parts[0], parts[1]))
        return pairs


@click.command("analyze")
@click.argument(
    "grams", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path), metavar="GRAMS…"
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Result group to write (RESULT.zarr); RESULT.csv is written beside it.",
)
@click.option(
    "--names",
    default=None,
    metavar="A,B,…",
    help="Model names, one per Gram cache, comma-separated. Default: the cache file names.",
)
@click.option(
    "--estimator",
    type=click.Choice(["minibatch", "debiased", "biased"]),
    default="minibatch",
    show_default=True,
    help="minibatch: unbiased minibatch CKA (minibatch caches); debiased / biased: exact HSIC₁ / "
    "HSIC₀ CKA over all samples (full caches).",
)
@click.option(
    "--kernel",
    type=click.Choice(["linear", "rbf"]),
    default=None,
    help="Full mode: kernel applied to the cached linear Grams. Default: the caches' kernel.",
)
@click.option(
    "--threshold",
    type=float,
    default=None,
    help="Full mode, RBF: bandwidth as a multiple of the median distance. Default: the caches'.",
)
@click.option(
    "--ci-level",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Coverage of the bootstrap confidence intervals.",
)
@click.option(
    "--bootstrap",
    "n_bootstrap",
    type=click.IntRange(min=0),
    default=1000,
    show_default=True,
    help="Bootstrap replicates over minibatches (0: no intervals).",
)
@click.option(
    "--permutations",
    "n_permutations",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Permutations for p-values (samples of model b permuted within each batch; 0: none).",
)
@click.option(
    "--seed",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seed of the bootstrap and the permutations.",
)
@click.option(
    "--pairs",
    type=_PairsType(),
    default="all",
    show_default=True,
    help="Model pairs: all (every pair and every model with itself) or a:b,c:d (a:a for a "
    "within-model comparison).",
)
@click.option(
    "--self/--no-self",
    "include_self",
    default=True,
    show_default=True,
    help="With --pairs all, also compare each model with itself.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when available), cpu, cuda or cuda:N.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing result at --out.")
def analyze(
    grams: tuple[Path, ...],
    out: Path,
    names: str | None,
    estimator: str,
    kernel: str | None,
    threshold: float | None,
    ci_level: float,
    n_bootstrap: int,
    n_permutations: int,
    seed: int,
    pairs: str | list[tuple[str, str]],
    include_self: bool,
    device: str,
    overwrite: bool,
) -> None:
    """CKA of every layer pair of every model pair, from one Gram cache per model.

    Writes RESULT.zarr (CKA, confidence intervals, per-batch HSIC, provenance) and RESULT.csv
    (one row per model pair x layer pair), then prints a summary.
    """
    from ckapipe.analyze.estimators import DegenerateLayerWarning
    from ckapipe.analyze.study import StudyError, analyze_study, csv_path_for
    from ckapipe.errors import CkapipeError

    try:
        with warnings.catch_warnings():
            # the same messages are in each pair's diagnostics, printed below
            warnings.simplefilter("ignore", DegenerateLayerWarning)
            study = analyze_study(
                list(grams),
                out,
                names=names.split(",") if names else None,
                estimator=estimator,  # type: ignore[arg-type]
                kernel=kernel,
                threshold=threshold,
                ci_level=ci_level,
                n_bootstrap=n_bootstrap,
                n_permutations=n_permutations,
                seed=seed,
                pairs=pairs,
                include_self=include_self,
                device=device,
                overwrite=overwrite,
            )
    except (StudyError, CkapipeError) as error:
        # one line saying what is wrong and what to do, exit status 1
        raise click.ClickException(str(error)) from error

    shared = set.intersection(*(set(pair.diagnostics) for pair in study.pairs.values()))
    click.echo(f"{'pair':<32} {'layers':>7} {'diag':>7} {'best':>7} {'min':>7} {'max':>7}  notes")
    for (a, b), pair in study.pairs.items():
        click.echo(_summary_line(a, b, pair.cka, len(set(pair.diagnostics) - shared)))
        for message in pair.diagnostics:
            if message not in shared:
                click.echo(f"    - {message}")
    for message in sorted(shared):
        click.echo(f"all pairs: {message}")
    click.echo(
        "diag: mean CKA of layer i with layer i (square pairs); best: mean over model a's layers "
        "of the highest CKA with any layer of model b"
    )
    click.echo(f"wrote {out} and {csv_path_for(out)}")


def _summary_line(a: str, b: str, cka: np.ndarray, n_notes: int) -> str:
    def fmt(value: float) -> str:
        return f"{value:>7.3f}" if np.isfinite(value) else f"{'-':>7}"

    finite = cka[np.isfinite(cka)]
    diagonal = np.diagonal(cka) if cka.shape[0] == cka.shape[1] else np.array([np.nan])
    diag = float(np.mean(diagonal)) if np.isfinite(diagonal).all() else float("nan")
    rows = [row[np.isfinite(row)] for row in cka]
    best_per_row = [row.max() for row in rows if row.size]
    best = float(np.mean(best_per_row)) if best_per_row else float("nan")
    low = float(finite.min()) if finite.size else float("nan")
    high = float(finite.max()) if finite.size else float("nan")
    shape = f"{cka.shape[0]}x{cka.shape[1]}"
    notes = f"{n_notes} diagnostic(s)" if n_notes else ""
    return f"{a + ' : ' + b:<32} {shape:>7} {fmt(diag)} {fmt(best)} {fmt(low)} {fmt(high)}  {notes}"


commands: list[click.Command] = [analyze]
