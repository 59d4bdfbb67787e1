"""Full integrity check of anything ckapipe wrote: an activation store, a Gram cache, a result.

:func:`verify` reads every chunk of every array once and checks its CRC-32C checksum, finds
chunk files that were deleted, and checks the format's own completion flag. Opening a store,
cache or result for analysis already refuses a deleted chunk (cheap, lists files); a flipped or
truncated chunk fails its checksum on the read that touches it. This is the thorough version,
for after a copy between filesystems, a full disk or a crash.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ckapipe.formats import VerifyReport, verify_tree

__all__ = ["FORMAT_DESCRIPTIONS", "Verification", "verify"]

#: Format attribute → what to call it in messages.
FORMAT_DESCRIPTIONS = {
    "ckapipe.activation-store": "activation store",
    "ckapipe.gram-cache": "Gram cache",
    "ckapipe.cka-result": "study result",
}


@dataclass
class Verification:
    """The outcome of :func:`verify`: ``ok`` when the file is complete and every chunk intact."""

    path: Path
    kind: str
    complete: bool
    chunks: VerifyReport
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.complete and not self.problems and self.chunks.ok

    def summary(self) -> str:
        """One line for a person: what was checked and what was found."""
        checked = (
            f"{self.kind} {self.path}: {self.chunks.arrays} arrays, {self.chunks.chunks} chunks, "
            f"{self.chunks.bytes_read / 2**20:.1f} MiB read"
        )
        if self.ok:
            return f"OK {checked}; every chunk present and its checksum correct"
        found = [*self.problems, *self.chunks.problems]
        if not self.complete:
            found.insert(0, "no completion flag: its writer was interrupted or is still running")
        return f"DAMAGED {checked}; " + "; ".join(found)


def verify(path: str | os.PathLike[str]) -> Verification:
    """Check every chunk of the store, Gram cache or result at ``path``; never raises for damage.

    Returns a :class:`Verification` listing each problem with the array and chunk it concerns.
    """
    path = Path(path)
    metadata = path / "zarr.json"
    if not metadata.is_file():
        report = VerifyReport(path, problems=[f"{path} has no zarr.json: not a zarr group"])
        return Verification(path, "unknown", False, report)
    try:
        attributes = json.loads(metadata.read_text()).get("attributes", {})
    except (OSError, ValueError) as error:
        report = VerifyReport(path, problems=[f"{metadata} is unreadable: {error}"])
        return Verification(path, "unknown", False, report)
    kind = FORMAT_DESCRIPTIONS.get(attributes.get("format"), "zarr group (not made by ckapipe)")
    verification = Verification(path, kind, bool(attributes.get("complete")), verify_tree(path))
    csv = attributes.get("csv")
    if isinstance(csv, dict) and csv.get("sha256"):
        from ckapipe.analyze.result import csv_path_for

        verification.problems += _check_csv(csv_path_for(path), csv["sha256"])
    return verification


def _check_csv(csv: Path, expected: str) -> list[str]:
    """A result records the SHA-256 of its CSV: a CSV from another run must not pass as its own."""
    from ckapipe.formats import file_sha256

    if not csv.is_file():
        return [f"its CSV {csv} is missing"]
    if file_sha256(csv) != expected:
        return [f"its CSV {csv} does not match the result (written by another run, or edited)"]
    return []
