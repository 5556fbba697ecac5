"""``echolvfm generate PATH --ef X [--observed 0,5|ed] [--frames N] [--steps 1] [--seed S] [--reject K] --out OUT.mp4
[--json] [--models DIR]``: an EF counterfactual of an echo loop.

The echo is read (:func:`echolvfm_core.io.load_echo`), brought onto the model grid
(:func:`echolvfm_core.preprocess.preprocess`), and the observed frames condition the one-step generator
(:class:`echolvfm_core.pipelines.counterfactual.CounterfactualPipeline`); the loop is written as MP4 (or GIF, by
the suffix of ``--out``) at the input's frame rate. Without ``--frames``, a loop longer than the generator's
``max_frames`` is first resampled in time to that many frames (same duration; as in the app and the evaluation), and
the output keeps that frame rate. With a segmenter in the models folder the generated loop's EF
is measured (and ``--reject K`` keeps the best of K candidates), and ``--observed ed`` conditions on the end-diastolic
frame it finds (as the app does).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_FPS = 30.0


def _indices(text: str) -> list[int] | str:
    if text.strip().lower() == "ed":
        return "ed"
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated frame indices such as 0,5, or ed; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one frame index")
    return values


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate the loop of this heart at another ejection fraction")
    p.add_argument("path", metavar="PATH", help="DICOM, NIfTI or video file of an apical four-chamber loop (or still)")
    p.add_argument("--ef", type=float, required=True, help="requested ejection fraction in %%")
    p.add_argument("--observed", type=_indices, default=[0],
                   help="frames to condition on, e.g. 0,5 (default 0), or ed: the end-diastolic frame the segmenter "
                        "finds (what the app observes; the generator reads a lone observed frame 0 as the start of a "
                        "cycle, so ed suits a loop that does not start at end-diastole)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames to generate (default: the input's; a longer loop than the generator's max_frames is "
                        "resampled in time to max_frames frames, and --observed then counts its frames; max_frames "
                        "for a still)")
    p.add_argument("--steps", type=int, default=None, help="flow steps (default: 1 for the one-step generator)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--reject", type=int, default=1, metavar="K",
                   help="rejection sampling: keep the best of K candidates by measured EF (needs the segmenter)")
    p.add_argument("--out", required=True, metavar="OUT.mp4", help="output video (.mp4 or .gif)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--models", metavar="DIR", default=None,
                   help="folder with generator/, vae/ and optionally segmenter/ (default: the bundled assets/)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from echolvfm_core.cli import CommandError
    from echolvfm_core.ef import check_requested_ef
    from echolvfm_core.io import load_echo, write_gif, write_mp4
    from echolvfm_core.pipelines.counterfactual import CounterfactualPipeline, default_models_dir
    from echolvfm_core.preprocess import preprocess, resample_time

    try:
        check_requested_ef(args.ef, "--ef")
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    out = Path(args.out)
    if out.suffix.lower() not in (".mp4", ".gif"):
        raise CommandError(f"--out must end in .mp4 or .gif; got {out.name}.")
    if not out.resolve().parent.is_dir():
        raise CommandError(f"The folder of --out {args.out} does not exist.")
    models = Path(args.models) if args.models is not None else default_models_dir()
    for name in ("generator", "vae"):
        if not (models / name / "config.json").is_file():
            raise CommandError(f"No {name} in {models / name}; train one with `echolvfm train {name}` or point "
                               "--models at a folder with generator/ and vae/.")
    has_segmenter = (models / "segmenter" / "config.json").is_file()
    if args.reject > 1 and not has_segmenter:
        raise CommandError(f"--reject needs a segmenter in {models / 'segmenter'} to measure the candidates' EF.")
    if args.observed == "ed" and not has_segmenter:
        raise CommandError(
            f"--observed ed needs a segmenter in {models / 'segmenter'} to find the end-diastolic frame.")

    echo = load_echo(args.path)
    pipe = CounterfactualPipeline.from_pretrained(models, device=args.device)
    pre = preprocess(echo, size=int(pipe.net.config.sample_size) * int(pipe.codec.downsample))
    loop, fps = pre.echo, echo.fps or DEFAULT_FPS
    if args.frames is None and loop.n_frames > pipe.max_frames and loop.fps:
        # the generator makes at most max_frames frames and learnt loops resampled in time to fit them
        loop = resample_time(loop, loop.fps * pipe.max_frames / loop.n_frames)
        loop = loop.replace(frames=loop.frames[: pipe.max_frames], labels=None, labelled=())
        fps = loop.fps
    observed = args.observed
    try:
        if observed == "ed":  # the end-diastolic frame the segmenter finds on the loop the generator sees
            observed = [int(pipe.segmenter.measure_echo(loop.require_loop("--observed ed")).ed_index)]
        cf = pipe.generate(loop, ef=args.ef, observed=observed, length=args.frames, steps=args.steps,
                           seed=args.seed, reject=args.reject)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    (write_gif if out.suffix.lower() == ".gif" else write_mp4)(cf.frames[0], out, fps=fps)
    measured = cf.measured_ef[0] if cf.measured_ef else None
    record = {
        "requested_ef": cf.requested_ef,
        "measured_ef": measured,
        "latency_ms": round(cf.latency_ms, 1),
        "frames": cf.length,
        "observed": list(cf.observed),
        "steps": cf.steps,
        "seed": cf.seed,
        "reject": args.reject,
        "candidate_efs": cf.candidate_efs[0] if cf.candidate_efs else None,
        "timings_ms": {k: round(v, 1) for k, v in cf.timings_ms.items()},
        "out": str(out),
    }
    if args.json:
        print(json.dumps(record))
        return 0
    if measured is not None:
        got = f"{measured:.1f} %"
    else:
        got = "not measured (" + ("no segmenter" if pipe.measure_ef is None else "no LV found") + ")"
    print(f"requested EF {cf.requested_ef:.1f} %, measured {got}; {cf.length} frames in {cf.latency_ms:.0f} ms")
    print(f"written to {out}")
    return 0
