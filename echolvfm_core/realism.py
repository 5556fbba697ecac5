"""Realism statistics: does a generated loop carry the texture, the motion and the information content of an acquired
one, and can a small classifier tell the two apart?

Every statistic is computed inside the ultrasound fan (eroded, so the fan's edge, which both share, does not count):

* ``hf_share``: share of the spectral energy above a quarter of the sampling rate (0.25 cycles per pixel), from the
  power spectra of Hann-windowed square patches that lie wholly inside the fan; speckle lives there, blur removes it.
* ``gradient``: mean gradient magnitude (Sobel, grey levels per pixel).
* ``frame_change``: mean absolute grey-level change between consecutive frames.
* ``bits_per_pixel``: size of the loop as H.264 at a fixed constant rate factor (``MP4_CRF``), in bits per pixel per
  frame: an encoder spends bits on detail and on change, and a file size that differs is a giveaway in a quiz.

:func:`ratios` divides a generated set's statistics by a real set's. :func:`c2st` is the classifier two-sample test:
a small convolutional network learns to tell real from generated patches on one group of images and is scored on
another; an accuracy near 0.5 means it cannot.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy import ndimage as ndi
from scipy.stats import binomtest
from torch import nn

__all__ = [
    "C2STResult",
    "LoopStats",
    "bits_per_pixel",
    "c2st",
    "frame_change",
    "gradient",
    "hf_share",
    "inner_mask",
    "loop_stats",
    "ratios",
    "sample_patches",
]

#: Patch side (pixels) of the spectra and of the two-sample classifier.
PATCH = 32
#: Statistics that :func:`ratios` compares.
STATS = ("hf_share", "gradient", "frame_change", "bits_per_pixel")


def inner_mask(mask: np.ndarray, margin: int = 3) -> np.ndarray:
    """The fan eroded by ``margin`` pixels (bool (H, W))."""
    return ndi.binary_erosion(np.asarray(mask, dtype=bool), iterations=margin) if margin > 0 else mask.astype(bool)


def _patch_corners(mask: np.ndarray, side: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners (y, x) of ``side`` squares on a ``stride`` grid that lie wholly inside ``mask``."""
    inside = ndi.minimum_filter(mask.astype(np.uint8), size=side, origin=-(side // 2)) > 0
    ys, xs = np.nonzero(inside[: mask.shape[0] - side + 1 : stride, : mask.shape[1] - side + 1 : stride])
    return [(int(y) * stride, int(x) * stride) for y, x in zip(ys, xs)]


def hf_share(frames: np.ndarray, mask: np.ndarray, side: int = PATCH) -> float:
    """Share of the non-DC spectral energy above 0.25 cycles per pixel, over patches inside the fan (see module)."""
    corners = _patch_corners(inner_mask(mask), side, side // 2)
    if not corners:
        raise ValueError(f"The fan holds no {side} x {side} patch; the image is too small for texture statistics.")
    win = np.outer(np.hanning(side), np.hanning(side)).astype(np.float32)
    f = np.fft.fftfreq(side)
    radius = np.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    high = radius > 0.25
    high_e = total = 0.0
    for frame in np.asarray(frames, dtype=np.float32):
        patches = np.stack([frame[y : y + side, x : x + side] for y, x in corners])
        patches = (patches - patches.mean(axis=(1, 2), keepdims=True)) * win
        power = np.abs(np.fft.fft2(patches)) ** 2
        high_e += float(power[:, high].sum())
        total += float(power.sum())
    return high_e / total if total > 0 else 0.0


def gradient(frames: np.ndarray, mask: np.ndarray) -> float:
    """Mean Sobel gradient magnitude inside the eroded fan, in grey levels per pixel."""
    inner = inner_mask(mask)
    vals = []
    for frame in np.asarray(frames, dtype=np.float32):
        gx = cv2.Sobel(frame, cv2.CV_32F, 1, 0, ksize=3) / 8.0
        gy = cv2.Sobel(frame, cv2.CV_32F, 0, 1, ksize=3) / 8.0
        vals.append(float(np.sqrt(gx**2 + gy**2)[inner].mean()))
    return float(np.mean(vals))


def frame_change(frames: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute grey-level change between consecutive frames inside the eroded fan (0 for a still)."""
    f = np.asarray(frames, dtype=np.float32)
    if len(f) < 2:
        return 0.0
    return float(np.abs(np.diff(f, axis=0))[:, inner_mask(mask)].mean())


def bits_per_pixel(frames: np.ndarray, fps: float) -> float:
    """Bits per pixel per frame of the loop written as H.264 at the project's fixed CRF (:func:`write_mp4`)."""
    from .io.writers import write_mp4

    f = np.asarray(frames)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_mp4(f, Path(tmp) / "loop.mp4", fps=fps)
        size = path.stat().st_size
    return 8.0 * size / (f.shape[0] * f.shape[1] * f.shape[2])


@dataclass(frozen=True)
class LoopStats:
    """:data:`STATS` of one loop (see the module docstring)."""

    hf_share: float
    gradient: float
    frame_change: float
    bits_per_pixel: float

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in STATS}


def loop_stats(frames: np.ndarray, mask: np.ndarray, fps: float) -> LoopStats:
    """All :data:`STATS` of a loop (T, H, W) float in [0, 1] with its fan ``mask`` (H, W)."""
    return LoopStats(hf_share(frames, mask), gradient(frames, mask), frame_change(frames, mask),
                     bits_per_pixel(frames, fps))


def ratios(generated: list[LoopStats], real: list[LoopStats]) -> dict[str, float]:
    """Mean of each statistic over ``generated`` divided by its mean over ``real`` (pooled ratio)."""
    out = {}
    for k in STATS:
        r = float(np.mean([getattr(s, k) for s in real]))
        out[k] = float(np.mean([getattr(s, k) for s in generated])) / r if r > 0 else float("nan")
    return out


def sample_patches(frames: np.ndarray, mask: np.ndarray, n: int, rng: np.random.Generator,
                   side: int = PATCH) -> np.ndarray:
    """(n, side, side) float32 patches drawn at random (frame and place) wholly inside the eroded fan."""
    corners = _patch_corners(inner_mask(mask), side, max(1, side // 4))
    if not corners:
        raise ValueError(f"The fan holds no {side} x {side} patch.")
    f = np.asarray(frames, dtype=np.float32)
    ti = rng.integers(0, len(f), n)
    ci = rng.integers(0, len(corners), n)
    return np.stack([f[t, corners[c][0] : corners[c][0] + side, corners[c][1] : corners[c][1] + side]
                     for t, c in zip(ti, ci)])


@dataclass(frozen=True)
class C2STResult:
    """Outcome of :func:`c2st`: accuracy on the held-out images with its 95 % (Wilson) interval."""

    accuracy: float
    ci_low: float
    ci_high: float
    n_test: int
    n_train: int

    def to_dict(self) -> dict:
        return {"accuracy": round(self.accuracy, 4), "ci95": [round(self.ci_low, 4), round(self.ci_high, 4)],
                "n_test": self.n_test, "n_train": self.n_train}


def _classifier() -> nn.Module:
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(4, o), nn.SiLU())

    return nn.Sequential(block(1, 16), block(16, 16), nn.AvgPool2d(2), block(16, 32), nn.AvgPool2d(2),
                         block(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 1))


def c2st(train_real: list[np.ndarray], train_gen: list[np.ndarray], test_real: list[np.ndarray],
         test_gen: list[np.ndarray], steps: int = 400, batch: int = 64, seed: int = 0) -> C2STResult:
    """Classifier two-sample test on patch sets.

    Each argument is a list of images, each image an (n_i, side, side) float array of its patches (see
    :func:`sample_patches`). A small CNN is trained to output "generated" on the training patches (each patch
    standardised by the mean and spread of the training patches); each test image is then called generated when
    the mean logit of its patches is positive. The accuracy is over test images, so its interval counts images,
    not patches (patches of one image are not independent).
    """
    if min(len(train_real), len(train_gen), len(test_real), len(test_gen)) == 0:
        raise ValueError("c2st needs at least one real and one generated image on each side of the split.")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_r = torch.from_numpy(np.concatenate(train_real)).float()
    x_g = torch.from_numpy(np.concatenate(train_gen)).float()
    mean, std = float(torch.cat([x_r, x_g]).mean()), float(torch.cat([x_r, x_g]).std()) + 1e-6
    net = _classifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = nn.BCEWithLogitsLoss()
    half = batch // 2
    net.train()
    for _ in range(steps):
        ir = torch.randint(0, len(x_r), (half,), generator=g)
        ig = torch.randint(0, len(x_g), (half,), generator=g)
        flip = torch.rand(batch, generator=g) < 0.5  # left-right flips: the heart's side is not the question
        x = torch.cat([x_r[ir], x_g[ig]])
        x = torch.where(flip[:, None, None], x.flip(-1), x)
        y = torch.cat([torch.zeros(half), torch.ones(half)])
        loss = loss_fn(net(((x - mean) / std)[:, None]).squeeze(1), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    correct = 0
    with torch.no_grad():
        for label, images in ((0, test_real), (1, test_gen)):
            for patches in images:
                logit = net(((torch.from_numpy(np.asarray(patches)).float() - mean) / std)[:, None]).mean()
                correct += int((float(logit) > 0) == bool(label))
    n = len(test_real) + len(test_gen)
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return C2STResult(correct / n, float(ci.low), float(ci.high), n, len(train_real) + len(train_gen))
