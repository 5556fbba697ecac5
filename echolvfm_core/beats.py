"""Heart beats of a cine: end-diastolic frames from the LV area curve, with an image-periodicity fallback.

A beat runs from one end-diastolic (ED) frame up to, not including, the next one, as beat-to-beat tools count it.

    beats = find_beats(frames, fps, lv_area=seg.measure(frames).lv_area)
    beats.heart_rate_bpm, beats.beats[0].start, beats.beats[0].stop

When the LV area curve shows fewer than two ED frames (a cine of one beat, a segmenter that failed), the cycle
length is read from the images themselves: the lag, between 0.3 and 2 s, at which the frames look most like
the frames that many frames earlier (autocorrelation of the mean-removed loop inside the fan).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from . import ef as efm

__all__ = ["MAX_CYCLE_S", "MIN_CYCLE_S", "Beat", "BeatSet", "beat_summary", "find_beats", "image_period"]

#: Shortest and longest cardiac cycle accepted, in seconds (200 and 30 beats per minute).
MIN_CYCLE_S, MAX_CYCLE_S = 0.3, 2.0


@dataclass(frozen=True)
class Beat:
    """One cardiac cycle of a cine: frames ``start`` to ``stop`` (exclusive; the next cycle's first frame).

    ``ed``: its end-diastolic frame (``start`` for a detected beat; inside a loop taken whole, the largest LV area);
    ``es``: the end-systolic frame inside it (smallest LV area), None without an area curve.
    """

    start: int
    stop: int
    ed: int
    es: int | None = None

    @property
    def n_frames(self) -> int:
        return self.stop - self.start

    def to_dict(self) -> dict:
        return {"start": self.start, "stop": self.stop, "ed": self.ed, "es": self.es, "frames": self.n_frames}


@dataclass(frozen=True)
class BeatSet:
    """The beats of a cine and how they were found.

    Attributes:
        beats: whole beats in frame order (at least one; a cine without a detectable cycle is one "beat" of all its
            frames, its ED frame the one of largest LV area).
        fps: frame rate of the cine.
        method: "lv_area" (ED frames on the LV area curve), "periodicity" (cycle length from the images) or
            "whole_loop" (no cycle found: the loop is taken as one beat).
        n_frames: frames of the cine.
    """

    beats: tuple[Beat, ...]
    fps: float
    method: str
    n_frames: int

    @property
    def cycle_frames(self) -> float:
        """Median beat length in frames."""
        return float(np.median([b.n_frames for b in self.beats]))

    @property
    def heart_rate_bpm(self) -> float | None:
        """Heart rate from the median beat length; None when the loop was taken as one beat without a cycle."""
        if self.method == "whole_loop":
            return None
        return 60.0 * self.fps / self.cycle_frames

    def to_dict(self) -> dict:
        hr = self.heart_rate_bpm
        return {
            "method": self.method,
            "heart_rate_bpm": None if hr is None else round(hr, 1),
            "beats": [b.to_dict() for b in self.beats],
        }


def image_period(frames: np.ndarray, fps: float, mask: np.ndarray | None = None) -> float | None:
    """Cycle length in frames from the images: the lag in [0.3, 2] s of highest autocorrelation, or None.

    The loop (T, H, W) is shrunk to at most 32 x 32, mean-removed per pixel inside ``mask``, and the correlation
    between frames ``lag`` apart is averaged over the loop; the first local maximum over the allowed lags that
    climbs more than 0.1 above the lowest correlation at shorter lags is the cycle (later ones are its multiples;
    a slow drift of the probe lowers the whole curve, not that rise), refined to a fraction of a frame by a parabola
    through it and its neighbours. None when the loop is shorter than 1.5 allowed cycles or no maximum rises enough.
    """
    x = np.asarray(frames, dtype=np.float32)
    t = x.shape[0]
    lo, hi = int(np.ceil(MIN_CYCLE_S * fps)), int(np.floor(MAX_CYCLE_S * fps))
    hi = min(hi, int(t / 1.5))
    if hi < max(lo, 2) + 1:
        return None
    step = max(1, max(x.shape[1:]) // 32)
    small = x[:, ::step, ::step]
    if mask is not None:
        small = small[:, np.asarray(mask, dtype=bool)[::step, ::step]]
    small = small.reshape(t, -1)
    small = small - small.mean(0, keepdims=True)
    norms = np.linalg.norm(small, axis=1) + 1e-8
    unit = small / norms[:, None]
    corr = np.array([np.mean(np.sum(unit[lag:] * unit[:-lag], axis=1)) for lag in range(1, hi + 2)])
    best_lag = None
    for lag in range(max(lo, 2), hi + 1):
        c = corr[lag - 1]
        rise = c - corr[: lag - 1].min()  # how far the curve climbs back after decorrelating
        if c > corr[lag - 2] and c >= corr[lag] and rise > 0.1:
            best_lag = lag
            break
    if best_lag is None:
        return None
    a, b, c = corr[best_lag - 2], corr[best_lag - 1], corr[best_lag]
    denom = a - 2 * b + c
    shift = 0.5 * (a - c) / denom if denom < 0 else 0.0
    return float(best_lag + np.clip(shift, -0.5, 0.5))


def find_beats(frames: np.ndarray, fps: float, lv_area: np.ndarray | None = None,
               mask: np.ndarray | None = None) -> BeatSet:
    """The beats of a cine (T, H, W) at ``fps``: ED frames on ``lv_area`` when it shows at least two, else the
    image period from :func:`image_period` laid from the largest-area (or first) frame.

    Args:
        frames: float (T, H, W) grey levels, any size (the model grid is enough).
        fps: frames per second (> 0).
        lv_area: (T,) LV cavity area per frame (e.g. the segmenter's), 0 where no cavity was found; optional.
        mask: (H, W) bool, the ultrasound fan, for the periodicity fallback.
    """
    if not fps > 0:
        raise ValueError(f"fps must be positive; got {fps}.")
    t = int(np.asarray(frames).shape[0])
    if t < 2:
        raise ValueError("Beat detection needs a loop of at least 2 frames; the input is a single still frame.")
    area = None if lv_area is None else np.asarray(lv_area, dtype=np.float64)
    if area is not None and area.shape != (t,):
        raise ValueError(f"lv_area must have one value per frame ({t}); got shape {area.shape}.")
    min_gap = MIN_CYCLE_S * fps
    if area is not None and (area > 0).sum() >= 4:
        phases = efm.detect_ed_es(np.where(area > 0, area, area[area > 0].min()))
        ed = [e for i, e in enumerate(phases.ed) if i == 0 or e - phases.ed[i - 1] >= min_gap]
        beats = _whole([Beat(a, b, a, _es(area, a, b)) for a, b in pairwise(ed) if b - a <= MAX_CYCLE_S * fps], t)
        if beats:
            return BeatSet(tuple(beats), float(fps), "lv_area", t)
    period = image_period(frames, fps, mask)
    if period is not None:
        start = int(np.argmax(area[: round(period)])) if area is not None and area.max() > 0 else 0
        stops = [round(e) for e in np.arange(start, t + 1e-6, period)]
        beats = [Beat(a, b, a, None if area is None else _es(area, a, b)) for a, b in pairwise(stops)
                 if b <= t and b > a]
        if beats:
            return BeatSet(tuple(beats), float(fps), "periodicity", t)
    ed_frame = int(np.argmax(area)) if area is not None and area.max() > 0 else 0
    es = None if area is None else _es(area, 0, t)
    return BeatSet((Beat(0, t, ed_frame, es),), float(fps), "whole_loop", t)


def _whole(beats: list[Beat], t: int) -> list[Beat]:
    """Drop beats cut by the cine's start or end (the curve's first and last frames count as ED candidates): one
    that runs from frame 0 to the last frame, and, among several, one that touches either end and is shorter than
    0.8 of the median beat."""
    beats = [b for b in beats if not (b.start == 0 and b.stop >= t - 1)]  # both ends are only the cine's ends
    if len(beats) < 2:
        return beats
    median = float(np.median([b.n_frames for b in beats]))
    return [b for b in beats if not ((b.start == 0 or b.stop >= t - 1) and b.n_frames < 0.8 * median)]


def _es(area: np.ndarray, start: int, stop: int) -> int | None:
    """Frame of smallest positive LV area in [start, stop), or None when none has a cavity."""
    seg = area[start:stop]
    if not (seg > 0).any():
        return None
    return start + int(np.argmin(np.where(seg > 0, seg, np.inf)))


def beat_summary(beats: BeatSet, efs: list[float | None]) -> dict:
    """JSON-ready beat-to-beat report: the beats (with the EF measured on each, in %), the heart rate, and the mean
    and standard deviation (ddof 1; None for one beat) of the EFs that were measured."""
    if len(efs) != len(beats.beats):
        raise ValueError(f"one EF per beat expected ({len(beats.beats)}); got {len(efs)}.")
    ok = [float(e) for e in efs if e is not None]
    out = beats.to_dict()
    out["beats"] = [{**b.to_dict(), "ef": None if e is None else round(float(e), 2)}
                    for b, e in zip(beats.beats, efs)]
    out["ef_mean"] = round(float(np.mean(ok)), 2) if ok else None
    out["ef_sd"] = round(float(np.std(ok, ddof=1)), 2) if len(ok) > 1 else None
    out["beats_measured"] = len(ok)
    return out
