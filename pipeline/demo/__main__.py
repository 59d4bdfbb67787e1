"""``python -m ckapipe.demo``: the two steps of the demo study that are not ``ckapipe`` stages.

The workflow's ``demo_data`` and ``train`` rules call these; they are not part of the public CLI.
"""

from __future__ import annotations

import json

import click

from ckapipe.demo.data import write_split


@click.group()
def main() -> None:
    """Demo dataset generation and demo model training."""


@main.command("data")
@click.option(
    "--out-dir", required=True, help="Folder for <split>_images.npy / <split>_labels.npy."
)
@click.option("--n-train", type=click.IntRange(min=1), required=True, help="Training images.")
@click.option(
    "--n-probe", type=click.IntRange(min=1), required=True, help="Probe (held-out) images."
)
@click.option(
    "--n-classes", type=click.IntRange(2, 12), default=6, show_default=True, help="Classes."
)
@click.option(
    "--image-size", type=click.IntRange(min=8), default=16, show_default=True, help="Pixels."
)
@click.option(
    "--noise", type=click.FloatRange(min=0), default=0.6, show_default=True, help="Pixel noise std."
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Generator seed (probe uses seed+1)."
)
def data_command(
    out_dir: str,
    n_train: int,
    n_probe: int,
    n_classes: int,
    image_size: int,
    noise: float,
    seed: int,
) -> None:
    """Generate the train and probe splits of the grating dataset."""
    common = {"n_classes": n_classes, "image_size": image_size, "noise": noise}
    for split, n, split_seed in (("train", n_train, seed), ("probe", n_probe, seed + 1)):
        images, labels = write_split(out_dir, split, n, seed=split_seed, **common)
        click.echo(f"{split}: {n} images -> {images}, {labels}")


@main.command("train")
@click.option("--factory", required=True, help="Model constructor, 'pkg.mod:fn'.")
@click.option("--kwargs", "kwargs_json", default="{}", show_default=True, help="JSON kwargs.")
@click.option("--seed", type=int, required=True, help="Initialisation and data-order seed.")
@click.option("--data-dir", required=True, help="Folder written by `data`.")
@click.option("--epochs", type=click.IntRange(min=1), default=8, show_default=True, help="Epochs.")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Batch."
)
@click.option(
    "--learning-rate",
    type=click.FloatRange(min=0, min_open=True),
    default=0.01,
    show_default=True,
    help="Adam step size.",
)
@click.option("--weights-out", required=True, help="Output state_dict (.pt).")
@click.option("--metrics-out", required=True, help="Output metrics (.json).")
def train_command(
    factory: str,
    kwargs_json: str,
    seed: int,
    data_dir: str,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    weights_out: str,
    metrics_out: str,
) -> None:
    """Train one demo model and write its weights and accuracy."""
    # torch only here: the data job (on the demo's critical path) does not pay its import
    from ckapipe.demo.training import train_model

    metrics = train_model(
        factory=factory,
        kwargs=json.loads(kwargs_json),
        seed=seed,
        data_dir=data_dir,
        weights_out=weights_out,
        metrics_out=metrics_out,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
    )
    click.echo(
        f"probe accuracy {metrics['probe_accuracy']:.3f} (chance {metrics['chance_accuracy']:.3f}), "
        f"{metrics['train_seconds']} s"
    )


if __name__ == "__main__":
    main()
