"""EF by segmentation: frames -> per-frame labels -> LV area curve -> ED / ES frames -> area-length (and Simpson) EF.

The network is :class:`~echolvfm_core.models.segmenter.LVSegmenter`; the geometry (volumes, ED / ES detection) is
:mod:`echolvfm_core.ef`. The measurement can also be made from given labels (:func:`measure_labels`), e.g. from
expert or phantom labels, which checks the EF path without a network.

    seg = SegmentationEF.from_pretrained()            # assets/segmenter
    m = seg.measure(pre.echo.frames, pre.echo.spacing_mm)
    m.ef, m.ed_index, m.es_index, m.lv_area
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .. import ef as efm
from ..echo import Echo, EchoLoadError, check_grey_stack
from ..metrics import dice
from ..models.segmenter import LVSegmenter

__all__ = [
    "EFMeasurement",
    "SegmentationEF",
    "SegmentationError",
    "TTA_TRANSFORMS",
    "measure_labels",
    "keep_largest_components",
    "evaluate_segmentation",
    "default_segmenter_dir",
]

log = logging.getLogger(__name__)

#: Test-time augmentation of :class:`SegmentationEF`: (rotation in degrees, scale) about the apex, inside the ranges of
#: the training augmentation (rotation +-10 degrees, scale 0.9-1.1 about the apex; no flips, the view is in clinical
#: orientation). Each transformed copy's logits are mapped back to the input grid and the logits are averaged. Chosen
#: on the CAMUS valid split (assets/segmenter/MODEL_CARD.md).
TTA_TRANSFORMS: tuple[tuple[float, float], ...] = ((0.0, 1.0), (-6.0, 1.0), (6.0, 1.0), (0.0, 0.96), (0.0, 1.04))


class SegmentationError(ValueError):
    """The labels do not allow an EF measurement (e.g. no LV cavity was found)."""


def default_segmenter_dir() -> Path:
    """The bundled segmenter: ``assets/segmenter`` at the repository root."""
    return Path(__file__).resolve().parents[2] / "assets" / "segmenter"


@dataclass(frozen=True)
class EFMeasurement:
    """EF of a loop measured on its LV labels.

    Attributes:
        labels: uint8 (T, H, W), 0 background, 1 LV cavity, 2 myocardium, 3 left atrium.
        lv_area: (T,) LV cavity area per frame, mm^2 with spacing else pixels.
        ed_index, es_index: end-diastolic and end-systolic frame of the first measured beat.
        ef: area-length EF in % (mean over the measured beats).
        ef_simpson: single-plane method-of-discs EF in % (same beats).
        edv, esv: area-length volumes of the first beat, ml with spacing else cubic pixels.
        beats: (ed, es) frame pairs that were measured.
        beats_ef: area-length EF of every beat, in %.
        area_unit, volume_unit: "mm^2" / "ml" with spacing, "px" / "px^3" without.
        phases_found: False when no cardiac cycle was detected on the area curve and the largest and smallest
            areas were used instead.
    """

    labels: np.ndarray
    lv_area: np.ndarray
    ed_index: int
    es_index: int
    ef: float
    ef_simpson: float
    edv: float
    esv: float
    beats: tuple[tuple[int, int], ...]
    beats_ef: tuple[float, ...]
    area_unit: str
    volume_unit: str
    phases_found: bool

    def to_dict(self) -> dict:
        """JSON-friendly summary (everything but the label maps)."""
        return {
            "ef": round(self.ef, 3),
            "ef_simpson": round(self.ef_simpson, 3),
            "ed_index": self.ed_index,
            "es_index": self.es_index,
            "edv": round(self.edv, 4),
            "esv": round(self.esv, 4),
            "volume_unit": self.volume_unit,
            "lv_area": [round(float(a), 3) for a in self.lv_area],
            "area_unit": self.area_unit,
            "beats": [list(b) for b in self.beats],
            "beats_ef": [round(e, 3) for e in self.beats_ef],
            "phases_found": self.phases_found,
        }


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Per frame and per class 1-3, keep only the largest 8-connected component (the rest becomes background).

    Args:
        labels: integer (T, H, W) or (H, W) label maps.

    Returns:
        uint8 array of the same shape.
    """
    a = np.asarray(labels)
    single = a.ndim == 2
    stack = (a[None] if single else a).astype(np.uint8, copy=True)
    if stack.ndim != 3:
        raise ValueError(f"labels must be (H, W) or (T, H, W); got shape {a.shape}.")
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connected within a frame, never across frames
    frame_of = np.repeat(np.arange(len(stack)), stack.shape[1] * stack.shape[2])
    for cls in (1, 2, 3):
        comp, n = ndi.label(stack == cls, structure=structure)
        if n == 0:
            continue
        ids = comp.ravel()
        sizes = np.bincount(ids, minlength=n + 1)
        comp_frame = np.zeros(n + 1, dtype=np.int64)
        comp_frame[ids] = frame_of
        best = np.zeros(len(stack), dtype=np.int64)  # largest component id per frame (0: none)
        order = np.lexsort((sizes[1:], comp_frame[1:])) + 1  # by frame, then size ascending
        best[comp_frame[order]] = order  # the last write per frame is its largest component
        keep = np.zeros(n + 1, dtype=bool)
        keep[best[best > 0]] = True
        drop = (comp > 0) & ~keep[comp]
        stack[drop] = 0
    return stack[0] if single else stack


def _about_apex(x: torch.Tensor, angle_deg: float, scale: float, padding: str) -> torch.Tensor:
    """Maps (B, C, S, S) rotated by ``angle_deg`` and scaled by ``scale`` about the apex (top centre), bilinear.

    The same geometry as the training augmentation; ``(-angle_deg, 1 / scale)`` undoes ``(angle_deg, scale)``.
    """
    a = np.deg2rad(angle_deg)
    cos, sin = np.cos(a) / scale, np.sin(a) / scale
    theta = torch.tensor([[cos, -sin, -sin], [sin, cos, -1.0 + cos]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(len(x), 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _beats(area: np.ndarray, present: np.ndarray) -> tuple[list[tuple[int, int]], bool]:
    """(ED, ES) pairs on the area curve of the frames with a cavity; fallback largest / smallest area."""
    idx = np.flatnonzero(present)
    curve = area[idx]
    phases = efm.detect_ed_es(curve)
    beats = []
    for e in phases.ed:
        later = [s for s in phases.es if s > e]
        if later:
            beats.append((int(idx[e]), int(idx[later[0]])))
    if beats:
        return beats, True
    return [(int(idx[np.argmax(curve)]), int(idx[np.argmin(curve)]))], False


def measure_labels(labels: np.ndarray, spacing_mm: tuple[float, float] | None = None,
                   cyclic: bool = False) -> EFMeasurement:
    """EF of a labelled loop: LV area curve -> ED / ES (:func:`echolvfm_core.ef.detect_ed_es`) -> volumes -> EF.

    Each ED frame followed by an ES frame is one beat; ``ef`` is the mean over beats. Frames without an LV cavity
    are left out of the curve (their area is reported as 0). A curve without a detectable cycle falls back to the
    frames of largest and smallest area.

    The ends of a clip count as phase candidates, so a clip that stops while the ventricle is still emptying gives a
    beat whose ES is its last frame, not the end of systole. A loop played as a cycle (the Studio plays and
    generates it so) is measured as one with ``cyclic``: the pydicom sample, resampled to 16 frames, gives ED 11 ->
    ES 15 (the last frame) and 50.5 % as a clip, ED 11 -> ES 2 (around the end, the smallest cavity) and 63.7 % as
    a cycle (docs/models.md, "On the pydicom sample").

    Args:
        labels: integer (T, H, W) label maps, T >= 2, CAMUS labels, apical view in clinical orientation.
        spacing_mm: (row, col) pixel size in mm, or None to measure in pixels (EF is the same for square pixels).
        cyclic: the last frame is followed by the first: the curve is read from its largest cavity on, around the
            end. Indices stay those of ``labels``, so the ES of a beat that runs around the end is smaller than its
            ED.

    Raises:
        EchoLoadError: fewer than 2 frames (a still cannot give an EF).
        SegmentationError: fewer than 2 frames hold an LV cavity.
    """
    lab = np.asarray(labels)
    if lab.ndim != 3:
        raise ValueError(f"labels must be a (T, H, W) stack; got shape {lab.shape}.")
    if lab.shape[0] < 2:
        raise EchoLoadError("EF measurement needs a loop of at least 2 frames, but the input is a single still frame.")
    lab = lab.astype(np.uint8, copy=False)
    area = efm.lv_areas(lab, spacing_mm)
    if cyclic:
        start = int(np.argmax(area))
        m = measure_labels(np.roll(lab, -start, axis=0), spacing_mm)

        def back(i):
            return (i + start) % len(lab)

        return replace(m, labels=lab, lv_area=area, ed_index=back(m.ed_index), es_index=back(m.es_index),
                       beats=tuple((back(e), back(s)) for e, s in m.beats))
    present = area > 0
    if present.sum() < 2:
        raise SegmentationError(
            f"An LV cavity was found in {int(present.sum())} of {len(lab)} frames; EF needs at least 2 "
            "(is this an apical four-chamber view?)."
        )
    beats, found = _beats(area, present)
    frames = sorted({i for b in beats for i in b})
    pos = {f: k for k, f in enumerate(frames)}
    vols = {m: efm.lv_volumes(lab[frames], spacing_mm, method=m) for m in efm.METHODS}

    def beat_ef(method: str, e: int, s: int) -> float:
        v = vols[method]
        return float(efm.ejection_fraction(v[pos[e]], v[pos[s]]))

    al = tuple(beat_ef("area_length", e, s) for e, s in beats)
    simpson = [beat_ef("simpson", e, s) for e, s in beats]
    e0, s0 = beats[0]
    with_spacing = spacing_mm is not None
    return EFMeasurement(
        labels=lab,
        lv_area=area,
        ed_index=e0,
        es_index=s0,
        ef=float(np.mean(al)),
        ef_simpson=float(np.mean(simpson)),
        edv=float(vols["area_length"][pos[e0]]),
        esv=float(vols["area_length"][pos[s0]]),
        beats=tuple(beats),
        beats_ef=al,
        area_unit="mm^2" if with_spacing else "px",
        volume_unit="ml" if with_spacing else "px^3",
        phases_found=found,
    )


class SegmentationEF:
    """LV segmenter + EF measurement (inference only).

    Args:
        model: a trained :class:`LVSegmenter`.
        device: torch device for the network (default: the model's).
        cleanup: keep only the largest connected component of every class in every frame.
        tta: average the logits over :data:`TTA_TRANSFORMS` (one network pass per transform) instead of one pass.
        batch_size: frames per network call.
    """

    def __init__(self, model: LVSegmenter, device: str | torch.device | None = None, cleanup: bool = True,
                 tta: bool = True, batch_size: int = 32):
        self.model = model.eval().to(memory_format=torch.channels_last)  # faster convolutions on CPU
        if device is not None:
            self.model.to(device)
        self.cleanup = cleanup
        self.tta = tta
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        **kwargs) -> SegmentationEF:
        """Load a ``save_pretrained`` folder (default: the bundled ``assets/segmenter``)."""
        path = Path(path) if path is not None else default_segmenter_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(2, "No segmenter (config.json) in this folder", str(path))
        return cls(LVSegmenter.from_pretrained(str(path)), device=device, **kwargs)

    @property
    def size(self) -> int:
        return int(self.model.config.sample_size)

    def _check_frames(self, frames: np.ndarray) -> np.ndarray:
        f = check_grey_stack(frames)
        if f.shape[1:] != (self.size, self.size):
            raise ValueError(
                f"frames must be {self.size} x {self.size} (the segmenter's grid; run preprocess(echo, "
                f"size={self.size}) first); got {f.shape[1]} x {f.shape[2]}."
            )
        return f

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float logits (B, C, S, S) of frames (B, 1, S, S) on the model's device, averaged over the TTA transforms."""

        def run(t: torch.Tensor) -> torch.Tensor:
            return self.model(t.contiguous(memory_format=torch.channels_last)).float()

        if not self.tta:
            return run(x)
        total = torch.zeros(())
        for angle, scale in TTA_TRANSFORMS:
            if angle == 0.0 and scale == 1.0:
                total = total + run(x)
            else:
                moved = run(_about_apex(x, angle, scale, "zeros"))  # zeros outside the fan, as in training
                total = total + _about_apex(moved, -angle, 1.0 / scale, "border")
        return total / len(TTA_TRANSFORMS)

    @torch.no_grad()
    def segment(self, frames: np.ndarray) -> np.ndarray:
        """Labels of every frame: float (T, S, S) in [0, 1] -> uint8 (T, S, S) with values 0-3."""
        f = self._check_frames(frames)
        x = torch.from_numpy(np.ascontiguousarray(f, dtype=np.float32))
        dev, dtype = self.model.device, self.model.dtype
        labels = torch.cat(
            [self._logits(chunk[:, None].to(dev, dtype)).argmax(1).cpu() for chunk in x.split(self.batch_size)]
        ).numpy().astype(np.uint8)
        return keep_largest_components(labels) if self.cleanup else labels

    def measure(self, frames: np.ndarray, spacing_mm: tuple[float, float] | None = None,
                cyclic: bool = False) -> EFMeasurement:
        """Segment a loop and measure its EF (see :func:`measure_labels`).

        Args:
            frames: float (T, S, S) grey levels in [0, 1] on the model grid (``preprocess(echo).echo.frames``), T >= 2.
            spacing_mm: (row, col) pixel size in mm on that grid, or None (areas in pixels).
            cyclic: measure the loop as a cycle (its last frame followed by its first), as it is played.
        """
        f = self._check_frames(frames)
        if f.shape[0] < 2:
            raise EchoLoadError(
                "EF measurement needs a loop of at least 2 frames, but the input is a single still frame.")
        return measure_labels(self.segment(f), spacing_mm, cyclic)

    #: Alias of :meth:`measure`.
    measure_ef = measure

    def measure_echo(self, echo: Echo) -> EFMeasurement:
        """Measure a preprocessed :class:`Echo` (frames on the model grid; its ``spacing_mm`` is used)."""
        echo.require_loop("EF measurement by segmentation")
        return self.measure(echo.frames, echo.spacing_mm)


def evaluate_segmentation(
    segmenter: SegmentationEF,
    images: np.ndarray,
    labels: np.ndarray,
    patients: Sequence[str],
    phases: Sequence[str],
) -> dict:
    """Dice per class and segmentation EF error on expert-labelled ED / ES frames (e.g. ``RealFrames``).

    ``ef_mae`` compares, per patient with both an ED and an ES frame, the area-length EF from the predicted labels
    with the EF from the expert labels (pixel units; EF is unitless).

    Args:
        images: uint8 (N, S, S) or float (N, S, S) in [0, 1].
        labels: integer (N, S, S) expert labels.
        patients, phases: per frame, the patient id and "ED" / "ES".

    Returns:
        ``{dice_lv, dice_myo, dice_la, ef_mae, n, n_patients, ef_failures}``: Dice are means over the N frames; n
        is N; ``ef_failures`` counts patients whose predicted labels gave no EF (left out of ``ef_mae``).
    """
    imgs = np.asarray(images)
    gt = np.asarray(labels)
    if imgs.ndim != 3 or gt.shape != imgs.shape or len(patients) != len(imgs) or len(phases) != len(imgs):
        raise ValueError(
            f"images (N, S, S), labels (N, S, S), patients (N) and phases (N) must agree; got {imgs.shape}, "
            f"{gt.shape}, {len(patients)}, {len(phases)}."
        )
    if len(imgs) == 0:
        raise ValueError("evaluate_segmentation needs at least one frame.")
    x = imgs.astype(np.float32) / 255.0 if imgs.dtype == np.uint8 else imgs.astype(np.float32)
    pred = segmenter.segment(x)
    out = {
        f"dice_{name}": float(np.mean([dice(p, t, cls) for p, t in zip(pred, gt)]))
        for cls, name in ((1, "lv"), (2, "myo"), (3, "la"))
    }
    by_patient: dict[str, dict[str, int]] = {}
    for i, (pid, ph) in enumerate(zip(patients, phases)):
        by_patient.setdefault(str(pid), {})[str(ph).upper()] = i
    errors, failures = [], 0
    for pid, idx in by_patient.items():
        if "ED" not in idx or "ES" not in idx:
            continue
        ref = efm.ef_from_pair(gt[idx["ED"]], gt[idx["ES"]]).ef
        try:
            est = efm.ef_from_pair(pred[idx["ED"]], pred[idx["ES"]]).ef
        except ValueError as exc:
            log.warning("patient %s: no EF from predicted labels (%s)", pid, exc)
            failures += 1
            continue
        errors.append(abs(est - ref))
    out.update(
        ef_mae=float(np.mean(errors)) if errors else float("nan"),
        n=int(len(imgs)),
        n_patients=len(errors),
        ef_failures=failures,
    )
    return out
