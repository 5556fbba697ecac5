"""The model side of EchoLVFM Studio, free of Gradio: load an echo, make EF counterfactuals, measure them.

:class:`StudioEngine` owns the bundled models (loaded once, lazily, on first use, under a lock) and turns user
requests into plain dataclasses (:class:`LoadedCase`, :class:`CounterfactualResult`) plus files written into a
folder the caller chooses (the session's folder in the app). Every feature that needs a model that is not bundled
raises :class:`ModelUnavailable` with a one-sentence message instead of crashing; loading and preprocessing work
without any model.

Data flow (one slider move): cached latents of the case (B=1, C, T, h, w) -> one-step generator at the requested
EF -> VAE decoder -> (optional rejection sampling / LV contours by the segmenter) -> side-by-side H.264 MP4.
"""
from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from echolvfm_core.echo import Echo, EchoLoadError
from echolvfm_core.ef import EF_REQUEST_RANGE
from echolvfm_core.io import to_uint8, write_mp4

from . import video as vid

__all__ = [
    "EF_RANGE",
    "MODEL_DESCRIPTIONS",
    "OBSERVED_MODES",
    "CounterfactualResult",
    "LoadedCase",
    "Measurement",
    "ModelUnavailable",
    "StudioEngine",
    "counterfactual_caption",
]

log = logging.getLogger(__name__)

#: How the observed (kept) frames of the original are chosen; see :meth:`StudioEngine.observed_frames`.
OBSERVED_MODES = {
    "ed": "End-diastole only",
    "first_k": "First k frames",
    "every_other": "Every other frame (temporal upsampling)",
    "all": "All frames",
}

#: Sub-folders of the models folder and what they hold, as named in messages.
MODEL_DESCRIPTIONS = {
    "vae": "video autoencoder",
    "generator": "generator",
    "segmenter": "LV segmenter",
    "ef_regressor": "EF posterior model",
}

#: Requestable EF range in % (the library's, shared with the CLI).
EF_RANGE = EF_REQUEST_RANGE

#: Side of each panel of the side-by-side video, in pixels: twice the 112-pixel model grid (even, as H.264 needs).
PANEL_SIZE = 224
#: Largest side (pixels) of the display copy; inputs whose fan crop is larger are shown at this size.
MAX_DISPLAY = 640


def counterfactual_caption(requested_ef: float, measured_ef: float | None) -> str:
    """The caption burned into a counterfactual: the synthetic mark, the EF asked for and the EF the segmenter
    measures on the result (both in %; "unmeasured" without one). Short enough for a 224-pixel panel."""
    measured = "unmeasured" if measured_ef is None else f"{measured_ef:.0f} measured"
    return f"SYNTHETIC EF {requested_ef:.0f} asked, {measured}"


class ModelUnavailable(RuntimeError):
    """A feature needs a model that is not in the models folder; the message says which and where."""


@dataclass
class Measurement:
    """EF of one loop by the two instruments; fields are ``None`` when the instrument is not bundled.

    Attributes:
        ef: EF by LV segmentation (area-length), in %.
        lv_area: (T,) LV cavity area per frame, in ``area_unit`` ("mm^2" with pixel spacing, else "px").
        lv_masks: (T, S, S) bool LV cavity masks (for contours).
        ed_index / es_index: end-diastolic / end-systolic frame of the first measured beat.
        posterior: the EF posterior of the diffusion-regression estimator (``samples``, ``mean``, ``sd``, ``p05``,
            ``p95``, EF in %).
        notes: why an instrument gave nothing.
        key_frames: the frames the segmentation EF was read on, when not all (see
            :meth:`StudioEngine.measure_frames`); ``ed_index`` and ``es_index`` are among them.
    """

    ef: float | None = None
    lv_area: np.ndarray | None = None
    area_unit: str = "px"
    lv_masks: np.ndarray | None = None
    ed_index: int | None = None
    es_index: int | None = None
    posterior: Any | None = None
    notes: list[str] = field(default_factory=list)
    key_frames: tuple[int, ...] | None = None

    def summary(self) -> dict:
        """JSON-ready numbers (EF in %)."""
        post = self.posterior
        return {
            "segmentation_ef": None if self.ef is None else round(float(self.ef), 2),
            "posterior_mean": None if post is None else round(float(post.mean), 2),
            "posterior_p05": None if post is None else round(float(post.p05), 2),
            "posterior_p95": None if post is None else round(float(post.p95), 2),
            "ed_index": self.ed_index,
            "es_index": self.es_index,
        }


def _rolled(m: Measurement, shift: int) -> Measurement:
    """The measurement of the same loop started ``shift`` frames later (per-frame arrays and phase indices moved)."""
    n = len(m.lv_area) if m.lv_area is not None else None

    def roll(a):
        return None if a is None else np.roll(a, -shift, axis=0)

    def phase(i):
        return None if i is None or n is None else (int(i) - shift) % n

    return replace(m, lv_area=roll(m.lv_area), lv_masks=roll(m.lv_masks), ed_index=phase(m.ed_index),
                   es_index=phase(m.es_index))


@dataclass
class CineView:
    """The acquired loop at its own resolution and frame rate, and its beats.

    Attributes:
        display: float32 (T, S, S) in [0, 1], the cropped fan at the input's resolution (at most
            :data:`MAX_DISPLAY` pixels a side), 0 outside the fan.
        grid: float32 (T, 112, 112), the same frames on the model grid (what the instruments measure).
        mask: (S, S) bool fan.
        fps: the input's frame rate.
        beats: :class:`~echolvfm_core.beats.BeatSet` found on the LV area curve (or by image periodicity).
        prepared: per beat index, the beat made ready for rendering (filled on first use).
        beat_measurements: per beat index, the segmenter's measurement of the acquired beat.
        panels: per beat index, its acquired frames as uint8 (the left panel of every counterfactual's video).
        labels: uint8 (T, 112, 112), the segmenter's labels of ``grid`` (the pass that found the beats; each beat's
            measurement reads its slice), or None without a segmenter.
    """

    display: np.ndarray
    grid: np.ndarray
    mask: np.ndarray
    fps: float
    beats: Any
    prepared: dict = field(default_factory=dict)
    beat_measurements: dict = field(default_factory=dict)
    labels: np.ndarray | None = None
    panels: dict = field(default_factory=dict)

    def beat_frames(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(display, grid) frames of beat ``index``, starting at its end-diastole. A loop without a detected cycle
        (shorter than two beats, e.g. the 30-frame sample) is rotated to start at its largest-LV-area frame and
        played as one cycle, as its last frame runs on into its first."""
        return self.beat_slice(self.display, index), self.beat_slice(self.grid, index)

    def beat_slice(self, per_frame: np.ndarray, index: int) -> np.ndarray:
        """The frames of beat ``index`` of any per-frame array of the loop (see :meth:`beat_frames`)."""
        b = self.beats.beats[index]
        if self.beats.method == "whole_loop":
            return np.roll(per_frame, -b.ed, axis=0)
        return per_frame[b.start : b.stop]

    def beat_choices(self) -> list[tuple[str, int]]:
        """(label, index) of every beat for a picker."""
        out = []
        for i, b in enumerate(self.beats.beats):
            t0, t1 = b.start / self.fps, b.stop / self.fps
            out.append((f"Beat {i + 1}: {t0:.2f}-{t1:.2f} s ({b.n_frames} frames)", i))
        return out


@dataclass
class LoadedCase:
    """A loaded, preprocessed echo and everything computed from it once.

    Attributes:
        name: what the user picked (file name, "Built-in sample", a --data case).
        echo: the preprocessed loop at model resolution, frames float32 (T, S, S) in [0, 1]; a loop longer than the
            bundled generator's ``max_frames`` is resampled in time to that many frames (same duration), and with a
            generator bundled the loop starts at the end-diastolic frame the segmenter found (rotated).
        sector: (S, S) bool mask of the ultrasound sector.
        fps: frame rate of ``echo`` in frames per second.
        video: H.264 MP4 of the loop as loaded (all its frames, at display resolution) with the sector outlined.
        measurement: EF of the original by the instruments that are bundled.
        latents: encoded latents (1, C, T, h, w), cached after the first counterfactual (per session).
        cine: the loop as acquired (display resolution, native frame rate) with its beats, for counterfactuals
            rendered on the acquired frames (:class:`CineView`).
    """

    name: str
    echo: Echo
    sector: np.ndarray
    fps: float
    video: Path
    measurement: Measurement
    latents: torch.Tensor | None = None
    cine: CineView | None = None

    @property
    def n_frames(self) -> int:
        return self.echo.n_frames

    def summary(self) -> dict:
        """JSON-ready description of the case."""
        return {
            "name": self.name,
            "frames": self.n_frames,
            "fps": round(float(self.fps), 2),
            "duration_s": round(self.n_frames / self.fps, 2),
            "model_size": int(self.echo.height),
            "sector_fraction": round(float(self.sector.mean()), 3),
            "input_frames": None if self.cine is None else int(self.cine.display.shape[0]),
            "input_fps": None if self.cine is None else round(float(self.cine.fps), 2),
            "display_size": None if self.cine is None else int(self.cine.display.shape[-1]),
            "source_format": self.echo.source_format,
            **{f"original_{k}": v for k, v in self.measurement.summary().items()},
        }


@dataclass
class CounterfactualResult:
    """One generated loop and how it was made.

    Attributes:
        requested_ef: EF asked for, in %.
        frames: the generated loop on the model grid, float32 (L, S, S) in [0, 1]; for a rendered beat None until
            :meth:`StudioEngine.measure_result` makes it (after the video: only the EF's key frames are needed
            before).
        fps: frame rate (that of the original).
        video: side-by-side H.264 MP4, original | counterfactual, L frames at ``fps``.
        seed: the seed that produced it (reuse it to reproduce the loop).
        observed: frame indices of the original that the generator kept.
        candidates: number of candidates drawn (rejection sampling when > 1).
        latency_ms: wall time of generation, decoding, selection and video writing.
        segmentation: the counterfactual's EF (and LV masks) by the segmenter, measured as it is generated; this is
            the measured EF on the video and in the export's file name (``ef`` None without a segmenter).
        measurement: its full measurement, the segmentation plus the EF posterior (filled by
            :meth:`StudioEngine.measure_result`).
        timings_ms: parts of ``latency_ms``: the generator's "encode", "flow", "decode" (and "measure" with
            rejection sampling), then "segment" (segmenting the result) and "video" (composing and writing the MP4).
        candidate_efs: with rejection sampling, the segmentation EF (%) of every candidate (None: unmeasured).
        display: with the "ed" mode on a cine, the counterfactual beat at the input's resolution (N, S, S) (then
            ``frames``, once made, is that beat on the model grid, at the input's frame rate); None otherwise.
        beat: index of the beat it was generated for (None: the whole resampled loop).
        original: the measurement of the acquired beat it is compared with (None: ``case.measurement``).
    """

    requested_ef: float
    frames: np.ndarray | None
    fps: float
    video: Path
    seed: int
    observed: tuple[int, ...]
    candidates: int
    latency_ms: float
    segmentation: Measurement | None = None
    measurement: Measurement | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    candidate_efs: list[float | None] | None = None
    display: np.ndarray | None = None
    beat: int | None = None
    original: Measurement | None = None

    def summary(self) -> dict:
        out = {
            "requested_ef": round(float(self.requested_ef), 2),
            "measured_ef": None if self.segmentation is None or self.segmentation.ef is None
            else round(float(self.segmentation.ef), 2),
            "frames": int(len(self.display) if self.frames is None else len(self.frames)),
            "seed": int(self.seed),
            "observed_frames": list(self.observed),
            "candidates": int(self.candidates),
            "latency_ms": round(float(self.latency_ms), 1),
            "timings_ms": {k: round(float(v), 1) for k, v in self.timings_ms.items()},
            "fps": round(float(self.fps), 3),
            "display_size": None if self.display is None else int(self.display.shape[-1]),
            "beat": None if self.beat is None else self.beat + 1,
            "rendering": "acquired frames moved by the generator's motion" if self.display is not None
            else "decoded latents (model grid)",
        }
        if self.candidate_efs is not None:
            out["candidate_efs"] = [None if e is None else round(float(e), 2) for e in self.candidate_efs]
        if self.measurement is not None:
            out.update({f"counterfactual_{k}": v for k, v in self.measurement.summary().items()})
        return out


def resolve_device(device: str | None) -> torch.device:
    """``None`` / "auto" -> CUDA when present, else CPU; otherwise the named device (validated)."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"Unknown device {device!r}; use auto, cpu, cuda or cuda:N.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} was requested but CUDA is not available here; use --device cpu.")
    return dev


class StudioEngine:
    """Loads the bundled models lazily and serves the Studio's requests; safe to share between threads.

    Args:
        models_dir: folder with ``vae/``, ``generator/``, ``segmenter/`` and ``ef_regressor/`` sub-folders
            (each a ``save_pretrained`` folder); missing sub-folders disable the features that need them.
        device: "cpu", "cuda", "cuda:1" or "auto" (CUDA when present).
    """

    def __init__(self, models_dir: str | Path = "assets", device: str | None = "auto"):
        self.models_dir = Path(models_dir)
        self.device = resolve_device(device)
        self._models: dict[str, Any] = {}
        self._load_lock = threading.Lock()
        # One model run at a time inside this process (the app also queues model events with concurrency 1).
        self._run_lock = threading.RLock()

    # ----------------------------------------------------------------------------------------------- models
    def model_dir(self, name: str) -> Path:
        if name not in MODEL_DESCRIPTIONS:
            raise KeyError(f"unknown model {name!r}; expected one of {sorted(MODEL_DESCRIPTIONS)}.")
        return self.models_dir / name

    def available(self, name: str) -> bool:
        """Whether ``models_dir/name`` holds a saved model (a ``config.json``)."""
        return (self.model_dir(name) / "config.json").is_file()

    def missing_message(self, name: str) -> str:
        return f"The {MODEL_DESCRIPTIONS[name]} is not bundled in {self.model_dir(name)} yet."

    def status(self) -> dict[str, bool]:
        """Model name -> bundled or not (does not load anything)."""
        return {name: self.available(name) for name in MODEL_DESCRIPTIONS}

    def model(self, name: str) -> Any:
        """The loaded model ``name`` (loaded on first use, once, in eval mode on :attr:`device`).

        Raises:
            ModelUnavailable: the model is not bundled, or its folder cannot be loaded.
        """
        if name in self._models:
            return self._models[name]
        if not self.available(name):
            raise ModelUnavailable(self.missing_message(name))
        with self._load_lock:
            if name not in self._models:
                log.info("loading %s from %s", name, self.model_dir(name))
                try:
                    self._models[name] = self._load_model(name)
                except (OSError, ValueError, KeyError, TypeError) as exc:
                    log.exception("could not load %s", name)
                    raise ModelUnavailable(
                        f"The {MODEL_DESCRIPTIONS[name]} in {self.model_dir(name)} could not be loaded "
                        f"({type(exc).__name__}: {str(exc).rstrip('.')})."
                    ) from exc
        return self._models[name]

    def _load_model(self, name: str) -> Any:
        path = str(self.model_dir(name))
        if name == "vae":
            from echolvfm_core.models.vae import EchoCodec

            return EchoCodec.from_pretrained(path, device=self.device)
        if name == "generator":
            from echolvfm_core.pipelines.counterfactual import load_generator

            return load_generator(path, device=self.device)
        if name == "segmenter":
            from echolvfm_core.estimators.segmentation import SegmentationEF

            return SegmentationEF.from_pretrained(path, device=self.device)
        from echolvfm_core.estimators.ef_posterior import EFPosteriorEstimator

        return EFPosteriorEstimator.from_pretrained(path, device=self.device)

    def pipeline(self, rejection: bool = False):
        """A :class:`~echolvfm_core.pipelines.counterfactual.CounterfactualPipeline` over the loaded flow and codec.

        Without ``rejection`` it measures nothing (a slider move runs only the flow and the decoder); with it, the
        segmenter's EF ranks the candidates.
        """
        from echolvfm_core.pipelines.counterfactual import CounterfactualPipeline

        flow, codec = self.model("generator"), self.model("vae")
        measure = None
        if rejection:
            seg = self.model("segmenter")

            def measure(frames):
                return float(seg.measure(frames).ef)
        return CounterfactualPipeline(flow, codec, measure_ef=measure)

    def max_frames(self) -> int | None:
        """Longest loop the bundled generator makes (from its config, without loading it); ``None`` if absent."""
        if not self.available("generator"):
            return None
        config = json.loads((self.model_dir("generator") / "config.json").read_text(encoding="utf-8"))
        return int(config.get("max_frames", 32))

    def model_card(self, name: str) -> str | None:
        """The text of ``MODEL_CARD.md`` of a bundled model, or ``None``."""
        card = self.model_dir(name) / "MODEL_CARD.md"
        return card.read_text(encoding="utf-8") if card.is_file() else None

    def metrics(self, name: str) -> dict | None:
        """``metrics.json`` of a bundled model (as written by its training script), or ``None``."""
        path = self.model_dir(name) / "metrics.json"
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            log.warning("ignoring unreadable %s", path)
            return None

    # ----------------------------------------------------------------------------------------------- loading
    def load(self, source: str | Path | Echo | None, out_dir: str | Path, name: str | None = None) -> LoadedCase:
        """Read and preprocess an echo, write its display loop, measure its EF with the bundled instruments.

        Args:
            source: a file accepted by :func:`echolvfm_core.io.load_echo`, an :class:`Echo` already read, or
                ``None`` for the built-in sample (pydicom's 30-frame apical four-chamber cine).
            out_dir: folder for the display video.
            name: label shown to the user (default: the file name).

        Raises:
            EchoLoadError: the input is not a readable echo loop (the message says why).
        """
        from echolvfm_core.io import load_echo, sample_echo_path
        from echolvfm_core.preprocess import (
            find_sector,
            preprocess,
            resample_time,
            square_window,
        )

        if source is None:
            source, name = sample_echo_path(), name or "Built-in sample (apical 4CH cine)"
        if isinstance(source, Echo):
            echo, name = source, name or "echo"
        else:
            echo, name = load_echo(Path(source)), name or Path(source).name
        echo.require_loop("The Studio")
        sector_found = find_sector(echo.frames)
        side = square_window(sector_found, echo.frames.shape[1:]).side
        pre = preprocess(echo, sector=sector_found, display_size=None if side <= MAX_DISPLAY else MAX_DISPLAY)
        fps = float(pre.echo.fps or 0.0)
        if fps <= 0:
            raise EchoLoadError(f"{name} has no frame rate, so it cannot be shown as a loop.")
        sector = np.asarray(pre.mask, dtype=bool)
        display_mask = pre.display.frames.max(0) > 0
        rgb = vid.to_rgb(pre.display.frames)
        rgb = vid.draw_contours(rgb, np.repeat(display_mask[None], len(rgb), axis=0), colour=(90, 170, 255))
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        video = write_mp4(vid.even(rgb), out / f"{secrets.token_hex(8)}.mp4", fps, **vid.APP_VIDEO)
        cine = self._cine(pre, fps, display_mask)
        model_echo = pre.echo
        longest = self.max_frames()
        if longest is not None and model_echo.n_frames > longest:
            # The generator makes at most `longest` frames and learnt (and was evaluated on) loops resampled in time
            # to fit them, so the loop the instruments measure and the generator observes is resampled the same way.
            model_echo = resample_time(model_echo, fps * longest / model_echo.n_frames)
            model_echo = model_echo.replace(frames=model_echo.frames[:longest], labels=None, labelled=())
        case = LoadedCase(name=name, echo=model_echo, sector=sector, fps=float(model_echo.fps), video=video,
                          measurement=Measurement(), cine=cine)
        # A loop without a whole beat is played as one cycle (its last frame runs on into its first), so it is
        # measured as one: its ES is the smallest cavity, also when that lies before its ED.
        case.measurement = self.measure(case.echo.frames, case.echo, cyclic=cine.beats.method == "whole_loop")
        ed = case.measurement.ed_index
        if longest is not None and ed:
            # The generator's training loops start at end-diastole: so does the loop it observes, and the original
            # panel then runs in step with the counterfactual.
            case.echo = model_echo.replace(frames=np.roll(model_echo.frames, -ed, axis=0), labels=None, labelled=())
            case.measurement = _rolled(case.measurement, ed)
        return case

    def _cine(self, pre, fps: float, display_mask: np.ndarray) -> CineView:
        """The acquired loop and its beats (LV area curve by the segmenter when bundled, else image periodicity)."""
        from echolvfm_core.beats import find_beats
        from echolvfm_core.estimators.segmentation import measure_labels

        area = labels = None
        if self.available("segmenter"):
            with self._run_lock:
                labels = self.model("segmenter").segment(pre.echo.frames)
            try:
                area = measure_labels(labels).lv_area
            except ValueError as exc:  # no LV found: the images' periodicity still gives the beats
                log.info("beats from image periodicity: %s", exc)
        beats = find_beats(pre.echo.frames, fps, area, pre.mask)
        return CineView(display=pre.display.frames, grid=pre.echo.frames, mask=display_mask, fps=fps, beats=beats,
                        labels=labels)

    # ------------------------------------------------------------------------------------------ measurement
    def measure(self, frames: np.ndarray, like: Echo | None = None, masks_only: bool = False,
                seed: int = 0, cyclic: bool = False, labels: np.ndarray | None = None) -> Measurement:
        """EF of a loop by segmentation and by the posterior, with whatever instruments are bundled.

        Args:
            frames: float32 (T, S, S) in [0, 1] at model resolution.
            like: the preprocessed echo these frames show (or were generated from): its pixel spacing (areas in
                mm² when known) and the patient's age and sex (conditioning of the posterior) are used.
            masks_only: run only the segmenter, one network pass (the measured EF on each new counterfactual's
                video, contours, rejection sampling: on every slider release, so without the test-time augmentation
                that makes a full measurement about 5x slower; EF MAE 6.20 against 5.99 on CAMUS valid), not the
                posterior.
            seed: seed of the posterior's noise draws.
            cyclic: segment the loop as the cycle it is played as (its last frame followed by its first; see
                :func:`~echolvfm_core.estimators.segmentation.measure_labels`).
            labels: the segmenter's labels of ``frames`` when they were already segmented (as a full measurement
                segments them), so they are not segmented again.
        """
        from echolvfm_core.estimators.segmentation import (
            SegmentationError,
            measure_labels,
        )

        m = Measurement()
        with self._run_lock:
            try:
                spacing = None if like is None else like.spacing_mm
                if labels is not None:
                    seg = measure_labels(labels, spacing, cyclic)
                else:
                    segmenter = self.model("segmenter")
                    tta = segmenter.tta
                    segmenter.tta = tta and not masks_only
                    try:
                        seg = segmenter.measure(frames, spacing, cyclic)
                    finally:
                        segmenter.tta = tta
                m.ef, m.lv_area, m.area_unit = float(seg.ef), np.asarray(seg.lv_area, dtype=float), seg.area_unit
                m.lv_masks = np.asarray(seg.labels) == 1
                m.ed_index, m.es_index = int(seg.ed_index), int(seg.es_index)
            except ModelUnavailable as exc:
                m.notes.append(f"{exc} Measured EF by segmentation is unavailable.")
            except SegmentationError as exc:
                m.notes.append(f"The segmenter could not measure this loop: {exc}")
        return m if masks_only else self._add_posterior(m, frames, like, seed)

    def _add_posterior(self, m: Measurement, frames: np.ndarray, like: Echo | None, seed: int = 0) -> Measurement:
        """``m`` with the EF posterior of ``frames`` (or a note saying why there is none); returns ``m``."""
        with self._run_lock:
            try:
                info = None if like is None else like.info
                m.posterior = self.model("ef_regressor").posterior(
                    frames, age=None if info is None else info.age, sex=None if info is None else info.sex, seed=seed)
            except ModelUnavailable as exc:
                m.notes.append(f"{exc} The EF posterior is unavailable.")
        return m

    # -------------------------------------------------------------------------------------- counterfactuals
    @staticmethod
    def observed_frames(mode: str, n_frames: int, length: int, k: int = 1, ed_index: int = 0) -> tuple[int, ...]:
        """Frame indices of the original that the generator keeps, all < min(n_frames, length).

        ``ed``: the end-diastolic frame; ``first_k``: frames 0..k-1; ``every_other``: 0, 2, 4, ... (the generator
        fills the frames in between: temporal upsampling); ``all``: every frame.
        """
        limit = min(n_frames, length)
        if mode == "ed":
            if not 0 <= ed_index < limit:
                raise ValueError(f"The end-diastolic frame {ed_index} lies outside the first {limit} frames.")
            return (int(ed_index),)
        if mode == "first_k":
            if not 1 <= k <= limit:
                raise ValueError(f"k must be between 1 and {limit} for this loop; got {k}.")
            return tuple(range(k))
        if mode == "every_other":
            return tuple(range(0, limit, 2))
        if mode == "all":
            return tuple(range(limit))
        raise ValueError(f"Unknown observed-frames mode {mode!r}; choose one of {sorted(OBSERVED_MODES)}.")

    def latents(self, case: LoadedCase) -> torch.Tensor:
        """The case's latents (1, C, T, h, w), encoded once and cached on the case."""
        if case.latents is None:
            vae = self.model("vae")
            with self._run_lock:
                case.latents = vae.encode(torch.from_numpy(case.echo.frames)[None])
        return case.latents

    def counterfactual(
        self,
        case: LoadedCase,
        ef: float,
        out_dir: str | Path,
        observed_mode: str = "ed",
        k: int = 1,
        length: int | None = None,
        seed: int | None = None,
        reject_k: int = 1,
        contours: bool = False,
        beat: int | None = None,
    ) -> CounterfactualResult:
        """Generate the case's heart at EF ``ef`` (%) and write the side-by-side video.

        With the "ed" mode on a cine with at least one whole beat and a generator that predicts motion, the
        counterfactual is rendered on the acquired frames of beat ``beat`` (default the first) at the input's
        resolution and frame rate (:mod:`echolvfm_core.pipelines.render`); ``length`` is then the beat's. Other
        modes, and loops shorter than a whole beat (the 30-frame sample), decode the generated latents on the model
        grid: on the sample, moving its acquired frames by the generator's motion spans only 54-68 % measured EF
        for requests of 30-70 %, because its one partial cycle cannot be timed against the generated one.

        Args:
            ef: requested EF in %, within :data:`EF_RANGE`.
            observed_mode: one of :data:`OBSERVED_MODES`; ``k`` is used by "first_k".
            length: output length in frames (default: the original's, at most the generator's ``max_frames``).
            seed: seed of the generator's noise (default: a fresh random one, reported in the result).
            reject_k: draw this many candidates and keep the one whose segmentation EF is closest to ``ef``
                (rejection sampling; needs the segmenter when > 1).
            contours: outline the LV cavity (by the segmenter) on both panels.

        Raises:
            ModelUnavailable: the generator or the autoencoder is not bundled (or the segmenter, for rejection
                sampling or contours).
            ValueError: an argument is out of range.
        """
        t0 = time.perf_counter()
        if not EF_RANGE[0] <= float(ef) <= EF_RANGE[1]:
            raise ValueError(f"EF must be between {EF_RANGE[0]:.0f} and {EF_RANGE[1]:.0f} %; got {ef}.")
        if reject_k < 1:
            raise ValueError(f"The number of candidates must be at least 1; got {reject_k}.")
        if (observed_mode == "ed" and case.cine is not None and case.cine.beats.method != "whole_loop"
                and self.renders_acquired()):
            seed = secrets.randbelow(2**31) if seed is None else int(seed)
            return self._render(case, float(ef), Path(out_dir), beat or 0, seed, reject_k, contours, t0)
        pipe = self.pipeline(rejection=reject_k > 1)
        if contours:
            self.model("segmenter")  # fail before spending time on generation
        length = min(case.n_frames, pipe.max_frames) if length is None else int(length)
        if not 2 <= length <= pipe.max_frames:
            raise ValueError(f"The output length must be between 2 and {pipe.max_frames} frames; got {length}.")
        ed = case.measurement.ed_index if case.measurement.ed_index is not None else 0
        observed = self.observed_frames(observed_mode, case.n_frames, length, k, ed)
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        latents = self.latents(case)
        with self._run_lock:
            cf = pipe.generate(latents, ef=float(ef), observed=observed, length=length, seed=seed, reject=reject_k)
        frames = cf.frames[0]  # (L, S, S) float32 in [0, 1]
        timings = dict(cf.timings_ms)
        t1 = time.perf_counter()
        cf_meas = self.measure(frames, case.echo, masks_only=True)  # its EF goes on the video
        timings["segment"] = (time.perf_counter() - t1) * 1000.0
        t1 = time.perf_counter()
        masks = None
        if contours:
            masks = (None if case.measurement.lv_masks is None
                     else vid.loop_to_length(case.measurement.lv_masks, length), cf_meas.lv_masks)
        video = self._side_by_side(vid.loop_to_length(case.echo.frames, length), frames,
                                   counterfactual_caption(ef, cf_meas.ef), masks, case.fps, Path(out_dir), PANEL_SIZE)
        timings["video"] = (time.perf_counter() - t1) * 1000.0
        latency = (time.perf_counter() - t0) * 1000.0
        return CounterfactualResult(requested_ef=float(ef), frames=frames, fps=case.fps, video=video, seed=seed,
                                    observed=observed, candidates=reject_k, latency_ms=latency,
                                    segmentation=cf_meas, timings_ms=timings,
                                    candidate_efs=None if cf.candidate_efs is None else list(cf.candidate_efs[0]))

    def renders_acquired(self) -> bool:
        """Whether the bundled generator predicts motion, so counterfactuals can move the acquired frames."""
        if not self.available("generator"):
            return False
        flow = self.model("generator")
        return getattr(getattr(flow, "config", None), "prediction", None) == "warp"

    def renderer(self):
        """A :class:`~echolvfm_core.pipelines.render.BeatRenderer` over the loaded generator and codec."""
        from echolvfm_core.pipelines.render import BeatRenderer

        return BeatRenderer(self.model("generator"), self.model("vae"))

    def beat_measurement(self, case: LoadedCase, index: int) -> Measurement:
        """The segmenter's (and posterior's) measurement of one acquired beat, cached on the case (its labels are
        those of the pass that found the beats)."""
        cine = case.cine
        if index not in cine.beat_measurements:
            labels = None if cine.labels is None else cine.beat_slice(cine.labels, index)
            cine.beat_measurements[index] = self.measure(cine.beat_frames(index)[1], case.echo, labels=labels)
        return cine.beat_measurements[index]

    def _render(self, case: LoadedCase, ef: float, out_dir: Path, index: int, seed: int, reject_k: int,
                contours: bool, t0: float) -> CounterfactualResult:
        from echolvfm_core.pipelines.render import key_frames, to_model_grid

        cine = case.cine
        if not 0 <= index < len(cine.beats.beats):
            raise ValueError(f"Beat {index + 1} does not exist; this loop has {len(cine.beats.beats)} beat(s).")
        b = cine.beats.beats[index]
        display = cine.beat_frames(index)[0]
        original = self.beat_measurement(case, index)
        if original.ef is None:
            raise ValueError("The segmenter could not measure the EF of this beat, so it cannot be re-timed to "
                             "another EF; pick another beat or load another echo.")
        renderer = self.renderer()
        with self._run_lock:
            if index not in cine.prepared:
                whole = cine.beats.method != "whole_loop"  # a rotated loop's LV area minimum is no beat's ES
                es = original.es_index if whole and original.es_index and original.es_index > 0 else None
                beat = renderer.prepare(display, cine.mask, cine.fps, ed=0, source_ef=original.ef, es=es)
                renderer.calibrate(beat, lambda g: self._measured_ef(g, case.echo))
                # every whole EF of the slider at this seed: a slider move then only warps and measures
                renderer.prefetch(beat, range(int(EF_RANGE[0]), int(EF_RANGE[1]) + 1), seed)
                cine.prepared[index] = beat
            prepared = cine.prepared[index]
            seeds = [seed + i for i in range(reject_k)]
            renders = [renderer.render(prepared, ef, seed=s) for s in seeds]
        timings = {k: sum(r.timings_ms[k] for r in renders) for k in renders[0].timings_ms}
        t1 = time.perf_counter()
        key = None if contours else key_frames(len(display), prepared.es, cine.fps)
        # only the frames the EF is read on go to the model grid now; the whole beat's copy waits for measure_result
        grids = [to_model_grid(r.frames if key is None else r.frames[list(key)], renderer.grid) for r in renders]
        measured = [self.measure_frames(g, case.echo, key) for g in grids]  # their EF goes on the video
        candidate_efs = [m.ef for m in measured] if reject_k > 1 else None
        dist = [abs(m.ef - ef) if m.ef is not None else float("inf") for m in measured]
        chosen = int(np.argmin(dist))
        timings["segment"] = (time.perf_counter() - t1) * 1000.0
        rendered, cf_meas = renders[chosen], measured[chosen]
        frames = grids[chosen] if key is None else None
        t1 = time.perf_counter()
        if index not in cine.panels:
            cine.panels[index] = to_uint8(display, clip=True)
        video = self._side_by_side(cine.panels[index], rendered.frames, counterfactual_caption(ef, cf_meas.ef),
                                   (original.lv_masks, cf_meas.lv_masks) if contours else None, cine.fps, out_dir)
        timings["video"] = (time.perf_counter() - t1) * 1000.0
        return CounterfactualResult(requested_ef=ef, frames=frames, fps=cine.fps, video=video, seed=seeds[chosen],
                                    observed=(b.ed,), candidates=reject_k,
                                    latency_ms=(time.perf_counter() - t0) * 1000.0, segmentation=cf_meas,
                                    timings_ms=timings, candidate_efs=candidate_efs, display=rendered.frames,
                                    beat=index, original=original)

    def measure_frames(self, frames: np.ndarray, like: Echo | None, key: tuple[int, ...] | None) -> Measurement:
        """The segmenter's EF of a loop read on its frames ``key`` only, one network pass without test-time
        augmentation (:func:`echolvfm_core.pipelines.render.key_frames`: a sixth of the work on a 30 fps beat, and
        one beat read as one). ``frames`` are the loop's frames at ``key`` (every frame when ``key`` is None); ED /
        ES indices are the loop's; per-frame areas and masks are left out (``lv_area`` None) for a subset: see
        :meth:`measure_result`."""
        if key is None:
            return self.measure(frames, like, masks_only=True)
        m = self.measure(frames, like, masks_only=True)

        def at(i):
            return None if i is None else int(key[i])

        return replace(m, lv_area=None, lv_masks=None, ed_index=at(m.ed_index), es_index=at(m.es_index),
                       key_frames=key)

    def _measured_ef(self, frames: np.ndarray, like: Echo | None) -> float:
        """The segmentation EF of ``frames`` (one pass, no test-time augmentation); ValueError when the segmenter
        could not measure."""
        ef = self.measure(frames, like, masks_only=True).ef
        if ef is None:
            raise ValueError("The segmenter could not measure this loop.")
        return ef

    def measure_result(self, case: LoadedCase, result: CounterfactualResult) -> Measurement:
        """The counterfactual's full measurement (the segmentation made with it, plus the posterior), stored in
        ``result.measurement`` and returned. When the EF on the video was read on key frames
        (:meth:`measure_frames`), every frame is segmented now for the area curve and the masks, and the EF with its
        ED / ES stays the one on the video (the same network on the same frames gives the same areas there)."""
        if result.frames is None:  # a rendered beat: its model-grid copy is made after the video
            from echolvfm_core.pipelines.render import to_model_grid

            result.frames = to_model_grid(result.display, self.renderer().grid)
        seg = result.segmentation
        if seg is None:
            result.measurement = self.measure(result.frames, case.echo)
            return result.measurement
        m = replace(seg, notes=list(seg.notes))
        if seg.key_frames is not None:
            whole = self.measure(result.frames, case.echo, masks_only=True)
            m = replace(m, lv_area=whole.lv_area, lv_masks=whole.lv_masks, area_unit=whole.area_unit)
        result.measurement = self._add_posterior(m, result.frames, case.echo)
        return result.measurement

    # ----------------------------------------------------------------------------------------------- export
    def export(self, case: LoadedCase, result: CounterfactualResult, out_dir: str | Path) -> list[Path]:
        """Write the counterfactual loop alone as MP4, GIF and DICOM, each marked synthetic; returns the three paths.

        A counterfactual rendered on an acquired beat is written at the input's resolution and frame rate: the MP4
        and the DICOM loop the beat over the input's whole duration, the GIF holds the beat once (GIFs loop).

        MP4 and GIF have no standard place for such a mark, so "SYNTHETIC" is burned into their frames (shown at
        twice the model grid); the DICOM keeps the model-grid pixels and is marked by its tags (derived image,
        synthetic series description, see :func:`echolvfm_core.io.write_dicom`).
        """
        from echolvfm_core.io import write_dicom, write_gif

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        measured = None if result.segmentation is None else result.segmentation.ef
        got = "unmeasured" if measured is None else f"ef{measured:.0f}-measured"
        stem = f"counterfactual_ef{result.requested_ef:.0f}-asked_{got}_seed{result.seed}_{secrets.token_hex(4)}"
        label = counterfactual_caption(result.requested_ef, measured)
        if result.display is not None:  # the beat at the input's resolution, looped over the input's duration
            frames = vid.loop_to_length(result.display, case.cine.display.shape[0])
            echo = case.echo.replace(frames=frames, fps=result.fps, labels=None, labelled=(), synthetic=True,
                                     source_format="synthetic", spacing_mm=None)
            beat = vid.caption(to_uint8(result.display, clip=True), label)
            return [
                Path(write_mp4(vid.loop_to_length(beat, len(frames)), out / f"{stem}.mp4", fps=result.fps)),
                Path(write_gif(beat, out / f"{stem}.gif", fps=result.fps)),
                Path(write_dicom(echo, out / f"{stem}.dcm")),
            ]
        echo = case.echo.replace(frames=result.frames, labels=None, labelled=(), synthetic=True,
                                 source_format="synthetic")
        marked = vid.caption(vid.resize_frames(to_uint8(result.frames, clip=True), PANEL_SIZE), label)
        return [
            Path(write_mp4(marked, out / f"{stem}.mp4", fps=result.fps)),
            Path(write_gif(marked, out / f"{stem}.gif", fps=result.fps)),
            Path(write_dicom(echo, out / f"{stem}.dcm")),
        ]

    # ----------------------------------------------------------------------------------------------- video
    @staticmethod
    def _side_by_side(original: np.ndarray, frames: np.ndarray, label: str, masks: tuple | None, fps: float,
                      out_dir: Path, size: int | None = None) -> Path:
        """Original | counterfactual, (T, S, S) loops of one length (float in [0, 1] or uint8), as one H.264 MP4 at
        ``fps``.

        Args:
            masks: (original's, counterfactual's) LV masks (T, h, w) or None each, outlined in colour; None: grey
                panels without outlines.
            size: panel side in pixels (model-grid loops are shown at :data:`PANEL_SIZE`); None keeps the
                frames' own (a rendered beat, at the input's resolution: the browser loops it, so both play in
                step at real speed).
        """
        left, right = to_uint8(original, clip=True), to_uint8(frames, clip=True)
        if size is not None:
            left, right = vid.resize_frames(left, size), vid.resize_frames(right, size)
        if masks is not None:  # coloured outlines need RGB
            left, right = vid.to_rgb(left), vid.to_rgb(right)
            for panel, m in zip((left, right), masks):
                if m is not None:
                    panel[:] = vid.draw_contours(panel, m)
        white = (255, 255, 255) if masks is not None else 255
        vid.caption(left, "Original", white)
        vid.caption(right, label, white)
        out_dir.mkdir(parents=True, exist_ok=True)
        return write_mp4(vid.even(vid.side_by_side(left, right)), out_dir / f"{secrets.token_hex(8)}.mp4", fps,
                         **vid.APP_VIDEO)
