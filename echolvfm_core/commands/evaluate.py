"""``echolvfm evaluate``: measure the bundled (or given) models on CAMUS patients and write metrics.json + report.md.

Loops are built from the chosen split's ED/ES pairs exactly as ``echolvfm prepare`` builds training loops (or read
from an existing prepared folder). A section is computed only when its model folder exists; absent models are
listed in the report as not evaluated, never filled with numbers.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

#: section name -> model sub-folder it needs under --models
SECTIONS = {"vae": "vae", "segmentation": "segmenter", "ef_regression": "ef_regressor",
            "ef_regression_jepa": "ef_regressor_jepa", "generation": "generator", "jepa": "jepa",
            "realism": "generator"}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure the models on CAMUS patients (metrics.json + report.md)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--camus", help="CAMUS folder; the split's loops are built as by `echolvfm prepare`")
    src.add_argument("--prepared", help="an existing `echolvfm prepare` folder to evaluate on instead")
    p.add_argument("--out", required=True, help="output folder for metrics.json and report.md")
    p.add_argument("--models", default=None, help="models folder (default: the bundled assets/)")
    p.add_argument("--split", default="valid", help="split to evaluate on (default: valid)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, from {', '.join(SECTIONS)}")
    p.add_argument("--loops-per-patient", type=int, default=4, help="loops built per patient with --camus")
    p.add_argument("--max-patients", type=int, default=None, help="with --camus: only the split's first N patients")
    p.add_argument("--card", action="store_true",
                   help="keep the generation section beside the generator (evaluation.json) and rewrite its "
                        "MODEL_CARD.md")
    p.add_argument("--realism-train-patients", type=int, default=40,
                   help="training-split patients whose real and rendered images train the realism C2ST (default 40)")
    p.add_argument("--reject", type=int, default=4,
                   help="generation: candidates of the rejection-sampling rows (default 4; 1: no such rows)")
    p.add_argument("--baseline", default=None,
                   help="generation: a linear flow-matching generator folder (`echolvfm train generator --flow "
                        "linear`) to report beside the one-step model, at 25 midpoint steps with and without "
                        "guidance, with the time per video of each")
    p.add_argument("--baseline-guidance", type=float, default=2.0,
                   help="classifier-free guidance weight of the baseline's guided row (default 2)")
    p.add_argument("--baseline-seeds", type=int, default=3,
                   help="noise seeds per video of the baseline's rows (default 3, as the one-step rows; each loop "
                        "costs 50 network calls, 100 with guidance)")
    p.add_argument("--spread-seeds", type=int, default=8,
                   help="generation: noise seeds per request of the seed-spread measurement (default 8)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cli import CommandError
    from ..data.prepared import PreparedLoops
    from ..pipelines.counterfactual import default_models_dir

    models = Path(args.models) if args.models else default_models_dir()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise CommandError(f"unknown sections {unknown}; choose from {sorted(SECTIONS)}.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args.prepared) if args.prepared else _prepare_split(Path(args.camus), out / "prepared", args)
    loops = PreparedLoops(data, split=args.split, source="camus")
    if len(loops) == 0:
        raise CommandError(f"no CAMUS loops of split '{args.split}' in {data}.")

    metrics: dict = {"split": args.split, "data": str(data), "models": str(models), "seed": args.seed}
    skipped = _prepare_skips(data)
    missing = []
    for name in sections:
        folder = models / SECTIONS[name]
        if not (folder / "config.json").exists() and not any(folder.glob("*/config.json")):
            missing.append(name)
            continue
        result = _SECTION_FUNCS[name](folder, loops, args)
        skipped += [{"section": name, **skip} for skip in result.pop("skipped", [])]
        metrics[name] = result
        log.info("%s: %s", name, metrics[name])
    metrics["not_evaluated"] = missing
    metrics["skipped"] = skipped
    if args.card and ("generation" in metrics or "realism" in metrics):
        from ..pipelines.generator_card import EVALUATION_FILE, realism_summary, write_model_card

        folder = models / SECTIONS["generation"]
        path = folder / EVALUATION_FILE
        keep = json.loads(path.read_text()) if path.is_file() else {}  # a section measured earlier stays
        if "generation" in metrics:
            keep.update({k: metrics[k] for k in ("split", "data", "seed", "generation")})
        if "realism" in metrics:
            keep["realism"] = {"split": metrics["split"], "data": metrics["data"],
                               **realism_summary(metrics["realism"])}
        path.write_text(json.dumps(keep, indent=2))
        if (folder / "metrics.json").is_file():
            write_model_card(folder)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "report.md").write_text(_report(metrics))
    print(json.dumps(metrics, indent=2))
    return 0


def _prepare_split(camus: Path, dest: Path, args: argparse.Namespace) -> Path:
    """Build the split's loops with the same code and settings as ``echolvfm prepare``."""
    from ..data.prepare import PrepareConfig, prepare
    from ..io.camus import camus_splits

    ids = [p for p, split in camus_splits(camus).items() if split == args.split]
    ids = ids[: args.max_patients] if args.max_patients else ids
    if not ids:
        from ..cli import CommandError

        raise CommandError(f"no patients of split '{args.split}' in {camus} (splits.csv missing?).")
    prepare(camus, dest, PrepareConfig(loops_per_patient=args.loops_per_patient, seed=args.seed, patients=tuple(ids)))
    return dest


def _prepare_skips(data: Path) -> list[dict]:
    """The patients ``echolvfm prepare`` left out of ``data`` (from its prepare_report.json), as skipped cases."""
    report = data / "prepare_report.json"
    if not report.is_file():
        return []
    skips = json.loads(report.read_text())["counts"]["skipped"]
    return [{"section": "prepare", "patient": s["patient"], "reason": s["reason"]} for s in skips]


def _vae(folder: Path, loops, args) -> dict:
    from ..models.vae import EchoCodec, evaluate_vae

    return evaluate_vae(EchoCodec.from_pretrained(folder, device=args.device), loops.real_frames().images)


def _segmentation(folder: Path, loops, args) -> dict:
    from ..estimators.segmentation import SegmentationEF, evaluate_segmentation

    real = loops.real_frames()
    seg = SegmentationEF.from_pretrained(folder, device=args.device)
    return evaluate_segmentation(seg, real.images, real.labels, real.patients, real.phases)


def _ef_regression(folder: Path, loops, args) -> dict:
    from ..estimators.ef_posterior import EFPosteriorEstimator, evaluate_ef_regression

    est = EFPosteriorEstimator.from_pretrained(folder, device=args.device)
    alpha1 = (loops[i] for i, row in enumerate(loops.manifest) if abs(float(row["alpha"]) - 1.0) < 1e-6)
    return evaluate_ef_regression(est, alpha1, seed=args.seed)


def _generation(folder: Path, loops, args) -> dict:
    """Table 1 rows of the one-step generator, its seed spread and, with ``--baseline``, the linear baseline's rows at
    25 midpoint steps without and with guidance (same videos, seeds and segmenter), with the speed ratio."""
    from ..cli import CommandError
    from ..ef import EF_REQUEST_RANGE
    from ..estimators.segmentation import SegmentationEF
    from ..flows import LinearFlow
    from ..pipelines.counterfactual import CounterfactualPipeline, load_generator
    from ..pipelines.evaluation import evaluate_generation, seed_spread

    seg_dir = folder.parent / "segmenter"
    if not (seg_dir / "config.json").is_file():
        raise CommandError(f"the generation section measures EF with a segmenter; none in {folder.parent}.")
    baseline = None
    if args.baseline:
        baseline = load_generator(args.baseline, device=args.device)
        if not isinstance(baseline, LinearFlow):
            raise CommandError(f"--baseline {args.baseline} is not a linear flow (its flow.json says meanflow).")
    pipe = CounterfactualPipeline.from_pretrained(folder.parent, device=args.device, segmenter=False)
    # One network pass per frame: 30 loops per video are measured, and test-time augmentation would make that 5x
    # slower for a gain within the noise (assets/segmenter/MODEL_CARD.md).
    seg = SegmentationEF.from_pretrained(seg_dir, device=args.device, tta=False)
    pipe.measure_ef = lambda frames: float(seg.measure(frames).ef)
    # Rec asks for each video's true EF: a video whose EF cannot be requested (labels giving about 0 %, say) is
    # skipped with its reason rather than stopping the evaluation.
    lo, hi = EF_REQUEST_RANGE
    alpha1 = [i for i, row in enumerate(loops.manifest) if abs(float(row["alpha"]) - 1.0) < 1e-6]
    usable = [i for i in alpha1 if lo <= float(loops.manifest[i]["ef"]) <= hi]
    skipped = [{"patient": loops.manifest[i]["patient"],
                "reason": f"its true EF {float(loops.manifest[i]['ef']):.1f} % is outside the {lo:g}-{hi:g} % an EF "
                          "may be requested in, and Rec requests it"} for i in alpha1 if i not in usable]
    for skip in skipped:
        log.warning("generation: skipped %s: %s", skip["patient"], skip["reason"])
    if not usable:
        return {"n": 0, "skipped": skipped}
    alpha1 = [loops[i] for i in usable]
    result = {**evaluate_generation(pipe, alpha1, reject=args.reject, seed=args.seed), "segmenter_tta": False,
              "skipped": skipped}

    def ef_and_es(frames):
        m = seg.measure(frames)
        return float(m.ef), int(m.es_index)

    result["seed_spread"] = seed_spread(CounterfactualPipeline(pipe.flow, pipe.codec), alpha1, ef_and_es,
                                        seeds=args.spread_seeds, seed=args.seed)
    if baseline is not None:
        base = CounterfactualPipeline(baseline, pipe.codec, pipe.measure_ef)
        rows = {name: evaluate_generation(base, alpha1, seeds=args.baseline_seeds, seed=args.seed, reject=1,
                                          guidance=w)
                for name, w in (("unguided", 1.0), ("guided", args.baseline_guidance))}
        result["baseline"] = {"folder": str(args.baseline), "solver": "midpoint", **rows,
                              "speed_ratio": rows["unguided"]["ms_per_video"] / result["ms_per_video"],
                              "speed_ratio_guided": rows["guided"]["ms_per_video"] / result["ms_per_video"]}
    return result


def _realism(folder: Path, loops, args) -> dict:
    """Realism of counterfactuals rendered on acquired frames (:mod:`echolvfm_core.pipelines.realism_eval`): the
    split's CAMUS patients (read from the CAMUS folder of --camus, or the one the prepared folder was made from),
    C2ST trained on --realism-train-patients training patients, and the built-in acquired cines."""
    import numpy as np

    from ..cli import CommandError
    from ..ef import EF_REQUEST_RANGE
    from ..estimators.segmentation import SegmentationEF
    from ..io import load_echo, read_camus, sample_cine_path, sample_echo_path
    from ..io.camus import camus_splits
    from ..models.vae import EchoCodec
    from ..pipelines.counterfactual import load_generator
    from ..pipelines.realism_eval import evaluate_camus_realism, evaluate_cine_realism
    from ..pipelines.render import BeatRenderer

    root = folder.parent
    if not (root / "segmenter" / "config.json").is_file():
        raise CommandError(f"the realism section measures EF with a segmenter; none in {root}.")
    camus = Path(args.camus) if args.camus else _camus_of(Path(args.prepared))
    renderer = BeatRenderer(load_generator(folder, device=args.device),
                            EchoCodec.from_pretrained(root / "vae", device=args.device))
    seg = SegmentationEF.from_pretrained(root / "segmenter", device=args.device, tta=False)
    lo, hi = EF_REQUEST_RANGE
    true_ef, grid, skipped = {}, {}, []
    for i, row in enumerate(loops.manifest):
        if abs(float(row["alpha"]) - 1.0) > 1e-6:
            continue
        if not lo <= float(row["ef"]) <= hi:
            skipped.append({"patient": row["patient"], "reason": f"its true EF {float(row['ef']):.1f} % cannot be "
                            f"requested ({lo:g}-{hi:g} %)"})
            continue
        true_ef[row["patient"]] = float(row["ef"])
        frames = loops[i].frames
        grid[row["patient"]] = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames
    splits = camus_splits(camus)
    evaluated = [p for p in true_ef if splits.get(p) == args.split]
    train_ids = sorted(p for p, split in splits.items() if split == "train")[: args.realism_train_patients]
    patients = read_camus(camus, views=("4CH",), patients=evaluated, half_sequences=False)
    train = read_camus(camus, views=("4CH",), patients=train_ids, half_sequences=False)
    out = evaluate_camus_realism(renderer, seg, patients, true_ef, grid, train, seed=args.seed)
    out["skipped"] = skipped + out["skipped"]
    cines = {"pydicom ybr_color (30 frames)": load_echo(sample_echo_path())}
    if sample_cine_path() is not None:
        cines["pydicom-data color3d_jpeg_baseline (120 frames)"] = load_echo(sample_cine_path())
    out["acquired_cines"] = evaluate_cine_realism(renderer, seg, cines, seed=args.seed)
    return out


def _camus_of(prepared: Path) -> Path:
    """The CAMUS folder a prepared folder was made from (its meta.json), resolved as prepare recorded it."""
    from ..cli import CommandError

    meta = json.loads((prepared / "meta.json").read_text())
    camus = Path(meta.get("camus", ""))
    if not camus.is_dir():
        raise CommandError(f"the realism section reads the CAMUS images; {prepared} was made from {camus}, which is "
                           "not here: give --camus.")
    return camus



def _jepa(folder: Path, loops, args) -> dict:
    from ..pipelines.jepa_eval import evaluate_jepa

    return evaluate_jepa(folder, loops, device=args.device or "cpu", seed=args.seed)


#: ef_regression_jepa: the same posterior metrics for an EF regressor on the EchoJEPA backbone
#: (`echolvfm train ef-regressor --backbone jepa`), so that the report compares both backbones.
_SECTION_FUNCS = {"vae": _vae, "segmentation": _segmentation, "ef_regression": _ef_regression, "realism": _realism,
                  "ef_regression_jepa": _ef_regression, "generation": _generation, "jepa": _jepa}


def _report(metrics: dict) -> str:
    lines = [
        "# EchoLVFM Studio evaluation",
        "",
        f"Split: `{metrics['split']}`; data: `{metrics['data']}`; models: `{metrics['models']}`.",
        "Loops are real CAMUS ED/ES anatomy with synthesised motion (see the data issue), not acquired cines.",
        "",
    ]
    for name in SECTIONS:
        if name in metrics:
            lines.append(f"## {name}")
            lines += [f"- {k}: {_fmt(v)}" for k, v in metrics[name].items()]
            lines.append("")
    if metrics["skipped"]:
        lines.append("## Skipped cases")
        lines += [f"- {s['section']}, {s['patient']}: {s['reason']}" for s in metrics["skipped"]]
        lines.append("")
    if metrics["not_evaluated"]:
        lines.append("Not evaluated (model absent): " + ", ".join(metrics["not_evaluated"]) + ".")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)
