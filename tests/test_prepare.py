"""`echolvfm prepare` on tiny inputs writes a folder that PreparedLoops reads."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from echolvfm_core.cli import main
from echolvfm_core.data.loops import RegistrationConfig, exp_velocity, warp
from echolvfm_core.data.prepare import PrepareConfig, prepare
from echolvfm_core.data.prepared import (
    MANIFEST_FIELDS,
    LoopSample,
    PreparedLoops,
    collate_loops,
)
from echolvfm_core.ef import ejection_fraction, lv_volumes


def measured_ef(sample: LoopSample) -> float:
    v = lv_volumes(sample.labels)
    return float(ejection_fraction(v[sample.ed_index], v[sample.es_index]))


@pytest.fixture(scope="module")
def phantom_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "phantom"
    assert main(["prepare", "--out", str(out), "--phantom", "3", "--loops-per-patient", "2", "--workers", "1",
                 "--quiet"]) == 0
    return out


def test_phantom_only_prepare(phantom_folder):
    out = phantom_folder
    ds = PreparedLoops(out)
    assert len(ds) == 3 and len(ds.patients) == 2
    assert set(ds.manifest[0]) == set(MANIFEST_FIELDS)
    first = ds.patients[0]
    assert len(ds.loops_of(first)) == 2 and ds.loops_of("nobody") == []
    efs = []
    for i in ds.loops_of(first):
        s = ds[i]
        assert s.source == "phantom" and s.patient == first and s.ed_index == 0
        assert s.frames.dtype == np.uint8 and s.frames.shape == s.labels.shape == (len(s.frames), 112, 112)
        assert 10 <= len(s.frames) <= 48
        assert s.ef == pytest.approx(measured_ef(s), abs=1e-3)  # rendering on access reproduces the manifest
        efs.append(s.ef)
    assert abs(efs[0] - efs[1]) > 5  # same anatomy, different EFs
    assert len(ds.real_frames()) == 0
    assert ds.deformation(0) is None  # phantoms have no registration
    ds[0].frames[:] = 7  # the LRU cache hands out copies
    assert not np.all(ds[0].frames == 7)
    batch = collate_loops([ds[0], ds[1], ds[2]])
    t = max(len(ds[i].frames) for i in range(3))
    assert batch["frames"].shape == (3, t, 112, 112) and batch["mask"].sum() == sum(len(ds[i].frames) for i in range(3))
    assert batch["ef"].tolist() == pytest.approx([ds[i].ef for i in range(3)])
    assert len(PreparedLoops(out, source="camus")) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["counts"]["loops_phantom"] == 3
    assert report["phantom_ef_minus_requested"]["max_abs"] <= 2.0


def test_preview_writes_montage_and_mp4s(phantom_folder, tmp_path):
    from PIL import Image

    out = tmp_path / "preview"
    assert main(["preview", "--data", str(phantom_folder), "--out", str(out), "--loops", "2", "--columns", "5"]) == 0
    picture = Image.open(out / "montage.png")
    assert picture.width > 5 * 224 and picture.height >= 2 * 224
    assert len(list(out.glob("*.mp4"))) == 2
    # no CAMUS pair
    assert main(["preview", "--data", str(phantom_folder), "--out", str(out), "--alphas", "0.5", "1"]) == 2


def test_frame_picks_keep_ed_and_es():
    from echolvfm_core.data.preview import frame_picks

    for n, es, cols in [(30, 11, 8), (10, 4, 8), (48, 17, 3)]:
        picks = frame_picks(n, es, cols)
        assert picks[0] == 0 and es in picks and len(picks) == min(cols, n) and picks == sorted(set(picks))


def test_prepare_needs_an_input(tmp_path, capsys):
    assert main(["prepare", "--out", str(tmp_path / "x")]) == 2
    assert "--camus" in capsys.readouterr().err


def test_not_a_prepared_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        PreparedLoops(tmp_path)


@pytest.mark.camus
def test_real_frames_only_prepare(camus_root, tmp_path):
    out = tmp_path / "real"
    args = ["prepare", "--camus", str(camus_root), "--out", str(out), "--loops-per-patient", "0",
            "--patients", "1", "2", "3"]
    assert main([*args, "--workers", "1", "--quiet"]) == 0
    ds = PreparedLoops(out)
    assert len(ds) == 0
    real = ds.real_frames()
    assert real.images.shape == real.labels.shape == (6, 112, 112)
    assert real.patients == ["patient0001", "patient0001", "patient0002", "patient0002", "patient0003", "patient0003"]
    assert real.phases == ["ED", "ES"] * 3
    assert all((real.labels[i] == 1).any() for i in range(6))


@pytest.mark.camus
def test_camus_prepare_with_loops(camus_root, tmp_path):
    out = tmp_path / "loops"
    config = PrepareConfig(loops_per_patient=2, phantom=1, patients=("1", "2"),
                           registration=RegistrationConfig(iterations=40))
    prepare(camus_root, out, config, progress=False)
    ds = PreparedLoops(out, source="camus")
    assert len(ds) == 4
    real = ds.real_frames()
    for k, patient in enumerate(["patient0001", "patient0002"]):
        loops = [ds[i] for i in ds.loops_of(patient)]
        assert loops[0].alpha == 1.0 and loops[1].alpha != 1.0
        for s in loops:
            assert np.array_equal(s.frames[0], real.images[2 * k])  # frame 0 is the real ED
            assert s.split == "train" and s.source == "camus"
            assert s.ef == pytest.approx(measured_ef(s), abs=1e-3)
        a1 = loops[0]
        assert np.array_equal(a1.frames[a1.es_index], real.images[2 * k + 1])  # the ES phase is the real ES
        # the stored deformation reproduces the counterfactual loop: its ED labels warped frame by frame
        i = ds.loops_of(patient)[1]
        motion = ds.deformation(i)
        cf = loops[1]
        assert motion.scale.shape == (len(cf.frames),) and motion.scale[0] == 0.0
        assert ds.deformation(ds.loops_of(patient)[0]).scale[a1.es_index] == 1.0
        disp = exp_velocity(torch.from_numpy(motion.velocity)[None], 112, torch.from_numpy(motion.scale).float(),
                            ds.registration.squarings, ds.registration.work_size)
        onehot = torch.nn.functional.one_hot(torch.from_numpy(cf.labels[0]).long(), 4).permute(2, 0, 1).float()
        warped = warp(onehot[None].expand(len(disp), -1, -1, -1), disp).argmax(1).numpy()
        assert (warped == cf.labels).mean() >= 0.995
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["ef_alpha1_minus_real_labels"]["max_abs"] <= 1.0
    assert report["counts"]["by_split"]["train"]["ssim_es"]["median"] >= 0.5
    assert len(PreparedLoops(out)) == 5
