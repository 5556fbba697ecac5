"""Latency benchmarks of the EF instruments (not timed tests; ``echolvfm bench`` reports them).

* :func:`bench_segmenter`: one loop of ``frames`` frames through :class:`SegmentationEF` (network + cleanup +
  EF), and the network alone.
* :func:`bench_posterior`: the clip encoder pass, and the posterior from cached features (``trajectories`` DDIM
  trajectories x ``steps`` steps, one batched denoiser call per step).

Both take the bundled models by default, or any estimator; timings are wall-clock medians over ``repeats`` runs after
``warmup`` runs, on the estimator's device, with torch's current thread count (reported).
"""
from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from .ef_posterior import EFPosteriorEstimator
from .segmentation import SegmentationEF

__all__ = ["bench_segmenter", "bench_posterior"]


def _time(fn: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def _summary(ms: list[float]) -> dict:
    return {"median_ms": round(statistics.median(ms), 2), "min_ms": round(min(ms), 2), "max_ms": round(max(ms), 2)}


def _env(device: torch.device) -> dict:
    return {"device": str(device), "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine()}


def _loop(frames: int, size: int, seed: int) -> np.ndarray:
    """A deterministic test loop (T, size, size) in [0, 1]: content does not change the cost."""
    return np.random.default_rng(seed).random((frames, size, size), dtype=np.float32)


def bench_segmenter(segmenter: SegmentationEF | None = None, frames: int = 32, repeats: int = 10, warmup: int = 2,
                    loop: np.ndarray | None = None) -> dict:
    """Latency of segmentation EF on one loop.

    Args:
        segmenter: default the bundled ``assets/segmenter``.
        frames: loop length when ``loop`` is not given (a random loop; for EF timing pass a real loop, since a
            random one may have no LV and stop before the EF step).
        loop: optional float (T, S, S) loop in [0, 1] on the model grid.

    Returns:
        ``{"network": {...}, "measure": {...} or None, "frames", "size", "params", device info}``; each timing has
        median / min / max in ms per loop.
    """
    seg = segmenter or SegmentationEF.from_pretrained()
    x = loop if loop is not None else _loop(frames, seg.size, 0)
    dev = seg.model.device
    out = {
        "frames": int(x.shape[0]),
        "size": int(x.shape[1]),
        "params": int(sum(p.numel() for p in seg.model.parameters())),
        **_env(dev),
    }
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    out["network"] = _summary(_time(lambda: seg.model.predict(t, batch_size=seg.batch_size), repeats, warmup, dev))
    out["segment"] = _summary(_time(lambda: seg.segment(x), repeats, warmup, dev))
    try:
        seg.measure(x)
    except ValueError:
        out["measure"] = None  # no LV found in this loop: the EF step cannot be timed on it
    else:
        out["measure"] = _summary(_time(lambda: seg.measure(x), repeats, warmup, dev))
    return out


def bench_posterior(estimator: EFPosteriorEstimator | None = None, frames: int = 32, size: int = 112,
                    repeats: int = 20, warmup: int = 3) -> dict:
    """Latency of the EF posterior for one loop.

    Returns:
        ``{"encoder": {...}, "sampling": {...}, "total": {...}, "trajectories", "steps", "frames", device info}``:
        ``encoder`` is the clip feature pass; ``sampling`` the posterior from cached features (the goal on CPU:
        <= 50 ms for 40 trajectories x 10 steps); ``total`` both, as for a new loop.
    """
    est = estimator or EFPosteriorEstimator.from_pretrained()
    dev = est.device
    loops = [_loop(frames, size, s) for s in range(2)]
    state = {"i": 0}

    def encode():  # alternate between two loops so the feature cache never answers
        state["i"] ^= 1
        return est.features(loops[state["i"]])

    feats = est.features(loops[0])
    return {
        "trajectories": est.trajectories,
        "steps": est.steps,
        "frames": frames,
        "size": size,
        "params": int(sum(p.numel() for p in est.model.parameters())),
        **_env(dev),
        "encoder": _summary(_time(encode, repeats, warmup, dev)),
        "sampling": _summary(_time(lambda: est.sample(feats, seed=0), repeats, warmup, dev)),
        "total": _summary(_time(lambda: est.sample(encode(), seed=0), repeats, warmup, dev)),
    }
