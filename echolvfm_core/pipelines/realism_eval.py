"""Realism of rendered counterfactuals, measured (``echolvfm evaluate --sections realism``).

Two kinds of data, reported apart:

* **CAMUS** (a split's patients, acquired ED and ES images at their own resolution, no acquired cine): for each
  patient the counterfactual is rendered from the ED image (a still: :class:`BeatRenderer`) at a Gen EF (drawn as
  in the Table 1 protocol) and at its own EF (Rec). Texture (``hf_share``, ``gradient``) and intra-frame
  ``bits_per_pixel`` (each frame coded alone) compare the generated frames with the real ED and ES images, pooled
  (means over all patients) and paired (per patient, then the median of the per-patient ratios). The frame-to-frame
  change compares the generated loop, on the model grid, with the patient's prepared alpha = 1 loop (real anatomy,
  synthesised motion). EF adherence: the segmenter's EF of the rendered loops against the requests (R^2, MAE).
  C2ST: a classifier trained on ``train_patients`` of the training split (real ED / ES against generated frames),
  scored on this split's patients.
* **Acquired cines** (the built-in ones): every beat rendered at requests 30, 50 and 70 % and compared with its own
  source beat (paired: same heart, same framing), all statistics on loops at the cine's resolution and frame rate.
  Each beat's motion gain is calibrated first, and EFs are read on its key frames, as in the app
  (:meth:`BeatRenderer.calibrate`, :func:`~echolvfm_core.pipelines.render.key_frames`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from .. import realism as rz
from ..beats import find_beats
from ..echo import Echo
from ..estimators.segmentation import measure_labels
from ..preprocess import find_sector, preprocess
from .evaluation import agreement, draw_gen_ef
from .render import BeatRenderer, beat_ef, key_frames, to_model_grid

__all__ = ["CINE_REQUESTS", "camus_case", "evaluate_camus_realism", "evaluate_cine_realism"]

log = logging.getLogger(__name__)

#: EFs (%) each beat of an acquired cine is rendered at.
CINE_REQUESTS = (30.0, 50.0, 70.0)
#: Generated frames per CAMUS case that enter the texture statistics and the C2ST (the ES phase and mid-systole).
_PATCHES_PER_IMAGE = 24


@dataclass
class _Case:
    patient: str
    real: np.ndarray  # (2, S, S) ED, ES at native resolution
    mask: np.ndarray  # (S, S)
    generated: np.ndarray  # (L, S, S) the Gen counterfactual
    es_phase: int


def camus_case(view, renderer: BeatRenderer, ef: float, seed: int,
               frames: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(real (2, S, S) ED / ES, mask (S, S), generated (frames, S, S)) for one CAMUS view rendered at ``ef`` from its
    ED image (``frames`` output frames over one cycle; default the generator's ``max_frames``)."""
    pair = view.ed.replace(frames=np.concatenate([view.ed.frames, view.es.frames]), labels=None, labelled=(),
                           fps=None)
    pre = preprocess(pair, display_size=None, sector=find_sector(pair.frames))
    real = pre.display.frames
    mask = real.max(0) > 0
    beat = renderer.prepare(real[:1], mask, fps=30.0, still_frames=frames)
    return real, mask, renderer.render(beat, ef, seed=seed).frames


def _generated_es(frames: np.ndarray, seg) -> int:
    """ES frame of a generated loop by the segmenter (smallest LV area); the middle frame when it fails."""
    try:
        return int(seg.measure(to_model_grid(frames, seg.size)).es_index)
    except ValueError:
        return len(frames) // 2


def evaluate_camus_realism(renderer: BeatRenderer, seg, patients: Iterable, true_ef: dict[str, float],
                           prepared_loops: dict[str, np.ndarray], train_patients: Iterable, seed: int = 0,
                           progress: bool = True) -> dict:
    """The CAMUS part of the section (module docstring).

    Args:
        renderer: the generator's renderer. seg: :class:`SegmentationEF` (EF and ES frame of generated loops).
        patients: :class:`CamusPatient` of the evaluated split (4CH view used).
        true_ef: patient id -> EF (%) of its expert labels (the prepared alpha = 1 loop's).
        prepared_loops: patient id -> its prepared alpha = 1 loop on the model grid, float (T, 112, 112) in [0, 1];
            the counterfactuals get its number of frames.
        train_patients: :class:`CamusPatient` of the training split for the C2ST's classifier.
    """
    rng = np.random.default_rng(seed)
    req: dict[str, list[float]] = {"rec": [], "gen": []}
    got: dict[str, list[float | None]] = {"rec": [], "gen": []}
    real_stats, gen_stats, paired = [], [], {k: [] for k in ("hf_share", "gradient", "bits_per_pixel")}
    change_real, change_gen = [], []
    test_real, test_gen = [], []
    skipped = []
    for i, patient in enumerate(tqdm(list(patients), desc="realism (CAMUS)", disable=not progress)):
        pid = patient.patient_id
        if pid not in true_ef or "4CH" not in patient.views:
            skipped.append({"patient": pid, "reason": "no prepared alpha = 1 loop or no 4CH view"})
            continue
        view = patient.views["4CH"]
        try:
            targets = {"rec": true_ef[pid], "gen": draw_gen_ef(true_ef[pid], rng)}
            loop = prepared_loops.get(pid)
            rendered = {}
            for name, ef in targets.items():
                real, mask, gen = camus_case(view, renderer, ef, seed * 1_000_003 + i,
                                             None if loop is None else len(loop))
                rendered[name] = gen
                req[name].append(ef)
                try:
                    got[name].append(float(seg.measure(to_model_grid(gen, seg.size)).ef))
                except ValueError:
                    got[name].append(None)
        except ValueError as exc:
            skipped.append({"patient": pid, "reason": str(exc)})
            continue
        gen = rendered["gen"]
        es = _generated_es(gen, seg)
        shown = gen[[es, max(1, es // 2)]]  # the ES phase and mid-systole
        r = _frame_stats(real, mask)
        g = _frame_stats(shown, mask)
        real_stats.append(r)
        gen_stats.append(g)
        for k, values in paired.items():
            values.append(g[k] / r[k] if r[k] > 0 else np.nan)
        if loop is not None:  # the same number of frames per cycle, so changes per frame compare
            grid_mask = loop.max(0) > 0
            change_real.append(rz.frame_change(loop, grid_mask))
            change_gen.append(rz.frame_change(to_model_grid(gen, loop.shape[-1]), grid_mask))
        test_real.append(_patches(real, mask, rng))
        test_gen.append(_patches(shown, mask, rng))
    if not real_stats:
        raise ValueError("No CAMUS patient could be rendered for the realism section.")
    train_real, train_gen = [], []
    for j, patient in enumerate(tqdm(list(train_patients), desc="C2ST training images", disable=not progress)):
        if "4CH" not in patient.views:
            continue
        try:
            real, mask, gen = camus_case(patient.views["4CH"], renderer, draw_gen_ef(50.0, rng), seed + 7 * j)
        except ValueError:
            continue
        es = _generated_es(gen, seg)
        train_real.append(_patches(real, mask, rng))
        train_gen.append(_patches(gen[[es, max(1, es // 2)]], mask, rng))
    test = rz.c2st(train_real, train_gen, test_real, test_gen, seed=seed)
    pooled = {k: float(np.mean([g[k] for g in gen_stats]) / np.mean([r[k] for r in real_stats])) for k in paired}
    pooled["frame_change"] = float(np.mean(change_gen) / np.mean(change_real)) if change_real else None
    paired_out = {k: float(np.nanmedian(v)) for k, v in paired.items()}
    paired_out["frame_change"] = (float(np.median(np.asarray(change_gen) / np.asarray(change_real)))
                                  if change_real else None)
    return {
        "n_patients": len(real_stats),
        "ratios_pooled": pooled,
        "ratios_paired_median": paired_out,
        "real_means": {k: float(np.mean([r[k] for r in real_stats])) for k in paired},
        "generated_means": {k: float(np.mean([g[k] for g in gen_stats])) for k in paired},
        "c2st": test.to_dict(),
        "ef_adherence": {k: agreement(req[k], got[k]) for k in req},
        "skipped": skipped,
    }


def _frame_stats(frames: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """Texture and intra-frame bits per pixel of a set of frames (each frame coded alone)."""
    return {
        "hf_share": rz.hf_share(frames, mask),
        "gradient": rz.gradient(frames, mask),
        "bits_per_pixel": float(np.mean([rz.bits_per_pixel(f[None], 30.0) for f in frames])),
    }


def _patches(frames: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return rz.sample_patches(frames, mask, _PATCHES_PER_IMAGE, rng)


def evaluate_cine_realism(renderer: BeatRenderer, seg, cines: dict[str, Echo], seed: int = 0,
                          requests: Iterable[float] = CINE_REQUESTS) -> dict:
    """Paired realism of every beat of each acquired cine, rendered at ``requests`` (module docstring).

    Returns per cine: its beats and heart rate, per request the measured EF of each beat's counterfactual and the
    ratios (generated over source beat) of each statistic, and their means over beats and requests.
    """
    out = {}
    for name, echo in cines.items():
        pre = preprocess(echo, display_size=None)
        display = pre.display.frames
        mask = display.max(0) > 0
        m = seg.measure(pre.echo.frames)
        beats = find_beats(pre.echo.frames, echo.fps, m.lv_area, pre.mask)
        rows = []
        for b in beats.beats:
            src = display[b.start : b.stop]
            try:
                src_m = measure_labels(m.labels[b.start : b.stop])  # the beat's slice of the first pass
                src_ef = float(src_m.ef)
            except ValueError as exc:
                log.warning("%s: beat %d-%d skipped: %s", name, b.start, b.stop, exc)
                continue
            es = src_m.es_index if b.ed == b.start and src_m.es_index > 0 else None
            beat = renderer.prepare(src, mask, echo.fps, ed=b.ed - b.start, source_ef=src_ef,
                                    periodic=beats.method != "whole_loop", es=es)
            key = key_frames(len(src), beat.es, echo.fps)
            renderer.calibrate(beat, lambda g: float(seg.measure(g).ef))  # as the app does
            real = rz.loop_stats(src, mask, echo.fps)
            for ef in requests:
                gen = renderer.render(beat, ef, seed=seed).frames
                g = rz.loop_stats(gen, mask, echo.fps)
                try:
                    measured = beat_ef(seg, to_model_grid(gen, seg.size), key)
                except ValueError:
                    measured = None
                rows.append({"beat": [b.start, b.stop], "source_ef": src_ef, "gain": beat.gain, "requested": ef,
                             "measured": measured, "ratios": {k: getattr(g, k) / getattr(real, k) for k in rz.STATS
                                        if getattr(real, k) > 0}})
        out[name] = {
            "frames": echo.n_frames, "fps": echo.fps, "side": int(display.shape[-1]), **beats.to_dict(),
            "renders": rows,
            "ratios_mean": {k: float(np.mean([r["ratios"][k] for r in rows if k in r["ratios"]])) for k in rz.STATS}
            if rows else {},
            "measured_mean": {str(ef): _mean([r["measured"] for r in rows if r["requested"] == ef]) for ef in requests},
        }
    return out


def _mean(values: list[float | None]) -> float | None:
    ok = [v for v in values if v is not None]
    return float(np.mean(ok)) if ok else None
