"""Counterfactuals that keep the acquired image: the generator's motion applied to the echo's own frames at their
own resolution and frame rate (inference only).

The generator works on a 112-pixel, at most 16-frame latent grid, and its decoder loses the speckle. What it
predicts besides the latents is a displacement field per frame ("warp" prediction,
:meth:`~echolvfm_core.flows.MeanFlow.sample_motion`): where each point of the observed end-diastolic frame moves.
Rendering moves the acquired frames instead of decoding:

* a cine beat (the acquired frames of one cycle, ``N`` frames at the cine's frame rate): the generator is run with
  one noise draw at the requested EF (field ``D``) and at the beat's own measured EF (field ``S``); acquired frame
  ``j`` is warped by ``g (D - S)`` at its phase of the cycle (fields interpolated in time, upsampled in space):
  ``out_j(x) = src_j(x + g (D(x) - S(x)))``. The heart then contracts as the request asks while the speckle, the
  blood-pool flicker, the valves and the timing of the acquired beat stay those of the acquisition (speckle moves
  with the tissue, as speckle tracking assumes); at the beat's own EF the output is the input.
* a still (one frame): ``out_k(x) = src(x + g D_k(x))`` for the generated frames; the speckle moves with the tissue
  but does not decorrelate.

``g`` is the beat's motion gain, 1 unless :meth:`BeatRenderer.calibrate` chose another on the beat itself (the
generator learnt its motion on CAMUS hearts and can move another heart less than asked). The motion fades out
near the fan's edge (:data:`EDGE_TAPER`). Fields are kept per beat, seed and EF (:meth:`BeatRenderer.prefetch`
fills a slider's range at once), so a slider move only warps. A rendered beat's EF is read on its key frames
(:func:`key_frames`, :func:`beat_ef`).

What warping cannot add (texture that appears, e.g. a valve opening more) is not rendered: the generator's latent
residual is not used at display resolution. Warps use Lanczos interpolation (8 x 8 taps), which keeps the
speckle's fine texture: on the 120-frame cine's beats the high-frequency energy of a frame moved by a smooth
random field keeps 97 % of its share with Lanczos, 89 % with bicubic and 58 % with bilinear interpolation.

    renderer = BeatRenderer(pipe.flow, pipe.codec)
    beat = renderer.prepare(display_frames, model_frames, fps=30, mask=mask, source_ef=58.0)
    out = renderer.render(beat, ef=35.0, seed=0)      # out.frames (N, S, S) at the input's resolution
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
from scipy import ndimage

from ..flows import Conditioning, MeanFlow

__all__ = ["CALIBRATION_GAINS", "BeatRenderer", "PreparedBeat", "RenderedBeat", "beat_ef", "key_frames",
           "to_model_grid"]

#: Width, as a share of the side, of the band inside the fan's edge where the motion fades out.
EDGE_TAPER = 0.025

#: Motion gains :meth:`BeatRenderer.calibrate` chooses from.
CALIBRATION_GAINS = (0.75, 1.0, 1.25, 1.5, 1.75, 2.0)


@dataclass
class PreparedBeat:
    """One beat of a cine (or a still) made ready for rendering.

    Attributes:
        display: (N, S, S) float32 grey levels in [0, 1], the acquired frames at display resolution, 0 outside the fan.
        mask: (S, S) bool, the fan at display resolution.
        fps: frame rate of ``display`` (frames per second).
        latents: (1, C, L, h, w) latents of the beat resampled in time to L model frames.
        observed: position, on the L-frame model clip, of the end-diastolic frame the generator observes.
        periodic: the beat is a whole cycle (the frame after the last one is the next end-diastole); a still is
            rendered as one whole cycle from its frame.
        source_ef: EF (%) measured on the beat; None for a still.
        still: a single acquired frame (the output has ``frames`` frames of it, moved).
        frames: number of output frames.
        es: the beat's end-systolic frame (smallest LV area), or None; when given, the generated cycle is
            re-timed so that its own end-systole falls on this frame (see :func:`_phase_positions`).
        gain: factor on the motion added to the acquired frames, ``D - S`` (``D`` for a still); 1 by default,
            chosen per beat by :meth:`BeatRenderer.calibrate`.
        filled: ``display`` with each pixel outside the fan set to its nearest pixel inside (what the warp samples,
            so that tissue moved inward at the fan's edge brings texture, not the black outside; the output is cut
            to the fan again).
        taper: (S, S, 1) float32, 0 on the fan's edge rising to 1 at :data:`EDGE_TAPER` of the side inside it: the
            motion is faded out there, so the sector's edge (the scanner's, with its darker border and the
            preprocessing's stepped cut) stays where it was acquired instead of filling with stretched tissue.
        fields: the generator's fields computed so far, per (seed, EF) (:meth:`BeatRenderer.field`): the one at
            ``source_ef`` serves every request, and :meth:`BeatRenderer.prefetch` can fill a slider's whole range
            at once, so that a slider move then only warps.
    """

    display: np.ndarray
    mask: np.ndarray
    fps: float
    latents: torch.Tensor
    observed: int
    periodic: bool
    source_ef: float | None
    still: bool
    frames: int
    es: int | None = None
    gain: float = 1.0
    fields: dict[tuple[int, float], np.ndarray] = field(default_factory=dict, repr=False)
    filled: np.ndarray = field(init=False, repr=False)
    taper: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self.filled = _fill_outside(self.display, self.mask)
        self.taper = _edge_taper(self.mask)

    @property
    def length(self) -> int:
        """Frames of the model clip (L)."""
        return int(self.latents.shape[2])

    @property
    def side(self) -> int:
        return int(self.display.shape[-1])


@dataclass
class RenderedBeat:
    """A rendered counterfactual beat.

    Attributes:
        frames: (N, S, S) float32 grey levels in [0, 1] at the input's resolution and frame rate.
        fps: frame rate.
        requested_ef: EF asked for, in %.
        seed: noise seed of the generator.
        displacement: (N, 2, h, w) float32, the field (latent pixels) each output frame was warped by, before
            upsampling to the display grid.
        es: the output frame of end-systole: the acquired beat's (where the generated one is put), or for a still
            the generated cycle's (its largest displacement); None when unknown.
        timings_ms: "flow" (the generator), "warp" (rendering).
    """

    frames: np.ndarray
    fps: float
    requested_ef: float
    seed: int
    displacement: np.ndarray
    es: int | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


def to_model_grid(frames: np.ndarray, size: int) -> np.ndarray:
    """(T, S, S) display frames -> (T, size, size) on the model grid, by area averaging as :func:`preprocess` does."""
    if frames.shape[-1] == size:
        return np.ascontiguousarray(frames, dtype=np.float32)
    interp = cv2.INTER_AREA if frames.shape[-1] > size else cv2.INTER_LINEAR
    out = np.stack([cv2.resize(f, (size, size), interpolation=interp) for f in frames]).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


class BeatRenderer:
    """Render EF counterfactuals of a beat at the input's resolution and frame rate (see the module docstring).

    Args:
        flow: a :class:`~echolvfm_core.flows.MeanFlow` with ``prediction="warp"`` (its network returns a field).
        codec: the :class:`~echolvfm_core.models.vae.EchoCodec` the generator was trained with (encodes the model
            clip it observes).
    """

    def __init__(self, flow: MeanFlow, codec):
        if not isinstance(flow, MeanFlow) or flow.config.prediction != "warp":
            raise ValueError('Texture-preserving rendering needs a MeanFlow generator with prediction="warp".')
        self.flow = flow.eval()
        self.codec = codec

    @property
    def grid(self) -> int:
        """Side of the model grid in pixels (112 for the bundled models)."""
        return int(self.flow.net.config.sample_size) * int(self.codec.downsample)

    @property
    def max_frames(self) -> int:
        return int(self.flow.net.config.max_frames)

    @torch.no_grad()
    def prepare(self, display: np.ndarray, mask: np.ndarray, fps: float, ed: int = 0,
                source_ef: float | None = None, periodic: bool = True, still_frames: int | None = None,
                es: int | None = None) -> PreparedBeat:
        """Make a beat ready: resample it to the model clip, encode it once.

        Args:
            display: (N, S, S) float32 in [0, 1], the beat's acquired frames (N >= 2), or one still (N = 1).
            mask: (S, S) bool fan.
            fps: frame rate of ``display``.
            ed: the end-diastolic frame of ``display`` (the one the generator observes).
            source_ef: the beat's own measured EF in % (required for a beat, ignored for a still).
            periodic: the beat is one whole cycle (start at ED, stop before the next ED).
            still_frames: output frames for a still (default: the generator's ``max_frames``).
            es: the beat's end-systolic frame, when known (e.g. the smallest LV area); must come after ``ed``.
        """
        display = np.asarray(display, dtype=np.float32)
        if display.ndim != 3 or display.shape[1] != display.shape[2]:
            raise ValueError(f"display must be square frames (N, S, S); got shape {display.shape}.")
        if mask.shape != display.shape[1:]:
            raise ValueError(f"mask must be {display.shape[1:]}; got {mask.shape}.")
        if not fps > 0:
            raise ValueError(f"fps must be positive; got {fps}.")
        n = display.shape[0]
        still = n == 1
        if still:
            frames = int(still_frames or self.max_frames)
            length = min(frames, self.max_frames)
            clip = np.repeat(to_model_grid(display, self.grid), length, axis=0)
            observed, source_ef = 0, None
        else:
            if source_ef is None:
                raise ValueError("A beat needs its own measured EF (source_ef) to be re-timed to another EF.")
            if not 0 <= ed < n:
                raise ValueError(f"ed must be a frame of the beat (0-{n - 1}); got {ed}.")
            frames = n
            length = min(n, self.max_frames)
            pos = np.arange(length) * n / length
            clip = _sample_time(to_model_grid(display, self.grid), pos)
            observed = int(min(length - 1, round(ed * length / n)))
            if es is not None and not ed < es < n:
                raise ValueError(f"es must be a frame after the end-diastolic one ({ed}) in the beat; got {es}.")
        latents = self.codec.encode(torch.from_numpy(np.ascontiguousarray(clip))[None]).float()
        return PreparedBeat(display=display, mask=np.asarray(mask, dtype=bool), fps=float(fps), latents=latents,
                            observed=observed, periodic=bool(periodic or still), source_ef=source_ef,
                            still=still, frames=frames, es=None if still or observed != 0 else es)

    @torch.no_grad()
    def motion(self, beat: PreparedBeat, efs: list[float], seed: int) -> np.ndarray:
        """(len(efs), 2, L, h, w) displacement fields (latent pixels) at the requested EFs, one noise draw for all."""
        dev = next(self.flow.net.parameters()).device
        dtype = next(self.flow.net.parameters()).dtype
        lat = beat.latents.to(dev, dtype)
        obs = torch.zeros(1, beat.length, dtype=torch.bool, device=dev)
        obs[0, beat.observed] = True
        k = len(efs)
        cond = Conditioning.from_latents(lat, obs, torch.ones_like(obs), torch.tensor([0.0], device=dev)).repeat(k)
        cond.ef = torch.tensor([float(e) for e in efs], device=dev, dtype=dtype)
        gen = torch.Generator(dev).manual_seed(int(seed))
        noise = torch.randn(cond.cond[:1].shape, generator=gen, device=dev, dtype=dtype).expand_as(cond.cond)
        _, disp = self.flow.sample_motion(cond, noise=noise.contiguous())
        return disp.float().cpu().numpy()

    def render(self, beat: PreparedBeat, ef: float, seed: int = 0) -> RenderedBeat:
        """The beat's heart at EF ``ef`` (%), at the beat's resolution and frame rate."""
        t0 = time.perf_counter()
        fields = self.field(beat, ef, seed)
        if not beat.still:
            self.field(beat, beat.source_ef, seed)
        t1 = time.perf_counter()
        out = self._render_fields(beat, fields, seed, ef)
        out.timings_ms = {"flow": (t1 - t0) * 1e3, "warp": (time.perf_counter() - t1) * 1e3}
        return out

    def _render_fields(self, beat: PreparedBeat, fields: np.ndarray, seed: int, ef: float) -> RenderedBeat:
        """The beat moved by the generator's (2, L, h, w) ``fields`` at the requested EF ``ef``."""
        if beat.still:
            delta, pos = beat.gain * fields, _phase_positions(beat.frames, fields.shape[1])
            es = min(beat.frames - 1, round(_contraction_peak(fields) * beat.frames / fields.shape[1]))
        else:
            source = self.field(beat, beat.source_ef, seed)
            delta = beat.gain * (fields - source)
            pos = _phase_positions(beat.frames, delta.shape[1], beat.es, _contraction_peak(source))
            es = beat.es
        per_frame = _fields_per_frame(delta, pos, beat.periodic)  # (N, 2, h, w)
        return RenderedBeat(frames=self._warp(beat, per_frame), fps=beat.fps, requested_ef=float(ef), seed=int(seed),
                            displacement=per_frame, es=es)

    def calibrate(self, beat: PreparedBeat, measure_ef: Callable[[np.ndarray], float],
                  requests: Sequence[float] = (30.0, 70.0), gains: Sequence[float] = CALIBRATION_GAINS,
                  seed: int = 0) -> dict[float, float]:
        """Choose the beat's motion gain (``beat.gain``) so that its renderings measure the EF they are asked for.

        The generator's fields were learnt on CAMUS hearts; on another heart the motion it adds to the acquired beat
        (``D - S``, or ``D`` for a still) can move the measured EF by less (or more) than asked. Each gain is tried
        at each request on the beat resampled to the model grid (a few milliseconds a rendering) and measured by
        ``measure_ef`` on the rendering's :func:`key_frames` (a callable: (K, grid, grid) frames in [0, 1] -> EF in
        %, e.g. the segmenter's); the gain with the smallest
        mean absolute error is kept. Only the acquired frames and the instrument are used, no label: the same on any
        input.

        Returns:
            gain -> mean absolute error (EF points) over ``requests`` (inf where the instrument failed).
        """
        small = replace(beat, display=to_model_grid(beat.display, self.grid), gain=1.0,
                        mask=cv2.resize(beat.mask.astype(np.uint8), (self.grid, self.grid),
                                        interpolation=cv2.INTER_NEAREST) > 0)
        self.prefetch(beat, [*requests, *([] if beat.still else [beat.source_ef])], seed)  # shared with ``small``
        errors = {}
        for gain in gains:
            small.gain, err = float(gain), []
            for ef in requests:
                try:
                    out = self._render_fields(small, self.field(beat, ef, seed), seed, ef)
                    key = key_frames(len(out.frames), out.es, beat.fps)
                    err.append(abs(measure_ef(out.frames if key is None else out.frames[list(key)]) - ef))
                except ValueError:
                    err.append(float("inf"))
            errors[float(gain)] = float(np.mean(err))
        beat.gain = min(errors, key=errors.get)
        return errors

    def field(self, beat: PreparedBeat, ef: float, seed: int) -> np.ndarray:
        """(2, L, h, w) the generator's field at EF ``ef`` for noise ``seed``, computed once per beat."""
        key = (int(seed), round(float(ef), 3))
        if key not in beat.fields:
            beat.fields[key] = self.motion(beat, [ef], seed)[0]
        return beat.fields[key]

    def prefetch(self, beat: PreparedBeat, efs: Sequence[float], seed: int = 0, batch: int = 16) -> None:
        """Compute the fields of many EFs for ``seed`` at once, ``batch`` to a network call (e.g. every whole EF of
        the app's slider when a beat is first shown: about a second on 2 CPU cores, then a slider move only warps)."""
        todo = sorted({round(float(e), 3) for e in efs} - {ef for s, ef in beat.fields if s == int(seed)})
        for i in range(0, len(todo), batch):
            chunk = todo[i : i + batch]
            for ef, f in zip(chunk, self.motion(beat, chunk, seed)):
                beat.fields[(int(seed), ef)] = f

    @staticmethod
    def _warp(beat: PreparedBeat, per_frame: np.ndarray) -> np.ndarray:
        side = beat.side
        grid = np.dstack(np.meshgrid(np.arange(side, dtype=np.float32), np.arange(side, dtype=np.float32)))
        # (N, h, w, 2): x, y in display pixels
        fields = np.ascontiguousarray(per_frame.transpose(0, 2, 3, 1)) * (side / per_frame.shape[-1])
        mask = beat.mask.astype(np.float32)
        out = np.empty((beat.frames, side, side), dtype=np.float32)
        for j in range(beat.frames):  # in place, one frame at a time (it stays in the cache)
            where = cv2.resize(fields[j], (side, side), interpolation=cv2.INTER_LINEAR)
            where *= beat.taper
            where += grid
            # Fixed-point maps (1/32 pixel, OpenCV's interpolation table step) spare remap a conversion per pixel.
            xy, frac = cv2.convertMaps(where, None, cv2.CV_16SC2)
            cv2.remap(beat.filled[0 if beat.still else j], xy, frac, cv2.INTER_LANCZOS4, dst=out[j],
                      borderMode=cv2.BORDER_CONSTANT)
            np.clip(out[j], 0.0, 1.0, out=out[j])
            out[j] *= mask
        return out


def key_frames(n: int, es: int | None, fps: float) -> tuple[int, ...] | None:
    """Frames of an ``n``-frame beat (starting at end-diastole) that its EF is read from: the end-diastolic frame
    (0) and those within 80 ms of the acquired end-systole ``es``, where the rendering puts the generated one; None
    (read every frame) without an end-systole.

    One beat has one ED and one ES: a whole-loop reading of a rendered beat can also find a second, spurious
    "beat" in the dip of the area curve in diastasis and average it in (it did on the built-in cine at low
    requested EF, flattering the adherence by up to 12 EF points), and costs six times the segmentation.
    """
    if es is None or not 0 < es < n:
        return None
    half = max(1, round(0.08 * fps))
    return (0, *range(max(1, es - half), min(n, es + half + 1)))


def beat_ef(seg, frames: np.ndarray, key: tuple[int, ...] | None) -> float:
    """EF (%) of a beat on the model grid, (N, S, S) in [0, 1], read by the segmenter ``seg``
    (:class:`~echolvfm_core.estimators.segmentation.SegmentationEF`) on its :func:`key_frames` (all when None)."""
    return float(seg.measure(frames if key is None else frames[list(key)]).ef)


def _edge_taper(mask: np.ndarray) -> np.ndarray:
    """(S, S, 1) float32 weight of the motion: distance to the fan's edge over ``EDGE_TAPER * S``, at most 1."""
    if mask.all() or not mask.any():
        return np.ones(mask.shape + (1,), dtype=np.float32)
    width = max(1.0, EDGE_TAPER * mask.shape[0])
    return np.minimum(ndimage.distance_transform_edt(mask) / width, 1.0).astype(np.float32)[..., None]


def _fill_outside(frames: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, S, S) frames with every pixel outside ``mask`` replaced by the nearest pixel inside it."""
    if mask.all() or not mask.any():
        return frames
    _, (iy, ix) = ndimage.distance_transform_edt(~mask, return_indices=True)
    return frames[:, iy, ix]


def _sample_time(frames: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Frames at fractional positions ``pos`` (linear interpolation, the last frame held)."""
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, len(frames) - 1)
    w = (pos - lo).astype(np.float32)[:, None, None]
    return ((1 - w) * frames[lo] + w * frames[hi]).astype(np.float32)


def _contraction_peak(fields: np.ndarray) -> int:
    """Clip frame of the largest mean displacement of (2, L, h, w) fields: the generated end-systole."""
    return int(np.argmax(np.sqrt((fields**2).sum(0)).mean(axis=(1, 2))))


def _phase_positions(n: int, length: int, es: int | None = None, es_clip: int | None = None) -> np.ndarray:
    """Clip position (0 <= p < L, fractional) of each of ``n`` output frames.

    Without ``es``: uniform, frame j at j * L / n. With the acquired beat's end-systolic frame ``es`` and the
    generated one ``es_clip``: piecewise linear, so that frame 0 -> 0, ``es`` -> ``es_clip`` and the end of the
    beat -> L; the acquired beat's own timing of systole and diastole is kept and the counterfactual's motion is
    read at the matching phase of the generated cycle.
    """
    j = np.arange(n, dtype=np.float64)
    if es is None or es_clip is None or not 0 < es < n or not 0 < es_clip < length:
        return j * length / n
    return np.where(j <= es, j / es * es_clip, es_clip + (j - es) / (n - es) * (length - es_clip))


def _fields_per_frame(fields: np.ndarray, pos: np.ndarray, periodic: bool) -> np.ndarray:
    """(2, L, h, w) fields on the L-frame model clip -> (n, 2, h, w) at the clip positions ``pos`` (n,).

    Fields are interpolated linearly between clip frames. Past the last clip frame a periodic beat heads back to
    its first frame (the next end-diastole), a loop that is not a whole cycle holds its last field.
    """
    ext = np.concatenate([fields, fields[:, :1] if periodic else fields[:, -1:]], axis=1)
    pos = np.clip(np.asarray(pos, dtype=np.float64), 0.0, fields.shape[1] - 1e-6)
    lo = np.floor(pos).astype(int)
    w = (pos - lo).astype(np.float32)[:, None, None, None]
    out = (1 - w) * ext[:, lo].transpose(1, 0, 2, 3) + w * ext[:, lo + 1].transpose(1, 0, 2, 3)
    return out.astype(np.float32)
