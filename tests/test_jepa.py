"""EchoJEPA: mask collator, EMA update, a tiny training step, probes, Fréchet distances (fast, tiny CPU models)."""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from echolvfm_core.data.jepa_masks import (
    DEFAULT_MASKS,
    BlockMaskConfig,
    MultiBlockMaskCollator,
    TimeStepMaskConfig,
)
from echolvfm_core.estimators.jepa import (
    FeatureStats,
    effective_rank,
    encode_clips,
    fid_jepa,
    fvd_jepa,
    loop_clips,
    predict,
    temporal_share,
)
from echolvfm_core.metrics import feature_stats, frechet_distance
from echolvfm_core.models.jepa import (
    AttentiveProbe,
    EchoJEPA,
    JEPAClipEncoder,
    LinearProbe,
    attentive_pool,
    jepa_preset,
    sincos_positions_3d,
    temporal_deviation,
)
from echolvfm_core.training.common import ema_update
from echolvfm_core.training.jepa import (
    LoopClipSampler,
    context_predictions,
    fit,
    jepa_loss,
    momentum,
    target_features,
    train_preset,
)
from echolvfm_core.training.probes import PERTURBATIONS, fit_probe, perturbation

GRID = (8, 7, 7)


def _tiny() -> EchoJEPA:
    torch.manual_seed(0)
    return EchoJEPA(**asdict(jepa_preset("tiny")))


def _clips(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand((1, 16, 112, 112), generator=g) for _ in range(n)]


@pytest.mark.parametrize("masks", [DEFAULT_MASKS, (BlockMaskConfig(1, (0.3, 0.5)),)])
def test_mask_collator_shapes_disjoint_and_tubes(masks):
    batch = MultiBlockMaskCollator(GRID, masks, seed=0)(_clips(3))
    assert batch.clips.shape == (3, 1, 16, 112, 112)
    assert len(batch.context) == len(batch.targets) == len(masks)
    for ctx, tgt in zip(batch.context, batch.targets):
        assert ctx.dtype == tgt.dtype == torch.int64 and ctx.shape[0] == tgt.shape[0] == 3
        assert ctx.shape[1] >= 1 and tgt.shape[1] >= 1 and ctx.shape[1] + tgt.shape[1] <= 392
        for c, t in zip(ctx, tgt):
            assert not set(c.tolist()) & set(t.tolist())
            assert 0 <= int(c.min()) and int(t.max()) < 392
    # before the batch-minimum truncation, a target mask is a tube: the same positions at every time step
    (_,), (tgt,) = MultiBlockMaskCollator(GRID, masks[:1], seed=1).sample(1, torch.Generator().manual_seed(3))
    pos = tgt[0] % 49
    assert all(set(pos[tgt[0] // 49 == t].tolist()) == set(pos[tgt[0] // 49 == 0].tolist()) for t in range(8))


def test_time_step_mask_family():
    """The context is every place at 2-4 whole time steps, the targets every place at the others."""
    coll = MultiBlockMaskCollator(GRID, (TimeStepMaskConfig((2, 4)),), seed=0)
    (ctx,), (tgt,) = coll.sample(6, torch.Generator().manual_seed(1))
    steps = set()
    for c, t in zip(ctx, tgt):
        seen, hidden = set((c // 49).tolist()), set((t // 49).tolist())
        assert not seen & hidden and len(seen | hidden) == 8
        steps.add(len(seen))
    assert steps <= {2, 3, 4} and len(steps) > 1  # the number of visible steps varies
    (ctx,), (tgt,) = coll.sample(1, torch.Generator().manual_seed(2))
    assert len(ctx[0]) % 49 == 0 and len(ctx[0]) + len(tgt[0]) == 392  # one clip: whole time steps, nothing dropped
    batch = MultiBlockMaskCollator(GRID, DEFAULT_MASKS + (TimeStepMaskConfig((2, 4)),), seed=0)(_clips(2))
    assert len(batch.context) == len(batch.targets) == 3
    for bad in ((0, 3), (3, 2), (2, 8)):
        with pytest.raises(ValueError, match="visible steps"):
            MultiBlockMaskCollator(GRID, (TimeStepMaskConfig(bad),))


def test_mask_collator_is_deterministic():
    a = MultiBlockMaskCollator(GRID, seed=5)(_clips(2))
    b = MultiBlockMaskCollator(GRID, seed=5)(_clips(2))
    c = MultiBlockMaskCollator(GRID, seed=6)(_clips(2))
    assert all(torch.equal(x, y) for x, y in zip(a.context + a.targets, b.context + b.targets))
    assert not all(torch.equal(x, y) for x, y in zip(a.context + a.targets, c.context + c.targets))
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    coll = MultiBlockMaskCollator(GRID, seed=0)
    assert torch.equal(coll.sample(2, g1)[1][0], coll.sample(2, g2)[1][0])


def test_mask_collator_rejects_bad_input():
    with pytest.raises(ValueError, match="grid"):
        MultiBlockMaskCollator((8, 7))
    with pytest.raises(ValueError, match="whole"):
        MultiBlockMaskCollator(GRID, (BlockMaskConfig(1, (1.0, 1.0), (1.0, 1.0)),)).sample(1, torch.Generator())


def test_positions_and_encoder_shapes():
    assert sincos_positions_3d(32, GRID).shape == (392, 32)
    model = _tiny()
    x = torch.rand(2, 1, 16, 112, 112)
    assert model.encode(x).shape == (2, 392, 32)
    keep = torch.tensor([[0, 5, 9], [1, 2, 3]])
    z = model.encoder(x, keep=keep)
    assert z.shape == (2, 3, 32)
    assert model.predictor(z, keep, torch.tensor([[7, 8], [9, 10]])).shape == (2, 2, 32)
    with pytest.raises(ValueError, match="expects video"):
        model.encode(torch.rand(2, 16, 112, 112))


def test_ema_update_and_momentum_schedule():
    online = _tiny().encoder
    target = copy.deepcopy(online).requires_grad_(False)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
        assert not t.requires_grad
    cfg = train_preset("tiny")
    assert momentum(0, cfg) == pytest.approx(cfg.ema[0])
    assert momentum(cfg.steps, cfg) == pytest.approx(cfg.ema[1])
    assert cfg.ema[0] < momentum(cfg.steps // 2, cfg) < cfg.ema[1]


def test_tiny_training_steps_lower_the_loss():
    model = _tiny()
    target = copy.deepcopy(model.encoder).requires_grad_(False)
    batch = MultiBlockMaskCollator(model.encoder.grid, seed=0)(_clips(2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = jepa_loss(context_predictions(model, batch), target_features(target, batch.clips), batch.targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(target, model.encoder, 0.99)
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and losses[-1] < 0.9 * losses[0]


def test_fit_saves_model_and_resumes(tmp_path):
    g = np.random.default_rng(0)
    loops = [SimpleNamespace(frames=g.integers(0, 255, (int(n), 112, 112), dtype=np.uint8)) for n in (12, 20, 31)]
    cfg = train_preset("tiny")
    model, metrics = fit(LoopClipSampler(loops, cfg), cfg, tmp_path, seed=0, device="cpu")
    assert metrics["steps"] == cfg.steps and np.isfinite(metrics["final_loss"])
    again = EchoJEPA.from_pretrained(tmp_path / "final")
    x = torch.rand(1, 1, 16, 112, 112)
    torch.testing.assert_close(again.eval().encode(x), model.encode(x))
    _, resumed = fit(LoopClipSampler(loops, cfg), cfg, tmp_path, seed=0, device="cpu", resume=True)
    assert resumed["steps_per_second"] is None  # nothing left to train


def test_train_command_needs_camus_loops_for_its_probes(tmp_path, capsys):
    """A phantom-only prepared folder has no EF labels for the probes: one-line error, exit 2, before any training."""
    from echolvfm_core.cli import main
    from echolvfm_core.data.prepare import PrepareConfig, prepare

    prepare(None, tmp_path / "prepared", PrepareConfig(phantom=6, loops_per_patient=2), progress=False)
    args = ["train", "jepa", "--data", str(tmp_path / "prepared"), "--preset", "tiny", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "no CAMUS loops" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_command_end_to_end_on_camus_patients(camus_root, tmp_path, capsys):
    """Two training and two valid CAMUS patients plus phantoms, tiny preset: the model, its probe and reference
    statistics load again, and the card and metrics.json carry every read-out, diagnostics included."""
    from echolvfm_core.cli import main

    data, out = tmp_path / "prepared", tmp_path / "out"
    assert main(["prepare", "--camus", str(camus_root), "--out", str(data), "--patients", "1", "2", "200", "206",
                 "--loops-per-patient", "2", "--phantom", "12", "--workers", "1", "--quiet"]) == 0
    assert main(["train", "jepa", "--data", str(data), "--preset", "tiny", "--out", str(out), "--device", "cpu"]) == 0
    assert "valid attentive-probe EF MAE" in capsys.readouterr().out
    model = EchoJEPA.from_pretrained(out / "final")
    probe = AttentiveProbe.from_pretrained(out / "final" / "probe")
    stats = FeatureStats.load(out / "final" / "real_stats.npz")
    assert probe.config.time_steps == model.encoder.grid[0] and stats.n == 4  # two loops of two training patients
    rep = json.loads((out / "metrics.json").read_text())["representation"]
    assert (rep["n_train"], rep["n_valid"], rep["n_valid_patients"]) == (4, 4, 2)
    for name in ("jepa", "random"):
        assert 1.0 <= rep[name]["rankme"] <= model.config.dim and 0.0 < rep[name]["temporal_share"] < 1.0
        assert 0.0 < rep[name]["attentive_both_mae"] < 100.0
    assert set(rep["robustness"]) == {"clean", "gain", "depth_attenuation", "speckle", "sector_dropout"}
    card = (out / "final" / "MODEL_CARD.md").read_text()
    assert "feature effective rank" in card and "--preset tiny" in card and "not comparable" in card

    # no valid-split phantoms: stops before training with a one-line error
    assert main(["prepare", "--camus", str(camus_root), "--out", str(tmp_path / "nophantom"), "--patients", "1", "200",
                 "--loops-per-patient", "1", "--workers", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["train", "jepa", "--data", str(tmp_path / "nophantom"), "--preset", "tiny", "--out",
                 str(tmp_path / "out2")]) == 2
    assert "no phantom loops" in capsys.readouterr().err and not (tmp_path / "out2").exists()


def test_probes_fit_and_predict_in_percent():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(40, 10, 8, generator=g)
    ef = 50 + 10 * tokens[:, :, 0].mean(dim=1) * 3
    for probe in (AttentiveProbe(dim=8, attn_dim=8, heads=2, ef_mean=50, ef_std=10), LinearProbe(8, 50.0, 10.0)):
        start = np.abs(predict(probe, tokens) - ef.numpy()).mean()
        fit_probe(probe, tokens, ef, steps=150, batch_size=16, lr=1e-2, seed=0)
        assert np.abs(predict(probe, tokens) - ef.numpy()).mean() < 0.7 * start


def test_temporal_deviation_removes_the_still_part():
    g = torch.Generator().manual_seed(0)
    still = torch.randn(2, 1, 5, 4, generator=g).expand(-1, 3, -1, -1)  # (B, T, positions, D), same at every t
    moving = torch.randn(2, 3, 5, 4, generator=g)
    moving = moving - moving.mean(dim=1, keepdim=True)
    out = temporal_deviation((still + moving).reshape(2, 15, 4), time_steps=3)
    torch.testing.assert_close(out, moving.reshape(2, 15, 4))
    with pytest.raises(ValueError, match="time steps"):
        temporal_deviation(torch.zeros(1, 10, 4), time_steps=3)


def test_motion_probe_reads_what_the_mean_token_cannot():
    """EF set by how far tokens swing over time around a still anatomy that differs from clip to clip (and is much
    larger): attention can only average tokens, so the plain probe misses it and the one reading the change finds it."""
    g = torch.Generator().manual_seed(0)
    n, t, positions, d = 128, 4, 6, 8
    amplitude = torch.rand(n, generator=g)
    direction = torch.randn(1, 1, positions, d, generator=g)
    phase = torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, t, 1, 1)
    still = 2 * torch.randn(n, 1, positions, d, generator=g)
    tokens = (still + amplitude.view(n, 1, 1, 1) * phase * direction).reshape(n, t * positions, d)
    tokens = tokens + 0.1 * torch.randn(tokens.shape, generator=g)
    ef = 30 + 40 * amplitude
    train, test = slice(0, 96), slice(96, n)
    maes = {}
    for time_steps in (0, t):
        probe = AttentiveProbe(dim=d, attn_dim=8, heads=2, queries=4, time_steps=time_steps, ef_mean=50, ef_std=12)
        fit_probe(probe, tokens[train], ef[train], steps=300, batch_size=32, lr=1e-2, seed=0)
        maes[time_steps] = np.abs(predict(probe, tokens[test]) - ef[test].numpy()).mean()
    spread = np.abs(ef[test].numpy() - ef[train].median().item()).mean()  # the median predictor's error
    assert maes[t] < 0.5 * spread and maes[0] > 0.8 * spread


def test_probe_keeping_the_tokens_sees_the_still_anatomy():
    """The change-only probe ignores what stays still at a place over the clip; with keep_tokens it does not."""
    g = torch.Generator().manual_seed(0)
    t, positions, d = 4, 6, 8
    tokens = torch.randn(3, t * positions, d, generator=g)
    still = torch.randn(3, 1, positions, d, generator=g).expand(-1, t, -1, -1).reshape(3, t * positions, d)
    change_only = AttentiveProbe(dim=d, attn_dim=8, heads=2, queries=2, time_steps=t).eval()
    both = AttentiveProbe(dim=d, attn_dim=8, heads=2, queries=2, time_steps=t, keep_tokens=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(change_only(tokens + still), change_only(tokens))
        assert (both(tokens + still) - both(tokens)).abs().min() > 1e-4
    assert both.kv.in_features == 2 * d
    with pytest.raises(ValueError, match="time_steps"):
        AttentiveProbe(dim=d, attn_dim=8, heads=2, keep_tokens=True)


def test_effective_rank_known_answers():
    g = torch.Generator().manual_seed(0)
    line = torch.randn(50, 20, 1, generator=g) * torch.randn(1, 1, 16, generator=g)  # every token on one direction
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    # k orthogonal directions of equal spread: singular values equal, RankMe = k
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:4]
    coeff = torch.linalg.qr(torch.randn(1000, 4, generator=g))[0] * 10  # orthonormal columns -> equal energy
    coeff = coeff - coeff.mean(dim=0)
    assert effective_rank((coeff @ basis).reshape(50, 20, 16)) == pytest.approx(4.0, rel=0.02)
    assert 14 < effective_rank(torch.randn(200, 20, 16, generator=g)) <= 16
    assert effective_rank(torch.ones(3, 4, 5)) == 0.0


def test_temporal_share_known_answers():
    g = torch.Generator().manual_seed(0)
    still = torch.randn(6, 1, 5, 4, generator=g).expand(-1, 3, -1, -1).reshape(6, 15, 4)
    assert temporal_share(still, 3) == pytest.approx(0.0, abs=1e-12)
    moving = torch.randn(6, 3, 5, 4, generator=g)
    moving = (moving - moving.mean(dim=1, keepdim=True)).reshape(6, 15, 4)
    assert temporal_share(moving, 3) == pytest.approx(1.0, abs=1e-9)
    # a still part and a swing (+a, -a over two time steps) of equal variance: about half of it changes
    still = torch.randn(400, 1, 5, 4, generator=g).expand(-1, 2, -1, -1)
    swing = torch.randn(400, 1, 5, 4, generator=g) * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    assert temporal_share((still + swing).reshape(400, 10, 4), 2) == pytest.approx(0.5, abs=0.03)


def test_clip_encoder_with_motion_pools_the_tokens_change():
    cfg = jepa_preset("tiny")
    video = torch.rand(2, 1, 16, 112, 112)
    torch.manual_seed(0)
    enc = JEPAClipEncoder(cfg, feature_dim=8, motion=True).eval()
    with torch.no_grad():
        tokens = enc.vit(video)
        expected = enc.proj(attentive_pool(enc.query, enc.kv, temporal_deviation(tokens, enc.vit.grid[0])))
        raw = enc.proj(attentive_pool(enc.query, enc.kv, tokens))
        torch.testing.assert_close(enc(video), expected)
    assert not torch.allclose(expected, raw, atol=1e-4)


def test_frechet_distance_known_answers():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6))
    mu, sigma = feature_stats(x)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    # two Gaussians with identity covariances: the squared distance of the means
    assert frechet_distance(np.zeros(3), np.eye(3), np.ones(3), np.eye(3)) == pytest.approx(3.0)
    # N(0, I) vs N(0, 4 I): tr(I) + tr(4 I) - 2 tr(2 I) = d
    assert frechet_distance(np.zeros(4), np.eye(4), np.zeros(4), 4 * np.eye(4)) == pytest.approx(4.0)
    grow = [frechet_distance(mu, sigma, *feature_stats(x + s * rng.normal(size=x.shape))) for s in (0.1, 0.5, 1.0)]
    assert grow[0] < grow[1] < grow[2]
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))


def test_fvd_and_fid_jepa_with_cached_stats(tmp_path):
    model = _tiny()
    g = np.random.default_rng(1)
    loops = [g.integers(0, 255, (20, 112, 112), dtype=np.uint8) for _ in range(6)]
    clips = loop_clips(loops, 16, 112)
    assert clips.shape == (6, 16, 112, 112) and clips.dtype == torch.uint8
    tokens = encode_clips(model.encoder, clips)
    stats = FeatureStats.from_tokens(tokens, GRID)
    stats.save(tmp_path / "s.npz")
    cached = FeatureStats.load(tmp_path / "s.npz")
    assert fvd_jepa(tokens, GRID, cached) == pytest.approx(0.0, abs=1e-6)
    assert fid_jepa(tokens, GRID, cached) == pytest.approx(0.0, abs=1e-6)
    noisy = encode_clips(model.encoder, (clips.float() * 0.5).to(torch.uint8))
    assert fvd_jepa(noisy, GRID, cached) > 1e-3


def test_encode_clips_applies_a_transform_to_each_batch_and_a_perturbation_is_seeded():
    model = _tiny()
    g = np.random.default_rng(2)
    clips = loop_clips([g.integers(0, 255, (20, 112, 112), dtype=np.uint8) for _ in range(3)], 16, 112)
    dark = encode_clips(model.encoder, clips, transform=torch.zeros_like, batch_size=2)
    assert torch.equal(dark, encode_clips(model.encoder, torch.zeros_like(clips)))
    speckled = [encode_clips(model.encoder, clips, transform=perturbation(PERTURBATIONS["speckle"], seed), batch_size=2)
                for seed in (0, 0, 1)]
    assert torch.equal(speckled[0], speckled[1]) and not torch.equal(speckled[0], speckled[2])
    assert not torch.equal(speckled[0], encode_clips(model.encoder, clips))


class _Loops:
    """A stand-in for PreparedLoops: ``manifest`` rows and items with ``frames``."""

    def __init__(self, n: int, seed: int = 0):
        g = np.random.default_rng(seed)
        self.frames = [g.integers(0, 255, (int(g.integers(10, 40)), 112, 112), dtype=np.uint8) for _ in range(n)]
        self.manifest = [{"ef": float(40 + i), "alpha": 1.0} for i in range(n)]

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int):
        return SimpleNamespace(frames=self.frames[i])


def test_evaluate_section_without_generator_uses_cached_real_stats(tmp_path):
    from echolvfm_core.estimators.jepa import PROBE_DIR, STATS_FILE
    from echolvfm_core.pipelines.jepa_eval import evaluate_jepa

    folder = tmp_path / "jepa"
    model = _tiny()
    model.save_pretrained(str(folder))
    AttentiveProbe(dim=32, attn_dim=16, heads=2, ef_mean=45.0, ef_std=10.0).save_pretrained(str(folder / PROBE_DIR))
    loops = _Loops(5)
    tokens = encode_clips(model.encoder, loop_clips(loops.frames, 16, 112))
    FeatureStats.from_tokens(tokens, GRID).save(folder / STATS_FILE)
    out = evaluate_jepa(folder, loops, device="cpu", seed=0)
    assert out["n"] == 5 and np.isfinite(out["probe_mae"])
    assert out["fvd_jepa"] == pytest.approx(0.0, abs=1e-6) and out["fid_jepa"] == pytest.approx(0.0, abs=1e-6)
    assert "no generator" in out["compared"]
