"""Velocity U-Net: presets, shapes, padding invariance, conditioning, attention masking, save/load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from echolvfm_core.models.unet import UNET_PRESETS, EchoAttnProcessor, EchoVelocityUNet, unet_preset


def _inputs(b=2, t=5, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, 4, t, hw, hw, generator=g)
    cond = torch.randn(b, 4, t, hw, hw, generator=g)
    cond[:, :, 1:] = 0
    return dict(
        z=z,
        t=torch.rand(b, generator=g),
        h=torch.rand(b, generator=g) * 0.5,
        ef=torch.tensor([35.0, 65.0])[:b],
        cond=cond,
        frame_mask=torch.ones(b, t, dtype=torch.bool),
    )


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset without patchifying and with attention at both levels (the preset itself: patch 2)."""
    torch.manual_seed(0)
    return EchoVelocityUNet.from_preset("tiny", patch_size=1, transformer_layers_per_block=(1, 1)).eval()


def _count(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in EchoVelocityUNet.from_preset(name).parameters())


def test_preset_sizes():
    assert 70e6 <= _count("paper") <= 85e6  # the paper's ~77M
    assert _count("demo") <= 8e6  # 16 MiB in fp16
    assert _count("tiny") < 1e6
    with pytest.raises(ValueError, match="Unknown generator preset"):
        unet_preset("huge")


@pytest.mark.parametrize("frames,hw", [(1, 8), (5, 8), (3, 28)])
def test_output_shape(tiny, frames, hw):
    x = _inputs(t=frames, hw=hw)
    with torch.no_grad():
        out = tiny(**x)
    assert out.shape == x["z"].shape
    assert torch.isfinite(out).all()


def test_patch_size_two_and_odd_levels():
    net = EchoVelocityUNet.from_preset("tiny", patch_size=2, block_out_channels=(16, 16, 32),
                                       transformer_layers_per_block=(0, 1, 1)).eval()
    x = _inputs(t=3, hw=28)  # 28 -> 14 -> 7 -> 4 and back
    with torch.no_grad():
        assert net(**x).shape == x["z"].shape


def test_padded_frames_do_not_influence_real_frames(tiny):
    x = _inputs(t=6)
    x["frame_mask"][1, 4:] = False
    x["cond"][1, :, 4:] = 0
    with torch.no_grad():
        out = tiny(**x)
        x2 = {k: v.clone() for k, v in x.items()}
        x2["z"][1, :, 4:] = 50 * torch.randn_like(x2["z"][1, :, 4:])
        out2 = tiny(**x2)
        alone = tiny(**{k: v[1:, :, :4] if v.ndim == 5 else (v[1:, :4] if v.ndim == 2 else v[1:])
                        for k, v in x.items()})
    assert torch.equal(out[:, :, :4], out2[:, :, :4])
    assert torch.equal(out[0], out2[0])
    torch.testing.assert_close(out[1:, :, :4], alone, atol=1e-5, rtol=1e-4)


def test_ef_and_null_ef_condition_the_output(tiny):
    x = _inputs()
    with torch.no_grad():
        a = tiny(**x)
        b = tiny(**{**x, "ef": x["ef"] + 20})
        drop = torch.ones(2, dtype=torch.bool)
        c = tiny(**x, ef_drop=drop)
        d = tiny(**{**x, "ef": x["ef"] + 20}, ef_drop=drop)
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(c, d)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(z=torch.zeros(2, 3, 5, 8, 8)), "z must be"),
        (dict(frame_mask=torch.ones(2, 5)), "frame_mask must be bool"),
        (dict(ef=torch.ones(3)), "ef must have shape"),
        (dict(cond=torch.zeros(2, 4, 4, 8, 8)), "cond must have the shape"),
    ],
)
def test_bad_inputs_raise(tiny, change, match):
    with pytest.raises(ValueError, match=match):
        tiny(**{**_inputs(), **change})


def test_too_many_frames_raise(tiny):
    with pytest.raises(ValueError, match="at most 32 frames"):
        tiny(**_inputs(b=1, t=33, hw=4))


def test_attention_key_mask_equals_truncated_sequence():
    torch.manual_seed(0)
    attn = Attention(16, heads=2, dim_head=8, processor=EchoAttnProcessor())
    s = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[:, 5:] = False
    with torch.no_grad():
        full = attn(s, attention_mask=mask)
        short = attn(s[:, :5])
        ref = F.scaled_dot_product_attention(
            *(p(s[:, :5]).view(3, 5, 2, 8).transpose(1, 2) for p in (attn.to_q, attn.to_k, attn.to_v))
        )
    torch.testing.assert_close(full[:, :5], short, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(short, attn.to_out[0](ref.transpose(1, 2).reshape(3, 5, 16)), atol=1e-6, rtol=1e-5)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    net = EchoVelocityUNet.from_preset("tiny").eval()
    x = _inputs(t=4, hw=12)
    x["frame_mask"][1, 3:] = False
    with torch.no_grad():
        a = net(**x)
        b = net.to(memory_format=torch.channels_last)(**x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "gen")
    assert (tmp_path / "gen" / "diffusion_pytorch_model.safetensors").exists()
    loaded = EchoVelocityUNet.from_pretrained(tmp_path / "gen").eval()
    assert list(loaded.config.block_out_channels) == list(tiny.config.block_out_channels)
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x), tiny(**x))


def test_presets_are_valid_configs():
    for name, cfg in UNET_PRESETS.items():
        assert len(cfg.block_out_channels) == len(cfg.transformer_layers_per_block), name
        assert all(c % cfg.norm_num_groups == 0 for c in cfg.block_out_channels), name


def test_context_channels_take_the_anchor_and_keep_padding_invariance():
    from echolvfm_core.flows import Conditioning, MeanFlow
    from echolvfm_core.flows.base import anchor_latents, network_context

    torch.manual_seed(0)
    net = EchoVelocityUNet.from_preset("tiny", patch_size=1, context_channels=4).eval()
    x = _inputs(t=6)
    x["frame_mask"][1, 4:] = False
    x["cond"][1, :, 4:] = 0
    observed = torch.zeros(2, 6, dtype=torch.bool)
    observed[:, 0] = True
    cond = Conditioning(x["cond"], observed, x["frame_mask"], x["ef"])
    ctx = network_context(net, cond)["context"]
    assert torch.equal(ctx, anchor_latents(cond)) and (ctx[1, :, 4:] == 0).all()
    assert network_context(EchoVelocityUNet.from_preset("tiny"), cond) == {}
    with pytest.raises(ValueError, match="takes a context"):
        net(**x)
    with pytest.raises(ValueError, match="takes no context"):
        EchoVelocityUNet.from_preset("tiny", patch_size=1)(**x, context=ctx)
    with pytest.raises(ValueError, match="context_channels must be"):
        EchoVelocityUNet.from_preset("tiny", context_channels=3)
    with torch.no_grad():
        out = net(**x, context=ctx)
        x2 = {k: v.clone() for k, v in x.items()}
        x2["z"][1, :, 4:] = 50 * torch.randn_like(x2["z"][1, :, 4:])
        assert torch.equal(out[:, :, :4], net(**x2, context=ctx)[:, :, :4])
        # the context reaches the output: another anatomy at the observed frame changes every frame
        moved = net(**x, context=ctx + 1.0)
    assert (moved - out)[:, :, 3].abs().amax() > 1e-4
    # the flows pass it: a MeanFlow training step with the JVP (every r < t) and a one-step sample run
    from echolvfm_core.flows import LinearFlow, VideoBatch

    target = torch.randn_like(x["z"]) * x["frame_mask"][:, None, :, None, None]
    step = MeanFlow(net, share_r_neq_t=1.0, residual=True)
    loss = step(VideoBatch(target, cond), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss.loss)
    sample = MeanFlow(net).sample(cond, generator=torch.Generator().manual_seed(0))
    assert sample.shape == x["z"].shape and torch.isfinite(sample).all()
    assert torch.isfinite(LinearFlow(net).sample(cond, steps=2, guidance=2.0)).all()
