"""Batch commands finish on data with odd cases: the case is skipped with its reason, listed, and the rest is kept.

The fixture is a three-patient CAMUS folder copied from the CAMUS data into tmp_path (never into the repository):
patient0200 as it is, patient0206 with its ES labels replaced by its ED labels (EF 0 %, the ES cavity as large as
the ED one), patient0230 with its ED image cut off.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from echolvfm_core.cli import main

PATIENTS = ("patient0200", "patient0206", "patient0230")
NO_EF, CUT = PATIENTS[1], PATIENTS[2]


@pytest.fixture
def odd_camus(camus_root, tmp_path) -> Path:
    root = tmp_path / "camus"
    for p in PATIENTS:
        shutil.copytree(camus_root / p, root / p)
        for f in (root / p).iterdir():
            f.chmod(0o644)
    shutil.copyfile(root / NO_EF / f"{NO_EF}_4CH_ED_gt.nii.gz", root / NO_EF / f"{NO_EF}_4CH_ES_gt.nii.gz")
    image = root / CUT / f"{CUT}_4CH_ED.nii.gz"
    image.write_bytes(image.read_bytes()[:5000])
    (root / "splits.csv").write_text("patient,split\n" + "".join(f"{p},valid\n" for p in PATIENTS))
    return root


@pytest.mark.camus
def test_prepare_skips_an_unreadable_patient_and_keeps_the_rest(odd_camus, tmp_path, capsys):
    out = tmp_path / "prep"
    assert main(["prepare", "--camus", str(odd_camus), "--out", str(out), "--loops-per-patient", "1",
                 "--workers", "1", "--quiet"]) == 0
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["counts"]["patients"] == 2
    (skip,) = report["counts"]["skipped"]
    assert skip["patient"] == CUT and f"'{CUT}_4CH_ED.nii.gz' is a corrupt or truncated NIfTI" in skip["reason"]
    assert "skipped 1 patients" in capsys.readouterr().out


@pytest.fixture
def tiny_models(tmp_path) -> Path:
    """Tiny random generator, VAE and segmenter (the command's code paths, fast on CPU)."""
    import torch

    from echolvfm_core.models.segmenter import LVSegmenter, segmenter_preset
    from echolvfm_core.models.unet import EchoVelocityUNet
    from echolvfm_core.models.vae import EchoCodec, build_vae
    from echolvfm_core.pipelines.counterfactual import save_generator

    models = tmp_path / "models"
    torch.manual_seed(0)
    save_generator(EchoVelocityUNet.from_preset("tiny", max_frames=12), models / "generator")
    EchoCodec(build_vae("tiny")).save_pretrained(models / "vae")
    LVSegmenter.from_config(dict(vars(segmenter_preset("tiny")))).save_pretrained(models / "segmenter")
    return models


@pytest.mark.camus
def test_evaluate_skips_unreadable_and_unrequestable_patients(odd_camus, tiny_models, tmp_path):
    """The generation section asks for each video's true EF: patient0206's 0 % cannot be asked for, so it is
    skipped there (and kept in the sections that can use it); the cut-off patient is skipped when the loops are
    built."""
    out = tmp_path / "eval"
    assert main(["evaluate", "--camus", str(odd_camus), "--out", str(out), "--sections", "generation,vae",
                 "--models", str(tiny_models), "--loops-per-patient", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["generation"]["n"] == 1 and metrics["vae"]["n"] == 4
    skipped = {(s["section"], s["patient"]): s["reason"] for s in metrics["skipped"]}
    assert set(skipped) == {("prepare", CUT), ("generation", NO_EF)}
    assert "EF 0.0 %" in skipped[("generation", NO_EF)]
    report = (out / "report.md").read_text()
    assert f"- generation, {NO_EF}: " in report and f"- prepare, {CUT}: " in report


@pytest.mark.camus
def test_calibrate_gain_lists_the_loops_it_could_not_measure(odd_camus, tmp_path, monkeypatch, capsys):
    """A generated loop the segmenter cannot measure is left out of the gain's MAE and listed with its patient."""
    from dataclasses import asdict
    from types import SimpleNamespace

    import torch

    from echolvfm_core.estimators.segmentation import SegmentationEF
    from echolvfm_core.flows import MeanFlowConfig
    from echolvfm_core.models.segmenter import LVSegmenter, segmenter_preset
    from echolvfm_core.models.unet import EchoVelocityUNet, unet_preset
    from echolvfm_core.models.vae import EchoCodec, build_vae
    from echolvfm_core.pipelines.counterfactual import save_generator

    data = tmp_path / "prep"
    assert main(["prepare", "--camus", str(odd_camus), "--out", str(data), "--loops-per-patient", "1",
                 "--workers", "1", "--quiet"]) == 0
    models = tmp_path / "models"
    torch.manual_seed(0)
    net = EchoVelocityUNet(**{**asdict(unet_preset("tiny")), "max_frames": 12, "context_channels": 4,
                              "displacement_channels": 2})
    save_generator(net, models / "generator", "meanflow", MeanFlowConfig(residual=True, prediction="warp"))
    EchoCodec(build_vae("tiny")).save_pretrained(models / "vae")
    LVSegmenter.from_config(dict(vars(segmenter_preset("tiny")))).save_pretrained(models / "segmenter")
    calls = []

    def measure(self, frames, spacing_mm=None):  # the second patient's loop has no LV the segmenter can find
        calls.append(1)
        if len(calls) % 2 == 0:
            raise ValueError("no LV cavity in some frames")
        return SimpleNamespace(ef=42.0)

    monkeypatch.setattr(SegmentationEF, "measure", measure)
    assert main(["calibrate-gain", "--prepared", str(data), "--models", str(models), "--split", "valid",
                 "--gains", "1,2", "--efs", "40"]) == 0
    cal = json.loads((models / "generator" / "calibration.json").read_text())
    assert [c["mae"] for c in cal["candidates"]] == [2.0, 2.0]
    assert cal["skipped"] == [{"patient": NO_EF, "gain": g, "ef": 40.0,
                               "reason": "the segmenter could not measure the generated loop"} for g in (1.0, 2.0)]
    assert "2 generated loops could not be measured" in capsys.readouterr().out


def test_quiz_create_skips_a_pool_file_it_cannot_show(sample_path, tmp_path, capsys, monkeypatch):
    """Two copies of the sample cine and one file that is no video: the study is built from the two cines' beats,
    and the unreadable file is named with its reason."""
    import torch
    from test_quiz_ui import build_quiz_models, fake_measure

    from echolvfm_core.estimators.segmentation import SegmentationEF

    monkeypatch.setattr(SegmentationEF, "measure", fake_measure)  # the tiny random segmenter finds no LV
    models = build_quiz_models(tmp_path / "models")
    pool = tmp_path / "pool"
    pool.mkdir()
    for i in range(2):
        shutil.copyfile(sample_path, pool / f"cine{i:02d}.dcm")
    (pool / "cine05b.avi").write_text("notes, not a video")
    db = tmp_path / "quiz.sqlite"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the automatic reader's classifier
    try:
        assert main(["quiz", "create", str(db), "--pool", str(pool), "--cases", "4", "--calibration", "0",
                     "--models", str(models), "--seed", "0", "--size", "128", "--frames", "12",
                     "--max-detectability", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "Left out 1: 'cine05b.avi' could not be decoded as a video" in out
    from echolvfm_core.quiz.store import QuizStore

    (study,) = QuizStore(db).studies()
    assert study.config["pool_beats"] == 2 and study.real_pool_source.endswith("3 cine files from "
                                                                               f"{pool}: 3 cines cut into 2 whole "
                                                                               "beats (1 left out)")

@pytest.mark.camus
def test_quiz_create_skips_an_unreadable_camus_patient(odd_camus, tmp_path, capsys, monkeypatch):
    """Three CAMUS loops asked for: the cut-off patient is left out with its reason, the study is built from the
    other two patients' loops (patient0206's odd labels do not matter here: its images move) and one pool cine."""
    import torch
    from test_quiz_ui import build_quiz_models, dicom_pool, fake_measure

    from echolvfm_core.estimators.segmentation import SegmentationEF
    from echolvfm_core.quiz.store import QuizStore

    monkeypatch.setattr(SegmentationEF, "measure", fake_measure)  # the tiny random segmenter finds no LV
    models = build_quiz_models(tmp_path / "models")
    pool = dicom_pool(tmp_path / "pool", 1)
    db = tmp_path / "quiz.sqlite"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the automatic reader's classifier
    try:
        assert main(["quiz", "create", str(db), "--pool", str(pool), "--data", str(odd_camus), "--camus-loops", "3",
                     "--cases", "4", "--calibration", "0", "--models", str(models), "--size", "128", "--frames",
                     "12", "--max-detectability", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert f"Left out 1: {CUT}: '{CUT}_4CH_ED.nii.gz' is a corrupt or truncated NIfTI" in out
    (study,) = QuizStore(db).studies()
    assert study.config["pool_beats"] == 3
    assert "+ 2 CAMUS real-anatomy loops with synthesised motion" in study.real_pool_source
    assert study.real_pool_source.endswith("(1 left out)")


@pytest.mark.camus
def test_quiz_create_with_no_readable_camus_patient_says_why(odd_camus, tmp_path, capsys):
    """Only the cut-off patient in the CAMUS split asked for: one clear line with its reason, no database."""
    from test_quiz_ui import build_quiz_models

    (odd_camus / "splits.csv").write_text(f"patient,split\n{PATIENTS[0]},train\n{NO_EF},train\n{CUT},valid\n")
    db = tmp_path / "quiz.sqlite"
    rc = main(["quiz", "create", str(db), "--data", str(odd_camus), "--camus-loops", "1", "--cases", "4",
               "--models", str(build_quiz_models(tmp_path / "models"))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"No usable CAMUS patient under 'camus'; {CUT}: '{CUT}_4CH_ED.nii.gz' is a corrupt or truncated" in err
    assert str(tmp_path) not in err and not db.exists()
