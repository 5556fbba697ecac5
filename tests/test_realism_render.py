"""Beats, texture-preserving rendering and realism statistics (tiny stand-ins; the built-in cine where installed)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from echolvfm_core import realism as rz
from echolvfm_core.beats import find_beats, image_period
from echolvfm_core.pipelines.render import (
    _fields_per_frame,
    _phase_positions,
)


def _speckle(rng: np.random.Generator, n: int = 2, side: int = 64) -> np.ndarray:
    z = rng.normal(size=(n, side, side, 2)).astype(np.float32)
    re = np.stack([cv2.GaussianBlur(f[..., 0], (0, 0), 0.7) for f in z])
    im = np.stack([cv2.GaussianBlur(f[..., 1], (0, 0), 0.7) for f in z])
    return np.clip(np.hypot(re, im) / 2.5, 0, 1).astype(np.float32)


def _beating(n_frames: int, period: float, side: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """A disc whose radius follows a cardiac-like cycle, and its area curve (largest at each cycle's start)."""
    t = np.arange(n_frames)
    radius = 10 + 5 * np.cos(2 * np.pi * t / period)
    yy, xx = np.mgrid[:side, :side]
    frames = np.stack([((yy - side / 2) ** 2 + (xx - side / 2) ** 2 < r**2) for r in radius]).astype(np.float32)
    return 0.2 + 0.6 * frames, np.pi * radius**2


def test_beats_from_the_area_curve_and_from_periodicity():
    frames, area = _beating(100, 25.0)
    beats = find_beats(frames, 50.0, area)
    assert beats.method == "lv_area"
    assert [b.start for b in beats.beats] == [0, 25, 50, 75][: len(beats.beats)]
    assert all(b.n_frames == 25 for b in beats.beats[:3]) and beats.beats[-1].n_frames >= 24
    assert beats.heart_rate_bpm == pytest.approx(120.0)
    assert all(b.es == b.start + 12 or b.es == b.start + 13 for b in beats.beats)
    assert image_period(frames, 50.0) == pytest.approx(25.0, abs=0.5)
    no_area = find_beats(frames, 50.0, None)
    assert no_area.method == "periodicity" and no_area.cycle_frames == pytest.approx(25, abs=1)


def test_a_loop_shorter_than_two_beats_is_one_whole_loop():
    frames, area = _beating(20, 25.0)
    beats = find_beats(frames, 50.0, area)
    assert beats.method == "whole_loop" and beats.heart_rate_bpm is None
    assert (beats.beats[0].start, beats.beats[0].stop, beats.beats[0].ed) == (0, 20, 0)
    with pytest.raises(ValueError, match="single still"):
        find_beats(frames[:1], 50.0)


def test_fields_follow_the_phase_and_return_to_end_diastole():
    fields = np.zeros((2, 4, 3, 3), np.float32)
    fields[:, 2] = 1.0  # peak at clip frame 2
    per = _fields_per_frame(fields, _phase_positions(8, 4), periodic=True)
    assert per.shape == (8, 2, 3, 3)
    assert per[4, 0, 0, 0] == pytest.approx(1.0) and per[0, 0, 0, 0] == 0.0
    assert per[7, 0, 0, 0] == pytest.approx(0.0)  # half-way from clip frame 3 back to frame 0
    # re-timed so that the acquired ES (frame 2 of 8) meets the generated peak (clip frame 2)
    pos = _phase_positions(8, 4, es=2, es_clip=2)
    assert pos[2] == pytest.approx(2.0) and pos[0] == 0.0 and np.all(np.diff(pos) > 0)


def test_texture_statistics_see_blur_and_c2st_separates_only_what_differs():
    rng = np.random.default_rng(0)
    mask = np.ones((64, 64), bool)
    real = [_speckle(rng) for _ in range(24)]
    blurred = [np.stack([cv2.GaussianBlur(f, (0, 0), 1.5) for f in im]) for im in real]
    stats = rz.ratios([rz.loop_stats(b, mask, 30.0) for b in blurred[:4]],
                      [rz.loop_stats(r, mask, 30.0) for r in real[:4]])
    assert stats["hf_share"] < 0.3 and stats["gradient"] < 0.6 and stats["bits_per_pixel"] < 0.8
    same = rz.ratios([rz.loop_stats(r, mask, 30.0) for r in real[4:8]],
                     [rz.loop_stats(r, mask, 30.0) for r in real[:4]])
    assert all(0.85 < v < 1.15 for k, v in same.items() if k != "frame_change")

    def patches(images):
        return [rz.sample_patches(im, mask, 8, rng, side=16) for im in images]

    halves = rz.c2st(patches(real[:6]), patches(real[6:12]), patches(real[12:18]), patches(real[18:24]), steps=120,
                     batch=32)
    assert halves.ci_low <= 0.5 <= halves.ci_high and halves.accuracy < 0.8
    blur = rz.c2st(patches(real[:6]), patches(blurred[6:12]), patches(real[12:18]), patches(blurred[18:24]),
                   steps=120, batch=32)
    assert blur.accuracy >= 0.9 and blur.ci_low > 0.5


@pytest.fixture(scope="module")
def bundled_renderer():
    from echolvfm_core.models.vae import EchoCodec
    from echolvfm_core.pipelines.counterfactual import (
        default_models_dir,
        load_generator,
    )
    from echolvfm_core.pipelines.render import BeatRenderer

    root = default_models_dir()
    if not (root / "generator" / "config.json").is_file():
        pytest.skip("no bundled generator")
    return BeatRenderer(load_generator(root / "generator"), EchoCodec.from_pretrained(root / "vae"))


def test_rendering_the_built_in_cine_keeps_its_size_rate_texture_and_follows_the_ef(bundled_renderer):
    from echolvfm_core.estimators.segmentation import SegmentationEF
    from echolvfm_core.io import load_echo, sample_cine_path
    from echolvfm_core.pipelines.render import beat_ef, key_frames, to_model_grid
    from echolvfm_core.preprocess import preprocess

    path = sample_cine_path()
    if path is None:
        pytest.skip("pydicom-data (color3d_jpeg_baseline.dcm) is not installed")
    torch.manual_seed(0)
    echo = load_echo(path)
    pre = preprocess(echo, display_size=None)
    seg = SegmentationEF.from_pretrained(tta=False)
    beats = find_beats(pre.echo.frames, echo.fps, seg.measure(pre.echo.frames).lv_area, pre.mask)
    assert beats.method == "lv_area" and len(beats.beats) >= 3
    assert 55 < beats.heart_rate_bpm < 85
    b = beats.beats[1]
    src = pre.display.frames[b.start : b.stop]
    mask = pre.display.frames.max(0) > 0
    source = seg.measure(pre.echo.frames[b.start : b.stop])
    beat = bundled_renderer.prepare(src, mask, echo.fps, source_ef=source.ef, es=source.es_index)
    key = key_frames(len(src), beat.es, echo.fps)
    assert key is not None and len(key) < len(src) // 2 and beat.es in key
    errors = bundled_renderer.calibrate(beat, lambda g: float(seg.measure(g).ef))
    assert beat.gain in errors and errors[beat.gain] == min(errors.values())
    same = bundled_renderer.render(beat, source.ef, seed=0)
    np.testing.assert_allclose(same.frames, src * mask, atol=1e-6)  # at its own EF the beat is itself
    measured = {}
    for ef in (30.0, 70.0):
        out = bundled_renderer.render(beat, ef, seed=0)
        assert out.frames.shape == src.shape and out.fps == echo.fps
        measured[ef] = beat_ef(seg, to_model_grid(out.frames, 112), key)
        assert abs(measured[ef] - ef) <= 8, measured
        ratio = rz.hf_share(out.frames, mask) / rz.hf_share(src, mask)
        assert 0.85 <= ratio <= 1.15, ratio
    assert measured[70.0] - measured[30.0] >= 25, measured


def test_segment_and_estimate_ef_report_each_beat_of_the_built_in_cine(capsys):
    import json

    from echolvfm_core.cli import main
    from echolvfm_core.io import sample_cine_path

    path = sample_cine_path()
    if path is None:
        pytest.skip("pydicom-data (color3d_jpeg_baseline.dcm) is not installed")
    assert main(["segment", str(path), "--json"]) == 0
    seg = json.loads(capsys.readouterr().out)["beat_to_beat"]
    assert seg["method"] == "lv_area" and seg["beats_measured"] >= 3 and 55 < seg["heart_rate_bpm"] < 85
    efs = [b["ef"] for b in seg["beats"]]
    assert seg["ef_mean"] == pytest.approx(np.mean(efs), abs=0.01) and seg["ef_sd"] == pytest.approx(
        np.std(efs, ddof=1), abs=0.01)
    assert all(b["stop"] - b["start"] == b["frames"] for b in seg["beats"])
    assert main(["estimate-ef", str(path), "--json"]) == 0
    post = json.loads(capsys.readouterr().out)["beat_to_beat"]
    assert [b["start"] for b in post["beats"]] == [b["start"] for b in seg["beats"]]
    assert all(0 < b["ef"] < 100 for b in post["beats"])
