"""Flow wrappers (losses, time sampling, samplers) around a velocity network; no network code here.

Time convention: ``z_t = (1 - t) x + t eps``, t = 0 data, t = 1 noise, ``v = eps - x`` (see :mod:`.meanflow`).
"""
from .base import Conditioning, FlowLoss, FlowNetwork, VideoBatch, frame_weights, per_video_mse, sample_logit_normal
from .linear import LinearFlow, LinearFlowConfig
from .masking import PATTERNS, ObservationConfig, ObservationSampler
from .meanflow import MeanFlow, MeanFlowConfig

__all__ = [
    "Conditioning",
    "VideoBatch",
    "FlowLoss",
    "FlowNetwork",
    "frame_weights",
    "per_video_mse",
    "sample_logit_normal",
    "MeanFlow",
    "MeanFlowConfig",
    "LinearFlow",
    "LinearFlowConfig",
    "ObservationSampler",
    "ObservationConfig",
    "PATTERNS",
]
