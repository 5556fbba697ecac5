"""Study setup: arms split by beat, one presentation for both arms (no file-level feature separates them), the
automatic reader and the refusal of a detectable study, per-method cases; small fan phantoms, fake generators."""
from __future__ import annotations

import os
import re

import cv2
import numpy as np
import pytest

from echolvfm_core.echo import ClinicalInfo, Echo, EchoLoadError
from echolvfm_core.quiz.pool import PoolBeat
from echolvfm_core.quiz.present import VideoSpec, file_features
from echolvfm_core.quiz.store import QuizStore
from echolvfm_core.quiz.study import (
    ReaderSession,
    StudyTooDetectable,
    create_study,
    load_study,
)

SPEC = VideoSpec(size=48, fps=25.0, n_frames=16)
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


def fan_beat(i: int, side: int = 64) -> PoolBeat:
    """One beat (20-27 frames at 30 fps) of a square fan phantom; its EF 40 + i identifies it."""
    rng = np.random.default_rng(100 + i)
    n = 20 + i % 8
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    fan = (np.hypot(yy, xx - side / 2) < 0.95 * side) & (np.abs(np.arctan2(xx - side / 2, yy)) < np.deg2rad(40))
    speckle = 0.3 + 0.5 * rng.random((side, side), dtype=np.float32)
    frames = np.zeros((n, side, side), np.float32)
    for k in range(n):
        radius = 0.2 * side * (0.8 + 0.2 * np.cos(2 * np.pi * k / n))
        cavity = ((yy - 0.5 * side) / radius) ** 2 + ((xx - side / 2) / (0.1 * side)) ** 2 < 1
        frames[k] = np.roll(speckle, k % 3, axis=0) * np.where(cavity, 0.2, 1.0) * fan
    return PoolBeat(frames=frames, mask=fan, fps=30.0, ef=40.0 + i, es=n // 3, source=f"phantom {i} beat 1")


class BlurSynth:
    """Fake generator: a blurred, darker copy of the beat (what an encoder would see as far fewer bits), remembering
    which beats it was asked for."""

    def __init__(self):
        self.calls: list[tuple[float, float, int]] = []

    def __call__(self, beat: PoolBeat, ef: float, seed: int) -> np.ndarray:
        self.calls.append((beat.ef, ef, seed))
        return np.stack([cv2.GaussianBlur(f, (5, 5), 1.5) * 0.7 for f in beat.frames])


def detector_stub(result):
    calls = []

    def detect(real, synthetic, real_groups, synthetic_groups):
        calls.append((real, synthetic, real_groups, synthetic_groups))
        return result

    return detect, calls


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """24 cases (20 scored + 4 practice) from 5 phantom beats, two fake generators."""
    out = tmp_path_factory.mktemp("study")
    a, b = BlurSynth(), BlurSynth()
    detect, calls = detector_stub({"accuracy": 0.5, "ci95": [0.3, 0.7]})
    study = create_study([fan_beat(i) for i in range(5)], 20, {"gen-a": a, "gen-b": b}, out_dir=out, seed=3,
                         real_pool_source="unit-test fan phantoms", ef_range=EF_RANGE, calibration_n=4, spec=SPEC,
                         detector=detect, max_detectability=0.75)
    return study, (a, b), calls, out


def test_arms_split_by_beat_balanced_and_provenance(built):
    study, (a, b), _, out = built
    cases = study.cases
    assert len(cases) == 24
    for block, n in (("scored", 10), ("calibration", 2)):
        for truth in ("real", "synthetic"):
            assert sum(c.block == block and c.truth == truth for c in cases) == n
    rec = load_study(out / "quiz.sqlite", study.id).record
    assert (rec.model_version, rec.seed, rec.real_pool_source) == ("gen-a + gen-b", 3, "unit-test fan phantoms")
    assert rec.config["methods"] == ["gen-a", "gen-b"] and rec.config["pool_beats"] == 5
    real_beats, synth_beats = set(rec.config["beats"]["real"]), set(rec.config["beats"]["synthetic"])
    assert (len(real_beats), len(synth_beats)) == (3, 2) and not real_beats & synth_beats
    # every case says where it came from; no beat is shown in both arms
    assert {re.match(r"(phantom \d+ beat 1)", c.source).group(1) for c in cases if c.truth == "real"} == real_beats
    assert {re.match(r"(phantom \d+ beat 1)", c.source).group(1) for c in cases
            if c.truth == "synthetic"} == synth_beats
    # synthetic cases: requested EF in range, dealt evenly over the two generators, each rendered once
    synth = [c for c in cases if c.truth == "synthetic"]
    assert sorted(c.ef for c in synth) == sorted(ef for _, ef, _ in a.calls + b.calls)
    assert all(EF_RANGE[0] <= c.ef <= EF_RANGE[1] for c in synth)
    assert sorted(c.method for c in synth) == ["gen-a"] * 6 + ["gen-b"] * 6
    assert all(c.method is None and c.ef in {40.0 + i for i in range(5)} for c in cases if c.truth == "real")
    assert all("rendered at EF" in c.source for c in synth)


def test_no_file_level_feature_separates_the_arms(built):
    """Bytes, bitrates, duration, frames, largest frame, rate, size, codec fields, metadata and names: none has an
    AUC above 0.65 (most are identical for every case), although the synthetic content is blurred and darker."""
    study, _, _, _ = built
    features = [file_features(study.video_path(c)) | {"name": int(c.video[:24], 16)} for c in study.cases]
    truth = np.array([c.truth == "synthetic" for c in study.cases])
    aucs = {k: auc([f[k] for f in features], truth) for k in features[0]}
    assert max(aucs.values()) <= 0.65, aucs
    assert all(aucs[k] == 0.5 for k in aucs if k != "name"), aucs  # identical in every file
    f = features[0]
    assert (f["width"], f["height"], f["frames"], f["fps"]) == (48, 48, 16, 25.0)
    assert f["codec"].startswith("h264/") and f["duration_s"] == pytest.approx(16 / 25)
    assert {os.stat(study.video_path(c)).st_mtime for c in study.cases}.__len__() == 1
    assert all(b"synthetic" not in study.video_path(c).read_bytes().lower() for c in study.cases)
    assert not [p for p in study.media_dir.iterdir() if p.name not in {c.video for c in study.cases}]


def auc(values, positive) -> float:
    """max(AUC, 1 - AUC) of one feature as a detector of ``positive`` (strings are ranked in sorted order)."""
    values = list(values)
    if isinstance(values[0], str):
        order = sorted(set(values))
        values = [order.index(v) for v in values]
    x = np.asarray(values, dtype=float)
    pos, neg = x[positive], x[~positive]
    a = float(np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg]))
    return max(a, 1 - a)


def test_auc_helper_sees_a_separating_feature():
    truth = np.array([True, True, False, False])
    assert auc([2, 3, 0, 1], truth) == 1.0 and auc([0, 3, 1, 2], truth) == 0.5 and auc(["b", "b", "a", "a"], truth) == 1


def test_the_automatic_reader_sees_the_served_files_and_is_stored(built):
    study, _, calls, _ = built
    (real, synthetic, real_groups, synthetic_groups), = calls
    assert len(real) == len(synthetic) == 12 and len(set(real_groups)) == 3 and len(set(synthetic_groups)) == 2
    assert all(f.dtype == np.uint8 and f.shape == (16, 48, 48) for f in real + synthetic)
    # the served synthetic cases are the blurred ones (the darkening is normalised away): the reader got the frames
    # as decoded from the files
    def sharpness(cases):
        return np.mean([np.abs(np.diff(f.astype(float), axis=-1)).mean() for f in cases])

    assert sharpness(synthetic) < 0.8 * sharpness(real)
    assert study.record.config["automatic_reader"] == {"accuracy": 0.5, "ci95": [0.3, 0.7]}


def test_a_detectable_study_is_refused_and_leaves_nothing(tmp_path):
    detect, _ = detector_stub({"accuracy": 0.9, "ci95": [0.7, 0.97]})
    with pytest.raises(StudyTooDetectable, match=r"accuracy 0\.90, 95 % CI 0\.70-0\.97, above the maximum "
                                                 r"detectability 0\.75"):
        create_study([fan_beat(i) for i in range(4)], 4, {"g": BlurSynth()}, out_dir=tmp_path, calibration_n=0,
                     real_pool_source="x", spec=SPEC, detector=detect, max_detectability=0.75)
    assert QuizStore(tmp_path / "quiz.sqlite").studies() == []
    assert list((tmp_path / "media").iterdir()) == []


def test_same_seed_same_composition(built, tmp_path):
    study, _, _, _ = built
    again = create_study([fan_beat(i) for i in range(5)], 20, {"gen-a": BlurSynth(), "gen-b": BlurSynth()},
                         out_dir=tmp_path, seed=3, real_pool_source="x", ef_range=EF_RANGE, calibration_n=4, spec=SPEC)
    key = sorted((c.truth, c.block, c.ef, c.method, c.source) for c in study.cases)
    assert sorted((c.truth, c.block, c.ef, c.method, c.source) for c in again.cases) == key
    assert {c.case_id for c in again.cases}.isdisjoint(c.case_id for c in study.cases)  # tokens are random
    assert again.record.config["automatic_reader"] is None


def test_a_reader_takes_the_built_study(built):
    study, _, _, _ = built
    s = ReaderSession(study.db, study.id, "reader-1")
    view = s.next_case()
    assert view.block == "calibration" and os.path.isfile(view.video)
    assert s.answer(view.token, "real", 3, ms=900).truth in ("real", "synthetic")


def test_setup_errors_are_clear_and_leave_nothing(tmp_path):
    with pytest.raises(EchoLoadError, match=r"holds 1 whole beat; a realism study needs at least 2"):
        create_study([fan_beat(0)], 4, {"g": BlurSynth()}, out_dir=tmp_path, real_pool_source="x")
    with pytest.raises(ValueError, match="even number"):
        create_study([fan_beat(i) for i in range(3)], 5, {"g": BlurSynth()}, out_dir=tmp_path, real_pool_source="x")
    with pytest.raises(ValueError, match="at least one generator"):
        create_study([fan_beat(i) for i in range(3)], 4, {}, out_dir=tmp_path, real_pool_source="x")
    assert list(tmp_path.iterdir()) == []  # nothing written

    def broken(beat, ef, seed):
        return beat.frames[:3]

    with pytest.raises(ValueError, match=r"must return the beat's frames \(20, 64, 64\)"):
        create_study([fan_beat(0), fan_beat(8)], 2, {"g": broken}, out_dir=tmp_path, real_pool_source="x",
                     calibration_n=0, spec=SPEC)
    assert list((tmp_path / "media").iterdir()) == []


@pytest.mark.slow
def test_a_study_of_the_built_in_cine_shows_nothing_at_file_level(tmp_path):
    """Acceptance of #28: 20 scored + 4 practice cases cut from the bundled 120-frame cine's whole beats, the
    synthetic ones rendered by the bundled generator, at the default presentation: no file-level feature has an AUC
    above 0.65 (all but the names are identical)."""
    from echolvfm_core.estimators.segmentation import SegmentationEF
    from echolvfm_core.io import sample_cine_path
    from echolvfm_core.models.vae import EchoCodec
    from echolvfm_core.pipelines.counterfactual import (
        default_models_dir,
        load_generator,
    )
    from echolvfm_core.pipelines.render import BeatRenderer
    from echolvfm_core.quiz.pool import acquired_pool
    from echolvfm_core.quiz.synth import BeatSynth

    root = default_models_dir()
    if sample_cine_path() is None:
        pytest.skip("pydicom-data (the 120-frame cine) is not installed")
    if not (root / "generator" / "config.json").is_file():
        pytest.skip("no bundled generator")
    seg = SegmentationEF.from_pretrained(root / "segmenter")
    pool = acquired_pool(["color3d", "sample"], seg)
    assert len(pool) == 3 and "first 30 frames of the color3d cine" in pool.skipped[0]
    synth = BeatSynth(BeatRenderer(load_generator(root / "generator"), EchoCodec.from_pretrained(root / "vae")), seg)
    study = create_study(pool.beats, 20, {"bundled": synth}, out_dir=tmp_path, real_pool_source=pool.source,
                         calibration_n=4)
    assert len(study.cases) == 24
    features = [file_features(study.video_path(c)) | {"name": int(c.video[:24], 16)} for c in study.cases]
    truth = np.array([c.truth == "synthetic" for c in study.cases])
    aucs = {k: auc([f[k] for f in features], truth) for k in features[0]}
    assert max(aucs.values()) <= 0.65 and all(aucs[k] == 0.5 for k in aucs if k != "name"), aucs
    assert (features[0]["width"], features[0]["frames"], features[0]["fps"]) == (256, 24, 30.0)
