"""The beats a realism study is cut from, each with a sentence saying where it comes from (stored with the study
and shown in the results, since not every case is an acquired cine).

Sources:

* acquired cines: echo files and folders (a folder gives its files, not its sub-folders), :data:`COLOR3D`
  (pydicom-data's 120-frame, 30 fps cine, :func:`echolvfm_core.io.sample_cine_path`) and :data:`SAMPLE` (pydicom's
  30-frame cut of it, :func:`echolvfm_core.io.sample_echo_path`). Each cine is cut into its whole beats
  (:func:`echolvfm_core.beats.find_beats` on the segmenter's LV area curve, image periodicity as fallback); a cine
  without a whole beat gives its loop, started at its largest LV area, as one beat. The sample is a downsampled copy
  of the first 30 frames of :data:`COLOR3D`, so with both in the pool the sample is left out (the same frames
  must never be shown in both arms);
* CAMUS: real ED and ES anatomy with motion synthesised by registration (:mod:`echolvfm_core.data.loops`), one loop
  per patient at the real ED -> ES motion (alpha 1), labelled as such in every case's provenance.
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..echo import Echo, EchoLoadError

__all__ = ["SAMPLE", "COLOR3D", "ACQUIRED", "CAMUS_KIND", "PoolBeat", "BeatPool", "beats_of", "acquired_pool",
           "camus_pool", "combine_pools", "default_pool_specs"]

logger = logging.getLogger(__name__)

#: Pool entries naming the built-in cines.
SAMPLE, COLOR3D = "sample", "color3d"
#: Kinds of beats (each case's provenance says which).
ACQUIRED, CAMUS_KIND = "acquired cine", "CAMUS loop with synthesised motion, not an acquired cine"
#: Display copies are kept at most this many pixels a side (the quiz shows them smaller).
MAX_SIDE = 512


@dataclass(frozen=True)
class PoolBeat:
    """One beat of a pool, ready to be shown (real) or rendered (synthetic).

    Attributes:
        frames: float32 (N, S, S) in [0, 1], end-diastole first, at the cine's resolution (at most :data:`MAX_SIDE`)
            and frame rate, 0 outside the fan.
        mask: (S, S) bool fan. fps: frame rate.
        ef: the segmenter's EF of the beat in %; es: its end-systolic frame (None when the beat is a whole loop
            rotated to end-diastole, whose area minimum is no beat's end-systole).
        source: where it comes from, e.g. "color3d_jpeg_baseline.dcm beat 2 (frames 50-75)".
        kind: :data:`ACQUIRED` or :data:`CAMUS_KIND`.
    """

    frames: np.ndarray
    mask: np.ndarray
    fps: float
    ef: float
    es: int | None
    source: str
    kind: str = ACQUIRED


@dataclass(frozen=True)
class BeatPool:
    """Beats and where they come from; ``skipped`` lists what could not be used, each with its reason."""

    beats: tuple[PoolBeat, ...]
    source: str
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.beats)


def default_pool_specs() -> list[str]:
    """The built-in acquired cines: :data:`COLOR3D` when pydicom-data is installed, else :data:`SAMPLE`."""
    from ..io import sample_cine_path

    return [COLOR3D] if sample_cine_path() is not None else [SAMPLE]


def beats_of(echo: Echo, name: str, seg, kind: str = ACQUIRED) -> tuple[list[PoolBeat], list[str]]:
    """The whole beats of one loop (see the module docstring) and the reasons for any beat left out.

    ``seg`` measures model-grid frames (:class:`~echolvfm_core.estimators.segmentation.SegmentationEF`: ``.size``,
    ``.measure(frames)`` with ``lv_area``, ``ef``, ``es_index``)."""
    from ..beats import find_beats
    from ..preprocess import find_sector, preprocess, square_window

    echo.require_loop("A realism-quiz case")
    if not echo.fps:
        raise EchoLoadError(f"{name} has no frame rate, so it cannot be shown as a loop.")
    sector = find_sector(echo.frames)
    side = square_window(sector, echo.frames.shape[1:]).side
    pre = preprocess(echo, size=seg.size, sector=sector, display_size=None if side <= MAX_SIDE else MAX_SIDE)
    display, grid = pre.display.frames, pre.echo.frames
    mask = display.max(0) > 0
    try:
        area = seg.measure(grid).lv_area
    except ValueError as exc:
        logger.info("%s: beats from image periodicity: %s", name, exc)
        area = None
    found = find_beats(grid, echo.fps, area, pre.mask)
    beats, skipped = [], []
    for i, b in enumerate(found.beats):
        whole = found.method != "whole_loop"
        if whole:
            d, g, where = (display[b.start : b.stop], grid[b.start : b.stop],
                           f"beat {i + 1} (frames {b.start}-{b.stop - 1})")
        else:
            d, g = np.roll(display, -b.ed, axis=0), np.roll(grid, -b.ed, axis=0)
            where = f"whole loop of {b.n_frames} frames from frame {b.ed} (no complete beat found)"
        try:
            m = seg.measure(g)
            ef, es = float(m.ef), int(m.es_index)
        except ValueError as exc:
            skipped.append(f"{name} {where}: {exc}")
            continue
        beats.append(PoolBeat(frames=d, mask=mask, fps=float(echo.fps), ef=ef,
                              es=es if whole and 0 < es < len(d) else None, source=f"{name} {where}", kind=kind))
    return beats, skipped


def acquired_pool(specs: Sequence[str | os.PathLike], seg, label: str | None = None) -> BeatPool:
    """The beats of acquired cines: files, folders (their visible files, sorted, not recursive), :data:`COLOR3D`
    and :data:`SAMPLE`. Files that cannot be shown (unreadable, a still, no frame rate, no fan) are left out, each
    with its reason in ``skipped``; ``label`` describes the cines (e.g. "acquired A4C cines, site X").

    Raises:
        EchoLoadError: a spec that is neither a file, a folder, :data:`COLOR3D` nor :data:`SAMPLE`, or
            :data:`COLOR3D` without pydicom-data.
    """
    from ..io import load_echo, sample_cine_path, sample_echo_path

    specs = [str(s) for s in specs]
    files: list[tuple[Path, str]] = []
    parts: list[str] = []
    skipped: list[str] = []
    for spec in specs:
        if spec == COLOR3D:
            path = sample_cine_path()
            if path is None:
                raise EchoLoadError("The pool entry 'color3d' needs the pydicom-data package, which is not installed.")
            files.append((path, "pydicom-data color3d cine"))
            parts.append("pydicom-data's 120-frame apical 4CH cine")
        elif spec == SAMPLE:
            if COLOR3D in specs:
                skipped.append("the pydicom sample: it is the first 30 frames of the color3d cine, also in the pool")
                continue
            files.append((sample_echo_path(), "pydicom sample cine"))
            parts.append("the pydicom sample cine (apical 4CH)")
        elif Path(spec).is_dir():
            found = sorted(p for p in Path(spec).iterdir() if p.is_file() and not p.name.startswith("."))
            files += [(p, p.name) for p in found]
            parts.append(f"{len(found)} cine file{'s' if len(found) != 1 else ''} from {spec}")
        elif Path(spec).is_file():
            files.append((Path(spec), Path(spec).name))
            parts.append(f"cine file {Path(spec).name}")
        else:
            raise EchoLoadError(f"The pool entry {spec} is neither a file, a folder, '{COLOR3D}' nor '{SAMPLE}'.")
    beats: list[PoolBeat] = []
    for path, name in files:
        try:
            found, left = beats_of(load_echo(path), name, seg)
        except EchoLoadError as exc:
            skipped.append(str(exc))
            continue
        beats += found
        skipped += left
    what = label if label else " + ".join(parts)
    source = f"{what}: {len(files)} cine{'s' if len(files) != 1 else ''} cut into {len(beats)} whole " \
             f"beat{'s' if len(beats) != 1 else ''}"
    if skipped:
        source += f" ({len(skipped)} left out)"
    return BeatPool(beats=tuple(beats), source=source, skipped=tuple(skipped))


def camus_pool(data: str | os.PathLike, n: int, seg, split: str | None = "valid", seed: int = 0) -> BeatPool:
    """``n`` CAMUS loops of real anatomy with synthesised motion, one per patient at the real ED -> ES motion.

    Args:
        data: a CAMUS folder (its first ``n`` patients of ``split`` in patient order; their loops are built with
            :func:`echolvfm_core.data.prepare`, a few seconds per patient) or an ``echolvfm prepare`` folder
            (``n`` of its CAMUS patients of ``split``, drawn with ``seed``).
        n: number of loops.
        seg: the segmenter (beats and EF, as :func:`beats_of`).
        split: "train", "valid", ... or None for any split; "valid" keeps the generator's training patients out.
        seed: seed of the draw from a prepared folder and of the loops' cycle timing.

    A CAMUS patient whose files cannot be read or prepared is left out, with its reason in ``skipped`` (the pool
    then holds fewer than ``n`` loops).

    Raises:
        EchoLoadError: fewer than ``n`` patients of that split.
        ValueError: none of the ``n`` CAMUS patients could be prepared.
    """
    from ..data import PrepareConfig, PreparedLoops, prepare
    from ..io.camus import camus_splits

    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}.")
    data = Path(data)
    where = f"{data}" + (f", {split} split" if split else "")
    skipped: list[str] = []
    if (data / "meta.json").is_file():
        echoes = _alpha_one_loops(PreparedLoops(data, split=split, source="camus"), n, where,
                                  np.random.default_rng(seed))
    else:
        ids = [p for p, s in camus_splits(data).items() if split is None or s == split][:n]
        if len(ids) < n:
            raise EchoLoadError(f"Only {len(ids)} CAMUS patient(s) in {where}; asked for {n} loops.")
        with tempfile.TemporaryDirectory(prefix="echolvfm-quiz-camus-") as tmp:
            report = prepare(data, tmp, PrepareConfig(loops_per_patient=1, seed=seed, patients=tuple(ids)),
                             progress=False)
            skipped += [f"{s['patient']}: {s['reason']}" for s in report["counts"]["skipped"]]
            echoes = _alpha_one_loops(PreparedLoops(tmp, source="camus"), n - len(skipped), where, None)
    beats = []
    for i, echo in enumerate(echoes):
        found, left = beats_of(echo, f"CAMUS loop {i + 1}", seg, kind=CAMUS_KIND)
        beats += found
        skipped += left
    k = len(echoes)
    source = (f"{k} CAMUS real-anatomy loop{'s' if k != 1 else ''} with synthesised motion ({where}; real ED and ES "
              "frames, motion by registration), not acquired cines")
    if skipped:
        source += f" ({len(skipped)} left out)"
    return BeatPool(beats=tuple(beats), source=source, skipped=tuple(skipped))


def _alpha_one_loops(ds, n: int, where: str, rng: np.random.Generator | None) -> list[Echo]:
    """The alpha-1 loop of ``n`` patients of a prepared data set (drawn with ``rng``, or the first ``n``)."""
    patients = ds.patients if rng is None else [ds.patients[i] for i in rng.permutation(len(ds.patients))]
    loops = [i for p in patients for i in ds.loops_of(p) if ds.manifest[i]["alpha"] == 1.0][:n]
    if len(loops) < n:
        raise EchoLoadError(f"Only {len(loops)} CAMUS patient loop(s) at the real motion in {where}; asked for {n}.")
    return [ds[i].to_echo() for i in loops]


def combine_pools(*pools: BeatPool) -> BeatPool:
    """One pool from several; the descriptions are joined with " + "."""
    kept = [p for p in pools if len(p)]
    return BeatPool(beats=tuple(b for p in kept for b in p.beats), source=" + ".join(p.source for p in kept),
                    skipped=tuple(s for p in pools for s in p.skipped))
