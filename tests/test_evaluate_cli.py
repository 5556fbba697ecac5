"""``echolvfm evaluate``: sections computed only for models present, numbers consistent with the metric functions."""
import json
from pathlib import Path

import pytest

from echolvfm_core.cli import main

ASSETS = Path(__file__).resolve().parents[1] / "assets"


def test_evaluate_without_models_writes_no_numbers(camus_root, tmp_path):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--camus", str(camus_root), "--out", str(out), "--models", str(tmp_path / "none"),
               "--max-patients", "2", "--loops-per-patient", "1"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(metrics["not_evaluated"]) == ["ef_regression", "generation", "jepa", "segmentation", "vae"]
    assert not {"vae", "segmentation", "ef_regression", "generation", "jepa"} & set(metrics)
    assert "Not evaluated (model absent)" in (out / "report.md").read_text()


@pytest.mark.skipif(not (ASSETS / "vae" / "config.json").is_file() or not (ASSETS / "segmenter" / "config.json").is_file(),
                    reason="bundled VAE and segmenter are needed")
def test_evaluate_bundled_vae_and_segmenter_on_two_valid_patients(camus_root, tmp_path):
    out = tmp_path / "eval"
    rc = main(["evaluate", "--camus", str(camus_root), "--out", str(out), "--sections", "vae,segmentation",
               "--max-patients", "2", "--loops-per-patient", "1"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["vae"]["n"] == 4 and metrics["segmentation"]["n"] == 4  # ED + ES of 2 patients
    assert 0.5 < metrics["vae"]["ssim"] <= 1.0 and metrics["vae"]["psnr"] > 20
    assert 0.5 < metrics["segmentation"]["dice_lv"] <= 1.0
    assert metrics["not_evaluated"] == []


def test_evaluate_rejects_unknown_section(tmp_path, capsys):
    assert main(["evaluate", "--prepared", str(tmp_path), "--out", str(tmp_path / "o"), "--sections", "nope"]) == 2
    assert "unknown sections" in capsys.readouterr().err
