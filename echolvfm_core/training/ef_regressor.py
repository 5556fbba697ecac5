"""Train the EF posterior model: ``echolvfm train ef-regressor --data PREPARED --preset demo|tiny --out DIR``.

Diffusion regression (MCSDR style): the clip encoder and the conditional noise predictor are trained together with
the DDPM noise-prediction loss on the z-scored EF (Ho et al. 2020, eq. 14), several noise draws per clip so that
one encoder pass serves many denoising targets, plus a small auxiliary regression of the z-scored EF from the clip
features (it speeds up the encoder's learning on a CPU budget; the posterior comes from the diffusion model only).
The demo preset also supervises the (2+1)D encoder's label heads with the loops' per-frame labels (LV cavity,
myocardium, left atrium; soft cross-entropy at a quarter of the clip's side, and the share of the image each label
covers over time): the EF label says how much the ventricle moves, the labels say where it is. Its encoder also
feeds the statistics of the predicted label areas over the clip to the clip features (``area_features``).

Training clips come from every prepared loop of the training split (all counterfactual strengths ``alpha``; their
EF labels are exact, measured on the warped labels): random phase offset and 1-1.5 cycles half of the time, the
inference clip (whole loop, from frame 0) otherwise, with ultrasound augmentation. Age and sex are used when the
samples carry them and dropped at random (modality dropout) so the learned null embeddings stand for "unknown".
A few uninformative clips (pure noise, or one frame repeated) keep their loop's EF label, which teaches the model
to answer them with the broad training distribution of EF rather than a confident guess.

The demo preset keeps an exponential moving average of the weights (the EMA model is evaluated and saved) and holds
``calibration_patients`` training patients out of training: after training, the posterior's ``spread_scale`` is set
on their ``alpha == 1`` loops by split conformal calibration of the 5-95 % interval
(:func:`~echolvfm_core.estimators.ef_posterior.conformal_spread_scale`), so the valid split is never used to tune it.

Metrics (``DIR/metrics.json``): :func:`~echolvfm_core.estimators.ef_posterior.evaluate_ef_regression` on the valid
split's ``alpha == 1`` loops (mae, rmse, r2, crps, coverage90), and ``calibration`` (the scale, the held-out loops'
metrics before and after it), all with the posterior noise seed :data:`POSTERIOR_SEED`.
"""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from ..estimators.ef_posterior import (
    EFPosteriorEstimator,
    clip_indices,
    conformal_spread_scale,
    evaluate_ef_regression,
    make_sampler,
    make_train_scheduler,
    video_clip,
)
from ..models.ef_denoiser import (
    SEX_CODES,
    EFDenoiser,
    EFDenoiserConfig,
    ef_denoiser_preset,
)
from .augment import AugmentConfig, augment_batch
from .common import TrainingRun, adamw_warmup_cosine, ema_weights, preset_from_args

__all__ = ["EFTrainConfig", "TRAIN_PRESETS", "LABEL_CLASSES", "train_preset", "ClipBatch", "ClipSampler",
           "diffusion_loss", "label_loss", "label_stats", "fit", "write_model_card", "with_jepa_backbone", "calibrate",
           "calibration_split", "train"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EFTrainConfig:
    """Schedule of an EF-regressor training run (saved with the model as ``training_config.json``).

    Attributes:
        model: network size (``ef_mean`` / ``ef_std`` are replaced by the training labels' statistics).
        steps, batch_size: optimiser steps and clips per step.
        noise_draws: diffusion timesteps / noises drawn per clip per step.
        lr, weight_decay, warmup: AdamW, linear warm-up then cosine decay to 5 % of ``lr``.
        aux_weight: weight of the auxiliary EF regression from the clip features.
        label_weight: weight of the label-head losses (needs ``model.label_classes`` > 0; 0 = labels unused).
        p_uninformative: share of clips replaced by noise or a still frame (label kept).
        p_drop_age, p_drop_sex: modality dropout of known age / sex.
        p_inference_clip: share of clips sampled exactly as at inference (whole loop from frame 0).
        max_cycles: other clips cover 1 to ``max_cycles`` cycles from a random phase.
        p_real_motion: share of clips drawn from the ``alpha = 1`` loops (the real ED -> ES motion, whose ES-phase
            frame is the real ES image, the kind of loop the posterior is judged on); the rest come from the
            counterfactual loops. 0 = every loop equally likely.
        ema_decay: exponential moving average of the weights (warm-up ``(1 + s) / (10 + s)``); the EMA weights are
            evaluated and saved. 0 = the raw weights.
        calibration_patients: CAMUS training patients held out of training (all their loops, drawn with the run's
            seed) to set the posterior's ``spread_scale`` by :func:`conformal_spread_scale`; 0 = no calibration.
        eval_every, checkpoint_every: in steps (0 = only at the end).
    """

    model: EFDenoiserConfig = field(default_factory=EFDenoiserConfig)
    steps: int = 3000
    batch_size: int = 16
    noise_draws: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 150
    aux_weight: float = 0.5
    label_weight: float = 0.0
    p_uninformative: float = 0.06
    p_drop_age: float = 0.3
    p_drop_sex: float = 0.3
    p_inference_clip: float = 0.5
    max_cycles: float = 1.5
    p_real_motion: float = 0.0
    ema_decay: float = 0.0
    calibration_patients: int = 0
    eval_every: int = 1000
    checkpoint_every: int = 250
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(max_rotation=8.0, speckle_max=0.2, p_dropout=0.2, p_far_dropout=0.1)
    )


#: Label classes of the loops (background, LV cavity, myocardium, left atrium).
LABEL_CLASSES = 4

#: Noise seed of the posteriors behind the metrics and the calibration, whatever the training seed: the default of
#: ``echolvfm estimate-ef``, the app and ``echolvfm evaluate``, so ``metrics.json`` matches what they report.
POSTERIOR_SEED = 0


def _is_alpha_one(alpha) -> bool:
    """Whether a loop's deformation scale is 1: the real ED -> ES motion, its ES-phase frame the real ES image."""
    return abs(float(alpha) - 1.0) < 1e-6

TRAIN_PRESETS = {
    # 1200 steps: with the label heads, longer runs kept the valid MAE (7.6 at 3000 steps) but narrowed the raw
    # posterior (coverage90 0.76 at 1200 steps, 0.60 at 2000, 0.52 at 3000); the held-out calibration now widens it
    "demo": EFTrainConfig(model=replace(ef_denoiser_preset("demo"), label_classes=LABEL_CLASSES, area_features=True),
                          steps=1200, label_weight=1.0, p_real_motion=0.5, ema_decay=0.995, calibration_patients=40),
    "tiny": EFTrainConfig(model=ef_denoiser_preset("tiny"), steps=30, batch_size=4, noise_draws=4, warmup=5,
                          eval_every=0, checkpoint_every=10),
}


def train_preset(name: str) -> EFTrainConfig:
    if name not in TRAIN_PRESETS:
        raise ValueError(f"Unknown ef-regressor preset {name!r}; choose one of {sorted(TRAIN_PRESETS)}.")
    return TRAIN_PRESETS[name]


def _sample_value(sample, name: str):
    info = getattr(sample, "info", None)
    value = getattr(sample, name, None)
    if value is None and info is not None:
        value = getattr(info, name, None)
    return value


class ClipBatch(NamedTuple):
    """A batch of training clips: clips float (B, 1, F, s, s) in [0, 1], ef (B,) in %, age (B,) with NaN for unknown,
    sex (B,) int64 with -1 for unknown, labels int64 (B, F, s, s) with -1 where unknown (None when unused)."""

    clips: torch.Tensor
    ef: torch.Tensor
    age: torch.Tensor
    sex: torch.Tensor
    labels: torch.Tensor | None = None


class ClipSampler:
    """Draws training clips from a loop data set (items with ``frames`` uint8 (T, S, S) and ``ef`` in %; also
    ``labels`` uint8 (T, S, S) when ``cfg.label_weight`` > 0). ``alphas`` (one per loop) lets ``cfg.p_real_motion``
    choose between the ``alpha = 1`` loops and the others; without it, or when one of the two groups is empty, every
    loop is equally likely.

    ``sample(batch_size, generator)`` -> :class:`ClipBatch`, F and s from the model config; the labels follow the
    clip's frames and geometric augmentation, and are -1 for the uninformative clips.
    """

    def __init__(self, loops, model_cfg: EFDenoiserConfig, cfg: EFTrainConfig, alphas=None):
        if len(loops) == 0:
            raise ValueError("The EF regressor needs training loops; the data set holds none.")
        self.loops, self.mcfg, self.cfg = loops, model_cfg, cfg
        self._groups = None  # (indices of the alpha = 1 loops, of the others) when drawn apart
        if alphas is not None and cfg.p_real_motion > 0:
            if len(alphas) != len(loops):
                raise ValueError(f"ClipSampler needs one alpha per loop; got {len(alphas)} for {len(loops)} loops.")
            real = torch.tensor([_is_alpha_one(a) for a in alphas])
            if bool(real.any()) and not bool(real.all()):
                self._groups = (torch.nonzero(real)[:, 0], torch.nonzero(~real)[:, 0])
        self.with_labels = cfg.label_weight > 0
        # loop index -> (frames uint8 (T, s, s) at the encoder's frame size, labels uint8 (T, s, s) or None, ef, age,
        # sex); each loop is read (rendered) once and kept at the small size
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None, float, object, object]] = {}

    def _loop(self, i: int) -> tuple[np.ndarray, np.ndarray | None, float, object, object]:
        if i not in self._cache:
            loop = self.loops[i]
            frames = np.asarray(loop.frames)
            s = self.mcfg.frame_size
            small = video_clip(frames, len(frames), s, np.arange(len(frames)))[0]
            labels = None
            if self.with_labels:
                lab = torch.from_numpy(np.ascontiguousarray(loop.labels)).float()[None]
                labels = F.interpolate(lab, size=(s, s), mode="nearest")[0].to(torch.uint8).numpy()
            self._cache[i] = (np.rint(small.numpy() * 255).astype(np.uint8), labels, float(loop.ef),
                              _sample_value(loop, "age"), _sample_value(loop, "sex"))
        return self._cache[i]

    def _indices(self, n_frames: int, g: torch.Generator) -> np.ndarray:
        if float(torch.rand(1, generator=g)) < self.cfg.p_inference_clip:
            return clip_indices(n_frames, self.mcfg.num_frames)
        offset = float(torch.rand(1, generator=g))
        cycles = 1.0 + (self.cfg.max_cycles - 1.0) * float(torch.rand(1, generator=g))
        return clip_indices(n_frames, self.mcfg.num_frames, offset=offset, cycles=cycles)

    def _draw(self, n: int, g: torch.Generator) -> list[int]:
        """Indices of ``n`` loops."""
        if self._groups is None:
            return torch.randint(0, len(self.loops), (n,), generator=g).tolist()
        real, other = self._groups
        pick_real = torch.rand(n, generator=g) < self.cfg.p_real_motion
        from_real = real[torch.randint(0, len(real), (n,), generator=g)]
        from_other = other[torch.randint(0, len(other), (n,), generator=g)]
        return torch.where(pick_real, from_real, from_other).tolist()

    def sample(self, batch_size: int, generator: torch.Generator) -> ClipBatch:
        g, c = generator, self.cfg
        clips, labels, efs, ages, sexes = [], [], [], [], []
        for i in self._draw(batch_size, g):
            frames, lab, ef, age, sex = self._loop(i)
            idx = self._indices(len(frames), g)
            clips.append(video_clip(frames, self.mcfg.num_frames, self.mcfg.frame_size, idx))
            if lab is not None:
                labels.append(torch.from_numpy(lab[idx]).long())
            efs.append(ef)
            ages.append(float(age) if age is not None and float(torch.rand(1, generator=g)) >= c.p_drop_age
                        else math.nan)
            code = SEX_CODES.get(str(sex).upper()[:1], -1) if sex is not None else -1
            sexes.append(code if float(torch.rand(1, generator=g)) >= c.p_drop_sex else -1)
        x = torch.cat(clips)  # (B, F, s, s)
        x, y = augment_batch(x, torch.stack(labels) if labels else None, g, c.augment)
        x, which = self._uninformative(x, g)
        if y is not None:
            y[which] = -1
        return ClipBatch(x[:, None], torch.tensor(efs), torch.tensor(ages), torch.tensor(sexes, dtype=torch.long), y)

    def _uninformative(self, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace a share of clips by smoothed noise or by one of their frames repeated (no motion); returns the
        clips and which were replaced (B,) bool."""
        b, f, s, _ = x.shape
        which = torch.rand(b, generator=g) < self.cfg.p_uninformative
        if not bool(which.any()):
            return x, which
        x = x.clone()
        for i in torch.nonzero(which)[:, 0].tolist():
            if float(torch.rand(1, generator=g)) < 0.5:
                level = 0.1 + 0.5 * float(torch.rand(1, generator=g))
                noise = torch.rand((f, 1, s, s), generator=g) * 2 * level
                if float(torch.rand(1, generator=g)) < 0.5:
                    noise = F.avg_pool2d(noise, 3, stride=1, padding=1, count_include_pad=False)
                x[i] = noise[:, 0].clamp(0, 1)
            else:
                x[i] = x[i, int(torch.randint(0, f, (1,), generator=g))].expand(f, s, s)
        return x, which


def label_loss(logits: torch.Tensor, areas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Loss of the encoder's label heads: soft cross-entropy of the label logits (B, K, F, h, w) against the labels
    (B, F, s, s) (-1 unknown) area-pooled to h x w, plus the squared error of the label areas (B, T', K) against
    the share of the image each label covers, averaged over the F / T' frames of every step and scaled by 10 (an LV
    cavity covers about a tenth of the image). Clips with unknown labels do not count."""
    k, f, h, w = logits.shape[1:]
    known = (labels >= 0).flatten(1).all(dim=1)  # (B,)
    if not bool(known.any()):
        return logits.sum() * 0.0 + areas.sum() * 0.0
    onehot = F.one_hot(labels[known].clamp(min=0), k).permute(0, 4, 1, 2, 3).to(logits.dtype)  # (b', K, F, s, s)
    soft = F.adaptive_avg_pool3d(onehot, (f, h, w))
    ce = -(soft * F.log_softmax(logits[known], dim=1)).sum(dim=1).mean()
    t = areas.shape[1]
    share = onehot.mean(dim=(3, 4)).transpose(1, 2)  # (b', F, K)
    share = F.adaptive_avg_pool1d(share.transpose(1, 2), t).transpose(1, 2)  # (b', T', K)
    return ce + F.mse_loss(10.0 * areas[known], 10.0 * share)


def diffusion_loss(model: EFDenoiser, scheduler, clips, ef, age, sex, noise_draws: int, aux_weight: float,
                   generator: torch.Generator, labels: torch.Tensor | None = None,
                   label_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """DDPM noise-prediction loss on the z-scored EF plus the auxiliary feature regression and, with ``labels`` and
    ``label_weight`` > 0, the encoder's :func:`label_loss`.

    Args:
        clips: (B, 1, F, s, s) in [0, 1]; ef: (B,) in %; age (B,) NaN = unknown; sex (B,) -1 = unknown.
        noise_draws: K timesteps and noises per clip; the encoder runs once per clip.
        labels: (B, F, s, s) int64, -1 = unknown.

    Returns:
        (loss, {"eps_mse", "aux_mse"} and "label" when the labels are used).
    """
    dev = clips.device
    parts = {}
    if labels is not None and label_weight > 0:
        feats, logits, areas = model.encode(clips, maps=True)
        lab = label_loss(logits, areas, labels.to(dev))
        parts["label"] = float(lab.detach())
    else:
        feats, lab = model.encode(clips), None
    z0 = model.normalise(ef.to(dev, feats.dtype))
    cond = model.condition(feats, age.to(dev), sex.to(dev)).repeat_interleave(noise_draws, 0)
    z0k = z0.repeat_interleave(noise_draws)
    n = z0k.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator).to(dev)
    eps = torch.randn(n, generator=generator).to(dev, z0k.dtype)
    zt = scheduler.add_noise(z0k, eps, t)
    eps_mse = F.mse_loss(model(zt, t, cond=cond), eps)
    aux_mse = F.mse_loss(model.aux_head(feats)[:, 0], z0)
    loss = eps_mse + aux_weight * aux_mse + (label_weight * lab if lab is not None else 0.0)
    return loss, {"eps_mse": float(eps_mse.detach()), "aux_mse": float(aux_mse.detach()), **parts}


def label_stats(efs: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of the training EF labels (%), the z-scoring of the diffused variable."""
    e = np.asarray(efs, dtype=np.float64)
    if e.size < 2 or not np.all(np.isfinite(e)):
        raise ValueError("Need at least two finite EF labels to z-score the target.")
    sd = float(e.std(ddof=1))
    if sd <= 0:
        raise ValueError("All training EF labels are equal; cannot z-score the target.")
    return float(e.mean()), sd


def fit(sampler: ClipSampler, cfg: EFTrainConfig, out: Path, seed: int = 0, device: str | None = None,
        resume: bool = False, valid_loops=None, backbone_state: dict | None = None, calibration_loops=None) -> dict:
    """Train the EF denoiser; writes ``out/final`` (model + scheduler_config.json + training_config.json) and
    ``out/metrics.json``. ``cfg.model`` must already hold the label statistics (``ef_mean``, ``ef_std``).

    Args:
        valid_loops: optional list of loops (``frames``, ``ef``) for the metrics, e.g. the valid ``alpha == 1`` loops.
        backbone_state: for ``backbone="jepa"``, the EchoJEPA encoder's state dict (its self-supervised weights).
        calibration_loops: optional held-out training loops (``frames``, ``ef``); when given, the saved model's
            ``spread_scale`` is set on them by :func:`conformal_spread_scale` before the valid metrics are taken.
    """
    run = TrainingRun(out, cfg.steps, seed, device, desc="ef-regressor", checkpoint_every=cfg.checkpoint_every)
    accelerator = run.accelerator
    model = EFDenoiser(**asdict(cfg.model))
    if backbone_state is not None:
        model.encoder.vit.load_state_dict(backbone_state)
    scheduler = make_train_scheduler()
    trainable = [p for p in model.parameters() if p.requires_grad]  # a frozen backbone stays as it was loaded
    model, optimizer, lr_sched = accelerator.prepare(
        model, *adamw_warmup_cosine(trainable, cfg.lr, cfg.weight_decay, cfg.warmup, cfg.steps))
    raw = accelerator.unwrap_model(model)
    ema = run.ema(raw, cfg.ema_decay) if cfg.ema_decay else None

    def final_model():
        """What is evaluated and saved: the EMA weights when kept, else the trained ones."""
        return ema_weights(ema, raw) if ema is not None else raw

    run.restore(resume)
    history = run.state.setdefault("history", [])
    losses: list[float] = []
    while run.step < cfg.steps:
        g = torch.Generator().manual_seed(seed * 1_000_003 + run.step)
        batch = sampler.sample(cfg.batch_size, g)
        model.train()
        with accelerator.autocast():
            loss, parts = diffusion_loss(raw, scheduler, batch.clips.to(accelerator.device), batch.ef, batch.age,
                                         batch.sex, cfg.noise_draws, cfg.aux_weight, g, batch.labels, cfg.label_weight)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        lr_sched.step()
        if ema is not None:
            ema.step(raw.parameters())
        losses.append(float(loss.detach()))
        run.bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}", aux=f"{parts['aux_mse']:.2f}",
                            **({"label": f"{parts['label']:.2f}"} if "label" in parts else {}))
        done = run.step + 1
        if cfg.eval_every and valid_loops and done % cfg.eval_every == 0 and done < cfg.steps:
            m = _evaluate(final_model(), scheduler, valid_loops, POSTERIOR_SEED)
            history.append({"step": done, "loss": float(np.mean(losses[-50:])), **m})
            run.bar.write(f"step {done}: mae {m['mae']:.2f} coverage90 {m['coverage90']:.2f} crps {m['crps']:.2f}")
        run.advance()
    summary = run.end()
    trained = final_model().eval()
    metrics = {
        "params": int(sum(p.numel() for p in trained.parameters())),
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        **summary,
        "ef_mean": cfg.model.ef_mean,
        "ef_std": cfg.model.ef_std,
        "history": history,
    }
    if calibration_loops:
        metrics["calibration"] = calibrate(trained, scheduler, calibration_loops, POSTERIOR_SEED)
    if valid_loops:
        metrics["valid_alpha1"] = _evaluate(trained, scheduler, valid_loops, POSTERIOR_SEED)

    def save(final: Path) -> None:
        trained.save_pretrained(str(final))
        scheduler.save_pretrained(str(final))

    run.save_final(cfg, metrics, save)
    return metrics


def with_jepa_backbone(cfg: EFTrainConfig, jepa_dir: str | Path | None) -> tuple[EFTrainConfig, dict]:
    """``cfg`` with the EchoJEPA encoder of ``jepa_dir`` (default: the bundled ``assets/jepa``) as the frozen video
    backbone (clip shape taken from the encoder; its pooling reads the tokens' change over the clip, as the EchoJEPA
    EF probe does), and the encoder's weights to load into it."""
    from ..models.jepa import EchoJEPA, JEPAConfig
    from ..pipelines.counterfactual import default_models_dir

    folder = Path(jepa_dir) if jepa_dir else default_models_dir() / "jepa"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(2, "No EchoJEPA encoder (config.json) in this folder", str(folder))
    jepa = EchoJEPA.from_pretrained(str(folder))
    vit = {k: jepa.config[k] for k in JEPAConfig.__dataclass_fields__}
    model = replace(cfg.model, backbone="jepa", jepa={**vit, "motion": True}, frozen_backbone=True,
                    num_frames=vit["num_frames"], frame_size=vit["frame_size"], label_classes=0, area_features=False)
    return replace(cfg, model=model, label_weight=0.0), jepa.encoder.state_dict()


def _evaluate(model: EFDenoiser, scheduler, loops, seed: int) -> dict:
    est = EFPosteriorEstimator(model, make_sampler(scheduler.config))
    try:
        return evaluate_ef_regression(est, loops, seed=seed)
    finally:
        model.train()


def calibrate(model: EFDenoiser, scheduler, loops, seed: int) -> dict:
    """Set ``model``'s ``spread_scale`` on held-out loops (:func:`conformal_spread_scale` at 90 %); returns the
    loops' metrics before and after, and the scale."""
    model.register_to_config(spread_scale=1.0)
    loops = list(loops)
    est = EFPosteriorEstimator(model, make_sampler(scheduler.config))
    before = evaluate_ef_regression(est, loops, seed=seed, details=True)
    d = before.pop("posteriors")
    scale = conformal_spread_scale(d["mean"], d["p05"], d["p95"], d["truth"])
    model.register_to_config(spread_scale=scale)
    after = evaluate_ef_regression(est, loops, seed=seed)
    return {"spread_scale": scale, "n": len(loops), "before": before, "after": after}


def calibration_split(manifest: list[dict], n_patients: int, seed: int) -> tuple[list[int], list[int]]:
    """Row indices of the training loops and of the calibration loops: every loop of ``n_patients`` CAMUS patients
    (drawn with ``seed``) goes to calibration, everything else (phantoms included) to training."""
    patients = sorted({r["patient"] for r in manifest if r["source"] == "camus"})
    if n_patients < 0 or (n_patients and n_patients >= len(patients)):
        raise ValueError(f"calibration_patients must be between 0 and {len(patients) - 1}; got {n_patients}.")
    held = (set(np.random.default_rng(seed).choice(patients, size=n_patients, replace=False).tolist()) if n_patients
            else set())
    is_held = [r["source"] == "camus" and r["patient"] in held for r in manifest]
    return [i for i, h in enumerate(is_held) if not h], [i for i, h in enumerate(is_held) if h]


def _alpha_one(ds) -> list[int]:
    """Indices of the alpha = 1 loops: the CAMUS ones when there are any (the acceptance set), else all."""
    rows = [(i, r) for i, r in enumerate(ds.manifest) if _is_alpha_one(r["alpha"])]
    camus = [i for i, r in rows if r["source"] == "camus"]
    return camus or [i for i, _ in rows]


def _backbone_text(model: EFDenoiserConfig, args: argparse.Namespace) -> str:
    if model.backbone == "jepa":
        where = getattr(args, "jepa", None) or "assets/jepa"
        return (f"the EchoJEPA video ViT of `{where}` (self-supervised, frozen: only the attentive pooling and the "
                "denoiser were trained here)")
    if model.area_features:
        return ("a small (2+1)D convolutional encoder (taught by the loops' per-frame labels too; its features include "
                "the largest and smallest share of the frame that each predicted label covers over the clip)")
    if model.label_classes:
        return "a small (2+1)D convolutional encoder (also taught by the loops' per-frame labels, see Training)"
    return "a small (2+1)D convolutional encoder"


def _calibration_text(cal: dict | None, data: dict) -> str:
    if not cal:
        return ""
    b, a = cal["before"], cal["after"]
    return f"""
- Calibration: all loops of {data.get("calibration_patients")} training patients (drawn with the seed) were held out \
of training;
  on their {cal["n"]} alpha = 1 loops (the kind the posterior is judged on) the posterior's draws are scaled about \
their mean by `spread_scale` {cal["spread_scale"]:.3f}
  (split conformal, 90 % interval; `config.json`). On those loops: coverage90 {b["coverage90"]:.2f} -> \
{a["coverage90"]:.2f},
  CRPS {b["crps"]:.2f} -> {a["crps"]:.2f}, MAE {b["mae"]:.2f} -> {a["mae"]:.2f} (the mean moves only where draws are \
clipped)."""


def _label_text(cfg: EFTrainConfig) -> str:
    if not cfg.label_weight:
        return ""
    if cfg.model.area_features:
        return ("\nThe encoder's two label heads (label logits of the LV cavity, myocardium and left atrium at a "
                "quarter of the clip's side,\nand the share of the image each covers over time) learnt from the loops' "
                f"per-frame labels, loss weight {cfg.label_weight:g};\nthe label logits also give the area statistics "
                "of the features at inference.")
    return ("\nThe encoder's two training-only heads (label logits of the LV cavity, myocardium and left atrium at a "
            "quarter of the clip's side,\nand the share of the image each covers over time) learnt from the loops' "
            f"per-frame labels, loss weight {cfg.label_weight:g};\nthey are not used at inference.")


def write_model_card(final: Path, args: argparse.Namespace, cfg: EFTrainConfig, metrics: dict, data: dict) -> Path:
    """``final/MODEL_CARD.md``: what the model is, the data and split it saw, its valid metrics, how to reproduce."""
    v = metrics.get("valid_alpha1")
    rows = (
        "\n".join(f"| {k} | {v[k]:.4g} |" for k in ("mae", "rmse", "r2", "crps", "coverage90", "n"))
        if v else "| (no valid alpha = 1 loops in the data folder) | |"
    )
    steps = f" --steps {args.steps}" if args.steps is not None else ""
    calibration = _calibration_text(metrics.get("calibration"), data)
    width = ", its width calibrated on held-out synthesised loops," if calibration else ","
    backbone = ""
    if cfg.model.backbone == "jepa":
        backbone = " --backbone jepa" + (f" --jepa {args.jepa}" if getattr(args, "jepa", None) else "")
    used_by = ("Used by `echolvfm estimate-ef` and the Studio." if cfg.model.backbone == "r2plus1d" else
               "Not used by the Studio; `echolvfm evaluate` compares it with the bundled model (section "
               "`ef_regression_jepa`, folder `ef_regressor_jepa`).")
    text = f"""# EF posterior by diffusion regression ({args.preset} preset)

A conditional DDPM over the z-scored ejection fraction (training labels: mean {cfg.model.ef_mean:.2f} %, sd
{cfg.model.ef_std:.2f} %), noise (epsilon) prediction, conditioned on features of a \
{cfg.model.num_frames}-frame clip ({cfg.model.frame_size} x {cfg.model.frame_size}) from
{_backbone_text(cfg.model, args)} and, when known, age and sex (learned null embeddings, modality dropout).
Inference: DDIM, 10 steps x 40 trajectories, clipped to [0, 100] %. {used_by}
{metrics.get("params", 0) / 1e6:.2f} M parameters; DDPM schedule in `scheduler_config.json`.

## Data
- Prepared folder `{args.data}` (`echolvfm prepare`): loops synthesised from real CAMUS apical 4CH ED / ES pairs at
  several deformation strengths (EF labels measured on the warped labels, \
area-length){", plus phantom loops" if data.get("phantom_loops") else ""}.
- Training split: {data.get("train_loops")} loops ({data.get("phantom_loops")} of them phantoms) from \
{data.get("train_patients")} CAMUS patients, all \
strengths{f" ({cfg.p_real_motion:.0%} of clips from the alpha = 1 loops)" if cfg.p_real_motion else ""}; random
  phase / 1-{cfg.max_cycles:g} cycles for half of the clips, ultrasound augmentation, {cfg.p_uninformative:.0%} of clips
  replaced by noise or a still frame with the loop's label kept (uninformative input -> broad posterior).
  No age or sex in this data: the model has only seen them as unknown.
- Metrics: the valid split's alpha = 1 loops ({data.get("valid_loops")} loops; the real ED -> ES motion), never
  used in training. CAMUS (Leclerc et al., IEEE TMI 2019) is for non-commercial research.{calibration}

## Valid metrics (alpha = 1 loops)
| metric | value |
|---|---|
{rows}

mae / rmse: posterior mean vs the label, EF points; crps: sample CRPS; coverage90: share of labels inside the
posterior's 5-95 % interval.

## Training
{cfg.steps} steps, batch {cfg.batch_size} clips x {cfg.noise_draws} noise draws, AdamW lr {cfg.lr:g}, auxiliary
regression weight {cfg.aux_weight:g}{f", EMA of the weights {cfg.ema_decay:g} (saved)" if cfg.ema_decay else ""}, \
seed {args.seed}, device {metrics.get("device")}, {metrics.get("seconds", 0) / 60:.1f} min.{_label_text(cfg)}
Configuration: `training_config.json`.

## Reproduce
```bash
echolvfm prepare --camus CAMUS_DIR --out {args.data}{data.get('prepare_flags', '')}
echolvfm train ef-regressor --data {args.data} --preset {args.preset} --seed {args.seed}{steps}{backbone} \
--out {args.out}
```

## Limits
Trained on synthesised loops (real anatomy, synthetic motion); real cines with other frame rates, several beats,
other views or scanners may be measured less accurately. The posterior is a model's uncertainty{width} not a
calibrated clinical interval.
Not a medical device; not for diagnosis.
"""
    path = Path(final) / "MODEL_CARD.md"
    path.write_text(text, encoding="utf-8")
    return path


def train(args: argparse.Namespace) -> int:
    """Entry point of ``echolvfm train ef-regressor``."""
    from ..data.prepared import PreparedLoops

    cfg = preset_from_args(train_preset, args)
    backbone_state = None
    if getattr(args, "backbone", "r2plus1d") == "jepa":
        cfg, backbone_state = with_jepa_backbone(cfg, args.jepa)
    train_ds = PreparedLoops(args.data, split="train", cache_size=0)  # ClipSampler keeps small copies
    train_idx, calib_idx = calibration_split(train_ds.manifest, cfg.calibration_patients, args.seed)
    mean, sd = label_stats(np.array([float(train_ds.manifest[i]["ef"]) for i in train_idx]))
    cfg = replace(cfg, model=replace(cfg.model, ef_mean=mean, ef_std=sd))
    try:
        valid_ds = PreparedLoops(args.data, split="valid")
        valid = [valid_ds[i] for i in _alpha_one(valid_ds)]
    except (ValueError, FileNotFoundError) as exc:
        log.warning("no valid split for metrics: %s", exc)
        valid = []
    alphas = [float(train_ds.manifest[i]["alpha"]) for i in train_idx]
    # the interval is calibrated on the held-out patients' alpha = 1 loops: the counterfactual loops, whose frames all
    # come from the ED image, are easier and would narrow it for the loops it is judged on
    calib_idx = [i for i in calib_idx if _is_alpha_one(train_ds.manifest[i]["alpha"])]
    metrics = fit(ClipSampler(Subset(train_ds, train_idx), cfg.model, cfg, alphas), cfg, Path(args.out), seed=args.seed,
                  device=args.device, resume=args.resume, valid_loops=valid, backbone_state=backbone_state,
                  calibration_loops=[train_ds[i] for i in calib_idx])
    meta = train_ds.meta
    data = {
        "prepare_flags": f" --loops-per-patient {meta.get('loops_per_patient')} --phantom {meta.get('phantom')} "
                         f"--seed {meta.get('seed')}",
        "train_loops": len(train_idx),
        "train_patients": len({train_ds.manifest[i]["patient"] for i in train_idx
                               if train_ds.manifest[i]["source"] == "camus"}),
        "phantom_loops": sum(train_ds.manifest[i]["source"] == "phantom" for i in train_idx),
        "calibration_patients": cfg.calibration_patients,
        "valid_loops": len(valid),
    }
    write_model_card(Path(args.out) / "final", args, cfg, metrics, data)
    v = metrics.get("valid_alpha1")
    if v:
        log.info("valid (alpha = 1): mae %.2f rmse %.2f r2 %.3f crps %.2f coverage90 %.2f (n=%d)", v["mae"], v["rmse"],
                 v["r2"], v["crps"], v["coverage90"], v["n"])
    log.info("model written to %s", Path(args.out) / "final")
    return 0
