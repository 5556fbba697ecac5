"""A small (2+1)D convolutional video encoder: an echo clip -> one feature vector.

Each residual block factorises a 3 x 3 x 3 convolution into a spatial 1 x 3 x 3 and a temporal 3 x 1 x 1
convolution (Tran et al., "A Closer Look at Spatiotemporal Convolutions for Action Recognition", CVPR 2018), which
keeps the clip encoder cheap enough for CPU training. It is a plain ``nn.Module``; the EF denoiser owns it and saves
its configuration.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["VideoEncoder", "R2Plus1DBlock", "area_statistics"]


def _groups(channels: int) -> int:
    for g in (8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class R2Plus1DBlock(nn.Module):
    """Residual (2+1)D block: (B, C_in, T, H, W) -> (B, C_out, T / st, H / ss, W / ss)."""

    def __init__(self, in_channels: int, out_channels: int, spatial_stride: int = 1, temporal_stride: int = 1):
        super().__init__()
        s, t = spatial_stride, temporal_stride
        self.spatial1 = nn.Conv3d(in_channels, out_channels, (1, 3, 3), stride=(1, s, s), padding=(0, 1, 1), bias=False)
        self.temporal1 = nn.Conv3d(out_channels, out_channels, (3, 1, 1), stride=(t, 1, 1), padding=(1, 0, 0),
                                   bias=False)
        self.norm1 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.spatial2 = nn.Conv3d(out_channels, out_channels, (1, 3, 3), padding=(0, 1, 1), bias=False)
        self.temporal2 = nn.Conv3d(out_channels, out_channels, (3, 1, 1), padding=(1, 0, 0), bias=False)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.act = nn.SiLU()
        if in_channels != out_channels or s != 1 or t != 1:
            self.shortcut = nn.Sequential(
                nn.Conv3d(in_channels, out_channels, 1, stride=(t, s, s), bias=False),
                nn.GroupNorm(_groups(out_channels), out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(self.temporal1(self.spatial1(x))))
        h = self.norm2(self.temporal2(self.spatial2(h)))
        return self.act(h + self.shortcut(x))


def area_statistics(logits: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Label logits (B, K, T, h, w), class 0 background and class 1 the LV cavity -> (B, 2 (K - 1) + 1): the log of
    the largest and of the smallest share of the frame each foreground class covers over the clip, then the LV
    cavity's area-length-like EF ``1 - (min / max) ** 1.5``."""
    share = logits.float().softmax(dim=1).mean(dim=(3, 4))[:, 1:]  # (B, K - 1, T)
    hi, lo = share.amax(dim=2), share.amin(dim=2)
    ef = 1.0 - (lo[:, 0] / hi[:, 0].clamp_min(eps)).clamp(0.0, 1.0) ** 1.5
    return torch.cat([hi.clamp_min(eps).log(), lo.clamp_min(eps).log(), ef[:, None]], dim=1).to(logits.dtype)


class VideoEncoder(nn.Module):
    """Clip encoder.

    ``forward(video)``: video float (B, 1, T, H, W), grey levels in [0, 1] -> features float (B, feature_dim).
    The stem sees each frame and its deviation from the clip's mean frame; the head pools space, then takes the
    temporal mean and standard deviation of every channel.

    With ``label_classes`` > 0 the encoder also has two training-only heads (``forward(video, maps=True)``): per-frame
    label logits from the second stage (a 1 x 1 convolution, 1/4 of the input side) and the share of the image each
    label covers at every time step of the last stage (a linear map of its spatially pooled features, the same
    features the clip vector is made of). Supervising them with the loops' labels teaches the encoder where the
    ventricle is and how its area changes, which a scalar EF label alone teaches slowly.

    With ``area_features`` (needs the label heads) the label logits are also used at inference: the share of the
    image each label covers in every frame (softmax probabilities averaged over the frame) is summarised by its
    largest and smallest value over the clip (log scale), plus ``1 - (min / max) ** 1.5`` of the LV cavity (the EF
    that area-length gives when the long axis scales with the square root of the area); a small MLP of these
    statistics is added to the clip features. The summary is what the area-length EF is made of, so the EF
    posterior sees the cavity's change directly instead of only through pooled texture features.

    Args:
        channels: output channels of the stem and of each stage; every stage after the first halves H and W,
            stages listed in ``temporal_strides`` (by index) also halve T.
        feature_dim: size of the output vector.
        temporal_strides: per stage, 1 or 2.
        label_classes: number of label classes of the training-only heads (0: no heads).
        area_features: add the label-area statistics to the features (needs ``label_classes`` >= 2).
    """

    def __init__(
        self,
        channels: tuple[int, ...] = (16, 32, 64, 128),
        feature_dim: int = 128,
        temporal_strides: tuple[int, ...] = (1, 1, 1, 2),
        label_classes: int = 0,
        area_features: bool = False,
    ):
        super().__init__()
        if area_features and label_classes < 2:
            raise ValueError("area_features needs the label heads (label_classes >= 2).")
        if len(temporal_strides) != len(channels):
            raise ValueError(
                f"temporal_strides needs one entry per stage ({len(channels)}); got {len(temporal_strides)}."
            )
        c0 = channels[0]
        self.stem = nn.Sequential(
            nn.Conv3d(2, c0, (1, 5, 5), stride=(1, 2, 2), padding=(0, 2, 2), bias=False),
            nn.GroupNorm(_groups(c0), c0),
            nn.SiLU(),
        )
        stages = []
        prev = c0
        for i, (c, t) in enumerate(zip(channels, temporal_strides)):
            stages.append(R2Plus1DBlock(prev, c, spatial_stride=1 if i == 0 else 2, temporal_stride=t))
            prev = c
        self.stages = nn.Sequential(*stages)
        self.proj = nn.Sequential(nn.LayerNorm(2 * prev), nn.Linear(2 * prev, feature_dim))
        if label_classes > 0:
            if len(channels) < 2:
                raise ValueError("the label heads need at least two stages.")
            self.label_head = nn.Conv3d(channels[1], label_classes, 1)
            self.area_head = nn.Linear(prev, label_classes)
        if area_features:
            n_stats = 2 * (label_classes - 1) + 1
            self.area_proj = nn.Sequential(nn.Linear(n_stats, feature_dim), nn.SiLU(),
                                           nn.Linear(feature_dim, feature_dim))

    def forward(self, video: torch.Tensor, maps: bool = False):
        """Clip features (B, feature_dim); with ``maps`` also label logits (B, K, T, H / 4, W / 4) and label areas
        (B, T', K), T' the last stage's length (``label_classes`` > 0 only)."""
        if video.ndim != 5 or video.shape[1] != 1:
            raise ValueError(f"VideoEncoder expects video (B, 1, T, H, W); got {tuple(video.shape)}.")
        if maps and not hasattr(self, "label_head"):
            raise ValueError("This encoder has no label heads (label_classes = 0).")
        # input channels: the frames and their deviation from the clip's mean frame (what moves: the walls)
        x = torch.cat([2.0 * video - 1.0, 4.0 * (video - video.mean(dim=2, keepdim=True))], dim=1)
        x = self.stem(x)
        logits = None
        want_logits = maps or hasattr(self, "area_proj")
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if want_logits and i == 1:
                logits = self.label_head(x)
        h = x.mean(dim=(3, 4))  # (B, C, T'): spatial average per time
        # temporal mean and standard deviation: the level of each feature and the amplitude of its change over the
        # cycle (how much the ventricle moves is what the EF measures)
        pooled = torch.cat([h.mean(dim=2), h.std(dim=2, unbiased=False)], dim=1)
        features = self.proj(pooled)
        if hasattr(self, "area_proj"):
            features = features + self.area_proj(area_statistics(logits))
        if not maps:
            return features
        return features, logits, self.area_head(h.transpose(1, 2))
