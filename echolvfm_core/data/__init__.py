"""Training data: cardiac loops synthesised from real ED/ES pairs, a procedural phantom, prepared data sets."""
from .loops import (
    CardiacPair,
    CycleTiming,
    RegistrationConfig,
    SynthLoop,
    register_pairs,
    render_loop,
    sample_timing,
)
from .phantom import (
    PhantomAnatomy,
    PhantomLoop,
    phantom_echo,
    render_phantom,
    sample_anatomy,
)
from .prepare import PrepareConfig, prepare
from .prepared import LoopSample, PreparedLoops, RealFrames, collate_loops

__all__ = [
    "CardiacPair",
    "CycleTiming",
    "LoopSample",
    "PhantomAnatomy",
    "PhantomLoop",
    "PrepareConfig",
    "PreparedLoops",
    "RealFrames",
    "RegistrationConfig",
    "SynthLoop",
    "collate_loops",
    "phantom_echo",
    "prepare",
    "register_pairs",
    "render_loop",
    "render_phantom",
    "sample_anatomy",
    "sample_timing",
]
