"""Training data: cardiac loops synthesised from real ED/ES pairs, a procedural phantom, prepared data sets."""
from .loops import CardiacPair, CycleTiming, RegistrationConfig, SynthLoop, register_pairs, render_loop, sample_timing
from .phantom import PhantomAnatomy, PhantomLoop, phantom_echo, render_phantom, sample_anatomy
from .prepared import LoopSample, PreparedLoops, PrepareConfig, RealFrames, collate_loops, prepare

__all__ = [
    "CardiacPair",
    "CycleTiming",
    "RegistrationConfig",
    "SynthLoop",
    "register_pairs",
    "render_loop",
    "sample_timing",
    "PhantomAnatomy",
    "PhantomLoop",
    "phantom_echo",
    "render_phantom",
    "sample_anatomy",
    "LoopSample",
    "PreparedLoops",
    "PrepareConfig",
    "RealFrames",
    "prepare",
    "collate_loops",
]
