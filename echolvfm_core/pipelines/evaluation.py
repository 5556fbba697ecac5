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
segmenter cannot measure counts in ``unmeasured`` and is left out of the agreement. The time per video (encode the
observed frame, run the flow, decode; without the EF measurement) is the mean over the Rec and Gen calls without
rejection. A linear baseline runs the same protocol at its number of steps, with or without guidance.

:func:`seed_spread` measures how generative the generator is: per video, loops from several noise seeds at each of
two requests some EF points apart; the spread of the measured EF (and of the end-systolic frame) over seeds beside
the difference that the request makes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

from ..data.prepared import LoopSample
from ..metrics import ssim
from ..preprocess import resample_time
from .counterfactual import CounterfactualPipeline

__all__ = ["GEN_EF_RANGE", "agreement", "cycle_frames", "draw_gen_ef", "evaluate_generation", "seed_spread"]

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


def cycle_frames(sample: LoopSample, max_frames: int) -> tuple[np.ndarray, int]:
    """Frames float (T, S, S) in [0, 1] of the loop (a whole cycle in at most ``max_frames``) and its ES index."""
    echo = sample.to_echo()
    if echo.n_frames > max_frames:
        echo = resample_time(echo, echo.fps * max_frames / echo.n_frames)
    frames = echo.frames[:max_frames].astype(np.float32)  # rounding may leave one frame more
    return frames, min(int(echo.info.es_index), len(frames) - 1)


def evaluate_generation(pipeline: CounterfactualPipeline, samples: Iterable[LoopSample], seeds: int = 3,
                        reject: int = 4, seed: int = 0, progress: bool = True, steps: int | None = None,
                        guidance: float = 1.0) -> dict:
    """Run the Table 1 protocol (module docstring) on ``samples`` (the alpha = 1 loops, one per patient).

    Args:
        pipeline: generator + codec + ``measure_ef`` (the segmenter's), e.g. ``CounterfactualPipeline.from_pretrained``.
        samples: the videos. seeds: noise draws per video and condition. reject: candidates with rejection sampling
            (1: no rejection rows).
        seed: seeds the Gen EF draws and the noise (video ``i`` uses noise seeds derived from ``seed`` and ``i``).
        steps, guidance: passed to :meth:`CounterfactualPipeline.generate` (default: the flow's own number of
            steps; guidance for linear flows only).

    Returns:
        ``{rec, gen[, rec_reject, gen_reject]: {r2, mae, rmse, n, unmeasured}, es_ssim, n, seeds, reject, steps,
        guidance, ms_per_video, flow_ms_per_video}`` where ``n`` is the number of videos and the times are means per
        generated loop (``ms_per_video``: encode + flow + decode).
    """
    if pipeline.measure_ef is None or pipeline.codec is None:
        raise ValueError("Generation evaluation needs a pipeline with a codec and a segmenter (measure_ef).")
    if reject < 1:
        raise ValueError(f"reject must be >= 1; got {reject}.")
    rng = np.random.default_rng(seed)
    conditions = ("rec", "gen", "rec_reject", "gen_reject") if reject > 1 else ("rec", "gen")
    req: dict[str, list[float]] = {k: [] for k in conditions}
    got: dict[str, list[float | None]] = {k: [] for k in req}
    es_ssim: list[float] = []
    times: dict[str, list[float]] = {"all": [], "flow": []}
    n_videos = 0
    used_steps = None
    for i, sample in enumerate(tqdm(list(samples), desc="generation", disable=not progress, dynamic_ncols=True)):
        frames, es = cycle_frames(sample, pipeline.max_frames)
        targets = {"rec": float(sample.ef), "gen": draw_gen_ef(float(sample.ef), rng)}
        for name, ef in targets.items():
            base = seed * 1_000_003 + i * 17 + (0 if name == "rec" else 7)
            plain = pipeline.generate(frames, ef, observed=(0,), seed=base, n=seeds, steps=steps, guidance=guidance)
            used_steps = plain.steps
            t = plain.timings_ms
            times["all"].append((t["encode"] + t["flow"] + t["decode"]) / seeds)
            times["flow"].append(t["flow"] / seeds)
            req[name] += [ef] * seeds
            got[name] += plain.measured_ef
            if name == "rec":
                es_ssim += [float(ssim(frames[es], f[es])) for f in plain.frames]
            if reject > 1:
                best = pipeline.generate(frames, ef, observed=(0,), seed=base + 3, n=seeds, reject=reject, steps=steps,
                                         guidance=guidance)
                req[f"{name}_reject"] += [ef] * seeds
                got[f"{name}_reject"] += best.measured_ef
        n_videos += 1
    if n_videos == 0:
        raise ValueError("No videos to evaluate the generator on.")
    out = {k: agreement(req[k], got[k]) for k in req}
    return {**out, "es_ssim": float(np.mean(es_ssim)), "n": n_videos, "seeds": seeds, "reject": reject,
            "steps": used_steps, "guidance": guidance, "ms_per_video": float(np.mean(times["all"])),
            "flow_ms_per_video": float(np.mean(times["flow"]))}


def seed_spread(pipeline: CounterfactualPipeline, samples: Iterable[LoopSample],
                measure: Callable[[np.ndarray], tuple[float, int]], seeds: int = 8, gap: float = 10.0, seed: int = 0,
                progress: bool = True) -> dict:
    """How much the noise changes a loop, beside how much the request does.

    Per video (end-diastole observed, as in the Table 1 protocol) ``seeds`` loops are generated at each of the two
    requests ``true EF -/+ gap / 2`` (kept inside 10-90 %), and each loop is measured with ``measure``.

    Args:
        pipeline: generator + codec (its own ``measure_ef`` is not used). samples: the videos.
        measure: ``f(frames (T, H, W) in [0, 1]) -> (EF in %, end-systolic frame index)``; a ValueError marks the
            loop unmeasured.
        seeds: noise draws per request; gap: EF points between the two requests.

    Returns:
        ``ef_sd``: the standard deviation over seeds of the measured EF, averaged over videos and both requests;
        ``es_frame_sd``: the same for the end-systolic frame; ``request_gap``: mean over videos of the difference
        between the mean measured EF at the higher and at the lower request (``gap`` for a perfect generator);
        ``pixel_sd``: the standard deviation over seeds of each pixel (grey levels in [0, 1]), averaged over pixels,
        frames, requests and videos; ``n`` videos, ``seeds``, ``gap``, ``unmeasured`` loops.
    """
    if pipeline.codec is None:
        raise ValueError("The seed spread needs a pipeline with a codec.")
    if seeds < 2:
        raise ValueError(f"seeds must be >= 2 to measure a spread; got {seeds}.")
    lo, hi = 10.0, 90.0
    ef_sd, es_sd, gaps, pixel_sd = [], [], [], []
    unmeasured = n_videos = 0
    for i, sample in enumerate(tqdm(list(samples), desc="seed spread", disable=not progress, dynamic_ncols=True)):
        frames, _ = cycle_frames(sample, pipeline.max_frames)
        centre = float(np.clip(float(sample.ef), lo + gap / 2, hi - gap / 2))
        means = []
        for k, ef in enumerate((centre - gap / 2, centre + gap / 2)):
            cf = pipeline.generate(frames, ef, observed=(0,), seed=seed * 1_000_003 + i * 17 + k, n=seeds)
            pixel_sd.append(float(cf.frames.std(axis=0, ddof=1).mean()))
            found = []
            for loop in cf.frames:
                try:
                    found.append(measure(loop))
                except ValueError as exc:
                    log.warning("seed spread: unmeasured loop: %s", exc)
            unmeasured += seeds - len(found)
            if len(found) >= 2:
                ef_sd.append(float(np.std([f[0] for f in found], ddof=1)))
                es_sd.append(float(np.std([f[1] for f in found], ddof=1)))
            means.append(float(np.mean([f[0] for f in found])) if found else None)
        if None not in means:
            gaps.append(means[1] - means[0])
        n_videos += 1
    if n_videos == 0:
        raise ValueError("No videos to measure the seed spread on.")
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {"ef_sd": mean(ef_sd), "es_frame_sd": mean(es_sd), "request_gap": mean(gaps), "pixel_sd": mean(pixel_sd),
            "n": n_videos, "seeds": seeds, "gap": gap, "unmeasured": unmeasured}
