"""``echolvfm estimate-ef PATH [--json] [--seed S] [--models DIR]``: EF posterior by diffusion regression.

The echo is read and preprocessed as for ``echolvfm segment``; the posterior is 40 DDIM trajectories of 10 steps
(:mod:`echolvfm_core.estimators.ef_posterior`). Age and sex come from the file when it holds them, or from --age /
--sex.
"""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate-ef", help="EF posterior (mean, sd, 90 %% interval, samples) by diffusion regression")
    p.add_argument("path", metavar="PATH", help="DICOM, NIfTI or video file of an apical four-chamber loop")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--age", type=float, default=None, help="age in years (default: from the file, else unknown)")
    p.add_argument("--sex", choices=("F", "M"), default=None, help="sex (default: from the file, else unknown)")
    p.add_argument("--models", metavar="DIR", default=None,
                   help="folder with ef_regressor/ (or an ef_regressor folder itself); default: the bundled assets/")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.set_defaults(func=run)


def _beats(pre, fps: float | None, args: argparse.Namespace):
    """The loop's beats (LV area curve of the bundled segmenter when there is one, else image periodicity)."""
    from echolvfm_core.beats import find_beats
    from echolvfm_core.commands.segment import model_folder
    from echolvfm_core.estimators.segmentation import SegmentationEF, default_segmenter_dir

    if not fps:
        return None
    area = None
    folder = model_folder(args.models, "segmenter", default_segmenter_dir())
    if (folder / "config.json").is_file():
        try:
            area = SegmentationEF.from_pretrained(folder, device=args.device).measure(pre.echo.frames).lv_area
        except ValueError:
            area = None
    return find_beats(pre.echo.frames, fps, area, pre.mask)


def run(args: argparse.Namespace) -> int:
    from echolvfm_core.cli import CommandError
    from echolvfm_core.commands.segment import model_folder
    from echolvfm_core.estimators.ef_posterior import EFPosteriorEstimator, default_ef_regressor_dir
    from echolvfm_core.io import load_echo
    from echolvfm_core.preprocess import preprocess

    folder = model_folder(args.models, "ef_regressor", default_ef_regressor_dir())
    if not (folder / "config.json").is_file():
        raise CommandError(
            f"No EF posterior model in {folder}; train one with `echolvfm train ef-regressor` or point --models at one."
        )
    if args.age is not None and not 0 <= args.age <= 120:
        raise CommandError(f"--age must be in years between 0 and 120; got {args.age:g}.")
    echo = load_echo(args.path).require_loop("The EF posterior")
    pre = preprocess(echo, size=112)
    est = EFPosteriorEstimator.from_pretrained(folder, device=args.device)
    age = args.age if args.age is not None else echo.info.age
    sex = args.sex if args.sex is not None else echo.info.sex
    post = est.posterior(pre.echo.frames, age=age, sex=sex, seed=args.seed)
    record = {"path": str(args.path), "age": age, "sex": sex, **post.to_dict()}
    beats = _beats(pre, echo.fps, args)
    if beats is not None and len(beats.beats) > 1:
        from echolvfm_core.beats import beat_summary

        means = [est.posterior(pre.echo.frames[b.start : b.stop], age=age, sex=sex, seed=args.seed).mean
                 for b in beats.beats]
        record["beat_to_beat"] = beat_summary(beats, means)
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"EF posterior: mean {post.mean:.1f} %, sd {post.sd:.1f}, 90 % interval {post.p05:.1f} - {post.p95:.1f} %"
          f"  ({len(post.samples)} samples, {post.steps} DDIM steps, seed {post.seed})")
    if post.clipped:
        print("note: some samples fell outside 0-100 % and were clipped.")
    b2b = record.get("beat_to_beat")
    if b2b:
        print(f"{len(b2b['beats'])} beats (ED to ED), posterior means: "
              + ", ".join(f"{b['ef']:.1f} %" for b in b2b["beats"])
              + f"; mean {b2b['ef_mean']:.1f} %, SD {b2b['ef_sd']:.1f}")
    return 0
