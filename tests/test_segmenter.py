"""LV segmenter, its training step and augmentation, and the segmentation -> EF estimator."""
from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch

from echolvfm_core.data.loops import CycleTiming
from echolvfm_core.data.phantom import render_phantom
from echolvfm_core.echo import Echo, EchoLoadError
from echolvfm_core.ef import ef_from_pair
from echolvfm_core.estimators.segmentation import (
    TTA_TRANSFORMS,
    SegmentationEF,
    SegmentationError,
    default_segmenter_dir,
    evaluate_segmentation,
    keep_largest_components,
    measure_labels,
)
from echolvfm_core.models.segmenter import LVSegmenter, segmenter_preset
from echolvfm_core.training.augment import AugmentConfig, augment_batch
from echolvfm_core.training.segmenter import FrameSampler, fit, segmentation_loss, train_preset, train_step


def tiny_model(**overrides) -> LVSegmenter:
    torch.manual_seed(0)
    return LVSegmenter(**{**dataclasses.asdict(segmenter_preset("tiny")), **overrides})


@pytest.fixture(scope="module")
def phantom():
    """A 20-frame phantom cycle at a requested EF of 40 % (exact labels, measured EF in ``.ef``)."""
    return render_phantom(3, 40.0, CycleTiming(20), fps=30.0)


# ---------------------------------------------------------------------------------------------------- network
@pytest.mark.parametrize("stem_stride", [1, 2])
def test_segmenter_shapes(stem_stride):
    model = tiny_model(stem_stride=stem_stride)
    out = model(torch.rand(2, 1, 112, 112))
    assert out.shape == (2, 4, 112, 112) and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_segmenter_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="divisible"):
        model(torch.rand(1, 1, 98, 98))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model(torch.rand(1, 3, 112, 112))
    with pytest.raises(ValueError, match="preset"):
        segmenter_preset("huge")


def test_segmenter_save_load_roundtrip(tmp_path):
    model = tiny_model().eval()
    model.save_pretrained(tmp_path)
    again = LVSegmenter.from_pretrained(tmp_path).eval()
    x = torch.rand(2, 1, 112, 112)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_demo_preset_fits_asset_budget():
    model = LVSegmenter(**dataclasses.asdict(segmenter_preset("demo")))
    n_bytes = sum(p.numel() for p in model.parameters()) * 4
    assert n_bytes < 16 * 2**20


# ---------------------------------------------------------------------------------------------------- training
def test_segmentation_loss_prefers_the_truth():
    labels = torch.randint(0, 4, (2, 16, 16))
    perfect = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2).float() * 20
    assert segmentation_loss(perfect, labels) < 0.01
    assert segmentation_loss(torch.zeros(2, 4, 16, 16), labels) > 1.0


def test_training_steps_lower_the_loss(phantom):
    model = tiny_model()
    cfg = train_preset("tiny")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.from_numpy(phantom.frames[::5, ::2, ::2]).float()[:, None] / 255.0  # 4 frames at 56 x 56
    y = torch.from_numpy(phantom.labels[::5, ::2, ::2].astype(np.int64))
    losses = [train_step(model, opt, x, y, cfg) for _ in range(20)]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def test_fit_writes_model_metrics_and_resumes(phantom, tmp_path):
    sampler = FrameSampler(phantom.frames[[0, phantom.es_index]], phantom.labels[[0, phantom.es_index]],
                           loops=[phantom])
    cfg = dataclasses.replace(train_preset("tiny"), steps=3, checkpoint_every=2)
    real_valid = type("RealFrames", (), dict(images=sampler.real_images, labels=sampler.real_labels,
                                             patients=["p", "p"], phases=["ED", "ES"]))
    metrics = fit(sampler, cfg, tmp_path, seed=1, real_valid=real_valid)
    assert (tmp_path / "final" / "config.json").is_file()
    assert json.loads((tmp_path / "metrics.json").read_text())["valid"]["n"] == 2
    assert set(metrics["valid"]) >= {"dice_lv", "dice_myo", "dice_la", "ef_mae", "n"}
    more = fit(sampler, dataclasses.replace(cfg, steps=4), tmp_path, seed=1, resume=True)
    assert more["steps_per_second"] is not None  # one step run after resuming at step 3
    assert json.loads((tmp_path / "checkpoint" / "progress.json").read_text())["step"] == 4


def test_frame_sampler_mixes_real_and_loop_frames(phantom):
    real = np.zeros((3, 112, 112), np.uint8)
    sampler = FrameSampler(real, real.copy(), loops=[phantom], loop_fraction=0.5)
    x, y = sampler.sample(4, torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 112, 112) and y.shape == (4, 112, 112) and y.dtype == torch.int64
    assert (x[:2] == 0).all() and (x[2:] > 0).any()
    with pytest.raises(ValueError, match="no real frames and no loops"):
        FrameSampler(real[:0], real[:0], loops=[])


# ---------------------------------------------------------------------------------------------------- augmentation
def test_augmentation_is_seeded_and_in_range(phantom):
    x = torch.from_numpy(phantom.frames[:4]).float()[:, None] / 255.0
    y = torch.from_numpy(phantom.labels[:4].astype(np.int64))
    a1, l1 = augment_batch(x, y, torch.Generator().manual_seed(5))
    a2, l2 = augment_batch(x, y, torch.Generator().manual_seed(5))
    a3, _ = augment_batch(x, y, torch.Generator().manual_seed(6))
    assert torch.equal(a1, a2) and torch.equal(l1, l2) and not torch.equal(a1, a3)
    assert a1.min() >= 0 and a1.max() <= 1 and set(l1.unique().tolist()) <= {0, 1, 2, 3}


def test_augmentation_without_geometry_keeps_labels_and_orientation(phantom):
    x = torch.from_numpy(phantom.frames[:2]).float()[:, None] / 255.0
    y = torch.from_numpy(phantom.labels[:2].astype(np.int64))
    cfg = AugmentConfig(p_geometry=0.0, p_dropout=0.0, p_far_dropout=0.0)
    _, labels = augment_batch(x, y, torch.Generator().manual_seed(0), cfg)
    assert torch.equal(labels, y)
    # with geometry, the LV stays on its side of the image (rotations of at most 10 degrees, never a flip)
    _, moved = augment_batch(x, y, torch.Generator().manual_seed(0), AugmentConfig(p_geometry=1.0))
    cols = lambda lab: float(torch.nonzero(lab == 1)[:, 1].float().mean())  # noqa: E731
    assert abs(cols(moved[0]) - cols(y[0])) < 15


# ---------------------------------------------------------------------------------------------------- estimator
def test_ef_path_recovers_phantom_ef_from_its_exact_labels(phantom):
    """Known answer without a network: the phantom's exact labels through area curve -> ED/ES -> EF."""
    m = measure_labels(phantom.labels)
    assert m.phases_found and m.ed_index == 0
    assert abs(m.es_index - phantom.es_index) <= 1
    assert m.ef == pytest.approx(phantom.ef, abs=1.0)
    assert abs(m.ef - phantom.requested_ef) < 5
    assert m.lv_area.shape == (20,) and m.area_unit == "px"
    with_mm = measure_labels(phantom.labels, spacing_mm=(0.5, 0.5))
    assert with_mm.ef == pytest.approx(m.ef) and with_mm.volume_unit == "ml"
    assert with_mm.lv_area[0] == pytest.approx(m.lv_area[0] * 0.25)


def test_ef_path_averages_beats_of_a_two_cycle_loop(phantom):
    m = measure_labels(np.concatenate([phantom.labels, phantom.labels]))
    assert len(m.beats) == 2 and m.ef == pytest.approx(phantom.ef, abs=1.0)


def test_a_clip_that_starts_in_systole_is_measured_as_a_cycle(phantom):
    """The pydicom sample's case: the clip starts and ends while the ventricle empties. Read as a clip, its beats
    end at the clip's ends (ES at the last frame); read as the cycle it is played as, ED -> ES runs around the end
    and the EF is the phantom's."""
    shift = phantom.es_index // 2
    clip = np.roll(phantom.labels, -shift, axis=0)
    n = len(clip)
    as_clip = measure_labels(clip)
    assert as_clip.es_index == n - 1 or as_clip.ed_index == 0
    assert as_clip.ef < phantom.ef - 5
    m = measure_labels(clip, cyclic=True)
    assert m.ed_index == n - shift and abs(m.es_index - (phantom.es_index - shift)) <= 1
    assert m.ef == pytest.approx(phantom.ef, abs=1.0) and m.beats == ((m.ed_index, m.es_index),)
    assert np.array_equal(m.labels, clip) and np.array_equal(m.lv_area, as_clip.lv_area)


def test_largest_component_cleanup():
    lab = np.zeros((1, 20, 20), np.uint8)
    lab[0, 2:10, 2:10] = 1
    lab[0, 15:17, 15:17] = 1  # island
    lab[0, 12, 2] = 3
    out = keep_largest_components(lab)
    assert (out[0, 15:17, 15:17] == 0).all() and (out[0, 2:10, 2:10] == 1).all() and out[0, 12, 2] == 3
    # per frame: two frames, the island is the largest LV part of neither; frame 1 has a single blob to keep
    two = np.stack([lab[0], np.zeros((20, 20), np.uint8)])
    two[1, 0:3, 0:3] = 1
    out = keep_largest_components(two)
    assert (out[1, 0:3, 0:3] == 1).all() and (out[0, 15:17, 15:17] == 0).all()
    assert np.array_equal(keep_largest_components(lab[0]), out[0])


class BrightIsLV(torch.nn.Module):
    """A 'network' labelling bright pixels (> 0.5) LV cavity and the rest background, pixel by pixel, so it commutes
    with any warp of the image: on frames = (labels == 1) it returns the cavity."""

    config = dataclasses.make_dataclass("Config", [("sample_size", int, 112)])()
    device, dtype = torch.device("cpu"), torch.float32

    def forward(self, x):
        return torch.cat([0.5 - x, x - 0.5, -torch.ones_like(x), -torch.ones_like(x)], dim=1)


def test_tta_maps_the_logits_back_to_the_input_grid(phantom):
    """With a warp-equivariant network, averaging over the rotated / scaled copies gives the labels of one pass."""
    assert TTA_TRANSFORMS[0] == (0.0, 1.0) and len(TTA_TRANSFORMS) > 1
    cavity = (phantom.labels == 1).astype(np.uint8)
    frames = cavity.astype(np.float32)
    plain = SegmentationEF(BrightIsLV(), tta=False).segment(frames)
    assert np.array_equal(plain, cavity)
    tta = SegmentationEF(BrightIsLV()).segment(frames)
    assert np.mean(tta == plain) > 0.9995
    assert measure_labels(tta).ef == pytest.approx(measure_labels(plain).ef, abs=0.2)


@pytest.mark.parametrize("tta", [False, True])
def test_a_spurious_blob_does_not_change_the_ef(phantom, tta):
    """A detached LV-labelled blob (in some frames) is removed before measuring: same labels and EF as without it."""
    frames = (phantom.labels == 1).astype(np.float32)
    assert not frames[:, 90:104, 4:18].any()
    blobbed = frames.copy()
    blobbed[::3, 94:100, 8:14] = 1.0
    seg = SegmentationEF(BrightIsLV(), tta=tta)
    assert np.array_equal(seg.segment(blobbed), seg.segment(frames))
    assert seg.measure(blobbed).ef == seg.measure(frames).ef
    raw = SegmentationEF(BrightIsLV(), tta=tta, cleanup=False)
    # the blob is there before cleanup
    assert (raw.segment(blobbed)[0] == 1).sum() > (raw.segment(frames)[0] == 1).sum()


def test_estimator_bad_inputs(phantom):
    seg = SegmentationEF(tiny_model())
    frames = phantom.frames.astype(np.float32) / 255.0
    with pytest.raises(EchoLoadError, match="single still frame"):
        seg.measure(frames[:1])
    with pytest.raises(EchoLoadError, match="single still frame"):
        seg.measure_echo(Echo(frames=frames[:1]))
    with pytest.raises(ValueError, match="112 x 112"):
        seg.measure(frames[:, :64, :64])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        seg.measure(frames * 2)
    with pytest.raises(SegmentationError, match="LV cavity"):
        measure_labels(np.zeros((5, 32, 32), np.uint8))


def test_estimator_runs_end_to_end_with_an_untrained_network(phantom, tmp_path):
    """Structure only (an untrained network's labels are arbitrary): labels shape, dtype, cleanup, save/load."""
    tiny_model().save_pretrained(tmp_path)
    seg = SegmentationEF.from_pretrained(tmp_path)
    labels = seg.segment(phantom.frames.astype(np.float32) / 255.0)
    assert labels.shape == phantom.labels.shape and labels.dtype == np.uint8
    assert np.array_equal(labels, keep_largest_components(labels))
    with pytest.raises(FileNotFoundError):
        SegmentationEF.from_pretrained(tmp_path / "missing")


def test_evaluate_segmentation_known_answer(phantom):
    """A 'segmenter' returning the expert labels scores Dice 1 and EF error 0."""
    images = phantom.frames[[0, phantom.es_index]]
    labels = phantom.labels[[0, phantom.es_index]]

    class Oracle:
        def segment(self, frames):
            assert frames.shape == labels.shape
            return labels

    out = evaluate_segmentation(Oracle(), images, labels, ["p1", "p1"], ["ED", "ES"])
    assert out["dice_lv"] == out["dice_myo"] == out["dice_la"] == 1.0
    assert out["ef_mae"] == 0.0 and out["n"] == 2 and out["n_patients"] == 1
    # a shrunken ES cavity changes the EF and the Dice
    class Eroded(Oracle):
        def segment(self, frames):
            out = labels.copy()
            out[1][(labels[1] == 1) & (np.roll(labels[1], 3, axis=0) != 1)] = 0
            return out

    worse = evaluate_segmentation(Eroded(), images, labels, ["p1", "p1"], ["ED", "ES"])
    assert worse["dice_lv"] < 1.0 and worse["ef_mae"] > 0.5
    eroded = Eroded().segment(images)
    expected = abs(ef_from_pair(eroded[0], eroded[1]).ef - ef_from_pair(labels[0], labels[1]).ef)
    assert worse["ef_mae"] == pytest.approx(expected, abs=1e-9)


@pytest.mark.skipif(not (default_segmenter_dir() / "config.json").is_file(),
                    reason="no bundled segmenter in assets/segmenter (train with `echolvfm train segmenter`)")
def test_bundled_segmenter_recovers_phantom_ef():
    """Needs the trained, bundled weights: a phantom loop's EF within 5 points (phantoms are unseen anatomy)."""
    seg = SegmentationEF.from_pretrained()
    for seed, ef in ((11, 35.0), (12, 60.0)):
        loop = render_phantom(seed, ef, CycleTiming(24), fps=30.0)
        m = seg.measure(loop.frames.astype(np.float32) / 255.0)
        assert abs(m.ef - loop.ef) <= 5.0, (seed, m.ef, loop.ef)


def test_bench_segmenter_reports_timings():
    from echolvfm_core.estimators.bench import bench_segmenter

    out = bench_segmenter(SegmentationEF(tiny_model()), frames=4, repeats=2, warmup=1)
    assert out["frames"] == 4 and out["size"] == 112 and out["network"]["median_ms"] > 0
    assert out["segment"]["min_ms"] <= out["segment"]["median_ms"] <= out["segment"]["max_ms"]


@pytest.fixture(scope="module")
def phantom_prepared(tmp_path_factory):
    """A phantom-only prepared folder: 3 anatomies x 2 loops, split into train and valid."""
    from echolvfm_core.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(None, out, PrepareConfig(phantom=6, loops_per_patient=2), progress=False)
    return out


def test_train_command_writes_model_card_and_loads(phantom_prepared, tmp_path, capsys):
    from echolvfm_core.cli import main

    out = tmp_path / "seg"
    assert main(["train", "segmenter", "--data", str(phantom_prepared), "--preset", "tiny", "--steps", "2",
                 "--out", str(out)]) == 0
    card = (out / "final" / "MODEL_CARD.md").read_text()
    assert "--preset tiny --seed 0 --steps 2" in card and "echolvfm prepare" in card
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    seg = SegmentationEF.from_pretrained(out / "final")
    assert seg.model.config.block_out_channels == list(segmenter_preset("tiny").block_out_channels)
    # the script logs; the command shows the library's messages on standard output and leaves no handler behind
    assert f"model written to {out / 'final'}" in capsys.readouterr().out.splitlines()
    assert logging.getLogger("echolvfm_core").handlers == []


def test_segment_command_on_the_dicom_sample(sample_path, tmp_path, capsys, monkeypatch):
    """Plumbing of `echolvfm segment` (load, preprocess, measure, JSON, overlay) with the network's labels replaced
    by a phantom's exact labels, so the result is known: the phantom's EF."""
    from echolvfm_core.cli import main

    models = tmp_path / "models"
    tiny_model().save_pretrained(models / "segmenter")
    loop = render_phantom(7, 45.0, CycleTiming(30), fps=30.0)
    monkeypatch.setattr(SegmentationEF, "segment", lambda self, frames: loop.labels[: len(frames)])
    out = tmp_path / "overlay.mp4"
    assert main(["segment", str(sample_path), "--models", str(models), "--json", "--overlay", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {"lv_area", "ed_index", "es_index", "ef", "ef_simpson"} <= set(record)
    assert len(record["lv_area"]) == 30 and record["ef"] == pytest.approx(loop.ef, abs=1.0)
    assert out.is_file() and out.stat().st_size > 0
    assert main(["segment", str(sample_path), "--models", str(tmp_path / "none")]) == 2
    assert "No segmenter" in capsys.readouterr().err


def test_segment_command_rejects_a_still(tmp_path, capsys):
    import imageio.v3 as iio

    from echolvfm_core.cli import main

    tiny_model().save_pretrained(tmp_path / "segmenter")
    still = tmp_path / "still.png"
    iio.imwrite(still, (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8))
    assert main(["segment", str(still), "--models", str(tmp_path)]) == 2
    assert "error" in capsys.readouterr().err
