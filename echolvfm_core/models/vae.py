"""The latent codec: a frame-wise diffusers ``AutoencoderKL`` for grey echo frames, and :class:`EchoCodec` around it.

EchoLVFM works on normalised latents of a 4-channel, 4x-downsampling ("4f4") frame VAE: a (B, T, 112, 112) loop
becomes a (B, 4, T, 28, 28) latent video. :func:`build_vae` makes our own grey VAE from a typed
:class:`VAEConfig` (presets ``demo``, bundled, and ``tiny``, tests). :class:`EchoCodec` owns everything around the
network: the [0, 1] <-> [-1, 1] pixel convention, grey <-> RGB for 3-channel VAEs, the per-channel latent
normalisation and chunking over frames.

Latent statistics live in the VAE's own ``config.json`` as diffusers' ``latents_mean`` / ``latents_std`` fields
(one value per latent channel); normalised latents are ``(z - latents_mean) / latents_std`` with ``z`` the
posterior mean. A folder without them (e.g. a user's public VAE) falls back to ``shift_factor`` /
``scaling_factor`` (``(z - shift) * scale``) and :attr:`EchoCodec.stats_source` says so;
``echolvfm vae-stats --vae PATH --data PREPARED`` measures and writes the real ones.

The widths of the ``demo`` preset are set by the decode budget (a 32-frame loop in well under 200 ms on two CPU
cores, the slider's critical path), not by the 16 MiB file budget: the decoder's full-resolution stage dominates, so
it runs at 8 channels (about 120 M multiply-adds a frame); docs/benchmarks.md has the width / speed table.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

__all__ = [
    "VAEConfig",
    "VAE_PRESETS",
    "vae_preset",
    "build_vae",
    "LatentStats",
    "EchoCodec",
    "compute_latent_stats",
    "write_latent_stats",
    "evaluate_vae",
    "bench_codec",
]

log = logging.getLogger(__name__)

#: ITU-R BT.601 luma weights used to turn an RGB decoder output into grey.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of our grey frame VAE (the ``AutoencoderKL`` constructor arguments that we choose).

    Attributes:
        block_out_channels: widths of the encoder levels (the decoder mirrors them); ``len - 1`` downsamplings, so
            three levels give 4x (112 -> 28). ``block_out_channels[0]`` runs at full resolution in the decoder and
            dominates decode time.
        layers_per_block: resnets per encoder level (the decoder has one more per level).
        norm_num_groups: GroupNorm groups; must divide every width.
        latent_channels: channels of the latent.
        sample_size: frame side in pixels the model is trained at.
        mid_block_add_attention: self-attention in the 28 x 28 mid blocks (off: slow on CPU, little gain here).
    """

    block_out_channels: tuple[int, ...] = (8, 16, 16)
    layers_per_block: int = 1
    norm_num_groups: int = 4
    latent_channels: int = 4
    sample_size: int = 112
    mid_block_add_attention: bool = False

    def __post_init__(self) -> None:
        if len(self.block_out_channels) < 1:
            raise ValueError("block_out_channels needs at least one level.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"norm_num_groups={self.norm_num_groups} must divide every width; {bad} are not multiples.")

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor (2 ** (levels - 1))."""
        return 2 ** (len(self.block_out_channels) - 1)


#: Size presets: ``demo`` (bundled: decodes a 32-frame loop in ~0.1 s on two CPU cores) and ``tiny`` (tests).
VAE_PRESETS = {
    "demo": VAEConfig(),
    "tiny": VAEConfig(block_out_channels=(4, 8, 8), norm_num_groups=4),
}


def vae_preset(name: str) -> VAEConfig:
    """The :class:`VAEConfig` of preset ``name`` ("demo" or "tiny")."""
    if name not in VAE_PRESETS:
        raise ValueError(f"Unknown VAE preset {name!r}; choose one of {sorted(VAE_PRESETS)}.")
    return VAE_PRESETS[name]


def build_vae(config: str | VAEConfig = "demo") -> AutoencoderKL:
    """A freshly initialised grey (1 -> 1 channel) ``AutoencoderKL`` from a preset name or a :class:`VAEConfig`.

    ``scaling_factor`` is 1 and ``latents_mean`` / ``latents_std`` are left unset until statistics are computed
    (:func:`compute_latent_stats`).
    """
    cfg = vae_preset(config) if isinstance(config, str) else config
    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels),
        layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=cfg.norm_num_groups,
        sample_size=cfg.sample_size,
        scaling_factor=1.0,
        mid_block_add_attention=cfg.mid_block_add_attention,
    )


@dataclass(frozen=True)
class LatentStats:
    """Per-channel statistics of the posterior-mean latents (what normalisation subtracts and divides by).

    Attributes:
        mean, std: one value per latent channel.
        source: "measured" (``latents_mean`` / ``latents_std`` in the config), or "scaling_factor" (derived from
            ``shift_factor`` / ``scaling_factor``, not measured on echoes).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = "measured"

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std need one value per channel; got {len(self.mean)} and {len(self.std)}.")
        if not all(np.isfinite(self.mean)) or not all(s > 0 and np.isfinite(s) for s in self.std):
            raise ValueError(f"latent stats must be finite with std > 0; got mean {self.mean}, std {self.std}.")


def _vae_folder(path: Path) -> Path:
    """The folder holding the AutoencoderKL's config.json: ``path`` itself or its ``vae/`` (a pipeline folder)."""
    if (path / "config.json").is_file():
        return path
    if (path / "vae" / "config.json").is_file():
        return path / "vae"
    if not path.exists():
        raise FileNotFoundError(2, "no such VAE folder", str(path))
    raise ValueError(f"{path} is not a diffusers AutoencoderKL folder (no config.json in it or in its vae/ subfolder).")


def _stats_from_config(config) -> LatentStats:
    c = int(config.latent_channels)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    if mean is not None and std is not None:
        if len(mean) != c or len(std) != c:
            raise ValueError(
                f"latents_mean / latents_std in the VAE config need {c} values; got {len(mean)} / {len(std)}.")
        return LatentStats(tuple(float(v) for v in mean), tuple(float(v) for v in std), "measured")
    shift = float(config.get("shift_factor") or 0.0)
    scale = float(config.get("scaling_factor") or 1.0)
    return LatentStats((shift,) * c, (1.0 / scale,) * c, "scaling_factor")


class EchoCodec:
    """Encode grey echo loops to normalised latent videos and back, frame by frame.

    Args:
        vae: any diffusers ``AutoencoderKL`` with 1 or 3 input / output channels (3: grey is replicated to RGB on
            encode and the decoder's RGB is turned into luma, :data:`LUMA`).
        stats: latent normalisation; default read from the VAE config (see the module docstring).
        chunk_size: frames per network call in :meth:`encode` / :meth:`decode` (bounds memory; >= 1).

    The network is put in eval mode and in channels-last memory format (several times faster convolutions on CPU).
    """

    def __init__(self, vae: AutoencoderKL, stats: LatentStats | None = None, chunk_size: int = 64) -> None:
        if not isinstance(vae, AutoencoderKL):
            raise TypeError(f"EchoCodec wraps a diffusers AutoencoderKL; got {type(vae).__name__}.")
        cin, cout = int(vae.config.in_channels), int(vae.config.out_channels)
        if cin not in (1, 3) or cout not in (1, 3):
            raise ValueError(f"EchoCodec needs a VAE with 1 or 3 image channels; this one has {cin} in and {cout} out.")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1; got {chunk_size}.")
        self.vae = vae.eval().requires_grad_(False).to(memory_format=torch.channels_last)
        self.chunk_size = int(chunk_size)
        self.stats = stats if stats is not None else _stats_from_config(vae.config)
        if len(self.stats.mean) != self.latent_channels:
            raise ValueError(f"latent stats have {len(self.stats.mean)} channels; the VAE has {self.latent_channels}.")

    # ------------------------------------------------------------------------------------------------- properties
    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        """Spatial downsampling factor: 4 for a "4f4" VAE (112 -> 28), 8 for SD-style VAEs (112 -> 14)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_channels(self) -> int:
        """1 for a grey VAE, 3 for an RGB one."""
        return int(self.vae.config.in_channels)

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def stats_source(self) -> str:
        """"measured" when the normalisation was measured on echoes, else "scaling_factor"."""
        return self.stats.source

    def latent_shape(self, frames: int, size: int = 112) -> tuple[int, int, int, int]:
        """(C, T, h, w) of the latent of a ``frames`` x ``size`` x ``size`` loop."""
        return (self.latent_channels, frames, size // self.downsample, size // self.downsample)

    # ---------------------------------------------------------------------------------------------------- save/load
    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
        chunk_size: int = 64,
    ) -> EchoCodec:
        """Load a local diffusers ``AutoencoderKL`` folder (``path`` or ``path/vae``), ours or a user's.

        Args:
            path: folder with ``config.json`` and weights (safetensors or bin), or a pipeline folder with ``vae/``.
            device: default CPU.
            dtype: default float32.
        """
        folder = _vae_folder(Path(path))
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype or torch.float32)
        except (OSError, ValueError) as exc:
            raise ValueError(f"Could not load an AutoencoderKL from {folder}: {exc}".rstrip(".") + ".") from exc
        codec = cls(vae.to(device or "cpu"), chunk_size=chunk_size)
        if codec.stats_source != "measured":
            log.warning("%s has no measured latent statistics; using shift/scaling factors (run echolvfm vae-stats).",
                        folder)
        return codec

    def save_pretrained(self, path: str | Path) -> None:
        """Write the VAE (safetensors + config.json, with the latent stats in the config) to ``path``."""
        self._stats_into_config()
        self.vae.save_pretrained(str(path), safe_serialization=True)

    def set_stats(self, stats: LatentStats) -> None:
        """Use new latent statistics (and record them in the VAE config for the next save)."""
        if len(stats.mean) != self.latent_channels:
            raise ValueError(f"latent stats have {len(stats.mean)} channels; the VAE has {self.latent_channels}.")
        self.stats = stats
        self._stats_into_config()

    def _stats_into_config(self) -> None:
        if self.stats.source == "measured":
            self.vae.register_to_config(latents_mean=list(self.stats.mean), latents_std=list(self.stats.std))

    # ------------------------------------------------------------------------------------------------ encode/decode
    def _check_frames(self, frames: torch.Tensor) -> None:
        if not isinstance(frames, torch.Tensor) or frames.ndim != 4:
            shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
            raise ValueError(f"encode expects frames (B, T, H, W) as a tensor; got {shape}.")
        h, w = frames.shape[-2:]
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"Frame height and width must be divisible by {self.downsample}; got {h} x {w}.")
        if not frames.is_floating_point():
            raise ValueError(f"encode expects float frames in [0, 1]; got dtype {frames.dtype}.")
        if frames.numel() and (float(frames.min()) < 0.0 or float(frames.max()) > 1.0):
            raise ValueError(f"Frames must lie in [0, 1]; got [{float(frames.min()):.3g}, {float(frames.max()):.3g}].")

    def _norm(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.stats.mean, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.stats.std, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    def encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Posterior means of single frames: x (N, 1, H, W) in [0, 1] -> raw (unnormalised) z (N, C, h, w).

        Runs the network on whatever device the VAE is on, ``chunk_size`` frames at a time, without gradients.
        """
        out = []
        with torch.inference_mode():
            for chunk in x.split(self.chunk_size):
                c = chunk.to(self.device, self.dtype) * 2.0 - 1.0
                if self.image_channels == 3:
                    c = c.expand(-1, 3, -1, -1)
                c = c.contiguous(memory_format=torch.channels_last)
                out.append(self.vae.encode(c).latent_dist.mean.float())
        return torch.cat(out) if out else x.new_zeros(
            (0, self.latent_channels, *(s // self.downsample for s in x.shape[-2:])))

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) latents (N, C, h, w) -> grey frames (N, 1, H, W) in [0, 1] (float32, VAE device)."""
        out = []
        with torch.inference_mode():
            for chunk in z.split(self.chunk_size):
                c = chunk.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
                y = self.vae.decode(c).sample.float()
                if y.shape[1] == 3:
                    y = sum(w * y[:, i : i + 1] for i, w in enumerate(LUMA))
                out.append(((y + 1.0) * 0.5).clamp_(0.0, 1.0))
        if not out:
            return z.new_zeros((0, 1, *(s * self.downsample for s in z.shape[-2:])))
        return torch.cat(out).contiguous()

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """Loops to normalised latent videos (deterministic: posterior mean).

        Args:
            frames: (B, T, H, W) float grey levels in [0, 1]; H and W divisible by :attr:`downsample`.

        Returns:
            (B, C, T, H / d, W / d) float32 normalised latents, on the VAE's device.
        """
        self._check_frames(frames)
        b, t, h, w = frames.shape
        z = self.encode_frames(frames.reshape(b * t, 1, h, w))
        mean, std = self._norm(z)
        z = (z - mean) / std
        return z.view(b, t, *z.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latent videos back to loops.

        Args:
            latents: (B, C, T, h, w) normalised latents (C = :attr:`latent_channels`).

        Returns:
            (B, T, h * d, w * d) float32 grey levels in [0, 1], on the VAE's device.
        """
        if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[1] != self.latent_channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"decode expects latents (B, {self.latent_channels}, T, h, w); got {shape}.")
        b, c, t, h, w = latents.shape
        z = latents.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w).to(self.device, torch.float32)
        mean, std = self._norm(z)
        y = self.decode_frames(z * std + mean)
        return y.view(b, t, *y.shape[-2:])


def _as_frames(x) -> torch.Tensor:
    """uint8 (0-255) or float ([0, 1]) frames (N, H, W) or (H, W) -> float32 tensor (N, 1, H, W)."""
    a = torch.as_tensor(np.asarray(x)) if not isinstance(x, torch.Tensor) else x
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"Expected frames (N, H, W) or (H, W); got shape {tuple(a.shape)}.")
    a = a.float() / 255.0 if a.dtype == torch.uint8 else a.float()
    return a[:, None]


def compute_latent_stats(codec: EchoCodec, frames_iter: Iterable) -> LatentStats:
    """Per-channel mean and standard deviation of the posterior-mean latents over many frames.

    Args:
        codec: the codec (its current stats are ignored).
        frames_iter: iterable of frame stacks, each (N, H, W) or (H, W), uint8 0-255 or float in [0, 1]
            (e.g. real ED / ES images, then a few prepared loops).

    Returns:
        :class:`LatentStats` with ``source="measured"`` (over all frames and positions, float64 sums).
    """
    c = codec.latent_channels
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    count = 0
    for stack in frames_iter:
        x = _as_frames(stack)
        if len(x) == 0:
            continue
        codec._check_frames(x[:, 0][None])
        z = codec.encode_frames(x).double().cpu()
        s1 += z.sum(dim=(0, 2, 3))
        s2 += (z * z).sum(dim=(0, 2, 3))
        count += z.shape[0] * z.shape[2] * z.shape[3]
    if count == 0:
        raise ValueError("compute_latent_stats got no frames.")
    mean = s1 / count
    std = (s2 / count - mean * mean).clamp_min(1e-12).sqrt()
    return LatentStats(tuple(mean.tolist()), tuple(std.tolist()), "measured")


def write_latent_stats(path: str | Path, stats: LatentStats) -> Path:
    """Record measured latent statistics in an existing VAE folder's ``config.json`` (weights untouched).

    ``path`` may be the VAE folder or a pipeline folder with ``vae/``. Returns the config file written.
    """
    if stats.source != "measured":
        raise ValueError("Only measured latent statistics can be written to a VAE config.")
    cfg_path = _vae_folder(Path(path)) / "config.json"
    config = json.loads(cfg_path.read_text())
    c = int(config.get("latent_channels", len(stats.mean)))
    if len(stats.mean) != c:
        raise ValueError(f"latent stats have {len(stats.mean)} channels; the VAE config says {c}.")
    config["latents_mean"], config["latents_std"] = list(stats.mean), list(stats.std)
    cfg_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return cfg_path


def evaluate_vae(codec: EchoCodec, images, batch_size: int = 64) -> dict:
    """Reconstruction quality of single frames (e.g. the valid split's real ED / ES frames at 112 x 112).

    Args:
        codec: the codec under test.
        images: uint8 (N, H, W) grey levels 0-255 (or float in [0, 1]).

    Returns:
        ``{"ssim": mean SSIM, "psnr": mean PSNR in dB, "n": N}`` on [0, 1] images (see :mod:`echolvfm_core.metrics`).
    """
    from ..metrics import psnr, ssim

    x = _as_frames(images)
    if len(x) == 0:
        raise ValueError("evaluate_vae needs at least one image.")
    codec._check_frames(x[:, 0][None])
    recon = torch.cat([codec.decode_frames(codec.encode_frames(b)).cpu() for b in x.split(batch_size)])
    a, r = x[:, 0].numpy(), recon[:, 0].numpy()
    return {"ssim": ssim(a, r), "psnr": psnr(a, r), "n": len(a)}


def bench_codec(codec: EchoCodec, frames: int = 32, size: int = 112, repeats: int = 10, seed: int = 0) -> dict:
    """Time encoding and decoding one ``frames`` x ``size`` x ``size`` loop (after one warm-up call).

    Returns:
        ``{"encode_ms", "decode_ms"}`` (medians over ``repeats``), ``"encode_ms_min"``, ``"decode_ms_min"``, plus
        ``frames``, ``size``, ``repeats``, ``torch_threads``, ``device`` and ``latent_shape`` (C, T, h, w).
    """
    if frames < 1 or repeats < 1 or size % codec.downsample:
        raise ValueError(f"bench_codec needs frames >= 1, repeats >= 1 and size divisible by {codec.downsample}.")
    g = torch.Generator().manual_seed(seed)
    loop = torch.rand((1, frames, size, size), generator=g)
    sync = torch.cuda.synchronize if codec.device.type == "cuda" else (lambda: None)

    def timed(fn, arg):
        sync()
        t0 = time.perf_counter()
        out = fn(arg)
        sync()
        return out, (time.perf_counter() - t0) * 1000.0

    z, _ = timed(codec.encode, loop)
    timed(codec.decode, z)
    enc, dec = [], []
    for _ in range(repeats):
        z, t = timed(codec.encode, loop)
        enc.append(t)
        _, t = timed(codec.decode, z)
        dec.append(t)
    return {
        "encode_ms": statistics.median(enc),
        "decode_ms": statistics.median(dec),
        "encode_ms_min": min(enc),
        "decode_ms_min": min(dec),
        "frames": frames,
        "size": size,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "device": str(codec.device),
        "latent_shape": list(codec.latent_shape(frames, size)),
    }

