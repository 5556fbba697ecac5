"""Spatio-temporal velocity U-Net of the EchoLVFM generator (network only; the flows live in
:mod:`echolvfm_core.flows`).

Call signature (the flows rely on exactly this)::

    u = net(z, t, h, ef, cond, frame_mask, ef_drop=None, context=None)

    z          (B, 4, T, h, w)  noisy latent video z_t (latent size h = w = 28 for 112-pixel frames, T <= max_frames)
    t          (B,)             flow time in [0, 1]
    h          (B,)             interval t - r in [0, 1] (MeanFlow); 0 for an instantaneous velocity
    ef         (B,)             ejection fraction in % (0-100)
    cond       (B, 4, T, h, w)  clean latents at observed frames, zero at unobserved and padded frames
    frame_mask (B, T) bool      True at real frames, False at padding (padding only after the last real frame)
    ef_drop    (B,) bool        True where the EF is replaced by the learned null embedding (classifier-free guidance)
    context    (B, 4, T, h, w)  with ``context_channels`` > 0 only: the observed latents interpolated in time to every
                                frame (:func:`echolvfm_core.flows.base.anchor_latents`; the flows pass it), zero at
                                padding
    u          (B, 4, T, h, w)  (average) velocity; with ``displacement_channels`` = 2, (B, 4 + 2, T, h, w): a
                                residual and a displacement field in latent pixels (x, y), read by the flow
                                (MeanFlow ``prediction="warp"``)

The network input is ``cat(z, cond, frame_mask)`` = 4 + 4 + 1 = 9 channels, plus the context when configured: with
one observed frame, ``cond`` is zero at every other frame, and the convolutions would have to carry the anatomy
across time; the context gives each frame the observed anatomy at full latent resolution, so the network only has
to learn how it moves. The time ``t``, the interval ``h`` and
the EF are each embedded sinusoidally + MLP and summed into one embedding that modulates every residual block
(scale-shift / FiLM), so the EF conditions every layer. The null EF embedding is a learned vector.

Blocks (all from diffusers, run frame-wise on (B*T, C, h, w) unless stated): ``ResnetBlock2D`` (FiLM on the
embedding) -> a temporal convolution (kernel 3 along time, per-frame GroupNorm) -> optionally a stack of
spatial ``BasicTransformerBlock`` (self-attention within a frame) + temporal ``BasicTransformerBlock``
(self-attention across frames at each pixel, sinusoidal frame-index embedding). ``Downsample2D`` /
``Upsample2D`` (with explicit output size: 28 -> 14 -> 7 -> 4 -> 7 -> 14 -> 28).

Padding: valid-frame outputs do not depend on anything in padded frames. Every spatial operation (convolutions,
GroupNorm, spatial attention) acts on one frame at a time; the temporal convolution sees padded frames as zeros
(hidden states are multiplied by ``frame_mask`` first), exactly like the zero padding at the end of an unpadded
clip; temporal attention masks padded keys. A padded batch therefore gives the same valid-frame output as the
unpadded clip (checked in tests/test_unet.py).

Attention and forward-mode AD: :class:`EchoAttnProcessor` runs self-attention with ``F.scaled_dot_product_attention``,
or with jvp-flash-attention (the optional ``cuda`` extra, ``pip install -e ".[cuda]"``) on CUDA tensors (and CPU
tensors under Triton's interpreter, for tests) whose shape suits the kernel (sequence length a multiple of 32, head
dimension 32, 64, 128 or 256). The kernel is called through ``JVPAttn.fwd_dual``, as its documentation asks under
``torch.func.jvp``: the tangents of q, k and v are unpacked and the kernel computes the output's tangent itself,
before autograd runs (its plain ``attention`` entry dies inside ``torch.func.jvp`` with an autograd internal assert).
A boolean key mask goes to the kernel too, expanded to (N, heads, L, L); other shapes and devices use
``F.scaled_dot_product_attention``, masked or not. ``torch.func.jvp`` cannot go through the fused SDPA kernels, so
callers that take a JVP wrap the call in ``sdpa_kernel([SDPBackend.MATH])`` (the MeanFlow wrapper does this); it does
not affect jvp-flash-attention.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.downsampling import Downsample2D
from diffusers.models.embeddings import TimestepEmbedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

try:  # optional attention kernel with a forward-mode derivative (Triton); absent on CPU-only installs
    import triton
    from jvp_flash_attention.jvp_attention import JVPAttn as _JVPAttn

    # Under Triton's interpreter (TRITON_INTERPRET=1 before the first import; tests) the kernel also runs on CPU.
    _FLASH_ON_CPU = bool(triton.knobs.runtime.interpret)
except Exception:  # noqa: BLE001 - any import failure (missing package, no Triton) means "not available"
    _JVPAttn = None
    _FLASH_ON_CPU = False

__all__ = [
    "EchoVelocityUNet",
    "UNetConfig",
    "UNET_PRESETS",
    "unet_preset",
    "EchoAttnProcessor",
    "jvp_flash_available",
]


LATENT_CHANNELS = 4


@dataclass(frozen=True)
class UNetConfig:
    """Constructor arguments of :class:`EchoVelocityUNet` (also what ``config.json`` stores).

    ``block_out_channels``: width per resolution level (each level after the first halves h and w);
    ``layers_per_block``: residual blocks per level on the way down (one more on the way up);
    ``transformer_layers_per_block``: spatial + temporal attention layers after each residual block of a level
    (0: none); ``attention_head_dim``: channels per head; ``patch_size``: 1, or 2 to fold 2 x 2 latent pixels
    into channels before the first level (quarter of the work per level; used by the CPU ``demo`` preset);
    ``max_frames``: longest clip (frame-index embedding length); ``temporal_ff_mult``: feed-forward width of the
    temporal attention blocks relative to the channels (spatial blocks use 4); ``time_scale``: t and h are
    multiplied by it before the sinusoidal embedding (moderate, so that du/dt of the MeanFlow JVP stays tame);
    ``upsample_conv``: a 3 x 3 convolution after each nearest-neighbour upsampling (off in ``demo`` for speed: the
    next residual block convolves anyway); ``ef_scale``: the EF in % is multiplied by it before the sinusoidal
    embedding (1: periods from 6 EF points up, most features smooth, the slowest nearly linear in the EF, so a
    network trained on a few thousand loops interpolates between EFs instead of memorising them);
    ``context_channels``: 4 to take the anchor latents as input at every frame (see the module docstring);
    ``displacement_channels``: 2 to output a displacement field beside the residual (MeanFlow ``prediction="warp"``).
    """

    block_out_channels: tuple[int, ...] = (128, 128, 256, 256)
    layers_per_block: int = 2
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 2, 2)
    attention_head_dim: int = 32
    norm_num_groups: int = 32
    patch_size: int = 1
    max_frames: int = 32
    temporal_ff_mult: int = 2
    time_scale: float = 100.0
    upsample_conv: bool = True
    latent_channels: int = LATENT_CHANNELS
    sample_size: int = 28
    ef_scale: float = 1.0
    context_channels: int = 0
    displacement_channels: int = 0


#: Size presets. ``paper``: the EchoLVFM paper's widths (~77M parameters); ``demo``: bundled, for two CPU cores
#: (2.9M parameters, 4.7 GFLOP per 32-frame clip: 2 x 2 patches, attention only at 4 x 4 and in the middle block,
#: temporal convolutions everywhere; 12 MB even in float32); ``tiny``: tests.
UNET_PRESETS = {
    "paper": UNetConfig(),
    "demo": UNetConfig(
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        transformer_layers_per_block=(0, 0, 1),
        attention_head_dim=32,
        norm_num_groups=8,
        patch_size=2,
        upsample_conv=False,
    ),
    "tiny": UNetConfig(
        block_out_channels=(16, 32),
        layers_per_block=1,
        transformer_layers_per_block=(0, 1),
        attention_head_dim=8,
        norm_num_groups=4,
        patch_size=2,
    ),
}


def unet_preset(name: str) -> UNetConfig:
    """The :class:`UNetConfig` of preset ``name`` ("paper", "demo" or "tiny")."""
    if name not in UNET_PRESETS:
        raise ValueError(f"Unknown generator preset {name!r}; choose one of {sorted(UNET_PRESETS)}.")
    return UNET_PRESETS[name]


def jvp_flash_available() -> bool:
    """True when the optional jvp-flash-attention kernel could be imported."""
    return _JVPAttn is not None


def _flash_fits(q: torch.Tensor) -> bool:
    """Whether jvp-flash-attention takes q (N, heads, L, dim_head): its device, L a multiple of 32 (the kernel's
    block; its backward pass needs whole blocks) and a head dimension of 32-256 (its Python check admits 16, but the
    Triton kernel asserts that the 32-key block is no wider than the head)."""
    length, dim_head = q.shape[-2:]
    return (
        _JVPAttn is not None
        and (q.is_cuda or _FLASH_ON_CPU)
        and length % 32 == 0
        and dim_head in (32, 64, 128, 256)
    )


class EchoAttnProcessor:
    """Self-attention processor for diffusers ``Attention`` with a boolean key mask and a JVP-capable kernel.

    ``attention_mask``: None or bool (N, L) with True at keys that may be attended to (N = batch of sequences,
    L = sequence length); every query row must keep at least one key. With ``use_jvp_flash`` and the optional
    kernel importable, inputs that suit it (CUDA, L a multiple of 32, head dimension 32-256 in powers of two; see
    :func:`_flash_fits`) go through jvp-flash-attention's ``JVPAttn.fwd_dual`` (correct inside ``torch.func.jvp``),
    masked or not; everything else uses ``F.scaled_dot_product_attention``.
    """

    def __init__(self, use_jvp_flash: bool = True):
        self.use_jvp_flash = use_jvp_flash

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None, **_):
        if encoder_hidden_states is not None:
            raise ValueError("EchoAttnProcessor handles self-attention only.")
        n, length, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        dim_head = q.shape[-1] // heads
        q, k, v = (x.view(n, length, heads, dim_head).transpose(1, 2) for x in (q, k, v))
        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        if self.use_jvp_flash and _flash_fits(q):
            if mask is not None:  # the kernel takes a full (N, heads, L, L) mask
                mask = mask.expand(n, heads, length, length)
            out = _JVPAttn.fwd_dual(q, k, v, attn_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(n, length, heads * dim_head)
        return attn.to_out[1](attn.to_out[0](out))


def sinusoidal_embedding(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(N,) values -> (N, dim) [cos, sin] features at frequencies 1 ... 1/max_period, in the dtype of ``x``.

    (diffusers' ``Timesteps`` computes in float32 whatever the input; float64 keeps finite-difference checks exact.)
    """
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(max_period, dtype=x.dtype)) * torch.arange(half, dtype=x.dtype) / half)
    args = x[:, None] * freqs.to(x.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TemporalConv(nn.Module):
    """Residual temporal convolution: per-frame GroupNorm -> SiLU -> Conv along time (kernel 3), padded frames as zeros.

    ``forward(x (B*T, C, h, w), mask (B, T) float 0/1) -> (B*T, C, h, w)``.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        # A (3, 1) Conv2d over (time, pixels): the same operator as a (3, 1, 1) Conv3d, but on the fast CPU path.
        self.conv = nn.Conv2d(channels, channels, kernel_size=(3, 1), padding=(1, 0))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t = mask.shape
        bt, c, hh, ww = x.shape
        h = F.silu(self.norm(x)).permute(0, 2, 3, 1).reshape(b, t, hh * ww, c)  # no copy when channels-last
        h = self.conv((h * mask[:, :, None, None]).permute(0, 3, 1, 2))  # (B, C, T, h*w)
        return x + h.permute(0, 2, 3, 1).reshape(bt, hh, ww, c).permute(0, 3, 1, 2)


class SpatioTemporalTransformer(nn.Module):
    """``layers`` x (spatial self-attention block, temporal self-attention block), with GroupNorm + linear in/out.

    ``forward(x (B*T, C, h, w), key_mask (B*h*w, T) bool or None, frames T) -> (B*T, C, h, w)``.
    """

    def __init__(self, channels: int, layers: int, head_dim: int, groups: int, max_frames: int, temporal_ff_mult: int):
        super().__init__()
        heads = max(channels // head_dim, 1)
        self.norm = nn.GroupNorm(groups, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.spatial = nn.ModuleList(
            BasicTransformerBlock(channels, heads, channels // heads, activation_fn="geglu") for _ in range(layers)
        )
        self.temporal = nn.ModuleList(
            BasicTransformerBlock(
                channels,
                heads,
                channels // heads,
                activation_fn="geglu",
                positional_embeddings="sinusoidal",
                num_positional_embeddings=max_frames,
                ff_inner_dim=temporal_ff_mult * channels,
            )
            for _ in range(layers)
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, frames: int) -> torch.Tensor:
        bt, c, hh, ww = x.shape
        b = bt // frames
        s = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(bt, hh * ww, c))
        for spatial, temporal in zip(self.spatial, self.temporal):
            s = spatial(s)  # (B*T, h*w, C): attention within each frame
            s = s.view(b, frames, hh * ww, c).transpose(1, 2).reshape(b * hh * ww, frames, c)
            s = temporal(s, attention_mask=key_mask)  # (B*h*w, T, C): attention across frames
            s = s.view(b, hh * ww, frames, c).transpose(1, 2).reshape(bt, hh * ww, c)
        s = self.proj_out(s)
        return x + s.view(bt, hh, ww, c).permute(0, 3, 1, 2)


class _Stage(nn.Module):
    """One residual block + temporal conv + optional spatio-temporal transformer (a "layer" of a U-Net level)."""

    def __init__(self, cin: int, cout: int, temb: int, cfg: UNetConfig, n_transformer: int):
        super().__init__()
        g = cfg.norm_num_groups
        self.resnet = ResnetBlock2D(
            in_channels=cin, out_channels=cout, temb_channels=temb, groups=g, time_embedding_norm="scale_shift"
        )
        self.temporal = TemporalConv(cout, g)
        self.transformer = (
            SpatioTemporalTransformer(
                cout, n_transformer, cfg.attention_head_dim, g, cfg.max_frames, cfg.temporal_ff_mult
            )
            if n_transformer
            else None
        )

    def forward(self, x, temb, mask, key_mask, frames):
        x = self.temporal(self.resnet(x, temb), mask)
        if self.transformer is not None:
            x = self.transformer(x, key_mask, frames)
        return x


class EchoVelocityUNet(ModelMixin, ConfigMixin):
    """Conditional spatio-temporal U-Net predicting the (average) velocity of a latent echo video.

    See the module docstring for the call signature, the conditioning and the padding guarantees.
    Build from a preset with ``EchoVelocityUNet.from_preset("demo")``; save / load with ``save_pretrained`` /
    ``from_pretrained`` (safetensors + config.json).
    """

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (128, 128, 256, 256),
        layers_per_block: int = 2,
        transformer_layers_per_block: tuple[int, ...] = (1, 1, 2, 2),
        attention_head_dim: int = 32,
        norm_num_groups: int = 32,
        patch_size: int = 1,
        max_frames: int = 32,
        temporal_ff_mult: int = 2,
        time_scale: float = 100.0,
        upsample_conv: bool = True,
        latent_channels: int = LATENT_CHANNELS,
        sample_size: int = 28,
        ef_scale: float = 1.0,
        context_channels: int = 0,
        displacement_channels: int = 0,
    ):
        super().__init__()
        cfg = UNetConfig(
            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
            transformer_layers_per_block=tuple(transformer_layers_per_block), attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups, patch_size=patch_size, max_frames=max_frames,
            temporal_ff_mult=temporal_ff_mult, time_scale=time_scale, upsample_conv=upsample_conv,
            latent_channels=latent_channels, sample_size=sample_size, ef_scale=ef_scale,
            context_channels=context_channels, displacement_channels=displacement_channels,
        )
        if len(cfg.transformer_layers_per_block) != len(cfg.block_out_channels):
            raise ValueError(
                f"transformer_layers_per_block has {len(cfg.transformer_layers_per_block)} entries but "
                f"block_out_channels has {len(cfg.block_out_channels)}; give one per level."
            )
        if patch_size not in (1, 2):
            raise ValueError(f"patch_size must be 1 or 2; got {patch_size}.")
        if any(c % norm_num_groups for c in cfg.block_out_channels):
            raise ValueError(f"Every block width must be divisible by norm_num_groups={norm_num_groups}.")
        chans = list(cfg.block_out_channels)
        c0 = chans[0]
        temb = 4 * c0
        p2 = patch_size * patch_size

        # Embeddings of t, of the interval h = t - r, and of the EF (sinusoidal + MLP), summed.
        self.t_embedding = TimestepEmbedding(c0, temb)
        self.h_embedding = TimestepEmbedding(c0, temb)
        self.ef_embedding = TimestepEmbedding(c0, temb)
        self.null_ef = nn.Parameter(torch.randn(temb) * 0.02)

        if context_channels not in (0, latent_channels):
            raise ValueError(f"context_channels must be 0 or {latent_channels} (the anchor latents); "
                             f"got {context_channels}.")
        self.conv_in = nn.Conv2d((2 * latent_channels + 1 + context_channels) * p2, c0, 3, padding=1)
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skips = [c0]
        cin = c0
        for i, cout in enumerate(chans):
            level = nn.ModuleList()
            for _ in range(layers_per_block):
                level.append(_Stage(cin, cout, temb, cfg, cfg.transformer_layers_per_block[i]))
                cin = cout
                skips.append(cout)
            self.down.append(level)
            if i < len(chans) - 1:
                self.downsamplers.append(Downsample2D(cout, use_conv=True, padding=1, name="op"))
                skips.append(cout)
        self.mid = nn.ModuleList(
            [
                _Stage(cin, cin, temb, cfg, max(cfg.transformer_layers_per_block[-1], 1)),
                _Stage(cin, cin, temb, cfg, 0),
            ]
        )
        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i, cout in reversed(list(enumerate(chans))):
            level = nn.ModuleList()
            for _ in range(layers_per_block + 1):
                level.append(_Stage(cin + skips.pop(), cout, temb, cfg, cfg.transformer_layers_per_block[i]))
                cin = cout
            self.up.append(level)
            if i > 0:
                self.upsamplers.append(Upsample2D(cout, use_conv=upsample_conv))
        self.norm_out = nn.GroupNorm(norm_num_groups, c0)
        if displacement_channels not in (0, 2):
            raise ValueError(f"displacement_channels must be 0 or 2; got {displacement_channels}.")
        self.conv_out = nn.Conv2d(c0, (latent_channels + displacement_channels) * p2, 3, padding=1)
        self.set_jvp_flash(True)

    @classmethod
    def from_preset(cls, name: str | UNetConfig, **overrides) -> EchoVelocityUNet:
        """A freshly initialised network of preset ``name`` (or a :class:`UNetConfig`), fields overridable."""
        cfg = unet_preset(name) if isinstance(name, str) else name
        return cls(**{**asdict(cfg), **overrides})

    def set_jvp_flash(self, enabled: bool) -> None:
        """Use jvp-flash-attention on CUDA where possible (``True``, default) or always SDPA (``False``)."""
        for module in self.modules():
            if isinstance(module, BasicTransformerBlock):
                module.attn1.set_processor(EchoAttnProcessor(use_jvp_flash=enabled))

    def _embed(self, t, h, ef, ef_drop, dtype):
        c0, scale = self.config.block_out_channels[0], self.config.time_scale
        emb = self.t_embedding(sinusoidal_embedding(t.to(dtype) * scale, c0))
        emb = emb + self.h_embedding(sinusoidal_embedding(h.to(dtype) * scale, c0))
        e = self.ef_embedding(sinusoidal_embedding(ef.to(dtype) * self.config.ef_scale, c0))
        if ef_drop is not None:
            e = torch.where(ef_drop[:, None], self.null_ef.to(dtype)[None], e)
        return emb + e

    def _check(self, z, t, h, ef, cond, frame_mask, ef_drop, context):
        c = self.config.latent_channels
        if z.ndim != 5 or z.shape[1] != c:
            raise ValueError(f"z must be (B, {c}, T, h, w); got shape {tuple(z.shape)}.")
        b, _, frames, hh, ww = z.shape
        if frames > self.config.max_frames:
            raise ValueError(f"The network handles at most {self.config.max_frames} frames; got {frames}.")
        if hh % self.config.patch_size or ww % self.config.patch_size:
            raise ValueError(f"Latent height and width must be divisible by patch_size={self.config.patch_size}.")
        if cond.shape != z.shape:
            raise ValueError(f"cond must have the shape of z {tuple(z.shape)}; got {tuple(cond.shape)}.")
        if self.config.context_channels and (context is None or context.shape != z.shape):
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"This network takes a context of the shape of z {tuple(z.shape)}; got {got}.")
        if not self.config.context_channels and context is not None:
            raise ValueError("This network takes no context (context_channels = 0).")
        if frame_mask.shape != (b, frames) or frame_mask.dtype != torch.bool:
            raise ValueError(
                f"frame_mask must be bool ({b}, {frames}); got {frame_mask.dtype} {tuple(frame_mask.shape)}.")
        for name, v in (("t", t), ("h", h), ("ef", ef)):
            if v.shape != (b,):
                raise ValueError(f"{name} must have shape ({b},); got {tuple(v.shape)}.")
        if ef_drop is not None and (ef_drop.shape != (b,) or ef_drop.dtype != torch.bool):
            raise ValueError(f"ef_drop must be bool ({b},); got {ef_drop.dtype} {tuple(ef_drop.shape)}.")

    def forward(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        h: torch.Tensor,
        ef: torch.Tensor,
        cond: torch.Tensor,
        frame_mask: torch.Tensor,
        ef_drop: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Average velocity (B, 4, T, h, w); see the module docstring for the arguments."""
        self._check(z, t, h, ef, cond, frame_mask, ef_drop, context)
        b, _, frames, hh, ww = z.shape
        p = self.config.patch_size
        dtype = self.conv_in.weight.dtype
        mask = frame_mask.to(dtype)
        emb = self._embed(t, h, ef, ef_drop, dtype)
        emb = emb.repeat_interleave(frames, dim=0)  # (B*T, temb): one embedding per frame

        parts = [z.to(dtype), cond.to(dtype), mask[:, None, :, None, None].expand(b, 1, frames, hh, ww)]
        if context is not None:
            parts.append(context.to(dtype))
        x = torch.cat(parts, 1).transpose(1, 2).reshape(b * frames, -1, hh, ww)  # (B*T, 9 or 13, h, w)
        if p > 1:
            x = F.pixel_unshuffle(x, p)
        if self.conv_in.weight.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1:
            x = x.contiguous(memory_format=torch.channels_last)  # the model was put in channels-last (fast on CPU)
        # Temporal attention key mask per pixel sequence; None when no clip in the batch is padded.
        all_real = bool(frame_mask.all())

        def key_mask(x_):
            if all_real:
                return None
            return frame_mask.repeat_interleave(x_.shape[-2] * x_.shape[-1], dim=0)

        x = self.conv_in(x)
        skips = [x]
        for i, level in enumerate(self.down):
            km = key_mask(x)
            for stage in level:
                x = stage(x, emb, mask, km, frames)
                skips.append(x)
            if i < len(self.downsamplers):
                x = self.downsamplers[i](x)
                skips.append(x)
        km = key_mask(x)
        for stage in self.mid:
            x = stage(x, emb, mask, km, frames)
        for i, level in enumerate(self.up):
            km = key_mask(x)
            for stage in level:
                x = stage(torch.cat([x, skips.pop()], 1), emb, mask, km, frames)
            if i < len(self.upsamplers):
                x = self.upsamplers[i](x, output_size=skips[-1].shape[-2:])
        x = self.conv_out(F.silu(self.norm_out(x)))
        if p > 1:
            x = F.pixel_shuffle(x, p)
        return x.reshape(b, frames, -1, hh, ww).transpose(1, 2)
