"""``echolvfm calibrate-gain``: choose the sampling motion gain of a warp-prediction generator on training patients.

A generator trained by regression (the CPU preset) returns the expected motion, whose amplitude shrinks where the
timing and shape of the contraction are uncertain, so its loops measure lower EFs than requested. This command
generates loops from the ED frames of the chosen split's patients (alpha = 1 loops, the whole cycle in at most
``max_frames`` frames, as in the evaluation) at each requested EF and each candidate gain, measures them with the
bundled segmenter (one pass), keeps the gain whose measured EFs are closest to the requests (mean absolute error)
and writes it into the generator's ``flow.json`` (``motion_gain``), with every candidate's numbers in
``calibration.json`` beside it (read by the model card). A generated loop the segmenter cannot measure is left out
of its gain's MAE and listed under ``skipped`` there, with its patient. Calibrate on the training split: the valid
split is the evaluation's.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: written beside the generator: the candidates' numbers and the chosen gain
CALIBRATION_FILE = "calibration.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate-gain", help="choose a warp generator's sampling motion gain on training patients")
    p.add_argument("--prepared", required=True, help="an `echolvfm prepare` folder")
    p.add_argument("--models", default=None, help="models folder with generator/, vae/, segmenter/ (default: assets/)")
    p.add_argument("--split", default="train", help="patients to calibrate on (default: train)")
    p.add_argument("--patients", type=int, default=12, help="number of patients (default 12)")
    p.add_argument("--gains", default="1,1.25,1.5,2,2.5,3,4", help="candidate gains, comma-separated")
    p.add_argument("--efs", default="25,45,70", help="requested EFs (%%), comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _floats(text: str, what: str) -> list[float]:
    from ..cli import CommandError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"--{what} must be comma-separated numbers; got {text!r}.") from None
    if not values:
        raise CommandError(f"--{what} is empty.")
    return values


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import numpy as np
    from tqdm.auto import tqdm

    from ..cli import CommandError
    from ..data.prepared import PreparedLoops
    from ..ef import check_requested_ef
    from ..estimators.segmentation import SegmentationEF
    from ..flows import MeanFlow
    from ..models.vae import EchoCodec
    from ..pipelines.counterfactual import (
        FLOW_FILE,
        CounterfactualPipeline,
        default_models_dir,
        load_generator,
    )
    from ..pipelines.evaluation import cycle_frames

    gains, efs = _floats(args.gains, "gains"), _floats(args.efs, "efs")
    if min(gains) <= 0:
        raise CommandError("every gain must be > 0.")
    try:
        efs = [check_requested_ef(ef, "--efs") for ef in efs]
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    models = Path(args.models) if args.models else default_models_dir()
    gen_dir = models / "generator"
    for name in ("generator", "vae", "segmenter"):
        if not (models / name / "config.json").is_file():
            raise CommandError(f"no {name} in {models} ({models / name}/config.json is missing).")
    flow = load_generator(gen_dir)
    if not isinstance(flow, MeanFlow) or flow.config.prediction != "warp":
        raise CommandError("the motion gain applies to MeanFlow generators with prediction 'warp' only.")
    loops = PreparedLoops(args.prepared, split=args.split, source="camus")
    index = [i for i, r in enumerate(loops.manifest) if abs(float(r["alpha"]) - 1.0) < 1e-6][: args.patients]
    if not index:
        raise CommandError(f"no CAMUS alpha = 1 loops of split '{args.split}' in {args.prepared}.")
    codec = EchoCodec.from_pretrained(models / "vae")
    seg = SegmentationEF.from_pretrained(models / "segmenter", tta=False)
    videos = [cycle_frames(loops[i], flow.net.config.max_frames)[0] for i in index]
    patients = [loops.manifest[i]["patient"] for i in index]

    results, skipped = [], []
    for gain in tqdm(gains, desc="gains", dynamic_ncols=True):
        config = dataclasses.replace(flow.config, motion_gain=gain)
        pipe = CounterfactualPipeline(MeanFlow(flow.net, config), codec,
                                      measure_ef=lambda f: float(seg.measure(f).ef))
        errors, measured = [], {}
        for ef in efs:
            got = [pipe.generate(v, ef=ef, observed=[0], seed=args.seed).measured_ef[0] for v in videos]
            for patient, g in zip(patients, got, strict=True):
                if g is None:  # left out of this gain's MAE, and listed
                    skipped.append({"patient": patient, "gain": gain, "ef": ef,
                                    "reason": "the segmenter could not measure the generated loop"})
                    log.warning("gain %g, EF %g: skipped %s: %s", gain, ef, patient, skipped[-1]["reason"])
            ok = [g for g in got if g is not None]
            measured[f"{ef:g}"] = float(np.mean(ok)) if ok else None
            errors += [abs(g - ef) for g in ok]
        results.append({"gain": gain, "mae": float(np.mean(errors)) if errors else None, "mean_measured": measured})
    scored = [r for r in results if r["mae"] is not None]
    if not scored:
        raise CommandError("the segmenter measured none of the generated loops.")
    best = min(scored, key=lambda r: r["mae"])
    spec = json.loads((gen_dir / FLOW_FILE).read_text())
    spec["config"] = {**spec["config"], "motion_gain": best["gain"]}
    (gen_dir / FLOW_FILE).write_text(json.dumps(spec, indent=2))
    report = {"chosen_gain": best["gain"], "split": args.split, "patients": len(index), "efs": efs,
              "seed": args.seed, "data": str(args.prepared), "candidates": results, "skipped": skipped,
              "command": f"echolvfm calibrate-gain --prepared {args.prepared} --split {args.split} "
                         f"--patients {args.patients} --gains {args.gains} --efs {args.efs} --seed {args.seed}"}
    (gen_dir / CALIBRATION_FILE).write_text(json.dumps(report, indent=2))
    if (gen_dir / "training_config.json").is_file() and (gen_dir / "metrics.json").is_file():
        from ..pipelines.generator_card import write_model_card

        write_model_card(gen_dir)
    for r in results:
        means = ", ".join(f"{k}: {'-' if v is None else f'{v:.1f}'}" for k, v in r["mean_measured"].items())
        mae = "-" if r["mae"] is None else f"{r['mae']:.1f}"
        print(f"gain {r['gain']:g}: MAE {mae} (mean measured EF at each request {means})")
    if skipped:
        print(f"{len(skipped)} generated loops could not be measured and were left out (listed in "
              f"{gen_dir / CALIBRATION_FILE})")
    print(f"chosen motion gain {best['gain']:g}, written to {gen_dir / FLOW_FILE}")
    return 0
