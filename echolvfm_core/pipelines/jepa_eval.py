"""The EchoJEPA section of ``echolvfm evaluate``: the bundled EF probe on prepared loops, and Fréchet distances in the
encoder's feature space (``fvd_jepa``, ``fid_jepa``; :mod:`echolvfm_core.estimators.jepa`) between generated and
real loops, or between the real loops and the cached training-split statistics when no generator is present."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..estimators.jepa import (
    PROBE_DIR,
    STATS_FILE,
    FeatureStats,
    encode_clips,
    fid_jepa,
    fvd_jepa,
    loop_clips,
    predict,
)
from ..models.jepa import AttentiveProbe, EchoJEPA
from .counterfactual import CounterfactualPipeline

__all__ = ["evaluate_jepa"]


def _generated_loops(models: Path, loops, seed: int, device: str) -> list[np.ndarray]:
    """One generated loop per alpha = 1 loop: its ED frame observed, its EF requested (uint8 (T, S, S) each)."""
    pipe = CounterfactualPipeline.from_pretrained(models, device=device, segmenter=False)
    out = []
    for i, row in enumerate(loops.manifest):
        if abs(float(row["alpha"]) - 1.0) < 1e-6:
            loop = loops[i]
            cf = pipe.generate(loop.frames.astype(np.float32) / 255.0, ef=float(np.clip(loop.ef, 1, 99)),
                               observed=(0,), seed=seed + i)
            out.append(np.rint(cf.frames[0] * 255).astype(np.uint8))
    return out


def evaluate_jepa(folder: Path, loops, device: str = "cpu", seed: int = 0) -> dict:
    """The ``jepa`` section of ``echolvfm evaluate``: probe_mae, fvd_jepa, fid_jepa, n (+ what was compared).

    Args:
        folder: an EchoJEPA folder with its probe (:data:`PROBE_DIR`) and, for the real-vs-real floor, the cached
            training-split statistics (:data:`STATS_FILE`).
        loops: a ``PreparedLoops`` view (items with ``frames`` uint8 (T, S, S), manifest rows with ``ef`` and
            ``alpha``). device: where the models run. seed: seeds the generated loops.

    ``probe_mae``: the bundled attentive probe on all of ``loops`` (EF points). With a generator in the models
    folder (``folder.parent / "generator"``), one loop is generated per alpha = 1 loop and the Fréchet distances
    compare the generated loops with the split's real loops; without one, they compare the split's real loops
    with the cached training-split statistics (a real-vs-real floor, not a generation score).
    """
    model = EchoJEPA.from_pretrained(folder).to(device).eval()
    probe = AttentiveProbe.from_pretrained(Path(folder) / PROBE_DIR).eval()
    cfg = model.config
    frames = [loops[i].frames for i in range(len(loops))]
    real = encode_clips(model.encoder, loop_clips(frames, cfg.num_frames, cfg.frame_size))
    ef = np.array([float(r["ef"]) for r in loops.manifest])
    result = {"probe_mae": float(np.abs(predict(probe, real) - ef).mean())}
    grid = model.encoder.grid
    generator = Path(folder).parent / "generator"
    if (generator / "config.json").exists():
        generated = _generated_loops(Path(folder).parent, loops, seed, device)
        tokens = encode_clips(model.encoder, loop_clips(generated, cfg.num_frames, cfg.frame_size))
        reference = FeatureStats.from_tokens(real, grid)
        compared = "generated loops (ED frame observed, loop EF requested) vs the split's real loops"
    else:
        tokens, reference = real, FeatureStats.load(Path(folder) / STATS_FILE)
        compared = "no generator: the split's real loops vs cached training-split real statistics (real-vs-real floor)"
    return {**result, "fvd_jepa": fvd_jepa(tokens, grid, reference), "fid_jepa": fid_jepa(tokens, grid, reference),
            "n": len(tokens), "compared": compared}
