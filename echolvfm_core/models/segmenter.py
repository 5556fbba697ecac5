"""Frame-wise 2D U-Net that labels apical four-chamber echo frames (bg, LV cavity, myocardium, left atrium).

Built from diffusers' UNet blocks (``DownBlock2D`` / ``UNetMidBlock2D`` / ``UpBlock2D``) without a time embedding.
With ``stem_stride=2`` the U-Net runs at half resolution and a light full-resolution head restores the boundary
detail (it sees the upsampled features and a shallow full-resolution feature map of the input), which keeps a
32-frame loop well under a second on two CPU cores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d_blocks import DownBlock2D, UNetMidBlock2D, UpBlock2D
from torch import nn

__all__ = ["LVSegmenter", "SegmenterConfig", "segmenter_preset", "SEGMENTER_PRESETS", "CLASS_NAMES"]

#: Output channel order (CAMUS label values).
CLASS_NAMES = ("background", "lv", "myo", "la")


@dataclass(frozen=True)
class SegmenterConfig:
    """Constructor arguments of :class:`LVSegmenter` (also what ``config.json`` stores)."""

    block_out_channels: tuple[int, ...] = (16, 32, 64, 96)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    stem_stride: int = 2
    head_channels: int = 8
    in_channels: int = 1
    num_classes: int = 4
    sample_size: int = 112


#: Size presets: ``demo`` (bundled; fast on CPU) and ``tiny`` (tests).
SEGMENTER_PRESETS = {
    "demo": SegmenterConfig(),
    "tiny": SegmenterConfig(block_out_channels=(8, 16), norm_num_groups=4, head_channels=8),
}


def segmenter_preset(name: str) -> SegmenterConfig:
    """The :class:`SegmenterConfig` of preset ``name`` ("demo" or "tiny")."""
    if name not in SEGMENTER_PRESETS:
        raise ValueError(f"Unknown segmenter preset {name!r}; choose one of {sorted(SEGMENTER_PRESETS)}.")
    return SEGMENTER_PRESETS[name]


class LVSegmenter(ModelMixin, ConfigMixin):
    """Per-frame semantic segmentation network.

    ``forward(frames)``: frames float (B, 1, H, W) with grey levels in [0, 1] (H, W divisible by
    ``stem_stride * 2 ** (len(block_out_channels) - 1)``) -> logits (B, num_classes, H, W).
    """

    @register_to_config
    def __init__(
        self,
        block_out_channels: tuple[int, ...] = (16, 32, 64, 96),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        stem_stride: int = 2,
        head_channels: int = 8,
        in_channels: int = 1,
        num_classes: int = 4,
        sample_size: int = 112,
    ):
        super().__init__()
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2; got {stem_stride}.")
        if len(block_out_channels) < 2:
            raise ValueError("block_out_channels needs at least two levels.")
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, stride=stem_stride, padding=1)

        self.down_blocks = nn.ModuleList()
        for i, out_ch in enumerate(chans):
            self.down_blocks.append(
                DownBlock2D(
                    in_channels=chans[i - 1] if i else chans[0],
                    out_channels=out_ch,
                    temb_channels=None,
                    num_layers=layers_per_block,
                    resnet_groups=norm_num_groups,
                    add_downsample=i < len(chans) - 1,
                )
            )
        self.mid_block = UNetMidBlock2D(
            in_channels=chans[-1], temb_channels=None, resnet_groups=norm_num_groups, add_attention=False
        )
        self.up_blocks = nn.ModuleList()
        rev = chans[::-1]
        for i, out_ch in enumerate(rev):
            # one skip per level (the last resnet output before that level downsamples), fed to each of its resnets
            self.up_blocks.append(
                UpBlock2D(
                    in_channels=out_ch,
                    prev_output_channel=rev[i - 1] if i else rev[0],
                    out_channels=out_ch,
                    temb_channels=None,
                    num_layers=layers_per_block,
                    resnet_groups=norm_num_groups,
                    add_upsample=False,  # nearest-neighbour upsampling in forward(); the next resnet convolves
                )
            )
        self.norm_out = nn.GroupNorm(norm_num_groups, chans[0])
        if stem_stride == 1:
            self.skip_in = None
            self.conv_out = nn.Conv2d(chans[0], num_classes, 3, padding=1)
        else:
            self.skip_in = nn.Conv2d(in_channels, head_channels, 3, padding=1)
            self.head = nn.Sequential(
                nn.Conv2d(chans[0] + head_channels, head_channels, 3, padding=1),
                nn.SiLU(),
            )
            self.conv_out = nn.Conv2d(head_channels, num_classes, 1)

    @property
    def multiple(self) -> int:
        """Input height and width must be divisible by this number."""
        return self.config.stem_stride * 2 ** (len(self.config.block_out_channels) - 1)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if frames.ndim != 4 or frames.shape[1] != self.config.in_channels:
            raise ValueError(
                f"LVSegmenter expects frames (B, {self.config.in_channels}, H, W); got {tuple(frames.shape)}."
            )
        h, w = frames.shape[-2:]
        if h % self.multiple or w % self.multiple:
            raise ValueError(f"LVSegmenter needs H and W divisible by {self.multiple}; got {h} x {w}.")
        x = 2.0 * frames - 1.0
        sample = self.conv_in(x)
        skips = []
        for block in self.down_blocks:
            sample, res = block(sample)
            skips.append(res[len(block.resnets) - 1])
        sample = self.mid_block(sample)
        for i, block in enumerate(self.up_blocks):
            if i:
                sample = F.interpolate(sample, scale_factor=2.0, mode="nearest")
            sample = block(sample, (skips.pop(),) * len(block.resnets))
        sample = F.silu(self.norm_out(sample))
        if self.skip_in is None:
            return self.conv_out(sample)
        sample = F.interpolate(sample, size=(h, w), mode="bilinear", align_corners=False)
        sample = self.head(torch.cat([sample, F.silu(self.skip_in(x))], dim=1))
        return self.conv_out(sample)

    @torch.no_grad()
    def predict(self, frames: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Labels of a frame stack: frames float (T, H, W) in [0, 1] -> int64 (T, H, W) with values 0..3."""
        if frames.ndim != 3:
            raise ValueError(f"LVSegmenter.predict expects frames (T, H, W); got {tuple(frames.shape)}.")
        out = []
        for chunk in frames.split(batch_size):
            x = chunk[:, None].to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
            out.append(self(x).argmax(1))
        return torch.cat(out).cpu()
