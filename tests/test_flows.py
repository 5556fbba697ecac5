"""Flow wrappers: MeanFlow JVP target (finite differences), gradients, flag combinations, padding mask,
known-answer checks with an oracle velocity, sampling determinism, CFG, observation sampler."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from echolvfm_core.flows import (
    PATTERNS,
    Conditioning,
    LinearFlow,
    LinearFlowConfig,
    MeanFlow,
    MeanFlowConfig,
    ObservationConfig,
    ObservationSampler,
    VideoBatch,
    per_video_mse,
)
from echolvfm_core.models.unet import EchoVelocityUNet


class ConvNet(nn.Module):
    """A 1 x 1 x 1-conv stand-in with the FlowNetwork signature (t, h and EF enter as per-clip biases)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(8, 4, 1)
        self.emb = nn.Linear(3, 4)
        self.null_ef = nn.Parameter(torch.zeros(1))

    def forward(self, z, t, h, ef, cond, frame_mask, ef_drop=None):
        ef = ef / 100
        if ef_drop is not None:
            ef = torch.where(ef_drop, self.null_ef.expand_as(ef), ef)
        e = self.emb(torch.stack([t, h, ef], 1))[:, :, None, None, None]
        return self.conv(torch.cat([z, cond], 1)) + e


class Oracle(nn.Module):
    """Exact average velocity when the data is one point x*: u(z, r, t) = (z - x*) / t for every r (straight paths)."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)
        self.calls = []

    def forward(self, z, t, h, ef, cond, frame_mask, ef_drop=None):
        self.calls.append(None if ef_drop is None else ef_drop.clone())
        target = self.target.repeat(z.shape[0] // self.target.shape[0], 1, 1, 1, 1)
        u = (z - target) / t[:, None, None, None, None]
        if ef_drop is not None:  # the "unconditional" velocity is scaled, so that guidance has a visible effect
            u = torch.where(ef_drop[:, None, None, None, None], 0.5 * u, u)
        return u * frame_mask[:, None, :, None, None]


def _batch(b=3, t=6, hw=4, seed=0, dtype=torch.float32):
    """b clips of t frames (clip 1 padded after frame 4), ED observed, clip b - 1 also observes frame 3."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, t, hw, hw, generator=g, dtype=dtype)
    frame_mask = torch.ones(b, t, dtype=torch.bool)
    frame_mask[1, 4:] = False
    x = x * frame_mask[:, None, :, None, None]
    observed = torch.zeros(b, t, dtype=torch.bool)
    observed[:, 0] = True
    observed[b - 1, 3] = True
    ef = torch.linspace(25, 70, b, dtype=dtype)
    return VideoBatch(x, Conditioning.from_latents(x, observed, frame_mask, ef))


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return EchoVelocityUNet.from_preset("tiny", max_frames=8)


def test_jvp_matches_central_finite_differences(tiny_net):
    net = EchoVelocityUNet.from_preset("tiny", max_frames=8).double().eval()
    batch = _batch(b=2, t=5, hw=4, dtype=torch.float64)
    c = batch.cond
    g = torch.Generator().manual_seed(1)
    z = torch.randn(batch.x.shape, generator=g, dtype=torch.float64)
    v = torch.randn(batch.x.shape, generator=g, dtype=torch.float64)
    r = torch.tensor([0.2, 0.1], dtype=torch.float64)
    t = torch.tensor([0.7, 0.5], dtype=torch.float64)

    def fn(z_, r_, t_):
        return net(z_, t_, t_ - r_, c.ef, c.cond, c.frame_mask)

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        _, dudt = torch.func.jvp(fn, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
        eps = 1e-6
        fd = (fn(z + eps * v, r, t + eps) - fn(z - eps * v, r, t - eps)) / (2 * eps)
    assert dudt.abs().max() > 1e-3
    torch.testing.assert_close(dudt, fd, atol=1e-6, rtol=1e-5)


def test_full_meanflow_step_on_tiny_unet_reaches_every_parameter(tiny_net):
    tiny_net.zero_grad()
    flow = MeanFlow(tiny_net, share_r_neq_t=1.0, recon_weight=0.1, recon_on="all")
    out = flow(_batch(hw=8), generator=torch.Generator().manual_seed(0))  # 8 -> 4 x 4 -> 2 x 2 attention tokens
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # null_ef is the classifier-free-guidance embedding: only the linear flow's EF dropout uses it.
    missing = [n for n, p in tiny_net.named_parameters()
               if n != "null_ef" and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in tiny_net.parameters() if p.grad is not None)


def test_linear_flow_with_ef_dropout_trains_the_null_embedding(tiny_net):
    tiny_net.zero_grad()
    out = LinearFlow(tiny_net, ef_dropout=0.5)(_batch(b=4), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert tiny_net.null_ef.grad is not None and tiny_net.null_ef.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "p,share,recon,recon_on,linear_ratio",
    list(itertools.product([1.0, 0.5], [0.0, 0.25, 1.0], [0.0, 0.1], ["instantaneous", "all", "one_step"], [0.0, 0.5])),
)
def test_meanflow_flag_combinations(p, share, recon, recon_on, linear_ratio):
    torch.manual_seed(0)
    net = ConvNet()
    flow = MeanFlow(net, adaptive_p=p, share_r_neq_t=share, recon_weight=recon, recon_on=recon_on,
                    linear_ratio=linear_ratio)
    for step in range(2):
        net.zero_grad()
        out = flow(_batch(), step=step, generator=torch.Generator().manual_seed(step))
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        out.loss.backward()
        assert net.conv.weight.grad.abs().sum() > 0
        assert ("recon" in out.parts) == (recon > 0)
        assert float(out.parts["linear"]) == float(flow.is_linear_step(step))
    cond = _batch().cond
    assert flow.sample(cond).shape == cond.cond.shape


def test_linear_step_ratio_is_exact():
    flow = MeanFlow(ConvNet(), linear_ratio=0.25)
    assert sum(flow.is_linear_step(s) for s in range(100)) == 25
    assert not any(MeanFlow(ConvNet()).is_linear_step(s) for s in range(10))


def test_sample_times_order_and_share():
    flow = MeanFlow(ConvNet(), share_r_neq_t=0.25)
    r, t = flow.sample_times(20000, "cpu", torch.Generator().manual_seed(0))
    assert (r <= t).all() and (r > 0).all() and (t < 1).all()
    assert abs((r < t).float().mean().item() - 0.25) < 0.02


def test_one_step_share_draws_the_one_step_interval():
    flow = MeanFlow(ConvNet(), share_r_neq_t=0.25, one_step_share=0.5)
    r, t = flow.sample_times(20000, "cpu", torch.Generator().manual_seed(0))
    one = (r == 0) & (t == 1)
    assert abs(one.float().mean().item() - 0.5) < 0.02
    rest_r, rest_t = r[~one], t[~one]
    assert (rest_r <= rest_t).all() and (rest_r > 0).all() and (rest_t < 1).all()
    assert abs((rest_r < rest_t).float().mean().item() - 0.25) < 0.02
    with pytest.raises(ValueError, match="one_step_share"):
        MeanFlowConfig(one_step_share=1.5)


def test_one_step_reconstruction_is_the_error_of_the_one_step_sample():
    """recon_on="one_step" averages |x_hat - x|^2 over exactly the clips drawn at (r, t) = (0, 1), and there x_hat
    is the one-step sample from that clip's noise (checked with an x-prediction stand-in that returns x + 1 at
    t = 1 and x elsewhere: the term is 1 where the one-step interval was drawn)."""

    class OffByOneAtNoise(nn.Module):
        def __init__(self, target):
            super().__init__()
            self.register_buffer("target", target)

        def forward(self, z, t, h, ef, cond, frame_mask, ef_drop=None):
            return self.target + (t == 1).to(z.dtype)[:, None, None, None, None]

    batch = _batch(b=8, t=6)
    flow = MeanFlow(OffByOneAtNoise(batch.x), prediction="x", share_r_neq_t=0.0, one_step_share=0.5,
                    recon_weight=1.0, recon_on="one_step", adaptive_p=0.0)
    gen = torch.Generator().manual_seed(4)
    torch.randn(batch.x.shape, generator=gen)  # the loss draws its noise first, then the times
    r, t = flow.sample_times(8, "cpu", gen)
    assert 0 < int(((r == 0) & (t == 1)).sum()) < 8  # this seed draws both kinds
    out = flow(batch, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out.parts["recon"], torch.tensor(1.0))
    # "instantaneous" would average over the other clips, where the stand-in is exact
    flow_inst = MeanFlow(flow.net, flow.config, recon_on="instantaneous")
    torch.testing.assert_close(flow_inst(batch, generator=torch.Generator().manual_seed(4)).parts["recon"],
                               torch.tensor(0.0))


def test_zero_meanflow_weight_trains_the_one_step_sample_by_regression():
    """mf_weight = 0 with every clip at (0, 1): the loss is exactly the one-step sample's squared error (no MeanFlow
    term, hence no JVP: a network without a forward-mode derivative trains), and the config refuses a loss of
    nothing."""

    class NoForwardAD(nn.Module):
        def __init__(self):
            super().__init__()
            self.shift = nn.Parameter(torch.tensor(0.5))

        def forward(self, z, t, h, ef, cond, frame_mask, ef_drop=None):
            if torch._C._functorch.is_gradtrackingtensor(z) or not torch.equal(t, torch.ones_like(t)):
                raise AssertionError("called under a transform or away from t = 1")
            return torch.zeros_like(z) + self.shift  # x-prediction: the one-step sample is 0.5 everywhere

    batch = _batch()
    flow = MeanFlow(NoForwardAD(), prediction="x", one_step_share=1.0, mf_weight=0.0, recon_weight=2.0,
                    recon_on="one_step")
    out = flow(batch, generator=torch.Generator().manual_seed(0))
    w = batch.cond.frame_mask.float()
    expected = per_video_mse(torch.full_like(batch.x, 0.5), batch.x, w).mean()
    torch.testing.assert_close(out.parts["recon"], expected)
    torch.testing.assert_close(out.loss, 2.0 * expected)
    assert "mf" not in out.parts
    out.loss.backward()
    assert flow.net.shift.grad is not None
    with pytest.raises(ValueError, match="recon_weight must be > 0"):
        MeanFlowConfig(mf_weight=0.0)


def test_padded_frame_targets_do_not_change_the_loss(tiny_net):
    batch = _batch()
    assert not batch.cond.frame_mask[1, 4:].any()
    changed = batch.x.clone()
    changed[1, :, 4:] = 7.0  # padded frames of clip 1
    losses = []
    for x in (batch.x, changed):
        flow = MeanFlow(tiny_net, share_r_neq_t=1.0, recon_weight=0.1, recon_on="all")
        losses.append(flow(VideoBatch(x, batch.cond), generator=torch.Generator().manual_seed(3)).loss)
    assert torch.equal(losses[0], losses[1])
    real = batch.x.clone()
    real[1, :, 2] += 1.0  # a real frame does change it
    flow = MeanFlow(tiny_net, share_r_neq_t=1.0)
    assert not torch.equal(flow(VideoBatch(real, batch.cond), generator=torch.Generator().manual_seed(3)).loss,
                           flow(batch, generator=torch.Generator().manual_seed(3)).loss)


def test_every_clip_weighs_the_same_whatever_its_length():
    pred = torch.zeros(2, 4, 6, 2, 2)
    target = torch.ones(2, 4, 6, 2, 2)
    weights = torch.tensor([[1.0] * 6, [1.0] * 2 + [0.0] * 4])
    assert torch.equal(per_video_mse(pred, target, weights), torch.ones(2))


def test_oracle_gives_zero_meanflow_loss_and_exact_one_step_sample():
    target = torch.randn(1, 4, 6, 4, 4).expand(3, -1, -1, -1, -1).clone()
    batch = _batch()
    target = target * batch.cond.frame_mask[:, None, :, None, None]
    oracle = Oracle(target)
    flow = MeanFlow(oracle, share_r_neq_t=1.0, adaptive_p=0.0)
    out = flow(VideoBatch(target, batch.cond), generator=torch.Generator().manual_seed(0))
    assert out.parts["mse"] < 1e-8
    for steps in (1, 3):
        x = flow.sample(batch.cond, steps=steps, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(x, target, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("solver", ["euler", "midpoint"])
def test_linear_solvers_recover_the_oracle_point(solver):
    batch = _batch()
    target = batch.x
    flow = LinearFlow(Oracle(target))
    x = flow.sample(batch.cond, steps=4, solver=solver, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, target, atol=1e-4, rtol=1e-4)
    assert len(flow.net.calls) == (8 if solver == "midpoint" else 4)


def test_classifier_free_guidance_mixes_conditional_and_null_velocity():
    batch = _batch()
    oracle = Oracle(batch.x)
    flow = LinearFlow(oracle)
    z = torch.randn(batch.x.shape)
    t = torch.full((3,), 0.5)
    v_ef = flow.velocity(z, t, batch.cond)
    assert oracle.calls[-1] is None
    v = flow.velocity(z, t, batch.cond, guidance=3.0)
    drop = oracle.calls[-1]
    assert drop.tolist() == [False] * 3 + [True] * 3
    torch.testing.assert_close(v, 0.5 * v_ef + 3.0 * (v_ef - 0.5 * v_ef))


def test_sampling_is_deterministic_for_a_seed_and_zero_at_padding(tiny_net):
    flow = MeanFlow(tiny_net.eval())
    cond = _batch().cond
    a = flow.sample(cond, generator=torch.Generator().manual_seed(5))
    b = flow.sample(cond, generator=torch.Generator().manual_seed(5))
    c = flow.sample(cond, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[1, :, 4:] == 0).all()
    with pytest.raises(ValueError, match="noise must have shape"):
        flow.sample(cond, noise=torch.zeros(1, 4, 6, 4, 4))


def test_conditioning_validation():
    x = torch.randn(1, 4, 3, 2, 2)
    fm = torch.tensor([[True, True, False]])
    with pytest.raises(ValueError, match="in the padding"):
        Conditioning.from_latents(x, torch.tensor([[False, False, True]]), fm, torch.tensor([50.0]))
    with pytest.raises(ValueError, match="at least one observed"):
        Conditioning.from_latents(x, torch.zeros(1, 3, dtype=torch.bool), fm, torch.tensor([50.0]))
    cond = Conditioning.from_latents(x, torch.tensor([[True, False, False]]), fm, torch.tensor([50.0]))
    assert (cond.cond[:, :, 1:] == 0).all() and torch.equal(cond.cond[:, :, 0], x[:, :, 0])
    with pytest.raises(ValueError, match="share_r_neq_t"):
        MeanFlowConfig(share_r_neq_t=1.5)


def test_observation_sampler_patterns_are_valid_and_seeded():
    cfg = ObservationConfig()
    a, b = ObservationSampler(cfg, seed=3), ObservationSampler(cfg, seed=3)
    seen = set()
    for _ in range(200):
        length = a.length(40)
        assert length == b.length(40)
        assert cfg.min_frames <= length <= cfg.max_frames
        mask, pattern = a.observed(length, ed_index=2)
        mask_b, _ = b.observed(length, ed_index=2)
        assert torch.equal(mask, mask_b)
        seen.add(pattern)
        assert mask.shape == (cfg.max_frames,) and mask.any() and not mask[length:].any()
    assert seen == set(PATTERNS)
    s = ObservationSampler(cfg, seed=0)
    assert s.observed(12, ed_index=4, pattern="ed")[0].nonzero().flatten().tolist() == [4]
    assert s.observed(12, pattern="every_other")[0][:12].sum() == 6
    with pytest.raises(ValueError, match="shorter than min_frames"):
        s.length(5)


def test_anchor_interpolates_between_observed_frames_and_holds_outside():
    from echolvfm_core.flows.base import anchor_latents

    c = torch.zeros(1, 1, 6, 1, 1)
    observed = torch.zeros(1, 6, dtype=torch.bool)
    observed[0, [1, 3]] = True
    c[0, 0, 1], c[0, 0, 3] = 2.0, 4.0
    frame_mask = torch.ones(1, 6, dtype=torch.bool)
    frame_mask[0, 5] = False
    anchor = anchor_latents(Conditioning(c, observed, frame_mask, torch.tensor([50.0])))
    assert anchor.flatten().tolist() == [2.0, 2.0, 3.0, 4.0, 4.0, 0.0]


@pytest.mark.parametrize("flow_cls", [MeanFlow, LinearFlow])
def test_residual_flow_learns_the_motion_and_adds_the_anchor_back(flow_cls):
    from echolvfm_core.flows.base import anchor_latents

    batch = _batch()
    residual = batch.x - anchor_latents(batch.cond)
    kwargs = {"share_r_neq_t": 1.0, "adaptive_p": 0.0} if flow_cls is MeanFlow else {}
    flow = flow_cls(Oracle(residual), residual=True, **kwargs)
    if flow_cls is MeanFlow:  # the oracle of the residual data has zero loss on the real clips
        assert flow(batch, generator=torch.Generator().manual_seed(0)).parts["mse"] < 1e-8
    x = flow.sample(batch.cond, steps=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, batch.x, atol=1e-4, rtol=1e-4)
    # at observed frames the residual is zero, so the sample keeps the observed latents
    obs = batch.cond.observed[:, None, :, None, None].expand_as(x)
    torch.testing.assert_close(x[obs], batch.cond.cond[obs], atol=1e-4, rtol=1e-4)


class PointNet(nn.Module):
    """x-prediction oracle when the data is one point x*: returns x* whatever the input."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)

    def forward(self, z, t, h, ef, cond, frame_mask, ef_drop=None):
        return self.target.repeat(z.shape[0] // self.target.shape[0], 1, 1, 1, 1)


def test_x_prediction_reads_the_network_as_a_clean_estimate():
    batch = _batch()
    target = batch.x
    flow = MeanFlow(PointNet(target), prediction="x", share_r_neq_t=1.0, adaptive_p=0.0)
    assert flow(batch, generator=torch.Generator().manual_seed(0)).parts["mse"] < 1e-8
    for steps in (1, 3):
        torch.testing.assert_close(flow.sample(batch.cond, steps=steps, generator=torch.Generator().manual_seed(0)),
                                   target, atol=1e-4, rtol=1e-4)
    # an untrained (zero) network gives the anchor in one step with the residual flow: no noise left
    zero = MeanFlow(PointNet(torch.zeros_like(target)), prediction="x", residual=True)
    from echolvfm_core.flows.base import anchor_latents

    torch.testing.assert_close(zero.sample(batch.cond, steps=1, generator=torch.Generator().manual_seed(0)),
                               anchor_latents(batch.cond))
    with pytest.raises(ValueError, match="prediction"):
        MeanFlow(PointNet(target), prediction="v")


def test_warp_latents_matches_grid_sample_and_has_a_forward_derivative():
    import torch.nn.functional as F

    from echolvfm_core.flows.base import warp_latents

    g = torch.Generator().manual_seed(0)
    src = torch.randn(3, 4, 7, 9, generator=g, dtype=torch.float64)
    disp = torch.randn(3, 2, 7, 9, generator=g, dtype=torch.float64) * 1.5  # some positions leave the grid
    ys, xs = torch.meshgrid(torch.arange(7.0), torch.arange(9.0), indexing="ij")
    grid = torch.stack([(xs + disp[:, 0]).clamp(0, 8) / 4 - 1, (ys + disp[:, 1]).clamp(0, 6) / 3 - 1], -1)
    ref = F.grid_sample(src, grid.to(src.dtype), align_corners=True, padding_mode="border")
    torch.testing.assert_close(warp_latents(src, disp), ref)
    # a whole-pixel shift moves the content: out[..., j] = src[..., j + 1]
    shift = torch.zeros_like(disp)
    shift[:, 0] = 1.0
    torch.testing.assert_close(warp_latents(src, shift)[..., :-1], src[..., 1:])
    # forward mode (the MeanFlow JVP) agrees with central differences
    tangent = torch.randn(disp.shape, generator=g, dtype=torch.float64)
    _, jvp = torch.func.jvp(lambda d: warp_latents(src, d), (disp,), (tangent,))
    fd = (warp_latents(src, disp + 1e-6 * tangent) - warp_latents(src, disp - 1e-6 * tangent)) / 2e-6
    torch.testing.assert_close(jvp, fd, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="disp must be"):
        warp_latents(src, disp[:, :1])


class WarpNet(nn.Module):
    """Warp-prediction oracle: a fixed displacement field and residual, whatever the input."""

    def __init__(self, residual: torch.Tensor, disp: torch.Tensor):
        super().__init__()
        self.register_buffer("out", torch.cat([residual, disp / MeanFlowConfig().displacement_gain], 1))
        self.config = SimpleNamespace(displacement_channels=2)

    def forward(self, z, t, h, ef, cond, frame_mask, ef_drop=None):
        return self.out.repeat(z.shape[0] // self.out.shape[0], 1, 1, 1, 1)


def test_warp_prediction_moves_the_anchor_by_the_network_displacement():
    from echolvfm_core.flows.base import anchor_latents, warp_latents

    batch = _batch()
    b, c, t, h, w = batch.x.shape
    anchor = anchor_latents(batch.cond)
    disp = torch.zeros(b, 2, t, h, w)
    disp[:, 1] = 0.5  # half a pixel down everywhere
    residual = torch.randn(b, c, t, h, w, generator=torch.Generator().manual_seed(1)) * 0.1
    frames = lambda v: v.transpose(1, 2).reshape(b * t, -1, h, w)  # noqa: E731
    moved = warp_latents(frames(anchor), frames(disp)).reshape(b, t, c, h, w).transpose(1, 2)
    pad = batch.cond.frame_mask[:, None, :, None, None].float()
    expected = (moved + residual) * pad
    flow = MeanFlow(WarpNet(residual, disp), prediction="warp", residual=True)
    torch.testing.assert_close(flow.sample(batch.cond, steps=1, generator=torch.Generator().manual_seed(0)), expected,
                               atol=1e-5, rtol=1e-5)
    # the loss of that oracle on its own samples is zero (every r < t: through the JVP)
    exact = MeanFlow(WarpNet(residual, disp), prediction="warp", residual=True, share_r_neq_t=1.0, adaptive_p=0.0)
    assert exact(VideoBatch(expected, batch.cond), generator=torch.Generator().manual_seed(0)).parts["mse"] < 1e-8
    # motion_gain scales the displacement when sampling (a full pixel here) and leaves the training loss alone
    moved2 = warp_latents(frames(anchor), frames(2 * disp)).reshape(b, t, c, h, w).transpose(1, 2)
    gained = MeanFlow(WarpNet(residual, disp), prediction="warp", residual=True, motion_gain=2.0)
    torch.testing.assert_close(gained.sample(batch.cond, steps=1, generator=torch.Generator().manual_seed(0)),
                               (moved2 + residual) * pad, atol=1e-5, rtol=1e-5)
    exact_gained = MeanFlow(WarpNet(residual, disp), exact.config, motion_gain=2.0)
    assert exact_gained(VideoBatch(expected, batch.cond),
                        generator=torch.Generator().manual_seed(0)).parts["mse"] < 1e-8
    with pytest.raises(ValueError, match="motion_gain"):
        MeanFlowConfig(motion_gain=2.0)
    with pytest.raises(ValueError, match="residual"):
        MeanFlow(WarpNet(residual, disp), prediction="warp")
    with pytest.raises(ValueError, match="displacement"):
        LinearFlow(EchoVelocityUNet.from_preset("tiny", displacement_channels=2))


@pytest.mark.parametrize("mf_weight", [0.0, 1.0])
def test_displacement_supervision_is_the_field_error_of_the_clips_that_know_their_motion(mf_weight):
    batch = _batch()
    b, c, t, h, w = batch.x.shape
    disp = torch.zeros(b, 2, t, h, w)
    disp[:, 1] = 0.5
    residual = torch.zeros(b, c, t, h, w)
    known_motion = disp.clone()
    known_motion[1, 0] += 1.0  # clip 1 should move one pixel further right: squared error 1 in one of 2 channels
    known_motion[2] = 7.0  # clip 2's motion is unknown: whatever it carries must not count
    known = torch.tensor([True, True, False])
    supervised = VideoBatch(batch.x, batch.cond, known_motion, known)
    flow = MeanFlow(WarpNet(residual, disp), prediction="warp", residual=True, share_r_neq_t=1.0, recon_weight=1.0,
                    recon_on="all", mf_weight=mf_weight, displacement_weight=3.0)
    out = flow(supervised, generator=torch.Generator().manual_seed(0))
    assert float(out.parts["disp"]) == pytest.approx((0.0 + 0.5) / 2)
    plain = flow(batch, generator=torch.Generator().manual_seed(0))  # a batch without known motion: no such term
    assert "disp" not in plain.parts
    assert float(out.loss - plain.loss) == pytest.approx(3.0 * 0.25, rel=1e-5)


def test_displacement_supervision_reaches_the_network_and_checks_its_inputs():
    torch.manual_seed(0)
    net = EchoVelocityUNet.from_preset("tiny", max_frames=8, displacement_channels=2, context_channels=4)
    config = MeanFlowConfig(prediction="warp", residual=True, mf_weight=0.0, recon_weight=1.0, one_step_share=1.0,
                            recon_on="one_step")
    batch = _batch(hw=8)
    b, _, t, h, w = batch.x.shape
    motion = torch.randn(b, 2, t, h, w, generator=torch.Generator().manual_seed(2))
    supervised = VideoBatch(batch.x, batch.cond, motion, torch.ones(b, dtype=torch.bool))
    with_term = MeanFlow(net, config, displacement_weight=1.0)(supervised, generator=torch.Generator().manual_seed(0))
    without = MeanFlow(net, config)(supervised, generator=torch.Generator().manual_seed(0))
    term = with_term.loss - without.loss
    assert float(term) == pytest.approx(float(with_term.parts["disp"]), rel=1e-5)
    grads = torch.autograd.grad(term, [p for p in net.parameters() if p.requires_grad], allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="displacement_weight"):
        MeanFlowConfig(displacement_weight=1.0)  # prediction "u" has no field to supervise
    with pytest.raises(ValueError, match="displacement_weight"):
        MeanFlowConfig(displacement_weight=-1.0, prediction="warp", residual=True)
    with pytest.raises(ValueError, match="come together"):
        VideoBatch(batch.x, batch.cond, motion, None)
    with pytest.raises(ValueError, match="displacement must be"):
        VideoBatch(batch.x, batch.cond, motion[:, :1], torch.ones(b, dtype=torch.bool))


class Analytic(nn.Module):
    """u(z, r, t) = a z t^2 + b (t - r), elementwise, with scalar parameters a and b: its total derivative along the
    tangent (dz, 0, 1) for (z, r, t) is ``a (dz t^2 + 2 z t) + b`` in closed form."""

    def __init__(self, a: float = 0.7, b: float = 3.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, z, t, h, ef, cond, frame_mask, ef_drop=None):
        return self.a * z * t[:, None, None, None, None] ** 2 + self.b * h[:, None, None, None, None]


def _draws(batch: VideoBatch, flow: MeanFlow, seed: int):
    """The noise, r and t that ``flow(batch, generator=Generator().manual_seed(seed))`` draws (noise first)."""
    g = torch.Generator().manual_seed(seed)
    pad = batch.cond.frame_mask[:, None, :, None, None].to(batch.x.dtype)
    eps = torch.randn(batch.x.shape, generator=g, dtype=batch.x.dtype) * pad
    r, t = flow.sample_times(batch.x.shape[0], "cpu", g, 0)
    return eps, r.to(batch.x.dtype), t.to(batch.x.dtype)


def _closed_form_target(net: Analytic, batch: VideoBatch, eps, r, t, tangent: str):
    """(u, target) of the MeanFlow loss for :class:`Analytic`, target = v - (t - r) du/dt, written out by hand."""
    x = batch.x
    tb, rb = t[:, None, None, None, None], r[:, None, None, None, None]
    z = (1 - tb) * x + tb * eps
    v = eps - x
    a, b = net.a.detach(), net.b.detach()
    dz = v if tangent == "conditional" else a * z * tb**2  # "predicted": u(z_t, t, t), the instantaneous velocity
    dudt = a * (dz * tb**2 + 2 * z * tb) + b
    u = net.a * z * tb**2 + net.b * (tb - rb)
    return u, v - (tb - rb) * dudt


@pytest.mark.parametrize("tangent", ["conditional", "predicted"])
def test_meanflow_target_is_the_closed_form_jvp_along_the_tangent(tangent):
    """Known answer: the loss equals |u - (v - (t - r) du/dt)|^2 with du/dt along (v, 0, 1) (MeanFlow Eq. 8), or
    along (u(z_t, t, t), 0, 1) with the predicted tangent (Improved Mean Flows). A tangent with dr = 1 or dt = 0, or
    the other z-direction, changes du/dt and the loss."""
    batch = _batch(dtype=torch.float64)
    net = Analytic()
    flow = MeanFlow(net, share_r_neq_t=1.0, adaptive_p=0.0, tangent=tangent)
    out = flow(batch, generator=torch.Generator().manual_seed(3))
    eps, r, t = _draws(batch, flow, 3)
    assert (r < t).all()
    u, target = _closed_form_target(net, batch, eps, r, t, tangent)
    expected = per_video_mse(u, target, batch.cond.frame_mask.double()).mean()
    torch.testing.assert_close(out.parts["mse"], expected.detach())
    other = "predicted" if tangent == "conditional" else "conditional"
    _, wrong = _closed_form_target(net, batch, eps, r, t, other)
    assert abs(float(per_video_mse(u, wrong, batch.cond.frame_mask.double()).mean()) - float(expected)) > 1e-3


@pytest.mark.parametrize("tangent", ["conditional", "predicted"])
def test_meanflow_gradient_treats_the_target_and_du_dt_as_constants(tangent):
    """Stop-gradient (MeanFlow Eq. 9-10): the parameters' gradient is that of |u - c|^2 with the target c a
    constant; a target through which gradients flowed (via du/dt) would add (t - r) d(du/dt)/d(a, b) terms."""
    batch = _batch(dtype=torch.float64)
    net = Analytic()
    flow = MeanFlow(net, share_r_neq_t=1.0, adaptive_p=0.0, tangent=tangent)
    out = flow(batch, generator=torch.Generator().manual_seed(5))
    got = torch.autograd.grad(out.loss, [net.a, net.b])
    eps, r, t = _draws(batch, flow, 5)
    u, target = _closed_form_target(net, batch, eps, r, t, tangent)
    reference = per_video_mse(u, target.detach(), batch.cond.frame_mask.double()).mean()
    want = torch.autograd.grad(reference, [net.a, net.b])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_predicted_tangent_is_the_instantaneous_velocity_and_carries_no_gradient():
    batch = _batch(dtype=torch.float64)
    net = Analytic()
    flow = MeanFlow(net, tangent="predicted")
    z = torch.randn(batch.x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    dz = flow.jvp_tangent(flow._velocity_fn(batch.cond), z, t, torch.zeros_like(z))
    assert not dz.requires_grad and dz.grad_fn is None
    torch.testing.assert_close(dz, 0.7 * z * t[:, None, None, None, None] ** 2)
    conditional = MeanFlow(net).jvp_tangent(flow._velocity_fn(batch.cond), z, t, z + 1)
    torch.testing.assert_close(conditional, z + 1)
    with pytest.raises(ValueError, match="tangent"):
        MeanFlowConfig(tangent="other")


def test_interval_curriculum_grows_from_short_to_full_intervals_and_keeps_one_step_draws():
    flow = MeanFlow(ConvNet(), share_r_neq_t=1.0, one_step_share=0.25, interval_warmup=100)
    full = MeanFlow(ConvNet(), flow.config, interval_warmup=0)
    for step, fraction in ((0, 0.01), (49, 0.5), (99, 1.0), (500, 1.0)):
        r, t = flow.sample_times(4000, "cpu", torch.Generator().manual_seed(1), step)
        r0, t0 = full.sample_times(4000, "cpu", torch.Generator().manual_seed(1), step)
        one = (r0 == 0) & (t0 == 1)
        assert torch.equal(one, (r == 0) & (t == 1)) and 0.2 < one.float().mean() < 0.3
        torch.testing.assert_close(t, t0)
        torch.testing.assert_close((t - r)[~one], fraction * (t0 - r0)[~one])
    with pytest.raises(ValueError, match="interval_warmup"):
        MeanFlowConfig(interval_warmup=-1)


def test_linear_flow_training_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    net = ConvNet()
    flow = LinearFlow(net, ef_dropout=0.5)
    batch = _batch(b=4)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)

    def loss():  # the same noise, times and EF dropout every time: a fixed problem
        return flow(batch, generator=torch.Generator().manual_seed(0)).loss

    before = float(loss())
    for _ in range(25):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert 0 < float(loss()) < 0.8 * before  # a squared error, lowered


def test_linear_flow_with_warp_prediction_integrates_to_the_warped_anchor():
    """The baseline can share the one-step model's output: a network whose clean estimate is the anchor moved by a
    fixed field plus a residual is integrated from noise to exactly that estimate, with and without guidance."""
    from echolvfm_core.flows.base import anchor_latents, warp_latents

    batch = _batch()
    b, c, t, h, w = batch.x.shape
    disp = torch.zeros(b, 2, t, h, w)
    disp[:, 0] = -0.5
    residual = torch.randn(b, c, t, h, w, generator=torch.Generator().manual_seed(1)) * 0.1
    frames = lambda v: v.transpose(1, 2).reshape(b * t, -1, h, w)  # noqa: E731
    moved = warp_latents(frames(anchor_latents(batch.cond)), frames(disp)).reshape(b, t, c, h, w).transpose(1, 2)
    expected = (moved + residual) * batch.cond.frame_mask[:, None, :, None, None]
    flow = LinearFlow(WarpNet(residual, disp), prediction="warp", residual=True)
    for solver, guidance in (("euler", 1.0), ("midpoint", 2.0)):
        got = flow.sample(batch.cond, steps=10, solver=solver, guidance=guidance,
                          generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="residual"):
        LinearFlowConfig(prediction="warp")
    with pytest.raises(ValueError, match="displacement_weight"):
        LinearFlowConfig(displacement_weight=1.0)
    with pytest.raises(ValueError, match="displacement output"):
        LinearFlow(ConvNet(), prediction="warp", residual=True)


def test_linear_flow_with_warp_prediction_learns_on_a_fixed_batch_with_its_motion_supervised():
    torch.manual_seed(0)
    net = EchoVelocityUNet.from_preset("tiny", max_frames=8, displacement_channels=2, context_channels=4)
    batch = _batch(hw=8)
    b, _, t, h, w = batch.x.shape
    motion = torch.randn(b, 2, t, h, w, generator=torch.Generator().manual_seed(2)) * 0.5
    supervised = VideoBatch(batch.x, batch.cond, motion, torch.tensor([True, False, True]))
    flow = LinearFlow(net, prediction="warp", residual=True, displacement_weight=1.0, ef_dropout=0.5)
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)

    def loss():
        return flow(supervised, generator=torch.Generator().manual_seed(0))

    first = loss()
    assert set(first.parts) == {"mse", "disp"}
    torch.testing.assert_close(first.loss, first.parts["mse"] + first.parts["disp"])
    for _ in range(25):
        optimizer.zero_grad()
        loss().loss.backward()
        optimizer.step()
    last = loss()
    assert float(last.parts["mse"]) < 0.9 * float(first.parts["mse"])
    assert float(last.parts["disp"]) < 0.8 * float(first.parts["disp"])
