"""CAMUS reader (Leclerc et al., IEEE TMI 2019): patient folders of NIfTI files, in clinical display orientation.

Files per patient folder ``patientNNNN/`` (any of them may be absent)::

    patientNNNN_{2CH,4CH}_{ED,ES}[_gt].nii.gz              one frame (image / expert labels)
    patientNNNN_{2CH,4CH}_half_sequence[_gt].nii.gz        ED-to-ES loop, time on the last axis
    Info_{2CH,4CH}.cfg                                     "Key: value" lines (ED, ES, NbFrame, Sex, Age,
                                                           ImageQuality, EF or LVef, FrameRate, ...)

Patient folders may sit directly under the root, or under ``training/``, ``testing/`` or ``database_nifti/``.
Splits come from ``splits.csv`` (columns patient,split), ``database_split/subgroup_{training,validation,testing}.txt``
or the ``training/`` / ``testing/`` folder names, in that order.

Images are shown the clinical way (apex at the top, left ventricle on the right of the screen) after swapping the two
axes nibabel returns (see :mod:`echolvfm_core.io.nifti`). Labels: 0 background, 1 LV cavity, 2 myocardium, 3 LA.
"""
from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..echo import LABELS, ClinicalInfo, Echo, EchoLoadError, LoadLimits
from ._common import display_name, unit_grey
from .nifti import read_nifti_stack

__all__ = ["CamusPatient", "CamusView", "read_camus", "camus_splits", "load_camus_file", "parse_info_cfg", "CAMUS_FILE"]

log = logging.getLogger(__name__)

CAMUS_FILE = re.compile(
    r"^(?P<patient>patient\d+)_(?P<view>[24]CH)_(?P<phase>ED|ES|half_sequence)(?P<gt>_gt)?\.nii(?:\.gz)?$",
    re.IGNORECASE,
)
PATIENT_DIR = re.compile(r"^patient\d+$", re.IGNORECASE)
#: Sub-folders of a CAMUS release that hold patient folders, with the split their name implies.
CONTAINER_DIRS = {"training": "train", "testing": "test", "database_nifti": None}
#: database_split/subgroup_<name>.txt -> split name.
SUBGROUP_SPLITS = {"training": "train", "validation": "valid", "testing": "test"}
MAX_LABEL = max(LABELS.values())


@dataclass
class CamusView:
    """One view (``"4CH"`` or ``"2CH"``) of a CAMUS patient.

    Attributes:
        view: "4CH" or "2CH".
        ed, es: single-frame :class:`Echo` records (frames (1, H, W)) at end-diastole / end-systole, with labels
            (1, H, W) uint8 and ``labelled == (0,)`` when the ``_gt`` file is present.
        half_sequence: the ED-to-ES loop (frame 0 is ED), or None when absent or not requested.
        info: clinical metadata from ``Info_<view>.cfg`` (EF in %, age, sex); ``ed_index`` / ``es_index`` index the
            half sequence (None without one).
        image_quality: "Good" / "Medium" / "Poor" from the cfg file, when given.
    """

    view: str
    ed: Echo
    es: Echo
    half_sequence: Echo | None = None
    info: ClinicalInfo = field(default_factory=ClinicalInfo)
    image_quality: str | None = None


@dataclass
class CamusPatient:
    """A CAMUS patient: ``patient_id`` ("patient0001"), ``split`` ("train" / "valid" / "test" / None), views by name."""

    patient_id: str
    split: str | None
    views: dict[str, CamusView]


def parse_info_cfg(path: str | Path) -> dict[str, str]:
    """Read a CAMUS ``Info_<view>.cfg`` file ("Key: value" per line) into a dict of strings."""
    out: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def _number(values: dict[str, str], *keys: str) -> float | None:
    for key in keys:
        try:
            return float(values[key])
        except (KeyError, ValueError):
            continue
    return None


def _clinical(view: str, cfg: dict[str, str]) -> ClinicalInfo:
    sex = cfg.get("Sex", "").strip().upper()[:1] or None
    return ClinicalInfo(view=view, ef=_number(cfg, "EF", "LVef"), age=_number(cfg, "Age"), sex=sex)


def _labels(path: Path, shape: tuple[int, ...], limits: LoadLimits) -> np.ndarray:
    what = display_name(path)
    stack, _ = read_nifti_stack(path, limits, what)
    if stack.shape != shape:
        raise EchoLoadError(f"{what} has shape {stack.shape}, which does not match its image {shape}.")
    if stack.size and (stack.min() < 0 or stack.max() > MAX_LABEL):
        raise EchoLoadError(f"{what} holds label values outside 0..{MAX_LABEL}; CAMUS labels are 0, 1, 2, 3.")
    return stack.astype(np.uint8)


def _still(image: Path, view: str, phase: str, info: ClinicalInfo, limits: LoadLimits) -> Echo:
    """One ED or ES frame with its labels (when the _gt file exists)."""
    what = display_name(image)
    stack, spacing = read_nifti_stack(image, limits, what)
    if stack.shape[0] != 1:
        raise EchoLoadError(f"{what} holds {stack.shape[0]} frames; a CAMUS {phase} file holds one frame.")
    gt = _gt_path(image)
    labels = _labels(gt, stack.shape, limits) if gt.exists() else None
    index = {"ed_index": 0} if phase == "ED" else {"es_index": 0}
    return Echo(
        frames=unit_grey(stack, what),
        spacing_mm=spacing,
        source_format="nifti",
        labels=labels,
        labelled=(0,) if labels is not None else (),
        info=ClinicalInfo(view=view, ef=info.ef, age=info.age, sex=info.sex, **index),
    )


def _gt_path(image: Path) -> Path:
    name = re.sub(r"\.nii(\.gz)?$", lambda m: "_gt" + m.group(0), image.name, flags=re.IGNORECASE)
    return image.with_name(name)


def _half_sequence(
    image: Path, view: str, cfg: dict[str, str], ed: Echo | None, limits: LoadLimits
) -> Echo:
    """The half-sequence loop, reordered ED -> ES when stored ES -> ED.

    The stored direction comes from the cfg's ED / ES frame numbers (1-based); without them, from which end frame
    matches the ED image; without that, from which end frame has the larger LV cavity in the labels (ED is the
    larger). With none of these, the stored order is kept and ED / ES indices are left unknown.
    """
    what = display_name(image)
    stack, spacing = read_nifti_stack(image, limits, what)
    n = stack.shape[0]
    gt = _gt_path(image)
    labels = _labels(gt, stack.shape, limits) if gt.exists() else None
    cfg_ed, cfg_es = _number(cfg, "ED"), _number(cfg, "ES")
    ed_index = es_index = None
    if cfg_ed is not None and cfg_es is not None and 1 <= cfg_ed <= n and 1 <= cfg_es <= n and cfg_ed != cfg_es:
        reverse = cfg_ed > cfg_es
        ed_index, es_index = int(cfg_ed) - 1, int(cfg_es) - 1
        if reverse:
            ed_index, es_index = n - 1 - ed_index, n - 1 - es_index
    elif n > 1 and ed is not None and ed.frames.shape[1:] == stack.shape[1:]:
        ref = ed.frames[0]
        first = float(np.mean(np.abs(unit_grey(stack[:1], what)[0] - ref)))
        last = float(np.mean(np.abs(unit_grey(stack[-1:], what)[0] - ref)))
        reverse = last < first
        ed_index, es_index = 0, n - 1
    elif n > 1 and labels is not None:
        lv = LABELS["lv"]
        reverse = int(np.sum(labels[-1] == lv)) > int(np.sum(labels[0] == lv))
        ed_index, es_index = 0, n - 1
    else:
        reverse = False
    if reverse:
        stack = stack[::-1]
        labels = labels[::-1] if labels is not None else None
    info = _clinical(view, cfg)
    fps = _number(cfg, "FrameRate")
    return Echo(
        frames=unit_grey(np.ascontiguousarray(stack), what),
        fps=fps if fps and fps > 0 else None,
        spacing_mm=spacing,
        source_format="nifti",
        labels=np.ascontiguousarray(labels) if labels is not None else None,
        labelled=tuple(range(n)) if labels is not None else (),
        info=ClinicalInfo(view=view, ef=info.ef, age=info.age, sex=info.sex, ed_index=ed_index, es_index=es_index),
    )


def _view_files(folder: Path, patient: str, view: str) -> dict[str, Path]:
    files = {}
    for phase in ("ED", "ES", "half_sequence"):
        for ext in (".nii.gz", ".nii"):
            p = folder / f"{patient}_{view}_{phase}{ext}"
            if p.exists():
                files[phase] = p
                break
    return files


def _read_cfg(folder: Path, view: str) -> dict[str, str]:
    cfg = folder / f"Info_{view}.cfg"
    return parse_info_cfg(cfg) if cfg.exists() else {}


def _load_view(folder: Path, patient: str, view: str, limits: LoadLimits, half_sequences: bool) -> CamusView | None:
    files = _view_files(folder, patient, view)
    if "ED" not in files or "ES" not in files:
        return None
    cfg = _read_cfg(folder, view)
    info = _clinical(view, cfg)
    ed = _still(files["ED"], view, "ED", info, limits)
    es = _still(files["ES"], view, "ES", info, limits)
    half = None
    if half_sequences and "half_sequence" in files:
        half = _half_sequence(files["half_sequence"], view, cfg, ed, limits)
        info = half.info
    return CamusView(
        view=view, ed=ed, es=es, half_sequence=half, info=info, image_quality=cfg.get("ImageQuality") or None
    )


def load_camus_file(path: str | Path, limits: LoadLimits | None = None) -> Echo:
    """Read one CAMUS image file (ED, ES or half sequence) with its labels and its view's cfg, when present.

    Label files (``_gt``) are not echoes and raise :class:`EchoLoadError`.
    """
    path = Path(path)
    limits = limits or LoadLimits.from_env()
    m = CAMUS_FILE.match(path.name)
    if m is None:
        raise EchoLoadError(f"{display_name(path)} is not named like a CAMUS file (patientNNNN_4CH_ED.nii.gz, ...).")
    if m["gt"]:
        raise EchoLoadError(
            f"{display_name(path)} is a CAMUS label map, not an image; load the matching image file instead."
        )
    view, phase = m["view"].upper(), m["phase"]
    cfg = _read_cfg(path.parent, view)
    if phase.upper() in ("ED", "ES"):
        return _still(path, view, phase.upper(), _clinical(view, cfg), limits)
    ed_file = _view_files(path.parent, m["patient"], view).get("ED")
    ed = _still(ed_file, view, "ED", _clinical(view, cfg), limits) if ed_file is not None else None
    return _half_sequence(path, view, cfg, ed, limits)


def _find_patients(root: Path) -> list[tuple[Path, str | None]]:
    """(patient folder, split implied by its container folder) for every patient folder, sorted by name."""
    found: list[tuple[Path, str | None]] = []
    if PATIENT_DIR.match(root.name) and root.is_dir():
        return [(root, None)]
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        if PATIENT_DIR.match(entry.name):
            found.append((entry, None))
        elif entry.name.lower() in CONTAINER_DIRS:
            implied = CONTAINER_DIRS[entry.name.lower()]
            found.extend((p, implied) for p in sorted(entry.iterdir()) if p.is_dir() and PATIENT_DIR.match(p.name))
    return sorted(found, key=lambda item: item[0].name.lower())


def _patient_folders(root: Path) -> list[tuple[Path, str | None]]:
    """:func:`_find_patients` of a folder that must exist and hold patient folders (EchoLoadError otherwise)."""
    if not root.is_dir():
        raise EchoLoadError(f"No folder at {display_name(root)}; give a CAMUS data folder of patientNNNN folders.")
    found = _find_patients(root)
    if not found:
        raise EchoLoadError(
            f"{display_name(root)} holds no CAMUS patient folders (patientNNNN/ with patientNNNN_4CH_ED.nii.gz, ...)."
        )
    return found


def camus_splits(root: str | Path) -> dict[str, str | None]:
    """Patient id ("patient0001") -> split ("train", "valid", ... or None) of every patient folder under a CAMUS
    folder, in patient order, from the folder names and split files alone: no image is read, so an unreadable
    patient cannot stop a listing (:func:`read_camus` raises when it reaches one).

    Raises:
        EchoLoadError: ``root`` is not a folder or holds no CAMUS patient folder.
    """
    root = Path(root)
    found = _patient_folders(root)
    splits = _read_splits(root)
    return {folder.name.lower(): splits.get(folder.name.lower(), implied) for folder, implied in found}


def _read_splits(root: Path) -> dict[str, str]:
    splits: dict[str, str] = {}
    csv_path = root / "splits.csv"
    if csv_path.exists():
        with open(csv_path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                if row.get("patient") and row.get("split"):
                    splits[row["patient"].strip().lower()] = row["split"].strip()
        return splits
    for name, split in SUBGROUP_SPLITS.items():
        txt = root / "database_split" / f"subgroup_{name}.txt"
        if txt.exists():
            for line in txt.read_text(encoding="utf-8").split():
                splits[line.strip().lower()] = split
    return splits


def _patient_id(p: str | int) -> str:
    return f"patient{int(p):04d}" if isinstance(p, int) or str(p).isdigit() else str(p).lower()


def read_camus(
    root: str | Path,
    *,
    views: Iterable[str] = ("4CH", "2CH"),
    patients: Iterable[str | int] | None = None,
    half_sequences: bool = True,
    limits: LoadLimits | None = None,
) -> Iterator[CamusPatient]:
    """Iterate lazily over the CAMUS patients under ``root``: each patient's files are read only when it is reached.

    Args:
        root: a CAMUS folder (patient folders directly below, or below training/, testing/ or database_nifti/),
            or a single patient folder.
        views: the views to read; views a patient lacks are left out of its ``views`` dict, and patients with
            none of them are skipped.
        patients: patient ids ("patient0001") or numbers (1) to read; default all.
        half_sequences: read the half-sequence loops when present.
        limits: size limits per file (default :meth:`LoadLimits.from_env`).

    Raises:
        EchoLoadError: at once (not at the first ``next()``) when ``root`` holds no CAMUS patient folder, or none
            of the requested patients; while iterating, when a patient's file is unreadable.
    """
    root = Path(root)
    limits = limits or LoadLimits.from_env()
    wanted_views = tuple(v.upper() for v in views)
    bad = [v for v in wanted_views if v not in ("2CH", "4CH")]
    if bad:
        raise EchoLoadError(f"Unknown CAMUS view(s) {bad}; CAMUS views are '4CH' and '2CH'.")
    found = _patient_folders(root)
    if patients is not None:
        wanted = {_patient_id(p) for p in patients}
        found = [item for item in found if item[0].name.lower() in wanted]
        if not found:
            raise EchoLoadError(f"None of the requested patients is under {display_name(root)}.")
    return _iter_patients(found, _read_splits(root), wanted_views, limits, half_sequences)


def _iter_patients(
    found: list[tuple[Path, str | None]],
    splits: dict[str, str],
    views: tuple[str, ...],
    limits: LoadLimits,
    half_sequences: bool,
) -> Iterator[CamusPatient]:
    for folder, implied_split in found:
        loaded = {}
        for view in views:
            v = _load_view(folder, folder.name, view, limits, half_sequences)
            if v is not None:
                loaded[view] = v
        if not loaded:
            log.debug("CAMUS %s has none of the views %s; skipped", folder.name, views)
            continue
        patient = folder.name.lower()
        yield CamusPatient(patient_id=patient, split=splits.get(patient, implied_split), views=loaded)
