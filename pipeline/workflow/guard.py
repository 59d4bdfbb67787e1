"""``python -m ckapipe.workflow.guard STORE [--weights FILE]``: make a store safe to (re)extract.

The extract job (:mod:`ckapipe.workflow.jobs`) runs this check, holding the store's job lock,
just before ``ckapipe extract``. It first waits while any process holds the store's writer lock
(another study, or a ``ckapipe extract`` started by hand, writing it right now): a store being
written is never judged, let alone removed. The store's path is its content key, so a store
found there afterwards is one of:

* a complete store of the same weights — reused as it is (another study made it);
* an interrupted extraction of the same content (incomplete, same weights) — kept, so that
  ``ckapipe extract`` resumes it from its last complete row block;
* a complete or incomplete store of other weights, an incomplete store of a model without a
  weights file (whose initialisation may differ from run to run, so the rows already written
  cannot be trusted to match), or something unreadable — removed, so that it is extracted
  afresh. A stale store is never reused.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from ckapipe.formats import file_sha256
from ckapipe.store import ActivationStore

POLL_SECONDS = 0.5


class LockTimeoutError(TimeoutError):
    """Another process kept a cache entry locked for longer than this one would wait."""


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    except OSError:
        return "unknown"


def _wait_for_lock(lock: Path, what: str, timeout: float | None, *, keep: bool) -> int | None:
    """Take ``lock`` (exclusive flock), waiting while another process holds it. With ``keep`` the
    locked descriptor is returned (the caller releases it by closing it); else it is released at
    once and ``None`` returned. A lock file that does not exist is not waited for (``keep=False``)."""
    if keep:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    else:
        try:
            # read-only: only probing, and a lock file that is not there must not appear
            fd = os.open(lock, os.O_RDONLY)
        except FileNotFoundError:
            return None
    # a probe takes a shared lock: it conflicts with a writer's exclusive one, and unlike an
    # exclusive lock it needs no write access where flock is emulated with fcntl (NFS)
    mode = fcntl.LOCK_EX if keep else fcntl.LOCK_SH
    deadline = None if timeout is None else time.monotonic() + timeout
    announced = False
    try:
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            if not announced:
                print(f"waiting: {what} is locked by pid {_holder(fd)} ({lock})", file=sys.stderr)
                announced = True
            if deadline is not None and time.monotonic() > deadline:
                raise LockTimeoutError(
                    f"{what} is still locked by pid {_holder(fd)} ({lock}) after {timeout:g} s; "
                    "let that process finish (or stop it), then run again"
                )
            time.sleep(POLL_SECONDS)
    except BaseException:
        os.close(fd)
        raise
    if keep:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd
    os.close(fd)  # releases the probe at once: the lock's owner may come back for it
    return None


def sibling_lock(path: Path, suffix: str = "lock") -> Path:
    """``<parent>/.<name>.<suffix>``: a lock file beside a cache entry (outlives its removal)."""
    return path.parent / f".{path.name}.{suffix}"


def wait_for_writer(path: str | os.PathLike[str], timeout: float | None = None) -> None:
    """Return once no live process writes the cache entry ``path``.

    Checks the writer lock inside it (``<path>/.writer.lock``, held by an activation store's
    writer) and beside it (``<parent>/.<name>.lock``), whichever exist. A lock's owner that died
    holds nothing (the kernel drops a flock with its process), so this never waits for the dead.
    Raises :class:`LockTimeoutError` after ``timeout`` seconds (``None``: wait as long as it
    takes).
    """
    path = Path(path)
    for lock in (path / ".writer.lock", sibling_lock(path)):
        _wait_for_lock(lock, f"{path} (being written)", timeout, keep=False)


@contextmanager
def job_lock(path: str | os.PathLike[str], timeout: float | None = None) -> Iterator[None]:
    """Hold ``<parent>/.<name>.job.lock`` for the whole check-build-publish sequence of one cache
    entry, so that two studies' jobs for the same entry run one after the other: the second
    finds the first one's result and reuses it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _wait_for_lock(sibling_lock(path, "job.lock"), f"{path} (another job)", timeout, keep=True)
    try:
        yield
    finally:
        os.close(fd)


def store_verdict(store: Path, weights: Path | None) -> str:
    """``"absent"``, ``"reuse"``, ``"resume"`` or ``"stale"`` (see the module docstring). Call
    it only once :func:`wait_for_writer` returned: it cannot tell a store being written from an
    interrupted one."""
    if not store.exists():
        return "absent"
    try:
        opened = ActivationStore.open(store, allow_incomplete=True)
        for name in opened.layer_names:
            opened.array(name)  # every layer array was created
        attrs = opened.attrs
    except Exception:  # noqa: BLE001 - anything unreadable was killed while being created
        return "stale"
    recorded = attrs.get("weights_sha256")
    same_weights = weights is None or not recorded or recorded == file_sha256(weights)
    if attrs.get("complete"):
        return "reuse" if same_weights else "stale"
    if weights is None or not same_weights:
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
@click.option(
    "--timeout",
    type=float,
    default=None,
    help="Seconds to wait for a live writer of STORE before failing (default: no limit).",
)
def main(store: Path, weights: Path | None, timeout: float | None) -> None:
    """Remove STORE unless it is complete or an interrupted extraction of the same content."""
    guard(store, weights, timeout)


def guard(store: Path, weights: Path | None, timeout: float | None = None) -> str:
    """Wait for a live writer, then act on :func:`store_verdict`; return the verdict."""
    wait_for_writer(store, timeout)
    verdict = store_verdict(store, weights)
    if verdict == "stale":
        shutil.rmtree(store)
        click.echo(f"removed stale store {store}; extracting afresh", err=True)
    elif verdict == "resume":
        click.echo(f"found interrupted store {store}; ckapipe extract resumes it", err=True)
    elif verdict == "reuse":
        click.echo(f"found complete store {store}; reusing it", err=True)
    return verdict


if __name__ == "__main__":
    main(sys.argv[1:])
