"""Progress bars (tqdm on stderr), silenced by ``--quiet`` or ``SYNTH_NO_PROGRESS=1``.

Kept free of torch so that NumPy-only code (synth.validation) can show progress too.
"""

from __future__ import annotations

import os
from typing import Iterable, TypeVar

T = TypeVar("T")

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Hide progress bars (``--quiet``)."""
    global _QUIET
    _QUIET = bool(quiet)


def progress(iterable: Iterable[T] | None = None, *, desc: str = "", total: int | None = None, leave: bool = False):
    """A tqdm progress bar on stderr, silent under ``--quiet`` or with ``SYNTH_NO_PROGRESS=1`` (CI)."""
    from tqdm.auto import tqdm

    disable = _QUIET or os.environ.get("SYNTH_NO_PROGRESS") == "1"
    return tqdm(iterable, desc=desc, total=total, leave=leave, disable=disable, dynamic_ncols=True)
