"""Run folders that are never half-written: work in ``<name>.partial``, rename when complete.

A finished run folder is ``outputs/<timestamp>_<config-name>/`` holding ``report.json``.
While a run works, everything goes to ``<final>.partial/`` (with a ``RUNNING`` marker
naming the final folder); only the last step renames it. An interrupted run therefore
never looks finished, and ``synth run --resume <final>.partial`` picks it up.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from synth.errors import UserError

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
MARKER = "RUNNING"


@dataclass
class RunDir:
    """A run folder being written.

    Attributes:
        work: the folder written to now (``<final>.partial``).
        final: where it goes when complete.
    """

    work: Path
    final: Path

    @classmethod
    def create(cls, name: str, out: str | os.PathLike | None = None, *, base: str | os.PathLike = "outputs") -> "RunDir":
        """Start a new run folder (UserError if the destination already exists)."""
        if out is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            final = Path(base) / f"{stamp}_{name}"
            i = 1
            while final.exists() or final.with_name(final.name + PARTIAL_SUFFIX).exists():
                i += 1
                final = Path(base) / f"{stamp}_{name}-{i}"
        else:
            final = Path(out)
            if final.name.endswith(PARTIAL_SUFFIX):
                raise UserError(f"--out {final}: must not end in '{PARTIAL_SUFFIX}' (reserved for unfinished runs)")
            if final.exists():
                raise UserError(f"--out {final}: already exists; synth never overwrites a run folder (choose a new path)")
            partial = final.with_name(final.name + PARTIAL_SUFFIX)
            if partial.exists():
                raise UserError(
                    f"--out {final}: an unfinished run is at {partial}; resume it with `synth run --resume {partial}` or delete it"
                )
        work = final.with_name(final.name + PARTIAL_SUFFIX)
        work.parent.mkdir(parents=True, exist_ok=True)
        work.mkdir()
        (work / MARKER).write_text(json.dumps({"final": str(final), "pid": os.getpid(), "started": time.time()}))
        return cls(work=work, final=final)

    @classmethod
    def open_partial(cls, path: str | os.PathLike) -> "RunDir":
        """Re-open an unfinished run folder for ``--resume``."""
        work = Path(path)
        if not work.is_dir():
            raise UserError(f"--resume {work}: not a folder")
        marker = work / MARKER
        if not marker.exists() or not work.name.endswith(PARTIAL_SUFFIX):
            if (work / "report.json").exists():
                raise UserError(f"--resume {work}: this run is already complete")
            raise UserError(f"--resume {work}: not an unfinished synth run folder (no {MARKER} marker)")
        try:
            final = Path(json.loads(marker.read_text())["final"])
        except Exception:
            final = work.with_name(work.name[: -len(PARTIAL_SUFFIX)])
        if final.exists():
            raise UserError(f"--resume {work}: the destination {final} already exists")
        return cls(work=work, final=final)

    def path(self, *parts: str) -> Path:
        p = self.work.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def finish(self) -> Path:
        """Rename the completed folder into place; returns the final path."""
        (self.work / MARKER).unlink(missing_ok=True)
        if self.final.exists():
            raise UserError(f"{self.final}: appeared while the run was working; the run is left at {self.work}")
        os.replace(self.work, self.final)
        return self.final

    def discard(self) -> None:
        """Remove the unfinished folder (used after a user error: nothing to resume)."""
        shutil.rmtree(self.work, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a file via a temporary sibling and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
