"""Full cardiac cycles from one labelled end-diastole / end-systole pair.

Method
------
1. **Registration** (:func:`register_pairs`): a stationary velocity field ``v`` on a coarse grid (2 x g x g,
   upsampled bicubically) is fitted so that the ED label maps warped by ``phi = exp(v)`` match the ES label maps
   (mean squared difference of clipped signed distance maps of LV cavity, myocardium and left atrium), with a
   local normalised cross-correlation term that aligns the speckle texture and a finite-difference smoothness
   penalty. ``exp`` is computed by scaling and squaring (Arsigny et al., MICCAI 2006), so every ``exp(s v)`` is a
   smooth invertible map and ``exp(-v)`` is the inverse of ``exp(v)``.
2. **Timing** (:class:`CycleTiming`): the deformation phase ``s`` in [0, 1] over one cycle (0 = ED, 1 = ES):
   systole with an ease-in/ease-out ejection, then isovolumic relaxation, rapid filling, diastasis and the atrial
   kick. Frame 0 is ED (``s = 0``), frame ``es_index`` has ``s = 1`` exactly; the loop is periodic (frame T
   would be ED again).
3. **Rendering** (:func:`render_loop`): with ``alpha = 1`` a frame is ``(1 - w) ED o exp(s v) + w ES o exp(-(1 - s) v)``
   with ``w = blend_weight(s)`` a steep smoothstep around mid-systole, so ghosting (double exposure) is limited to
   a few frames; frame 0 is the real ED image and the ES-phase frame the real ES image, bit for bit. With
   ``alpha != 1`` (a counterfactual: the same heart contracting more or less) only the ED image is warped, by
   ``exp(alpha s v)``. Labels are warped the same way (bilinear one-hot, blended with the same weights,
   argmax), so EF is measured from them, never assumed.

Displacements and velocities are in normalised grid units (``align_corners=True``: -1 and 1 are the centres of
the first and last pixel), channel 0 horizontal (x, columns), channel 1 vertical (y, rows), as
:func:`torch.nn.functional.grid_sample` expects; a stored field is therefore valid at any grid size.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "MAX_FRAMES",
    "MIN_FRAMES",
    "CardiacPair",
    "CycleTiming",
    "PairAgreement",
    "RegistrationConfig",
    "SynthLoop",
    "blend_weight",
    "exp_velocity",
    "pair_agreement",
    "register_pairs",
    "render_loop",
    "sample_timing",
    "sharpness",
    "warp",
]

#: Shortest and longest synthesised cycle, in frames.
MIN_FRAMES, MAX_FRAMES = 10, 48
_N_LABELS = 4


@dataclass(frozen=True)
class RegistrationConfig:
    """Settings of the ED -> ES registration; saved with every prepared data set.

    Attributes:
        grid: side of the coarse velocity grid (the field is 2 x grid x grid).
        work_size: side of the grid the loss is evaluated on (labels and images are area-downsampled to it).
        iterations: Adam steps.
        lr: Adam learning rate, normalised units.
        squarings: scaling-and-squaring steps of ``exp`` (``2**squarings`` sub-steps), used for rendering too.
        sdf_clip: signed distances are clipped at this many input pixels and divided by it.
        label_weight: weight of the signed-distance mean squared error.
        ncc_weight: weight of the local normalised cross-correlation (squared, in [0, 1]) of the images.
        ncc_window: side of the NCC window in work-grid pixels (odd).
        smooth_weight: weight of the mean squared finite difference of the coarse velocity.
        batch: pairs registered together (independent problems sharing tensor operations).
    """

    grid: int = 28
    work_size: int = 56
    iterations: int = 100
    lr: float = 0.05
    squarings: int = 5
    sdf_clip: float = 8.0
    label_weight: float = 10.0
    ncc_weight: float = 1.0
    ncc_window: int = 7
    smooth_weight: float = 40.0
    batch: int = 16

    def __post_init__(self) -> None:
        if self.grid < 2 or self.work_size < 8 or self.iterations < 0 or self.squarings < 0 or self.batch < 1:
            raise ValueError(f"invalid registration config: {self}.")
        if self.ncc_window < 1 or self.ncc_window % 2 == 0:
            raise ValueError(f"ncc_window must be odd and positive; got {self.ncc_window}.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CycleTiming:
    """Timing of one synthesised cardiac cycle.

    Attributes:
        n_frames: frames per cycle (frame ``n_frames`` would be the next ED).
        systole: share of the cycle from ED to ES (0-1).
        relaxation: share of diastole spent in isovolumic relaxation (no filling).
        filling_end: share of diastole at which rapid filling ends.
        filling_level: share of the stroke volume refilled by then.
        diastasis_end: share of diastole at which the atrial kick starts.
        diastasis_level: share refilled by then (the atrial kick supplies the rest).
    """

    n_frames: int
    systole: float = 0.37
    relaxation: float = 0.08
    filling_end: float = 0.42
    filling_level: float = 0.75
    diastasis_end: float = 0.76
    diastasis_level: float = 0.82

    def __post_init__(self) -> None:
        if self.n_frames < 4:
            raise ValueError(f"a cycle needs at least 4 frames; got {self.n_frames}.")
        if not (0.1 <= self.systole <= 0.7):
            raise ValueError(f"systole must be a share of the cycle in [0.1, 0.7]; got {self.systole}.")
        if not (0 <= self.relaxation < self.filling_end < self.diastasis_end < 1):
            raise ValueError("diastolic phases must satisfy 0 <= relaxation < filling_end < diastasis_end < 1.")
        if not (0 < self.filling_level <= self.diastasis_level <= 1):
            raise ValueError("refilled shares must satisfy 0 < filling_level <= diastasis_level <= 1.")

    @property
    def es_index(self) -> int:
        """Frame at end-systole (``s = 1``)."""
        return int(min(max(round(self.systole * self.n_frames), 1), self.n_frames - 2))

    def phases(self) -> np.ndarray:
        """Deformation phase of every frame: (T,) float64 in [0, 1], 0 at frame 0, exactly 1 at ``es_index``."""
        t, es = self.n_frames, self.es_index
        s = np.empty(t)
        x = np.arange(es + 1) / es
        s[: es + 1] = _ease(x)
        s[es] = 1.0
        u = (np.arange(es + 1, t) - es) / (t - es)
        knots_u = [0.0, self.relaxation, self.filling_end, self.diastasis_end, 1.0]
        knots_r = [0.0, 0.0, self.filling_level, self.diastasis_level, 1.0]
        refill = np.empty_like(u)
        for j, uj in enumerate(u):
            k = int(np.searchsorted(knots_u, uj, side="right")) - 1
            k = min(k, 3)
            frac = (uj - knots_u[k]) / (knots_u[k + 1] - knots_u[k])
            refill[j] = knots_r[k] + (knots_r[k + 1] - knots_r[k]) * _ease(frac)
        s[es + 1 :] = 1.0 - refill
        return s

    def to_dict(self) -> dict:
        return asdict(self)


def _ease(x: np.ndarray | float) -> np.ndarray:
    """Cosine ease-in/ease-out on [0, 1]."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(x, 0.0, 1.0))


def sample_timing(rng: np.random.Generator, n_frames: int | None = None) -> tuple[CycleTiming, float]:
    """Draw a cycle length, frame rate and timing.

    The length is uniform in ``MIN_FRAMES..MAX_FRAMES`` (unless given); the frame rate is uniform over the part of
    25-50 fps that puts the heart rate in 50-120 bpm (25 fps, i.e. up to 150 bpm, for cycles shorter than
    12.5 frames). Systole takes about 37 % of a cycle at 75 bpm, more at faster rates (it shortens less than the
    cycle: ``0.37 * sqrt(RR / 0.8 s)`` of the cycle, clipped to 0.30-0.45); the diastolic phases are jittered.

    Returns:
        (timing, fps).
    """
    t = int(rng.integers(MIN_FRAMES, MAX_FRAMES + 1)) if n_frames is None else int(n_frames)
    lo, hi = max(25.0, t * 50 / 60), min(50.0, t * 120 / 60)
    fps = float(rng.uniform(lo, hi)) if lo <= hi else 25.0
    rr = t / fps
    systole = float(np.clip(0.37 * math.sqrt(0.8 / rr) + rng.uniform(-0.02, 0.02), 0.30, 0.45))
    filling_end = float(rng.uniform(0.35, 0.5))
    filling_level = float(rng.uniform(0.65, 0.8))
    timing = CycleTiming(
        n_frames=t,
        systole=systole,
        relaxation=float(rng.uniform(0.04, 0.1)),
        filling_end=filling_end,
        filling_level=filling_level,
        diastasis_end=float(rng.uniform(0.68, 0.82)),
        diastasis_level=float(min(1.0, filling_level + rng.uniform(0.04, 0.1))),
    )
    return timing, fps


@dataclass
class CardiacPair:
    """One ED/ES pair on a square grid with its registration.

    Attributes:
        ed_image, es_image: uint8 (S, S) grey levels on the model grid (the real frames, exactly).
        ed_labels, es_labels: uint8 (S, S) labels (0 background, 1 LV cavity, 2 myocardium, 3 left atrium).
        velocity: float (2, g, g) stationary velocity of ED -> ES, normalised units, channels (x, y).
        mask: bool (S, S) ultrasound fan, or None; rendered frames are zero outside it.
        ed_fine, es_fine: optional uint8 (kS, kS) copies of the images on a k times finer grid (k >= 2 integer).
            Warped images are then resampled on the fine grid and area-averaged down to S, which keeps the
            speckle as sharp as in the real frames (interpolating on the model grid itself blurs it).
    """

    ed_image: np.ndarray
    es_image: np.ndarray
    ed_labels: np.ndarray
    es_labels: np.ndarray
    velocity: np.ndarray
    mask: np.ndarray | None = None
    ed_fine: np.ndarray | None = None
    es_fine: np.ndarray | None = None
    _filled: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shape = self.ed_image.shape
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"a cardiac pair needs square (S, S) images; got ED shape {shape}.")
        for name in ("es_image", "ed_labels", "es_labels"):
            if getattr(self, name).shape != shape:
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected {shape} like the ED image.")
        for name in ("ed_image", "es_image", "ed_labels", "es_labels", "ed_fine", "es_fine"):
            a = getattr(self, name)
            if a is not None and a.dtype != np.uint8:
                raise ValueError(f"{name} must be uint8; got {a.dtype}.")
        v = np.asarray(self.velocity)
        if v.ndim != 3 or v.shape[0] != 2 or v.shape[1] != v.shape[2]:
            raise ValueError(f"velocity must be (2, g, g); got shape {v.shape}.")
        if self.mask is not None and self.mask.shape != shape:
            raise ValueError(f"mask has shape {self.mask.shape}, expected {shape}.")
        if (self.ed_fine is None) != (self.es_fine is None):
            raise ValueError("give both ed_fine and es_fine, or neither.")
        if self.ed_fine is not None:
            fine = self.ed_fine.shape
            if (self.es_fine.shape != fine or len(fine) != 2 or fine[0] != fine[1] or fine[0] % shape[0]
                    or fine[0] < 2 * shape[0]):
                raise ValueError(
                    f"ed_fine and es_fine must be square grids k times the model grid {shape} (k >= 2 integer); "
                    f"got {fine} and {self.es_fine.shape}."
                )

    @property
    def size(self) -> int:
        return int(self.ed_image.shape[0])

    @property
    def factor(self) -> int:
        """Fine-grid factor k (1 without fine images)."""
        return 1 if self.ed_fine is None else self.ed_fine.shape[0] // self.size


@dataclass(frozen=True)
class SynthLoop:
    """A rendered cycle.

    Attributes:
        frames: uint8 (T, S, S), or None when rendered with ``images=False``.
        labels: uint8 (T, S, S).
        phases: (T,) deformation phase per frame (0 = ED, 1 = ES of the source pair).
        es_index: frame of peak deformation (the ES phase of the timing).
        alpha: deformation scale used.
    """

    frames: np.ndarray | None
    labels: np.ndarray
    phases: np.ndarray
    es_index: int
    alpha: float


@dataclass(frozen=True)
class PairAgreement:
    """How well a registration explains its pair (SSIM with skimage, data_range 1, at the pair's grid size).

    Attributes:
        ssim_raw: ED vs ES, unwarped (the baseline).
        ssim_es: ED warped by ``exp(v)`` vs the real ES image.
        ssim_mid: ED warped by ``exp(v / 2)`` vs ES warped by ``exp(-v / 2)`` (the two images blended at
            mid-systole).
        dice_es: mean Dice over LV, myocardium and LA of the warped ED labels vs the ES labels.
    """

    ssim_raw: float
    ssim_es: float
    ssim_mid: float
    dice_es: float


# ----------------------------------------------------------------------------------------------- field helpers


@functools.lru_cache(maxsize=8)
def _identity(size: int, dtype: torch.dtype) -> torch.Tensor:
    lin = torch.linspace(-1.0, 1.0, size, dtype=dtype)
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([xx, yy], dim=-1)[None]


def warp(src: torch.Tensor, disp: torch.Tensor, mode: str = "bilinear", padding: str = "border") -> torch.Tensor:
    """Pull ``src`` through a displacement: ``out(x) = src(x + disp(x))``.

    Args:
        src: (B, C, H, W) tensor, H == W.
        disp: (B, 2, H, W) displacement in normalised units, channels (x, y).
        mode: "bilinear", "bicubic" or "nearest".
        padding: grid_sample padding mode ("border", "zeros", "reflection").

    Returns:
        (B, C, H, W) tensor.
    """
    if disp.shape[0] != src.shape[0] or disp.shape[1] != 2 or disp.shape[2:] != src.shape[2:]:
        raise ValueError(f"displacement {tuple(disp.shape)} does not fit source {tuple(src.shape)}.")
    grid = _identity(src.shape[-1], src.dtype) + disp.permute(0, 2, 3, 1)
    return F.grid_sample(src, grid, mode=mode, padding_mode=padding, align_corners=True)


def exp_velocity(
    velocity: torch.Tensor,
    size: int,
    scale: torch.Tensor | float = 1.0,
    squarings: int = 5,
    work_size: int | None = None,
) -> torch.Tensor:
    """``exp(scale * v)`` as a displacement on a ``size`` grid, by scaling and squaring.

    Args:
        velocity: (B, 2, g, g) or (1, 2, g, g) coarse stationary velocity, normalised units.
        size: output grid side.
        scale: float or (B,) tensor of per-item multipliers (phase times alpha; negative for the inverse).
        squarings: number of squaring steps.
        work_size: grid side the squaring runs on (default ``size``); the result is upsampled bilinearly to
            ``size``. The field is smooth at the velocity grid's scale, so a grid of twice that side loses nothing
            visible and is several times faster.

    Returns:
        (B, 2, size, size) displacement.
    """
    work = size if work_size is None else int(work_size)
    v = velocity
    if v.shape[-1] != work:
        v = F.interpolate(v, size=(work, work), mode="bicubic", align_corners=True)
    if torch.is_tensor(scale):
        scale = scale.to(v.dtype).view(-1, 1, 1, 1)
    u = v * scale / (2**squarings)
    for _ in range(squarings):
        u = u + warp(u, u)
    if work != size:
        u = F.interpolate(u, size=(size, size), mode="bilinear", align_corners=True)
    return u


def blend_weight(s: np.ndarray | float, width: float = 0.3) -> np.ndarray:
    """Weight of the ES-backward image at phase ``s``: 0 up to ``0.5 - width / 2``, 1 from ``0.5 + width / 2``."""
    x = np.clip((np.asarray(s, dtype=np.float64) - 0.5) / width + 0.5, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _onehot(labels: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S) -> float32 (B, 4, S, S)."""
    lab = torch.from_numpy(np.ascontiguousarray(labels)).long()
    if lab.numel() and int(lab.max()) >= _N_LABELS:
        raise ValueError(f"labels must be 0-{_N_LABELS - 1}; found {int(lab.max())}.")
    return F.one_hot(lab, _N_LABELS).permute(0, 3, 1, 2).float()


def _grey(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, S, S) -> float32 (B, 1, S, S) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0)[:, None]


# ------------------------------------------------------------------------------------------------ registration


def _signed_distance(labels: np.ndarray, clip: float) -> np.ndarray:
    """(S, S) labels -> float32 (3, S, S) clipped signed distances of labels 1-3 (positive inside), in [-1, 1]."""
    from scipy.ndimage import distance_transform_edt

    out = np.empty((3, *labels.shape), dtype=np.float32)
    for i, k in enumerate((1, 2, 3)):
        m = labels == k
        if not m.any():
            out[i] = -1.0
            continue
        d = distance_transform_edt(~m) - distance_transform_edt(m)
        out[i] = np.clip(-d / clip, -1.0, 1.0)
    return out


def _local_ncc2(a: torch.Tensor, b: torch.Tensor, window: int) -> torch.Tensor:
    """Mean squared local normalised cross-correlation of (B, 1, H, W) images, per item: (B,) in [0, 1]."""
    p = window // 2
    x = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    m = F.avg_pool2d(F.pad(x, (p, p, p, p), mode="reflect"), window, stride=1)
    ma, mb, aa, bb, ab = m.unbind(1)
    cov = ab - ma * mb
    return (cov * cov / ((aa - ma * ma) * (bb - mb * mb) + 1e-3)).mean(dim=(1, 2))


def _check_stack(name: str, a: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 3 or a.shape[1] != a.shape[2] or a.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (B, S, S) stack; got shape {a.shape}.")
    if a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8; got {a.dtype}.")
    if shape is not None and a.shape != shape:
        raise ValueError(f"{name} has shape {a.shape}, expected {shape}.")
    return a


def register_pairs(
    ed_images: np.ndarray,
    es_images: np.ndarray,
    ed_labels: np.ndarray,
    es_labels: np.ndarray,
    config: RegistrationConfig = RegistrationConfig(),
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Fit ED -> ES stationary velocity fields for a stack of pairs.

    Args:
        ed_images, es_images: uint8 (B, S, S).
        ed_labels, es_labels: uint8 (B, S, S), labels 0-3; every map needs an LV cavity.
        config: :class:`RegistrationConfig`.
        progress: called with the number of pairs finished after each batch.

    Returns:
        float32 (B, 2, g, g) velocities, normalised units, channels (x, y).
    """
    ed_images = _check_stack("ed_images", ed_images)
    shape = ed_images.shape
    es_images = _check_stack("es_images", es_images, shape)
    ed_labels = _check_stack("ed_labels", ed_labels, shape)
    es_labels = _check_stack("es_labels", es_labels, shape)
    for name, lab in (("ed_labels", ed_labels), ("es_labels", es_labels)):
        empty = [i for i in range(len(lab)) if not (lab[i] == 1).any()]
        if empty:
            raise ValueError(f"{name} item(s) {empty[:5]} have no LV cavity (label 1); cannot register them.")
        if lab.max() >= _N_LABELS:
            raise ValueError(f"{name} must hold labels 0-{_N_LABELS - 1}; found {int(lab.max())}.")
    out = np.empty((shape[0], 2, config.grid, config.grid), dtype=np.float32)
    for start in range(0, shape[0], config.batch):
        sl = slice(start, start + config.batch)
        out[sl] = _register_batch(ed_images[sl], es_images[sl], ed_labels[sl], es_labels[sl], config)
        if progress is not None:
            progress(len(out[sl]))
    return out


def _register_batch(ed_i, es_i, ed_l, es_l, cfg: RegistrationConfig) -> np.ndarray:
    work = cfg.work_size

    def down(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(work, work), mode="area") if x.shape[-1] != work else x

    sd_ed = down(torch.from_numpy(np.stack([_signed_distance(lab, cfg.sdf_clip) for lab in ed_l])))
    sd_es = down(torch.from_numpy(np.stack([_signed_distance(lab, cfg.sdf_clip) for lab in es_l])))
    src = torch.cat([sd_ed, down(_grey(ed_i))], dim=1)
    target_img = down(_grey(es_i))
    v = torch.zeros(len(ed_i), 2, cfg.grid, cfg.grid, requires_grad=True)
    opt = torch.optim.Adam([v], lr=cfg.lr)
    for _ in range(cfg.iterations):
        moved = warp(src, exp_velocity(v, work, 1.0, cfg.squarings))
        label_term = ((moved[:, :3] - sd_es) ** 2).mean(dim=(1, 2, 3))
        image_term = _local_ncc2(moved[:, 3:], target_img, cfg.ncc_window)
        smooth = ((v[..., 1:, :] - v[..., :-1, :]) ** 2).mean(dim=(1, 2, 3)) + (
            (v[..., :, 1:] - v[..., :, :-1]) ** 2
        ).mean(dim=(1, 2, 3))
        loss = (cfg.label_weight * label_term - cfg.ncc_weight * image_term + cfg.smooth_weight * smooth).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return v.detach().numpy()


# --------------------------------------------------------------------------------------------------- rendering


def render_loop(
    pair: CardiacPair,
    timing: CycleTiming,
    alpha: float = 1.0,
    config: RegistrationConfig = RegistrationConfig(),
    blend_width: float = 0.3,
    images: bool = True,
) -> SynthLoop:
    """Render one cardiac cycle of ``pair``.

    Args:
        pair: the registered :class:`CardiacPair`.
        timing: :class:`CycleTiming` (length and phases).
        alpha: deformation scale; exactly 1 blends in the real ES image (frame ``es_index`` is the real ES),
            other values warp only the ED image by ``exp(alpha s v)``. Must be in (0, 3].
        config: the registration's config (its ``squarings`` and ``work_size`` are used for ``exp``).
        blend_width: width of the ED -> ES cross-fade in phase units (see :func:`blend_weight`).
        images: False renders only the labels (``frames`` is None), e.g. to measure EF; they are the same labels
            a full render gives.

    Returns:
        :class:`SynthLoop`; frame 0 is the ED image bit for bit (and, for alpha = 1, frame ``es_index`` the ES
        image).
    """
    if not (0 < alpha <= 3):
        raise ValueError(f"alpha must be in (0, 3]; got {alpha}.")
    size, t = pair.size, timing.n_frames
    phases = timing.phases()
    real_es = alpha == 1.0
    w = blend_weight(phases, blend_width) if real_es else np.zeros(t)
    vel = torch.from_numpy(np.asarray(pair.velocity, dtype=np.float32))[None]
    sources = [("ed", pair.ed_labels, alpha * phases, 1.0 - w)]
    if real_es:
        sources.append(("es", pair.es_labels, -(1.0 - phases), w))
    side = size * pair.factor if images else 1
    grey = torch.zeros(2, t, 1, side, side)
    soft = torch.zeros(t, _N_LABELS, size, size)
    with torch.no_grad():
        for j, (which, labels, scale, weight) in enumerate(sources):
            idx = torch.from_numpy(np.flatnonzero(weight > 0))
            if len(idx) == 0:
                continue
            if images:
                grey[j, idx] = _warp_grey(pair, which, vel, torch.from_numpy(scale[idx]).float(), config)
            disp = exp_velocity(vel, size, torch.from_numpy(scale[idx]).float(), config.squarings, config.work_size)
            wt = torch.from_numpy(weight[idx]).float().view(-1, 1, 1, 1)
            soft[idx] += wt * warp(_onehot(labels[None]).expand(len(idx), -1, -1, -1), disp)
    labels = _argmax_labels(soft)
    # Phase 0 is the real ED and (alpha = 1) phase 1 the real ES, exactly.
    labels[phases == 0.0] = pair.ed_labels
    if real_es:
        labels[phases == 1.0] = pair.es_labels
    if not images:
        return SynthLoop(frames=None, labels=labels, phases=phases, es_index=timing.es_index, alpha=float(alpha))
    with torch.no_grad():
        img = _blend(grey[0], grey[1], torch.from_numpy(w).float(), 2.0 * pair.factor) if real_es else grey[0]
        if pair.factor > 1:
            img = F.avg_pool2d(img, pair.factor)
    frames = np.clip(np.rint(img[:, 0].numpy() * 255.0), 0, 255).astype(np.uint8)
    if pair.mask is not None:
        frames *= pair.mask
    frames[phases == 0.0] = pair.ed_image
    if real_es:
        frames[phases == 1.0] = pair.es_image
    return SynthLoop(frames=frames, labels=labels, phases=phases, es_index=timing.es_index, alpha=float(alpha))


def _argmax_labels(soft: torch.Tensor) -> np.ndarray:
    """(T, 4, S, S) soft one-hot -> uint8 (T, S, S) argmax (ties to the lower label), without torch's slow
    strided argmax."""
    best, labels = soft[:, 0], torch.zeros(soft.shape[0], *soft.shape[2:], dtype=torch.uint8)
    for k in range(1, soft.shape[1]):
        better = soft[:, k] > best
        labels[better] = k
        best = torch.where(better, soft[:, k], best)
    return labels.numpy()


def _support(pair: CardiacPair) -> np.ndarray:
    """bool (kS, kS): where the warp source images show the fan (their non-zero pixels inside the model-grid fan,
    holes filled); computed once per pair."""
    if "support" not in pair._filled:
        from scipy.ndimage import binary_fill_holes

        k = pair.factor
        ed, es = (pair.ed_fine, pair.es_fine) if k > 1 else (pair.ed_image, pair.es_image)
        seen = (ed > 0) | (es > 0)
        if pair.mask is not None:
            seen &= np.kron(pair.mask, np.ones((k, k), dtype=bool))
        pair._filled["support"] = binary_fill_holes(seen)
    return pair._filled["support"]


def _warp_source(pair: CardiacPair, which: str) -> np.ndarray:
    """The image ("ed" or "es") to warp: on the fine grid when there is one, outside of the fan filled (see
    :func:`_fill_outside`); computed once per pair."""
    if which not in pair._filled:
        src = getattr(pair, f"{which}_fine") if pair.factor > 1 else getattr(pair, f"{which}_image")
        pair._filled[which] = _fill_outside(src, _support(pair), margin=pair.factor)
    return pair._filled[which]


def _warp_grey(pair: CardiacPair, which: str, vel: torch.Tensor, scale: torch.Tensor,
               config: RegistrationConfig) -> torch.Tensor:
    """Warp the ED or ES image by ``exp(scale v)`` for each scale: (n, 1, kS, kS) float in [0, 1] on the fine grid,
    zero outside the sources' fan (so the fan's edge looks as in the real frames)."""
    src = _warp_source(pair, which)
    disp = exp_velocity(vel, src.shape[-1], scale, config.squarings, config.work_size)
    moved = warp(_grey(src[None]).expand(len(scale), -1, -1, -1), disp, mode="bicubic", padding="border").clamp(0, 1)
    return moved * torch.from_numpy(_support(pair))


def _fill_outside(image: np.ndarray, mask: np.ndarray, margin: int) -> np.ndarray:
    """Copy of ``image`` with the outside of the fan filled with mirrored fan content.

    The fan (``mask`` shrunk by ``margin`` pixels, which drops its dark rim) is described in polar coordinates about
    its apex (top centre); a pixel beyond the fan's depth or angle takes the value mirrored back across the arc or
    the straight edge, so speckle-like texture, not black or streaks, is what tissue motion near the edge pulls
    in. Pixels whose mirror image still falls outside take the nearest fan value.
    """
    from scipy.ndimage import binary_erosion, distance_transform_edt

    core = binary_erosion(mask, iterations=margin) if margin > 0 else mask
    if core.all() or not core.any():
        return image
    ys, xs = np.nonzero(core)
    top = ys.min()
    apex = (top - margin - 0.5, float(xs[ys == top].mean()))
    dy, dx = ys - apex[0], xs - apex[1]
    depth, half = float(np.hypot(dy, dx).max()), float(np.abs(np.arctan2(dx, dy)).max())
    h, w = mask.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = np.hypot(yy - apex[0], xx - apex[1])
    theta = np.arctan2(xx - apex[1], yy - apex[0])
    r = np.where(r > depth, 2 * depth - r, r)
    theta = np.where(np.abs(theta) > half, np.sign(theta) * (2 * half - np.abs(theta)), theta)
    my = np.clip(np.rint(apex[0] + r * np.cos(theta)), 0, h - 1).astype(np.intp)
    mx = np.clip(np.rint(apex[1] + r * np.sin(theta)), 0, w - 1).astype(np.intp)
    ok = core[my, mx]
    _, (ny, nx) = distance_transform_edt(~core, return_distances=True, return_indices=True)
    src_y = np.where(core, yy.astype(np.intp), np.where(ok, my, ny))
    src_x = np.where(core, xx.astype(np.intp), np.where(ok, mx, nx))
    return image[src_y, src_x]


def _gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), replicate padding."""
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma * sigma))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _blend(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor, sigma: float) -> torch.Tensor:
    """Cross-fade (T, 1, H, W) images with weights w (T,) keeping the speckle's contrast.

    The low-pass parts (Gaussian, ``sigma`` pixels) blend linearly; the high-pass parts (the speckle) blend with
    weights divided by ``sqrt((1 - w)^2 + w^2)``, so two uncorrelated speckle patterns mixed half and half keep
    the variance of one instead of losing half of it (the washed-out look of a plain cross-fade).
    """
    wb = w.view(-1, 1, 1, 1)
    mixed = (1 - wb) * a + wb * b
    part = (wb > 0) & (wb < 1)
    idx = torch.nonzero(part.view(-1)).view(-1)
    if len(idx) == 0:
        return mixed
    la, lb = _gaussian(a[idx], sigma), _gaussian(b[idx], sigma)
    ww = wb[idx]
    gain = 1.0 / torch.sqrt((1 - ww) ** 2 + ww**2)
    mixed[idx] = ((1 - ww) * la + ww * lb + gain * ((1 - ww) * (a[idx] - la) + ww * (b[idx] - lb))).clamp(0, 1)
    return mixed


# ------------------------------------------------------------------------------------------------- diagnostics


def pair_agreement(pair: CardiacPair, config: RegistrationConfig = RegistrationConfig()) -> PairAgreement:
    """SSIM and Dice of a registered pair (see :class:`PairAgreement`), images rendered as in :func:`render_loop`."""
    from skimage.metrics import structural_similarity

    size, k = pair.size, pair.factor
    vel = torch.from_numpy(np.asarray(pair.velocity, dtype=np.float32))[None]
    with torch.no_grad():
        fwd = _warp_grey(pair, "ed", vel, torch.tensor([1.0, 0.5]), config)
        bwd = _warp_grey(pair, "es", vel, torch.tensor([-0.5]), config)
        moved = torch.cat([fwd, bwd])
        if k > 1:
            moved = F.avg_pool2d(moved, k)
        moved = np.rint(moved[:, 0].numpy() * 255.0) / 255.0
        if pair.mask is not None:
            moved = moved * pair.mask
        disp = exp_velocity(vel, size, 1.0, config.squarings, config.work_size)
        lab = _argmax_labels(warp(_onehot(pair.ed_labels[None]), disp))[0]
    ed, es = pair.ed_image / 255.0, pair.es_image / 255.0

    def ssim(x: np.ndarray, y: np.ndarray) -> float:
        return float(structural_similarity(x, y, data_range=1.0))

    dice = []
    for label in (1, 2, 3):
        x, y = lab == label, pair.es_labels == label
        denom = x.sum() + y.sum()
        dice.append(2.0 * (x & y).sum() / denom if denom else 1.0)
    return PairAgreement(ssim(ed, es), ssim(moved[0], es), ssim(moved[1], moved[2]), float(np.mean(dice)))


def sharpness(frames: np.ndarray, mask: np.ndarray | None = None) -> float:
    """High-frequency energy: mean squared Laplacian (3 x 3, 4-neighbour) of uint8 frames (T, S, S) scaled to
    [0, 1], over the pixels inside ``mask`` (bool (S, S); all when None). Compare loop frames with real frames: a
    ratio near 1 means no blur or ghosting."""
    f = np.asarray(frames, dtype=np.float64) / 255.0
    if f.ndim == 2:
        f = f[None]
    lap = 4 * f[:, 1:-1, 1:-1] - f[:, :-2, 1:-1] - f[:, 2:, 1:-1] - f[:, 1:-1, :-2] - f[:, 1:-1, 2:]
    if mask is not None:
        inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        lap = lap[:, inner]
    return float(np.mean(lap**2))
