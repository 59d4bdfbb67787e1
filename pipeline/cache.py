"""The shared cache root of ``ckapipe run``: list, size, verify and prune its entries.

A cache root holds ``stores/<key>.zarr`` (activation stores), ``grams/<key>.zarr`` (Gram
caches) and, for studies that use the demo, ``demo/data/<key>/`` (the generated dataset) and
``demo/models/<key>/`` (trained weights and metrics), keyed by content (:mod:`ckapipe.workflow.keys`), shared by every study that points its
``storage.cache_root`` there. This module is the API of ``ckapipe cache``
(:mod:`ckapipe.cli_cache`):

* :func:`scan` — one :class:`CacheEntry` per store and Gram cache (size, state, last use), and
  one per staging folder a killed writer left behind (kind ``staging``);
* :func:`config_keys` — the store and Gram keys a study config asks for, computed exactly as
  the workflow does, so that entries can be matched to the studies that use them;
* :func:`collect_garbage` — remove the entries no kept config references and orphaned staging
  folders, never one that a live process is writing.

An entry is removed only while :func:`collect_garbage` holds its workflow job lock (so no job
starts on it meanwhile) and no process holds its writer or staging lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ckapipe.errors import UsageError
from ckapipe.formats import WriterLock, sibling_lock_path

__all__ = [
    "KINDS",
    "STAGING_KIND",
    "CacheEntry",
    "ZARR_KINDS",
    "ConfigKeys",
    "GarbagePlan",
    "collect_garbage",
    "config_keys",
    "default_cache_root",
    "entry_locks",
    "entry_root",
    "human_size",
    "plan_garbage",
    "scan",
]

#: Sub-folder of the cache root → the kind of entry it holds.
KINDS = {
    "stores": "store",
    "grams": "gram",
    "demo/data": "demo-data",
    "demo/models": "demo-model",
}
#: The kind of a staging folder (``.<name>.staging``, ``.<name>.replaced`` of
#: :func:`ckapipe.formats.staged_directory`; ``.<name>.building-<pid>`` of a workflow job): what
#: a writer killed mid-build (SIGKILL, a node lost) leaves beside its output; removable once no
#: live process holds the output's locks.
STAGING_KIND = "staging"
_STAGING_SUFFIX = re.compile(r"^\.(?P<target>.+)\.(?:staging|replaced|building-\d+)$")
#: The kinds that are zarr groups (``<key>.zarr``); the demo's entries are plain folders.
ZARR_KINDS = ("store", "gram")
#: Kind → the folder of its receipts under ``results/<study>/receipts/``.
_RECEIPTS = {
    "store": "stores",
    "gram": "grams",
    "demo-data": "demo-data",
    "demo-model": "demo-models",
}


@dataclass
class CacheEntry:
    """One store or Gram cache under a cache root."""

    kind: str
    key: str
    path: Path
    model: str
    dataset: str
    layers: int
    size: int
    state: str
    """``complete``, ``incomplete`` or ``being written`` (a live process holds one of its locks);
    a staging folder is ``being written`` or ``orphaned`` (its writer is gone)."""
    last_used: float
    """Seconds since the epoch: the newest of its zarr.json and its receipts' modification times."""
    used_by: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["path"] = str(self.path)
        record["last_used"] = datetime.fromtimestamp(self.last_used, UTC).isoformat()
        return record


def entry_locks(path: Path) -> list[Path]:
    """Every lock whose holder may be writing the entry at ``path``: the store's writer lock, the
    staging lock beside it, and the workflow job's lock beside it."""
    return [
        path / ".writer.lock",
        sibling_lock_path(path),
        path.parent / f".{path.name}.job.lock",
    ]


def _locked(path: Path) -> bool:
    return any(WriterLock.is_held(lock) for lock in entry_locks(path))


def staging_target(path: Path) -> Path | None:
    """The output a staging folder is built for (``.x.zarr.staging`` → ``x.zarr`` beside it),
    or None when ``path`` is not named as a staging folder."""
    match = _STAGING_SUFFIX.match(path.name)
    return path.parent / match["target"] if match else None


def _staging_entries(root: Path) -> list[CacheEntry]:
    """The staging folders in the cache root's entry folders, sorted by name. One whose output's
    writer or job lock is held is ``being written``; any other is ``orphaned``."""
    entries = []
    for folder in KINDS:
        for path in sorted((root / folder).glob(".*")):
            target = staging_target(path)
            if target is None or not path.is_dir():
                continue
            with contextlib.suppress(OSError):  # a writer finishing now renames it away
                entries.append(
                    CacheEntry(
                        kind=STAGING_KIND,
                        key=path.name,
                        path=path,
                        model="-",
                        dataset=f"for {folder}/{target.name}",
                        layers=0,
                        size=_tree_size(path),
                        state="being written" if _locked(target) else "orphaned",
                        last_used=path.stat().st_mtime,
                    )
                )
    return entries


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed by a writer while we walk
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


def _short_spec(record: Any) -> str:
    """A model or dataset record as a few words: factory and kwargs, or the array file."""
    if not isinstance(record, dict):
        return "-" if record is None else str(record)
    if record.get("factory"):
        kwargs = record.get("kwargs") or {}
        args = ",".join(f"{name}={value}" for name, value in sorted(kwargs.items()))
        return f"{record['factory']}({args})"
    if record.get("array"):
        return Path(str(record["array"])).name
    return json.dumps(record, sort_keys=True, default=str)[:60]


def _attributes(path: Path) -> dict[str, Any]:
    try:
        attributes = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return {}  # a damaged or half-written entry: listed as incomplete, verify says why
    return attributes if isinstance(attributes, dict) else {}


def _receipt_times(workdirs: Iterable[Path], kind: str) -> dict[str, float]:
    """Key → newest receipt modification time under ``results/*/receipts/<kind's folder>/``."""
    times: dict[str, float] = {}
    for workdir in workdirs:
        for receipt in workdir.glob(f"results/*/receipts/{_RECEIPTS[kind]}/*.json"):
            with contextlib.suppress(OSError):
                mtime = receipt.stat().st_mtime
                times[receipt.stem] = max(mtime, times.get(receipt.stem, 0.0))
    return times


def _demo_entry(path: Path, kind: str) -> tuple[str, str]:
    """(model, dataset) columns of a demo entry: a trained model's factory and seed."""
    if kind == "demo-data":
        return "-", "demo data (generated)"
    try:
        metrics = json.loads((path / "metrics.json").read_text())
        return f"{metrics['factory']} seed {metrics['seed']}", "demo data (trained on)"
    except (OSError, ValueError, KeyError, TypeError):
        return "-", "demo data (trained on)"


def scan(root: str | os.PathLike[str], *, workdirs: Sequence[Path] = ()) -> list[CacheEntry]:
    """Every entry under the cache ``root``: stores, Gram caches, then the demo's generated data
    and trained models, each kind sorted by key, then the staging folders (see
    :data:`STAGING_KIND`).

    ``workdirs``: study working directories whose receipts count as a use of an entry.
    """
    root = Path(root)
    if not root.is_dir():
        raise UsageError(
            f"cache root {root} does not exist; pass the folder of the config's "
            "storage.cache_root (or --config CONFIG), relative to the study's working directory"
        )
    entries = []
    for folder, kind in KINDS.items():
        receipts = _receipt_times(workdirs, kind)
        if kind not in ZARR_KINDS:
            entries.extend(_demo_entries(root / folder, kind, receipts))
            continue
        for path in sorted((root / folder).glob("*.zarr")):
            if not path.is_dir():
                continue
            attributes = _attributes(path)
            if kind == "gram":
                source = attributes.get("store") or {}
                model, dataset = source.get("model"), source.get("dataset")
            else:
                model, dataset = attributes.get("model"), attributes.get("dataset")
            layers = attributes.get("layers") or []
            try:
                last_used = (path / "zarr.json").stat().st_mtime
            except OSError:
                last_used = path.stat().st_mtime
            state = (
                "being written"
                if _locked(path)
                else "complete"
                if attributes.get("complete")
                else "incomplete"
            )
            entries.append(
                CacheEntry(
                    kind=kind,
                    key=path.name.removesuffix(".zarr"),
                    path=path,
                    model=_short_spec(model),
                    dataset=_short_spec(dataset),
                    layers=len(layers),
                    size=_tree_size(path),
                    state=state,
                    last_used=max(last_used, receipts.get(path.stem, 0.0)),
                )
            )
    return entries + _staging_entries(root)


def _demo_entries(folder: Path, kind: str, receipts: dict[str, float]) -> list[CacheEntry]:
    # a demo entry appears only by rename from its staging folder (ckapipe.workflow.jobs build),
    # so one that exists is complete; staging folders and lock files start with a dot
    entries = []
    for path in sorted(folder.glob("[!.]*")):
        if not path.is_dir():
            continue
        model, dataset = _demo_entry(path, kind)
        entries.append(
            CacheEntry(
                kind=kind,
                key=path.name,
                path=path,
                model=model,
                dataset=dataset,
                layers=0,
                size=_tree_size(path),
                state="being written" if _locked(path) else "complete",
                last_used=max(path.stat().st_mtime, receipts.get(path.name, 0.0)),
            )
        )
    return entries


def human_size(size: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- configs → keys


@dataclass
class ConfigKeys:
    """The cache entries one study config asks for."""

    config: Path
    cache_root: Path
    """Resolved against the working directory the keys were computed in."""
    stores: set[str]
    grams: set[str]
    demo_data: set[str] = field(default_factory=set)
    """The demo dataset it uses (to extract or to train on), if any."""
    demo_models: set[str] = field(default_factory=set)
    """The training keys of its demo-trained models."""

    def uses(self, entry: CacheEntry) -> bool:
        """Whether ``entry`` (of this config's cache root) is one this study asks for."""
        keys = {
            "store": self.stores,
            "gram": self.grams,
            "demo-data": self.demo_data,
            "demo-model": self.demo_models,
        }
        return entry.key in keys.get(entry.kind, set())


@contextlib.contextmanager
def _working_directory(path: Path) -> Iterator[None]:
    # the workflow resolves every relative path of a config (weights, arrays, files, the cache
    # root) and finds user modules against its --directory; computing its keys must do the same
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def load_config(path: str | os.PathLike[str] | None) -> dict[str, Any]:
    """A study config as the workflow sees it: the demo when ``None``, checked, defaults filled."""
    import yaml

    from ckapipe.run import DEFAULT_CONFIG
    from ckapipe.workflow.config_check import check_config

    path = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(
            f"cannot read study config {path}: {error}; pass an existing YAML file"
        ) from None
    if not isinstance(config, dict):
        raise UsageError(f"study config {path} must be a YAML mapping of keys, got {config!r}")
    check_config(config)
    from snakemake.utils import validate

    # the workflow's schema fills in the defaults the keys depend on (dtype, order, ...)
    validate(config, schema=str(DEFAULT_CONFIG.parent / "schemas" / "config.schema.yaml"))
    return config


def default_cache_root(
    config: str | os.PathLike[str] | None = None, workdir: Path = Path(".")
) -> Path:
    """The config's (default: the demo's) ``storage.cache_root``, resolved against ``workdir``."""
    return (workdir / load_config(config)["storage"]["cache_root"]).resolve()


def config_keys(
    config: str | os.PathLike[str] | None, *, workdir: str | os.PathLike[str] = "."
) -> ConfigKeys:
    """The store and Gram cache keys the study ``config`` uses when run in ``workdir``.

    The workflow's own computation (:func:`ckapipe.workflow.keys.study_keys`, which
    ``workflow/rules/common.smk`` calls too), run in ``workdir`` as Snakemake runs it.
    """
    from ckapipe.run import DEFAULT_CONFIG
    from ckapipe.workflow.keys import CodeSourceError, FileHasher, study_keys

    config_path = Path(config).resolve() if config is not None else DEFAULT_CONFIG
    workdir = Path(workdir).resolve()
    plan = load_config(config_path)
    with _working_directory(workdir):
        cache = plan["storage"]["cache_root"].rstrip("/")
        hasher = FileHasher(f"{cache}/sha256-index.json") if Path(cache).is_dir() else FileHasher()
        try:
            keys = study_keys(plan, hasher, cache)
        except (CodeSourceError, FileNotFoundError) as error:
            raise UsageError(f"study config {config_path}: {error}") from None
        hasher.save()
    trained = {model.train_key for model in keys.models.values() if model.train_key}
    uses_demo_data = bool(trained) or any("demo" in d for d in plan["datasets"].values())
    return ConfigKeys(
        config_path,
        (workdir / cache).resolve(),
        set(keys.stores.values()),
        set(keys.grams.values()),
        {keys.demo_data} if uses_demo_data else set(),
        trained,
    )


def mark_users(entries: Sequence[CacheEntry], configs: Sequence[ConfigKeys]) -> None:
    """Fill each entry's ``used_by`` with the configs (of the same cache root) that ask for it.
    No config asks for a staging folder."""
    for entry in entries:
        if entry.kind == STAGING_KIND:
            continue
        root = entry_root(entry)
        for keys in configs:
            if keys.cache_root == root and keys.uses(entry):
                entry.used_by.append(str(keys.config))


def entry_root(entry: CacheEntry) -> Path:
    """The cache root an entry lies in (``stores/<key>.zarr``, ``demo/models/<key>``, …; not
    for a staging folder)."""
    folder = next(folder for folder, kind in KINDS.items() if kind == entry.kind)
    return entry.path.resolve().parents[len(Path(folder).parts)]


# --------------------------------------------------------------------------- garbage collection


@dataclass
class GarbagePlan:
    """What :func:`collect_garbage` removes (``remove``) and what it must leave (``busy``)."""

    remove: list[CacheEntry]
    busy: list[CacheEntry]

    @property
    def freed(self) -> int:
        return sum(entry.size for entry in self.remove)


def plan_garbage(root: str | os.PathLike[str], keep: Sequence[ConfigKeys]) -> GarbagePlan:
    """The entries under ``root`` that no config of ``keep`` references, split into removable
    ones and ones a live process is writing (never removed)."""
    if not keep:
        raise UsageError(
            "name the studies whose cache entries to keep with --keep-config CONFIG (one or "
            "more); without any, every entry would be removed"
        )
    entries = scan(root)
    mark_users(entries, keep)
    unused = [entry for entry in entries if not entry.used_by]
    return GarbagePlan(
        remove=[entry for entry in unused if entry.state != "being written"],
        busy=[entry for entry in unused if entry.state == "being written"],
    )


def collect_garbage(plan: GarbagePlan) -> tuple[list[CacheEntry], list[CacheEntry]]:
    """Remove the entries of ``plan``; return (removed, skipped because a writer appeared)."""
    from ckapipe.errors import WriterLockedError

    removed, skipped = [], []
    for entry in plan.remove:
        if entry.kind == STAGING_KIND:
            (removed if _remove_staging(entry) else skipped).append(entry)
            continue
        writer, staging, job = entry_locks(entry.path)
        # holding the job lock keeps a workflow job from starting on the entry while it goes;
        # the writer and staging locks are probed again now, a writer may have started since
        try:
            lock = WriterLock(job, what=f"cache entry {entry.path}").acquire()
        except WriterLockedError:
            skipped.append(entry)
            continue
        try:
            if WriterLock.is_held(writer) or WriterLock.is_held(staging):
                skipped.append(entry)
                continue
            shutil.rmtree(entry.path)
            with contextlib.suppress(FileNotFoundError):
                staging.unlink()
            removed.append(entry)
        finally:
            lock.release()
    return removed, skipped


def _remove_staging(entry: CacheEntry) -> bool:
    """Remove an orphaned staging folder while holding its output's job lock and writer lock, so
    that no job or writer starts on that output meanwhile (one that tries is refused at once,
    naming this process). False when a live process holds either: its folder is left alone."""
    from ckapipe.errors import WriterLockedError

    target = staging_target(entry.path)
    if target is None:
        return False
    _writer, staging_lock, job = entry_locks(target)
    with contextlib.ExitStack() as held:
        try:
            for lock in (job, staging_lock):
                held.enter_context(WriterLock(lock, what=f"staging folder {entry.path}"))
        except WriterLockedError:
            return False
        if WriterLock.is_held(target / ".writer.lock"):
            return False  # a resumable writer working on the output itself
        shutil.rmtree(entry.path, ignore_errors=True)
    return not entry.path.exists()
