"""EchoNet-Dynamic folders (Ouyang et al., Nature 2020): ``FileList.csv``, ``Videos/*.avi``, ``VolumeTracings.csv``.

``FileList.csv`` columns: FileName (usually without extension), EF (%), ESV, EDV (mL), FrameHeight, FrameWidth, FPS,
NumberOfFrames, Split (TRAIN / VAL / TEST). ``VolumeTracings.csv`` (optional) holds, per video and traced frame, the
LV long axis (first row) and the chords across the cavity (following rows) as X1, Y1, X2, Y2 pixel coordinates.
The end-diastolic frame is the traced frame with the larger cavity area, the end-systolic one the smaller.
"""
from __future__ import annotations

import csv
import functools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..echo import ClinicalInfo, Echo, EchoLoadError, LoadLimits
from ._common import display_name
from .video import read_video

__all__ = ["EchoNetRecord", "read_echonet", "echonet_record_for", "read_echonet_video", "is_echonet_root"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EchoNetRecord:
    """One row of an EchoNet-Dynamic ``FileList.csv``; the video itself is read by :meth:`load`.

    ``ef`` in %, ``esv`` / ``edv`` in mL, ``fps`` in frames per second, ``split`` lower-case ("train", "val",
    "test"), ``ed_index`` / ``es_index`` from VolumeTracings.csv (None when it is absent or lists no tracing).
    """

    file_name: str
    path: Path
    ef: float | None
    esv: float | None
    edv: float | None
    fps: float | None
    n_frames: int | None
    split: str | None
    ed_index: int | None
    es_index: int | None

    def load(self, limits: LoadLimits | None = None) -> Echo:
        """Read the video: an :class:`Echo` with ``source_format="echonet"`` and EF / ED / ES in its ``info``."""
        echo = read_video(self.path, limits)
        return echo.replace(
            fps=echo.fps or self.fps,
            source_format="echonet",
            info=ClinicalInfo(view="4CH", ef=self.ef, ed_index=self.ed_index, es_index=self.es_index),
        )


def is_echonet_root(root: str | Path) -> bool:
    root = Path(root)
    return (root / "FileList.csv").is_file() and (root / "Videos").is_dir()


def _float(value: str | None) -> float | None:
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _polygon_area(x: np.ndarray, y: np.ndarray) -> float:
    """Shoelace area of a closed polygon with vertices (x[i], y[i])."""
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _ed_es_from_tracings(path: Path) -> dict[str, tuple[int, int]]:
    """Video stem -> (ED frame, ES frame) from VolumeTracings.csv, for videos with at least two traced frames."""
    chords: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                key = (Path(row["FileName"]).stem, int(float(row["Frame"])))
                chords.setdefault(key, []).append(
                    (float(row["X1"]), float(row["Y1"]), float(row["X2"]), float(row["Y2"]))
                )
            except (KeyError, TypeError, ValueError):
                continue
    areas: dict[str, list[tuple[float, int]]] = {}
    for (stem, frame), rows in chords.items():
        a = np.asarray(rows[1:], dtype=np.float64)  # row 0 is the long axis, the others the chords
        if len(a) < 2:
            continue
        x = np.concatenate([a[:, 0], a[::-1, 2]])
        y = np.concatenate([a[:, 1], a[::-1, 3]])
        areas.setdefault(stem, []).append((_polygon_area(x, y), frame))
    out = {}
    for stem, traced in areas.items():
        if len(traced) >= 2:
            traced.sort()
            out[stem] = (traced[-1][1], traced[0][1])
    return out


@functools.lru_cache(maxsize=4)
def _tables(root: str, stamp: tuple[float, float]) -> tuple[list[dict[str, str]], dict[str, tuple[int, int]]]:
    """FileList rows and the ED / ES table of an EchoNet root (cached per root and file modification times)."""
    root_path = Path(root)
    with open(root_path / "FileList.csv", newline="", encoding="utf-8") as fh:
        rows = [row for row in csv.DictReader(fh) if row.get("FileName")]
    tracings = root_path / "VolumeTracings.csv"
    return rows, (_ed_es_from_tracings(tracings) if tracings.is_file() else {})


def _load_tables(root: Path) -> tuple[list[dict[str, str]], dict[str, tuple[int, int]]]:
    tracings = root / "VolumeTracings.csv"
    stamp = ((root / "FileList.csv").stat().st_mtime, tracings.stat().st_mtime if tracings.is_file() else 0.0)
    return _tables(str(root.resolve()), stamp)


def _video_path(root: Path, file_name: str) -> Path:
    candidate = root / "Videos" / file_name
    return candidate if candidate.suffix else candidate.with_suffix(".avi")


def _record(root: Path, row: dict[str, str], ed_es: dict[str, tuple[int, int]]) -> EchoNetRecord:
    name = row["FileName"].strip()
    ed, es = ed_es.get(Path(name).stem, (None, None))
    n = _float(row.get("NumberOfFrames"))
    split = (row.get("Split") or "").strip().lower() or None
    return EchoNetRecord(
        file_name=name,
        path=_video_path(root, name),
        ef=_float(row.get("EF")),
        esv=_float(row.get("ESV")),
        edv=_float(row.get("EDV")),
        fps=_float(row.get("FPS")),
        n_frames=int(n) if n is not None else None,
        split=split,
        ed_index=ed,
        es_index=es,
    )


def read_echonet(root: str | Path, split: str | None = None) -> Iterator[EchoNetRecord]:
    """Iterate over the videos of an EchoNet-Dynamic folder (lazily: call ``record.load()`` to read one).

    Args:
        root: folder with ``FileList.csv`` and ``Videos/`` (``VolumeTracings.csv`` optional).
        split: keep only rows of this split ("train", "val", "test"; case-insensitive); default all.

    Rows whose video file is missing are skipped (with one warning giving their number). Raises
    :class:`EchoLoadError` at once when ``root`` is not an EchoNet-Dynamic folder.
    """
    root = Path(root)
    if not is_echonet_root(root):
        raise EchoLoadError(
            f"{display_name(root)} is not an EchoNet-Dynamic folder; it needs FileList.csv and a Videos/ folder."
        )
    rows, ed_es = _load_tables(root)
    wanted = split.lower() if split is not None else None
    return _iter_records(root, rows, ed_es, wanted)


def _iter_records(
    root: Path, rows: list[dict[str, str]], ed_es: dict[str, tuple[int, int]], split: str | None
) -> Iterator[EchoNetRecord]:
    missing = 0
    for row in rows:
        record = _record(root, row, ed_es)
        if split is not None and record.split != split:
            continue
        if not record.path.is_file():
            missing += 1
            continue
        yield record
    if missing:
        log.warning("%d EchoNet videos listed in FileList.csv are missing from %s/Videos", missing, root)


def echonet_record_for(video: str | Path) -> EchoNetRecord | None:
    """The FileList.csv record of a video inside an EchoNet-Dynamic ``Videos/`` folder, or None."""
    video = Path(video)
    root = video.parent.parent
    if video.parent.name != "Videos" or not is_echonet_root(root):
        return None
    rows, ed_es = _load_tables(root)
    for row in rows:
        name = row["FileName"].strip()
        listed_bare = not Path(name).suffix  # FileList names usually omit ".avi"
        if name == video.name or (listed_bare and name == video.stem and video.suffix.lower() in ("", ".avi")):
            return _record(root, row, ed_es)
    return None


def read_echonet_video(path: str | Path, limits: LoadLimits | None = None) -> Echo:
    """Read a video of an EchoNet-Dynamic folder with its FileList metadata (EF, ED / ES frames)."""
    record = echonet_record_for(path)
    if record is None:
        raise EchoLoadError(
            f"{display_name(path)} is not a video listed in an EchoNet-Dynamic FileList.csv "
            "(expected <root>/Videos/<FileName>.avi next to <root>/FileList.csv)."
        )
    return record.load(limits)
