"""A procedural apical four-chamber echo phantom with exact labels and a requested EF.

Never real: every output is marked ``source = "phantom"`` (and ``synthetic = True`` as an :class:`Echo`). It is
for tests, CI-sized smoke training and, clearly labelled, as an extra training source.

Image model, on a square grid in the geometry :func:`echolvfm_core.preprocess.preprocess` gives real echoes (fan
apex at the top centre, the fan's width filling the square):

* anatomy, randomised per ``anatomy_seed``: a bullet-shaped LV cavity (half-ellipse along a tilted long axis, apex
  fixed, narrower base) inside a myocardium that thickens in systole, the left atrium below the mitral annulus,
  the right ventricle left of the septum, the right atrium below it, a bright pericardium;
* motion: the LV shortens along its axis (the base descends toward the apex) and narrows; the split between
  longitudinal and radial shortening is per anatomy and the amplitude is solved so that the area-length EF of
  the rasterised labels matches the request; the atria fill in systole;
* valves: mitral and tricuspid leaflets, closed in systole, open while the ventricles fill;
* texture: a fixed complex scatterer field in tissue coordinates, carried by the motion and convolved with an
  anisotropic point-spread function, so speckle is fully developed (Rayleigh amplitude) and moves with the
  tissue; echogenicity per structure; depth attenuation with imperfect gain compensation; acoustic dropout
  bands; near-field clutter; log compression; zero outside the fan.

Labels (every frame, exact): 0 background, 1 LV cavity, 2 myocardium, 3 left atrium, rasterised from the same
shapes that set the echogenicity.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..echo import ClinicalInfo, Echo
from ..ef import ejection_fraction, lv_volumes
from .loops import CycleTiming

__all__ = ["EF_RANGE", "PhantomAnatomy", "PhantomLoop", "phantom_echo", "render_phantom", "sample_anatomy"]

#: EFs (%) a phantom can be asked for.
EF_RANGE = (5.0, 85.0)

#: A phantom's measured EF is brought within this many points of the request when the pixel grid allows.
_EF_TOLERANCE = 0.5

#: Mean backscatter per structure (before speckle, attenuation and log compression), chosen so that grey-level
#: means per label roughly match preprocessed CAMUS frames (cavity darker than the wall, hazy blood).
_ECHO = {"tissue": 0.13, "myo": 0.3, "rv_wall": 0.26, "peri": 0.8, "blood": 0.035, "valve": 0.55}


@dataclass(frozen=True)
class PhantomAnatomy:
    """Randomised anatomy and imaging settings of one phantom heart.

    Attributes:
        seed: the seed it was drawn from (also seeds the scatterer field).
        (Lengths below are fractions of the fan's depth.)
        half_angle: fan half-angle in degrees.
        apex: (depth, lateral offset from the fan's centre line) of the LV apex.
        tilt: angle of the LV long axis from vertical, degrees (positive leans the base to the right).
        length: apex to mitral annulus at end-diastole.
        width: cavity half-width scale at end-diastole.
        wall: myocardial thickness at end-diastole.
        longitudinal: share of the volume change due to long-axis shortening (0-1).
        la_size, ra_size, rv_size: atrial and right-ventricular size factors.
        gain: overall gain; attenuation: depth attenuation (nepers over the fan's depth); dropout: list of
            (angle in degrees, width in degrees, depth) of acoustic dropout bands.
    """

    seed: int
    half_angle: float
    apex: tuple[float, float]
    tilt: float
    length: float
    width: float
    wall: float
    longitudinal: float
    la_size: float
    ra_size: float
    rv_size: float
    gain: float
    attenuation: float
    dropout: tuple[tuple[float, float, float], ...]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PhantomLoop:
    """One rendered phantom cycle.

    Attributes:
        frames: uint8 (T, S, S); labels: uint8 (T, S, S), exact.
        ef: EF in % measured (area-length) from ``labels``; requested_ef: what was asked.
        ed_index: 0; es_index: the timing's ES phase (peak contraction).
        fps: frame rate; anatomy: the :class:`PhantomAnatomy`; source: always "phantom".
    """

    frames: np.ndarray
    labels: np.ndarray
    ef: float
    requested_ef: float
    ed_index: int
    es_index: int
    fps: float
    anatomy: PhantomAnatomy
    source: str = "phantom"


def sample_anatomy(seed: int) -> PhantomAnatomy:
    """Draw a phantom anatomy from ``seed`` (deterministic)."""
    rng = np.random.default_rng([int(seed), 0x9A7])
    n_drop = int(rng.integers(0, 3))
    dropout = tuple(
        (float(rng.uniform(-30, 35)), float(rng.uniform(5, 12)), float(rng.uniform(0.3, 0.7))) for _ in range(n_drop)
    )
    return PhantomAnatomy(
        seed=int(seed),
        half_angle=float(rng.uniform(28, 40)),
        apex=(float(rng.uniform(0.13, 0.2)), float(rng.uniform(-0.02, 0.05))),
        tilt=float(rng.uniform(0, 10)),
        length=float(rng.uniform(0.40, 0.50)),
        width=float(rng.uniform(0.11, 0.14)),
        wall=float(rng.uniform(0.05, 0.07)),
        longitudinal=float(rng.uniform(0.25, 0.4)),
        la_size=float(rng.uniform(0.85, 1.15)),
        ra_size=float(rng.uniform(0.8, 1.1)),
        rv_size=float(rng.uniform(0.8, 1.1)),
        gain=float(rng.uniform(0.85, 1.15)),
        attenuation=float(rng.uniform(0.6, 1.4)),
        dropout=dropout,
    )


# ---------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Frame:
    """Shape parameters at one phase (pixels)."""

    length: float
    width: float
    wall: float
    la: float
    ra: float
    rv: float
    valve_open: float


class _Grid:
    """Pixel coordinates and the LV axis frame of one anatomy on a ``size`` grid."""

    def __init__(self, anatomy: PhantomAnatomy, size: int) -> None:
        self.size = size
        half = math.radians(anatomy.half_angle)
        # As preprocess() frames a fan: its width fills the square when wider than tall, else its depth does.
        self.radius = min((size - 1) / 2 / math.sin(half), size - 1.0)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        centre = (size - 1) / 2
        self.apex = np.array([anatomy.apex[0] * self.radius, centre + anatomy.apex[1] * self.radius])
        tilt = math.radians(anatomy.tilt)
        self.axis = np.array([math.cos(tilt), math.sin(tilt)])  # (dy, dx) from apex toward base
        self.normal = np.array([-math.sin(tilt), math.cos(tilt)])  # toward the lateral (right) wall
        dy, dx = yy - self.apex[0], xx - self.apex[1]
        self.t = dy * self.axis[0] + dx * self.axis[1]
        self.u = dy * self.normal[0] + dx * self.normal[1]
        self.r = np.hypot(yy, xx - centre)
        self.phi = np.degrees(np.arctan2(xx - centre, yy))
        self.fan = (np.abs(self.phi) <= anatomy.half_angle) & (self.r <= self.radius)


def _profile(x: np.ndarray) -> np.ndarray:
    """Half-width profile of a ventricle along its axis (0 apex, 1 base): half-ellipse, narrower base."""
    xc = np.clip(x, 0.0, 1.0)
    return np.sqrt(np.clip(1.0 - (1.0 - xc) ** 2, 0.0, None)) * (1.0 - 0.18 * xc**4)


def _shapes(g: _Grid, f: _Frame) -> dict[str, np.ndarray]:
    """Boolean maps of every structure at one phase."""
    t, u = g.t, g.u
    L, b, w = f.length, f.width, f.wall
    cavity = (t >= 0) & (t <= L) & (np.abs(u) <= b * _profile(t / L))
    t_out = t + 0.8 * w
    outer = (t_out >= 0) & (t <= L) & (np.abs(u) <= (b + w) * _profile(t_out / (L + 0.8 * w)))
    myo = outer & ~cavity
    # Left atrium: ellipse hanging below the annulus, slightly lateral.
    la_a, la_b = 0.30 * L * f.la, 0.95 * b * f.la
    la = (t > L) & (((t - (L + la_a * 0.92)) / la_a) ** 2 + ((u - 0.15 * b) / la_b) ** 2 <= 1.0)
    # Right ventricle: a shorter, narrower half-ellipse septal to the LV, sharing the septum.
    rv_len, rv_b = 0.72 * L * f.rv, 0.8 * b * f.rv
    rv_t0 = L - rv_len
    rv_c = -(b + w + rv_b * 0.95)
    rv_x = (t - rv_t0) / rv_len
    rv = (rv_x >= 0) & (t <= L) & (np.abs(u - rv_c) <= rv_b * _profile(rv_x)) & ~outer
    rv_wall_b = rv_b + 0.45 * w
    rv_wall = (rv_x >= -0.06) & (t <= L) & (np.abs(u - rv_c) <= rv_wall_b * _profile(rv_x + 0.06)) & ~rv & ~outer
    ra_a, ra_b = 0.26 * L * f.ra, 0.8 * b * f.ra
    ra = (t > L) & (((t - (L + ra_a * 0.95)) / ra_a) ** 2 + ((u - rv_c) / ra_b) ** 2 <= 1.0) & ~la
    # Pericardium: a bright shell lateral to the LV and behind the atria.
    lat = (u > 0) & (t <= L) & (np.abs(u) <= (b + w + 0.04 * g.radius) * _profile(t_out / (L + 0.8 * w))) & ~outer
    behind = (t > L + 2.1 * la_a) & (t < L + 2.1 * la_a + 0.045 * g.radius) & (np.abs(u - 0.5 * rv_c) < 2.2 * b)
    peri = lat | behind
    valves = _valves(g, f, L, b, rv_t0, rv_c, rv_b)
    return {"cavity": cavity, "myo": myo, "la": la, "rv": rv, "rv_wall": rv_wall, "ra": ra, "peri": peri,
            "valves": valves}


def _segment_distance(g: _Grid, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the segment p0-p1 ((t, u) axis coordinates)."""
    d = p1 - p0
    pt, pu = g.t - p0[0], g.u - p0[1]
    h = np.clip((pt * d[0] + pu * d[1]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    return np.hypot(pt - h * d[0], pu - h * d[1])


def _valves(g: _Grid, f: _Frame, L: float, b: float, rv_t0: float, rv_c: float, rv_b: float) -> np.ndarray:
    """Mitral and tricuspid leaflets: closed across the annulus, swinging toward the apex as they open."""
    out = np.zeros_like(g.t, dtype=bool)
    thick = max(0.6, 0.007 * g.radius)
    for base_t, centre, half, length in (
        (L, 0.0, b * _profile(np.array(1.0)) * 0.98, 0.55 * b),
        (L, rv_c, rv_b * _profile(np.array(1.0)) * 0.95, 0.5 * rv_b),
    ):
        half = float(half)
        for side in (-1.0, 1.0):
            hinge = np.array([base_t, centre + side * half])
            closed = np.array([base_t + 0.08 * b, centre]) - hinge
            opened = np.array([-length * 0.9, -side * 0.25 * length])
            direction = ((1 - f.valve_open) * closed / np.linalg.norm(closed)
                         + f.valve_open * opened / np.linalg.norm(opened))
            direction /= max(np.linalg.norm(direction), 1e-9)
            reach = min(length, np.linalg.norm(closed)) if f.valve_open < 0.5 else length
            out |= _segment_distance(g, hinge, hinge + direction * reach) <= thick
    return out


def _frame_params(anatomy: PhantomAnatomy, g: _Grid, s: float, kl: float, kb: float, valve_open: float,
                  ef: float) -> _Frame:
    thicken = 1.0 + 0.9 * ef / 100.0 * s
    return _Frame(
        length=anatomy.length * g.radius * (1 - s * (1 - kl)),
        width=anatomy.width * g.radius * (1 - s * (1 - kb)),
        wall=anatomy.wall * g.radius * thicken,
        la=anatomy.la_size * (1 + 0.18 * s),
        ra=anatomy.ra_size * (1 + 0.12 * s),
        rv=anatomy.rv_size * (1 - 0.12 * s),
        valve_open=valve_open,
    )


def _labels(shapes: dict[str, np.ndarray], fan: np.ndarray) -> np.ndarray:
    lab = np.zeros(fan.shape, dtype=np.uint8)
    lab[shapes["la"]] = 3
    lab[shapes["myo"]] = 2
    lab[shapes["cavity"]] = 1
    lab[~fan] = 0
    return lab


def _split(ef: float, longitudinal: float) -> tuple[float, float]:
    """Long-axis and width ratios ES/ED for a volume ratio 1 - EF (V ~ L * b^2)."""
    ratio = 1.0 - ef / 100.0
    return ratio**longitudinal, ratio ** ((1.0 - longitudinal) / 2.0)


def _solve_contraction(anatomy: PhantomAnatomy, g: _Grid, ef: float) -> tuple[float, float, float]:
    """Long-axis and width ratios whose rasterised labels give area-length EF ``ef``; returns (kl, kb, measured).

    The measured EF is a step function of the contraction (the apex and annulus move pixel by pixel), so a few
    fixed-point steps are followed, when they miss by more than ``_EF_TOLERANCE``, by a scan of nearby requests.
    """
    ed = _labels(_shapes(g, _frame_params(anatomy, g, 0.0, 1.0, 1.0, 0.0, ef)), g.fan)
    v_ed = float(lv_volumes(ed)[0])

    def measured(asked: float) -> tuple[float, float, float]:
        kl, kb = _split(asked, anatomy.longitudinal)
        es = _labels(_shapes(g, _frame_params(anatomy, g, 1.0, kl, kb, 0.0, ef)), g.fan)
        return kl, kb, float(ejection_fraction(v_ed, lv_volumes(es)[0]))

    asked = ef
    best = measured(asked)
    for _ in range(4):
        if abs(best[2] - ef) <= _EF_TOLERANCE:
            return best
        asked = float(np.clip(asked + (ef - best[2]), 0.5, 95.0))
        trial = measured(asked)
        if abs(trial[2] - ef) < abs(best[2] - ef):
            best = trial
    for offset in np.arange(-6.0, 6.01, 0.25):
        if abs(best[2] - ef) <= _EF_TOLERANCE:
            break
        trial = measured(float(np.clip(ef + offset, 0.5, 95.0)))
        if abs(trial[2] - ef) < abs(best[2] - ef):
            best = trial
    return best


def _valve_opening(phases: np.ndarray) -> np.ndarray:
    """Mitral opening per frame: open while the ventricle fills (phase falling), closed otherwise, smoothed."""
    s = np.asarray(phases)
    nxt = np.roll(s, -1)
    nxt[-1] = 0.0  # the cycle wraps to ED
    filling = np.clip((s - nxt) * 12.0, 0.0, 1.0)
    return np.clip(np.convolve(np.pad(filling, 1, mode="wrap"), [0.25, 0.5, 0.25], mode="valid"), 0.0, 1.0)


# ------------------------------------------------------------------------------------------------------ render


def render_phantom(
    anatomy: PhantomAnatomy | int,
    ef: float,
    timing: CycleTiming,
    fps: float,
    size: int = 112,
) -> PhantomLoop:
    """Render one phantom cycle at a requested EF.

    Args:
        anatomy: a :class:`PhantomAnatomy` or the seed to draw one from.
        ef: requested EF in %, within :data:`EF_RANGE`.
        timing: :class:`CycleTiming` (frame 0 is ED, ``timing.es_index`` ES).
        fps: frame rate stored with the loop.
        size: grid side in pixels (>= 32).

    Returns:
        :class:`PhantomLoop` whose ``ef`` (measured from its labels) is within 2 points of ``ef``.
    """
    if not (EF_RANGE[0] <= ef <= EF_RANGE[1]):
        raise ValueError(f"requested EF must be in {EF_RANGE[0]:g}-{EF_RANGE[1]:g} %; got {ef}.")
    if size < 32:
        raise ValueError(f"phantom size must be at least 32 pixels; got {size}.")
    if not (fps > 0):
        raise ValueError(f"fps must be positive; got {fps}.")
    if isinstance(anatomy, (int, np.integer)):
        anatomy = sample_anatomy(int(anatomy))
    g = _Grid(anatomy, size)
    kl, kb, _ = _solve_contraction(anatomy, g, ef)
    phases = timing.phases()
    opening = _valve_opening(phases)
    t = timing.n_frames
    labels = np.empty((t, size, size), dtype=np.uint8)
    echo_map = np.empty((t, size, size), dtype=np.float32)
    for i, s in enumerate(phases):
        shapes = _shapes(g, _frame_params(anatomy, g, float(s), kl, kb, float(opening[i]), ef))
        labels[i] = _labels(shapes, g.fan)
        echo_map[i] = _echogenicity(shapes, g)
    frames = _image(anatomy, g, echo_map, phases, kl, kb)
    vols = lv_volumes(labels)
    es = timing.es_index
    measured = float(ejection_fraction(vols[0], vols[es]))
    return PhantomLoop(frames, labels, measured, float(ef), 0, es, float(fps), anatomy)


def _echogenicity(shapes: dict[str, np.ndarray], g: _Grid) -> np.ndarray:
    """Mean backscatter per pixel (before speckle) from the structure maps."""
    e = np.full(g.t.shape, _ECHO["tissue"], dtype=np.float32)
    e[shapes["myo"]] = _ECHO["myo"]
    e[shapes["rv_wall"]] = _ECHO["rv_wall"]
    e[shapes["peri"]] = _ECHO["peri"]
    for blood in ("cavity", "la", "rv", "ra"):
        e[shapes[blood]] = _ECHO["blood"]
    e[shapes["valves"]] = _ECHO["valve"]
    return e


def _image(anatomy: PhantomAnatomy, g: _Grid, echo_map: np.ndarray, phases: np.ndarray, kl: float,
           kb: float) -> np.ndarray:
    """Speckle, attenuation, dropout, clutter and log compression: uint8 (T, S, S)."""
    size = g.size
    gen = torch.Generator().manual_seed(anatomy.seed * 7919 + 17)
    # Complex scatterers seen through an anisotropic PSF (finer along the beam than across it), in tissue
    # coordinates; the motion below carries the pattern with the tissue.
    field = _blur(torch.randn(1, 2, size, size, generator=gen), 0.8 * size / 112, 1.4 * size / 112)
    moved = F.grid_sample(
        field.expand(len(phases), -1, -1, -1), _motion_grid(anatomy, g, phases, kl, kb),
        mode="bilinear", padding_mode="reflection", align_corners=True,
    )
    amp = torch.sqrt(moved[:, 0] ** 2 + moved[:, 1] ** 2)
    amp = amp / amp.mean()
    depth = torch.from_numpy(g.r / g.radius)
    tgc = torch.exp(-anatomy.attenuation * depth) * (1 + 0.6 * anatomy.attenuation * depth)
    phi = torch.from_numpy(g.phi)
    drop = torch.ones_like(depth)
    for angle, width, strength in anatomy.dropout:
        drop = drop * (1 - strength * torch.exp(-((phi - angle) ** 2) / (2 * (width / 2) ** 2)) * (depth > 0.25))
    clutter = 0.3 * torch.exp(-depth / 0.1)
    gain = (tgc * anatomy.gain)
    signal = (torch.from_numpy(echo_map) * drop + clutter) * gain * amp
    noise = torch.sqrt(-2.0 * torch.log1p(-torch.rand(signal.shape, generator=gen))) * 0.005  # Rayleigh
    c = 40.0
    img = torch.log1p(c * (signal + noise)) / math.log1p(c * 1.6)
    img = img.clamp(0, 1) * torch.from_numpy(g.fan)
    return np.rint(img.numpy() * 255).astype(np.uint8)


def _motion_grid(anatomy: PhantomAnatomy, g: _Grid, phases: np.ndarray, kl: float, kb: float) -> torch.Tensor:
    """Sampling grid (T, S, S, 2) taking each frame pixel to its tissue point at end-diastole.

    LV-axis scaling about the apex (long axis by ``kl``, width by ``kb`` at ES), fading out away from the heart;
    computed on a coarse grid and upsampled (the motion is smooth).
    """
    coarse = 29
    step = (g.size - 1) / (coarse - 1)
    yy, xx = np.mgrid[0:coarse, 0:coarse].astype(np.float32) * step
    dy0, dx0 = yy - g.apex[0], xx - g.apex[1]
    t = dy0 * g.axis[0] + dx0 * g.axis[1]
    u = dy0 * g.normal[0] + dx0 * g.normal[1]
    s = np.asarray(phases, dtype=np.float32)[:, None, None]
    centre_t = anatomy.length * g.radius * 0.75
    weight = np.exp(-((t - centre_t) ** 2 + u**2) / (2 * (0.35 * g.radius) ** 2))
    dt = weight * (t / (1 - s * (1 - kl)) - t)
    du = weight * (u / (1 - s * (1 - kb)) - u)
    scale = 2.0 / (g.size - 1)
    disp = np.stack([dt * g.axis[1] + du * g.normal[1], dt * g.axis[0] + du * g.normal[0]], axis=1) * scale
    disp = F.interpolate(torch.from_numpy(disp.astype(np.float32)), size=(g.size, g.size), mode="bilinear",
                         align_corners=True)
    lin = torch.linspace(-1, 1, g.size)
    yy_t, xx_t = torch.meshgrid(lin, lin, indexing="ij")
    return torch.stack([xx_t, yy_t], dim=-1)[None] + disp.permute(0, 2, 3, 1)


def _blur(x: torch.Tensor, sigma_y: float, sigma_x: float) -> torch.Tensor:
    c = x.shape[1]
    for sigma, horizontal in ((sigma_x, True), (sigma_y, False)):
        r = max(1, math.ceil(3 * sigma))
        k = torch.exp(-(torch.arange(-r, r + 1, dtype=x.dtype) ** 2) / (2 * sigma * sigma))
        k = k / k.sum()
        if horizontal:
            x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        else:
            x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return x


def phantom_echo(loop: PhantomLoop) -> Echo:
    """The loop as an :class:`Echo` (frames in [0, 1], exact labels on every frame), marked synthetic."""
    t = loop.frames.shape[0]
    return Echo(
        frames=loop.frames.astype(np.float32) / 255.0,
        fps=loop.fps,
        source_format="phantom",
        labels=loop.labels.copy(),
        labelled=tuple(range(t)),
        info=ClinicalInfo(view="4CH", ef=loop.ef, ed_index=loop.ed_index, es_index=loop.es_index),
        synthetic=True,
    )
