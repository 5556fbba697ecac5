"""Train the one-step generator: ``echolvfm train generator --data PREPARED --preset demo|paper|cpu|cpu_meanflow|tiny
--out DIR [--vae DIR] [--init DIR] [--flow meanflow|linear]``.

1. Latents: every prepared loop is encoded once with the codec (``--vae``, default ``assets/vae``) and cached in
   ``DIR/latents_<split>.pt`` (float16; reused while the data folder and the codec are unchanged), so training
   never runs the VAE.
2. Batches (:class:`ClipSampler`, seeded): a clip of 10-32 frames of a loop (from end-diastole, or from a random
   frame), an observed-frame set from :class:`~echolvfm_core.flows.ObservationSampler` (one frame at a random
   phase, ED only, random subsets, first k, every other frame), padded to the longest clip of the batch with the
   not-padding mask.
   Counterfactual supervision: with probability ``counterfactual_prob`` the observed frames come from another loop
   of the same patient (same anatomy, other EF; ``PreparedLoops.loops_of``) at the same cardiac phase, while the
   target and the EF are this loop's; otherwise the clip reconstructs its own loop. Clips of CAMUS loops with one
   observed frame also carry their known motion (``PreparedLoops.deformation``: the registration field at each
   frame's scale, relative to the observed frame's) for the flow's ``displacement_weight``.
3. Objective: masked MeanFlow (:class:`~echolvfm_core.flows.MeanFlow`), or with ``--flow linear`` the masked
   linear flow-matching baseline (:class:`~echolvfm_core.flows.LinearFlow`, EF dropout for classifier-free guidance,
   same data, schedule and network without the displacement output; :func:`as_linear_baseline`), through
   accelerate (CPU, one GPU, or ``accelerate launch --multi_gpu -m echolvfm_core.cli train generator ...``), bf16
   on GPU, AdamW with warm-up
   and cosine decay, gradient clipping, an EMA copy of the weights (what is saved), checkpoint / resume, tqdm with
   the loss parts, and PNG sample grids (observed frame, real loop, generated loop) decoded with the codec.

``--init DIR`` warm-starts the network from a saved generator (every weight whose name and shape match; the rest
keeps its initialisation). The final EMA model goes to ``DIR/final`` (``save_pretrained`` + ``flow.json`` ("meanflow"
or "linear") + ``training_config.json``), the run summary to ``DIR/metrics.json``. :func:`bench_generator` times
one-step vs 25-step sampling and the MeanFlow (JVP) training step vs plain flow matching.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..data.loops import exp_velocity
from ..flows import (
    Conditioning,
    LinearFlow,
    LinearFlowConfig,
    MeanFlow,
    MeanFlowConfig,
    ObservationConfig,
    ObservationSampler,
    VideoBatch,
)
from ..models.unet import EchoVelocityUNet, UNetConfig, jvp_flash_available, unet_preset
from ..pipelines.counterfactual import save_generator
from .common import (
    TrainingError,
    ema_update,
    load_checkpoint,
    make_accelerator,
    preset_from_args,
    progress,
    save_checkpoint,
    set_seed,
    warmup_cosine,
)

if TYPE_CHECKING:
    from ..data.prepared import LoopDeformation

__all__ = [
    "GeneratorTrainConfig",
    "GeneratorTrainingError",
    "FLOWS",
    "as_linear_baseline",
    "load_init_weights",
    "TRAIN_PRESETS",
    "train_preset",
    "LatentLoops",
    "encode_loops",
    "ClipSampler",
    "fit",
    "train",
    "write_model_card",
    "bench_generator",
]

log = logging.getLogger(__name__)

#: The objectives ``echolvfm train generator --flow`` trains: the one-step MeanFlow, or the linear baseline.
FLOWS = ("meanflow", "linear")


class GeneratorTrainingError(TrainingError):
    """A generator run cannot start (no codec, no training loops, an ``--init`` model that does not fit)."""


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Schedule of a generator training run (saved with the model as ``training_config.json``).

    Attributes:
        model: network architecture (:class:`UNetConfig`); flow: MeanFlow hyper-parameters;
        observation: observed-frame patterns and clip lengths.
        objective: "meanflow" (``flow``) or "linear" (the multi-step baseline, ``linear``; see
            :func:`as_linear_baseline`). linear: the linear flow's hyper-parameters (used with "linear" only).
        steps, batch_size: optimiser steps and clips per step (over all processes).
        lr, warmup, weight_decay: AdamW with linear warm-up, then cosine decay to 10 % of ``lr``.
        grad_clip: max global gradient norm. ema_decay: EMA of the weights (warm-up ``(1+s)/(10+s)``).
        counterfactual_prob: share of clips conditioned on another loop of the same patient.
        random_start_prob: share of clips starting at a random frame instead of end-diastole.
        whole_cycle_prob: share of clips that hold the loop's whole cycle resampled to the clip length (nearest
            frames) instead of a window of consecutive frames; the rest are windows.
        phantom: also train on phantom loops (always used when the folder has no CAMUS loops).
        checkpoint_every, sample_every: in steps (0 = only at the end).
    """

    model: UNetConfig = field(default_factory=lambda: unet_preset("demo"))
    flow: MeanFlowConfig = field(default_factory=MeanFlowConfig)
    observation: ObservationConfig = field(default_factory=ObservationConfig)
    steps: int = 30000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 500
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    counterfactual_prob: float = 0.5
    random_start_prob: float = 0.5
    whole_cycle_prob: float = 0.0
    phantom: bool = False
    checkpoint_every: int = 1000
    sample_every: int = 2000
    objective: str = "meanflow"
    linear: LinearFlowConfig = field(default_factory=lambda: LinearFlowConfig(residual=True))

    def __post_init__(self) -> None:
        if self.objective not in FLOWS:
            raise ValueError(f"objective must be one of {FLOWS}; got {self.objective!r}.")
        if self.objective == "linear" and self.model.displacement_channels:
            raise ValueError("The linear baseline predicts a velocity: its network has no displacement output.")


def as_linear_baseline(cfg: GeneratorTrainConfig, ef_dropout: float = 0.1) -> GeneratorTrainConfig:
    """The linear flow-matching baseline of a MeanFlow run: the same data, clips, schedule and network (without the
    displacement output, which only MeanFlow's "warp" prediction reads), the same residual flow and observed-frame
    weight, with the EF dropped for ``ef_dropout`` of clips so that sampling can use classifier-free guidance."""
    return dataclasses.replace(
        cfg, objective="linear", model=dataclasses.replace(cfg.model, displacement_channels=0),
        linear=LinearFlowConfig(residual=cfg.flow.residual, ef_dropout=ef_dropout,
                                observed_weight=cfg.flow.observed_weight))


TRAIN_PRESETS = {
    "demo": GeneratorTrainConfig(),
    "paper": GeneratorTrainConfig(model=unet_preset("paper"), steps=100000, lr=1e-4, sample_every=5000),
    # The bundled model when no GPU is lent: the demo network on two idle CPU cores for about 40 minutes.
    # The flow carries the motion relative to the observed frames (residual), the network sees the anchor at every
    # frame (context channels) and moves it by a displacement field (prediction "warp"), so the anatomy needs no
    # learning. The MeanFlow objective did not learn the EF-dependent motion on the CPU: ten runs of up to 1100 steps
    # gave still hearts at every requested EF (docs/models.md). This preset therefore trains the one-step sample
    # alone, by regression onto the data (the reconstruction regulariser at (r, t) = (0, 1), no MeanFlow term), which
    # learns the expected loop given the observed frames and the EF: a close to deterministic generator. Most clips
    # hold a whole cycle from ED with ED observed (the app's default and the evaluation's protocol), so the clip
    # length fixes the timing of systole; clips have at most 16 frames (half the work of 32; the app shows 16-frame
    # loops with this model). The displacement field is also supervised by the registration field each CAMUS loop
    # was rendered with (displacement_weight): trained on the image error alone, the field stayed too small (the
    # error of warping the anchor by the true field, 0.13, is above what a blurred loop reaches, 0.10).
    "cpu": GeneratorTrainConfig(model=dataclasses.replace(unet_preset("demo"), context_channels=4,
                                                          displacement_channels=2, max_frames=16),
                                steps=3000, batch_size=8, lr=4e-4, warmup=100, ema_decay=0.995, whole_cycle_prob=0.9,
                                checkpoint_every=100, sample_every=500,
                                observation=ObservationConfig(probs=(0.2, 0.5, 0.1, 0.1, 0.1), min_frames=10,
                                                              max_frames=16),
                                flow=MeanFlowConfig(residual=True, prediction="warp", one_step_share=1.0,
                                                    mf_weight=0.0, recon_weight=1.0, recon_on="one_step",
                                                    displacement_weight=3.0)),
    # The one-step generator trained with the MeanFlow objective on two CPU cores, warm-started from the cpu preset's
    # regression (`--init assets/generator`; same network, so the motion it learnt is kept). Half of the steps are
    # MeanFlow steps (JVP target with stop-gradient; tangent from the network's own instantaneous velocity, Improved
    # Mean Flows; adaptive weighting p = 0.5; half of their clips at r < t, the intervals growing from short to full
    # over the first 500 steps; a quarter of their clips at the one-step interval (0, 1) with the reconstruction
    # regulariser on them), the other half masked linear flow matching (r = t); the displacement field stays
    # supervised by the registration field. 26 min with one thread on two shared cores; its numbers (not bundled: it
    # misses the Rec targets) are in docs/models.md. `echolvfm train generator --flow linear` with this preset trains
    # the linear baseline on the same data and schedule. The demo preset is the GPU schedule.
    "cpu_meanflow": GeneratorTrainConfig(
        model=dataclasses.replace(unet_preset("demo"), context_channels=4, displacement_channels=2, max_frames=16),
        steps=1000, batch_size=8, lr=2e-4, warmup=100, ema_decay=0.995, whole_cycle_prob=0.9, checkpoint_every=100,
        sample_every=250,
        observation=ObservationConfig(probs=(0.2, 0.5, 0.1, 0.1, 0.1), min_frames=10, max_frames=16),
        flow=MeanFlowConfig(residual=True, prediction="warp", displacement_weight=3.0, mf_weight=1.0,
                            tangent="predicted", adaptive_p=0.5, share_r_neq_t=0.5, interval_warmup=500,
                            one_step_share=0.25, recon_weight=1.0, recon_on="one_step", linear_ratio=0.5)),
    "tiny": GeneratorTrainConfig(
        model=unet_preset("tiny"), steps=4, batch_size=2, warmup=1, phantom=True, checkpoint_every=2,
        sample_every=3, flow=MeanFlowConfig(share_r_neq_t=0.5, recon_weight=0.1, linear_ratio=0.25),
        observation=ObservationConfig(min_frames=6, max_frames=12),
    ),
}


def train_preset(name: str) -> GeneratorTrainConfig:
    """The :class:`GeneratorTrainConfig` of preset ``name`` ("demo", "cpu", "cpu_meanflow", "paper" or "tiny")."""
    if name not in TRAIN_PRESETS:
        raise ValueError(f"Unknown generator preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}.")
    return TRAIN_PRESETS[name]


# ------------------------------------------------------------------------------------------------------ latents
@dataclass
class LatentLoops:
    """Encoded loops in memory.

    Attributes:
        latents: per loop a float16 tensor (C, T, h, w) of normalised latents; frame 0 is end-diastole.
        ef: (N,) EF in %; ed_index: (N,) ED frame per loop; patient, loop_id: per loop.
        fingerprint: identifies the data folder view and codec the latents were made from.
    """

    latents: list[torch.Tensor]
    ef: np.ndarray
    ed_index: np.ndarray
    patient: list[str]
    loop_id: list[str]
    fingerprint: str = ""

    def __post_init__(self) -> None:
        n = len(self.latents)
        if not (len(self.ef) == len(self.ed_index) == len(self.patient) == len(self.loop_id) == n):
            raise ValueError("LatentLoops fields must all have one entry per loop.")
        self._by_patient: dict[str, list[int]] = {}
        for i, p in enumerate(self.patient):
            self._by_patient.setdefault(p, []).append(i)

    def __len__(self) -> int:
        return len(self.latents)

    def loops_of(self, patient: str) -> list[int]:
        """Indices of the loops of one patient (same anatomy, different EFs)."""
        return list(self._by_patient.get(patient, []))

    def save(self, path: Path) -> None:
        torch.save({"fingerprint": self.fingerprint, "latents": self.latents, "ef": self.ef.tolist(),
                    "ed_index": self.ed_index.tolist(), "patient": self.patient, "loop_id": self.loop_id}, path)

    @classmethod
    def load(cls, path: Path) -> "LatentLoops":
        d = torch.load(path, weights_only=True)
        return cls(d["latents"], np.asarray(d["ef"], np.float64), np.asarray(d["ed_index"], np.int64),
                   list(d["patient"]), list(d["loop_id"]), d["fingerprint"])


def _fingerprint(ds, codec) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(ds.meta, sort_keys=True, default=str).encode())
    h.update(json.dumps([r["loop_id"] for r in ds.manifest]).encode())
    h.update(json.dumps(dict(codec.vae.config), sort_keys=True, default=str).encode())
    h.update(json.dumps([list(codec.stats.mean), list(codec.stats.std)]).encode())
    return h.hexdigest()[:16]


def encode_loops(ds, codec, cache: Path | None = None, desc: str = "encode loops") -> LatentLoops:
    """Encode every loop of ``ds`` (a ``PreparedLoops`` view) with ``codec``; reuse / write ``cache`` when given."""
    from tqdm.auto import tqdm

    fp = _fingerprint(ds, codec)
    if cache is not None and Path(cache).is_file():
        loaded = LatentLoops.load(Path(cache))
        if loaded.fingerprint == fp:
            return loaded
        log.info("latent cache %s is for other data or another codec; re-encoding", cache)
    latents, ef, ed, patient, ids = [], [], [], [], []
    for i in tqdm(range(len(ds)), desc=desc, dynamic_ncols=True):
        s = ds[i]
        frames = torch.from_numpy(np.asarray(s.frames)).float().div_(255.0)[None]
        latents.append(codec.encode(frames)[0].to("cpu", torch.float16).contiguous())
        ef.append(float(s.ef))
        ed.append(int(s.ed_index))
        patient.append(str(s.patient))
        ids.append(str(s.loop_id))
    out = LatentLoops(latents, np.asarray(ef), np.asarray(ed, np.int64), patient, ids, fp)
    if cache is not None:
        out.save(Path(cache))
    return out


# ------------------------------------------------------------------------------------------------------ batches
class ClipSampler:
    """Seeded training batches from :class:`LatentLoops` (see the module docstring, step 2).

    ``batch(batch_size, generator) -> VideoBatch`` with clips padded to the longest clip of the batch; the same
    generator state gives the same batch.
    """

    def __init__(self, loops: LatentLoops, observation: ObservationConfig, counterfactual_prob: float = 0.5,
                 random_start_prob: float = 0.5, whole_cycle_prob: float = 0.0,
                 deformations: list[LoopDeformation | None] | None = None):
        if len(loops) == 0:
            raise ValueError("No loops to train on.")
        if deformations is not None and len(deformations) != len(loops):
            raise ValueError(f"deformations needs one entry per loop ({len(loops)}); got {len(deformations)}.")
        short = [loops.loop_id[i] for i, z in enumerate(loops.latents) if z.shape[1] < observation.min_frames]
        if short:
            raise ValueError(f"{len(short)} loops are shorter than {observation.min_frames} frames (e.g. {short[0]}).")
        self.loops = loops
        self.observation = observation
        self.counterfactual_prob = counterfactual_prob
        self.random_start_prob = random_start_prob
        self.whole_cycle_prob = whole_cycle_prob
        self.deformations = deformations

    def _clip(self, i: int, obs: ObservationSampler, g: torch.Generator):
        loops, cfg = self.loops, self.observation
        lat = loops.latents[i]
        n_frames = lat.shape[1]
        pattern = obs.pattern()
        if self.whole_cycle_prob > 0 and float(torch.rand((), generator=g)) < self.whole_cycle_prob:
            # the whole cycle in `length` frames (nearest frames, repeated when the loop is shorter): frame k has
            # phase k / length, so the clip length tells the network when systole ends
            length = obs.length(cfg.max_frames)
            index = torch.arange(length) * n_frames // length
        else:
            length = obs.length(n_frames)
            start = 0
            if pattern != "ed" and float(torch.rand((), generator=g)) < self.random_start_prob:
                start = int(torch.randint(0, n_frames - length + 1, (), generator=g))
            index = torch.arange(start, start + length)
        ed = int((index - int(loops.ed_index[i])).abs().argmin()) if pattern == "ed" else 0
        observed, _ = obs.observed(length, ed_index=ed, pattern=pattern)

        j = i
        others = [k for k in loops.loops_of(loops.patient[i]) if k != i]
        if others and float(torch.rand((), generator=g)) < self.counterfactual_prob:
            j = others[int(torch.randint(0, len(others), (), generator=g))]
        source = loops.latents[j]
        c, _, h, w = lat.shape
        x = torch.zeros(c, cfg.max_frames, h, w)
        x[:, :length] = lat[:, index].float()
        cond = torch.zeros_like(x)
        pos = observed.nonzero().flatten()
        # The same cardiac phase in the source loop: loops span one cycle from end-diastole.
        src = (index[pos].double() * source.shape[1] / n_frames).round().long().clamp_max(source.shape[1] - 1)
        cond[:, pos] = source[:, src].float()
        frame_mask = torch.zeros(cfg.max_frames, dtype=torch.bool)
        frame_mask[:length] = True
        disp = self._displacement(i, j, index, src, (h, w)) if len(pos) == 1 else None
        return x, cond, observed, frame_mask, float(loops.ef[i]), disp

    def _displacement(self, i: int, j: int, index: torch.Tensor, src: torch.Tensor, size: tuple[int, int]):
        """(2, max_frames, h, w) latent-pixel displacement that moves the one observed frame (loop ``j``, frame
        ``src``) onto each clip frame (loop ``i``, frames ``index``), zero at padding; None when either loop has no
        deformation. Both are the same ED image warped along one velocity field, whose flows compose by adding
        their scales: ``exp(a v) o exp(b v) = exp((a + b) v)``."""
        if self.deformations is None or self.deformations[i] is None or self.deformations[j] is None:
            return None
        target, observed = self.deformations[i], self.deformations[j]
        h, w = size
        if h != w:
            raise ValueError(f"Displacement targets need square latents; got {h} x {w}.")
        scale = torch.from_numpy(target.scale[index.numpy()] - observed.scale[int(src[0])]).float()
        velocity = torch.from_numpy(target.velocity)[None].expand(len(scale), -1, -1, -1)
        field = exp_velocity(velocity, h, scale) * ((h - 1) / 2)  # normalised units -> latent pixels
        out = torch.zeros(2, self.observation.max_frames, h, w)
        out[:, : len(scale)] = field.transpose(0, 1)
        return out

    def batch(self, batch_size: int, generator: torch.Generator) -> VideoBatch:
        """``batch_size`` clips drawn with ``generator`` (CPU)."""
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        obs = ObservationSampler(self.observation, seed=seed)
        idx = torch.randint(0, len(self.loops), (batch_size,), generator=generator).tolist()
        parts = [self._clip(i, obs, generator) for i in idx]
        x, cond, observed, frame_mask, ef, disp = (list(p) for p in zip(*parts))
        # Padding after the longest clip of the batch is cut off: it changes no loss term, only costs time.
        t = int(max(int(m.sum()) for m in frame_mask))
        c = Conditioning(torch.stack(cond)[:, :, :t], torch.stack(observed)[:, :t], torch.stack(frame_mask)[:, :t],
                         torch.tensor(ef))
        displacement = known = None
        if any(d is not None for d in disp):
            known = torch.tensor([d is not None for d in disp])
            zero = torch.zeros(2, *x[0].shape[1:])
            displacement = torch.stack([zero if d is None else d for d in disp])[:, :, :t]
        return VideoBatch(torch.stack(x)[:, :, :t], c, displacement, known)


# ------------------------------------------------------------------------------------------------------ training
def _preview_batch(loops: LatentLoops, cfg: GeneratorTrainConfig, n: int = 4) -> VideoBatch:
    """Fixed preview clips: the first ``n`` loops from ED, ED observed, their own EF."""
    xs, conds, obs, fms, efs = [], [], [], [], []
    m = cfg.observation.max_frames
    for i in range(min(n, len(loops))):
        lat = loops.latents[i].float()
        length = min(lat.shape[1], m)
        x = torch.zeros(lat.shape[0], m, *lat.shape[2:])
        x[:, :length] = lat[:, :length]
        o = torch.zeros(m, dtype=torch.bool)
        o[0] = True
        fm = torch.zeros(m, dtype=torch.bool)
        fm[:length] = True
        xs.append(x)
        conds.append(x * o[None, :, None, None].float())
        obs.append(o)
        fms.append(fm)
        efs.append(float(loops.ef[i]))
    return VideoBatch(torch.stack(xs), Conditioning(torch.stack(conds), torch.stack(obs), torch.stack(fms), torch.tensor(efs)))


def save_sample_grid(flow: MeanFlow | LinearFlow, batch: VideoBatch, codec, path: Path, seed: int = 0,
                     columns: int = 8) -> Path:
    """PNG: per preview clip one row of real frames and one row of the sample (``columns`` frames each): MeanFlow's
    one step, or 25 midpoint steps of a linear flow."""
    from PIL import Image

    dev = next(flow.net.parameters()).device
    b = batch.to(dev)
    gen = torch.Generator(dev).manual_seed(seed)
    sample = flow.sample(b.cond, steps=25 if isinstance(flow, LinearFlow) else 1, generator=gen).float()
    real = codec.decode(b.x.float()).cpu().numpy()
    fake = codec.decode(sample).cpu().numpy()
    rows = []
    for k in range(real.shape[0]):
        length = int(batch.cond.frame_mask[k].sum())
        idx = np.linspace(0, length - 1, min(columns, length)).round().astype(int)
        rows.append(np.concatenate(list(real[k, idx]), axis=1))
        rows.append(np.concatenate(list(fake[k, idx]), axis=1))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]))) for r in rows], axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(grid, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


def load_init_weights(net: EchoVelocityUNet, folder: str | Path) -> list[str]:
    """Warm start: copy into ``net`` every weight of the generator saved in ``folder`` whose name and shape match;
    returns the names of ``net``'s weights left at their initialisation (e.g. the output convolution of a linear
    baseline started from a warp generator). Raises :class:`GeneratorTrainingError` when nothing matches."""
    from safetensors.torch import load_file

    path = Path(folder) / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise GeneratorTrainingError(f"No generator weights to warm-start from: {path} does not exist.")
    saved = load_file(str(path))
    own = net.state_dict()
    fits = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise GeneratorTrainingError(f"No weight of {folder} fits this network: another architecture.")
    net.load_state_dict(fits, strict=False)
    return sorted(set(own) - set(fits))


def _process_mean(accelerator, parts: dict[str, torch.Tensor]) -> dict[str, float]:
    """One step's loss parts averaged over the processes (each trained on its own share of the batch)."""
    values = torch.stack([v.detach().float().to(accelerator.device) for v in parts.values()])
    return dict(zip(parts, accelerator.reduce(values, reduction="mean").tolist()))


def fit(loops: LatentLoops, cfg: GeneratorTrainConfig, out: Path, codec=None, seed: int = 0, device: str | None = None,
        resume: bool = False, preview: LatentLoops | None = None,
        deformations: list[LoopDeformation | None] | None = None, init: str | Path | None = None) -> dict:
    """Train the generator on encoded loops; writes ``out/final`` and ``out/metrics.json``.

    Args:
        loops: training latents. cfg: the run's configuration. out: output folder (``out/checkpoint``,
            ``out/samples/step_XXXXXX.png`` when ``codec`` is given).
        codec: for sample grids (decoding); None skips them.
        seed: seeds initialisation; batch ``k`` depends only on (seed, k), so a resumed run sees the same data.
        resume: continue from ``out/checkpoint`` when present.
        preview: loops for the sample grids (default: the training loops).
        deformations: per training loop its :class:`~echolvfm_core.data.prepared.LoopDeformation` (None for
            phantoms), the known motion for ``cfg.flow.displacement_weight``; None: no motion supervision.
        init: a saved generator folder to warm-start the network from (:func:`load_init_weights`); a resumed run
            continues from its checkpoint instead.

    Returns:
        The metrics dict (also ``out/metrics.json``).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(device)
    set_seed(seed)
    net = EchoVelocityUNet.from_preset(cfg.model)
    if init is not None:
        fresh = load_init_weights(net, init)
        log.info("warm start from %s; left at initialisation: %s", init, ", ".join(fresh) or "nothing")
    linear = cfg.objective == "linear"
    if not linear:
        net.null_ef.requires_grad_(False)  # MeanFlow does not drop the EF; frozen so DDP sees no unused parameter
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    flow = LinearFlow(net, cfg.linear) if linear else MeanFlow(net, cfg.flow)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup, cfg.steps, 0.1))
    flow, optimizer, scheduler = accelerator.prepare(flow, optimizer, scheduler)
    ema.to(accelerator.device)
    accelerator.register_for_checkpointing(ema)
    state = load_checkpoint(accelerator, out) if resume else {"step": 0}
    step = start_step = int(state["step"])
    history = list(state.get("history", []))

    supervise_motion = not linear and cfg.flow.displacement_weight > 0
    sampler = ClipSampler(loops, cfg.observation, cfg.counterfactual_prob, cfg.random_start_prob, cfg.whole_cycle_prob,
                          deformations if supervise_motion else None)
    per_process = max(1, cfg.batch_size // accelerator.num_processes)
    preview_batch = _preview_batch(preview if preview is not None and len(preview) else loops, cfg)
    ema_flow = LinearFlow(ema, cfg.linear) if linear else MeanFlow(ema, cfg.flow)
    parts_log: list[dict[str, float]] = []
    bar = progress(accelerator, cfg.steps, step, desc="generator")
    t0 = time.perf_counter()
    while step < cfg.steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + accelerator.process_index)
        batch = sampler.batch(per_process, g).to(accelerator.device)
        noise_gen = torch.Generator(accelerator.device).manual_seed(seed * 1_000_033 + step * 31 + accelerator.process_index)
        flow.train()
        with accelerator.autocast():
            loss = flow(batch, step=step, generator=noise_gen)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss.loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        ema_update(ema, accelerator.unwrap_model(flow).net, min(cfg.ema_decay, (1 + step) / (10 + step)))
        step += 1
        bar.update(1)
        parts_log.append(_process_mean(accelerator, {"loss": loss.loss, **loss.parts}))
        recent = {k: float(np.mean([p[k] for p in parts_log[-50:] if k in p])) for k in parts_log[-1]}
        bar.set_postfix({k: f"{v:.4f}" for k, v in recent.items() if k != "linear"})
        if codec is not None and cfg.sample_every and step % cfg.sample_every == 0 and accelerator.is_main_process:
            save_sample_grid(ema_flow, preview_batch, codec, out / "samples" / f"step_{step:06d}.png", seed=seed)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
            history.append({"step": step, **recent})
            save_checkpoint(accelerator, out, step, history=history)
    bar.close()
    elapsed = time.perf_counter() - t0
    metrics = {
        "steps": cfg.steps,
        "resumed_from": start_step,
        "final_loss": {k: float(np.mean([p[k] for p in parts_log[-50:] if k in p])) for k in parts_log[-1]}
        if parts_log else None,
        "seconds": round(elapsed, 1),
        "steps_per_second": round((step - start_step) / elapsed, 3) if elapsed > 0 and step > start_step else None,
        "device": str(accelerator.device),
        "processes": accelerator.num_processes,
        "seed": seed,
        "n_loops": len(loops),
        "objective": cfg.objective,
        "init": None if init is None else str(init),
        "parameters": sum(p.numel() for p in ema.parameters()),
        "history": history,
    }
    if accelerator.is_main_process:
        final = out / "final"
        save_generator(copy.deepcopy(ema).float().cpu(), final, cfg.objective, cfg.linear if linear else cfg.flow)
        (final / "training_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        if codec is not None:
            save_sample_grid(ema_flow, preview_batch, codec, out / "samples" / "final.png", seed=seed)
    save_checkpoint(accelerator, out, step, history=history)  # every process: accelerate saves each one's state
    return metrics


def train(args: argparse.Namespace) -> int:
    """Entry point of ``echolvfm train generator``."""
    from ..data.prepared import PreparedLoops
    from ..models.vae import EchoCodec
    from ..pipelines.counterfactual import default_models_dir

    cfg = preset_from_args(train_preset, args)
    if args.flow == "linear":
        cfg = as_linear_baseline(cfg)
    vae = Path(args.vae or default_models_dir() / "vae")
    if not (vae / "config.json").is_file():
        raise GeneratorTrainingError(f"No VAE in {vae}: the generator trains on latents; train one with "
                                     "`echolvfm train vae` or pass --vae DIR.")
    accelerator = make_accelerator(args.device)  # the run's processes; fit makes the same one
    codec = EchoCodec.from_pretrained(vae, device=accelerator.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = None if cfg.phantom else "camus"
    train_ds = PreparedLoops(args.data, split="train", source=source)
    if len(train_ds) == 0 and source == "camus":
        train_ds = PreparedLoops(args.data, split="train")
    if len(train_ds) == 0:
        raise GeneratorTrainingError(f"{args.data} has no training loops; run `echolvfm prepare` with loops per "
                                     "patient > 0.")
    valid_ds = PreparedLoops(args.data, split="valid", source=source)
    with accelerator.main_process_first():  # the main process writes the latent caches, the others then read them
        loops = encode_loops(train_ds, codec, out / "latents_train.pt", desc="encode train loops")
        preview = (encode_loops(valid_ds, codec, out / "latents_valid.pt", desc="encode valid loops")
                   if len(valid_ds) else None)
    log.info("training loops: %d (%d patients); preview loops: %d", len(loops), len(set(loops.patient)),
             len(preview) if preview is not None else 0)
    supervise_motion = cfg.objective == "meanflow" and cfg.flow.displacement_weight > 0
    deformations = [train_ds.deformation(k) for k in range(len(train_ds))] if supervise_motion else None
    metrics = fit(loops, cfg, out, codec=codec, seed=args.seed, device=args.device, resume=args.resume, preview=preview,
                  deformations=deformations, init=args.init)
    flags = "".join(f" --{name} {value}" for name, value in (("steps", args.steps), ("vae", args.vae),
                                                              ("init", args.init)) if value is not None)
    flags += " --flow linear" if args.flow == "linear" else ""
    run = {"data": str(args.data), "preset": args.preset, "train_patients": len(set(loops.patient)),
           "command": f"echolvfm train generator --data {args.data} --preset {args.preset} --seed {args.seed}"
                      f"{flags} --out {args.out}"}
    metrics.update(run)
    if not accelerator.is_main_process:
        return 0
    for folder in (out, out / "final"):
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    write_model_card(out / "final")
    log.info("final loss %s; %s steps/s on %s; generator written to %s", metrics["final_loss"],
             metrics["steps_per_second"], metrics["device"], out / "final")
    return 0


# ------------------------------------------------------------------------------------------------------ model card
#: Where ``echolvfm evaluate --card`` keeps the generation section next to the model.
EVALUATION_FILE = "evaluation.json"


def _agreement_rows(evaluation: dict) -> str:
    rows = []
    labels = (("rec", "Rec"), ("gen", "Gen"), ("rec_reject", "Rec, best of k"), ("gen_reject", "Gen, best of k"))
    for key, label in labels:
        if key not in evaluation:  # evaluated without rejection sampling
            continue
        a = evaluation[key]
        rows.append(f"| {label} | {a['r2']:.3f} | {a['mae']:.2f} | {a['rmse']:.2f} | {a['n']} | {a['unmeasured']} |")
    return "\n".join(rows)


def write_model_card(final: Path) -> Path:
    """``final/MODEL_CARD.md`` from the folder's own files: ``training_config.json``, ``metrics.json`` (written by
    :func:`train`) and, once ``echolvfm evaluate --sections generation --card`` has run, ``evaluation.json``."""
    final = Path(final)
    cfg = json.loads((final / "training_config.json").read_text())
    metrics = json.loads((final / "metrics.json").read_text())
    ev_path = final / EVALUATION_FILE
    evaluation = json.loads(ev_path.read_text()) if ev_path.is_file() else None
    flow, model = cfg["flow"], cfg["model"]
    if evaluation is None:
        measured = ("Not measured yet: run `echolvfm evaluate --prepared DATA --models MODELS --sections generation "
                    "--card` with this folder as `MODELS/generator`.")
    else:
        gen = evaluation["generation"]
        measured = f"""Protocol of the EchoLVFM paper's Table 1 (`echolvfm_core/pipelines/evaluation.py`) on the
`{evaluation["split"]}` split of `{evaluation["data"]}`: per patient its alpha = 1 loop (real ED / ES anatomy,
synthesised motion), end-diastole observed, {gen["seeds"]} noise seeds; Rec asks for the loop's own EF, Gen for an EF
drawn from [10, 90] at least 5 points away; EF measured back by the bundled segmenter (one pass per frame);
"best of k": rejection sampling over {gen["reject"]} candidates by the segmenter's EF (1: not run).
{gen["n"]} patients.

| condition | R^2 | MAE | RMSE | n | unmeasured |
|---|---|---|---|---|---|
{_agreement_rows(gen)}

ES SSIM (Rec, generated frame at the real ES index vs the real ES frame): {gen["es_ssim"]:.3f}.
Paper targets (GPU-trained, EchoNet-Dynamic): Rec R^2 >= 0.6 and MAE <= 7, Gen MAE <= 12.{_spread_and_baseline(gen)}"""
    final_loss = metrics.get("final_loss") or {}
    linear = cfg.get("objective", "meanflow") == "linear"
    if linear:
        flow = cfg["linear"]
        what = (f"Linear flow-matching baseline of the one-step generator (the paper's 25-step comparison): given the "
                f"codec latents of the observed frames (any subset, at least one), the clip length (padding mask, up "
                f"to {model['max_frames']} frames) and a requested EF, 25 midpoint steps (50 network evaluations, "
                f"twice that with classifier-free guidance) return the latents of the whole loop")
        options = f'residual {flow["residual"]} (the flow carries each frame\'s difference from the observed frames ' \
                  f'interpolated in time), EF dropout {flow["ef_dropout"]:g}'
    else:
        kind = ("One-step generator trained by regression (it runs the MeanFlow sampler, but its objective has no "
                "MeanFlow term)" if flow.get("mf_weight", 1.0) == 0 else "One-step latent MeanFlow generator")
        what = (f"{kind} of apical four-chamber loops: given the codec latents of the observed frames (any subset, at "
                f"least one), the clip length (padding mask, up to {model['max_frames']} frames) and a requested EF, "
                f"one network evaluation returns the latents of the whole loop (`echolvfm generate`, the Studio's EF "
                f"slider)")
        options = f'residual {flow["residual"]} (the flow carries each frame\'s difference from the observed frames ' \
                  f'interpolated in time), prediction "{flow["prediction"]}"'
    init = f" Warm start: `{metrics['init']}`." if metrics.get("init") else ""
    text = f"""# EchoLVFM generator ({metrics.get("preset", "?")} preset{", linear baseline" if linear else ""})

{what}.
Spatio-temporal U-Net (`EchoVelocityUNet`, diffusers blocks), {metrics.get("parameters", 0) / 1e6:.2f} M parameters;
flow options: {options}.

Objective: {_linear_objective(flow) if linear else _objective(flow)}{init}
{_calibration(final)}

## Data
- Prepared folder `{metrics.get("data")}` (`echolvfm prepare`): CAMUS apical 4CH ED / ES pairs with synthesised
  loops (4 per patient: the real ED -> ES motion and three counterfactual contractions of the same ED image; see
  the data issue). No real full cines exist here: motion between ED and ES is synthesised.
- Training split: {metrics.get("train_patients")} patients, {metrics.get("n_loops")} loops, encoded once by the
  bundled codec. Clips of {cfg["observation"]["min_frames"]}-{cfg["observation"]["max_frames"]} frames; observed
  frames drawn from five patterns; with probability {cfg["counterfactual_prob"]:g} the observed frames come from
  another loop of the same patient (same anatomy, other EF).
- Metrics: the valid split, never used in training. CAMUS (Leclerc et al., IEEE TMI 2019) is for non-commercial
  research; cite it when reporting results.

## EF adherence (valid split)
{measured}

## Training
{metrics.get("steps")} steps, batch {cfg["batch_size"]}, AdamW lr {cfg["lr"]:g} (warm-up {cfg["warmup"]}, cosine),
EMA {cfg["ema_decay"]:g}, seed {metrics.get("seed")}, device {metrics.get("device")},
{metrics.get("seconds", 0) / 60:.0f} min;
final training loss {final_loss.get("loss", float("nan")):.4f} ({_loss_parts(final_loss)}).
Configuration: `training_config.json`, flow: `flow.json`.

## Reproduce
```bash
echolvfm prepare --camus CAMUS_DIR --out {metrics.get("data")} --loops-per-patient 4 --phantom 200 --seed 0
{metrics.get("command")}
```
then copy `OUT/final` to `assets/generator`, choose the sampling motion gain of a warp generator with
`echolvfm calibrate-gain --prepared {metrics.get("data")}`, and run `echolvfm evaluate --prepared {metrics.get("data")}
--models assets --sections generation --card --out runs/eval_generator`.

## Limits
Trained on synthesised motion of one data set's apical 4CH views; the generated loops are synthetic, for teaching and
research on realism, never for diagnosis. Not a medical device. The EF adherence above is measured on loops
synthesised the way the training loops were (the same registration-based motion model, on patients the model never
saw) and read by a segmenter trained on the same data set's frames; on a cine from another scanner the measured EF
can sit far from the request (docs/models.md reports the built-in DICOM sample).
"""
    path = final / "MODEL_CARD.md"
    path.write_text(text, encoding="utf-8")
    return path


def _spread_and_baseline(gen: dict) -> str:
    """The card's seed-spread sentence and linear-baseline rows of an ``evaluate --sections generation`` result ("" for
    parts it does not hold)."""
    text = ""
    if "ms_per_video" in gen:
        text += f"\nTime per video (encode, {gen.get('steps', 1)} step(s), decode; CPU): {gen['ms_per_video']:.0f} ms."
    spread = gen.get("seed_spread")
    if spread:
        text += (f"\n\nSeed spread ({spread['n']} patients, {spread['seeds']} seeds at each of two requests "
                 f"{spread['gap']:g} points apart): the measured EF's standard deviation over seeds is "
                 f"{spread['ef_sd']:.2f} points (ES frame {spread['es_frame_sd']:.2f} frames, pixels "
                 f"{spread['pixel_sd']:.4f}), against {spread['request_gap']:.2f} points between the two requests' "
                 f"mean measured EFs.")
    base = gen.get("baseline")
    if base:
        rows = []
        for key in ("unguided", "guided"):
            b = base[key]
            for cond in ("rec", "gen"):
                a = b[cond]
                rows.append(f"| linear, {b['steps']} {base['solver']} steps, guidance {b['guidance']:g}, "
                            f"{cond.capitalize()} | {a['r2']:.3f} | {a['mae']:.2f} | {a['rmse']:.2f} | "
                            f"{b['ms_per_video']:.0f} |")
        for cond in ("rec", "gen"):
            a = gen[cond]
            rows.append(f"| this model, one step, {cond.capitalize()} | {a['r2']:.3f} | {a['mae']:.2f} | "
                        f"{a['rmse']:.2f} | {gen['ms_per_video']:.0f} |")
        text += (f"\n\nLinear flow-matching baseline (`{base['folder']}`), same videos and segmenter, "
                 f"{base['unguided']['seeds']} seed(s) per video, without rejection:\n\n"
                 f"| generator, condition | R^2 | MAE | RMSE | ms per video |\n|---|---|---|---|---|\n"
                 + "\n".join(rows)
                 + f"\n\nThe baseline takes {base['speed_ratio']:.1f}x the time of the one-step model per video "
                   f"({base['speed_ratio_guided']:.1f}x with guidance).")
    return text


def _linear_objective(flow: dict) -> str:
    """The training objective of a saved linear flow configuration, for the model card."""
    return (f"masked linear flow matching (the instantaneous velocity, time logit-normal mean {flow['time_mean']:g}), "
            f"the EF replaced by the learned null embedding in {flow['ef_dropout']:.0%} of clips.")


def _objective(flow: dict) -> str:
    """One or two sentences on the training objective of a saved flow configuration, for the model card."""
    one_step = flow.get("one_step_share", 0.0)
    motion = ""
    if flow.get("displacement_weight", 0.0):
        motion = (f" The displacement field is also supervised (weight {flow['displacement_weight']:g}, squared error "
                  f"in latent pixels) by the registration field each CAMUS loop was rendered with, on clips with one "
                  f"observed frame.")
    if flow.get("mf_weight", 1.0) == 0:
        return (f"the reconstruction regulariser alone (no MeanFlow term), on {one_step:.0%} of clips drawn at the "
                f"one-step interval (r, t) = (0, 1): regression of the one-step sample onto the data, so the model "
                f"returns close to the expected loop for the observed frames and the EF, and different noise seeds "
                f"give nearly the same loop.{motion}")
    linear_ratio = flow.get("linear_ratio", 0.0)
    text = (f"masked MeanFlow on {1 - linear_ratio:.0%} of the steps (masked linear flow matching, r = t, on the "
            f"others), JVP tangent from "
            + ("the network's own instantaneous velocity (Improved Mean Flows)" if flow.get("tangent") == "predicted"
               else "the conditional velocity eps - x")
            + f", adaptive weighting p = {flow['adaptive_p']:g}, share of r < t samples {flow['share_r_neq_t']:g}"
            + (f" with intervals growing from short to full over the first {flow['interval_warmup']} steps"
               if flow.get("interval_warmup") else "")
            + f", time logit-normal mean {flow['time_mean']:g}")
    if one_step:
        text += f", {one_step:.0%} of clips at the one-step interval (r, t) = (0, 1)"
    if flow.get("recon_weight", 0):
        text += f", reconstruction regulariser weight {flow['recon_weight']:g} on {flow['recon_on']} samples"
    return text + "." + motion


def _calibration(final: Path) -> str:
    """The card's paragraph on the sampling motion gain (``echolvfm calibrate-gain``), or "" when not calibrated."""
    path = final / "calibration.json"
    if not path.is_file():
        return ""
    cal = json.loads(path.read_text())
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    rows = "\n".join(f"| {c['gain']:g} | {fmt(c['mae'])} | " + " | ".join(map(fmt, c["mean_measured"].values())) + " |"
                     for c in cal["candidates"])
    heads = " | ".join(f"mean measured at {e:g} %" for e in cal["efs"])
    return f"""
Sampling motion gain {cal["chosen_gain"]:g}: the displacement field is multiplied by it when sampling (training is
unchanged), chosen by `{cal["command"]}` as the candidate whose measured EFs (bundled segmenter, one pass) came
closest to the requests on {cal["patients"]} `{cal["split"]}` patients (ED observed, seed {cal["seed"]}):

| gain | MAE | {heads} |
|---|---|{"---|" * len(cal["efs"])}
{rows}
"""


def _loss_parts(parts: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in parts.items() if k not in ("loss", "linear")) or "no parts logged"


# ------------------------------------------------------------------------------------------------------ benchmark
def _timed(fn, device: torch.device, repeats: int) -> tuple[float, float, float | None]:
    """(median wall seconds, median process CPU seconds, peak CUDA memory in MiB or None) after one warm-up call.

    The CPU time (all threads of this process) tells the work done even on a shared machine, where wall time
    also counts the time other processes hold the cores.
    """
    cuda = device.type == "cuda"
    fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return float(np.median(wall)), float(np.median(cpu)), peak


def bench_generator(preset: str = "demo", batch: int = 1, device: str = "cpu", dtype: str | torch.dtype = "float32",
                    frames: int = 32, repeats: int = 5, linear_steps: int = 25, train_batch: int | None = None,
                    seed: int = 0) -> dict:
    """Time the generator in one process: one-step MeanFlow vs ``linear_steps``-step midpoint sampling, and one
    training step (forward + backward) MeanFlow with JVP (every sample r < t) vs plain flow matching.

    Args:
        preset: network preset (random weights: the timing does not depend on them).
        batch: videos per sampling call; train_batch: clips per training step (default ``batch``).
        device: "cpu" or "cuda"; dtype: "float32", "bfloat16" or "float16" (training steps run under autocast
            for half types on CUDA, in float32 on CPU).
        frames: frames per video (latent 28 x 28).

    Returns:
        dict with ``one_step`` / ``linear`` {ms_per_call, ms_per_video, videos_per_s, cpu_ms_per_call},
        ``speedup`` (linear time / one-step time), ``train_step`` {meanflow_jvp, flow_matching: {ms, cpu_ms,
        peak_mib}, ratio}, and the setup. Times are medians of wall time (``cpu_ms``: process CPU time).
    """
    dev = torch.device(device)
    dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    g = torch.Generator().manual_seed(seed)
    net = EchoVelocityUNet.from_preset(preset).to(dev).eval()
    c, hw = net.config.latent_channels, net.config.sample_size

    def make_batch(b: int) -> VideoBatch:
        x = torch.randn(b, c, frames, hw, hw, generator=g)
        obs = torch.zeros(b, frames, dtype=torch.bool)
        obs[:, 0] = True
        cond = Conditioning.from_latents(x, obs, torch.ones_like(obs), torch.full((b,), 50.0))
        return VideoBatch(x, cond).to(dev)

    result = {
        "preset": preset, "parameters": sum(p.numel() for p in net.parameters()), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": str(dt).replace("torch.", ""), "batch": batch, "frames": frames, "threads": torch.get_num_threads(),
        "jvp_flash_attention": jvp_flash_available() and dev.type == "cuda",
    }
    infer_net = copy.deepcopy(net)
    if dt != torch.float32:
        infer_net.to(dt)
    if dev.type == "cpu":
        infer_net.to(memory_format=torch.channels_last)  # as the pipeline runs it on CPU
    cond = make_batch(batch).cond.to(dev, dt)
    one = MeanFlow(infer_net)
    lin = LinearFlow(infer_net)
    with torch.inference_mode():
        t_one, c_one, _ = _timed(lambda: one.sample(cond, steps=1, generator=torch.Generator(dev).manual_seed(0)),
                                 dev, repeats)
        t_lin, c_lin, _ = _timed(lambda: lin.sample(cond, steps=linear_steps, solver="midpoint",
                                                    generator=torch.Generator(dev).manual_seed(0)),
                                 dev, max(1, repeats // 3))
    for name, wall, cpu in (("one_step", t_one, c_one), ("linear", t_lin, c_lin)):
        result[name] = {"ms_per_call": round(wall * 1e3, 2), "ms_per_video": round(wall * 1e3 / batch, 2),
                        "videos_per_s": round(batch / wall, 2), "cpu_ms_per_call": round(cpu * 1e3, 2)}
    result["linear"]["steps"] = linear_steps
    result["linear"]["network_calls"] = 2 * linear_steps
    result["speedup"] = round(t_lin / t_one, 1)
    del infer_net

    tb = train_batch or batch
    train_data = make_batch(tb)
    net.train()
    autocast = dev.type == "cuda" and dt in (torch.bfloat16, torch.float16)

    def step(flow):
        def run():
            net.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=dt, enabled=autocast):
                loss = flow(train_data, generator=torch.Generator(dev).manual_seed(0)).loss
            loss.backward()
        return run

    t_mf, c_mf, mem_mf = _timed(step(MeanFlow(net, share_r_neq_t=1.0)), dev, max(1, repeats // 2))
    t_fm, c_fm, mem_fm = _timed(step(LinearFlow(net, ef_dropout=0.0)), dev, max(1, repeats // 2))
    result["train_step"] = {
        "batch": tb,
        "meanflow_jvp": {"ms": round(t_mf * 1e3, 1), "cpu_ms": round(c_mf * 1e3, 1),
                         "peak_mib": None if mem_mf is None else round(mem_mf, 1)},
        "flow_matching": {"ms": round(t_fm * 1e3, 1), "cpu_ms": round(c_fm * 1e3, 1),
                          "peak_mib": None if mem_fm is None else round(mem_fm, 1)},
        "ratio": round(t_mf / t_fm, 2),
    }
    return result
