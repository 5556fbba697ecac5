"""The study's synthetic cases from the bundled generator: a :data:`~app.quiz.study.SynthFn` over a
:class:`~echolvfm_core.pipelines.counterfactual.CounterfactualPipeline`, and the version string that names the
generator's exact weights in the study record."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from echolvfm_core.echo import Echo

__all__ = ["GeneratorSynth", "model_version"]


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


@dataclass
class GeneratorSynth:
    """``synth(real_echo, ef, rng) -> Echo``: the heart of ``real_echo`` at EF ``ef`` (%), generated in one step.

    The echo is brought onto the model grid (fan crop, resize), frame 0 is the observed frame, the loop lasts as
    long as the input (resampled in time to the generator's ``max_frames`` frames when longer), and pixels outside
    the input's fan are blanked, so a synthetic case has the same sector as the echo it came from. The noise seed is
    drawn from ``rng``.

    Args:
        pipeline: the loaded generator and VAE (and the segmenter when ``reject`` > 1).
        reject: rejection sampling: keep the best of this many candidates by measured EF.
    """

    pipeline: object
    reject: int = 1

    def __call__(self, echo: Echo, ef: float, rng: np.random.Generator) -> Echo:
        from echolvfm_core.preprocess import preprocess, resample_time

        side = int(self.pipeline.net.config.sample_size) * int(self.pipeline.codec.downsample)
        pre = preprocess(echo, size=side)
        loop, longest = pre.echo, self.pipeline.max_frames
        if loop.n_frames > longest:  # the same duration in the generator's frames, so the heart beats at its pace
            loop = resample_time(loop, loop.fps * longest / loop.n_frames)
            loop = loop.replace(frames=loop.frames[:longest], labels=None, labelled=())
        cf = self.pipeline.generate(loop, ef=float(ef), observed=(0,), length=loop.n_frames,
                                    seed=int(rng.integers(2**31)), reject=self.reject)
        frames = cf.frames[0] * pre.mask  # (L, side, side) float32 in [0, 1]
        return Echo(frames=frames.astype(np.float32), fps=loop.fps, source_format="synthetic", synthetic=True)
