"""The study's synthetic cases: counterfactuals rendered on the acquired frames of a pool beat
(:class:`~echolvfm_core.pipelines.render.BeatRenderer`: the generator's displacement field moves the beat's own
frames, at its resolution and frame rate), and the version string that names a generator's exact weights."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .pool import PoolBeat

__all__ = ["BeatSynth", "model_version"]


def model_version(generator_dir: str | os.PathLike) -> str:
    """``"<folder> sha256:<12 hex>"``: the hash covers every file of the generator folder (weights, config, flow)."""
    folder = Path(generator_dir)
    files = sorted(p for p in folder.iterdir() if p.is_file())
    if not files:
        raise FileNotFoundError(2, "No generator files in this folder", str(folder))
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode("utf-8") + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return f"{folder.resolve()} sha256:{digest.hexdigest()[:12]}"


class BeatSynth:
    """``synth(beat, ef, seed) -> frames``: the heart of a pool beat at EF ``ef`` (%), rendered on its acquired
    frames (float32 (N, S, S) in [0, 1], the beat's size and frame count).

    Args:
        renderer: a :class:`~echolvfm_core.pipelines.render.BeatRenderer` over the generator and its codec.
        seg: the segmenter (:class:`~echolvfm_core.estimators.segmentation.SegmentationEF`); when given, each beat's
            motion gain is calibrated on the beat as the app does (:meth:`BeatRenderer.calibrate`), so a study
            shows the counterfactuals the app shows.
    """

    def __init__(self, renderer, seg=None):
        self.renderer = renderer
        self.seg = seg
        self._prepared: dict[int, object] = {}

    def __call__(self, beat: PoolBeat, ef: float, seed: int) -> np.ndarray:
        key = id(beat)
        if key not in self._prepared:  # a beat gives several cases: encode it once
            prepared = self.renderer.prepare(beat.frames, beat.mask, beat.fps, ed=0, source_ef=beat.ef, es=beat.es)
            if self.seg is not None:
                self.renderer.calibrate(prepared, lambda g: float(self.seg.measure(g).ef))
            self._prepared[key] = (beat, prepared)
        return self.renderer.render(self._prepared[key][1], float(ef), seed=int(seed)).frames
