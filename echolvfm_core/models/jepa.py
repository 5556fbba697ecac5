"""EchoJEPA: a V-JEPA-style video ViT for echo loops (networks only; masking, EMA and loss live in training/).

V-JEPA (Bardes et al., "Revisiting Feature Prediction for Learning Visual Representations from Video", 2024):
a context encoder sees the unmasked tubelets of a clip, a narrow predictor fills in the features of the masked
ones (mask tokens + positions), and the target is the layer-normed output of an EMA copy of the encoder on the
whole clip. Here clips are 16 frames of 112 x 112, cut into tubelets of 2 frames x 16 x 16 pixels: an 8 x 7 x 7
grid, 392 tokens, numbered ``t * 49 + h * 7 + w``.

* :class:`VideoViT` - the encoder: tubelet embedding (a strided Conv3d), fixed 3D sine-cosine positions, pre-norm
  transformer blocks; ``forward(video, keep)`` encodes only the ``keep`` tokens when given.
* :class:`JEPAPredictor` - context tokens + mask tokens at the target positions -> predicted target features.
* :class:`EchoJEPA` - both, with the config saved beside the weights (``save_pretrained`` / ``from_pretrained``).
  The bundled encoder is the EMA target encoder at the end of training (as V-JEPA evaluates its target encoder).
* :class:`AttentiveProbe` - learned queries cross-attend to the frozen tokens (or to how they change over time,
  :func:`temporal_deviation`), then an MLP read-out (V-JEPA's attentive probe); :class:`LinearProbe` - a linear
  read-out of the mean token.
* :class:`JEPAClipEncoder` - the encoder as the video backbone of the EF regressor (attentive pooling to a
  feature vector; frozen by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

__all__ = [
    "JEPAConfig",
    "JEPA_PRESETS",
    "jepa_preset",
    "sincos_positions_3d",
    "VideoViT",
    "JEPAPredictor",
    "EchoJEPA",
    "temporal_deviation",
    "AttentiveProbe",
    "LinearProbe",
    "JEPAClipEncoder",
    "attentive_pool",
]


@dataclass(frozen=True)
class JEPAConfig:
    """Constructor arguments of :class:`EchoJEPA` (what ``config.json`` stores).

    Attributes:
        num_frames, frame_size: clip shape (T, S, S); tubelet (frames) and patch (pixels) must divide them.
        dim, depth, heads: encoder width, blocks and attention heads; mlp_ratio: hidden width / dim.
        pred_dim, pred_depth, pred_heads: the (narrower) predictor.
    """

    num_frames: int = 16
    frame_size: int = 112
    tubelet: int = 2
    patch: int = 16
    dim: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    pred_dim: int = 64
    pred_depth: int = 2
    pred_heads: int = 4


#: ``demo`` (bundled: 1.0 M parameters, 4 MB, trains on one CPU core) and ``tiny`` (tests).
JEPA_PRESETS = {
    "demo": JEPAConfig(),
    "tiny": JEPAConfig(dim=32, depth=1, heads=2, mlp_ratio=2.0, pred_dim=16, pred_depth=1, pred_heads=2),
}


def jepa_preset(name: str) -> JEPAConfig:
    """The :class:`JEPAConfig` of preset ``name`` ("demo" or "tiny")."""
    if name not in JEPA_PRESETS:
        raise ValueError(f"Unknown jepa preset {name!r}; choose one of {sorted(JEPA_PRESETS)}.")
    return JEPA_PRESETS[name]


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(N,) positions -> (N, dim) [sin | cos] at geometric frequencies 1 / 10000^(2i / dim) (Vaswani et al. 2017)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = positions.double()[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_positions_3d(dim: int, grid: tuple[int, int, int]) -> torch.Tensor:
    """Fixed positions of a (T, H, W) token grid -> (T * H * W, dim), token order ``t * H * W + h * W + w``.

    As in V-JEPA, half of the channels encode time and a quarter each the row and the column; ``dim`` must be a
    multiple of 8.
    """
    if dim % 8:
        raise ValueError(f"dim must be a multiple of 8 for 3D sine-cosine positions; got {dim}.")
    t, h, w = grid
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, tt.reshape(-1)), _sincos_1d(dim // 4, hh.reshape(-1)),
                      _sincos_1d(dim // 4, ww.reshape(-1))], dim=1)


def _blocks(dim: int, depth: int, heads: int, mlp_ratio: float) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout=0.0, activation="gelu",
                                   batch_first=True, norm_first=True)
        for _ in range(depth)
    )


def _gather(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, D), index int64 (B, K) -> (B, K, D)."""
    return torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))


class VideoViT(nn.Module):
    """Encoder. ``forward(video, keep=None)``: video float (B, 1, T, S, S) in [0, 1], keep int64 (B, K) token
    indices (None: all N tokens) -> tokens float (B, K or N, dim), after a final LayerNorm."""

    def __init__(self, cfg: JEPAConfig):
        super().__init__()
        if cfg.num_frames % cfg.tubelet or cfg.frame_size % cfg.patch:
            raise ValueError(f"tubelet {cfg.tubelet} x patch {cfg.patch} must divide the clip "
                             f"{cfg.num_frames} x {cfg.frame_size}.")
        self.cfg = cfg
        self.grid = (cfg.num_frames // cfg.tubelet, cfg.frame_size // cfg.patch, cfg.frame_size // cfg.patch)
        k = (cfg.tubelet, cfg.patch, cfg.patch)
        self.embed = nn.Conv3d(1, cfg.dim, kernel_size=k, stride=k)
        self.register_buffer("pos", sincos_positions_3d(cfg.dim, self.grid), persistent=False)
        self.blocks = _blocks(cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.dim)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def forward(self, video: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        shape = (1, self.cfg.num_frames, self.cfg.frame_size, self.cfg.frame_size)
        if video.ndim != 5 or tuple(video.shape[1:]) != shape:
            raise ValueError(f"VideoViT expects video (B, {', '.join(map(str, shape))}); got {tuple(video.shape)}.")
        x = self.embed(2.0 * video - 1.0).flatten(2).transpose(1, 2) + self.pos  # (B, N, D)
        if keep is not None:
            x = _gather(x, keep)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class JEPAPredictor(nn.Module):
    """Predictor. ``forward(context, context_idx, target_idx)``: context tokens (B, Kc, dim) from the encoder at
    token indices context_idx (B, Kc), target indices target_idx (B, Kt) -> predicted features (B, Kt, dim)."""

    def __init__(self, cfg: JEPAConfig, grid: tuple[int, int, int]):
        super().__init__()
        self.proj_in = nn.Linear(cfg.dim, cfg.pred_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.pred_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("pos", sincos_positions_3d(cfg.pred_dim, grid), persistent=False)
        self.blocks = _blocks(cfg.pred_dim, cfg.pred_depth, cfg.pred_heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.pred_dim)
        self.proj_out = nn.Linear(cfg.pred_dim, cfg.dim)

    def forward(self, context: torch.Tensor, context_idx: torch.Tensor, target_idx: torch.Tensor) -> torch.Tensor:
        b, kt = target_idx.shape
        pos = self.pos.expand(b, -1, -1)
        ctx = self.proj_in(context) + _gather(pos, context_idx)
        tgt = self.mask_token.expand(b, kt, -1) + _gather(pos, target_idx)
        x = torch.cat([ctx, tgt], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.proj_out(self.norm(x[:, ctx.shape[1]:]))


class EchoJEPA(ModelMixin, ConfigMixin):
    """Encoder + predictor of one configuration (:class:`JEPAConfig` fields as keyword arguments).

    ``encode(video)`` -> tokens (B, N, dim); ``features(video)`` -> mean token (B, dim). Video float
    (B, 1, num_frames, frame_size, frame_size), grey levels in [0, 1].
    """

    @register_to_config
    def __init__(self, num_frames: int = 16, frame_size: int = 112, tubelet: int = 2, patch: int = 16, dim: int = 128,
                 depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0, pred_dim: int = 64, pred_depth: int = 2,
                 pred_heads: int = 4):
        super().__init__()
        cfg = JEPAConfig(num_frames, frame_size, tubelet, patch, dim, depth, heads, mlp_ratio, pred_dim, pred_depth,
                         pred_heads)
        self.encoder = VideoViT(cfg)
        self.predictor = JEPAPredictor(cfg, self.encoder.grid)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder(video)

    def features(self, video: torch.Tensor) -> torch.Tensor:
        return self.encoder(video).mean(dim=1)


def attentive_pool(query: torch.Tensor, kv: nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-attention of learned queries to tokens: query (1, heads, Q, c), ``kv`` a Linear(dim -> 2 heads c),
    tokens (B, N, dim) -> (B, Q heads c); keys and values are projections of the layer-normed tokens."""
    b, n, d = tokens.shape
    heads, nq = query.shape[1], query.shape[2]
    k, v = kv(F.layer_norm(tokens, (d,))).view(b, n, 2, heads, -1).permute(2, 0, 3, 1, 4)  # (B, h, N, c)
    out = F.scaled_dot_product_attention(query.expand(b, -1, -1, -1), k, v)  # (B, h, Q, c)
    return out.transpose(1, 2).reshape(b, nq * k.shape[-1] * heads)


class JEPAClipEncoder(nn.Module):
    """A video backbone from an EchoJEPA encoder: clip (B, 1, T, S, S) in [0, 1] -> features (B, feature_dim).

    The ViT's tokens are pooled by ``queries`` learned queries (cross-attention, as the attentive probe) and
    projected to ``feature_dim``. With ``frozen`` the ViT keeps its (self-supervised) weights: it gets no gradients
    and runs in inference mode, so only the pooling and what comes after it train, as in V-JEPA's frozen evaluation.
    With ``motion`` the queries read how the tokens change over the clip (:func:`temporal_deviation`), as the
    bundled attentive EF probe does.
    """

    def __init__(self, cfg: JEPAConfig, feature_dim: int, queries: int = 4, frozen: bool = True, motion: bool = False):
        super().__init__()
        self.vit = VideoViT(cfg)
        self.frozen, self.motion = frozen, motion
        if frozen:
            self.vit.requires_grad_(False)
        attn_dim = cfg.dim // 2
        self.query = nn.Parameter(torch.zeros(1, cfg.heads, queries, attn_dim // cfg.heads))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv = nn.Linear(cfg.dim, 2 * attn_dim)
        self.proj = nn.Sequential(nn.LayerNorm(queries * attn_dim), nn.Linear(queries * attn_dim, feature_dim))

    def train(self, mode: bool = True) -> JEPAClipEncoder:
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if self.frozen:
            with torch.no_grad():
                tokens = self.vit(video)
        else:
            tokens = self.vit(video)
        if self.motion:
            tokens = temporal_deviation(tokens, self.vit.grid[0])
        return self.proj(attentive_pool(self.query, self.kv, tokens))


def temporal_deviation(tokens: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Each token minus the mean over time of the tokens at its position: (B, N, D) -> (B, N, D).

    Tokens are ordered ``t * positions + p`` (:class:`VideoViT`), N = ``time_steps`` x positions. What is left is
    how each place changes over the clip (wall motion), without the still anatomy that dominates the features.
    """
    b, n, d = tokens.shape
    if time_steps < 1 or n % time_steps:
        raise ValueError(f"{n} tokens do not split into {time_steps} time steps.")
    x = tokens.reshape(b, time_steps, n // time_steps, d)
    return (x - x.mean(dim=1, keepdim=True)).reshape(b, n, d)


class AttentiveProbe(ModelMixin, ConfigMixin):
    """EF read-out from frozen tokens: ``forward(tokens (B, N, dim)) -> EF (B,)`` in %.

    ``queries`` learned queries cross-attend to the tokens (``heads`` heads over ``attn_dim`` channels; keys and
    values are projections of the layer-normed tokens); their outputs, concatenated, go through an MLP to the
    z-scored EF, de-normalised with ``ef_mean`` / ``ef_std`` (%). With ``time_steps`` > 0 the probe reads the
    tokens' :func:`temporal_deviation` over that many tubelet time steps: softmax attention can only average
    tokens, so it cannot subtract a frame's features from another's, which an EF (a change of the cavity over the
    cycle) needs. With ``keep_tokens`` as well, it reads both, each layer-normed and concatenated (2 ``dim``
    channels): the still anatomy (how large the cavity is) beside its change. ``queries=1, time_steps=0`` is V-JEPA's
    one-query probe. ``attn_dim`` below ``dim`` keeps probe training cheap on a CPU.
    """

    @register_to_config
    def __init__(self, dim: int = 128, attn_dim: int = 64, heads: int = 4, queries: int = 1, time_steps: int = 0,
                 ef_mean: float = 50.0, ef_std: float = 15.0, keep_tokens: bool = False):
        super().__init__()
        if attn_dim % heads:
            raise ValueError(f"attn_dim ({attn_dim}) must be a multiple of heads ({heads}).")
        if keep_tokens and not time_steps:
            raise ValueError("keep_tokens reads the tokens beside their change over time; it needs time_steps > 0.")
        self.query = nn.Parameter(torch.zeros(1, heads, queries, attn_dim // heads))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.kv = nn.Linear(2 * dim if keep_tokens else dim, 2 * attn_dim)
        self.head = nn.Sequential(nn.LayerNorm(queries * attn_dim), nn.Linear(queries * attn_dim, 2 * attn_dim),
                                  nn.GELU(), nn.Linear(2 * attn_dim, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.config.time_steps:
            change, d = temporal_deviation(tokens, self.config.time_steps), tokens.shape[-1]
            tokens = (torch.cat([F.layer_norm(tokens, (d,)), F.layer_norm(change, (d,))], dim=-1)
                      if self.config.keep_tokens else change)
        return self.head(attentive_pool(self.query, self.kv, tokens))[:, 0] * self.config.ef_std + self.config.ef_mean


class LinearProbe(nn.Module):
    """``forward(tokens (B, N, dim)) -> EF (B,)`` in %: a linear map of the mean token (z-scored EF target)."""

    def __init__(self, dim: int, ef_mean: float, ef_std: float):
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        self.ef_mean, self.ef_std = ef_mean, ef_std

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(F.layer_norm(tokens.mean(dim=1), (tokens.shape[-1],)))[:, 0] * self.ef_std + self.ef_mean
