"""Train the one-step generator: ``echolvfm train generator --data PREPARED --out DIR [--preset NAME] [--vae DIR]
[--init DIR] [--flow meanflow|linear]``, NAME a key of ``TRAIN_PRESETS`` (below).

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
   same data, schedule, network and output parameterisation, the "warp" one included; :func:`as_linear_baseline`),
   through accelerate (CPU, one GPU, or ``accelerate launch --multi_gpu -m echolvfm_core.cli train generator
   ...``), bf16 on GPU, AdamW with warm-up and cosine decay, gradient clipping, an EMA copy of the weights (what is
   saved), checkpoint / resume, tqdm with the loss parts, and PNG sample grids (observed frame, real loop, generated
   loop) decoded with the codec.

``--init DIR`` warm-starts the network from a saved generator (every weight whose name and shape match; the rest
keeps its initialisation). The final EMA model goes to ``DIR/final`` (``save_pretrained`` + ``flow.json`` ("meanflow"
or "linear") + ``training_config.json``), the run summary to ``DIR/metrics.json``, the model card to
``DIR/final/MODEL_CARD.md`` (:mod:`echolvfm_core.pipelines.generator_card`).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
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
from ..models.unet import EchoVelocityUNet, UNetConfig, unet_preset
from ..pipelines.counterfactual import save_generator
from ..pipelines.generator_card import write_model_card
from .common import (
    TrainingError,
    TrainingRun,
    adamw_warmup_cosine,
    ema_weights,
    make_accelerator,
    preset_from_args,
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
    "warm_start_lineage",
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
        grad_clip: max global gradient norm. ema_decay: EMA of the weights (diffusers ``EMAModel``, warm-up
            ``(1+s)/(10+s)``).
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
        if self.objective == "linear" and bool(self.model.displacement_channels) != (self.linear.prediction == "warp"):
            raise ValueError("The linear baseline's network has a displacement output exactly when it predicts "
                             "through a warp (prediction 'warp').")

    @property
    def supervises_motion(self) -> bool:
        """Whether the objective's displacement field is supervised by the clips' known motion."""
        return (self.linear if self.objective == "linear" else self.flow).displacement_weight > 0


def as_linear_baseline(cfg: GeneratorTrainConfig, ef_dropout: float = 0.1) -> GeneratorTrainConfig:
    """The linear flow-matching baseline of a MeanFlow run: the same data, clips, schedule and network, the same
    residual flow, observed-frame weight and output parameterisation (a "warp" run's baseline predicts through the
    same warp of the observed frames, its displacement field supervised with the same weight; any other prediction
    becomes a plain velocity output, without the displacement channels), with the EF dropped for ``ef_dropout`` of
    clips so that sampling can use classifier-free guidance."""
    flow = cfg.flow
    if flow.prediction == "warp":
        linear = LinearFlowConfig(residual=True, ef_dropout=ef_dropout, observed_weight=flow.observed_weight,
                                  prediction="warp", displacement_gain=flow.displacement_gain,
                                  displacement_weight=flow.displacement_weight)
        return dataclasses.replace(cfg, objective="linear", linear=linear)
    linear = LinearFlowConfig(residual=flow.residual, ef_dropout=ef_dropout, observed_weight=flow.observed_weight)
    return dataclasses.replace(cfg, objective="linear", model=dataclasses.replace(cfg.model, displacement_channels=0),
                               linear=linear)


TRAIN_PRESETS = {
    "demo": GeneratorTrainConfig(),
    "paper": GeneratorTrainConfig(model=unet_preset("paper"), steps=100000, lr=1e-4, sample_every=5000),
    # The regression the bundled model starts from (the model bundled before issue 27): the demo network on two idle CPU
    # cores for about 40 minutes. The flow carries the motion relative to the observed frames (residual), the network
    # sees the anchor at every frame (context channels) and moves it by a displacement field (prediction "warp"), so the
    # anatomy needs no learning. From scratch, the MeanFlow objective did not learn the EF-dependent motion on the CPU:
    # ten runs of up to 1100 steps gave still hearts at every requested EF (docs/models.md). This preset therefore
    # trains the one-step sample alone, by regression onto the data (the reconstruction regulariser at (r, t) = (0, 1),
    # no MeanFlow term), which learns the expected loop given the observed frames and the EF: a close to deterministic
    # generator. Most clips hold a whole cycle from ED with ED observed (the app's default and the evaluation's
    # protocol), so the clip length fixes the timing of systole; clips have at most 16 frames (half the work of 32; the
    # app shows 16-frame loops with this model). The displacement field is also supervised by the registration field
    # each CAMUS loop was rendered with (displacement_weight): trained on the image error alone, the field stayed too
    # small (the error of warping the anchor by the true field, 0.13, is above what a blurred loop reaches, 0.10).
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
    # regression (`--init DIR`; same network, so the motion it learnt is kept). Half of the steps are
    # MeanFlow steps (JVP target with stop-gradient; tangent from the network's own instantaneous velocity, Improved
    # Mean Flows; adaptive weighting p = 0.5; half of their clips at r < t, the intervals growing from short to full
    # over the first 500 steps; a quarter of their clips at the one-step interval (0, 1) with the reconstruction
    # regulariser on them), the other half masked linear flow matching (r = t); the displacement field stays
    # supervised by the registration field. 25 min with one thread on two shared cores. The bundled generator is two
    # such runs in a row from the regression, then a cpu_meanflow_recon_half run (its card lists the commands); every
    # run and its numbers are in docs/models.md. `echolvfm train generator --flow linear` with this preset trains the
    # linear baseline on the same data, schedule and warp output. The demo preset is the GPU schedule.
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
# A 500-step continuation of a cpu_meanflow result (`--init DIR`) with the reconstruction regulariser at half weight,
# the MeanFlow terms and the displacement supervision as they were. The regulariser pulls every noise draw of the
# one-step sample onto the one training loop, so at full weight different seeds gave nearly the same loop (EF SD 1.46
# over 8 seeds); at half weight the seeds spread (1.68) and the EF follows the request as closely. Halving the
# displacement supervision as well spread them further (1.92) but the field alone, which renders acquired beats, then
# followed the request less well. The bundled generator ends with this run (docs/models.md).
TRAIN_PRESETS["cpu_meanflow_recon_half"] = dataclasses.replace(
    TRAIN_PRESETS["cpu_meanflow"], steps=500,
    flow=dataclasses.replace(TRAIN_PRESETS["cpu_meanflow"].flow, recon_weight=0.5))


def train_preset(name: str) -> GeneratorTrainConfig:
    """The :class:`GeneratorTrainConfig` of preset ``name`` (a key of ``TRAIN_PRESETS``)."""
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
    def load(cls, path: Path) -> LatentLoops:
        d = torch.load(path, weights_only=True)
        return cls(d["latents"], np.asarray(d["ef"], np.float64), np.asarray(d["ed_index"], np.int64),
                   list(d["patient"]), list(d["loop_id"]), d["fingerprint"])


def _source_hash(ds, codec) -> str:
    """Hash of the data folder view (meta, loop IDs) and the codec (config, latent statistics) latents come from."""
    h = hashlib.sha256()
    h.update(json.dumps(ds.meta, sort_keys=True, default=str).encode())
    h.update(json.dumps([r["loop_id"] for r in ds.manifest]).encode())
    h.update(json.dumps(dict(codec.vae.config), sort_keys=True, default=str).encode())
    h.update(json.dumps([list(codec.stats.mean), list(codec.stats.std)]).encode())
    return h.hexdigest()[:16]


def encode_loops(ds, codec, cache: Path | None = None, desc: str = "encode loops") -> LatentLoops:
    """Encode every loop of ``ds`` (a ``PreparedLoops`` view) with ``codec``; reuse / write ``cache`` when given."""
    from tqdm.auto import tqdm

    fp = _source_hash(ds, codec)
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
    return VideoBatch(torch.stack(xs),
                      Conditioning(torch.stack(conds), torch.stack(obs), torch.stack(fms), torch.tensor(efs)))


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
    run = TrainingRun(out, cfg.steps, seed, device, desc="generator", checkpoint_every=cfg.checkpoint_every)
    accelerator, out = run.accelerator, run.out
    net = EchoVelocityUNet.from_preset(cfg.model)
    if init is not None:
        fresh = load_init_weights(net, init)
        log.info("warm start from %s; left at initialisation: %s", init, ", ".join(fresh) or "nothing")
    linear = cfg.objective == "linear"
    if not linear:
        net.null_ef.requires_grad_(False)  # MeanFlow does not drop the EF; frozen so DDP sees no unused parameter
    flow = LinearFlow(net, cfg.linear) if linear else MeanFlow(net, cfg.flow)
    optimizer, scheduler = adamw_warmup_cosine([p for p in net.parameters() if p.requires_grad], cfg.lr,
                                               cfg.weight_decay, cfg.warmup, cfg.steps, floor=0.1, betas=(0.9, 0.99))
    flow, optimizer, scheduler = accelerator.prepare(flow, optimizer, scheduler)
    ema = run.ema(net, cfg.ema_decay)
    run.restore(resume)
    history = run.state.setdefault("history", [])

    def ema_flow() -> MeanFlow | LinearFlow:
        """The flow over the EMA weights (what sample grids show and what is saved)."""
        averaged = ema_weights(ema, net)
        return LinearFlow(averaged, cfg.linear) if linear else MeanFlow(averaged, cfg.flow)

    sampler = ClipSampler(loops, cfg.observation, cfg.counterfactual_prob, cfg.random_start_prob, cfg.whole_cycle_prob,
                          deformations if cfg.supervises_motion else None)
    per_process = max(1, cfg.batch_size // accelerator.num_processes)
    preview_batch = _preview_batch(preview if preview is not None and len(preview) else loops, cfg)
    parts_log: list[dict[str, float]] = []
    while run.step < cfg.steps:
        step = run.step
        g = torch.Generator().manual_seed(seed * 1_000_003 + step * 7919 + accelerator.process_index)
        batch = sampler.batch(per_process, g).to(accelerator.device)
        noise_gen = torch.Generator(accelerator.device).manual_seed(
            seed * 1_000_033 + step * 31 + accelerator.process_index)
        flow.train()
        with accelerator.autocast():
            loss = flow(batch, step=step, generator=noise_gen)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss.loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.step(accelerator.unwrap_model(flow).net.parameters())
        parts_log.append(_process_mean(accelerator, {"loss": loss.loss, **loss.parts}))
        recent = {k: float(np.mean([p[k] for p in parts_log[-50:] if k in p])) for k in parts_log[-1]}
        run.bar.set_postfix({k: f"{v:.4f}" for k, v in recent.items() if k != "linear"})
        done = step + 1
        if codec is not None and cfg.sample_every and done % cfg.sample_every == 0 and accelerator.is_main_process:
            save_sample_grid(ema_flow(), preview_batch, codec, out / "samples" / f"step_{done:06d}.png", seed=seed)
        if run.checkpoint_due():
            history.append({"step": done, **recent})
        run.advance()
    summary = run.end()
    final_flow = ema_flow()
    metrics = {
        **summary,
        "final_loss": {k: float(np.mean([p[k] for p in parts_log[-50:] if k in p])) for k in parts_log[-1]}
        if parts_log else None,
        "n_loops": len(loops),
        "objective": cfg.objective,
        "init": None if init is None else str(init),
        "parameters": sum(p.numel() for p in final_flow.net.parameters()),
        "history": history,
    }

    def save(final: Path) -> None:
        save_generator(copy.deepcopy(final_flow.net).float().cpu(), final, cfg.objective,
                       cfg.linear if linear else cfg.flow)
        if codec is not None:
            save_sample_grid(final_flow, preview_batch, codec, out / "samples" / "final.png", seed=seed)

    run.save_final(cfg, metrics, save)
    return metrics


def warm_start_lineage(init: str | Path | None) -> list[str]:
    """The training commands that made the ``--init`` model, oldest first: its own recorded ``lineage`` and then its
    ``command`` (from its ``metrics.json``); empty without a warm start or when the folder has no metrics."""
    path = None if init is None else Path(init) / "metrics.json"
    if path is None or not path.is_file():
        return []
    prior = json.loads(path.read_text())
    return [*prior.get("lineage", []), *([prior["command"]] if prior.get("command") else [])]


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
    deformations = [train_ds.deformation(k) for k in range(len(train_ds))] if cfg.supervises_motion else None
    metrics = fit(loops, cfg, out, codec=codec, seed=args.seed, device=args.device, resume=args.resume, preview=preview,
                  deformations=deformations, init=args.init)
    overrides = (("steps", args.steps), ("lr", args.lr), ("vae", args.vae), ("init", args.init))
    flags = "".join(f" --{name} {value}" for name, value in overrides if value is not None)
    flags += " --flow linear" if args.flow == "linear" else ""
    run = {"data": str(args.data), "preset": args.preset, "train_patients": len(set(loops.patient)),
           "command": f"echolvfm train generator --data {args.data} --preset {args.preset} --seed {args.seed}"
                      f"{flags} --out {args.out}", "lineage": warm_start_lineage(args.init)}
    metrics.update(run)
    if not accelerator.is_main_process:
        return 0
    for folder in (out, out / "final"):
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    write_model_card(out / "final")
    log.info("final loss %s; %s steps/s on %s; generator written to %s", metrics["final_loss"],
             metrics["steps_per_second"], metrics["device"], out / "final")
    return 0
