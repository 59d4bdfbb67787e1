"""CLI commands of the extract stage: a thin layer over :mod:`ckapipe.extract`.

``commands`` is what ``ckapipe.cli`` registers; each command appends itself below its definition
(other extract-stage commands are appended at the bottom of this file in the same way).
Heavy imports (torch, the extraction code) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import json
from typing import Any

import click

commands: list[click.Command] = []

# errors that mean bad input, not a bug: shown as one "Error: ..." line, exit status 1
_USER_ERRORS: tuple[type[BaseException], ...] = ()


def _user_errors() -> tuple[type[BaseException], ...]:
    global _USER_ERRORS
    if not _USER_ERRORS:
        from ckapipe.errors import CkapipeError
        from ckapipe.extract.capture import CaptureError
        from ckapipe.extract.extraction import ExtractionError
        from ckapipe.extract.layers import LayerSelectionError
        from ckapipe.extract.specs import SpecError
        from ckapipe.store import StoreError

        _USER_ERRORS = (
            CkapipeError,  # e.g. a damaged store at --out (IntegrityError)
            SpecError,
            LayerSelectionError,
            CaptureError,
            ExtractionError,
            StoreError,
        )
    return _USER_ERRORS


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


def _shape(value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        shape = tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated sizes like 3,32,32, got {value!r}"
        ) from None
    if not shape or min(shape) < 1:
        raise click.BadParameter(f"sizes must be positive, got {value!r}")
    return shape


@click.command("layers")
@click.argument("model", type=SpecParam("model"))
@click.option(
    "--dataset",
    "dataset",
    type=SpecParam("dataset"),
    help="Dataset spec: the first item is the example input.",
)
@click.option(
    "--input-shape", help="Per-sample input shape for a random example input, e.g. 3,32,32."
)
@click.option(
    "--input-dtype",
    type=click.Choice(["float32", "float16", "int64"]),
    default="float32",
    show_default=True,
    help="dtype of the --input-shape example (int64: token ids 0..9).",
)
@click.option(
    "--output-index",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Element of a tuple output that counts as the layer's output.",
)
@click.option(
    "--output-key",
    default="last_hidden_state",
    show_default=True,
    help="Key of a dict output that counts as the layer's output.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def layers_command(
    model: Any,
    dataset: Any,
    input_shape: str | None,
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
    try:
        import torch

        from ckapipe.extract.capture import split_batch
        from ckapipe.extract.layers import list_layers

        net = model.build()
        if dataset is not None:
            data = dataset.build()
            batch = torch.utils.data.default_collate([data[0]])
            example, _ = split_batch(batch, input_index=dataset.input, keys=dataset.keys)
        else:
            shape = (1, *_shape(input_shape))  # type: ignore[misc]
            if input_dtype == "int64":
                example = torch.randint(0, 10, shape)
            else:
                example = torch.randn(shape, dtype=getattr(torch, input_dtype))
        rows = list_layers(net, example, output_index=output_index, output_key=output_key)
    except _user_errors() as error:
        raise click.ClickException(str(error)) from None
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


commands.append(layers_command)


@click.command("extract")
@click.option(
    "--model",
    "model",
    required=True,
    type=SpecParam("model"),
    help="Model spec: module:callable, a JSON object, or @spec.json|yaml.",
)
@click.option(
    "--dataset",
    "dataset",
    required=True,
    type=SpecParam("dataset"),
    help="Dataset spec: module:callable, an array file (x.npy), a JSON object, or @spec.json|yaml.",
)
@click.option(
    "--layers",
    "layers",
    required=True,
    multiple=True,
    help="Layers to capture (repeatable, or comma-separated): names, globs (layer*.relu), type:Conv2d, NAME@K.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Store directory (zarr). An interrupted store of the same extraction is resumed.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Samples per forward pass.",
)
@click.option(
    "--num-workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="DataLoader worker processes.",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    help="auto (CUDA when available), cpu, cuda or cuda:N.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32", "bfloat16"]),
    default="float16",
    show_default=True,
    help="Storage dtype of the activations.",
)
@click.option(
    "--reduce",
    type=click.Choice(["flatten", "mean", "cls", "masked_mean"]),
    default="flatten",
    show_default=True,
    help="How a layer output becomes a feature vector.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Extract only the first N samples of the (seeded) order.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the random sample order."
)
@click.option(
    "--order",
    type=click.Choice(["random", "dataset"]),
    default="random",
    show_default=True,
    help="Row order: a seeded permutation, or dataset order.",
)
@click.option(
    "--codec",
    type=click.Choice(["none", "zstd"]),
    default="none",
    show_default=True,
    help="Compression of the store's chunks.",
)
@click.option(
    "--autocast",
    type=click.Choice(["none", "float16", "bfloat16"]),
    default="none",
    show_default=True,
    help="Run the forward pass under torch.autocast.",
)
@click.option(
    "--output-index",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Element of a tuple output to capture.",
)
@click.option(
    "--output-key",
    default="last_hidden_state",
    show_default=True,
    help="Key of a dict output to capture.",
)
@click.option(
    "--row-block",
    type=click.IntRange(min=1),
    default=None,
    help="Rows per write / resume step (a multiple of --batch-size; default ~256).",
)
@click.option(
    "--progress/--no-progress",
    default=True,
    show_default=True,
    help="Report samples/s and ETA on stderr.",
)
def extract_command(
    model: Any,
    dataset: Any,
    layers: tuple[str, ...],
    out: str,
    batch_size: int,
    num_workers: int,
    device: str,
    dtype: str,
    reduce: str,
    limit: int | None,
    seed: int,
    order: str,
    codec: str,
    autocast: str,
    output_index: int,
    output_key: str,
    row_block: int | None,
    progress: bool,
) -> None:
    """Run MODEL once over a dataset and write the selected layers' activations to a store.

    Rows are written in a seeded random order of the dataset (the same for every model), one
    row block at a time; re-running the same command on an interrupted store resumes it.
    """
    try:
        from ckapipe.extract.extraction import extract_activations

        reused = _holds_complete_store(out)
        store = extract_activations(
            model,
            dataset,
            layers=list(layers),
            out=out,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            dtype=dtype,
            reduce=reduce,
            limit=limit,
            seed=seed,
            order=order,
            codec=codec,
            autocast=None if autocast == "none" else autocast,
            output_index=output_index,
            output_key=output_key,
            progress=progress,
            row_block=row_block,
        )
    except _user_errors() as error:
        raise click.ClickException(str(error)) from None
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


def _holds_complete_store(out: str) -> bool:
    from ckapipe.store import ActivationStore, StoreError

    try:
        return ActivationStore.open(out, allow_incomplete=True, check_chunks=False).is_complete
    except StoreError:
        return False


commands.append(extract_command)
