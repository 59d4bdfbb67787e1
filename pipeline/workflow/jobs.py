"""``python -m ckapipe.workflow.jobs {store,build}``: the only writers of the shared cache.

Several studies (several Snakemake processes, possibly on several hosts) may share one cache
root, so no cache entry is a Snakemake output: Snakemake deletes a job's existing outputs before
running it and after it fails, which would destroy what another study is reading or writing.
Each job instead publishes its entry into the cache itself and writes a *receipt* (a small JSON
file under the study's own results folder) as its Snakemake output.

Every job holds the entry's job lock (``<parent>/.<name>.job.lock``) from its check to its
receipt, so two studies' jobs for one entry run one after the other and the second reuses the
first one's result; and it waits for any writer lock on the entry (see
:func:`ckapipe.workflow.guard.wait_for_writer`). An activation store is extracted in place (so an
interrupted extraction resumes); anything else is built in a staging folder and renamed into
place when complete, so a cache entry that exists is whole.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import click

from ckapipe.formats import sibling_lock_path
from ckapipe.store import ActivationStore
from ckapipe.workflow.guard import guard, job_lock, wait_for_writer

_TIMEOUT = click.option(
    "--timeout",
    type=float,
    default=None,
    envvar="CKAPIPE_LOCK_TIMEOUT",
    help="Seconds to wait for another job or writer of the same entry (default: no limit).",
)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old
    file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _run(command: list[str]) -> None:
    sys.stderr.flush()
    completed = subprocess.run(command, check=False)
    if completed.returncode:
        raise click.ClickException(
            f"{command[0]} {command[1] if len(command) > 1 else ''} failed (exit status "
            f"{completed.returncode}); its messages are above"
        )


def _ckapipe() -> str:
    # the installation running this job, also outside an activated environment
    beside = Path(sys.executable).with_name("ckapipe")
    return str(beside) if beside.is_file() else "ckapipe"


def _reusable(path: Path, source: Path | None) -> bool:
    """Whether a folder found at a build target is whole (a Gram cache says so itself; other
    entries only ever appear by rename, complete) and, given its ``source`` store, was made from
    that store as it is now: a store re-extracted under the same key (its weights file was edited
    in place) makes its Gram caches stale."""
    marker = path / "zarr.json"
    if not marker.is_file():
        return any(path.iterdir())
    try:
        attrs = json.loads(marker.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    if not attrs.get("complete", "format" not in attrs):
        return False
    if source is None:
        return True
    try:
        store = ActivationStore.open(source)
    except Exception:  # noqa: BLE001 - the build will report what is wrong with the store
        return False
    made_from = {key: value for key, value in attrs.get("store", {}).items() if key != "path"}
    from ckapipe.analyze.gram_cache import store_identity

    current = {key: value for key, value in store_identity(store).items() if key != "path"}
    newer = marker.stat().st_mtime_ns >= (source / "zarr.json").stat().st_mtime_ns
    return made_from == current and newer


@click.group()
def main() -> None:
    """Cache jobs of the ckapipe workflow."""


@main.command("store", context_settings={"ignore_unknown_options": True})
@click.option("--store", "store", required=True, type=click.Path(path_type=Path))
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--receipt", required=True, type=click.Path(path_type=Path))
@click.option(
    "--gram-target",
    type=click.Path(path_type=Path),
    default=None,
    help="Also make this Gram cache entry, fused with the extraction (minibatch, epoch 0).",
)
@click.option("--gram-receipt", type=click.Path(path_type=Path), default=None)
@click.option(
    "--gram-extract-args",
    default="",
    help="Shell-quoted `ckapipe extract` options of the fused Gram cache (--gram-batch-size ...).",
)
@click.option(
    "--gram-build-args",
    default="",
    help="Shell-quoted `ckapipe gram STORE` options that build the same cache from a store "
    "that is reused (complete, its Gram cache missing or stale).",
)
@_TIMEOUT
@click.argument("extract_args", nargs=-1, type=click.UNPROCESSED)
def store_job(
    store: Path,
    weights: Path | None,
    receipt: Path,
    gram_target: Path | None,
    gram_receipt: Path | None,
    gram_extract_args: str,
    gram_build_args: str,
    timeout: float | None,
    extract_args: tuple[str, ...],
) -> None:
    """Make STORE (reuse, resume or extract it), then write RECEIPT (its `ckapipe info --json`,
    plus `"reused": true` when the store was found complete).

    With --gram-target the job also makes that Gram cache entry, holding its job lock too (after
    the store's, the order every job takes them in): an extraction writes it as it goes (one
    pass, no re-read of the store); a reused store gets it from `ckapipe gram` unless a complete
    one made from the store as it is now exists. Either way it is built in a staging folder and
    renamed into place, and GRAM_RECEIPT is written.
    """
    if (gram_target is None) != (gram_receipt is None):
        raise click.UsageError("--gram-target and --gram-receipt go together")
    with (
        job_lock(store, timeout),
        job_lock(gram_target, timeout) if gram_target is not None else nullcontext(),
    ):
        state = guard(store, weights, timeout)
        reused = state == "reuse"
        if gram_target is None:
            if not reused:
                _run([_ckapipe(), "extract", *extract_args, "--out", str(store)])
        else:
            gram_reused = _fused_store_and_gram(
                store, state, gram_target, extract_args, gram_extract_args, gram_build_args,
                timeout,
            )  # fmt: skip
            record = {"path": str(gram_target), "reused": gram_reused}
            write_atomically(gram_receipt, json.dumps(record) + "\n")
        info = subprocess.run(
            [_ckapipe(), "info", str(store), "--json"], capture_output=True, text=True, check=False
        )
        sys.stderr.write(info.stderr)
        if info.returncode:
            raise click.ClickException(f"ckapipe info {store} failed; its messages are above")
        record = json.loads(info.stdout)
        record["reused"] = reused  # counted by the end-of-run summary of `ckapipe run`
        write_atomically(receipt, json.dumps(record, indent=2) + "\n")


def _fused_store_and_gram(
    store: Path,
    state: str,
    target: Path,
    extract_args: tuple[str, ...],
    gram_extract_args: str,
    gram_build_args: str,
    timeout: float | None,
) -> bool:
    """The store (as ``guard`` found it) and its Gram cache ``target``, both holding job locks;
    whether a complete Gram cache was found and reused."""
    wait_for_writer(target, timeout)
    if state == "reuse" and target.exists() and _reusable(target, store):
        click.echo(f"found complete {target}; reusing it", err=True)
        return True
    if target.exists():
        # no job and no writer holds it; the store it was made from is being (re)made, or it
        # is a leftover or stale
        shutil.rmtree(target)
        click.echo(f"removed incomplete or stale {target}", err=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    # leftovers of a killed job for this entry (its staging folder, and the one the fused
    # writer stages that in): no job or writer holds the entry, so they are nobody's
    for pattern in (f".{target.name}.building-*", f"..{target.name}.building-*"):
        for leftover in target.parent.glob(pattern):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    staging = target.parent / f".{target.name}.building-{os.getpid()}"
    try:
        if state == "reuse":
            staging.mkdir()
            _run(
                [_ckapipe(), "gram", str(store), *shlex.split(gram_build_args)]
                + ["--out", str(staging), "--overwrite"]
            )
        else:
            _run(
                [_ckapipe(), "extract", *extract_args, "--out", str(store)]
                + [*shlex.split(gram_extract_args), "--gram-out", str(staging)]
            )
        os.rename(staging, target)
        return False
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        # the lock file the Gram cache writer kept beside its output; that writer has ended
        sibling_lock_path(staging).unlink(missing_ok=True)


@main.command("build", context_settings={"ignore_unknown_options": True})
@click.option("--target", required=True, type=click.Path(path_type=Path))
@click.option("--receipt", required=True, type=click.Path(path_type=Path))
@click.option(
    "--source",
    type=click.Path(path_type=Path),
    default=None,
    help="The activation store a Gram cache TARGET is made from (to tell a stale one).",
)
@_TIMEOUT
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def build_job(
    target: Path,
    receipt: Path,
    source: Path | None,
    timeout: float | None,
    command: tuple[str, ...],
) -> None:
    """Unless TARGET exists complete: run COMMAND with `{out}` standing for a staging folder, then
    rename that folder to TARGET. Then write RECEIPT (TARGET's path, and whether it was reused)."""
    with job_lock(target, timeout):
        wait_for_writer(target, timeout)
        reused = target.exists() and _reusable(target, source)
        if reused:
            click.echo(f"found complete {target}; reusing it", err=True)
        else:
            if target.exists():
                # no job and no writer holds it: a leftover of a killed in-place build, or made
                # from an earlier state of its store
                shutil.rmtree(target)
                click.echo(f"removed incomplete or stale {target}", err=True)
            staging = target.parent / f".{target.name}.building-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            try:
                _run([part.replace("{out}", str(staging)) for part in command])
                os.rename(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        write_atomically(receipt, json.dumps({"path": str(target), "reused": reused}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
