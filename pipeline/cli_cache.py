"""``ckapipe cache``: list, size, verify and prune the shared cache root (:mod:`ckapipe.cache`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ckapipe import cli_options as opts

__all__ = ["cache", "commands"]

_ROOT = click.argument(
    "root", required=False, type=click.Path(file_okay=False, path_type=Path), metavar="[ROOT]"
)


def _configs_option(name: str, help: str, required: bool = False):  # type: ignore[no-untyped-def]
    return click.option(
        name,
        "configs",
        multiple=True,
        required=required,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        metavar="CONFIG",
        help=help,
    )


def _workdir_option(function):  # type: ignore[no-untyped-def]
    return click.option(
        "-d",
        "--workdir",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path("."),
        show_default=True,
        help="The studies' working directory (as for `ckapipe run`): relative cache roots and "
        "config paths are resolved there, and its results/*/receipts count as uses.",
    )(function)


def _root(root: Path | None, configs: tuple[Path, ...], workdir: Path) -> Path:
    from ckapipe.cache import default_cache_root

    if root is not None:
        return root
    return default_cache_root(configs[0] if configs else None, workdir)


@click.group("cache", cls=click.Group)
def cache() -> None:
    """Inspect and prune the shared cache: stores, Gram caches, the demo's data and models.

    ROOT is the cache root (default: --config's storage.cache_root, else the demo's, resolved
    against --workdir).
    """


@cache.command("ls", cls=opts.Command)
@_ROOT
@_configs_option(
    "--config",
    help="A study config (repeatable): its cache root is the default ROOT, and each entry "
    "lists the configs that use it.",
)
@_workdir_option
@opts.json_flag("Print a JSON list of entries instead of a table.")
def ls(root: Path | None, configs: tuple[Path, ...], workdir: Path, as_json: bool) -> None:
    """One line per cache entry (activation store, Gram cache, demo dataset, demo-trained
    model): kind, key, model, dataset, size, state, last use.

    Also one line per staging folder (kind `staging`): the partial output of a writer that
    was killed (`orphaned`; `ckapipe cache gc --yes` removes it) or is still at work (`being
    written`)."""
    from ckapipe.cache import config_keys, human_size, mark_users, scan

    entries = scan(_root(root, configs, workdir), workdirs=[workdir])
    mark_users(entries, [config_keys(config, workdir=workdir) for config in configs])
    if as_json:
        click.echo(json.dumps([entry.to_json() for entry in entries], indent=2))
        return
    for entry in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(entry.last_used))
        line = (
            f"{entry.kind:5} {entry.key}  {entry.model:32} {entry.dataset:20} "
            f"{entry.layers:3} layers {human_size(entry.size):>10}  {entry.state:13} {used}"
        )
        if configs:
            line += "  used by: " + (", ".join(entry.used_by) or "-")
        click.echo(line)
    if not entries:
        click.echo("(no stores or Gram caches)")


@cache.command("du", cls=opts.Command)
@_ROOT
@_configs_option("--config", help="A study config whose cache root is the default ROOT.")
@_workdir_option
def du(root: Path | None, configs: tuple[Path, ...], workdir: Path) -> None:
    """Size on disk of the cache root: per kind and in total."""
    from ckapipe.cache import KINDS, STAGING_KIND, human_size, scan

    path = _root(root, configs, workdir)
    entries = scan(path)
    for kind in [*KINDS.values(), STAGING_KIND]:
        chosen = [entry for entry in entries if entry.kind == kind]
        size = sum(entry.size for entry in chosen)
        click.echo(f"{kind:5} {len(chosen):5} entries {human_size(size):>10}")
    total = sum(entry.size for entry in entries)
    click.echo(f"total {len(entries):5} entries {human_size(total):>10}  {path}")


@cache.command("verify", cls=opts.Command)
@_ROOT
@_configs_option("--config", help="A study config whose cache root is the default ROOT.")
@_workdir_option
def verify(root: Path | None, configs: tuple[Path, ...], workdir: Path) -> None:
    """Check every chunk of every store and Gram cache (as `ckapipe verify`); exit 1 if any is
    damaged. The demo's generated data and trained models are not checked.

    An entry being written is skipped: it is incomplete by design until its writer finishes.
    """
    from ckapipe.cache import ZARR_KINDS, scan
    from ckapipe.verify import verify as verify_path

    damaged = 0
    for entry in scan(_root(root, configs, workdir)):
        if entry.kind not in ZARR_KINDS:
            continue  # the demo's data and models have no checksums; a rerun regenerates them
        if entry.state == "being written":
            click.echo(f"SKIPPED {entry.path}: being written by a live process")
            continue
        verification = verify_path(entry.path)
        click.echo(verification.summary())
        damaged += not verification.ok
    if damaged:
        raise SystemExit(1)


@cache.command("gc", cls=opts.Command)
@_ROOT
@_configs_option(
    "--keep-config",
    required=True,
    help="A study whose entries to keep (repeatable); the first one's cache root is the "
    "default ROOT.",
)
@_workdir_option
@click.option("--yes", is_flag=True, help="Remove them (default: only print what would go).")
def gc(root: Path | None, configs: tuple[Path, ...], workdir: Path, yes: bool) -> None:
    """Remove the entries that no --keep-config study uses (a dry run without --yes).

    Entries are activation stores, Gram caches, and the demo's generated dataset and trained
    models (ROOT/demo/): a study that trains demo models or extracts the demo dataset keeps
    them. A study's own results (results/<study>/ under its working directory) are not in the
    cache and are never touched.

    Staging folders that killed writers left behind (kind `staging` in `ckapipe cache ls`)
    are removed too, whatever the kept studies.

    An entry or staging folder that a live process is writing is never removed.
    """
    from ckapipe.cache import collect_garbage, config_keys, human_size, plan_garbage

    path = _root(root, configs, workdir)
    plan = plan_garbage(path, [config_keys(config, workdir=workdir) for config in configs])
    for entry in plan.busy:
        click.echo(f"kept    {entry.kind:5} {entry.key}: being written by a live process")
    if not yes:
        for entry in plan.remove:
            click.echo(f"would remove {entry.kind:5} {entry.key} {human_size(entry.size):>10}")
        click.echo(
            f"{len(plan.remove)} entries, {human_size(plan.freed)} would be freed; "
            "run again with --yes to remove them"
        )
        return
    removed, skipped = collect_garbage(plan)
    for entry in removed:
        click.echo(f"removed {entry.kind:5} {entry.key} {human_size(entry.size):>10}")
    for entry in skipped:
        click.echo(f"kept    {entry.kind:5} {entry.key}: a writer started on it")
    freed = sum(entry.size for entry in removed)
    click.echo(f"{len(removed)} entries removed, {human_size(freed)} freed")


commands: list[click.Command] = [cache]
