"""Real pools for a realism study, each with a sentence saying where its cases come from (stored with the study and
shown in the results, since not every "real" case is an acquired cine).

Sources:

* echo files and folders (a folder gives its files, not its sub-folders), and :data:`SAMPLE`, the built-in pydicom
  cine (:func:`echolvfm_core.io.sample_echo_path`);
* CAMUS: real ED and ES anatomy with motion synthesised by registration (:mod:`echolvfm_core.data.loops`), one loop
  per patient at the real ED -> ES motion (alpha 1), from a CAMUS folder (built as ``echolvfm prepare`` builds
  training loops) or from an ``echolvfm prepare`` folder.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from echolvfm_core.echo import Echo, EchoLoadError

__all__ = ["SAMPLE", "RealPool", "file_pool", "camus_pool", "combine_pools"]

#: Names the built-in sample cine in :func:`file_pool`.
SAMPLE = "sample"


@dataclass(frozen=True)
class RealPool:
    """Real cases (echo files or :class:`Echo` loops, as :func:`app.quiz.create_study` takes them) and where they
    come from."""

    items: tuple[Echo | Path, ...]
    source: str

    def __len__(self) -> int:
        return len(self.items)


def file_pool(specs: Sequence[str | os.PathLike], label: str | None = None) -> RealPool:
    """Echo files from ``specs``: files, folders (their visible files, sorted, not recursive) and :data:`SAMPLE`.

    Files are read later, when the study is built. ``label`` describes the cases (e.g. "acquired A4C cines,
    site X"); without it the description names the sample, the folders and the number of files.

    Raises:
        EchoLoadError: a spec that is neither a file, a folder nor :data:`SAMPLE`.
    """
    from echolvfm_core.io import sample_echo_path

    items: list[Path] = []
    parts: list[str] = []
    for spec in specs:
        if str(spec) == SAMPLE:
            items.append(sample_echo_path())
            parts.append("the pydicom sample cine (apical 4CH)")
            continue
        path = Path(spec)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            items.extend(files)
            parts.append(f"{len(files)} echo file(s) from {path}")
        elif path.is_file():
            items.append(path)
            parts.append(f"echo file {path.name}")
        else:
            raise EchoLoadError(f"The real pool entry {spec} is neither a file, a folder nor '{SAMPLE}'.")
    source = f"{label} ({len(items)} case(s))" if label else " + ".join(parts)
    return RealPool(items=tuple(items), source=source)


def camus_pool(data: str | os.PathLike, n: int, split: str | None = "valid", seed: int = 0) -> RealPool:
    """``n`` CAMUS loops of real anatomy with synthesised motion, one per patient at the real ED -> ES motion.

    Args:
        data: a CAMUS folder (its first ``n`` patients of ``split`` in patient order; their loops are built with
            :func:`echolvfm_core.data.prepare`, a few seconds per patient) or an ``echolvfm prepare`` folder
            (``n`` of its CAMUS patients of ``split``, drawn with ``seed``).
        n: number of loops.
        split: "train", "valid", ... or None for any split; "valid" keeps the generator's training patients out.
        seed: seed of the draw from a prepared folder and of the loops' cycle timing.

    Raises:
        EchoLoadError: fewer than ``n`` patients of that split.
    """
    from echolvfm_core.data import PrepareConfig, PreparedLoops, prepare
    from echolvfm_core.io import read_camus

    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}.")
    data = Path(data)
    where = f"{data}" + (f", {split} split" if split else "")
    if (data / "meta.json").is_file():
        echoes = _alpha_one_loops(PreparedLoops(data, split=split, source="camus"), n, where,
                                  np.random.default_rng(seed))
    else:
        patients = read_camus(data, views=("4CH",), half_sequences=False)
        ids = [p.patient_id for p in islice((p for p in patients if split is None or p.split == split), n)]
        if len(ids) < n:
            raise EchoLoadError(f"Only {len(ids)} CAMUS patient(s) in {where}; asked for {n} loops.")
        with tempfile.TemporaryDirectory(prefix="echolvfm-quiz-camus-") as tmp:
            prepare(data, tmp, PrepareConfig(loops_per_patient=1, seed=seed, patients=tuple(ids)), progress=False)
            echoes = _alpha_one_loops(PreparedLoops(tmp, source="camus"), n, where, None)
    source = (f"{n} CAMUS real-anatomy loop(s) with synthesised motion ({where}; real ED and ES frames, motion "
              "by registration), not acquired cines")
    return RealPool(items=tuple(echoes), source=source)


def _alpha_one_loops(ds, n: int, where: str, rng: np.random.Generator | None) -> list[Echo]:
    """The alpha-1 loop of ``n`` patients of a prepared data set (drawn with ``rng``, or the first ``n``)."""
    patients = ds.patients if rng is None else [ds.patients[i] for i in rng.permutation(len(ds.patients))]
    loops = [i for p in patients for i in ds.loops_of(p) if ds.manifest[i]["alpha"] == 1.0][:n]
    if len(loops) < n:
        raise EchoLoadError(f"Only {len(loops)} CAMUS patient loop(s) at the real motion in {where}; asked for {n}.")
    return [ds[i].to_echo() for i in loops]


def combine_pools(*pools: RealPool) -> RealPool:
    """One pool from several; the descriptions are joined with " + "."""
    kept = [p for p in pools if len(p)]
    return RealPool(items=tuple(i for p in kept for i in p.items), source=" + ".join(p.source for p in kept))
