"""EF posterior by conditional diffusion regression (MCSDR style): an echo loop -> samples of its EF.

The network (:class:`~echolvfm_core.models.ef_denoiser.EFDenoiser`) predicts the noise of the z-scored EF given
clip features. Inference encodes the clip once, then runs DDIM (Song et al., "Denoising Diffusion Implicit
Models", ICLR 2021, eq. 12 with eta = 0) for ``steps`` steps on ``trajectories`` noise draws at once: one batched
denoiser call per step with the cached conditioning. The samples, mapped back to EF in % and clipped to [0, 100],
form the posterior. A model whose config holds a ``spread_scale`` other than 1 (set in training on held-out
patients, :func:`conformal_spread_scale`) scales the draws about their mean by it before clipping.

    est = EFPosteriorEstimator.from_pretrained()           # assets/ef_regressor
    post = est.posterior(pre.echo.frames, seed=0)          # frames (T, 112, 112) in [0, 1]
    post.mean, post.sd, post.p05, post.p95, post.samples
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler

from ..echo import Echo, EchoLoadError, check_grey_stack
from ..metrics import crps_samples, interval_coverage
from ..models.ef_denoiser import SEX_CODES, EFDenoiser

__all__ = [
    "EFPosterior",
    "EFPosteriorEstimator",
    "clip_indices",
    "video_clip",
    "ddim_sample",
    "make_train_scheduler",
    "make_sampler",
    "evaluate_ef_regression",
    "conformal_spread_scale",
    "default_ef_regressor_dir",
]

#: Noise schedule of training (DDPM, Ho et al. 2020) with the cosine betas of Nichol and Dhariwal (ICML 2021).
TRAIN_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                      clip_sample=False)


def default_ef_regressor_dir() -> Path:
    """The bundled EF posterior model: ``assets/ef_regressor`` at the repository root."""
    return Path(__file__).resolve().parents[2] / "assets" / "ef_regressor"


def make_train_scheduler() -> DDPMScheduler:
    """The DDPM scheduler used in training (saved next to the model as ``scheduler_config.json``)."""
    return DDPMScheduler(**TRAIN_SCHEDULE)


def make_sampler(train_scheduler_config) -> DDIMScheduler:
    """A DDIM sampler for a training schedule (clean final step; timesteps chosen by :func:`ddim_sample`)."""
    return DDIMScheduler.from_config(
        train_scheduler_config, timestep_spacing="leading", set_alpha_to_one=True, clip_sample=False
    )


@dataclass(frozen=True)
class EFPosterior:
    """Posterior of the ejection fraction of one loop.

    Attributes:
        samples: (N,) EF draws in %, clipped to [0, 100].
        mean, sd: mean and standard deviation of the samples, in %.
        p05, p95: 5th and 95th percentiles, in % (the central 90 % interval).
        clipped: True when at least one draw fell outside [0, 100] before clipping.
        seed: the seed of the initial noise.
        steps: DDIM steps used.
    """

    samples: np.ndarray
    mean: float
    sd: float
    p05: float
    p95: float
    clipped: bool
    seed: int
    steps: int

    @classmethod
    def from_samples(cls, raw: np.ndarray, seed: int, steps: int) -> EFPosterior:
        """Summarise raw EF draws (%, unclipped) into a posterior clipped to [0, 100]."""
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        if raw.size == 0 or not np.all(np.isfinite(raw)):
            raise ValueError("EF samples must be a non-empty array of finite values.")
        clipped = bool(np.any((raw < 0) | (raw > 100)))
        s = np.clip(raw, 0.0, 100.0)
        p05, p95 = np.percentile(s, [5, 95])
        return cls(s, float(s.mean()), float(s.std(ddof=1)) if s.size > 1 else 0.0, float(p05), float(p95),
                   clipped, int(seed), int(steps))

    def to_dict(self) -> dict:
        """JSON-friendly summary."""
        return {
            "mean": round(self.mean, 3),
            "sd": round(self.sd, 3),
            "p05": round(self.p05, 3),
            "p95": round(self.p95, 3),
            "clipped": self.clipped,
            "samples": [round(float(x), 3) for x in self.samples],
            "seed": self.seed,
            "steps": self.steps,
        }


def clip_indices(n_frames: int, num_frames: int, offset: float = 0.0, cycles: float = 1.0) -> np.ndarray:
    """Frame indices of a clip of ``num_frames`` frames spread evenly over ``cycles`` passes of a loop.

    Inference uses offset 0 and one cycle (the whole loop, first and last frame included); training draws the
    offset (a fraction of the loop, 0-1) and the number of cycles to vary the phase and the heart rate.

    Returns:
        int64 (num_frames,) indices in [0, n_frames).
    """
    if n_frames < 1 or num_frames < 1:
        raise ValueError(f"n_frames and num_frames must be positive; got {n_frames} and {num_frames}.")
    if cycles == 1.0 and offset == 0.0:
        return np.rint(np.linspace(0, n_frames - 1, num_frames)).astype(np.int64)
    pos = offset * n_frames + np.linspace(0.0, cycles * n_frames, num_frames, endpoint=False)
    return np.floor(pos).astype(np.int64) % n_frames


def video_clip(frames: np.ndarray | torch.Tensor, num_frames: int, size: int,
               indices: np.ndarray | None = None) -> torch.Tensor:
    """The encoder's input: a loop (T, H, W) in [0, 1] -> float32 (1, num_frames, size, size).

    Frames are picked by ``indices`` (default :func:`clip_indices` over the whole loop) and resized with area
    averaging.
    """
    x = torch.as_tensor(np.asarray(frames) if not torch.is_tensor(frames) else frames)
    if x.ndim != 3:
        raise ValueError(f"frames must be a (T, H, W) stack; got shape {tuple(x.shape)}.")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    idx = clip_indices(x.shape[0], num_frames) if indices is None else np.asarray(indices)
    x = x[torch.as_tensor(idx)].float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x[None], size=(size, size), mode="area")[0]
    return x[None]


def ddim_sample(
    eps_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sampler: DDIMScheduler,
    n: int,
    steps: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from ``n`` standard-normal draws; ``eps_fn(y_t (n,), t (n,)) -> eps (n,)``.

    The ``steps`` timesteps sit in the middle of equal intervals of the training schedule (950, 850, ..., 50 for
    10 of 1000 steps). Starting at the last training step instead (abar ~ 2e-9 with cosine betas) would make the
    clean-sample estimate ``(y - sqrt(1 - abar) eps) / sqrt(abar)`` amplify any noise-prediction error ~2e4-fold;
    at t = 950 (abar ~ 6e-3) the amplification is ~13 and the N(0, 1) start differs from the true marginal by a
    shift of ``sqrt(abar) * y0`` ~ 0.08 y0, which shrinks samples toward the mean by ~4 % of their z-score.

    ``sampler`` is not modified (a copy is stepped). Returns the (n,) clean samples.
    """
    total = int(sampler.config.num_train_timesteps)
    if not 1 <= steps <= total // 2:
        raise ValueError(f"steps must be between 1 and {total // 2}; got {steps}.")
    sched = DDIMScheduler.from_config(sampler.config, timestep_spacing="leading", steps_offset=(total // steps) // 2)
    sched.set_timesteps(steps, device=device)
    y = torch.randn(n, generator=generator, dtype=dtype).to(device)
    for t in sched.timesteps:
        eps = eps_fn(y, t.expand(n))
        y = sched.step(eps, t, y, eta=0.0).prev_sample
    return y


def _sex_code(sex: str | None) -> int:
    if sex is None:
        return -1
    key = str(sex).strip().upper()[:1]
    if key not in SEX_CODES:
        raise ValueError(f"sex must be 'F', 'M' or None; got {sex!r}.")
    return SEX_CODES[key]


class EFPosteriorEstimator:
    """Diffusion-regression EF posterior (inference only).

    Args:
        model: a trained :class:`EFDenoiser`.
        sampler: a :class:`DDIMScheduler` for the model's training schedule (see :func:`make_sampler`).
        steps: DDIM steps (10).
        trajectories: posterior draws per loop (40), denoised together in one batch per step.
        device: torch device (default: the model's).
    """

    def __init__(self, model: EFDenoiser, sampler: DDIMScheduler, steps: int = 10, trajectories: int = 40,
                 device: str | torch.device | None = None):
        if steps < 1 or trajectories < 2:
            raise ValueError(f"steps must be >= 1 and trajectories >= 2; got {steps} and {trajectories}.")
        self.model = model.eval()
        if device is not None:
            self.model.to(device)
        self.sampler = sampler
        self.steps = steps
        self.trajectories = trajectories
        self._cache: tuple[str, torch.Tensor] | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device | None = None,
                        **kwargs) -> EFPosteriorEstimator:
        """Load a folder with the model (``config.json`` + weights) and ``scheduler_config.json`` (default: the
        bundled ``assets/ef_regressor``)."""
        path = Path(path) if path is not None else default_ef_regressor_dir()
        for name in ("config.json", "scheduler_config.json"):
            if not (path / name).is_file():
                raise FileNotFoundError(2, f"No EF posterior model ({name}) in this folder", str(path))
        model = EFDenoiser.from_pretrained(str(path))
        sampler = make_sampler(DDPMScheduler.load_config(str(path)))
        return cls(model, sampler, device=device, **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------------------------------ features
    def _check_frames(self, frames: np.ndarray) -> np.ndarray:
        f = np.asarray(frames)
        if f.ndim == 3 and f.shape[0] < 2:
            raise EchoLoadError(
                "The EF posterior needs a loop of at least 2 frames, but the input is a single still frame.")
        if f.ndim == 3 and f.shape[1] != f.shape[2]:
            raise ValueError(
                f"frames must be square (the model grid of preprocess()); got {f.shape[1]} x {f.shape[2]}.")
        return check_grey_stack(f)

    @torch.no_grad()
    def features(self, frames: np.ndarray) -> torch.Tensor:
        """Clip features (1, feature_dim) of a loop (T, S, S) in [0, 1]; the last loop's features are cached."""
        f = self._check_frames(frames)
        key = hashlib.sha1(np.ascontiguousarray(f, dtype=np.float32).tobytes()).hexdigest() + str(f.shape)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        c = self.model.config
        clip = video_clip(f.astype(np.float32, copy=False), c.num_frames, c.frame_size)
        feats = self.model.encode(clip[:, None].to(self.device, self.model.dtype))
        self._cache = (key, feats)
        return feats

    # ------------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, features: torch.Tensor, age: float | None = None, sex: str | None = None, seed: int = 0,
               trajectories: int | None = None, steps: int | None = None) -> EFPosterior:
        """Posterior from precomputed ``features`` (1, feature_dim); age in years, sex "F" / "M" (None: unknown)."""
        n = trajectories or self.trajectories
        steps = steps or self.steps
        if features.ndim != 2 or features.shape[0] != 1:
            raise ValueError(f"features must be (1, feature_dim); got {tuple(features.shape)}.")
        if age is not None and not (math.isfinite(age) and 0 <= age <= 120):
            raise ValueError(f"age must be in years (0-120) or None; got {age}.")
        dev, dt = self.device, self.model.dtype
        age_t = torch.full((1,), float("nan") if age is None else float(age), device=dev)
        sex_t = torch.full((1,), _sex_code(sex), dtype=torch.long, device=dev)
        cond = self.model.condition(features.to(dev, dt), age_t, sex_t)  # (1, hidden): shared by all trajectories
        gen = torch.Generator().manual_seed(int(seed))
        z = ddim_sample(lambda y, t: self.model(y.to(dt), t[:1], cond=cond), self.sampler, n, steps, gen, device=dev)
        raw = self.model.denormalise(z.float()).cpu().numpy()
        scale = float(self.model.config.get("spread_scale", 1.0))
        if scale != 1.0:
            raw = raw.mean() + scale * (raw - raw.mean())
        return EFPosterior.from_samples(raw, seed, steps)

    def posterior(self, frames: np.ndarray, age: float | None = None, sex: str | None = None,
                  seed: int = 0) -> EFPosterior:
        """EF posterior of a loop: frames float (T, S, S) in [0, 1] on the model grid, T >= 2."""
        return self.sample(self.features(frames), age=age, sex=sex, seed=seed)

    def posterior_echo(self, echo: Echo, seed: int = 0) -> EFPosterior:
        """Posterior of a preprocessed :class:`Echo`, with its age and sex when known."""
        echo.require_loop("The EF posterior")
        return self.posterior(echo.frames, age=echo.info.age, sex=echo.info.sex, seed=seed)


def conformal_spread_scale(means, p05, p95, truth, level: float = 0.9) -> float:
    """Split-conformal scale of the posterior's central interval on held-out labels.

    Finds the smallest ``k`` such that the interval ``[mean - k (mean - p05), mean + k (p95 - mean)]`` holds the
    label for at least ``level`` of the loops, with the finite-sample quantile ``ceil((n + 1) level) / n`` of split
    conformal prediction (Angelopoulos and Bates, "A Gentle Introduction to Conformal Prediction", 2021, section 1),
    so that the widened 5-95 % interval covers about 90 % of new loops from the same population. ``k`` < 1 narrows
    an over-dispersed posterior.

    Args:
        means, p05, p95: the posteriors' means and 5th / 95th percentiles, in %.
        truth: the held-out labels, in %.
    """
    m, lo, hi, y = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (means, p05, p95, truth))
    if not len(m) == len(lo) == len(hi) == len(y) or len(y) == 0:
        raise ValueError("conformal_spread_scale needs equally long, non-empty arrays.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); got {level}.")
    # the k each label needs: its distance from the mean in units of the half-interval on its side
    needed = np.where(y < m, (m - y) / np.maximum(m - lo, 1e-6), (y - m) / np.maximum(hi - m, 1e-6))
    q = min(1.0, math.ceil((len(y) + 1) * level) / len(y))
    return float(np.quantile(needed, q, method="higher"))


def evaluate_ef_regression(estimator: EFPosteriorEstimator, loops: Iterable, seed: int = 0,
                           details: bool = False) -> dict:
    """Accuracy and calibration of the posterior on loops with known EF (e.g. ``alpha == 1`` prepared loops).

    Args:
        loops: objects with ``frames`` (T, S, S) uint8 or float in [0, 1] and ``ef`` in %.
        seed: seed of every posterior (the same noise for every loop).
        details: also return ``posteriors``: per-loop lists ``mean``, ``p05``, ``p95`` and ``truth``.

    Returns:
        ``{mae, rmse, r2, crps, coverage90, n}``: errors of the posterior mean in EF points, R^2 of the mean,
        mean sample CRPS, share of true EFs inside [p05, p95].
    """
    means, truth, lo, hi, crps = [], [], [], [], []
    for loop in loops:
        f = np.asarray(loop.frames)
        f = f.astype(np.float32) / 255.0 if f.dtype == np.uint8 else f.astype(np.float32)
        post = estimator.posterior(f, seed=seed)
        means.append(post.mean)
        truth.append(float(loop.ef))
        lo.append(post.p05)
        hi.append(post.p95)
        crps.append(crps_samples(post.samples, float(loop.ef)))
    if not truth:
        raise ValueError("evaluate_ef_regression got no loops.")
    m, y = np.asarray(means), np.asarray(truth)
    err = m - y
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    out = {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "r2": float(1.0 - np.sum(err**2) / ss_tot) if ss_tot > 0 else float("nan"),
        "crps": float(np.mean(crps)),
        "coverage90": interval_coverage(lo, hi, y),
        "n": int(len(y)),
    }
    if details:
        out["posteriors"] = {"mean": means, "p05": lo, "p95": hi, "truth": truth}
    return out
