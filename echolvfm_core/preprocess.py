"""Bring any echo onto the model grid: find the ultrasound fan, blank what lies outside it, crop, pad and resize.

The same steps serve scanner cines (DICOM, video; burned-in text, ECG trace and rulers around the fan) and CAMUS
ED/ES stills (a fan on a black background), so that after :func:`preprocess` both look alike: the fan's apex at the
top centre of a square, the fan filling the square's width, everything outside the fan exactly 0.

    sector = find_sector(echo.frames)           # where the fan is, in the input's pixel coordinates
    pre = preprocess(echo, size=112, fps=None)  # pre.echo on the model grid, pre.display for the UI

For an ED/ES pair of one patient compute the sector once from both frames (``find_sector(np.stack([ed, es]))``) and
pass it to both calls, so that both frames get the same crop.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from .echo import Echo, EchoLoadError

__all__ = ["Sector", "CropGeometry", "Preprocessed", "find_sector", "preprocess", "resample_time", "square_window"]

NO_SECTOR = "No ultrasound sector was found in the image; expected a B-mode echo with a fan-shaped sector."

# Detection constants. Grey levels are in [0, 1]; lengths are fractions of the longer image side.
_DETECT_SIDE = 256  # detection runs on per-pixel maps shrunk to at most this many pixels a side
_SMOOTH = 0.02  # box filter size for the temporal-variation and intensity maps
_MOTION_FLOOR = 0.002  # temporal std (after smoothing) that counts as moving tissue, at least
_INTENSITY_STEP = 0.04  # a still's fan must be this much brighter than its background (5th percentile)
_CONTRAST = 3.0  # mean signal (std or grey level) inside the fan over the median outside it, at least
_TIP_STEP = 0.01  # rows of the fan's tip must be this much brighter than the background, on average
_MIN_FRACTION = 0.05  # a fan covers at least this share of the image
_MAX_FILL = 0.92  # a fan fills at most this share of its bounding box (a rectangle fills all of it)
_MAX_TOP_WIDTH = 0.5  # at 10 % of its height a fan is at most this share of its widest row


@dataclass(frozen=True, eq=False)
class Sector:
    """The ultrasound fan in an image's pixel coordinates.

    Attributes:
        mask: bool (H, W), True inside the fan.
        bbox: (y0, y1, x0, x1), half-open bounding box of ``mask`` in pixels.
        apex: (y, x) in pixels, where the fan's two straight edges meet; may lie above the image (y < 0) for a
            probe with a rounded footprint.
        method: "temporal" (moving speckle across frames) or "intensity" (bright region of a still).
    """

    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    apex: tuple[float, float]
    method: str

    @property
    def fraction(self) -> float:
        """Share of the image covered by the fan, in [0, 1]."""
        return float(self.mask.mean())


@dataclass(frozen=True)
class CropGeometry:
    """The square window, in source pixels, that :func:`preprocess` resizes onto a grid.

    The window's top-left corner is (``y0``, ``x0``) and its side ``side`` pixels; parts of it outside the source
    image are zero padding. A grid of ``size`` pixels has ``size / side`` grid pixels per source pixel. Coordinates
    follow OpenCV's pixel-centre convention (pixel i covers [i - 0.5, i + 0.5]).
    """

    source_shape: tuple[int, int]
    y0: int
    x0: int
    side: int

    def scale(self, size: int) -> float:
        """Grid pixels per source pixel for a ``size`` x ``size`` grid."""
        return size / self.side

    def to_grid(self, yx: np.ndarray, size: int) -> np.ndarray:
        """Map (..., 2) points (y, x) in source pixels to a ``size`` grid's pixels."""
        yx = np.asarray(yx, dtype=np.float64)
        return (yx - (self.y0, self.x0) + 0.5) * self.scale(size) - 0.5

    def to_source(self, yx: np.ndarray, size: int) -> np.ndarray:
        """Map (..., 2) points (y, x) on a ``size`` grid back to source pixels (e.g. an LV contour)."""
        yx = np.asarray(yx, dtype=np.float64)
        return (yx + 0.5) / self.scale(size) - 0.5 + (self.y0, self.x0)

    def labels_to_source(self, labels: np.ndarray) -> np.ndarray:
        """Map uint8 labels (T, S, S) on any square grid back to the source image, (T, H, W), nearest neighbour."""
        if labels.ndim != 3 or labels.shape[1] != labels.shape[2]:
            raise ValueError(f"labels must be (T, S, S) on a square grid; got shape {labels.shape}.")
        window = _resize_stack(labels, self.side, cv2.INTER_NEAREST)
        h, w = self.source_shape
        out = np.zeros((labels.shape[0], h, w), dtype=labels.dtype)
        (sy, sx), (wy, wx), (n_y, n_x) = _overlap(self.y0, self.x0, self.side, h, w)
        out[:, sy : sy + n_y, sx : sx + n_x] = window[:, wy : wy + n_y, wx : wx + n_x]
        return out


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """Result of :func:`preprocess`.

    Attributes:
        echo: the echo on the model grid, frames float32 (T, size, size) in [0, 1], 0 outside the fan; labels,
            ``labelled``, clinical info and ``source_format`` carried over; ``spacing_mm`` scaled to grid pixels.
            Labels are cropped and resized but not blanked outside the fan (CAMUS experts draw the myocardium past
            the fan's edge); labels outside the crop window are cut.
        display: the same at ``display_size`` for the UI.
        sector: the fan in the input's pixel coordinates.
        mask: bool (size, size), the fan on the model grid.
        geometry: the square crop window, to map grid points or labels back to the input.
    """

    echo: Echo
    display: Echo
    sector: Sector
    mask: np.ndarray
    geometry: CropGeometry


#: In-fan 98th grey-level percentile after :func:`preprocess` with ``normalize=True`` (the CAMUS median).
NORMALISED_P98 = 0.75

# --------------------------------------------------------------------------------------------- sector detection


def find_sector(frames: np.ndarray) -> Sector:
    """Find the ultrasound fan in a grey-level stack.

    Loops (T >= 2) are searched by temporal variation first: speckle inside the fan changes from frame to frame,
    while burned-in text, ECG traces, rulers and logos stay still. Stills, and loops without usable motion, are
    searched by intensity: the fan is the large bright region on a dark background, with thin overlays removed by a
    morphological opening. Either way the largest connected component is kept, holes are filled and the region is
    replaced by its convex hull, which bridges dark cavities and signal dropout inside the fan. The hull must stand
    out from its surroundings, cover at least 5 % of the image and narrow towards the top; its straight edges give
    the apex, and the fan's thin tip (near-field clutter, nearly static) is grown back along them.

    Args:
        frames: float32 (T, H, W), grey levels in [0, 1]; (H, W) is accepted for one still.

    Returns:
        The :class:`Sector`.

    Raises:
        EchoLoadError: when no plausible fan is found (uniform images, photographs, noise, a region covering less
            than 5 % of the image or not narrowing towards the top).
    """
    frames = np.asarray(frames)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3:
        raise ValueError(f"find_sector expects frames (T, H, W) or (H, W); got shape {frames.shape}.")
    frames = frames.astype(np.float32, copy=False)
    h, w = frames.shape[1:]
    # Reduce over time at full resolution, then detect on maps of at most _DETECT_SIDE pixels a side (speed) and
    # draw the hull at full resolution.
    brightest = frames.max(axis=0)
    if not (float(frames.min()) >= 0.0 and float(brightest.max()) <= 1.0 + 1e-3):
        raise ValueError("find_sector expects grey levels in [0, 1]; scale the frames first (e.g. uint8 / 255).")
    maps = {"brightest": brightest}
    if frames.shape[0] >= 2:
        maps["std"] = frames.std(axis=0)
    scale = min(1.0, _DETECT_SIDE / max(h, w))
    if scale < 1.0:
        dsize = (max(1, round(w * scale)), max(1, round(h * scale)))
        maps = {name: cv2.resize(m, dsize, interpolation=cv2.INTER_AREA) for name, m in maps.items()}
    small_h, small_w = maps["brightest"].shape
    k = max(3, int(round(_SMOOTH * max(small_h, small_w)))) | 1

    background = float(np.percentile(maps["brightest"], 5))
    attempts = []
    if "std" in maps:
        attempts.append(("temporal", *_moving(maps["std"], k)))
    attempts.append(("intensity", *_bright(maps["brightest"], background, k)))
    for method, signal, candidate in attempts:
        hull = _fan_hull(candidate, k)
        if hull is None or not _stands_out(signal, hull):
            continue
        polygon = _upscale_polygon(hull, (w / small_w, h / small_h))
        mask = _fill(polygon, (h, w))
        if not _is_fan(mask):
            continue
        edges = _edges(mask)
        apex = _apex(mask, edges)
        if edges is not None and apex[0] < np.argmax(mask.any(axis=1)) - 1:
            tip = _extend_tip(polygon, mask, edges, apex[0], brightest, background + _TIP_STEP)
            mask = _fill(tip, (h, w))
        ys, xs = np.nonzero(mask)
        bbox = (int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1)
        return Sector(mask=mask, bbox=bbox, apex=apex, method=method)
    raise EchoLoadError(NO_SECTOR)


def _fill(polygon: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """bool (H, W) mask of a convex polygon (N, 1, 2) int32 (x, y)."""
    mask = np.zeros(shape, dtype=np.uint8)
    cv2.fillConvexPoly(mask, polygon, 1)
    return mask.astype(bool)


def _moving(std: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed temporal std (H, W) and the pixels where it exceeds the noise floor, bool (H, W)."""
    std = cv2.blur(std, (k, k))
    # The floor adapts to compression noise: most of a scanner frame outside the fan is static.
    floor = max(_MOTION_FLOOR, 2.0 * float(np.percentile(std, 20)))
    return std, std > floor


def _bright(brightest: np.ndarray, background: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed brightest frame (H, W) and its pixels clearly above the background grey level, bool (H, W)."""
    img = cv2.blur(brightest, (k, k))
    return img, img > background + _INTENSITY_STEP


def _stands_out(signal: np.ndarray, hull: np.ndarray) -> bool:
    """Whether the signal inside a hull is well above the typical signal outside it (not so for noise or photos)."""
    inside = np.zeros(signal.shape, dtype=np.uint8)
    cv2.fillConvexPoly(inside, hull, 1)
    inside = inside.astype(bool)
    if inside.all():
        return False
    return float(signal[inside].mean()) > _CONTRAST * float(np.median(signal[~inside])) + 1e-6


def _fan_hull(candidate: np.ndarray, k: int) -> np.ndarray | None:
    """Convex hull (N, 1, 2) int32 (x, y) of the fan in a bool candidate map; None when nothing is left.

    An opening with a k-pixel disk cuts thin structures (text strokes, ECG traces, sweep cursors) that may touch the
    fan; candidate pixels within k pixels of what survives are taken back, which restores the fan's narrow apex.
    The largest connected component, holes filled, gives the hull, shrunk by the growth that smoothing caused.
    """
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    raw = candidate.astype(np.uint8)
    core = cv2.morphologyEx(raw, cv2.MORPH_OPEN, kernel)
    region = core | (raw & cv2.dilate(core, kernel))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(region, connectivity=8)
    if n < 2:
        return None
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    component = ndi.binary_fill_holes(labels == largest)
    hull = np.zeros_like(raw)
    cv2.fillConvexPoly(hull, cv2.convexHull(cv2.findNonZero(component.astype(np.uint8))), 1)
    # The k-pixel smoothing grew the outline by about k / 2; shrink it back (the image border does not erode).
    hull = cv2.erode(hull, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k - 1, k - 1)))
    if not hull.any():
        return None
    return cv2.convexHull(cv2.findNonZero(hull))


def _upscale_polygon(hull: np.ndarray, factor: tuple[float, float]) -> np.ndarray:
    """Map hull vertices (N, 1, 2) (x, y) from shrunk to full-resolution pixels, covering the shrunk pixels' extent."""
    f = np.asarray(factor)
    pts = hull.reshape(-1, 2).astype(np.float64)
    outward = np.sign(pts - pts.mean(axis=0)) * (f - 1.0) / 2.0  # a shrunk pixel spans f full pixels
    return np.round((pts + 0.5) * f - 0.5 + outward).astype(np.int32).reshape(-1, 1, 2)


def _is_fan(mask: np.ndarray) -> bool:
    """Whether a convex region is large enough and shaped like a sector with its apex up."""
    area = int(mask.sum())
    if area < _MIN_FRACTION * mask.size:
        return False
    rows = np.nonzero(mask.any(axis=1))[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    if area > _MAX_FILL * height * width:
        return False
    widths = mask.sum(axis=1)
    top_row = rows[0] + int(0.1 * height)
    return widths[top_row] <= _MAX_TOP_WIDTH * widths.max()


def _edges(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Lines x = a * y + b fitted to the fan's left and right edges over its upper half, (a_l, b_l, a_r, b_r).

    None when the edges are (nearly) parallel or close downwards, i.e. there is no apex to speak of.
    """
    rows = np.nonzero(mask.any(axis=1))[0]
    y0, y1 = rows[0], rows[-1] + 1
    rows = np.arange(y0 + (y1 - y0) // 10, y0 + (y1 - y0) // 2)
    rows = rows[mask[rows].any(axis=1)]
    if rows.size < 3:
        return None
    left = np.argmax(mask[rows], axis=1).astype(np.float64)
    right = (mask.shape[1] - 1 - np.argmax(mask[rows, ::-1], axis=1)).astype(np.float64)
    a_l, b_l = np.polyfit(rows, left, 1)
    a_r, b_r = np.polyfit(rows, right, 1)
    if a_r - a_l < 0.05:
        return None
    return float(a_l), float(b_l), float(a_r), float(b_r)


def _apex(mask: np.ndarray, edges: tuple[float, float, float, float] | None) -> tuple[float, float]:
    """Where the fan's edges meet, (y, x) in pixels; the centre of the top row when the edges do not say."""
    rows = np.nonzero(mask.any(axis=1))[0]
    y0, height = rows[0], rows[-1] + 1 - rows[0]
    cols = np.nonzero(mask.any(axis=0))[0]
    fallback = (float(y0), float(np.nonzero(mask[y0])[0].mean()))
    if edges is None:
        return fallback
    a_l, b_l, a_r, b_r = edges
    y = (b_r - b_l) / (a_l - a_r)
    x = a_l * y + b_l
    # An apex far from the region's top centre means the edges are not straight: keep the top centre.
    if not (cols[0] <= x <= cols[-1]) or y > y0 + 0.1 * height or y < y0 - height:
        return fallback
    return float(y), float(x)


def _extend_tip(
    polygon: np.ndarray,
    mask: np.ndarray,
    edges: tuple[float, float, float, float],
    apex_y: float,
    brightest: np.ndarray,
    level: float,
) -> np.ndarray:
    """Grow the fan polygon up its edge lines towards the apex while the rows between the edges are bright.

    The narrow tip of a fan holds near-field clutter that barely changes between frames and is thinner than the
    opening kernel, so detection tends to cut it off; the straight edges say where it is. Returns the polygon
    (N, 1, 2) int32 (x, y), extended by the two points where the edges cross the highest bright row.
    """
    a_l, b_l, a_r, b_r = edges
    rows = np.nonzero(mask.any(axis=1))[0]
    y0, height = int(rows[0]), int(rows[-1] + 1 - rows[0])
    top = y0
    for r in range(y0 - 1, max(int(math.ceil(apex_y)), 0, y0 - height // 4) - 1, -1):
        c0, c1 = int(math.ceil(a_l * r + b_l)), int(math.floor(a_r * r + b_r))
        if c1 < c0 or brightest[r, max(c0, 0) : c1 + 1].mean() <= level:
            break
        top = r
    if top == y0:
        return polygon
    tip = np.array([[[a_l * top + b_l, top]], [[a_r * top + b_r, top]]]).round().astype(np.int32)
    return cv2.convexHull(np.concatenate([polygon, tip]))


# ------------------------------------------------------------------------------------------------ preprocessing


def preprocess(
    echo: Echo,
    *,
    size: int = 112,
    fps: float | None = None,
    display_size: int | None = 384,
    sector: Sector | None = None,
    normalize: bool = True,
) -> Preprocessed:
    """Crop an echo to its fan, blank everything outside the fan and resize it to the model grid and for display.

    The square crop window is centred on the fan's apex horizontally and starts at the fan's top, so the apex ends up
    at the top centre; the fan's width fills the square when it is wider than tall (the usual case, padding at the
    bottom), otherwise the square is padded evenly left and right. Frames are resized with area averaging
    (bilinear when enlarging), labels with nearest neighbour.

    Args:
        echo: the input :class:`Echo`, frames float32 (T, H, W) in [0, 1].
        size: side of the model grid in pixels.
        fps: when given, resample time to this frame rate (see :func:`resample_time`); the echo must have an fps.
        display_size: side of the display copy in pixels; None: the crop window's own side, so the display copy
            keeps the input's resolution (no resampling).
        sector: a fan found beforehand (e.g. from both frames of an ED/ES pair, so both get the same crop); found
            from ``echo.frames`` when None.
        normalize: apply a single gain to the whole loop so that the 98th percentile of the grey levels inside the
            fan becomes :data:`NORMALISED_P98` (clipped to [0, 1]); scanners and presets differ several-fold in
            overall brightness (the pydicom sample's in-fan p98 is 0.39, CAMUS frames 0.65-0.97), and the models are
            trained on normalised frames. A gain keeps black black and leaves contrast ratios unchanged.

    Returns:
        :class:`Preprocessed` with ``echo`` (T', size, size), ``display`` (T', display_size, display_size), the
        sector, the grid mask and the crop geometry; ``spacing_mm`` is scaled to the new pixel size.

    Raises:
        EchoLoadError: no fan found, or ``fps`` asked for an echo without a frame rate.
        ValueError: a ``sector`` whose mask does not match the echo's frame size, or grid sizes below 8.
    """
    if size < 8 or (display_size is not None and display_size < 8):
        raise ValueError(f"size and display_size must be at least 8 pixels; got {size} and {display_size}.")
    if fps is not None:
        _check_fps(echo, fps)  # before any work, so a bad request fails fast
    if sector is None:
        sector = find_sector(echo.frames)
    elif sector.mask.shape != echo.frames.shape[1:]:
        raise ValueError(
            f"The sector's mask is {sector.mask.shape} but the echo's frames are {echo.frames.shape[1:]}; "
            "find the sector on frames of the same size."
        )

    geometry = square_window(sector, echo.frames.shape[1:])
    display_size = geometry.side if display_size is None else display_size
    window_mask = _window(sector.mask[None].astype(np.float32), geometry)
    frames = _window(echo.frames, geometry) * window_mask
    labels = None if echo.labels is None else _window(echo.labels, geometry)

    grids = []
    for side in (size, display_size):
        mask = _resize_stack(window_mask, side, _interpolation(geometry.side, side))[0] > 0.5
        grid_frames = _resize_stack(frames, side, _interpolation(geometry.side, side))
        grid_frames = np.clip(grid_frames, 0.0, 1.0, out=grid_frames) * mask
        spacing = None
        if echo.spacing_mm is not None:
            f = geometry.side / side
            spacing = (echo.spacing_mm[0] * f, echo.spacing_mm[1] * f)
        grid = echo.replace(
            frames=grid_frames.astype(np.float32, copy=False),
            labels=None if labels is None else _resize_stack(labels, side, cv2.INTER_NEAREST),
            spacing_mm=spacing,
        )
        if fps is not None:
            grid = resample_time(grid, fps)
        grids.append((grid, mask))

    (model, mask), (display, _) = grids
    if normalize:
        gain = _normalising_gain(model.frames, mask)
        model = model.replace(frames=np.clip(model.frames * gain, 0.0, 1.0))
        display = display.replace(frames=np.clip(display.frames * gain, 0.0, 1.0))
    return Preprocessed(echo=model, display=display, sector=sector, mask=mask, geometry=geometry)


def _normalising_gain(frames: np.ndarray, mask: np.ndarray) -> float:
    """Gain mapping the in-fan 98th percentile of a (T, S, S) stack to :data:`NORMALISED_P98` (1 for a black fan)."""
    p98 = float(np.percentile(frames[:, mask], 98)) if mask.any() else 0.0
    return NORMALISED_P98 / p98 if p98 > 1e-3 else 1.0


def square_window(sector: Sector, shape: tuple[int, int]) -> CropGeometry:
    """Square window starting at the fan's top, horizontally centred on the apex, just wide enough for the fan."""
    y0, y1, x0, x1 = sector.bbox
    cx = sector.apex[1]
    half = max(cx - x0, x1 - cx)  # half-width about the apex so the apex lands on the centre column
    width = int(math.ceil(2 * half))
    side = max(width, y1 - y0)
    left = int(round(cx - side / 2))
    return CropGeometry(source_shape=(int(shape[0]), int(shape[1])), y0=y0, x0=left, side=side)


def _overlap(y0: int, x0: int, side: int, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Overlap of a square window with an (h, w) image: (source start, window start, extent), each (y, x)."""
    sy, sx = max(y0, 0), max(x0, 0)
    ey, ex = min(y0 + side, h), min(x0 + side, w)
    return (sy, sx), (sy - y0, sx - x0), (max(ey - sy, 0), max(ex - sx, 0))


def _window(stack: np.ndarray, g: CropGeometry) -> np.ndarray:
    """Cut the square window out of a (T, H, W) stack, zero outside the image, (T, side, side)."""
    out = np.zeros((stack.shape[0], g.side, g.side), dtype=stack.dtype)
    (sy, sx), (wy, wx), (n_y, n_x) = _overlap(g.y0, g.x0, g.side, *stack.shape[1:])
    out[:, wy : wy + n_y, wx : wx + n_x] = stack[:, sy : sy + n_y, sx : sx + n_x]
    return out


def _interpolation(src: int, dst: int) -> int:
    return cv2.INTER_AREA if dst <= src else cv2.INTER_LINEAR


def _resize_stack(stack: np.ndarray, side: int, interpolation: int) -> np.ndarray:
    """Resize a square (T, S, S) stack frame by frame to (T, side, side)."""
    if stack.shape[1] == side:
        return stack.copy()
    out = np.empty((stack.shape[0], side, side), dtype=stack.dtype)
    for i, frame in enumerate(stack):
        cv2.resize(frame, (side, side), dst=out[i], interpolation=interpolation)
    return out


# ------------------------------------------------------------------------------------------------------- time


def _check_fps(echo: Echo, fps: float) -> None:
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"The target frame rate must be a positive number of frames per second; got {fps}.")
    if echo.fps is None:
        raise EchoLoadError("The echo has no frame rate, so it cannot be resampled in time; give one with the input.")


def resample_time(echo: Echo, fps: float) -> Echo:
    """Resample an echo to ``fps`` frames per second, keeping its duration.

    A loop of T frames at ``echo.fps`` lasts T / echo.fps seconds and becomes round(T * fps / echo.fps) frames
    (at least 1); new frame k shows time k / fps, linearly interpolated between the two nearest source frames (the
    last source frame is held past its own time). Labels are taken from the source frame nearest in time: each
    labelled source frame goes to the new frame nearest to it (if two compete, the nearer wins), and a new frame
    lying between two labelled source frames (a densely labelled loop) is labelled too. ED/ES indices move to the
    new frame nearest in time.

    Args:
        echo: :class:`Echo` with ``fps`` set.
        fps: target frame rate in frames per second.

    Returns:
        A new :class:`Echo` with frames float32 (T', H, W), ``fps`` set to the target.
    """
    _check_fps(echo, fps)
    ratio = fps / echo.fps
    t = echo.n_frames
    n = max(1, int(round(t * ratio)))
    pos = np.minimum(np.arange(n) / ratio, t - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, t - 1)
    wt = (pos - lo).astype(np.float32)[:, None, None]
    frames = (1.0 - wt) * echo.frames[lo] + wt * echo.frames[hi]

    def nearest_new(i: int) -> int:
        return min(n - 1, int(math.floor(i * ratio + 0.5)))

    labels, labelled = None, ()
    if echo.labels is not None:
        source_of: dict[int, int] = {}
        for i in sorted(echo.labelled):
            j = nearest_new(i)
            if j not in source_of or abs(pos[j] - i) < abs(pos[j] - source_of[j]):
                source_of[j] = i
        marked = set(echo.labelled)
        for k in range(n):
            if k not in source_of and lo[k] in marked and hi[k] in marked:
                source_of[k] = int(math.floor(pos[k] + 0.5))
        labels = np.zeros((n,) + echo.labels.shape[1:], dtype=echo.labels.dtype)
        for k, i in source_of.items():
            labels[k] = echo.labels[i]
        labelled = tuple(sorted(source_of))

    info = dataclasses.replace(
        echo.info,
        ed_index=None if echo.info.ed_index is None else nearest_new(echo.info.ed_index),
        es_index=None if echo.info.es_index is None else nearest_new(echo.info.es_index),
    )
    return echo.replace(frames=frames.astype(np.float32, copy=False), fps=float(fps), labels=labels,
                        labelled=labelled, info=info)
