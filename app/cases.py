"""Cases to pick from a ``--data`` folder: a folder of echo files, a CAMUS folder, or a prepared data folder.

* **Echo files** (DICOM with or without extension, NIfTI, AVI/MP4/GIF/WebM, ...): one case per file directly in the
  folder, named by file name.
* **CAMUS** (``patientNNNN/`` folders): one case per patient, its apical four-chamber half sequence (ED to ES).
  Patients with only the ED and ES stills (like the ``camus_4ch_edes`` copy) have no loop to show; the message
  says to run ``echolvfm prepare`` and pick cases from the prepared folder instead.
* **Prepared folder** (written by ``echolvfm prepare``: ``meta.json`` + ``manifest.csv``): one case per CAMUS
  patient, its loop at the real motion (alpha 1): real ED / ES anatomy with synthesised motion, marked as such.

:func:`list_cases` never reads pixel data; :func:`load_case` reads one case as an :class:`~echolvfm_core.echo.Echo`.
"""
from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path

from echolvfm_core.echo import Echo, EchoLoadError

__all__ = ["MAX_CASES", "data_kind", "list_cases", "load_case"]

#: Most cases listed from one folder.
MAX_CASES = 1000
_SKIP_SUFFIXES = {".md", ".csv", ".txt", ".json", ".cfg", ".npz", ".log", ".py", ".sh"}


def data_kind(root: Path) -> str:
    """"prepared", "camus" or "files" for a --data folder."""
    root = Path(root)
    if (root / "meta.json").is_file() and (root / "manifest.csv").is_file():
        return "prepared"
    if _camus_patients(root):
        return "camus"
    return "files"


def _camus_patients(root: Path) -> list[Path]:
    out = []
    for base in (root, root / "training", root / "testing", root / "database_nifti"):
        if base.is_dir():
            out += [p for p in base.iterdir() if p.is_dir() and p.name.lower().startswith("patient")
                    and any(p.glob(f"{p.name}_*CH_*.nii*"))]
    return sorted(out, key=lambda p: p.name)


@lru_cache(maxsize=8)
def _prepared_rows(root: str) -> tuple[tuple[str, str, int], ...]:
    """(case name, patient, manifest row index) of the real-motion CAMUS loops of a prepared folder."""
    with open(Path(root) / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for i, r in enumerate(rows):
        if r.get("source") == "camus" and abs(float(r.get("alpha", "nan")) - 1.0) < 1e-9:
            out.append((f"{r['patient']} ({r['split']}, EF {float(r['ef']):.0f} %)", r["patient"], i))
    return tuple(out)


def list_cases(root: Path | None) -> list[str]:
    """Case names of a --data folder (sorted, at most :data:`MAX_CASES`); empty without a folder."""
    if root is None:
        return []
    root = Path(root)
    kind = data_kind(root)
    if kind == "prepared":
        names = [name for name, _, _ in _prepared_rows(str(root))]
    elif kind == "camus":
        names = [p.name for p in _camus_patients(root)]
    else:
        names = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith((".", "_"))
                       and p.suffix.lower() not in _SKIP_SUFFIXES)
    return names[:MAX_CASES]


def load_case(root: Path, name: str) -> Echo:
    """Read case ``name`` (one of :func:`list_cases`) from a --data folder.

    Raises:
        EchoLoadError: the name is not a case of this folder, or the case has no loop.
    """
    root = Path(root)
    if name not in list_cases(root):
        raise EchoLoadError(f"{name!r} is not one of the cases in the data folder; pick one from the list.")
    kind = data_kind(root)
    if kind == "prepared":
        from echolvfm_core.data import PreparedLoops

        patient = next(p for n, p, _ in _prepared_rows(str(root)) if n == name)
        ds = PreparedLoops(root, source="camus", cache_size=0)
        index = next(i for i in ds.loops_of(patient) if abs(ds.manifest[i]["alpha"] - 1.0) < 1e-9)
        return ds[index].to_echo()
    if kind == "camus":
        from echolvfm_core.io import read_camus

        folder = next(p for p in _camus_patients(root) if p.name == name)
        patient = next(iter(read_camus(folder, views=("4CH", "2CH"))))
        view = patient.views.get("4CH") or next(iter(patient.views.values()))
        if view.half_sequence is None:
            raise EchoLoadError(
                f"{name} has only the end-diastolic and end-systolic stills, no loop; run `echolvfm prepare "
                f"--camus {root}` and start the app with --data on the prepared folder to pick loops made from them."
            )
        return view.half_sequence
    from echolvfm_core.io import load_echo

    return load_echo(root / name)
