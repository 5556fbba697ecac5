"""EF denoiser, DDIM posterior sampler, diffusion-regression training and its metrics."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from echolvfm_core.data.loops import CycleTiming
from echolvfm_core.data.phantom import render_phantom
from echolvfm_core.echo import ClinicalInfo, Echo, EchoLoadError
from echolvfm_core.estimators.ef_posterior import (
    EFPosterior,
    EFPosteriorEstimator,
    clip_indices,
    conformal_spread_scale,
    ddim_sample,
    default_ef_regressor_dir,
    evaluate_ef_regression,
    make_sampler,
    make_train_scheduler,
    video_clip,
)
from echolvfm_core.metrics import crps_samples, interval_coverage
from echolvfm_core.models.ef_denoiser import EFDenoiser, ef_denoiser_preset
from echolvfm_core.models.video_encoder import area_statistics
from echolvfm_core.training.augment import AugmentConfig
from echolvfm_core.training.ef_regressor import (
    LABEL_CLASSES,
    ClipSampler,
    calibration_split,
    diffusion_loss,
    fit,
    label_loss,
    label_stats,
    train_preset,
)


def tiny_model(**overrides) -> EFDenoiser:
    torch.manual_seed(0)
    return EFDenoiser(**{**dataclasses.asdict(ef_denoiser_preset("tiny")), **overrides})


def tiny_estimator(**overrides) -> EFPosteriorEstimator:
    return EFPosteriorEstimator(tiny_model(**overrides), make_sampler(make_train_scheduler().config))


@pytest.fixture(scope="module")
def loops():
    """Two phantom cycles of the same anatomy at different EFs, as floats in [0, 1]."""
    out = []
    for ef in (30.0, 65.0):
        p = render_phantom(4, ef, CycleTiming(16), fps=30.0, size=64)
        out.append(dataclasses.replace(p, frames=p.frames.astype(np.float32) / 255.0))
    return out


# ---------------------------------------------------------------------------------------------------- network
def test_denoiser_shapes_and_conditioning():
    model = tiny_model()
    c = model.config
    video = torch.rand(3, 1, c.num_frames, c.frame_size, c.frame_size)
    feats = model.encode(video)
    assert feats.shape == (3, c.feature_dim)
    t = torch.tensor([0, 500, 999])
    eps = model(torch.randn(3), t, features=feats)
    assert eps.shape == (3,) and torch.isfinite(eps).all()
    # known age / sex change the prediction; unknown ones use the null embeddings (NaN / -1)
    with torch.no_grad():
        torch.nn.init.normal_(model.age_null)
        base = model(torch.zeros(3), t, features=feats)
        aged = model(torch.zeros(3), t, features=feats, age=torch.tensor([70.0, 70.0, float("nan")]),
                     sex=torch.tensor([1, -1, -1]))
    assert not torch.allclose(base[:2], aged[:2]) and torch.allclose(base[2], aged[2])
    # batch-1 conditioning is shared by many samples
    cond = model.condition(feats[:1])
    assert model(torch.randn(5), t[:1], cond=cond).shape == (5,)


def test_denoiser_rejects_bad_input():
    model = tiny_model()
    with pytest.raises(ValueError, match="encode expects"):
        model.encode(torch.rand(1, 1, 3, 32, 32))
    with pytest.raises(ValueError, match="exactly one"):
        model(torch.randn(2), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="ef_std"):
        EFDenoiser(ef_std=0.0)


def test_clip_indices_and_video_clip():
    assert clip_indices(30, 4).tolist() == [0, 10, 19, 29]
    assert clip_indices(5, 8).min() == 0 and clip_indices(5, 8).max() == 4
    two = clip_indices(10, 10, offset=0.5, cycles=2.0)
    assert two.tolist() == [5, 7, 9, 1, 3, 5, 7, 9, 1, 3]
    clip = video_clip(np.random.rand(12, 64, 64).astype(np.float32), 8, 32)
    assert clip.shape == (1, 8, 32, 32) and clip.dtype == torch.float32


# ---------------------------------------------------------------------------------------------------- sampler
def test_ddim_with_exact_gaussian_score_recovers_the_posterior():
    """Known answer: for y0 ~ N(m, s^2) the optimal noise prediction is analytic; 10 DDIM steps on 4000 draws
    must reproduce the mean closely and the sd within the discretisation error of 10 steps (a slight shrinkage).
    A small error in the predicted noise must not blow up (the first step avoids the zero signal-to-noise end)."""
    sampler = make_sampler(make_train_scheduler().config)
    abar = sampler.alphas_cumprod.double()
    m, s = 0.8, 0.5

    def eps_fn(y, t):
        a = abar[t]
        return (1 - a).sqrt() * (y - a.sqrt() * m) / (a * s * s + 1 - a)

    y = ddim_sample(eps_fn, sampler, 4000, 10, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(y.mean()) == pytest.approx(m, abs=0.05)
    assert 0.75 * s < float(y.std()) < 1.05 * s
    off = ddim_sample(lambda y, t: eps_fn(y, t) + 0.02, sampler, 4000, 10, torch.Generator().manual_seed(0),
                      dtype=torch.float64)
    assert float(off.mean()) == pytest.approx(m, abs=0.15)


def test_posterior_deterministic_for_a_seed(loops):
    est = tiny_estimator()
    a = est.posterior(loops[0].frames, seed=3)
    b = est.posterior(loops[0].frames, seed=3)
    c = est.posterior(loops[0].frames, seed=4)
    assert np.array_equal(a.samples, b.samples) and not np.array_equal(a.samples, c.samples)
    assert a.samples.shape == (40,) and a.steps == 10
    assert a.samples.min() >= 0 and a.samples.max() <= 100
    assert a.p05 <= a.mean <= a.p95
    d = a.to_dict()
    assert set(d) >= {"mean", "sd", "p05", "p95", "samples"} and len(d["samples"]) == 40
    json.dumps(d)


def test_features_are_cached_per_loop(loops, monkeypatch):
    est = tiny_estimator()
    calls = []
    original = est.model.encode
    monkeypatch.setattr(est.model, "encode", lambda v: calls.append(1) or original(v))
    est.posterior(loops[0].frames, seed=0)
    est.posterior(loops[0].frames, seed=1)
    assert len(calls) == 1
    est.posterior(loops[1].frames, seed=0)
    assert len(calls) == 2


def test_clipping_flag():
    inside = EFPosterior.from_samples(np.array([40.0, 50.0, 60.0]), seed=0, steps=10)
    assert not inside.clipped and inside.mean == pytest.approx(50.0)
    outside = EFPosterior.from_samples(np.array([-5.0, 50.0, 104.0]), seed=0, steps=10)
    assert outside.clipped and outside.samples.min() == 0.0 and outside.samples.max() == 100.0
    # a model whose EF scale puts every draw far above 100 % gets clipped samples and the flag
    est = tiny_estimator(ef_mean=400.0, ef_std=1.0)
    post = est.posterior(np.random.rand(8, 64, 64).astype(np.float32), seed=0)
    assert post.clipped and np.all(post.samples == 100.0)


def test_bad_inputs(loops):
    est = tiny_estimator()
    with pytest.raises(EchoLoadError, match="single still frame"):
        est.posterior(loops[0].frames[:1])
    with pytest.raises(EchoLoadError, match="single still frame"):
        est.posterior_echo(Echo(frames=loops[0].frames[:1]))
    with pytest.raises(ValueError, match="square"):
        est.posterior(loops[0].frames[:, :, :32])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        est.posterior(loops[0].frames * 3)
    with pytest.raises(ValueError, match="sex"):
        est.posterior(loops[0].frames, sex="X")
    with pytest.raises(ValueError, match="age"):
        est.posterior(loops[0].frames, age=-3)
    post = est.posterior_echo(Echo(frames=loops[0].frames, info=ClinicalInfo(age=64.0, sex="F")))
    assert post.samples.shape == (40,)


def test_save_load_roundtrip(loops, tmp_path):
    est = tiny_estimator()
    est.model.save_pretrained(tmp_path)
    make_train_scheduler().save_pretrained(tmp_path)
    again = EFPosteriorEstimator.from_pretrained(tmp_path)
    assert np.allclose(est.posterior(loops[0].frames).samples, again.posterior(loops[0].frames).samples, atol=1e-3)
    with pytest.raises(FileNotFoundError):
        EFPosteriorEstimator.from_pretrained(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------- training
class _Loop:
    def __init__(self, frames, ef):
        self.frames, self.ef = frames, ef


def _dataset(loops):
    return [_Loop((p.frames * 255).astype(np.uint8), p.ef) for p in loops]


def test_training_steps_lower_the_loss(loops):
    """A few steps on two loops: the noise-prediction loss (fixed noise and timesteps) goes down."""
    cfg = train_preset("tiny")
    mean, sd = label_stats(np.array([p.ef for p in loops]))
    model = tiny_model(ef_mean=mean, ef_std=sd)
    sampler = ClipSampler(_dataset(loops), model.config, dataclasses.replace(cfg, p_uninformative=0.0))
    sched = make_train_scheduler()
    clips, ef, age, sex, labels = sampler.sample(4, torch.Generator().manual_seed(0))
    assert labels is None  # the tiny preset does not use them
    assert clips.shape == (4, 1, 8, 32, 32) and clips.min() >= 0 and clips.max() <= 1

    def loss_at(seed):
        return diffusion_loss(model, sched, clips, ef, age, sex, 8, 0.5, torch.Generator().manual_seed(seed))[0]

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        before = np.mean([float(loss_at(100 + k)) for k in range(4)])
    for step in range(40):
        loss = loss_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = np.mean([float(loss_at(100 + k)) for k in range(4)])
    assert after < 0.8 * before


def test_real_motion_share_chooses_the_loops(loops):
    """With the loops' alphas, ``p_real_motion`` sets the share of clips from the alpha = 1 loop (EF 30 here)."""
    model = tiny_model()
    data, alphas = _dataset(loops), [1.0, 0.6]

    def share_real(p_real, alphas):
        cfg = dataclasses.replace(train_preset("tiny"), p_uninformative=0.0, p_real_motion=p_real)
        _, ef, _, _, _ = ClipSampler(data, model.config, cfg, alphas).sample(200, torch.Generator().manual_seed(0))
        return float(np.isclose(ef.numpy(), loops[0].ef, atol=1e-3).mean())

    assert share_real(1.0, alphas) == 1.0
    assert share_real(0.2, alphas) == pytest.approx(0.2, abs=0.07)
    assert share_real(0.9, None) == pytest.approx(0.5, abs=0.1)  # no alphas: every loop equally likely
    assert share_real(0.9, [1.0, 1.0]) == pytest.approx(0.5, abs=0.1)  # one group only: the same
    with pytest.raises(ValueError, match="one alpha per loop"):
        ClipSampler(data, model.config, dataclasses.replace(train_preset("tiny"), p_real_motion=0.5), [1.0])


def test_uninformative_clips_replace_the_video(loops):
    cfg = dataclasses.replace(train_preset("tiny"), p_uninformative=1.0)
    model = tiny_model()
    sampler = ClipSampler(_dataset(loops), model.config, cfg)
    clips, ef, _, _, _ = sampler.sample(6, torch.Generator().manual_seed(1))
    known = np.array([p.ef for p in loops])
    assert all(np.isclose(known, v, atol=1e-3).any() for v in ef.tolist())  # labels are kept
    for clip in clips[:, 0]:
        still = torch.allclose(clip, clip[:1].expand_as(clip))
        assert still or float(clip.std()) > 0.02


class _LabelledLoop(_Loop):
    def __init__(self, frames, labels, ef):
        super().__init__(frames, ef)
        self.labels = labels


def _labelled(loops):
    return [_LabelledLoop((p.frames * 255).astype(np.uint8), p.labels, p.ef) for p in loops]


def _label_config(area_features=False, **overrides):
    cfg = train_preset("tiny")
    model = dataclasses.replace(cfg.model, label_classes=LABEL_CLASSES, area_features=area_features)
    return dataclasses.replace(cfg, model=model, label_weight=1.0, **overrides)


def test_label_heads_shapes_and_absence():
    model = tiny_model(label_classes=LABEL_CLASSES)
    c = model.config
    video = torch.rand(2, 1, c.num_frames, c.frame_size, c.frame_size)
    feats, logits, areas = model.encode(video, maps=True)
    assert feats.shape == (2, c.feature_dim)
    # the tiny encoder has two stages, the second halving T
    assert logits.shape == (2, LABEL_CLASSES, c.num_frames // 2, c.frame_size // 4, c.frame_size // 4)
    assert areas.shape == (2, c.num_frames // 2, LABEL_CLASSES)
    torch.testing.assert_close(model.encode(video), feats)  # the heads do not change the features
    with pytest.raises(ValueError, match="no label heads"):
        tiny_model().encode(video, maps=True)
    with pytest.raises(ValueError, match="r2plus1d backbone only"):
        tiny_model(backbone="jepa", jepa={"num_frames": 8, "frame_size": 32}, label_classes=4)


def test_area_statistics_measure_the_cavity_change():
    """Near one-hot logits of a cavity shrinking from 64 to 16 pixels of 256 (and a fixed 32-pixel atrium)."""
    labels = torch.zeros(1, 3, 16, 16, dtype=torch.long)
    for t, side in enumerate((8, 6, 4)):
        labels[0, t, :side, :side] = 1
    labels[0, :, 12:16, 8:16] = 3
    logits = 20.0 * torch.nn.functional.one_hot(labels, LABEL_CLASSES).permute(0, 4, 1, 2, 3).float()
    stats = area_statistics(logits)
    assert stats.shape == (1, 2 * (LABEL_CLASSES - 1) + 1)
    hi, lo, ef = stats[0, :3].exp(), stats[0, 3:6].exp(), float(stats[0, 6])
    torch.testing.assert_close(hi, torch.tensor([64 / 256, 1e-3, 32 / 256]), atol=1e-4, rtol=0)
    torch.testing.assert_close(lo, torch.tensor([16 / 256, 1e-3, 32 / 256]), atol=1e-4, rtol=0)
    assert ef == pytest.approx(1 - (16 / 64) ** 1.5, abs=1e-3)


def test_area_features_use_the_label_head_at_inference():
    model = tiny_model(label_classes=LABEL_CLASSES, area_features=True)
    c = model.config
    video = torch.rand(2, 1, c.num_frames, c.frame_size, c.frame_size)
    with torch.no_grad():
        feats = model.encode(video)
        torch.testing.assert_close(model.encode(video, maps=True)[0], feats)
        model.encoder.label_head.bias.add_(torch.tensor([0.0, 3.0, 0.0, 0.0]))  # a larger predicted cavity
        assert not torch.allclose(model.encode(video), feats)
    with pytest.raises(ValueError, match="needs the label heads"):
        tiny_model(area_features=True)
    with pytest.raises(ValueError, match="r2plus1d backbone only"):
        tiny_model(backbone="jepa", jepa={"num_frames": 8, "frame_size": 32}, area_features=True)


def test_sampled_labels_follow_the_clip(loops):
    """Labels come with every clip, moved by the same geometry: the phantom's cavity stays darker than its wall."""
    cfg = _label_config(p_uninformative=0.0, augment=AugmentConfig(p_geometry=1.0, max_rotation=15.0, p_speckle=0.0,
                                                                      p_dropout=0.0, p_far_dropout=0.0))
    sampler = ClipSampler(_labelled(loops), cfg.model, cfg)
    batch = sampler.sample(6, torch.Generator().manual_seed(2))
    assert batch.labels.shape == (6, 8, 32, 32) and batch.labels.dtype == torch.int64
    x = batch.clips[:, 0]
    assert float(x[batch.labels == 1].mean()) < float(x[batch.labels == 2].mean()) - 0.1
    noisy = ClipSampler(_labelled(loops), cfg.model, dataclasses.replace(cfg, p_uninformative=1.0))
    assert bool((noisy.sample(3, torch.Generator().manual_seed(2)).labels == -1).all())  # nothing to learn there


def test_label_loss_prefers_the_true_labels_and_skips_unknown_clips():
    torch.manual_seed(0)
    labels = torch.randint(0, LABEL_CLASSES, (2, 4, 16, 16))
    onehot = torch.nn.functional.one_hot(labels, LABEL_CLASSES).permute(0, 4, 1, 2, 3).float()
    right = 8.0 * torch.nn.functional.avg_pool3d(onehot, (1, 4, 4)) - 4.0  # logits at a quarter of the side
    share = onehot.mean(dim=(3, 4)).transpose(1, 2)  # (B, F, K)
    areas = 0.5 * (share[:, 0::2] + share[:, 1::2])  # two frames per step
    good = label_loss(right, areas, labels)
    bad = label_loss(-right, areas.flip(-1), labels)
    assert float(good) < float(bad)
    assert float(label_loss(right, areas, torch.full_like(labels, -1))) == 0.0
    mixed = labels.clone()
    mixed[1] = -1
    # an unknown clip's predictions, however wrong, change nothing
    torch.testing.assert_close(label_loss(torch.cat([right[:1], -right[1:]]),
                                          torch.cat([areas[:1], areas[1:].flip(-1)]), mixed),
                               label_loss(right[:1], areas[:1], labels[:1]))


@pytest.mark.parametrize("area_features", [False, True])
def test_label_supervision_trains_the_heads(loops, tmp_path, area_features):
    """fit with label_weight > 0: the label heads get gradients and the loss parts report the label loss."""
    mean, sd = label_stats(np.array([p.ef for p in loops]))
    cfg = _label_config(area_features, p_uninformative=0.0)
    model = tiny_model(ef_mean=mean, ef_std=sd, label_classes=LABEL_CLASSES, area_features=area_features)
    batch = ClipSampler(_labelled(loops), model.config, cfg).sample(4, torch.Generator().manual_seed(0))
    loss, parts = diffusion_loss(model, make_train_scheduler(), batch.clips, batch.ef, batch.age, batch.sex, 4, 0.5,
                                 torch.Generator().manual_seed(0), batch.labels, cfg.label_weight)
    loss.backward()
    assert parts["label"] > 0
    for head in (model.encoder.label_head, model.encoder.area_head):
        assert float(head.weight.grad.abs().sum()) > 0
    cfg = dataclasses.replace(cfg, steps=2, model=dataclasses.replace(cfg.model, ef_mean=mean, ef_std=sd))
    fit(ClipSampler(_labelled(loops), cfg.model, cfg), cfg, tmp_path, seed=0)
    est = EFPosteriorEstimator.from_pretrained(tmp_path / "final")
    assert est.model.config.label_classes == LABEL_CLASSES and est.posterior(loops[0].frames).samples.shape == (40,)
    assert est.model.config.area_features == area_features


def test_fit_writes_model_scheduler_metrics(loops, tmp_path):
    mean, sd = label_stats(np.array([p.ef for p in loops]))
    cfg = train_preset("tiny")
    cfg = dataclasses.replace(cfg, steps=3, checkpoint_every=2,
                              model=dataclasses.replace(cfg.model, ef_mean=mean, ef_std=sd))
    metrics = fit(ClipSampler(_dataset(loops), cfg.model, cfg), cfg, tmp_path, seed=0, valid_loops=_dataset(loops))
    v = metrics["valid_alpha1"]
    assert set(v) == {"mae", "rmse", "r2", "crps", "coverage90", "n"} and v["n"] == 2
    est = EFPosteriorEstimator.from_pretrained(tmp_path / "final")
    assert est.model.config.ef_mean == pytest.approx(mean)
    more = fit(ClipSampler(_dataset(loops), cfg.model, cfg), dataclasses.replace(cfg, steps=4), tmp_path, resume=True)
    assert json.loads((tmp_path / "checkpoint" / "progress.json").read_text())["step"] == 4 and more["steps"] == 4


def test_conformal_spread_scale_known_answer():
    """Labels at 0, 0.2, ..., 2 half-intervals from the mean need k = 0, ..., 2; with n = 10 the finite-sample
    quantile is the largest (ceil(11 * 0.9) / 10 = 1)."""
    needed = np.linspace(0.0, 2.0, 11)[1:]
    sign = np.where(np.arange(10) % 2 == 0, 1.0, -1.0)
    truth = 50.0 + sign * needed * np.where(sign > 0, 10.0, 5.0)  # half-intervals 10 above, 5 below the mean
    k = conformal_spread_scale(np.full(10, 50.0), np.full(10, 45.0), np.full(10, 60.0), truth)
    assert k == pytest.approx(2.0)
    # with many labels the widened interval covers about 90 % of them, whatever the posterior's own width
    rng = np.random.default_rng(0)
    y = rng.normal(0.0, 3.0, 2000)
    k = conformal_spread_scale(np.zeros(2000), np.full(2000, -1.0), np.ones(2000), y)
    assert k == pytest.approx(3.0 * 1.645, rel=0.05)
    assert np.mean(np.abs(y) <= k) == pytest.approx(0.9, abs=0.01)
    with pytest.raises(ValueError, match="non-empty"):
        conformal_spread_scale([], [], [], [])


def test_spread_scale_widens_the_draws_about_their_mean(loops):
    narrow = tiny_estimator(ef_mean=50.0, ef_std=0.2)
    wide = tiny_estimator(ef_mean=50.0, ef_std=0.2, spread_scale=3.0)
    a, b = narrow.posterior(loops[0].frames, seed=3), wide.posterior(loops[0].frames, seed=3)
    assert not a.clipped and not b.clipped
    assert b.mean == pytest.approx(a.mean, abs=1e-4) and b.sd == pytest.approx(3.0 * a.sd, rel=1e-5)
    assert b.p95 - b.p05 == pytest.approx(3.0 * (a.p95 - a.p05), rel=1e-5)
    with pytest.raises(ValueError, match="spread_scale"):
        tiny_model(spread_scale=0.0)


def test_calibration_split_holds_out_whole_patients():
    manifest = [{"patient": f"p{i // 4}", "source": "camus"} for i in range(40)]
    manifest += [{"patient": f"ph{i}", "source": "phantom"} for i in range(5)]
    train_idx, calib = calibration_split(manifest, 3, seed=0)
    held = {manifest[i]["patient"] for i in calib}
    assert len(held) == 3 and len(calib) == 12 and sorted(train_idx + calib) == list(range(45))
    assert not held & {manifest[i]["patient"] for i in train_idx}
    assert all(manifest[i]["source"] == "camus" for i in calib)
    assert calibration_split(manifest, 3, seed=0) == (train_idx, calib) != calibration_split(manifest, 3, seed=1)
    assert calibration_split(manifest, 0, seed=0) == (list(range(45)), [])
    with pytest.raises(ValueError, match="calibration_patients"):
        calibration_split(manifest, 10, seed=0)


def test_fit_with_ema_and_calibration(loops, tmp_path):
    """The EMA weights are the ones saved; held-out loops set the saved spread_scale, reported in the metrics."""
    mean, sd = label_stats(np.array([p.ef for p in loops]))
    cfg = train_preset("tiny")
    cfg = dataclasses.replace(cfg, steps=3, checkpoint_every=0,
                              model=dataclasses.replace(cfg.model, ef_mean=mean, ef_std=sd))
    fit(ClipSampler(_dataset(loops), cfg.model, cfg), cfg, tmp_path / "raw", seed=0)
    metrics = fit(ClipSampler(_dataset(loops), cfg.model, cfg), dataclasses.replace(cfg, ema_decay=0.9),
                  tmp_path / "ema", seed=0, calibration_loops=_dataset(loops))
    raw = EFDenoiser.from_pretrained(tmp_path / "raw" / "final")
    ema = EFDenoiser.from_pretrained(tmp_path / "ema" / "final")
    assert not torch.allclose(raw.aux_head.weight, ema.aux_head.weight)
    cal = metrics["calibration"]
    assert cal["n"] == 2 and set(cal["before"]) == set(cal["after"]) == {"mae", "rmse", "r2", "crps", "coverage90", "n"}
    assert ema.config.spread_scale == pytest.approx(cal["spread_scale"]) and cal["spread_scale"] != 1.0
    assert raw.config.spread_scale == 1.0


def test_evaluate_ef_regression_known_answer():
    """A fake estimator that returns N(truth + 2, 1) samples: MAE about 2, coverage of the 90 % interval low."""

    class Fake:
        def posterior(self, frames, seed=0):
            truth = float(frames.mean() * 100)
            s = np.random.default_rng(seed).normal(truth + 2.0, 1.0, 400)
            return EFPosterior.from_samples(s, seed, 10)

    data = [_Loop(np.full((4, 8, 8), v, np.float32), v * 100) for v in (0.3, 0.5, 0.6, 0.7)]
    out = evaluate_ef_regression(Fake(), data)
    assert out["n"] == 4 and out["mae"] == pytest.approx(2.0, abs=0.2)
    assert out["coverage90"] == 0.0 and out["r2"] < 1.0
    assert out["crps"] == pytest.approx(np.mean([crps_samples(Fake().posterior(d.frames).samples, d.ef) for d in data]))


def test_crps_and_coverage_known_answers():
    # CRPS of a point mass at x against y is |x - y|; of N(0, 1) samples against 0 it is 2 phi(0) - 1/sqrt(pi)
    assert crps_samples(np.full(10, 3.0), 1.0) == pytest.approx(2.0)
    z = np.random.default_rng(0).normal(size=100_000)
    assert crps_samples(z, 0.0) == pytest.approx(2 / np.sqrt(2 * np.pi) - 1 / np.sqrt(np.pi), abs=0.005)
    assert crps_samples(np.stack([z[:100], z[100:200]]), np.array([0.0, 1.0])).shape == (2,)
    assert interval_coverage([0, 0], [1, 1], [0.5, 2.0]) == 0.5
    with pytest.raises(ValueError):
        crps_samples(np.array([np.nan]), 0.0)


@pytest.mark.slow
def test_tiny_model_learns_tight_posteriors_for_loops_and_a_wide_one_for_noise(loops, tmp_path):
    """Structure of the uncertainty, on a tiny model trained for 200 steps on two phantom loops (30 % of the clips
    replaced by noise or a still frame): each loop's posterior sits on its EF, pure noise gets a wide posterior."""
    mean, sd = label_stats(np.array([p.ef for p in loops]))
    cfg = train_preset("tiny")
    still = AugmentConfig(p_geometry=0, gain_range=(1, 1), gamma_log_range=0, attenuation_range=(0, 0), p_speckle=0,
                          p_dropout=0, p_far_dropout=0)
    cfg = dataclasses.replace(cfg, steps=200, batch_size=8, noise_draws=8, lr=1e-2, checkpoint_every=0,
                              p_uninformative=0.3, p_inference_clip=1.0, augment=still,
                              model=dataclasses.replace(cfg.model, ef_mean=mean, ef_std=sd))
    fit(ClipSampler(_dataset(loops), cfg.model, cfg), cfg, tmp_path, seed=1)
    est = EFPosteriorEstimator.from_pretrained(tmp_path / "final")
    clean = [est.posterior(p.frames, seed=0) for p in loops]
    noise = est.posterior(np.random.default_rng(0).random((16, 64, 64)).astype(np.float32), seed=0)
    for post, p in zip(clean, loops):
        assert abs(post.mean - p.ef) < 5, (post.mean, p.ef)
    assert noise.sd > 1.5 * max(post.sd for post in clean)


# ---------------------------------------------------------------------------------------------------- bundled
@pytest.mark.skipif(not (default_ef_regressor_dir() / "config.json").is_file(),
                    reason="no bundled EF posterior model in assets/ef_regressor "
                           "(train with `echolvfm train ef-regressor`)")
def test_bundled_posterior_is_wider_for_noise_than_for_a_clean_loop():
    """Needs the trained, bundled weights: pure noise carries no EF information, a phantom loop does."""
    est = EFPosteriorEstimator.from_pretrained()
    loop = render_phantom(21, 55.0, CycleTiming(30), fps=30.0)
    clean = est.posterior(loop.frames.astype(np.float32) / 255.0, seed=0)
    noise = est.posterior(np.random.default_rng(0).random((30, 112, 112)).astype(np.float32), seed=0)
    assert noise.sd > clean.sd


def test_bench_posterior_reports_timings():
    from echolvfm_core.estimators.bench import bench_posterior

    out = bench_posterior(tiny_estimator(), frames=8, size=64, repeats=2, warmup=1)
    assert out["trajectories"] == 40 and out["steps"] == 10
    assert all(out[k]["median_ms"] > 0 for k in ("encoder", "sampling", "total"))


def test_train_command_writes_model_card_and_loads(tmp_path):
    from echolvfm_core.cli import main
    from echolvfm_core.data.prepare import PrepareConfig, prepare
    from echolvfm_core.data.prepared import PreparedLoops

    data = tmp_path / "prepared"
    prepare(None, data, PrepareConfig(phantom=6, loops_per_patient=2), progress=False)
    out = tmp_path / "ef"
    args = ["train", "ef-regressor", "--data", str(data), "--preset", "tiny", "--steps", "2", "--seed", "3",
            "--out", str(out)]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    train_efs = [r["ef"] for r in PreparedLoops(data, split="train").manifest]
    assert metrics["ef_mean"] == pytest.approx(np.mean(train_efs)) and metrics["valid_alpha1"]["n"] == 2
    assert "coverage90" in (out / "final" / "MODEL_CARD.md").read_text()
    est = EFPosteriorEstimator.from_pretrained(out / "final")
    assert est.model.config.ef_std == pytest.approx(np.std(train_efs, ddof=1))
    # the metrics use the posterior's default noise seed, not the training seed: they are what evaluate reports
    valid = PreparedLoops(data, split="valid")
    again = evaluate_ef_regression(
        est, [valid[i] for i in range(len(valid)) if abs(float(valid.manifest[i]["alpha"]) - 1) < 1e-6])
    # to float32 precision: with two loops R^2 divides by a tiny spread and amplifies rounding (seen at 2e-6 relative)
    assert again == pytest.approx(metrics["valid_alpha1"], rel=1e-4, abs=1e-4)


def test_estimate_ef_command_on_the_dicom_sample(sample_path, tmp_path, capsys):
    from echolvfm_core.cli import main

    folder = tmp_path / "ef_regressor"
    tiny_model().save_pretrained(folder)
    make_train_scheduler().save_pretrained(folder)
    args = ["estimate-ef", str(sample_path), "--models", str(tmp_path), "--json", "--seed", "2"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert {"mean", "sd", "p05", "p95", "samples"} <= set(first) and len(first["samples"]) == 40
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == first["samples"]  # deterministic for a seed
    assert main(["estimate-ef", str(sample_path), "--models", str(tmp_path / "none")]) == 2
    assert "No EF posterior model" in capsys.readouterr().err


def _small_jepa():
    from echolvfm_core.models.jepa import EchoJEPA

    torch.manual_seed(3)
    return EchoJEPA(num_frames=8, frame_size=32, tubelet=2, patch=8, dim=32, depth=1, heads=2, mlp_ratio=2.0,
                    pred_dim=16, pred_depth=1, pred_heads=2)


def test_jepa_backbone_is_frozen_and_its_pooling_trains(loops):
    jepa = _small_jepa()
    vit = {k: jepa.config[k] for k in ("num_frames", "frame_size", "tubelet", "patch", "dim", "depth", "heads",
                                       "mlp_ratio")}
    model = tiny_model(backbone="jepa", jepa=vit, num_frames=8, frame_size=32)
    model.encoder.vit.load_state_dict(jepa.encoder.state_dict())
    assert not model.encoder.motion  # a configuration without "motion" (as saved before it existed) pools raw tokens
    model.train()
    assert not model.encoder.vit.training  # frozen: inference mode even while the rest trains
    clips = torch.rand(3, 1, 8, 32, 32)
    loss = diffusion_loss(model, make_train_scheduler(), clips, torch.tensor([30.0, 50.0, 70.0]),
                          torch.full((3,), float("nan")), torch.full((3,), -1), 4, 0.5,
                          torch.Generator().manual_seed(0))[0]
    loss.backward()
    assert all(p.grad is None for p in model.encoder.vit.parameters())
    assert model.encoder.query.grad is not None and float(model.encoder.query.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="JEPA encoder takes"):
        tiny_model(backbone="jepa", jepa=vit, num_frames=16, frame_size=32)
    with pytest.raises(ValueError, match="backbone"):
        tiny_model(backbone="resnet")


def test_train_command_with_the_jepa_backbone(tmp_path):
    from echolvfm_core.cli import main
    from echolvfm_core.data.prepare import PrepareConfig, prepare

    jepa = _small_jepa()
    jepa.save_pretrained(tmp_path / "jepa")
    data = tmp_path / "prepared"
    prepare(None, data, PrepareConfig(phantom=6, loops_per_patient=2), progress=False)
    out = tmp_path / "ef"
    args = ["train", "ef-regressor", "--data", str(data), "--preset", "tiny", "--steps", "3", "--out", str(out),
            "--backbone", "jepa", "--jepa", str(tmp_path / "jepa")]
    assert main(args) == 0
    est = EFPosteriorEstimator.from_pretrained(out / "final")
    assert est.model.config.backbone == "jepa" and est.model.config.frame_size == 32
    assert est.model.encoder.motion  # its pooling reads the tokens' change over the clip, as the EchoJEPA probe
    trained = est.model.encoder.vit.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in jepa.encoder.state_dict().items())  # the encoder stayed frozen
    card = (out / "final" / "MODEL_CARD.md").read_text()
    assert "EchoJEPA" in card and "--backbone jepa" in card and "Not used by the Studio" in card
    post = est.posterior(np.random.default_rng(0).random((12, 64, 64), dtype=np.float32))
    assert post.samples.shape == (40,)
