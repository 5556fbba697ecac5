"""Train EchoJEPA: ``echolvfm train jepa --data PREPARED --preset demo|cpu|tiny --out DIR``.

V-JEPA (Bardes et al. 2024) on echo loops. One step: the EMA target encoder encodes the whole clip and its tokens
are layer-normed (:func:`target_features`); for every mask family the context encoder encodes the visible tokens
and the predictor fills in the masked ones (:func:`context_predictions`); the loss is the L1 distance between
predictions and targets (:func:`jepa_loss`, V-JEPA eq. 1). The target encoder is a frozen deep copy of the
context encoder updated under ``no_grad`` as ``target = m target + (1 - m) context`` with ``m`` rising linearly
over training (:func:`momentum`, :func:`~echolvfm_core.training.common.ema_update`).

Clips: 16 frames over 1 to ``max_cycles`` cycles of a loop from a random phase, with strong geometric augmentation
(zoom about the apex, rotation, shift: the counterpart of V-JEPA's random resized crops) and ultrasound augmentation;
every training-split loop (real anatomy and phantoms). After training, ``DIR/final`` holds the model (its encoder is
the EMA target encoder), ``probe/`` (the attentive EF probe) and ``real_stats.npz`` (reference statistics for
``fvd_jepa`` / ``fid_jepa``), and ``DIR/metrics.json`` the measured read-outs (:func:`evaluate_representation`):
attentive and linear probe EF MAE on the valid split's CAMUS loops (and the attentive probe reading the tokens
beside their change), the same probes on a randomly initialised encoder, the features' effective rank and share of
change over the clip (both encoders), a sample-efficiency curve, a robustness table and the ``fvd_jepa`` ranking
real < speckle < phantom.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.jepa_masks import (
    DEFAULT_MASKS,
    BlockMaskConfig,
    MaskedBatch,
    MultiBlockMaskCollator,
    TimeStepMaskConfig,
)
from ..estimators.ef_posterior import clip_indices
from ..estimators.jepa import (
    PROBE_DIR,
    STATS_FILE,
    FeatureStats,
    effective_rank,
    encode_clips,
    fid_jepa,
    fvd_jepa,
    loop_clips,
    predict,
    temporal_share,
)
from ..models.jepa import (
    AttentiveProbe,
    EchoJEPA,
    JEPAConfig,
    LinearProbe,
    VideoViT,
    jepa_preset,
)
from .augment import AugmentConfig, augment_batch
from .common import (
    TrainingError,
    TrainingRun,
    adamw_warmup_cosine,
    ema_update,
    preset_from_args,
    set_seed,
)
from .probes import PERTURBATIONS, fit_probe, perturbation

__all__ = ["JEPATrainConfig", "TRAIN_PRESETS", "train_preset", "LoopClipSampler", "momentum",
           "target_features", "context_predictions", "jepa_loss", "fit", "evaluate_representation", "train"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JEPATrainConfig:
    """Schedule of a JEPA run (saved beside the model as ``training_config.json``).

    Attributes:
        model: network size. masks: the mask families of every clip.
        steps, batch_size: optimiser steps and clips per step.
        lr, weight_decay, warmup: AdamW, linear warm-up then cosine decay to 5 % of ``lr``.
        ema: target-encoder momentum at the first and the last step (linear in between).
        max_cycles: clips cover 1 to ``max_cycles`` cycles of a loop from a random phase.
        checkpoint_every: in steps (0 = only at the end).
        loops_per_patient: use only each patient's first loops (the first is alpha = 1; None: all). Rendering a
            loop takes about 0.5 s on a busy CPU core, so the CPU schedule reads fewer of them.
        probe_steps: optimiser steps of every EF probe; fractions: label shares of the sample-efficiency curve.
        probe_queries, probe_motion: the attentive probes' learned queries, and whether they read the tokens'
            change over the clip (:func:`~echolvfm_core.models.jepa.temporal_deviation`) instead of the tokens.
    """

    model: JEPAConfig = field(default_factory=JEPAConfig)
    masks: tuple[BlockMaskConfig | TimeStepMaskConfig, ...] = DEFAULT_MASKS
    steps: int = 6000
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 0.04
    warmup: int = 300
    ema: tuple[float, float] = (0.996, 1.0)
    max_cycles: float = 1.5
    checkpoint_every: int = 500
    loops_per_patient: int | None = None
    probe_steps: int = 1500
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)
    probe_queries: int = 16
    probe_motion: bool = True
    # every clip zoomed 1-1.8x about the apex, rotated and shifted: all CAMUS views put the same anatomy at the same
    # tokens, and with the mild geometry the encoder used before (10 % zoom, 4 % shift) its features came to
    # say where a token is rather than how the heart there moves (EF probe 10.2 after 1500 steps, 9.7 with a
    # random encoder; 8.7 after 800 steps with this one)
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(p_geometry=1.0, max_rotation=15.0, scale_range=(1.0, 1.8), max_shift=0.15,
                                              speckle_max=0.2, p_dropout=0.2, p_far_dropout=0.1)
    )


#: ``demo``: the bundled model's schedule (64 min on two CPU cores plus 5 min of read-outs): V-JEPA's tubes plus a
#: family that shows every place at 2-4 of the 8 tubelet time steps and asks for the others, so that the motion has
#: to be predicted, and no per-frame speckle augmentation; ``cpu``: the short schedule bundled before (about 6 min,
#: plus about 7 min of read-outs); ``tiny``: tests. Trials behind these choices: docs/models.md.
TRAIN_PRESETS = {
    "demo": JEPATrainConfig(steps=4000, masks=DEFAULT_MASKS + (TimeStepMaskConfig((2, 4)),),
                            augment=replace(JEPATrainConfig().augment, p_speckle=0.0)),
    "cpu": JEPATrainConfig(steps=800, batch_size=16, lr=1e-3, warmup=30, ema=(0.99, 0.999), checkpoint_every=200,
                           loops_per_patient=2),
    "tiny": JEPATrainConfig(model=jepa_preset("tiny"), steps=6, batch_size=2, warmup=1, ema=(0.9, 0.99),
                            checkpoint_every=3, probe_steps=5, fractions=(0.5, 1.0)),
}


def train_preset(name: str) -> JEPATrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"Unknown jepa preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}.")
    return TRAIN_PRESETS[name]


class LoopClipSampler:
    """Training clips from a loop data set (items with ``frames`` uint8 (T, S, S)); each loop is read once.

    ``sample(batch_size, generator)`` -> list of clips float (1, num_frames, S, S) in [0, 1], augmented, from the
    loops ``indices`` (default: all). ``frames(i)`` -> the cached uint8 frames of loop ``i``.
    """

    def __init__(self, loops, cfg: JEPATrainConfig, indices: list[int] | None = None):
        self.indices = list(range(len(loops))) if indices is None else list(indices)
        if not self.indices:
            raise ValueError("JEPA training needs loops; none were given.")
        self.loops, self.cfg = loops, cfg
        self._cache: dict[int, np.ndarray] = {}

    def frames(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = np.asarray(self.loops[i].frames)
        return self._cache[i]

    def sample(self, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
        g, t = generator, self.cfg.model.num_frames
        clips = []
        for j in torch.randint(0, len(self.indices), (batch_size,), generator=g).tolist():
            f = self.frames(self.indices[j])
            offset = float(torch.rand(1, generator=g))
            cycles = 1.0 + (self.cfg.max_cycles - 1.0) * float(torch.rand(1, generator=g))
            clips.append(torch.from_numpy(f[clip_indices(len(f), t, offset=offset, cycles=cycles)]))
        x, _ = augment_batch(torch.stack(clips).float() / 255.0, None, g, self.cfg.augment)
        return list(x[:, None])


def momentum(step: int, cfg: JEPATrainConfig) -> float:
    """EMA momentum at ``step``: linear from ``cfg.ema[0]`` to ``cfg.ema[1]`` over the run."""
    m0, m1 = cfg.ema
    return m0 + (m1 - m0) * min(1.0, step / max(1, cfg.steps))


@torch.no_grad()
def target_features(target: VideoViT, clips: torch.Tensor) -> torch.Tensor:
    """Layer-normed target-encoder tokens of whole clips (B, 1, T, S, S) -> (B, N, dim)."""
    h = target(clips)
    return F.layer_norm(h, (h.shape[-1],))


def context_predictions(model: EchoJEPA, batch: MaskedBatch) -> list[torch.Tensor]:
    """Per mask family, the predictor's features (B, Kt, dim) of the target tokens from the visible ones."""
    return [model.predictor(model.encoder(batch.clips, keep=ctx), ctx, tgt)
            for ctx, tgt in zip(batch.context, batch.targets)]


def jepa_loss(predictions: list[torch.Tensor], targets: torch.Tensor, target_idx: list[torch.Tensor]) -> torch.Tensor:
    """Mean over mask families of the L1 distance between predicted and target features at the target tokens."""
    d = targets.shape[-1]
    losses = [(p - torch.gather(targets, 1, idx[..., None].expand(-1, -1, d))).abs().mean()
              for p, idx in zip(predictions, target_idx)]
    return torch.stack(losses).mean()


def fit(sampler: LoopClipSampler, cfg: JEPATrainConfig, out: Path, seed: int = 0, device: str | None = None,
        resume: bool = False) -> tuple[EchoJEPA, dict]:
    """Train; writes ``out/final`` (model whose encoder is the EMA target, + ``training_config.json``).

    Returns the final model (on the CPU, eval mode) and the training metrics.
    """
    run = TrainingRun(out, cfg.steps, seed, device, desc="jepa", checkpoint_every=cfg.checkpoint_every)
    accelerator = run.accelerator
    model = EchoJEPA(**asdict(cfg.model))
    target = copy.deepcopy(model.encoder).requires_grad_(False)
    collator = MultiBlockMaskCollator(model.encoder.grid, cfg.masks, seed=seed)
    model, optimizer, lr_sched = accelerator.prepare(
        model, *adamw_warmup_cosine(model.parameters(), cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps))
    target.to(accelerator.device)
    accelerator.register_for_checkpointing(target)
    run.restore(resume)
    losses: list[float] = run.state.setdefault("losses", [])
    raw = accelerator.unwrap_model(model)
    while run.step < cfg.steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + run.step)
        batch = collator(sampler.sample(cfg.batch_size, g), generator=g)
        batch.clips = batch.clips.to(accelerator.device)
        model.train()
        with accelerator.autocast():
            h = target_features(target, batch.clips)
            loss = jepa_loss(context_predictions(raw, batch), h, batch.targets)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        ema_update(target, raw.encoder, momentum(run.step, cfg))
        losses.append(float(loss.detach()))
        run.bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        run.advance()
    summary = run.end()
    final = copy.deepcopy(raw).to("cpu").eval()
    final.encoder.load_state_dict(target.state_dict())
    metrics = {
        "params": int(sum(p.numel() for p in final.parameters())),
        "encoder_params": int(sum(p.numel() for p in final.encoder.parameters())),
        "first_loss": float(np.mean(losses[:20])) if losses else None,
        "final_loss": float(np.mean(losses[-20:])) if losses else None,
        **summary,
    }
    run.save_final(cfg, None, lambda folder: final.save_pretrained(str(folder)))
    return final, metrics


def _mae(probe, tokens: torch.Tensor, ef: np.ndarray) -> float:
    return float(np.abs(predict(probe, tokens) - ef).mean())


def _attentive(model: EchoJEPA, cfg: JEPATrainConfig, ef: np.ndarray, seed: int,
               keep_tokens: bool = False) -> AttentiveProbe:
    torch.manual_seed(seed)
    return AttentiveProbe(dim=model.config.dim, queries=cfg.probe_queries,
                          time_steps=model.encoder.grid[0] if cfg.probe_motion or keep_tokens else 0,
                          ef_mean=float(ef.mean()), ef_std=float(ef.std()), keep_tokens=keep_tokens)


def evaluate_representation(model: EchoJEPA, random_model: EchoJEPA, train: dict, valid: dict, phantom: dict,
                            cfg: JEPATrainConfig, seed: int = 0) -> tuple[dict, AttentiveProbe, FeatureStats]:
    """Probes, sample efficiency, robustness and Fréchet ranking of ``model`` (and ``random_model`` as baseline).

    Args:
        train / valid: {"clips": uint8 (N, T, S, S), "ef": (N,) %, "patient": list, "alpha": (N,)} of CAMUS loops.
        phantom: {"clips": ...} of the valid split's phantom loops (the far end of the Fréchet ranking).

    Returns:
        (metrics, the attentive probe trained on all training labels, the training loops' feature statistics).
    """
    dim, grid, steps = model.config.dim, model.encoder.grid, cfg.probe_steps
    ef_tr, ef_va = np.asarray(train["ef"], float), np.asarray(valid["ef"], float)
    alpha1 = np.abs(np.asarray(valid["alpha"], float) - 1.0) < 1e-6
    y_tr = torch.tensor(ef_tr)
    metrics: dict = {"n_train": len(ef_tr), "n_valid": len(ef_va), "n_valid_alpha1": int(alpha1.sum()),
                     "n_valid_patients": len(set(valid["patient"]))}
    tok = {name: encode_clips(m.encoder, train["clips"]) for name, m in (("jepa", model), ("random", random_model))}
    val = {name: encode_clips(m.encoder, valid["clips"]) for name, m in (("jepa", model), ("random", random_model))}
    probes = {}
    for name in ("jepa", "random"):
        probe = fit_probe(_attentive(model, cfg, ef_tr, seed), tok[name], y_tr, steps=steps, seed=seed)
        pred = predict(probe, val[name])
        # the same probe reading the tokens beside their change: a stronger read-out, for the random encoder too
        both = fit_probe(_attentive(model, cfg, ef_tr, seed, keep_tokens=True), tok[name], y_tr, steps=steps, seed=seed)
        torch.manual_seed(seed)
        linear = fit_probe(LinearProbe(dim, float(ef_tr.mean()), float(ef_tr.std())), tok[name], y_tr, steps=steps,
                           lr=1e-2, weight_decay=0.0, seed=seed)
        metrics[name] = {"attentive_mae": float(np.abs(pred - ef_va).mean()),
                         "attentive_mae_alpha1": float(np.abs(pred - ef_va)[alpha1].mean()),
                         "attentive_both_mae": _mae(both, val[name], ef_va),
                         "linear_mae": _mae(linear, val[name], ef_va),
                         "rankme": effective_rank(val[name]),
                         "temporal_share": temporal_share(val[name], grid[0])}
        probes[name] = probe
    metrics["baseline_median_mae"] = float(np.abs(np.median(ef_tr) - ef_va).mean())

    # sample efficiency: probes trained on the loops of the first 10 / 25 / 50 / 100 % of (shuffled) patients
    patients = sorted(set(train["patient"]))
    order = [patients[i] for i in torch.randperm(len(patients), generator=torch.Generator().manual_seed(seed))]
    curve = {}
    for frac in cfg.fractions:
        if frac >= 1.0:
            curve["100"] = metrics["jepa"]["attentive_mae"]
            continue
        keep = set(order[: max(1, math.ceil(frac * len(order)))])
        idx = torch.tensor([i for i, p in enumerate(train["patient"]) if p in keep])
        probe = fit_probe(_attentive(model, cfg, ef_tr[idx.numpy()], seed), tok["jepa"][idx], y_tr[idx], steps=steps,
                          seed=seed)
        curve[f"{round(frac * 100)}"] = _mae(probe, val["jepa"], ef_va)
    metrics["sample_efficiency"] = curve

    # robustness: the clean-trained probes on perturbed valid clips; keep the speckled JEPA tokens for the ranking
    robust: dict = {"clean": {n: metrics[n]["attentive_mae"] for n in ("jepa", "random")}}
    speckled = None
    for pname, pcfg in PERTURBATIONS.items():
        robust[pname] = {}
        for name, m in (("jepa", model), ("random", random_model)):
            t = encode_clips(m.encoder, valid["clips"], transform=perturbation(pcfg, seed))
            robust[pname][name] = _mae(probes[name], t, ef_va)
            if name == "jepa" and pname == "speckle":
                speckled = t
    metrics["robustness"] = robust

    # Fréchet distances against the training loops' statistics
    stats = FeatureStats.from_tokens(tok["jepa"], grid)
    ph = encode_clips(model.encoder, phantom["clips"])
    sets = {"real": val["jepa"], "real_speckle": speckled, "phantom": ph}
    metrics["fvd_jepa"] = {k: fvd_jepa(v, grid, stats) for k, v in sets.items()}
    metrics["fid_jepa"] = {k: fid_jepa(v, grid, stats) for k, v in sets.items()}
    # same-size check: real and speckled subsets of the phantom set's size (Fréchet distances grow as n shrinks)
    g = torch.Generator().manual_seed(seed)
    subsets = [torch.randperm(len(ef_va), generator=g)[: len(ph)] for _ in range(10)]
    metrics["fvd_jepa_same_n"] = {
        "n": len(ph),
        "real": float(np.mean([fvd_jepa(val["jepa"][s], grid, stats) for s in subsets])),
        "real_speckle": float(np.mean([fvd_jepa(speckled[s], grid, stats) for s in subsets])),
        "phantom": metrics["fvd_jepa"]["phantom"],
    }
    f = metrics["fvd_jepa"]
    metrics["fvd_ranking_ok"] = bool(f["real"] < f["real_speckle"] < f["phantom"])
    return metrics, probes["jepa"], stats


def _split_sets(ds, num_frames: int, size: int) -> dict:
    rows = ds.manifest
    return {
        "clips": loop_clips((ds[i].frames for i in range(len(rows))), num_frames, size),
        "ef": np.array([float(r["ef"]) for r in rows]),
        "patient": [r["patient"] for r in rows],
        "alpha": np.array([float(r["alpha"]) for r in rows]),
    }


def _describe_masks(masks) -> str:
    """The mask families in words, for the model card."""
    return ", ".join(
        f"every place at {m.visible_steps[0]}-{m.visible_steps[1]} tubelet time steps visible, the others the target"
        if isinstance(m, TimeStepMaskConfig) else f"{m.num_blocks} x {m.spatial_scale[1]:.0%} tube blocks"
        for m in masks)


def write_model_card(out: Path, args: argparse.Namespace, cfg: JEPATrainConfig, metrics: dict, data: dict) -> Path:
    """``out/final/MODEL_CARD.md``: the model, its data and split, measured read-outs and how to reproduce it."""
    r, j, rnd = metrics["representation"], metrics["representation"]["jepa"], metrics["representation"]["random"]
    robust = "\n".join(f"| {k} | {v['jepa']:.2f} | {v['random']:.2f} |" for k, v in r["robustness"].items())
    curve = " | ".join(f"{k} % | {v:.2f}" for k, v in r["sample_efficiency"].items())
    fvd, fid, same = r["fvd_jepa"], r["fid_jepa"], r["fvd_jepa_same_n"]
    steps = f" --steps {args.steps}" if args.steps is not None else ""
    m, a = cfg.model, cfg.augment
    text = f"""# EchoJEPA encoder ({args.preset} preset)

A V-JEPA-style video ViT (Bardes et al. 2024) trained self-supervised on echo loops: clips of {m.num_frames} frames at
{m.frame_size} x {m.frame_size}, tubelets of {m.tubelet} frames x {m.patch} x {m.patch} pixels \
({data['tokens']} tokens), encoder width {m.dim}, {m.depth} blocks,
{m.heads} heads; predictor width {m.pred_dim}, {m.pred_depth} blocks. Mask families: {_describe_masks(cfg.masks)};
L1 loss on layer-normed features of an EMA target encoder (momentum {cfg.ema[0]} -> {cfg.ema[1]}). The bundled \
encoder is the EMA
target encoder. {metrics['train']['encoder_params'] / 1e6:.2f} M encoder parameters \
({metrics['train']['params'] / 1e6:.2f} M with the predictor).
`probe/` holds the attentive EF probe, `real_stats.npz` the feature statistics of the training split's CAMUS loops
(the reference of `fvd_jepa` / `fid_jepa` in `echolvfm evaluate`).

## Data
- Prepared folder `{args.data}` (`echolvfm prepare`): loops synthesised from real CAMUS apical 4CH ED / ES pairs
  (several deformation strengths) plus phantom loops.
- Self-supervised training: {data['train_loops']} training-split loops ({data['loops_per_patient']} of every \
patient; {data['train_phantoms']} phantoms,
  {data['train_patients']} CAMUS patients), 16 frames over 1-{cfg.max_cycles:g} cycles from a random phase, zoomed
  {a.scale_range[0]:g}-{a.scale_range[1]:g}x about the apex, rotated up to {a.max_rotation:g} degrees and shifted \
up to {a.max_shift:.0%} (V-JEPA's random resized crops), plus ultrasound augmentation \
({'with' if a.p_speckle else 'without'} per-frame speckle).
  No labels.
- Probes: trained on the {r['n_train']} training-split CAMUS loops' EF labels (frozen encoder), measured on the \
valid split's
  {r['n_valid']} CAMUS loops ({r['n_valid_patients']} patients, never seen in training; {r['n_valid_alpha1']} of \
them alpha = 1, the real ED -> ES motion).
  CAMUS (Leclerc et al., IEEE TMI 2019) is for non-commercial research.

## Valid metrics (EF MAE in points)
| probe | this encoder | randomly initialised encoder |
|---|---|---|
| attentive (all {r['n_valid']} loops) | {j['attentive_mae']:.2f} | {rnd['attentive_mae']:.2f} |
| attentive (alpha = 1 loops) | {j['attentive_mae_alpha1']:.2f} | {rnd['attentive_mae_alpha1']:.2f} |
| attentive on the tokens beside their change | {j['attentive_both_mae']:.2f} | {rnd['attentive_both_mae']:.2f} |
| linear (mean token) | {j['linear_mae']:.2f} | {rnd['linear_mae']:.2f} |
| feature effective rank (RankMe, of {m.dim}) | {j['rankme']:.1f} | {rnd['rankme']:.1f} |
| share of feature variance that changes over the clip | {j['temporal_share']:.3f} | {rnd['temporal_share']:.3f} |

Predicting the training median for every loop gives MAE {r['baseline_median_mae']:.2f}. The bundled probe \
(first rows) reads
the tokens' change over the clip; the third probe reads the tokens as well (the still anatomy: how large the cavity
is), which a ratio such as the EF needs. If the random encoder reads the EF better through it, the self-supervised
features have lost EF information that a random projection of the pixels keeps. The last two rows are diagnostics on
the valid tokens: a low effective rank means the features sit on a few directions (partial collapse), a small share
of change over the clip means they describe the still anatomy more than its motion, which is what an EF needs.
Acceptance (attentive MAE <= 8 and >= 2 points better than the random encoder): \
**{'met' if j['attentive_mae'] <= 8 and rnd['attentive_mae'] - j['attentive_mae'] >= 2 else 'not met'}**.

Sample efficiency (attentive probe, share of training patients' labels -> valid MAE): | {curve} |

Robustness (attentive probes trained on clean clips, valid clips perturbed; gain x0.6-1.5, depth attenuation
exp(-k r) with k 0.8-1.2, speckle sigma up to 0.4, sector-edge dropout 0.1-0.3 rad plus far-field dropout half of \
the time):

| condition | this encoder | random encoder |
|---|---|---|
{robust}

## Fréchet distances in this feature space
Against the training split's CAMUS loops (`real_stats.npz`, n = {data['train_camus']}):

| set | n | fvd_jepa | fid_jepa |
|---|---|---|---|
| valid real loops | {r['n_valid']} | {fvd['real']:.4g} | {fid['real']:.4g} |
| same + speckle (sigma up to 0.4) | {r['n_valid']} | {fvd['real_speckle']:.4g} | {fid['real_speckle']:.4g} |
| valid phantom loops | {same['n']} | {fvd['phantom']:.4g} | {fid['phantom']:.4g} |

Ranking real < real + speckle < phantom: **{'holds' if r['fvd_ranking_ok'] else 'does not hold'}**. With the real \
sets subsampled to the
phantom set's size (mean of 10 draws, n = {same['n']}): real {same['real']:.4g}, real + speckle \
{same['real_speckle']:.4g}, phantom {same['phantom']:.4g}.

`fvd_jepa` (per loop, the mean token beside the root-mean-square change of the tokens over the clip: what the loop
shows and how it moves) and `fid_jepa` (spatial mean token per tubelet time step, i.e. per 2 frames) are Fréchet
distances (Heusel et al. 2017) in *this* encoder's {m.dim}-dimensional feature space. They are **not comparable
with I3D-based FVD or Inception-based FID** published for video generators: another feature extractor, dimension and
training set. Compare only numbers computed with this encoder, and sets of similar size.

## Training
{cfg.steps} steps, batch {cfg.batch_size} clips, AdamW lr {cfg.lr:g} (warm-up {cfg.warmup}, cosine), weight decay \
{cfg.weight_decay:g},
seed {args.seed}, device {metrics['train']['device']}, {metrics['train']['seconds'] / 60:.1f} min \
(loss {metrics['train']['first_loss']:.4f} -> {metrics['train']['final_loss']:.4f});
probes and read-outs {metrics['eval_seconds'] / 60:.1f} min. Configuration: `training_config.json`.

## Reproduce
```bash
echolvfm prepare --camus CAMUS_DIR --out {args.data}{data['prepare_flags']}
echolvfm train jepa --data {args.data} --preset {args.preset} --seed {args.seed}{steps} --out {args.out} --device cpu
```

## Limits
A small encoder trained for minutes on a CPU on synthesised loops (real anatomy, synthetic motion) from one
data set; EchoJEPA-scale pretraining (millions of videos) is out of reach here. Not a medical device.
"""
    path = Path(out) / "final" / "MODEL_CARD.md"
    path.write_text(text, encoding="utf-8")
    return path


def train(args: argparse.Namespace) -> int:
    """Entry point of ``echolvfm train jepa``."""
    from ..data.prepared import PreparedLoops

    cfg = preset_from_args(train_preset, args)
    out = Path(args.out)
    train_ds = PreparedLoops(args.data, split="train", cache_size=0)  # the sampler keeps the frames
    valid_ds = PreparedLoops(args.data, split="valid", source="camus", cache_size=0)
    camus_idx = [i for i, row in enumerate(train_ds.manifest) if row["source"] == "camus"]  # the probes' labels
    if not len(valid_ds) or not camus_idx:
        raise TrainingError(f"{args.data} has no CAMUS loops in its train and valid splits, which the EF probes "
                            "need; prepare it with --camus.")
    phantom_ds = PreparedLoops(args.data, split="valid", source="phantom", cache_size=0)
    if not len(phantom_ds):
        raise TrainingError(f"{args.data} has no phantom loops in its valid split, the far end of the fvd_jepa "
                            "ranking; prepare it with more --phantom loops.")
    used = [i for p in train_ds.patients for i in train_ds.loops_of(p)[: cfg.loops_per_patient]]
    sampler = LoopClipSampler(train_ds, cfg, used)
    model, train_metrics = fit(sampler, cfg, out, seed=args.seed, device=args.device, resume=args.resume)
    log.info("trained: loss %.4f -> %.4f in %.1f min; measuring the representation", train_metrics["first_loss"],
             train_metrics["final_loss"], train_metrics["seconds"] / 60)

    t0 = time.perf_counter()
    t, s = cfg.model.num_frames, cfg.model.frame_size
    # the probes learn from every labelled loop of the training split, not only those the encoder trained on; the
    # sampler renders each loop once (it already holds the ones it trained on)
    train_set = {
        "clips": loop_clips((sampler.frames(i) for i in camus_idx), t, s),
        "ef": np.array([float(train_ds.manifest[i]["ef"]) for i in camus_idx]),
        "patient": [train_ds.manifest[i]["patient"] for i in camus_idx],
    }
    valid_set, phantom_set = _split_sets(valid_ds, t, s), _split_sets(phantom_ds, t, s)
    set_seed(args.seed + 1)
    random_model = EchoJEPA(**asdict(cfg.model)).eval()
    rep, probe, stats = evaluate_representation(model, random_model, train_set, valid_set, phantom_set, cfg,
                                                seed=args.seed)
    final = out / "final"
    probe.save_pretrained(str(final / PROBE_DIR))
    stats.save(final / STATS_FILE)
    metrics = {"train": train_metrics, "representation": rep, "eval_seconds": round(time.perf_counter() - t0, 1)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    meta = train_ds.meta
    data = {
        "prepare_flags": f" --loops-per-patient {meta.get('loops_per_patient')} --phantom {meta.get('phantom')} "
                         f"--seed {meta.get('seed')}",
        "train_loops": len(used),
        "train_phantoms": sum(train_ds.manifest[i]["source"] == "phantom" for i in used),
        "train_camus": len(camus_idx),
        "train_patients": len(set(train_set["patient"])),
        "tokens": model.encoder.num_tokens,
        "loops_per_patient": f"the first {cfg.loops_per_patient}" if cfg.loops_per_patient else "all",
    }
    write_model_card(out, args, cfg, metrics, data)
    j, rnd = rep["jepa"], rep["random"]
    log.info("valid attentive-probe EF MAE %.2f (random encoder %.2f), linear %.2f; fvd_jepa %s", j["attentive_mae"],
             rnd["attentive_mae"], j["linear_mae"], rep["fvd_jepa"])
    log.info("model written to %s", final)
    return 0
