"""Reading what ``synth validate`` is given: predictions, recordings (npz or CSV), manifests.

Formats:

- predictions ``.npz``: ``stimulus_id`` (N,) str, ``site_id`` (S,) str, ``predicted``
  (N, S) float (NaN = no prediction). A run folder's ``stimuli.npz`` and ``natural.npz``
  are in this format.
- recordings ``.npz``: see :mod:`synth.data.recordings` (``responses`` (S, N, R),
  repeats NaN-padded).
- recordings ``.csv`` (long format): a header naming at least ``stimulus_id``,
  ``site_id``, ``repeat``, ``response``, then one row per trial. ``repeat`` is a
  non-negative integer label (unique per stimulus and site; labels need not be
  contiguous); ``response`` is a finite number, or empty / ``nan`` for a missing trial.
- ``manifest.csv`` of a stimulus set: columns at least ``stimulus_id``, ``objective``,
  ``target_site`` (a ``site_id``); ``file`` (the PNG) and ``seed`` are used when present.

Everything here is NumPy-only (no torch).
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from synth.data.recordings import Recording
from synth.errors import DataError

log = logging.getLogger(__name__)

CSV_COLUMNS = ("stimulus_id", "site_id", "repeat", "response")
MANIFEST_COLUMNS = ("stimulus_id", "objective", "target_site")


@dataclass(frozen=True)
class Predictions:
    """Model predictions for N stimuli and S sites.

    Attributes:
        stimulus_id: (N,) unique strings.
        site_id: (S,) unique strings.
        predicted: (N, S) float64; NaN where there is no prediction.
    """

    stimulus_id: np.ndarray
    site_id: np.ndarray
    predicted: np.ndarray

    def __post_init__(self) -> None:
        sid = np.asarray(self.stimulus_id).astype(str).reshape(-1)
        site = np.asarray(self.site_id).astype(str).reshape(-1)
        pred = np.asarray(self.predicted, dtype=np.float64)
        if pred.ndim == 1 and site.size == 1:
            pred = pred[:, None]
        if pred.shape != (sid.size, site.size):
            raise DataError(
                f"predicted has shape {pred.shape}, expected (stimuli, sites) = ({sid.size}, {site.size})"
            )
        if len(set(sid.tolist())) != sid.size:
            raise DataError("stimulus_id values in the predictions are not unique")
        if len(set(site.tolist())) != site.size:
            raise DataError("site_id values in the predictions are not unique")
        if np.isinf(pred).any():
            raise DataError("predicted contains inf")
        object.__setattr__(self, "stimulus_id", sid)
        object.__setattr__(self, "site_id", site)
        object.__setattr__(self, "predicted", pred)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Predictions":
        """Read a predictions ``.npz``; DataError naming the file on any problem."""
        path = str(path)
        if not os.path.exists(path):
            raise DataError(f"{path}: predictions file not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in ("stimulus_id", "site_id", "predicted") if k not in z.files]
                if missing:
                    raise DataError(
                        f"missing array(s) {', '.join(missing)}; expected stimulus_id (N,), site_id (S,), predicted (N, S)"
                    )
                return cls(stimulus_id=z["stimulus_id"], site_id=z["site_id"], predicted=z["predicted"])
        except DataError as err:
            msg = str(err)
            raise DataError(msg if msg.startswith(path) else f"{path}: {msg}") from None
        except Exception as err:  # BadZipFile, ValueError (object arrays), OSError ...
            raise DataError(
                f"{path}: not a readable predictions .npz ({type(err).__name__}: {err}); save ids as str arrays"
            ) from None

    def as_dict(self) -> dict[str, np.ndarray]:
        """``stimulus_id -> (S,)`` predictions in ``site_id`` order."""
        return {s: self.predicted[i] for i, s in enumerate(self.stimulus_id)}

    @staticmethod
    def concat(parts: Sequence["Predictions"]) -> "Predictions":
        """Stack predictions for disjoint stimulus sets, joined on ``site_id``.

        The result has the sites common to all parts (in the first part's order).
        """
        if not parts:
            raise ValueError("nothing to concatenate")
        sites = [s for s in parts[0].site_id if all(s in set(p.site_id) for p in parts[1:])]
        rows = []
        for p in parts:
            pos = {s: i for i, s in enumerate(p.site_id)}
            rows.append(p.predicted[:, [pos[s] for s in sites]])
        return Predictions(
            stimulus_id=np.concatenate([p.stimulus_id for p in parts]),
            site_id=np.asarray(sites, dtype=str),
            predicted=np.concatenate(rows, axis=0) if rows else np.zeros((0, len(sites))),
        )

    def save(self, path: str | os.PathLike) -> None:
        np.savez(path, stimulus_id=self.stimulus_id, site_id=self.site_id, predicted=self.predicted)


def _bad(path: str, line: int, msg: str) -> DataError:
    return DataError(f"{path}:{line}: {msg}")


def read_recording_csv(path: str | os.PathLike) -> Recording:
    """Read a long-format recording CSV (see module docstring) into a :class:`Recording`.

    Repeats of one stimulus and site fill the repeat slots in increasing ``repeat``
    order; missing trials are simply absent (or have an empty / ``nan`` response).

    Raises:
        DataError: naming the file and line of the first bad row (missing column,
            empty id, non-integer repeat, non-numeric or infinite response, duplicate
            ``(stimulus_id, site_id, repeat)``).
    """
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: recording file not found")
    stim_pos: dict[str, int] = {}
    site_pos: dict[str, int] = {}
    s_idx: list[int] = []
    n_idx: list[int] = []
    reps: list[int] = []
    vals: list[float] = []
    lines: list[int] = []
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror})") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{path}: empty file; expected a header {','.join(CSV_COLUMNS)}") from None
        except (csv.Error, UnicodeDecodeError) as err:
            raise _bad(path, 1, f"not a CSV file ({err})") from None
        header = [h.strip() for h in header]
        missing = [c for c in CSV_COLUMNS if c not in header]
        if missing:
            raise _bad(path, 1, f"header lacks column(s) {', '.join(missing)}; expected {','.join(CSV_COLUMNS)}")
        col = {c: header.index(c) for c in CSV_COLUMNS}
        need = max(col.values()) + 1
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) < need:
                    raise _bad(path, line, f"{len(row)} fields, expected {len(header)} ({','.join(header)})")
                stim = row[col["stimulus_id"]].strip()
                site = row[col["site_id"]].strip()
                if not stim:
                    raise _bad(path, line, "empty stimulus_id")
                if not site:
                    raise _bad(path, line, "empty site_id")
                rtext = row[col["repeat"]].strip()
                try:
                    rep = int(rtext)
                except ValueError:
                    try:
                        fr = float(rtext)
                    except ValueError:
                        fr = math.nan
                    if not (math.isfinite(fr) and fr == int(fr)):
                        raise _bad(path, line, f"repeat {rtext!r} is not an integer") from None
                    rep = int(fr)
                if rep < 0:
                    raise _bad(path, line, f"repeat {rep} is negative; expected an integer >= 0")
                vtext = row[col["response"]].strip()
                if vtext == "" or vtext.lower() in ("nan", "na", "n/a"):
                    continue  # a missing trial
                try:
                    val = float(vtext)
                except ValueError:
                    raise _bad(path, line, f"response {vtext!r} is not a number") from None
                if not math.isfinite(val):
                    raise _bad(path, line, f"response {vtext!r} is not finite")
                s_idx.append(site_pos.setdefault(site, len(site_pos)))
                n_idx.append(stim_pos.setdefault(stim, len(stim_pos)))
                reps.append(rep)
                vals.append(val)
                lines.append(line)
        except csv.Error as err:
            raise _bad(path, reader.line_num, f"malformed CSV ({err})") from None
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not a UTF-8 text file ({err.reason})") from None
    if not vals:
        raise DataError(f"{path}: no responses (only a header, or every response is empty)")
    s = np.asarray(s_idx, dtype=np.int64)
    n = np.asarray(n_idx, dtype=np.int64)
    r = np.asarray(reps, dtype=np.int64)
    v = np.asarray(vals, dtype=np.float64)
    order = np.lexsort((r, n, s))
    s, n, r, v = s[order], n[order], r[order], v[order]
    same_group = np.r_[False, (s[1:] == s[:-1]) & (n[1:] == n[:-1])]
    dup = same_group & np.r_[False, r[1:] == r[:-1]]
    if dup.any():
        j = int(np.flatnonzero(dup)[0])
        l1, l2 = sorted((lines[order[j - 1]], lines[order[j]]))
        stim = list(stim_pos)[n[j]]
        site = list(site_pos)[s[j]]
        raise _bad(path, l2, f"duplicate trial: stimulus {stim!r}, site {site!r}, repeat {r[j]} already on line {l1}")
    # slot = position within its (site, stimulus) group
    starts = np.flatnonzero(~same_group)
    group_len = np.diff(np.r_[starts, s.size])
    slot = np.arange(s.size) - np.repeat(starts, group_len)
    resp = np.full((len(site_pos), len(stim_pos), int(group_len.max())), np.nan)
    resp[s, n, slot] = v
    return Recording(stimulus_id=np.asarray(list(stim_pos), dtype=str), site_id=np.asarray(list(site_pos), dtype=str), responses=resp)


def write_recording_csv(recording: Recording, path: str | os.PathLike) -> None:
    """Write a :class:`Recording` in the long CSV format (missing trials are left out)."""
    s, n, r = np.nonzero(~np.isnan(recording.responses))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for a, b, c in zip(s.tolist(), n.tolist(), r.tolist()):
            w.writerow([recording.stimulus_id[b], recording.site_id[a], c, repr(float(recording.responses[a, b, c]))])


def load_recording(path: str | os.PathLike) -> Recording:
    """Read a recording: ``.npz`` via :meth:`Recording.load`, ``.csv`` via :func:`read_recording_csv`."""
    path = str(path)
    low = path.lower()
    if low.endswith(".npz"):
        return Recording.load(path)
    if low.endswith(".csv"):
        return read_recording_csv(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: recording file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(b"PK"):
        return Recording.load(path)
    raise DataError(f"{path}: unknown recording format; expected a .npz (stimulus_id, site_id, responses) or a .csv (stimulus_id,site_id,repeat,response)")


def load_recordings(paths: Sequence[str | os.PathLike]) -> Recording:
    """One recording from one or more files, e.g. today's follow-up and the natural set's
    original recording (``synth validate --recordings A --recordings B``).

    Stimuli are taken in file order; each image's trials must come from one file. Sites are
    those in every file (the others are left out, with a warning).

    Raises:
        DataError: a stimulus id in two files, or files with no site in common (named).
    """
    paths = [str(p) for p in paths]
    if not paths:
        raise DataError("no recording file given")
    recs = [load_recording(p) for p in paths]
    common = set(recs[0].site_id)
    for p, r in zip(paths[1:], recs[1:]):
        common &= set(r.site_id)
        if not common:
            raise DataError(f"{p}: no site_id in common with {paths[0]} (e.g. {str(r.site_id[0])!r} vs {str(recs[0].site_id[0])!r})")
    order = [s for s in recs[0].site_id if s in common]
    for p, r in zip(paths, recs):
        left = [s for s in r.site_id if s not in common]
        if left:
            log.warning("%s: %d of its %d sites are not in every recording file and are left out (e.g. %r)", p, len(left), r.n_sites, str(left[0]))
    out = recs[0].select(sites=order)
    for i in range(1, len(recs)):
        shared = set(out.stimulus_id) & set(recs[i].stimulus_id)
        if shared:
            first = str(sorted(shared)[0])
            raise DataError(f"{paths[i]}: stimulus_id {first!r} is also in an earlier recording file ({len(shared)} shared); "
                            "each image's trials must come from one file")
        out = out.concat(recs[i].select(sites=order))
    return out


def normalize_objective(name: str) -> str:
    """``"one-hot"``, ``"onehot"``, ``"One_Hot"`` -> ``"one_hot"``; ``"Stretch"`` -> ``"stretch"``."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    return "one_hot" if key in ("onehot", "one_hot", "one_hot_population") else key


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """Read a stimulus set's ``manifest.csv`` into a list of row dicts (stripped strings).

    Raises:
        DataError: missing file or columns, empty ``stimulus_id``/``target_site``, or a
            duplicated ``stimulus_id`` (names file and line).
    """
    path = str(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: manifest not found")
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in MANIFEST_COLUMNS if c not in fields]
        if missing:
            raise _bad(path, 1, f"manifest lacks column(s) {', '.join(missing)}; expected at least {','.join(MANIFEST_COLUMNS)}")
        for raw in reader:
            line = reader.line_num
            row = {str(k).strip(): (v or "").strip() for k, v in raw.items() if k is not None}
            if not any(row.values()):
                continue
            for c in MANIFEST_COLUMNS:
                if not row.get(c):
                    raise _bad(path, line, f"empty {c}")
            if row["stimulus_id"] in seen:
                raise _bad(path, line, f"stimulus_id {row['stimulus_id']!r} already on line {seen[row['stimulus_id']]}")
            seen[row["stimulus_id"]] = line
            rows.append(row)
    return rows


def find_run_file(run_dir: str | os.PathLike, name: str) -> Path | None:
    """``RUN_DIR/name`` or ``RUN_DIR/stimuli/name``, whichever exists first (else None)."""
    run_dir = Path(run_dir)
    for p in (run_dir / name, run_dir / "stimuli" / name):
        if p.is_file():
            return p
    return None


def find_stimulus_png(run_dir: str | os.PathLike, row: Mapping[str, str]) -> Path | None:
    """The PNG of a manifest row: its ``file`` under ``RUN_DIR/stimuli/`` (or RUN_DIR), else
    ``<stimulus_id>.png`` there; None when absent."""
    run_dir = Path(run_dir)
    names = []
    if row.get("file"):
        names += [row["file"], os.path.basename(row["file"])]
    names.append(f"{row['stimulus_id']}.png")
    for name in names:
        for base in (run_dir / "stimuli", run_dir):
            p = base / name
            if p.is_file():
                return p
    return None


def jsonable(obj):
    """Plain-JSON copy of ``obj``: numpy scalars/arrays to Python, NaN/inf to None, tuples to lists."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [jsonable(v) for v in obj.tolist()]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, (np.str_, str)):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None:
        return None
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")
