"""Metrics shared by training scripts, ``echolvfm evaluate`` and the app.

Probabilistic regression (EF posteriors):

* :func:`crps_samples` - continuous ranked probability score of a sample-based predictive distribution;
* :func:`interval_coverage` - how often the truth lies in a central interval.

Segmentation: :func:`dice`.

Image reconstruction (grey frames in [0, 1]): :func:`ssim`, :func:`psnr`.

Distribution distances in a feature space: :func:`feature_stats`, :func:`frechet_distance`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["crps_samples", "interval_coverage", "dice", "ssim", "psnr", "feature_stats", "frechet_distance"]


def crps_samples(samples: np.ndarray, truth: float | np.ndarray) -> float | np.ndarray:
    """Sample-based CRPS, ``E|X - y| - 0.5 E|X - X'|`` (Gneiting and Raftery, JASA 2007, eq. 21).

    The second term uses all ordered pairs of the N samples (the "energy form" with the 1 / N^2 normaliser, i.e.
    the CRPS of the empirical distribution of the samples), computed in O(N log N) from the sorted samples:
    ``E|X - X'| = 2 / N^2 * sum_i (2 i - N - 1) x_(i)`` for i = 1..N.

    Args:
        samples: (N,) or (B, N) draws of the predictive distribution (same unit as ``truth``, e.g. EF in %).
        truth: scalar or (B,) observed values.

    Returns:
        The CRPS (same unit as the inputs; lower is better): a float for (N,) samples, a (B,) array otherwise.
    """
    x = np.asarray(samples, dtype=np.float64)
    single = x.ndim == 1
    if single:
        x = x[None]
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"samples must be (N,) or (B, N) with N >= 1; got shape {np.shape(samples)}.")
    y = np.asarray(truth, dtype=np.float64).reshape(-1, 1)
    if y.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"truth must be a scalar or ({x.shape[0]},); got shape {np.shape(truth)}.")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("samples and truth must be finite.")
    n = x.shape[1]
    term1 = np.abs(x - y).mean(axis=1)
    xs = np.sort(x, axis=1)
    weights = 2.0 * np.arange(1, n + 1) - n - 1
    term2 = (xs * weights).sum(axis=1) / n**2  # = 0.5 * E|X - X'|
    out = term1 - term2
    return float(out[0]) if single else out


def interval_coverage(lower: np.ndarray, upper: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of cases with ``lower <= truth <= upper``; all arrays (B,)."""
    lo, hi, y = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (lower, upper, truth))
    if not (len(lo) == len(hi) == len(y)) or len(y) == 0:
        raise ValueError(
            f"lower, upper and truth must be non-empty and of one length; got {len(lo)}, {len(hi)}, {len(y)}.")
    return float(np.mean((lo <= y) & (y <= hi)))


def dice(pred: np.ndarray, target: np.ndarray, label: int) -> float:
    """Dice overlap ``2 |P & T| / (|P| + |T|)`` of class ``label`` between two integer label maps of one shape.

    Returns 1.0 when the class is absent from both maps.
    """
    p, t = np.asarray(pred) == label, np.asarray(target) == label
    if p.shape != t.shape:
        raise ValueError(f"pred and target must have one shape; got {p.shape} and {t.shape}.")
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * float((p & t).sum()) / denom


def _image_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two image stacks as float64 (N, H, W) in [0, 1]; raises on shape or range mismatch."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim not in (2, 3) or x.size == 0:
        raise ValueError(
            f"Expected two non-empty image stacks (N, H, W) or (H, W) of one shape; got {x.shape} and {y.shape}.")
    for name, v in (("reference", x), ("test", y)):
        if not np.all(np.isfinite(v)) or v.min() < 0.0 or v.max() > 1.0:
            raise ValueError(f"The {name} images must be finite grey levels in [0, 1].")
    return (x[None], y[None]) if x.ndim == 2 else (x, y)


def ssim(reference: np.ndarray, test: np.ndarray, per_image: bool = False) -> float | np.ndarray:
    """Structural similarity (Wang et al., IEEE TIP 2004) of grey images in [0, 1], averaged over images.

    skimage's ``structural_similarity`` with ``data_range=1`` and its defaults (7 x 7 uniform window).

    Args:
        reference, test: (N, H, W) or (H, W) float in [0, 1], one shape.
        per_image: return the (N,) values instead of their mean.
    """
    from skimage.metrics import structural_similarity

    x, y = _image_pair(reference, test)
    values = np.array([structural_similarity(xi, yi, data_range=1.0) for xi, yi in zip(x, y)])
    return values if per_image else float(values.mean())


def psnr(reference: np.ndarray, test: np.ndarray, per_image: bool = False) -> float | np.ndarray:
    """Peak signal-to-noise ratio in dB, ``10 log10(1 / MSE)`` per image (peak 1), averaged over images.

    An exact reconstruction (MSE 0) counts as 100 dB so that the mean stays finite.

    Args:
        reference, test: (N, H, W) or (H, W) float in [0, 1], one shape.
        per_image: return the (N,) values instead of their mean.
    """
    x, y = _image_pair(reference, test)
    mse = ((x - y) ** 2).mean(axis=(1, 2))
    values = 10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))
    return values if per_image else float(values.mean())


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of features (N, D), N >= 2, as float64 (the statistics of a Fréchet distance)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2; got shape {f.shape}.")
    if not np.all(np.isfinite(f)):
        raise ValueError("features must be finite.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al., NeurIPS 2017, FID):
    ``|mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))``.

    ``tr((sigma1 sigma2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the symmetric
    ``sigma1^(1/2) sigma2 sigma1^(1/2)`` (same spectrum), which stays real for rank-deficient covariances.

    Args:
        mu1, mu2: (D,) means; sigma1, sigma2: (D, D) covariances (see :func:`feature_stats`).
    """
    m1, m2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    s1, s2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    d = m1.shape[0] if m1.ndim == 1 else -1
    if m1.shape != (d,) or m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"expected means (D,) and covariances (D, D) of one D; got {m1.shape}, {s1.shape}, "
                         f"{m2.shape}, {s2.shape}.")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.linalg.eigvalsh(root1 @ ((s2 + s2.T) / 2) @ root1)
    value = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(np.clip(cross, 0, None)).sum())
    return max(value, 0.0)
