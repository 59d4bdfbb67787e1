"""``ckapipe analyze``: CKA of every model pair from Gram caches (a thin layer over
:func:`ckapipe.analyze.study.analyze_study`; the summary it prints is
:func:`ckapipe.analyze.summary.summary_lines`)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import click

from ckapipe import cli_options as opts
from ckapipe.analyze.interval_settings import DEFAULT_INTERVAL_METHOD, MIN_BATCHES_FOR_INTERVAL
from ckapipe.analyze.measures import DEFAULT_KNN_K, DEFAULT_SVCCA_KEEP, MEASURES

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


def _interval_help() -> str:
    need = MIN_BATCHES_FOR_INTERVAL
    return (
        "How confidence intervals over the minibatches are computed: jackknife (delete-one-batch "
        f"jackknife with t quantiles, reported from {need['jackknife']} batches on) or bootstrap "
        f"(percentile bootstrap, reported from {need['bootstrap']} batches on). Below that "
        "batch count, or for caches of several epochs, the interval is withheld (NaN, the reason "
        "in the summary and the CSV)."
    )


_BOOTSTRAP_HELP = (
    "0: no confidence intervals. Otherwise intervals are computed by --interval-method, and "
    "this is the number of bootstrap replicates over minibatches when that is bootstrap (the "
    "jackknife needs none)."
)
_PERMUTATIONS_HELP = (
    "Permutations for p-values and null thresholds (samples of model b permuted within each "
    "batch; 0: none). The summary then shows, per pair, the CKA that unrelated "
    "representations exceed with probability 0.05."
)


@opts.command("analyze")
@opts.existing_path("grams", nargs=-1, metavar="GRAMS…")
@opts.out("Result group to write (RESULT.zarr); RESULT.csv is written beside it.")
@click.option(
    "--names",
    metavar="A,B,…",
    help="Model names, one per Gram cache, comma-separated. Default: the cache file names.",
)
@opts.choice(
    "--estimator",
    source="ckapipe.analyze.study:ESTIMATORS",
    default="minibatch",
    help="minibatch: unbiased minibatch CKA (minibatch caches); debiased / biased: exact HSIC₁ / "
    "HSIC₀ CKA over all samples (full caches).",
)
@opts.kernel(
    "Full mode: kernel applied to the cached linear Grams. Default: the caches' kernel.",
    default=None,
)
@opts.threshold(
    "Full mode, RBF: bandwidth as a multiple of the median distance. Default: the caches'.",
    default=None,
)
@opts.choice(
    "--interval-method",
    source="ckapipe.analyze.interval_settings:INTERVAL_METHODS",
    default=DEFAULT_INTERVAL_METHOD,
    help=_interval_help(),
)
@click.option(
    "--ci-level",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.95,
    show_default=True,
    help="Nominal coverage of the confidence intervals (of --interval-method; full mode: a "
    "jackknife over sample blocks). Intervals are withheld when there are too few batches.",
)
@opts.count("--bootstrap", "n_bootstrap", default=1000, help=_BOOTSTRAP_HELP)
@opts.count("--permutations", "n_permutations", default=0, help=_PERMUTATIONS_HELP)
@opts.seed("Seed of the bootstrap and the permutations.")
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
    "--measure",
    "measures",
    metavar="M1,M2,…",
    default="cka",
    show_default=True,
    help="Similarity measures, comma-separated, from: "
    + ", ".join(MEASURES)
    + ". Anything but cka needs full-mode caches; each measure gets its own values in the "
    "result, a column in the CSV and a line in the summary (docs/MEASURES.md).",
)
@click.option(
    "--knn-k",
    type=click.IntRange(min=1),
    default=DEFAULT_KNN_K,
    show_default=True,
    help="Neighbours per sample for --measure knn (mutual k-NN alignment); less than n.",
)
@click.option(
    "--svcca-keep",
    type=click.FloatRange(0, 1, min_open=True),
    default=DEFAULT_SVCCA_KEEP,
    show_default=True,
    help="SVCCA keeps each layer's fewest top principal directions holding this fraction of "
    "its variance.",
)
@opts.architectures(
    "Declare MODEL's architecture (repeatable), e.g. --architecture mlp_s0=mlp. Recorded in "
    "the result: `ckapipe plot` and the report then give layer-correspondence curves to, and "
    "compare within vs across, the architectures declared here. A model not named is of its "
    "factory's architecture; constructor arguments (a seed) do not count."
)
@opts.device()
@opts.overwrite("Replace an existing result at --out.")
def analyze(
    grams: tuple[Path, ...],
    names: str | None,
    measures: str,
    knn_k: int,
    svcca_keep: float,
    **options: Any,
) -> None:
    """CKA of every layer pair of every model pair, from one Gram cache per model.

    Writes RESULT.zarr (CKA, confidence intervals, per-batch HSIC, provenance) and RESULT.csv
    (one row per model pair x layer pair), then prints a summary: per pair, the CKA, its
    interval (or why it was withheld) and, with --permutations, the null threshold. Warns when
    the caches' partition has too few batches for the interval method.
    """
    from ckapipe.analyze.cka_ratio import DegenerateLayerWarning
    from ckapipe.analyze.measures import MeasureOptions, parse_measures
    from ckapipe.analyze.study import analyze_study, csv_path_for
    from ckapipe.analyze.summary import interval_batch_warning, summary_lines

    try:
        measure_list = parse_measures(measures)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--measure") from None
    options["measures"] = measure_list
    options["measure_options"] = MeasureOptions(knn_k=knn_k, svcca_keep=svcca_keep)
    method = options["interval_method"]
    with warnings.catch_warnings():
        # the same messages are in each pair's diagnostics, printed below
        warnings.simplefilter("ignore", DegenerateLayerWarning)
        study = analyze_study(list(grams), names=names.split(",") if names else None, **options)
    if options["n_bootstrap"] > 0 and options["estimator"] == "minibatch":
        advice = interval_batch_warning(study.provenance.get("partition"), method)
        if advice:
            warnings.warn(advice, stacklevel=1)
    for line in summary_lines(study):
        click.echo(line)
    click.echo(f"wrote {options['out']} and {csv_path_for(options['out'])}")


commands: list[click.Command] = [analyze]
