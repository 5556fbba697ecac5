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
    sections = ["ef_regression", "ef_regression_jepa", "generation", "jepa", "realism", "segmentation", "vae"]
    assert sorted(metrics["not_evaluated"]) == sections
    assert not set(sections) & set(metrics)
    assert "Not evaluated (model absent)" in (out / "report.md").read_text()


@pytest.mark.skipif(not (ASSETS / "vae" / "config.json").is_file()
                    or not (ASSETS / "segmenter" / "config.json").is_file(),
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


@pytest.mark.skipif(not (ASSETS / "vae" / "config.json").is_file()
                    or not (ASSETS / "segmenter" / "config.json").is_file(),
                    reason="bundled VAE and segmenter are needed")
def test_calibrate_gain_writes_the_best_candidate_into_flow_json(camus_root, tmp_path):
    """A random warp generator on one training patient: every candidate is measured, the smallest MAE is chosen and
    written to flow.json (the generator loads with it), calibration.json keeps the numbers."""
    import shutil
    from dataclasses import asdict

    import torch

    from echolvfm_core.flows import MeanFlowConfig
    from echolvfm_core.models.unet import EchoVelocityUNet, unet_preset
    from echolvfm_core.pipelines.counterfactual import load_generator, save_generator

    data = tmp_path / "prep"
    assert main(["prepare", "--camus", str(camus_root), "--out", str(data), "--patients", "1",
                 "--loops-per-patient", "1", "--workers", "1", "--quiet"]) == 0
    models = tmp_path / "models"
    for name in ("vae", "segmenter"):
        shutil.copytree(ASSETS / name, models / name)
    torch.manual_seed(0)
    net = EchoVelocityUNet(**{**asdict(unet_preset("tiny")), "max_frames": 16, "context_channels": 4,
                              "displacement_channels": 2})
    save_generator(net, models / "generator", "meanflow", MeanFlowConfig(residual=True, prediction="warp"))
    assert main(["calibrate-gain", "--prepared", str(data), "--models", str(models), "--patients", "1",
                 "--gains", "1,3", "--efs", "40"]) == 0
    cal = json.loads((models / "generator" / "calibration.json").read_text())
    assert [c["gain"] for c in cal["candidates"]] == [1.0, 3.0] and cal["split"] == "train"
    best = min((c for c in cal["candidates"] if c["mae"] is not None), key=lambda c: c["mae"])
    assert cal["chosen_gain"] == best["gain"] == load_generator(models / "generator").config.motion_gain
    # a generator without a displacement field has no gain to calibrate
    save_generator(EchoVelocityUNet(**asdict(unet_preset("tiny"))), models / "generator")
    assert main(["calibrate-gain", "--prepared", str(data), "--models", str(models)]) == 2


@pytest.mark.skipif(not (ASSETS / "vae" / "config.json").is_file()
                    or not (ASSETS / "segmenter" / "config.json").is_file(),
                    reason="bundled VAE and segmenter are needed")
def test_evaluate_generation_reports_the_seed_spread_and_the_linear_baseline(camus_root, tmp_path):
    """One valid patient, tiny random generators: the one-step rows, the seed spread and the baseline's rows without
    and with guidance come from one run, each with its time per video; a MeanFlow folder is refused as baseline."""
    import shutil
    from dataclasses import asdict

    import torch

    from echolvfm_core.flows import LinearFlowConfig, MeanFlowConfig
    from echolvfm_core.models.unet import EchoVelocityUNet, unet_preset
    from echolvfm_core.pipelines.counterfactual import save_generator

    models = tmp_path / "models"
    for name in ("vae", "segmenter"):
        shutil.copytree(ASSETS / name, models / name)
    torch.manual_seed(0)
    tiny = {**asdict(unet_preset("tiny")), "max_frames": 16, "context_channels": 4}
    save_generator(EchoVelocityUNet(**{**tiny, "displacement_channels": 2}), models / "generator", "meanflow",
                   MeanFlowConfig(residual=True, prediction="warp"))
    save_generator(EchoVelocityUNet(**tiny), tmp_path / "linear", "linear", LinearFlowConfig(residual=True))
    base = ["evaluate", "--camus", str(camus_root), "--out", str(tmp_path / "eval"), "--models", str(models),
            "--sections", "generation", "--max-patients", "1", "--loops-per-patient", "1", "--spread-seeds", "2"]
    assert main([*base, "--baseline", str(tmp_path / "linear"), "--baseline-guidance", "3",
                 "--baseline-seeds", "1"]) == 0
    gen = json.loads((tmp_path / "eval" / "metrics.json").read_text())["generation"]
    assert gen["n"] == 1 and gen["steps"] == 1 and gen["ms_per_video"] > 0
    assert gen["seed_spread"]["n"] == 1 and gen["seed_spread"]["seeds"] == 2
    baseline = gen["baseline"]
    assert baseline["unguided"]["steps"] == baseline["guided"]["steps"] == 25
    assert baseline["unguided"]["guidance"] == 1.0 and baseline["guided"]["guidance"] == 3.0
    assert "rec_reject" not in baseline["unguided"] and baseline["unguided"]["rec"]["n"] + \
        baseline["unguided"]["rec"]["unmeasured"] == 1
    assert baseline["speed_ratio"] == pytest.approx(baseline["unguided"]["ms_per_video"] / gen["ms_per_video"])
    assert main([*base, "--baseline", str(models / "generator")]) == 2
