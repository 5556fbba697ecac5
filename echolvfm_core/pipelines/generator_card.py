"""The generator's model card, ``MODEL_CARD.md`` next to the saved model: what it is, its training objective and
data, the EF adherence that ``echolvfm evaluate --sections generation --card`` measured
(:mod:`echolvfm_core.pipelines.evaluation`) and the realism of its rendered counterfactuals that ``--sections realism
--card`` measured (:mod:`echolvfm_core.pipelines.realism_eval`), written again whenever training, evaluation or
``calibrate-gain`` adds to the folder."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["EVALUATION_FILE", "realism_summary", "write_model_card"]

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
    ``echolvfm train generator``) and, once ``echolvfm evaluate --sections generation --card`` has run,
    ``evaluation.json``."""
    final = Path(final)
    cfg = json.loads((final / "training_config.json").read_text())
    metrics = json.loads((final / "metrics.json").read_text())
    ev_path = final / EVALUATION_FILE
    evaluation = json.loads(ev_path.read_text()) if ev_path.is_file() else None
    flow, model = cfg["flow"], cfg["model"]
    if evaluation is None or "generation" not in evaluation:
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
    realism = "" if evaluation is None or "realism" not in evaluation else _realism(evaluation["realism"])
    final_loss = metrics.get("final_loss") or {}
    linear = cfg.get("objective", "meanflow") == "linear"
    if linear:
        flow = cfg["linear"]
        what = (f"Linear flow-matching baseline of the one-step generator (the paper's 25-step comparison): given the "
                f"codec latents of the observed frames (any subset, at least one), the clip length (padding mask, up "
                f"to {model['max_frames']} frames) and a requested EF, 25 midpoint steps (50 network evaluations, "
                f"twice that with classifier-free guidance) return the latents of the whole loop")
        options = f'residual {flow["residual"]} (the flow carries each frame\'s difference from the observed frames ' \
                  f'interpolated in time), prediction "{flow.get("prediction", "u")}", ' \
                  f'EF dropout {flow["ef_dropout"]:g}'
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
{realism}
## Training
{_run_of(metrics)}{metrics.get("steps")} steps, batch {cfg["batch_size"]}, AdamW lr {cfg["lr"]:g}
(warm-up {cfg["warmup"]}, cosine), EMA {cfg["ema_decay"]:g}, seed {metrics.get("seed")}, device {metrics.get("device")},
{metrics.get("seconds", 0) / 60:.0f} min;
final training loss {final_loss.get("loss", float("nan")):.4f} ({_loss_parts(final_loss)}).
Configuration: `training_config.json`, flow: `flow.json`.

## Reproduce
```bash
echolvfm prepare --camus CAMUS_DIR --out {metrics.get("data")} --loops-per-patient 4 --phantom 200 --seed 0
{_commands(metrics)}
```
{_lineage_note(metrics)}then copy `OUT/final` to `assets/generator`, choose the sampling motion gain of a warp
generator with `echolvfm calibrate-gain --prepared {metrics.get("data")}`, and run `echolvfm evaluate --prepared
{metrics.get("data")} --models assets --sections generation,realism --card --out runs/eval_generator`.

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


def _commands(metrics: dict) -> str:
    """The training commands, oldest first: those that made the warm start (``lineage``), then this run's."""
    return "\n".join([*metrics.get("lineage", []), str(metrics.get("command"))])


def _run_of(metrics: dict) -> str:
    n = len(metrics.get("lineage", []))
    return f"The last of the {n + 1} training runs under Reproduce: " if n else ""


def _lineage_note(metrics: dict) -> str:
    if not metrics.get("lineage"):
        return ""
    return ("(each command after the first warm-starts, `--init`, from the `final` folder the command before it "
            "wrote),\n")


def realism_summary(realism: dict) -> dict:
    """The numbers of an ``evaluate --sections realism`` result that the card shows (not every rendering)."""
    keep = ("n_patients", "ratios_pooled", "ratios_paired_median", "c2st", "ef_adherence")
    cines = {name: {k: c[k] for k in ("frames", "fps", "side", "method", "heart_rate_bpm", "ratios_mean",
                                       "measured_mean") if k in c} | {"beats": len(c.get("beats", []))}
             for name, c in realism.get("acquired_cines", {}).items()}
    return {**{k: realism[k] for k in keep if k in realism}, "acquired_cines": cines}


def _realism(r: dict) -> str:
    """The card's realism section from :func:`realism_summary`."""
    pooled, paired, c2st = r["ratios_pooled"], r["ratios_paired_median"], r["c2st"]
    rows = "\n".join(f"| {label} | {pooled[k]:.2f} | {paired[k]:.2f} | {target} |" for k, label, target in (
        ("hf_share", "high-frequency share (> 0.25 cycles/pixel)", "0.85-1.15"),
        ("gradient", "mean gradient", "0.85-1.15"),
        ("bits_per_pixel", "H.264 bits per pixel", "0.85-1.15"),
        ("frame_change", "frame-to-frame change", "0.8-1.25")))
    ef = r.get("ef_adherence", {})
    adherence = "".join(f" {name.capitalize()} R^2 {a['r2']:.2f}, MAE {a['mae']:.2f};" for name, a in ef.items())
    cines = "\n".join(
        f"| {name} | {c['frames']} frames, {c['fps']:.0f} fps, {c['side']} px | {c['beats']} ({c['method']}) | "
        + " / ".join(f"{c['ratios_mean'][k]:.2f}" for k in ("hf_share", "gradient", "frame_change", "bits_per_pixel"))
        + " | " + " / ".join("-" if v is None else f"{v:.1f}" for v in c["measured_mean"].values()) + " |"
        for name, c in r.get("acquired_cines", {}).items() if c.get("ratios_mean"))
    return f"""
## Realism of rendered counterfactuals ({r["split"]} split)
The Studio shows a counterfactual as the acquired frames moved by this generator's displacement field
(`echolvfm_core/pipelines/render.py`); `echolvfm evaluate --sections realism` measured, on {r["n_patients"]} CAMUS
patients (still ED images rendered at a Gen EF), generated over real:

| statistic | pooled | paired (median) | target |
|---|---|---|---|
{rows}

Classifier two-sample test (a small CNN on patches, trained on training-split patients, scored on these):
accuracy {c2st["accuracy"]:.3f} (95 % interval {c2st["ci95"][0]:.3f}-{c2st["ci95"][1]:.3f}, {c2st["n_test"]} images;
0.5 = indistinguishable). EF of the rendered loops by the segmenter:{adherence.rstrip(";")}.

Acquired cines, every beat against its own counterfactuals (each beat's motion gain calibrated on the beat, EF read
on its key frames, as in the app; a loop without a whole beat, method "whole_loop", cannot be re-timed to another EF
and the app shows its decoded loop instead):

| cine | input | beats | HF / gradient / frame change / bits per pixel | EF measured at 30 / 50 / 70 % |
|---|---|---|---|---|
{cines}
"""


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
    text = (f"masked linear flow matching (the instantaneous velocity, time logit-normal mean {flow['time_mean']:g}), "
            f"the EF replaced by the learned null embedding in {flow['ef_dropout']:.0%} of clips.")
    if flow.get("prediction") == "warp":
        text += (" The velocity is read from a clean estimate, the observed frames' anchor moved by the network's "
                 "displacement field plus its residual, as in the one-step model.")
    if flow.get("displacement_weight", 0.0):
        text += (f" The displacement field is also supervised (weight {flow['displacement_weight']:g}, squared error "
                 f"in latent pixels) by the registration field each CAMUS loop was rendered with, on clips with one "
                 f"observed frame.")
    return text


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

    def fmt(v):
        return "-" if v is None else f"{v:.1f}"

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
