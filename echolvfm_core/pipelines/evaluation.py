"""EF adherence of a counterfactual pipeline: the EchoLVFM paper's Table 1 protocol on prepared loops.

For every patient, its real-motion loop (alpha = 1: real ED/ES anatomy, synthesised motion, see the data issue)
is the video. One observed frame (end-diastole, frame 0) conditions the generator, the output has the video's
length (loops longer than the generator's ``max_frames`` are first resampled in time to ``max_frames`` frames so
a whole cycle is generated), and the EF of each generated loop is measured by the pipeline's segmenter:

- Rec: the requested EF is the video's true EF (from its expert labels);
- Gen: the requested EF is drawn uniformly from [10, 90], at least 5 points away from the true EF;
- each with ``seeds`` noise draws per video, and again with rejection sampling (best of ``reject`` candidates);
- es_ssim: SSIM of the generated frame at the real ES index against the real ES frame, in Rec (no rejection).

Agreement of requested vs measured EF is reported as R^2, MAE and RMSE over all (video, seed) pairs; a loop the
segmenter cannot measure counts in ``unmeasured`` and is left out of the agreement.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from tqdm.auto import tqdm

from ..data.prepared import LoopSample
from ..metrics import ssim
from ..preprocess import resample_time
from .counterfactual import CounterfactualPipeline

__all__ = ["GEN_EF_RANGE", "agreement", "draw_gen_ef", "evaluate_generation"]

log = logging.getLogger(__name__)

#: Range of the EFs requested in Gen, and the least distance from the true EF.
GEN_EF_RANGE = (10.0, 90.0)
GEN_MIN_DISTANCE = 5.0


def agreement(requested: Iterable[float], measured: Iterable[float | None]) -> dict:
    """``{r2, mae, rmse, n, unmeasured}`` of measured vs requested EF (R^2 about the requested mean)."""
    pairs = [(r, m) for r, m in zip(requested, measured, strict=True)]
    ok = np.array([(r, m) for r, m in pairs if m is not None], dtype=np.float64).reshape(-1, 2)
    out = {"n": int(len(ok)), "unmeasured": int(len(pairs) - len(ok))}
    if len(ok) == 0:
        return {"r2": float("nan"), "mae": float("nan"), "rmse": float("nan"), **out}
    err = ok[:, 1] - ok[:, 0]
    ss_tot = float(np.sum((ok[:, 0] - ok[:, 0].mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan")
    return {"r2": r2, "mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2))), **out}


def draw_gen_ef(true_ef: float, rng: np.random.Generator) -> float:
    """An EF uniform on :data:`GEN_EF_RANGE` at least :data:`GEN_MIN_DISTANCE` points from ``true_ef``."""
    lo, hi = GEN_EF_RANGE
    while True:
        ef = float(rng.uniform(lo, hi))
        if abs(ef - true_ef) >= GEN_MIN_DISTANCE:
            return ef


def _video(sample: LoopSample, max_frames: int) -> tuple[np.ndarray, int]:
    """Frames float (T, S, S) in [0, 1] of the loop (a whole cycle in at most ``max_frames``) and its ES index."""
    echo = sample.to_echo()
    if echo.n_frames > max_frames:
        echo = resample_time(echo, echo.fps * max_frames / echo.n_frames)
    frames = echo.frames[:max_frames].astype(np.float32)  # rounding may leave one frame more
    return frames, min(int(echo.info.es_index), len(frames) - 1)


def evaluate_generation(pipeline: CounterfactualPipeline, samples: Iterable[LoopSample], seeds: int = 3,
                        reject: int = 4, seed: int = 0, progress: bool = True) -> dict:
    """Run the Table 1 protocol (module docstring) on ``samples`` (the alpha = 1 loops, one per patient).

    Args:
        pipeline: generator + codec + ``measure_ef`` (the segmenter's), e.g. ``CounterfactualPipeline.from_pretrained``.
        samples: the videos. seeds: noise draws per video and condition. reject: candidates with rejection sampling.
        seed: seeds the Gen EF draws and the noise (video ``i`` uses noise seeds derived from ``seed`` and ``i``).

    Returns:
        ``{rec, gen, rec_reject, gen_reject: {r2, mae, rmse, n, unmeasured}, es_ssim, n, seeds, reject}`` where
        ``n`` is the number of videos.
    """
    if pipeline.measure_ef is None or pipeline.codec is None:
        raise ValueError("Generation evaluation needs a pipeline with a codec and a segmenter (measure_ef).")
    rng = np.random.default_rng(seed)
    req: dict[str, list[float]] = {k: [] for k in ("rec", "gen", "rec_reject", "gen_reject")}
    got: dict[str, list[float | None]] = {k: [] for k in req}
    es_ssim: list[float] = []
    n_videos = 0
    for i, sample in enumerate(tqdm(list(samples), desc="generation", disable=not progress, dynamic_ncols=True)):
        frames, es = _video(sample, pipeline.max_frames)
        targets = {"rec": float(sample.ef), "gen": draw_gen_ef(float(sample.ef), rng)}
        for name, ef in targets.items():
            base = seed * 1_000_003 + i * 17 + (0 if name == "rec" else 7)
            plain = pipeline.generate(frames, ef, observed=(0,), seed=base, n=seeds)
            req[name] += [ef] * seeds
            got[name] += plain.measured_ef
            if name == "rec":
                es_ssim += [float(ssim(frames[es], f[es])) for f in plain.frames]
            best = pipeline.generate(frames, ef, observed=(0,), seed=base + 3, n=seeds, reject=reject)
            req[f"{name}_reject"] += [ef] * seeds
            got[f"{name}_reject"] += best.measured_ef
        n_videos += 1
    if n_videos == 0:
        raise ValueError("No videos to evaluate the generator on.")
    out = {k: agreement(req[k], got[k]) for k in req}
    return {**out, "es_ssim": float(np.mean(es_ssim)), "n": n_videos, "seeds": seeds, "reject": reject}
