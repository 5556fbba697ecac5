"""Left-ventricular volumes and ejection fraction from label maps.

Label maps use the CAMUS convention (:data:`echolvfm_core.echo.LABELS`): 0 background, 1 LV cavity, 2 myocardium,
3 left atrium, apical view in clinical orientation (apex at the top of the image).

Volumes, single plane (Lang et al., "Recommendations for cardiac chamber quantification by echocardiography in
adults", JASE 2015):

* area-length: ``V = 8 A^2 / (3 pi L)`` with ``A`` the cavity area and ``L`` the long axis from the apex to the
  midpoint of the mitral annulus;
* method of discs (Simpson): the cavity is cut into ``n`` discs perpendicular to the same long axis,
  ``V = sum_i pi / 4 * d_i^2 * L / n``; here ``d_i`` is the cavity area inside slab ``i`` divided by the slab
  height (the mean chord of the slab), which is robust on pixel masks.

``EF = (EDV - ESV) / EDV`` in %. With ``spacing_mm`` volumes are in ml, otherwise in cubic pixels (EF is unitless
either way when pixels are square).

Long axis: the annulus is the set of cavity pixels touching the left atrium; when the map has no atrium, the
cavity pixels on the open (basal) side of the myocardium; when the map holds only a cavity, the axis is the
cavity's principal axis, apex at its upper end. The hinge points are the two extreme annulus pixels, the apex the
cavity pixel farthest from their midpoint. Pixel centres are half a pixel inside the traced border, so the
length adds one pixel extent along the axis (half at the apex, half at the annulus).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "EF_REQUEST_RANGE",
    "METHODS",
    "CyclePhases",
    "EFResult",
    "LVGeometry",
    "area_length_volume",
    "check_requested_ef",
    "detect_ed_es",
    "ef_from_loop",
    "ef_from_pair",
    "ejection_fraction",
    "lv_areas",
    "lv_geometry",
    "lv_volumes",
    "simpson_volume",
]

#: EFs (%) the generator may be asked for, by the ``echolvfm`` commands and the app alike (the app's slider): the
#: range of the Gen condition of the evaluation (:data:`echolvfm_core.pipelines.evaluation.GEN_EF_RANGE`), inside
#: the EFs of the training loops (about 1 to 95 %, 98 % of them in 10-83 %).
EF_REQUEST_RANGE = (10.0, 90.0)

#: Volume methods accepted by :func:`lv_volumes` and the ``method`` arguments below.
METHODS = ("area_length", "simpson")

_LV, _MYO, _LA = 1, 2, 3


@dataclass(frozen=True)
class LVGeometry:
    """Geometry of the LV cavity in one label map.

    Attributes:
        area: cavity area, mm^2 with spacing else pixels.
        length: long axis from the apex to the annulus midpoint (border to border), mm or pixels.
        apex: (row, col) pixel coordinates of the apex.
        base: (row, col) pixel coordinates of the mitral-annulus midpoint.
        hinges: ((row, col), (row, col)) annulus end points; equal to ``(base, base)`` for a cavity-only map.
        annulus_from: "la" (cavity touching the atrium), "myo" (open side of the myocardium) or "axis"
            (principal axis of a cavity-only map).
    """

    area: float
    length: float
    apex: tuple[float, float]
    base: tuple[float, float]
    hinges: tuple[tuple[float, float], tuple[float, float]]
    annulus_from: str


@dataclass(frozen=True)
class EFResult:
    """Ejection fraction of one loop or one ED/ES pair.

    Attributes:
        ef: ejection fraction in % (mean over beats for a multi-beat loop).
        edv, esv: volumes of the first measured beat, ml with spacing else cubic pixels.
        ed_index, es_index: frame indices of that beat (0 and 1 for a pair).
        volumes: (T,) volume of every frame.
        beats_ef: EF in % of every measured beat.
        method: "area_length" or "simpson".
        unit: "ml" or "px^3".
    """

    ef: float
    edv: float
    esv: float
    ed_index: int
    es_index: int
    volumes: np.ndarray
    beats_ef: tuple[float, ...]
    method: str
    unit: str


@dataclass(frozen=True)
class CyclePhases:
    """End-diastole (area maxima) and end-systole (area minima) frame indices, ascending."""

    ed: tuple[int, ...]
    es: tuple[int, ...]


def _as_stack(labels: np.ndarray, what: str = "labels") -> np.ndarray:
    a = np.asarray(labels)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"{what} must be a label map (H, W) or a stack (T, H, W); got shape {a.shape}.")
    if a.shape[0] == 0 or a.shape[1] < 3 or a.shape[2] < 3:
        raise ValueError(f"{what} of shape {a.shape} is empty; need at least one frame of 3 x 3 pixels.")
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        raise ValueError(f"{what} must hold integer labels 0-3; got dtype {a.dtype}.")
    return a


def _spacing(spacing_mm: tuple[float, float] | None) -> tuple[float, float]:
    if spacing_mm is None:
        return 1.0, 1.0
    sr, sc = (float(s) for s in spacing_mm)
    if not (sr > 0 and sc > 0 and np.isfinite(sr) and np.isfinite(sc)):
        raise ValueError(f"spacing_mm must be two positive numbers (row, col) in mm; got {spacing_mm}.")
    return sr, sc


def _dilate(mask: np.ndarray) -> np.ndarray:
    """8-neighbourhood binary dilation of an (H, W) mask (no wrap-around)."""
    p = np.pad(mask, 1)
    h, w = mask.shape
    out = np.zeros_like(mask)
    for dr in (0, 1, 2):
        for dc in (0, 1, 2):
            out |= p[dr : dr + h, dc : dc + w]
    return out


def _extremes(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two points of an (N, 2) set farthest apart along its principal direction."""
    centred = points - points.mean(0)
    if len(points) < 2 or not np.any(centred):
        return points[0], points[-1]
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vt[0]
    return points[int(np.argmin(proj))], points[int(np.argmax(proj))]


def _geometry_mm(
    frame: np.ndarray, sr: float, sc: float, index: int
) -> tuple[LVGeometry, np.ndarray, np.ndarray, np.ndarray, float]:
    """Geometry of one (H, W) map plus cavity points in mm, base (mm), unit axis toward the apex, half pixel extent."""
    cavity = frame == _LV
    if not cavity.any():
        raise ValueError(f"label map {index} has no LV cavity (label {_LV}); cannot measure a volume.")
    rc = np.argwhere(cavity).astype(np.float64)
    pts = rc * (sr, sc)
    annulus_from = "axis"
    ann = np.zeros(0)
    la = frame == _LA
    if la.any():
        ann = np.argwhere(cavity & _dilate(la)).astype(np.float64)
        annulus_from = "la"
    if len(ann) < 2 and (frame == _MYO).any():
        inner = cavity & ~_erode4(cavity)
        ann = np.argwhere(inner & ~_dilate(frame == _MYO)).astype(np.float64)
        annulus_from = "myo"
    if len(ann) >= 2:
        h0, h1 = _extremes(ann * (sr, sc))
        base = (h0 + h1) / 2
        d = np.linalg.norm(pts - base, axis=1)
        apex = pts[int(np.argmax(d))]
        axis = apex - base
        norm = np.linalg.norm(axis)
        if norm == 0:
            raise ValueError(
                f"label map {index}: the LV cavity is a single pixel row at the annulus; cannot find an apex.")
        axis = axis / norm
    else:
        annulus_from = "axis"
        centred = pts - pts.mean(0)
        if len(pts) < 2 or not np.any(centred):
            axis = np.array([-1.0, 0.0])
        else:
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            axis = vt[0]
        if axis[0] > 0 or (axis[0] == 0 and axis[1] < 0):
            axis = -axis  # point toward the top of the image (the apex in an apical view)
        proj = centred @ axis
        apex = pts[int(np.argmax(proj))]
        base_pt = pts[int(np.argmin(proj))]
        base = pts.mean(0) + axis * proj.min()
        h0 = h1 = base_pt
        norm = float(proj.max() - proj.min())
    half = 0.5 * (abs(axis[0]) * sr + abs(axis[1]) * sc)
    length = float(norm + 2 * half)
    geo = LVGeometry(
        area=float(cavity.sum()) * sr * sc,
        length=length,
        apex=(float(apex[0] / sr), float(apex[1] / sc)),
        base=(float(base[0] / sr), float(base[1] / sc)),
        hinges=((float(h0[0] / sr), float(h0[1] / sc)), (float(h1[0] / sr), float(h1[1] / sc))),
        annulus_from=annulus_from,
    )
    return geo, pts, base, axis, half


def _erode4(mask: np.ndarray) -> np.ndarray:
    p = np.pad(mask, 1)
    return mask & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]


def lv_geometry(labels: np.ndarray, spacing_mm: tuple[float, float] | None = None) -> list[LVGeometry]:
    """Cavity area, long axis, apex and annulus of every frame.

    Args:
        labels: integer label map (H, W) or stack (T, H, W), CAMUS labels.
        spacing_mm: (row, col) pixel size in mm; ``None`` measures in pixels.

    Returns:
        One :class:`LVGeometry` per frame.
    """
    stack = _as_stack(labels)
    sr, sc = _spacing(spacing_mm)
    return [_geometry_mm(f, sr, sc, i)[0] for i, f in enumerate(stack)]


def lv_areas(labels: np.ndarray, spacing_mm: tuple[float, float] | None = None) -> np.ndarray:
    """LV cavity area of every frame: (T,) float64, mm^2 with spacing else pixels (zero where no cavity)."""
    stack = _as_stack(labels)
    sr, sc = _spacing(spacing_mm)
    return (stack == _LV).sum(axis=(1, 2)).astype(np.float64) * sr * sc


def area_length_volume(labels: np.ndarray, spacing_mm: tuple[float, float] | None = None) -> np.ndarray:
    """Single-plane area-length volume ``8 A^2 / (3 pi L)`` of every frame: (T,) in ml (with spacing) or px^3."""
    return lv_volumes(labels, spacing_mm, method="area_length")


def simpson_volume(
    labels: np.ndarray, spacing_mm: tuple[float, float] | None = None, discs: int = 20
) -> np.ndarray:
    """Single-plane method-of-discs volume of every frame: (T,) in ml (with spacing) or px^3."""
    return lv_volumes(labels, spacing_mm, method="simpson", discs=discs)


def lv_volumes(
    labels: np.ndarray,
    spacing_mm: tuple[float, float] | None = None,
    method: str = "area_length",
    discs: int = 20,
) -> np.ndarray:
    """LV volume of every frame.

    Args:
        labels: integer label map (H, W) or stack (T, H, W), CAMUS labels; every frame needs an LV cavity.
        spacing_mm: (row, col) pixel size in mm; volumes in ml when given, else in cubic pixels.
        method: "area_length" or "simpson".
        discs: number of discs for "simpson".

    Returns:
        (T,) float64 volumes.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if discs < 1:
        raise ValueError(f"discs must be a positive number; got {discs}.")
    stack = _as_stack(labels)
    sr, sc = _spacing(spacing_mm)
    scale = 1e-3 if spacing_mm is not None else 1.0  # mm^3 -> ml
    out = np.empty(len(stack))
    for i, frame in enumerate(stack):
        geo, pts, base, axis, half = _geometry_mm(frame, sr, sc, i)
        if method == "area_length":
            out[i] = 8.0 * geo.area**2 / (3.0 * np.pi * geo.length)
        else:
            # Distance of each pixel centre from the annulus line along the axis; pixels basal to it are outside.
            t = (pts - base) @ axis + half
            h = geo.length / discs
            keep = t >= 0
            slab = np.minimum((t[keep] / h).astype(np.int64), discs - 1)
            slab_area = np.bincount(slab, minlength=discs) * (sr * sc)
            d = slab_area / h
            out[i] = float(np.sum(np.pi / 4.0 * d**2 * h))
    return out * scale


def ejection_fraction(edv: float | np.ndarray, esv: float | np.ndarray) -> float | np.ndarray:
    """``(EDV - ESV) / EDV`` in %; EDV must be positive."""
    edv_a = np.asarray(edv, dtype=np.float64)
    if np.any(~(edv_a > 0)):
        raise ValueError(f"end-diastolic volume must be positive; got {edv}.")
    ef = 100.0 * (edv_a - np.asarray(esv, dtype=np.float64)) / edv_a
    return float(ef) if ef.ndim == 0 else ef


def check_requested_ef(ef: float | str, what: str = "The requested EF") -> float:
    """``ef`` as a float when it is an EF in % within :data:`EF_REQUEST_RANGE`.

    Raises:
        ValueError: one sentence naming ``what`` (e.g. ``"--ef"``), the range and the value, for anything else.
    """
    lo, hi = EF_REQUEST_RANGE
    try:
        value = float(ef)
    except (TypeError, ValueError):
        value = float("nan")
    if not lo <= value <= hi:  # also false for NaN
        raise ValueError(f"{what} must be an ejection fraction in % between {lo:g} and {hi:g}; got {ef}.")
    return value


def ef_from_pair(
    ed_labels: np.ndarray,
    es_labels: np.ndarray,
    spacing_mm: tuple[float, float] | None = None,
    method: str = "area_length",
) -> EFResult:
    """EF from one end-diastolic and one end-systolic label map (H, W) of the same size."""
    ed = _as_stack(ed_labels, "ED labels")
    es = _as_stack(es_labels, "ES labels")
    if ed.shape != es.shape or ed.shape[0] != 1:
        raise ValueError(f"ED and ES label maps must be single (H, W) maps of one size; got "
                         f"{ed.shape[1:] if ed.shape[0] == 1 else ed.shape} and "
                         f"{es.shape[1:] if es.shape[0] == 1 else es.shape}.")
    vols = lv_volumes(np.concatenate([ed, es]), spacing_mm, method)
    ef = ejection_fraction(vols[0], vols[1])
    return EFResult(ef, float(vols[0]), float(vols[1]), 0, 1, vols, (ef,), method, _unit(spacing_mm))


def _unit(spacing_mm) -> str:
    return "ml" if spacing_mm is not None else "px^3"


def detect_ed_es(area: np.ndarray, prominence: float = 0.25, smooth: int = 3) -> CyclePhases:
    """End-diastole and end-systole frames from an LV area (or volume) curve.

    ED frames are local maxima and ES frames local minima of the lightly smoothed curve whose prominence is at
    least ``prominence`` times the curve's range; the first and last frames count as candidates, so a single
    cycle that starts at ED is found. Maxima and minima alternate: between two ED frames the lowest minimum is
    kept, between two ES frames the highest maximum.

    Args:
        area: (T,) LV area or volume per frame, T >= 2.
        prominence: minimal peak prominence as a fraction of ``max - min`` (0-1).
        smooth: moving-average window in frames (odd, 1 = none).

    Returns:
        :class:`CyclePhases`; empty tuples when the curve is flat.
    """
    x = np.asarray(area, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2:
        raise ValueError(f"area must be a (T,) curve with at least 2 frames; got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("area curve contains NaN or infinite values.")
    if smooth < 1 or smooth % 2 == 0:
        raise ValueError(f"smooth must be an odd window of at least 1 frame; got {smooth}.")
    from scipy.signal import find_peaks

    k = smooth // 2
    if smooth > 1 and len(x) >= smooth:
        xs = np.convolve(np.pad(x, k, mode="edge"), np.ones(smooth) / smooth, mode="valid")
    else:
        xs = x
    span = xs.max() - xs.min()
    if span <= 1e-12 * max(1.0, abs(xs.max())):
        return CyclePhases((), ())
    lo, hi = xs.min() - span, xs.max() + span
    maxima, _ = find_peaks(np.concatenate([[lo], xs, [lo]]), prominence=prominence * span)
    minima, _ = find_peaks(-np.concatenate([[hi], xs, [hi]]), prominence=prominence * span)

    def refine(i: int, kind: str) -> int:  # move to the extreme of the raw curve within the smoothing window
        lo_i, hi_i = max(0, i - k), min(len(x), i + k + 1)
        seg = x[lo_i:hi_i]
        return lo_i + int(np.argmax(seg) if kind == "ed" else np.argmin(seg))

    events = sorted({(refine(int(i) - 1, "ed"), "ed") for i in maxima}
                    | {(refine(int(i) - 1, "es"), "es") for i in minima})
    # Enforce alternation: of consecutive events of one kind keep the most extreme (on the raw curve).
    merged: list[tuple[int, str]] = []
    for idx, kind in events:
        if merged and merged[-1][1] == kind:
            prev = merged[-1][0]
            better = x[idx] > x[prev] if kind == "ed" else x[idx] < x[prev]
            if better:
                merged[-1] = (idx, kind)
        else:
            merged.append((idx, kind))
    ed = tuple(i for i, kind in merged if kind == "ed")
    es = tuple(i for i, kind in merged if kind == "es")
    return CyclePhases(ed, es)


def ef_from_loop(
    labels: np.ndarray,
    spacing_mm: tuple[float, float] | None = None,
    method: str = "area_length",
    prominence: float = 0.25,
) -> EFResult:
    """EF of a labelled loop (T, H, W), every frame with an LV cavity.

    Beats are found on the volume curve with :func:`detect_ed_es`; each ED frame followed by an ES frame is one
    beat with ``EF = (V_ED - V_ES) / V_ED``; ``ef`` is the mean over beats. A curve without a detectable beat
    (too short or flat) falls back to the largest and smallest volume, in frame order as they come.
    """
    stack = _as_stack(labels)
    if len(stack) < 2:
        raise ValueError(f"a loop needs at least 2 labelled frames to measure EF; got {len(stack)}.")
    vols = lv_volumes(stack, spacing_mm, method)
    phases = detect_ed_es(vols, prominence=prominence)
    beats = []
    for e in phases.ed:
        later = [s for s in phases.es if s > e]
        if later:
            beats.append((e, later[0]))
    if not beats:
        beats = [(int(np.argmax(vols)), int(np.argmin(vols)))]
    efs = tuple(float(ejection_fraction(vols[e], vols[s])) for e, s in beats)
    e0, s0 = beats[0]
    return EFResult(float(np.mean(efs)), float(vols[e0]), float(vols[s0]), e0, s0, vols, efs, method, _unit(spacing_mm))
