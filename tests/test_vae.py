"""Latent codec: tiny VAE round trips, latent statistics, external (RGB, 8x) folders, training, vae-stats."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from echolvfm_core.cli import main
from echolvfm_core.metrics import psnr, ssim
from echolvfm_core.models.vae import (
    LUMA,
    EchoCodec,
    LatentStats,
    VAEConfig,
    bench_codec,
    build_vae,
    compute_latent_stats,
    evaluate_vae,
    vae_preset,
)
from echolvfm_core.training.vae import (
    FramePool,
    VAETrainConfig,
    fit,
    loop_frames,
    ssim_map,
    train_preset,
    vae_loss,
)


def speckle(n: int, size: int = 112, seed: int = 0) -> torch.Tensor:
    """Synthetic speckle-like frames (n, size, size) in [0, 1]: smoothed noise under a bright blob."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.nn.functional.avg_pool2d(torch.rand((n, 1, size, size), generator=g), 3, 1, 1)[:, 0]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    blob = torch.exp(-((yy - 0.2) ** 2 + xx**2) * 3)
    return (noise * blob).clamp(0, 1)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain nothing from two, and on a busy machine two threads wait on each
    other at every operator (tens of times slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def codec() -> EchoCodec:
    torch.manual_seed(0)
    return EchoCodec(build_vae("tiny"), chunk_size=5)


def test_presets_and_shapes():
    demo = vae_preset("demo")
    assert demo.downsample == 4 and demo.latent_channels == 4
    vae = build_vae("demo")
    size_mib = sum(p.numel() * 4 for p in vae.parameters()) / 2**20
    assert size_mib < 16  # one safetensors file per bundled model, <= 16 MiB
    assert vae.config.in_channels == vae.config.out_channels == 1
    with pytest.raises(ValueError, match="Unknown VAE preset"):
        vae_preset("huge")
    with pytest.raises(ValueError, match="must divide"):
        VAEConfig(block_out_channels=(6, 8), norm_num_groups=4)


def test_round_trip_shapes_and_range(codec):
    x = speckle(2 * 7).view(2, 7, 112, 112)
    z = codec.encode(x)
    assert z.shape == (2, 4, 7, 28, 28) and z.dtype == torch.float32
    assert codec.latent_shape(7) == (4, 7, 28, 28) and codec.downsample == 4 and codec.latent_channels == 4
    y = codec.decode(z)
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # frame-wise and deterministic: chunking and batching do not change the result
    z1 = codec.encode(x[1:, 3:5])
    torch.testing.assert_close(z1, z[1:, :, 3:5], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(codec.encode(x), z)


def test_bad_inputs_raise_clear_errors(codec):
    with pytest.raises(ValueError, match=r"\(B, T, H, W\)"):
        codec.encode(torch.rand(3, 112, 112))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        codec.encode(torch.rand(1, 2, 112, 112) * 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        codec.encode(torch.rand(1, 2, 110, 110))
    with pytest.raises(ValueError, match="float"):
        codec.encode(torch.zeros(1, 2, 112, 112, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 4, T, h, w\)"):
        codec.decode(torch.zeros(1, 3, 2, 28, 28))
    with pytest.raises(ValueError, match="chunk_size"):
        EchoCodec(build_vae("tiny"), chunk_size=0)


def test_stats_normalise_and_reload_identically(codec, tmp_path):
    x = speckle(12)
    stats = compute_latent_stats(codec, [x[:5], (x[5:] * 255).round().to(torch.uint8).numpy()])
    assert stats.source == "measured" and len(stats.mean) == 4
    # known answer: the stats are the per-channel moments of the posterior means
    raw = codec.encode_frames(torch.cat([x[:5], (x[5:] * 255).round() / 255])[:, None])
    torch.testing.assert_close(torch.tensor(stats.mean, dtype=torch.float32), raw.mean(dim=(0, 2, 3)), atol=1e-5,
                               rtol=1e-4)
    codec.set_stats(stats)
    z = codec.encode(x[None])
    torch.testing.assert_close(z.mean(dim=(0, 2, 3, 4)), torch.zeros(4), atol=0.05, rtol=0)
    torch.testing.assert_close(z.std(dim=(0, 2, 3, 4)), torch.ones(4), atol=0.05, rtol=0)
    codec.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["latents_mean"] == list(stats.mean) and config["latents_std"] == list(stats.std)
    again = EchoCodec.from_pretrained(tmp_path / "vae", chunk_size=codec.chunk_size)
    assert again.stats == stats and again.stats_source == "measured"
    torch.testing.assert_close(again.encode(x[None]), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again.decode(z), codec.decode(z), atol=1e-4, rtol=1e-4)


def test_unmeasured_stats_fall_back_to_scaling_factor(tmp_path):
    vae = build_vae("tiny")
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.1)
    codec = EchoCodec(vae)
    assert codec.stats == LatentStats((0.1,) * 4, (2.0,) * 4, "scaling_factor")
    with pytest.raises(ValueError, match="std > 0"):
        LatentStats((0.0,), (0.0,))


def _rgb_8x_vae() -> AutoencoderKL:
    """A tiny SD-style VAE: RGB, four levels (8x downsampling), attention in the mid block."""
    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1,
        scaling_factor=0.3,
    )


def test_external_rgb_folder_loads_through_echocodec(tmp_path):
    vae = _rgb_8x_vae()
    vae.save_pretrained(tmp_path / "pipeline" / "vae")  # a pipeline folder: the VAE sits in vae/
    codec = EchoCodec.from_pretrained(tmp_path / "pipeline")
    assert codec.image_channels == 3 and codec.downsample == 8 and codec.stats_source == "scaling_factor"
    x = speckle(3)
    z = codec.encode(x[None])
    assert z.shape == (1, 4, 3, 14, 14)
    # grey is replicated to RGB on encode; the latent is scaled by the config's scaling_factor
    with torch.no_grad():
        ref = vae.encode(x[:, None].expand(-1, 3, -1, -1) * 2 - 1).latent_dist.mean * 0.3
    torch.testing.assert_close(z[0].permute(1, 0, 2, 3), ref, atol=1e-4, rtol=1e-4)
    # the decoder's RGB becomes luma in [0, 1]
    y = codec.decode(z)
    with torch.no_grad():
        rgb = (vae.decode(ref / 0.3).sample + 1) / 2
    luma = sum(w * rgb[:, i] for i, w in enumerate(LUMA)).clamp(0, 1)
    assert y.shape == (1, 3, 112, 112)
    torch.testing.assert_close(y[0], luma, atol=1e-4, rtol=1e-4)


def test_not_a_vae_folder(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers AutoencoderKL folder"):
        EchoCodec.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        EchoCodec.from_pretrained(tmp_path / "missing")


def test_evaluate_and_bench(codec):
    frames = (speckle(4) * 255).round().to(torch.uint8).numpy()
    m = evaluate_vae(codec, frames)
    assert m["n"] == 4 and -1 <= m["ssim"] <= 1 and m["psnr"] > 0
    recon = codec.decode_frames(codec.encode_frames(torch.from_numpy(frames).float()[:, None] / 255))[:, 0].numpy()
    assert m["ssim"] == pytest.approx(ssim(frames / 255.0, recon))
    assert m["psnr"] == pytest.approx(psnr(frames / 255.0, recon))
    b = bench_codec(codec, frames=4, repeats=2)
    assert b["encode_ms"] > 0 and b["decode_ms"] > 0 and b["latent_shape"] == [4, 4, 28, 28]
    assert b["device"] == "cpu" and b["torch_threads"] == 1


def test_metrics_known_answers():
    a = np.full((2, 16, 16), 0.5)
    b = a + 0.1  # MSE 0.01 -> 20 dB
    assert psnr(a, b) == pytest.approx(20.0)
    assert ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        psnr(a, a + 0.6)


def test_ssim_loss_matches_skimage():
    x = speckle(2, 32)
    y = (x + 0.05 * torch.rand(x.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    ours = ssim_map(x[:, None].double(), y[:, None].double()).mean(dim=(1, 2, 3)).numpy()
    assert ours == pytest.approx(ssim(x.numpy(), y.numpy(), per_image=True), abs=1e-6)


def test_vae_loss_kl_is_the_per_element_kl_to_a_standard_normal():
    """Known answer: KL(N(mu, s^2) || N(0, 1)) = (mu^2 + s^2 - 1 - log s^2) / 2, averaged over latent elements."""
    torch.manual_seed(0)
    model = build_vae("tiny")
    x = speckle(2, 32)[:, None]
    with torch.no_grad():
        posterior = model.encode(x * 2.0 - 1.0).latent_dist
        mu, logvar = posterior.mean.double(), posterior.logvar.double()
        expected = float((0.5 * (mu**2 + logvar.exp() - 1.0 - logvar)).mean())
        got = vae_loss(model, x, train_preset("tiny"), torch.Generator().manual_seed(0)).kl
    assert got == pytest.approx(expected, rel=1e-5) and got > 0


def test_frame_pool_mixes_and_crops():
    real = np.zeros((5, 16, 16), np.uint8)
    loops = np.full((7, 16, 16), 255, np.uint8)
    pool = FramePool(real, loops, loop_fraction=0.25)
    g = torch.Generator().manual_seed(0)
    x = pool.sample(8, g)
    assert x.shape == (8, 1, 16, 16) and int((x.amax(dim=(1, 2, 3)) == 1).sum()) == 2
    assert pool.sample(3, g, crop=8).shape == (3, 1, 8, 8)
    assert torch.equal(pool.sample(4, torch.Generator().manual_seed(5)),
                       pool.sample(4, torch.Generator().manual_seed(5)))
    assert FramePool(real).loop_fraction == 0.0 and FramePool(real[:0], loops).loop_fraction == 1.0
    with pytest.raises(ValueError, match="no real frames and no loops"):
        FramePool(real[:0])


def test_training_lowers_the_loss_and_resumes(tmp_path, monkeypatch):
    frames = (speckle(24, 32) * 255).round().to(torch.uint8).numpy()
    pool = FramePool(frames[:16], frames[16:20], loop_fraction=0.25)
    cfg = replace_cfg(train_preset("tiny"), steps=24, crop=16, crop_fraction=0.5, checkpoint_every=8, lr=1e-2)
    x = torch.from_numpy(frames[20:]).float()[:, None] / 255

    def loss_of(model) -> float:
        with torch.no_grad():
            return vae_loss(model, x, cfg, torch.Generator().manual_seed(0)).total.item()

    torch.manual_seed(0)
    before = loss_of(build_vae(cfg.model))
    m = fit(pool, cfg, tmp_path / "straight", seed=0, valid_images=frames[20:])
    straight = EchoCodec.from_pretrained(tmp_path / "straight" / "final")
    assert loss_of(straight.vae) < before
    assert straight.stats_source == "measured"
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["valid"]["n"] == 4 and metrics["valid"] == pytest.approx(m["valid"])

    # interrupted after the checkpoint at step 8, then resumed: the same model as the straight run
    calls = {"n": 0}
    sample = FramePool.sample

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 11:
            raise KeyboardInterrupt
        return sample(self, *a, **k)

    monkeypatch.setattr(FramePool, "sample", failing)
    with pytest.raises(KeyboardInterrupt):
        fit(pool, cfg, tmp_path / "resumed", seed=0)
    assert json.loads((tmp_path / "resumed" / "checkpoint" / "progress.json").read_text())["step"] == 8
    monkeypatch.setattr(FramePool, "sample", sample)
    fit(pool, cfg, tmp_path / "resumed", seed=0, resume=True)
    resumed = EchoCodec.from_pretrained(tmp_path / "resumed" / "final")
    for (k, a), b in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=k)


def replace_cfg(cfg: VAETrainConfig, **kw) -> VAETrainConfig:
    from dataclasses import replace

    return replace(cfg, **kw)


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "prepared"
    assert main(["prepare", "--out", str(out), "--phantom", "4", "--loops-per-patient", "2", "--workers", "1",
                 "--quiet"]) == 0
    return out


def test_loop_frames_spread_over_each_loop(phantom_data):
    from echolvfm_core.data.prepared import PreparedLoops

    ds = PreparedLoops(phantom_data)
    f = loop_frames(ds, 2, 3, seed=0)
    assert f.shape == (6, 112, 112) and f.dtype == np.uint8
    assert np.array_equal(f, loop_frames(ds, 2, 3, seed=0))
    assert loop_frames([], 2, 3).shape[0] == 0


def test_cli_train_tiny_and_vae_stats(phantom_data, tmp_path, capsys):
    out = tmp_path / "vae"
    args = ["train", "vae", "--data", str(phantom_data), "--preset", "tiny", "--out", str(out), "--steps", "4"]
    assert main(args) == 0
    codec = EchoCodec.from_pretrained(out / "final")
    assert codec.stats_source == "measured"
    card = (out / "final" / "MODEL_CARD.md").read_text()
    assert "0 real ED / ES frames" in card and "not measured" in card  # phantom-only data: no real frames
    assert json.loads((out / "metrics.json").read_text())["bench"]["frames"] == 32
    # an external RGB 8x VAE gets its stats measured and written into its config
    ext = tmp_path / "ext"
    _rgb_8x_vae().save_pretrained(ext)
    assert main(["vae-stats", "--vae", str(ext), "--data", str(phantom_data), "--loops", "2"]) == 0
    assert "8x downsampling" in capsys.readouterr().out
    loaded = EchoCodec.from_pretrained(ext)
    assert loaded.stats_source == "measured"
    z = loaded.encode(speckle(4)[None])
    assert z.shape == (1, 4, 4, 14, 14)
    assert main(["vae-stats", "--vae", str(tmp_path / "nothing"), "--data", str(phantom_data)]) == 2
