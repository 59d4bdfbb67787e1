"""CLI commands of the extract stage: a thin layer over :mod:`ckapipe.extract`.

Heavy imports (torch, the extraction code) happen inside the commands so ``--help`` stays fast.
Options shared with other commands come from :mod:`ckapipe.cli_options`.
"""

from __future__ import annotations

import json
from typing import Any

import click

from ckapipe import cli_options as opts

__all__ = ["SpecParam", "commands", "extract_command", "layers_command"]


class SpecParam(click.ParamType):
    """A model or dataset spec: ``module:callable``, a JSON object, or ``@file.json|yaml``."""

    def __init__(self, kind: str):
        self.kind = kind
        self.name = f"{kind} spec"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from ckapipe.extract.specs import SpecError, parse_dataset_spec, parse_model_spec

        parse = parse_model_spec if self.kind == "model" else parse_dataset_spec
        try:
            return parse(value)
        except SpecError as error:
            self.fail(str(error), param, ctx)


# help texts of options too long to sit on one line with them
_INPUT_DTYPE_HELP = "dtype of the --input-shape example (int64: token ids 0..9)."
_REDUCE_HELP = "How a layer output becomes a feature vector."
_ORDER_HELP = "Row order: a seeded permutation, or dataset order."
_ROW_BLOCK_HELP = "Rows per write / resume step (a multiple of --batch-size; default ~256)."


@opts.command("layers")
@click.argument("model", type=SpecParam("model"))
@click.option(
    "--dataset",
    type=SpecParam("dataset"),
    help="Dataset spec: the first item is the example input.",
)
@click.option(
    "--input-shape",
    type=opts.ShapeParam(),
    help="Per-sample input shape for a random example input, e.g. 3,32,32.",
)
@opts.choice(
    "--input-dtype",
    source="ckapipe.extract.layers:EXAMPLE_DTYPES",
    default="float32",
    help=_INPUT_DTYPE_HELP,
)
@opts.output_selection()
@opts.json_flag("Print a JSON list instead of a table.")
def layers_command(
    model: Any,
    dataset: Any,
    input_shape: tuple[int, ...] | None,
    input_dtype: str,
    output_index: int,
    output_key: str,
    as_json: bool,
) -> None:
    """List MODEL's modules with their types and output shapes (one dry forward pass).

    MODEL is `module:callable`, a JSON spec object, or @spec.json / @spec.yaml. Give an example
    input with --dataset (its first item) or --input-shape. Use the names (or globs, or
    type:CLASS) with `ckapipe extract --layers`; a module that runs more than once per forward
    pass (calls > 1) is selected as NAME@K.
    """
    if (dataset is None) == (input_shape is None):
        raise click.UsageError("give exactly one of --dataset and --input-shape")
    from ckapipe.extract.layers import model_layers

    rows = model_layers(
        model,
        dataset=dataset,
        input_shape=input_shape,
        input_dtype=input_dtype,
        output_index=output_index,
        output_key=output_key,
    )
    if as_json:
        click.echo(json.dumps([row._asdict() for row in rows], indent=2))
        return
    width_name = max([len("name"), *(len(row.name) for row in rows)])
    width_type = max([len("type"), *(len(row.type) for row in rows)])
    click.echo(f"{'name':<{width_name}}  {'type':<{width_type}}  calls  output")
    for row in rows:
        click.echo(
            f"{row.name:<{width_name}}  {row.type:<{width_type}}  {row.calls:>5}  {row.output}"
        )


@opts.command("extract")
@click.option(
    "--model",
    required=True,
    type=SpecParam("model"),
    help="Model spec: module:callable, a JSON object, or @spec.json|yaml.",
)
@click.option(
    "--dataset",
    required=True,
    type=SpecParam("dataset"),
    help="Dataset spec: module:callable, an array file (x.npy), a JSON object, or @spec.json|yaml.",
)
@opts.layers(
    "Layers to capture (repeatable, or comma-separated): names, globs (layer*.relu), "
    "type:Conv2d, NAME@K. `ckapipe layers MODEL` lists them.",
    required=True,
)
@opts.out(
    "Store directory (zarr). An interrupted store of the same extraction is resumed.",
    file_okay=False,
)
@opts.forward_batch_size("Samples per forward pass (memory, not results, depends on it).")
@opts.count("--num-workers", default=0, help="DataLoader processes (0: the main process).")
@opts.device()
@opts.dtype("Storage dtype of the activations.", default="float16")
@opts.choice(
    "--reduce", source="ckapipe.extract.capture:REDUCTIONS", default="flatten", help=_REDUCE_HELP
)
@opts.count("--limit", default=None, minimum=1, help="Extract only the first N samples.")
@opts.seed("Seed of the random sample order; use the same value for every model of a study.")
@opts.choice(
    "--order", source="ckapipe.extract.extraction:ORDERS", default="random", help=_ORDER_HELP
)
@opts.codec()
@click.option(
    "--autocast",
    type=click.Choice(["none", "float16", "bfloat16"]),
    default="none",
    show_default=True,
    help="Run the forward pass under torch.autocast in this dtype (none: full precision).",
)
@opts.output_selection()
@opts.count("--row-block", default=None, minimum=1, help=_ROW_BLOCK_HELP)
@click.option("--progress/--no-progress", default=True, help="Report samples/s and ETA on stderr.")
@click.option(
    "--gram-out",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write the store's minibatch Gram cache here while extracting (epoch 0; "
    "bit-for-bit what `ckapipe gram STORE` builds, without re-reading the store).",
)
@opts.count(
    "--gram-batch-size",
    default=256,
    minimum=4,
    help="Gram cache minibatch size m (with --gram-out).",
)
@click.option(
    "--gram-kernel",
    type=click.Choice(["linear", "rbf"]),
    default="linear",
    show_default=True,
    help="Gram cache kernel (with --gram-out).",
)
@click.option(
    "--gram-threshold",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="RBF bandwidth multiple (with --gram-out --gram-kernel rbf).",
)
@click.option(
    "--gram-precision",
    type=click.Choice(["auto", "float32", "float64"]),
    default="auto",
    show_default=True,
    help="Gram product precision (auto: float32 products summed in float64).",
)
@click.option(
    "--gram-storage",
    type=click.Choice(["float32", "float64"]),
    default="float32",
    show_default=True,
    help="Dtype of the stored Grams (with --gram-out; as `ckapipe gram --storage`): float32 "
    "halves the disk (each float64 Gram rounded once; CKA within 1e-6), float64 keeps them exact.",
)
@opts.count(
    "--gram-seed",
    default=0,
    help="Partition seed recorded in the Gram cache (as `ckapipe gram --seed`; epoch 0 does "
    "not depend on it).",
)
@click.option(
    "--gram-only",
    "gram_only",
    multiple=True,
    metavar="LAYER",
    help="Do not store this layer's activations, only its Grams in --gram-out (repeatable; "
    "for wide conv maps whose rows cost more to write than to recompute). The store keeps "
    "its per-batch Grams, so an interrupted run resumes with the same --gram-* options.",
)
def extract_command(model: Any, dataset: Any, layers: tuple[str, ...], **options: Any) -> None:
    """Run MODEL once over a dataset and write the selected layers' activations to a store.

    Rows are written in a seeded random order of the dataset (the same for every model), one
    row block at a time; re-running the same command on an interrupted store resumes it.
    With --gram-out it also writes the store's minibatch Gram cache (epoch 0) as it goes, so a
    minibatch study needs no `ckapipe gram` pass; --gram-only LAYER keeps a layer in the Gram
    cache only.
    """
    from ckapipe.extract.extraction import extract_activations

    gram_options = {key: options.pop(f"gram_{key}") for key in _GRAM_OPTIONS}
    gram_only = [name for value in options.pop("gram_only") for name in value.split(",") if name]
    gram_out = options.pop("gram_out")
    if gram_out is None:
        if gram_only:
            raise click.UsageError("--gram-only needs --gram-out (the Grams are all it keeps)")
        gram = None
    else:
        from ckapipe.extract.fused_gram import GramRequest

        gram = GramRequest(out=gram_out, **gram_options)
    reused = _holds_complete_store(options["out"])
    if options["autocast"] == "none":
        options["autocast"] = None
    store = extract_activations(
        model, dataset, layers=list(layers), gram=gram, gram_only=gram_only, **options
    )
    summary = (
        f"{store.n_samples} samples x {len(store.layers)} layers "
        f"({', '.join(f'{r.name} {r.n_features}' for r in store.layers)}), {store.dtype}"
    )
    if reused:
        click.echo(
            f"{store.path} already holds this extraction, complete, from the same inputs "
            f"(verified); nothing written: {summary}"
        )
    else:
        click.echo(f"wrote {store.path}: {summary}")
    if store.gram_only:
        click.echo(f"Gram-only (not stored): {', '.join(r.name for r in store.gram_only)}")
    if gram is not None:
        click.echo(
            f"Gram cache {gram_out}: batch size {gram.batch_size}, kernel {gram.kernel}, "
            f"stored in {gram.storage}"
        )


_GRAM_OPTIONS = ("batch_size", "kernel", "threshold", "precision", "storage", "seed")


def _holds_complete_store(out: Any) -> bool:
    """Whether --out already holds a complete store (the extraction will then reuse it)."""
    from ckapipe.store import ActivationStore, StoreError

    try:
        return ActivationStore.open(out, allow_incomplete=True, check_chunks=False).is_complete
    except StoreError:
        return False


commands: list[click.Command] = [layers_command, extract_command]
