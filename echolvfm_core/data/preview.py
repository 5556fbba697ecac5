"""Pictures of prepared loops: label contours over frames, PNG montages and per-loop MP4s."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["CONTOUR_COLOURS", "frame_picks", "montage", "overlay_contours"]

#: RGB colour per label drawn as a contour: LV cavity, myocardium, left atrium.
CONTOUR_COLOURS = {1: (255, 80, 80), 2: (80, 220, 80), 3: (90, 160, 255)}


def overlay_contours(frames: np.ndarray, labels: np.ndarray | None, scale: int = 1, thickness: int = 1) -> np.ndarray:
    """Grey frames with label contours drawn over them.

    Args:
        frames: uint8 (T, S, S).
        labels: uint8 (T, S, S) or None (no contours).
        scale: integer upscaling before drawing (contours are traced on the upscaled labels, so they stay smooth).
        thickness: line width in output pixels.

    Returns:
        uint8 RGB (T, scale * S, scale * S, 3).
    """
    import cv2

    frames = np.asarray(frames)
    if frames.ndim != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, S, S); got {frames.dtype} {frames.shape}.")
    if labels is not None and labels.shape != frames.shape:
        raise ValueError(f"labels {labels.shape} do not match frames {frames.shape}.")
    if scale < 1:
        raise ValueError(f"scale must be a positive integer; got {scale}.")
    t, h, w = frames.shape
    out = np.empty((t, h * scale, w * scale, 3), dtype=np.uint8)
    for i in range(t):
        grey = cv2.resize(frames[i], (w * scale, h * scale), interpolation=cv2.INTER_CUBIC) if scale > 1 else frames[i]
        rgb = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=2))
        if labels is not None:
            lab = (cv2.resize(labels[i], (w * scale, h * scale), interpolation=cv2.INTER_NEAREST) if scale > 1
                   else labels[i])
            for value, colour in CONTOUR_COLOURS.items():
                mask = (lab == value).astype(np.uint8)
                if mask.any():
                    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
                    cv2.drawContours(rgb, contours, -1, colour, thickness)
        out[i] = rgb
    return out


def frame_picks(n_frames: int, es_index: int, columns: int) -> list[int]:
    """``columns`` frame indices spread over one cycle, always including ED (0) and ES (``es_index``)."""
    if columns < 2:
        raise ValueError(f"columns must be at least 2; got {columns}.")
    picks = set(np.linspace(0, n_frames - 1, columns).round().astype(int).tolist())
    picks.add(0)
    picks.add(int(es_index))
    picks = sorted(picks)
    while len(picks) > columns:  # drop the pick closest to its neighbours, never ED or ES
        gaps = [(picks[j + 1] - picks[j - 1], j) for j in range(1, len(picks) - 1) if picks[j] not in (0, es_index)]
        picks.pop(min(gaps)[1])
    return picks


def montage(
    rows: Sequence[tuple[np.ndarray, np.ndarray | None, int, str]],
    columns: int = 8,
    scale: int = 2,
    label_width: int = 150,
) -> np.ndarray:
    """One row per loop, frames across its cycle, a caption on the left.

    Args:
        rows: (frames uint8 (T, S, S), labels uint8 (T, S, S) or None, es_index, caption) per loop.
        columns: frames per row (ED and ES always among them).
        scale: integer upscaling of each frame.
        label_width: width in pixels of the caption strip.

    Returns:
        uint8 RGB image.
    """
    import cv2

    if not rows:
        raise ValueError("a montage needs at least one loop.")
    strips = []
    for frames, labels, es_index, caption in rows:
        picks = frame_picks(len(frames), es_index, columns)
        tiles = overlay_contours(frames[picks], None if labels is None else labels[picks], scale)
        tile = tiles.shape[1]
        strip = np.zeros((tile, label_width + columns * (tile + 2), 3), dtype=np.uint8)
        for j, idx in enumerate(picks):
            x0 = label_width + j * (tile + 2)
            strip[:, x0 : x0 + tile] = tiles[j]
            tag = "ED" if idx == 0 else "ES" if idx == es_index else f"{idx}"
            cv2.putText(strip, tag, (x0 + 4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
        for k, line in enumerate(caption.split("\n")):
            cv2.putText(strip, line, (6, 24 + 22 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1, cv2.LINE_AA)
        strips.append(strip)
    width = max(s.shape[1] for s in strips)
    gap = np.zeros((3, width, 3), dtype=np.uint8)
    parts = []
    for s in strips:
        if s.shape[1] < width:
            s = np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)))
        parts.extend([s, gap])
    return np.concatenate(parts[:-1], axis=0)
