"""Conditional noise-prediction network for diffusion regression of the ejection fraction (MCSDR style).

The diffused variable is the z-scored EF, ``y = (EF - ef_mean) / ef_std`` with the training labels' mean and standard
deviation stored in the config. The network predicts the noise ``eps`` of ``y_t = sqrt(abar_t) y + sqrt(1 - abar_t)
eps`` (Ho et al., "Denoising Diffusion Probabilistic Models", NeurIPS 2020, eq. 14), conditioned on features of the
echo clip from a video backbone and, when known, age and sex. Missing age or sex use learned null embeddings
(trained by modality dropout), in the spirit of multimodal conditional score-based diffusion regression.

The encoder runs once per clip (:meth:`EFDenoiser.encode`); the denoiser (:meth:`EFDenoiser.forward`) is a small MLP
that is cheap to call for many trajectories and steps with the same features.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .jepa import JEPAClipEncoder, JEPAConfig
from .video_encoder import VideoEncoder

__all__ = ["EFDenoiser", "EFDenoiserConfig", "ef_denoiser_preset", "EF_DENOISER_PRESETS", "SEX_CODES", "BACKBONES"]

#: Video backbones: a small (2+1)D CNN trained with the denoiser, or an EchoJEPA ViT (self-supervised, frozen).
BACKBONES = ("r2plus1d", "jepa")

#: Sex codes used by :meth:`EFDenoiser.forward`; -1 means unknown.
SEX_CODES = {"F": 0, "M": 1}

#: Age normalisation (years): ``(age - 60) / 20``.
_AGE_CENTRE, _AGE_SCALE = 60.0, 20.0


@dataclass(frozen=True)
class EFDenoiserConfig:
    """Constructor arguments of :class:`EFDenoiser` (also what ``config.json`` stores).

    ``backbone`` "r2plus1d" uses ``encoder_channels`` / ``temporal_strides``; "jepa" uses ``jepa`` (the
    :class:`~echolvfm_core.models.jepa.JEPAConfig` fields of the encoder, whose clip shape must be
    ``num_frames`` x ``frame_size``, and optionally ``motion``: pool the tokens' change over the clip, see
    :class:`~echolvfm_core.models.jepa.JEPAClipEncoder`) and ``frozen_backbone``. ``label_classes`` > 0 gives the
    (2+1)D encoder its training-only label heads (:class:`~echolvfm_core.models.video_encoder.VideoEncoder`);
    ``area_features`` also feeds the statistics of the label areas over the clip to the features (heads used at
    inference too).
    ``spread_scale`` widens (> 1) or narrows the posterior draws about their mean at inference; training sets it on
    held-out patients (:func:`~echolvfm_core.estimators.ef_posterior.conformal_spread_scale`), 1 = the raw draws.
    """

    num_frames: int = 16
    frame_size: int = 56
    encoder_channels: tuple[int, ...] = (16, 32, 64, 128)
    temporal_strides: tuple[int, ...] = (1, 1, 1, 2)
    feature_dim: int = 128
    hidden_dim: int = 128
    num_blocks: int = 3
    ef_mean: float = 55.0
    ef_std: float = 12.0
    backbone: str = "r2plus1d"
    jepa: dict | None = field(default=None)
    frozen_backbone: bool = True
    label_classes: int = 0
    area_features: bool = False
    spread_scale: float = 1.0


#: Size presets: ``demo`` (bundled) and ``tiny`` (tests).
EF_DENOISER_PRESETS = {
    "demo": EFDenoiserConfig(),
    "tiny": EFDenoiserConfig(
        num_frames=8, frame_size=32, encoder_channels=(8, 16), temporal_strides=(1, 2), feature_dim=32,
        hidden_dim=32, num_blocks=1,
    ),
}


def ef_denoiser_preset(name: str) -> EFDenoiserConfig:
    """The :class:`EFDenoiserConfig` of preset ``name`` ("demo" or "tiny")."""
    if name not in EF_DENOISER_PRESETS:
        raise ValueError(f"Unknown EF denoiser preset {name!r}; choose one of {sorted(EF_DENOISER_PRESETS)}.")
    return EF_DENOISER_PRESETS[name]


class _FiLMBlock(nn.Module):
    """Residual MLP block whose normalised input is scaled and shifted by the conditioning vector."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.film = nn.Linear(dim, 2 * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.SiLU(), nn.Linear(2 * dim, dim))

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(cond).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class EFDenoiser(ModelMixin, ConfigMixin):
    """Video encoder + conditional noise predictor over the z-scored EF.

    Shapes: video (B, 1, num_frames, frame_size, frame_size) in [0, 1]; features (B, feature_dim); sample and
    timestep (B,); age (B,) in years with NaN for unknown; sex (B,) int64 with 0 = F, 1 = M, -1 = unknown.
    """

    @register_to_config
    def __init__(
        self,
        num_frames: int = 16,
        frame_size: int = 56,
        encoder_channels: tuple[int, ...] = (16, 32, 64, 128),
        temporal_strides: tuple[int, ...] = (1, 1, 1, 2),
        feature_dim: int = 128,
        hidden_dim: int = 128,
        num_blocks: int = 3,
        ef_mean: float = 55.0,
        ef_std: float = 12.0,
        backbone: str = "r2plus1d",
        jepa: dict | None = None,
        frozen_backbone: bool = True,
        label_classes: int = 0,
        area_features: bool = False,
        spread_scale: float = 1.0,
    ):
        super().__init__()
        if not ef_std > 0:
            raise ValueError(f"ef_std must be positive; got {ef_std}.")
        if not spread_scale > 0:
            raise ValueError(f"spread_scale must be positive; got {spread_scale}.")
        if backbone == "r2plus1d":
            self.encoder = VideoEncoder(tuple(encoder_channels), feature_dim, tuple(temporal_strides), label_classes,
                                        area_features)
        elif backbone == "jepa":
            if label_classes or area_features:
                raise ValueError("label_classes and area_features apply to the r2plus1d backbone only.")
            if not jepa:
                raise ValueError("backbone 'jepa' needs the encoder's configuration (jepa=...).")
            vit = JEPAConfig(**{k: v for k, v in jepa.items() if k in JEPAConfig.__dataclass_fields__})
            if (vit.num_frames, vit.frame_size) != (num_frames, frame_size):
                raise ValueError(f"the JEPA encoder takes {vit.num_frames} x {vit.frame_size} clips; the denoiser is "
                                 f"configured for {num_frames} x {frame_size}.")
            self.encoder = JEPAClipEncoder(vit, feature_dim, frozen=frozen_backbone, motion=bool(jepa.get("motion")))
        else:
            raise ValueError(f"Unknown backbone {backbone!r}; choose one of {BACKBONES}.")
        # Point estimate of the z-scored EF from the features: an auxiliary training target that speeds up the
        # encoder's learning; the posterior itself comes from the diffusion model only.
        self.aux_head = nn.Linear(feature_dim, 1)
        self.time_proj = Timesteps(64, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(64, hidden_dim)
        self.feature_proj = nn.Linear(feature_dim, hidden_dim)
        self.age_proj = nn.Sequential(nn.Linear(1, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.age_null = nn.Parameter(torch.zeros(hidden_dim))
        self.sex_embed = nn.Embedding(3, hidden_dim)  # 0 F, 1 M, 2 unknown (learned null)
        self.input_proj = nn.Linear(1, hidden_dim)
        self.blocks = nn.ModuleList(_FiLMBlock(hidden_dim) for _ in range(num_blocks))
        self.out = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, 1))

    # ------------------------------------------------------------------------------------------ EF scaling
    def normalise(self, ef: torch.Tensor) -> torch.Tensor:
        """EF in % -> z-score with the training labels' mean and sd."""
        return (ef - self.config.ef_mean) / self.config.ef_std

    def denormalise(self, z: torch.Tensor) -> torch.Tensor:
        """z-score -> EF in %."""
        return z * self.config.ef_std + self.config.ef_mean

    # ------------------------------------------------------------------------------------------ networks
    def encode(self, video: torch.Tensor, maps: bool = False):
        """Clip features: video (B, 1, num_frames, frame_size, frame_size) in [0, 1] -> (B, feature_dim); with
        ``maps`` (training, ``label_classes`` > 0) also the encoder's label logits and areas."""
        c = self.config
        expected = (1, c.num_frames, c.frame_size, c.frame_size)
        if video.ndim != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(
                f"EFDenoiser.encode expects video (B, {', '.join(map(str, expected))}); got {tuple(video.shape)}.")
        return self.encoder(video, maps=True) if maps else self.encoder(video)

    def condition(
        self, features: torch.Tensor, age: torch.Tensor | None = None, sex: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Conditioning vector (B, hidden_dim) from features, age (NaN = unknown) and sex (-1 = unknown)."""
        b = features.shape[0]
        cond = self.feature_proj(features)
        if age is None:
            age = torch.full((b,), float("nan"), device=features.device)
        if sex is None:
            sex = torch.full((b,), -1, dtype=torch.long, device=features.device)
        if age.shape != (b,) or sex.shape != (b,):
            raise ValueError(f"age and sex must be (B,) = ({b},); got {tuple(age.shape)} and {tuple(sex.shape)}.")
        known = torch.isfinite(age)
        age_in = torch.where(known, (age - _AGE_CENTRE) / _AGE_SCALE, torch.zeros_like(age))
        age_emb = torch.where(known[:, None], self.age_proj(age_in[:, None].to(cond.dtype)),
                              self.age_null.to(cond.dtype))
        sex_idx = torch.where(sex < 0, torch.full_like(sex, 2), sex)
        return cond + age_emb + self.sex_embed(sex_idx)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        features: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        age: torch.Tensor | None = None,
        sex: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted noise (B,) of the noisy z-scored EF ``sample`` (B,) at integer ``timestep`` (B,) or (1,).

        Pass either ``features`` (with optional ``age`` / ``sex``) or a precomputed ``cond`` from
        :meth:`condition`. ``cond`` (and ``timestep``) may have batch 1 and are then shared by all B samples: the
        sampler denoises many trajectories of one clip this way, computing the conditioning once per step.
        """
        if (features is None) == (cond is None):
            raise ValueError("EFDenoiser.forward needs exactly one of features or cond.")
        if cond is None:
            cond = self.condition(features, age, sex)
        b = sample.shape[0]
        if sample.ndim != 1 or cond.shape[0] not in (1, b):
            raise ValueError(f"sample must be (B,) with B = cond's batch ({cond.shape[0]}) or any B for batch-1 cond; "
                             f"got {tuple(sample.shape)}.")
        timestep = timestep.reshape(-1)
        if timestep.shape[0] not in (1, b):
            raise ValueError(f"timestep must be (B,) = ({b},) or (1,); got {tuple(timestep.shape)}.")
        if timestep.shape[0] != cond.shape[0]:
            timestep = timestep.expand(b)
            cond = cond.expand(b, -1)
        temb = self.time_embed(self.time_proj(timestep).to(cond.dtype))
        c = nn.functional.silu(temb + cond)  # (1 or B, hidden_dim)
        h = self.input_proj(sample[:, None].to(cond.dtype))
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)[:, 0]
