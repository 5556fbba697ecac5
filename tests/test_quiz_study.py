"""Study setup: a 10 + 10 study (plus calibration) from small synthetic echoes with a fake generator."""
from __future__ import annotations

import json
import os
import re

import cv2
import numpy as np
import pytest

from app.quiz.store import QuizStore
from app.quiz.study import ReaderSession, VideoSpec, create_study, load_study
from echolvfm_core.echo import ClinicalInfo, Echo, EchoLoadError

SPEC = VideoSpec(size=32, fps=10.0, n_frames=8)
EF_RANGE = (25.0, 70.0)


def fan_echo(i: int, ef: float | None = None) -> Echo:
    """A small moving-speckle loop inside an ultrasound-like fan; sizes and frame rates vary with ``i``."""
    rng = np.random.default_rng(i)
    h, w, t, fps = (48, 64, 12, 30.0) if i % 2 else (56, 56, 16, 50.0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fan = (np.hypot(yy, xx - w / 2) < 0.95 * h) & (np.abs(np.arctan2(xx - w / 2, yy)) < np.deg2rad(40))
    frames = np.zeros((t, h, w), np.float32)
    for k in range(t):
        radius = 0.18 * h * (0.8 + 0.2 * np.cos(2 * np.pi * k / t))
        cavity = ((yy - 0.5 * h) / radius) ** 2 + ((xx - w / 2) / (0.1 * w)) ** 2 < 1
        frames[k] = (0.3 + 0.4 * rng.random((h, w), dtype=np.float32)) * np.where(cavity, 0.2, 1.0) * fan
    return Echo(frames=frames, fps=fps, source_format="synthetic", info=ClinicalInfo(ef=ef))


class BlurSynth:
    """Fake generator: a slightly blurred copy of the source echo, remembering what it was asked for."""

    def __init__(self):
        self.calls: list[tuple[float | None, float]] = []

    def __call__(self, source: Echo, ef: float, rng: np.random.Generator) -> Echo:
        assert isinstance(rng, np.random.Generator)
        self.calls.append((source.info.ef, ef))
        blurred = np.stack([cv2.GaussianBlur(f, (3, 3), 0.8) for f in source.frames])
        return Echo(frames=blurred, fps=source.fps, source_format="synthetic", synthetic=True,
                    info=ClinicalInfo(ef=ef))


def pool(n: int) -> list[Echo]:
    return [fan_echo(i, ef=40.0 + i) for i in range(n)]  # each pool echo identified by its EF


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    synth = BlurSynth()
    study = create_study(pool(24), 20, synth, model_version="fake-blur-1", out_dir=out, seed=3,
                         real_pool_source="unit-test fan phantoms", ef_range=EF_RANGE, calibration_n=4, spec=SPEC)
    return study, synth, out


def test_balanced_cases_and_provenance(built):
    study, synth, out = built
    cases = study.cases
    assert len(cases) == 24
    for block, n in (("scored", 10), ("calibration", 2)):
        for truth in ("real", "synthetic"):
            assert sum(c.block == block and c.truth == truth for c in cases) == n
    rec = load_study(out / "quiz.sqlite", study.id).record
    assert (rec.model_version, rec.seed, rec.real_pool_source) == ("fake-blur-1", 3, "unit-test fan phantoms")
    assert rec.config["video"]["n_frames"] == 8 and rec.config["synthetic_from_shown_real"] == 0
    # synthetic cases carry the requested EF, real cases their own; the generator never saw a case shown as real
    synth_efs = sorted(c.ef for c in cases if c.truth == "synthetic")
    assert synth_efs == sorted(ef for _, ef in synth.calls)
    assert all(EF_RANGE[0] <= ef <= EF_RANGE[1] for ef in synth_efs)
    real_sources = {c.ef for c in cases if c.truth == "real"}
    assert real_sources <= {40.0 + i for i in range(24)}
    assert not real_sources & {src for src, _ in synth.calls}


def test_videos_share_format_and_carry_nothing(built):
    import av

    study, _, _ = built
    containers, streams, mtimes = set(), set(), set()
    for case in study.cases:
        path = study.video_path(case)
        assert re.fullmatch(r"[0-9a-f]{24}\.mp4", path.name)
        assert b"synthetic" not in path.read_bytes().lower()
        mtimes.add(os.stat(path).st_mtime)
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            frames = sum(1 for _ in c.decode(video=0))
            fmt = (s.codec_context.name, s.codec_context.pix_fmt, s.width, s.height, float(s.average_rate), frames)
            assert fmt == ("h264", "yuv420p", 32, 32, 10.0, 8), fmt
            containers.add(json.dumps(dict(c.metadata), sort_keys=True))
            streams.add(json.dumps(dict(s.metadata), sort_keys=True))
    assert len(containers) == len(streams) == 1  # identical metadata for every case
    assert len(mtimes) == 1  # one modification time for all files
    assert not [p for p in study.media_dir.iterdir() if p.name not in {c.video for c in study.cases}]


def test_same_seed_same_composition(built, tmp_path):
    study, _, _ = built
    again = create_study(pool(24), 20, BlurSynth(), model_version="fake-blur-1", out_dir=tmp_path, seed=3,
                         real_pool_source="x", ef_range=EF_RANGE, calibration_n=4, spec=SPEC)
    key = sorted((c.truth, c.block, c.ef) for c in study.cases)
    assert sorted((c.truth, c.block, c.ef) for c in again.cases) == key
    assert {c.case_id for c in again.cases}.isdisjoint(c.case_id for c in study.cases)  # tokens are random


def test_a_reader_takes_the_built_study(built):
    study, _, _ = built
    s = ReaderSession(study.db, study.id, "reader-1")
    view = s.next_case()
    assert view.block == "calibration" and os.path.isfile(view.video)
    assert s.answer(view.token, "real", 3, ms=900).truth in ("real", "synthetic")


def test_too_small_pool_is_a_clear_error(tmp_path):
    with pytest.raises(EchoLoadError, match=r"holds 9 cases; a realism study needs at least 10 real echoes"):
        create_study(pool(9), 4, BlurSynth(), model_version="m", out_dir=tmp_path, real_pool_source="x")
    with pytest.raises(EchoLoadError, match=r"shows 12 distinct real cases"):
        create_study(pool(10), 20, BlurSynth(), model_version="m", out_dir=tmp_path, real_pool_source="x")
    with pytest.raises(ValueError, match="even number"):
        create_study(pool(10), 5, BlurSynth(), model_version="m", out_dir=tmp_path, real_pool_source="x")
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_small_pool_reuses_sources_and_failures_leave_nothing(tmp_path, sample_path):
    # 7 + 7 cases from a pool of 10 (one is the pydicom sample cine, given as a path): 4 synthetic cases have to
    # start from echoes also shown as real, and the study says so.
    echoes = [sample_path] + pool(9)
    study = create_study(echoes, 14, BlurSynth(), model_version="m", out_dir=tmp_path, real_pool_source="x",
                         calibration_n=0, spec=SPEC)
    assert study.record.config["synthetic_from_shown_real"] == 4

    def broken(source, ef, rng):
        return source.frames

    with pytest.raises(ValueError, match="must return an Echo"):
        create_study(pool(10), 4, broken, model_version="m", out_dir=tmp_path, real_pool_source="x", spec=SPEC)
    assert [s.id for s in QuizStore(tmp_path / "quiz.sqlite").studies()] == [study.id]
    assert [p.name for p in (tmp_path / "media").iterdir()] == [study.id]
    still = Echo(frames=np.zeros((1, 32, 32), np.float32), fps=10.0)
    with pytest.raises(EchoLoadError, match="single still frame"):
        create_study([still] * 10, 2, BlurSynth(), model_version="m", out_dir=tmp_path, real_pool_source="x",
                     calibration_n=0, spec=SPEC)
    assert [p.name for p in (tmp_path / "media").iterdir()] == [study.id]


def test_generator_synth_keeps_the_duration_in_the_generator_frames():
    """A 16-frame loop at 50 fps through a generator of at most 8 frames: 8 frames at 25 fps (the same 0.32 s, so
    the synthetic heart beats at the real one's pace), blank outside the fan, marked synthetic."""
    from dataclasses import asdict

    import torch

    from app.quiz.synth import GeneratorSynth
    from echolvfm_core.flows import MeanFlow
    from echolvfm_core.models.unet import EchoVelocityUNet, unet_preset
    from echolvfm_core.models.vae import EchoCodec, build_vae
    from echolvfm_core.pipelines.counterfactual import CounterfactualPipeline

    torch.manual_seed(0)
    net = EchoVelocityUNet(**{**asdict(unet_preset("tiny")), "max_frames": 8})
    synth = GeneratorSynth(CounterfactualPipeline(MeanFlow(net), EchoCodec(build_vae("tiny"))))
    source = fan_echo(0)
    assert (source.n_frames, source.fps) == (16, 50.0)
    out = synth(source, 40.0, np.random.default_rng(0))
    assert out.synthetic and out.n_frames == 8 and out.fps == pytest.approx(25.0)
    assert out.frames[:, 0, 0].max() == 0.0  # the corner lies outside the fan
