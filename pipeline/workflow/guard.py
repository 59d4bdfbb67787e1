"""``python -m ckapipe.workflow.guard STORE [--weights FILE]``: make a store safe to (re)extract.

The extract rule runs this just before ``ckapipe extract``. Snakemake only runs that rule when the
store's sentinel (``STORE.json`` beside the store) is missing or out of date, so a store found
here is one of:

* an interrupted extraction of the same content (incomplete, same weights) — kept, so that
  ``ckapipe extract`` resumes it from its last complete row block;
* a store whose sentinel was invalidated (complete, e.g. its weights file changed in place), an
  incomplete store of other weights, or an incomplete store of a model without a weights file
  (whose initialisation may differ from run to run, so the rows already written cannot be
  trusted to match) — removed, so that it is extracted afresh. A stale store is never reused.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import click

from ckapipe.store import ActivationStore


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def store_verdict(store: Path, weights: Path | None) -> str:
    """``"absent"``, ``"resume"`` or ``"stale"`` (see the module docstring)."""
    if not store.exists():
        return "absent"
    try:
        opened = ActivationStore.open(store, allow_incomplete=True)
        for name in opened.layer_names:
            opened.array(name)  # every layer array was created
        attrs = opened.attrs
    except Exception:  # noqa: BLE001 - anything unreadable was killed while being created
        return "stale"
    if attrs.get("complete") or weights is None:
        return "stale"
    recorded = attrs.get("weights_sha256")
    if recorded and recorded != _sha256(weights):
        return "stale"
    return "resume"


@click.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option(
    "--weights",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The model's weights file, to detect a store made from other weights.",
)
def main(store: Path, weights: Path | None) -> None:
    """Remove STORE unless it is an interrupted extraction of the same content."""
    verdict = store_verdict(store, weights)
    if verdict == "stale":
        shutil.rmtree(store)
        click.echo(f"removed stale store {store}; extracting afresh", err=True)
    elif verdict == "resume":
        click.echo(f"found interrupted store {store}; ckapipe extract resumes it", err=True)


if __name__ == "__main__":
    main(sys.argv[1:])
