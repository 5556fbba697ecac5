"""EF counterfactuals (inference only): observed frames of a heart + a requested EF -> a whole loop, in one step.

    pipe = CounterfactualPipeline.from_pretrained()          # assets/generator, assets/vae, assets/segmenter
    cf = pipe.generate(frames, ef=35.0, observed=[0], seed=0)          # frames (T, 112, 112) in [0, 1]
    cf.frames[0], cf.measured_ef, cf.latency_ms
    cf = pipe.generate(frames, ef=35.0, reject=4, seed=0)  # rejection sampling: best of 4 by measured EF

Observed frame ``k`` of the input is placed at position ``k`` of the generated clip (same timeline); the clip has
``length`` frames (default: the input's, at most the network's ``max_frames``; ``max_frames`` for a still). Only
the observed frames are encoded. A models folder holds ``generator/``
(:class:`~echolvfm_core.models.unet.EchoVelocityUNet` + ``flow.json``), ``vae/``
(:class:`~echolvfm_core.models.vae.EchoCodec`) and optionally ``segmenter/``
(:class:`~echolvfm_core.estimators.segmentation.SegmentationEF`, the ``measure_ef`` of rejection sampling).
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..echo import Echo
from ..flows import Conditioning, LinearFlow, LinearFlowConfig, MeanFlow, MeanFlowConfig
from ..models.unet import EchoVelocityUNet

__all__ = [
    "Counterfactual",
    "CounterfactualPipeline",
    "FLOW_FILE",
    "default_models_dir",
    "save_generator",
    "load_generator",
]

log = logging.getLogger(__name__)

#: File next to the generator's weights naming its flow ("meanflow" or "linear") and the flow's config.
FLOW_FILE = "flow.json"
EF_RANGE = (1.0, 99.0)


def default_models_dir() -> Path:
    """The bundled models: ``assets/`` at the repository root (``generator/``, ``vae/``, ``segmenter/``)."""
    return Path(__file__).resolve().parents[2] / "assets"


def save_generator(net: EchoVelocityUNet, path: str | Path, flow: str = "meanflow", flow_config=None) -> None:
    """Write ``net`` (safetensors + config.json) and :data:`FLOW_FILE` to ``path``."""
    if flow not in ("meanflow", "linear"):
        raise ValueError(f"flow must be 'meanflow' or 'linear'; got {flow!r}.")
    path = Path(path)
    net.save_pretrained(str(path))
    cfg = asdict(flow_config) if flow_config is not None else {}
    (path / FLOW_FILE).write_text(json.dumps({"flow": flow, "config": cfg}, indent=2))


def load_generator(path: str | Path, device=None) -> MeanFlow | LinearFlow:
    """The flow wrapper (network inside, eval mode) saved by :func:`save_generator` at ``path``."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(2, "No generator (config.json) in this folder", str(path))
    net = EchoVelocityUNet.from_pretrained(str(path)).eval().to(device or "cpu")
    spec = json.loads((path / FLOW_FILE).read_text()) if (path / FLOW_FILE).is_file() else {"flow": "meanflow"}
    if spec["flow"] == "linear":
        return LinearFlow(net, LinearFlowConfig(**spec.get("config", {}))).eval()
    return MeanFlow(net, MeanFlowConfig(**spec.get("config", {}))).eval()


@dataclass
class Counterfactual:
    """Result of :meth:`CounterfactualPipeline.generate`.

    Attributes:
        latents: (n, C, T, h, w) normalised latents of the returned loops (CPU, float32).
        frames: (n, T, H, W) float32 grey levels in [0, 1] when the pipeline has a codec, else None.
        requested_ef: the EF asked for, in %.
        measured_ef: EF (%) measured on each returned loop when a ``measure_ef`` is set (None where it failed).
        candidate_efs: with rejection sampling, the measured EF of every candidate (n lists of k), else None.
        observed: frame positions that were conditioned on.
        length: frames per loop; steps: network evaluations of the flow (MeanFlow; 2 per step for midpoint).
        seed: the noise seed (None: drawn from torch's global generator).
        latency_ms: wall time of the whole call (encode observed frames, flow, decode, measure).
        timings_ms: the parts of ``latency_ms``: "encode", "flow", "decode", "measure".
    """

    latents: torch.Tensor
    frames: np.ndarray | None
    requested_ef: float
    measured_ef: list[float | None] | None
    candidate_efs: list[list[float | None]] | None
    observed: tuple[int, ...]
    length: int
    steps: int
    seed: int | None
    latency_ms: float
    timings_ms: dict[str, float] = field(default_factory=dict)


class CounterfactualPipeline:
    """Generate EF counterfactual loops from observed frames (inference only).

    Args:
        flow: a :class:`~echolvfm_core.flows.MeanFlow` (one-step) or :class:`~echolvfm_core.flows.LinearFlow`
            wrapping a trained :class:`EchoVelocityUNet`.
        codec: an :class:`~echolvfm_core.models.vae.EchoCodec` (``encode`` (B, T, H, W) [0, 1] -> (B, C, T, h, w),
            ``decode`` back); needed for frame inputs and decoded outputs; latents-only use works without.
        measure_ef: ``f(frames float (T, H, W) in [0, 1]) -> EF in %`` (e.g. the segmenter's), for rejection
            sampling and ``measured_ef``; a ValueError from it marks that loop as unmeasured.
        device: where the flow runs (default: the network's device).
        segmenter: the :class:`~echolvfm_core.estimators.segmentation.SegmentationEF` behind ``measure_ef`` when
            there is one, for callers that need more of its measurement (e.g. the end-diastolic frame).
    """

    def __init__(self, flow: MeanFlow | LinearFlow, codec=None, measure_ef: Callable[[np.ndarray], float] | None = None,
                 device: str | torch.device | None = None, segmenter=None):
        self.flow = flow.eval()
        if device is not None:
            self.flow.to(device)
        if self.device.type == "cpu":
            self.flow.net.to(memory_format=torch.channels_last)  # faster convolutions on CPU, same results
        self.codec = codec
        self.measure_ef = measure_ef
        self.segmenter = segmenter

    @classmethod
    def from_pretrained(cls, models: str | Path | None = None, device: str | torch.device | None = None,
                        segmenter: bool = True) -> CounterfactualPipeline:
        """Load ``models/generator``, ``models/vae`` and (when present and ``segmenter``) ``models/segmenter``.

        ``models`` defaults to :func:`default_models_dir`. Raises FileNotFoundError when the generator or the VAE
        is missing.
        """
        from ..models.vae import EchoCodec

        root = Path(models) if models is not None else default_models_dir()
        flow = load_generator(root / "generator", device=device)
        if not (root / "vae" / "config.json").is_file():
            raise FileNotFoundError(2, "No VAE (config.json) in this folder", str(root / "vae"))
        codec = EchoCodec.from_pretrained(root / "vae", device=device)
        measure = seg = None
        if segmenter and (root / "segmenter" / "config.json").is_file():
            from ..estimators.segmentation import SegmentationEF

            seg = SegmentationEF.from_pretrained(root / "segmenter", device=device)
            measure = lambda frames: float(seg.measure(frames).ef)  # noqa: E731
        return cls(flow, codec, measure, device=device, segmenter=seg)

    @property
    def net(self) -> EchoVelocityUNet:
        return self.flow.net

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def max_frames(self) -> int:
        return int(self.net.config.max_frames)

    # ------------------------------------------------------------------------------------------------ inputs
    def _observed_latents(self, source, observed: tuple[int, ...]) -> tuple[torch.Tensor, int]:
        """(C, k, h, w) latents of the observed frames (in ``observed`` order) and the input's frame count."""
        if isinstance(source, torch.Tensor):
            lat = source[0] if source.ndim == 5 and source.shape[0] == 1 else source
            c = self.net.config.latent_channels
            if lat.ndim != 4 or lat.shape[0] != c:
                raise ValueError(
                    f"Latent input must be ({c}, T, h, w) or (1, {c}, T, h, w); got {tuple(source.shape)}.")
            self._check_observed(observed, lat.shape[1])
            return lat[:, list(observed)].float(), int(lat.shape[1])
        frames = source.frames if isinstance(source, Echo) else np.asarray(source)
        if frames.ndim != 3 or not np.issubdtype(frames.dtype, np.floating):
            raise ValueError(f"Frames must be a float (T, H, W) stack in [0, 1]; got {frames.dtype} {frames.shape}.")
        if self.codec is None:
            raise ValueError("This pipeline has no codec, so it takes latents only; load one with a VAE.")
        side = int(self.net.config.sample_size) * int(self.codec.downsample)
        if frames.shape[1:] != (side, side):
            raise ValueError(f"Frames must be {side} x {side} (the model grid; run preprocess(echo, size={side}) "
                             f"first); got {frames.shape[1]} x {frames.shape[2]}.")
        self._check_observed(observed, frames.shape[0])
        chosen = torch.from_numpy(np.ascontiguousarray(frames[list(observed)], dtype=np.float32))
        if not torch.isfinite(chosen).all() or chosen.min() < 0 or chosen.max() > 1:
            raise ValueError("Frames must be finite grey levels in [0, 1].")
        return self.codec.encode(chosen[None])[0].float(), int(frames.shape[0])

    @staticmethod
    def _check_observed(observed: tuple[int, ...], n_frames: int) -> None:
        if not observed:
            raise ValueError("Give at least one observed frame.")
        bad = [i for i in observed if not 0 <= i < n_frames]
        if bad:
            raise ValueError(f"Observed frames {bad} are outside the input's {n_frames} frames (0-{n_frames - 1}).")
        if len(set(observed)) != len(observed):
            raise ValueError(f"Observed frames must be distinct; got {list(observed)}.")

    # ------------------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        echo_or_latents: Echo | np.ndarray | torch.Tensor,
        ef: float,
        observed: Sequence[int] = (0,),
        length: int | None = None,
        steps: int | None = None,
        seed: int | None = None,
        n: int = 1,
        reject: int = 1,
        guidance: float = 1.0,
    ) -> Counterfactual:
        """Generate ``n`` loops at EF ``ef`` conditioned on the ``observed`` frames of the input.

        Args:
            echo_or_latents: an :class:`Echo` or float frames (T, H, W) in [0, 1] on the codec's grid (112 x 112;
                preprocess first), or normalised latents (C, T, h, w) / (1, C, T, h, w).
            ef: requested ejection fraction in % (1-99).
            observed: frame indices of the input to condition on; they keep their position in the output.
            length: frames to generate (default: the input's frame count capped at the network's max_frames;
                max_frames for a still).
            steps: flow steps (default 1 for MeanFlow, 25 midpoint steps for a linear flow).
            seed: noise seed; the same seed gives the same loops.
            n: loops to return.
            reject: candidates per returned loop (rejection sampling; needs a codec and ``measure_ef``); the one
                whose measured EF is closest to ``ef`` is kept.
            guidance: classifier-free guidance weight (linear flows only; 1 = none).
        """
        t_start = time.perf_counter()
        ef = float(ef)
        if not np.isfinite(ef) or not EF_RANGE[0] <= ef <= EF_RANGE[1]:
            raise ValueError(
                f"ef must be an ejection fraction in % between {EF_RANGE[0]:g} and {EF_RANGE[1]:g}; got {ef}.")
        if n < 1 or reject < 1:
            raise ValueError(f"n and reject must be >= 1; got n={n}, reject={reject}.")
        if reject > 1 and (self.codec is None or self.measure_ef is None):
            raise ValueError("Rejection sampling needs a codec and an EF measurement (a segmenter).")
        if guidance != 1.0 and not isinstance(self.flow, LinearFlow):
            raise ValueError("Classifier-free guidance applies to linear flows only; this generator is a MeanFlow.")
        observed = tuple(int(i) for i in observed)
        timings: dict[str, float] = {}

        t0 = time.perf_counter()
        obs_lat, n_input = self._observed_latents(echo_or_latents, observed)
        timings["encode"] = (time.perf_counter() - t0) * 1e3
        if length is None:  # a still gets a whole clip of max_frames
            length = min(n_input, self.max_frames) if n_input > 1 else self.max_frames
        length = int(length)
        if not 1 <= length <= self.max_frames:
            raise ValueError(f"length must be between 1 and {self.max_frames} frames; got {length}.")
        if max(observed) >= length:
            raise ValueError(f"Observed frame {max(observed)} lies beyond the generated length of {length} frames.")

        c, _, h, w = obs_lat.shape
        dev = self.device
        dtype = next(self.net.parameters()).dtype
        lat = torch.zeros(1, c, length, h, w, device=dev, dtype=dtype)
        lat[0, :, list(observed)] = obs_lat.to(dev, dtype)
        obs_mask = torch.zeros(1, length, dtype=torch.bool, device=dev)
        obs_mask[0, list(observed)] = True
        cond = Conditioning.from_latents(lat, obs_mask, torch.ones_like(obs_mask), torch.tensor([ef], device=dev))
        total = n * reject
        cond = cond.repeat(total)

        t0 = time.perf_counter()
        gen = torch.Generator(dev).manual_seed(seed) if seed is not None else None
        noise = torch.randn(cond.cond.shape, generator=gen, device=dev, dtype=dtype)
        if isinstance(self.flow, LinearFlow):
            steps = 25 if steps is None else steps
            latents = self.flow.sample(cond, steps=steps, guidance=guidance, noise=noise)
        else:
            steps = 1 if steps is None else steps
            latents = self.flow.sample(cond, steps=steps, noise=noise)
        latents = latents.float().cpu()
        timings["flow"] = (time.perf_counter() - t0) * 1e3

        frames = None
        if self.codec is not None:
            t0 = time.perf_counter()
            frames = self.codec.decode(latents).float().cpu().numpy()
            timings["decode"] = (time.perf_counter() - t0) * 1e3

        measured = candidates = None
        if self.measure_ef is not None and frames is not None:
            t0 = time.perf_counter()
            efs = [self._measure(f) for f in frames]
            timings["measure"] = (time.perf_counter() - t0) * 1e3
            if reject > 1:
                groups = [efs[i * reject : (i + 1) * reject] for i in range(n)]
                best = [i * reject + _closest(g, ef) for i, g in enumerate(groups)]
                latents, frames = latents[best], frames[best]
                measured, candidates = [efs[i] for i in best], groups
            else:
                measured = efs
        return Counterfactual(
            latents=latents,
            frames=frames,
            requested_ef=ef,
            measured_ef=measured,
            candidate_efs=candidates,
            observed=observed,
            length=length,
            steps=steps,
            seed=seed,
            latency_ms=(time.perf_counter() - t_start) * 1e3,
            timings_ms=timings,
        )

    __call__ = generate

    def _measure(self, frames: np.ndarray) -> float | None:
        try:
            return float(self.measure_ef(frames))
        except ValueError as exc:  # e.g. SegmentationError: no LV found in a generated loop
            log.warning("EF measurement failed on a generated loop: %s", exc)
            return None


def _closest(efs: list[float | None], target: float) -> int:
    """Index of the measured EF closest to ``target`` (unmeasured ones last; the first on ties)."""
    dist = [abs(e - target) if e is not None else float("inf") for e in efs]
    return int(np.argmin(dist))
