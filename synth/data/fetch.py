"""``synth data fetch``: download a public data set, checked file by file with SHA-256.

Each file is written to ``<dest>.part`` first, verified against the manifest shipped in
the package, then renamed into place (atomic). An interrupted download resumes from the
``.part`` file with an HTTP Range request. Files already present with the right hash are
skipped. ``mirror`` reads the same layout from a local folder instead of the network.

Only the standard library (urllib) is used.

Example:
    >>> fetch_dataset("cowley2023", "data/cowley2023_v4")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.resources
import logging
import os
import shutil
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Mapping

from synth.errors import DataError, UserError
from synth.runtime import file_sha256, progress

log = logging.getLogger(__name__)

#: Commit of cowleygroup/V4_compact_models the manifest describes (abbreviated: the full
#: 40-hex id was not available when this was written; GitHub resolves short ids).
COWLEY_COMMIT = "f4552ad9d34a"


@dataclass(frozen=True)
class DatasetSpec:
    """A fetchable data set: its manifest (package resource) and default source URL."""

    manifest: str
    base_url: str
    note: str


DATASETS: dict[str, DatasetSpec] = {
    "cowley2023": DatasetSpec(
        manifest="cowley2023_manifest.txt",
        base_url=f"https://raw.githubusercontent.com/cowleygroup/V4_compact_models/{COWLEY_COMMIT}",
        note="GPL-3.0 data of Cowley, Stan, Pillow & Smith (2023); cite the paper when using them",
    ),
}

_CHUNK = 1 << 16


def parse_manifest(text: str, *, source: str = "manifest") -> dict[str, str]:
    """Parse ``sha256sum`` lines (``<hex>  <relative path>``; ``#`` comments).

    Returns:
        {relative posix path: sha256 hex}, in file order.

    Raises:
        DataError: a malformed line or an unsafe path (absolute or with ``..``).
    """
    out: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdef" for c in parts[0].lower()):
            raise DataError(f"{source}:{i}: expected '<sha256>  <path>', got {line!r}")
        rel = parts[1].strip().lstrip("*")
        if rel.startswith("./"):
            rel = rel[2:]
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts or not rel:
            raise DataError(f"{source}:{i}: unsafe path {rel!r} (expected a relative path inside the data root)")
        out[str(p)] = parts[0].lower()
    return out


def read_manifest(name: str) -> dict[str, str]:
    """The shipped manifest of a data set: {relative path: sha256}."""
    spec = _spec(name)
    res = importlib.resources.files("synth.data").joinpath(spec.manifest)
    return parse_manifest(res.read_text(encoding="utf-8"), source=spec.manifest)


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        from synth.registry import did_you_mean

        raise UserError(f"unknown data set '{name}'{did_you_mean(name, list(DATASETS))}; expected one of: {', '.join(DATASETS)}")
    return DATASETS[name]


def fetch_dataset(name: str, root: str | os.PathLike, *, base_url: str | None = None, mirror: str | os.PathLike | None = None, files: list[str] | None = None) -> list[Path]:
    """Download (or copy from a mirror) a data set into ``root`` and verify it.

    Args:
        name: data set name (``"cowley2023"``).
        root: destination folder (created if needed).
        base_url: URL prefix to fetch ``<base_url>/<relative path>`` from (default: the
            public repository at the pinned commit).
        mirror: a local folder with the same layout; files are copied from it.
        files: a subset of the manifest's relative paths (default: all).

    Returns:
        The verified files (absolute paths), in manifest order.

    Raises:
        UserError: unknown data set or file name.
        DataError: unreachable server, missing mirror file, SHA-256 mismatch (the
            downloaded file is deleted), interrupted download (the ``.part`` file is kept
            and the next call resumes it).
    """
    spec = _spec(name)
    manifest = read_manifest(name)
    if files is not None:
        unknown = [f for f in files if str(PurePosixPath(f)) not in manifest]
        if unknown:
            raise UserError(f"'{unknown[0]}' is not a file of data set '{name}' (see synth/data/{spec.manifest})")
        wanted = {str(PurePosixPath(f)) for f in files}
        manifest = {k: v for k, v in manifest.items() if k in wanted}
    paths = fetch_files(manifest, root, base_url=base_url or spec.base_url, mirror=mirror)
    log.info("%s: %d files verified in %s (%s)", name, len(paths), root, spec.note)
    return paths


def fetch_files(manifest: Mapping[str, str], root: str | os.PathLike, *, base_url: str | None = None, mirror: str | os.PathLike | None = None, timeout: float = 60.0) -> list[Path]:
    """Fetch the files of a manifest ({relative path: sha256}) into ``root``.

    Exactly one source is used: ``mirror`` if given, else ``base_url``. See
    ``fetch_dataset`` for the behaviour and errors.
    """
    if mirror is None and not base_url:
        raise UserError("nothing to fetch from: give a base URL or --mirror DIR")
    root = Path(root).absolute()
    if mirror is not None and not Path(mirror).is_dir():
        raise DataError(f"{mirror}: mirror folder not found")
    out: list[Path] = []
    present = 0
    bar = progress(total=len(manifest), desc="fetch")
    try:
        for rel, sha in manifest.items():
            dest = root / rel
            out.append(dest)
            if dest.exists():
                if file_sha256(dest) == sha:
                    log.debug("%s: present, SHA-256 ok", dest)
                    present += 1
                    bar.update(1)
                    continue
                log.warning("%s: exists with a different SHA-256; fetching it again", dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            if mirror is not None:
                _copy_verified(Path(mirror) / rel, dest, sha)
            else:
                _download_verified(_join_url(str(base_url), rel), dest, sha, timeout=timeout)
            bar.update(1)
    finally:
        bar.close()
    how = "copied" if mirror is not None else "downloaded"
    log.info("%d files %s, %d already present and verified", len(out) - present, how, present)
    return out


def _join_url(base: str, rel: str) -> str:
    return base.rstrip("/") + "/" + urllib.parse.quote(rel)


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _finish(part: Path, dest: Path, sha: str, source: str) -> None:
    got = file_sha256(part)
    if got != sha:
        part.unlink(missing_ok=True)
        raise DataError(f"{dest}: SHA-256 mismatch for {source} (expected {sha[:12]}..., got {got[:12]}...); the download was deleted")
    os.replace(part, dest)


def _copy_verified(src: Path, dest: Path, sha: str) -> None:
    if not src.is_file():
        raise DataError(f"{src}: not found in the mirror (expected the data set's layout under the mirror folder)")
    part = _part(dest)
    try:
        shutil.copyfile(src, part)
    except OSError as err:
        part.unlink(missing_ok=True)
        raise DataError(f"{src}: cannot copy to {part} ({err})") from None
    _finish(part, dest, sha, str(src))
    log.debug("copied %s", dest)


def _download_verified(url: str, dest: Path, sha: str, *, timeout: float) -> None:
    part = _part(dest)
    resumed = _download(url, part, timeout=timeout)
    if resumed and file_sha256(part) != sha:
        # A stale or foreign .part prefix: start again once from byte 0.
        log.warning("%s: resumed download does not verify; downloading it again from the start", dest)
        part.unlink(missing_ok=True)
        _download(url, part, timeout=timeout)
    _finish(part, dest, sha, url)
    log.debug("downloaded %s", dest)


def _download(url: str, part: Path, *, timeout: float) -> bool:
    """Download ``url`` into ``part``, continuing an existing ``part`` file.

    Returns:
        True if bytes already in ``part`` were kept (a resumed download).
    """
    start = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "synth-data-fetch"})
    if start:
        req.add_header("Range", f"bytes={start}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and start:
            # Nothing left to send: the .part file is (at least) complete.
            return True
        raise DataError(f"cannot fetch {url}: HTTP {err.code} {err.reason}; use --mirror DIR or download manually") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise DataError(f"cannot reach {url}: {reason}; use --mirror DIR or download manually") from None
    with resp:
        status = getattr(resp, "status", None)
        content_range = resp.headers.get("Content-Range", "") if resp.headers else ""
        resumed = bool(start) and status == 206 and content_range.startswith(f"bytes {start}-")
        if start and not resumed:
            log.info("%s: server did not resume at byte %d; downloading from the start", url, start)
        written = start if resumed else 0
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    written += len(chunk)
        except (OSError, http.client.HTTPException) as err:
            raise DataError(f"download of {url} interrupted after {written} bytes ({err}); run the command again to resume") from None
        length = resp.headers.get("Content-Length") if resp.headers else None
        expected = (int(length) + (start if resumed else 0)) if length and length.isdigit() else None
        if expected is not None and written < expected:
            raise DataError(f"download of {url} interrupted after {written} of {expected} bytes; run the command again to resume")
    return resumed


def sha256_bytes(data: bytes) -> str:
    """SHA-256 hex digest of bytes (for manifests built in tests and tools)."""
    return hashlib.sha256(data).hexdigest()
