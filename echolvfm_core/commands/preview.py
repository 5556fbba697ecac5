"""``echolvfm preview``: PNG montage and MP4s of prepared loops with label contours."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preview",
        help="montage (PNG) and MP4s of prepared loops with label contours",
        description=(
            "Draw prepared loops with LV (red), myocardium (green) and LA (blue) contours: one montage row per loop, "
            "frames across the cycle, EF per row; and one MP4 per loop. With --alphas, render one patient's pair at "
            "those deformation scales (counterfactual EFs of the same heart)."
        ),
    )
    p.add_argument("--data", required=True, help="folder written by `echolvfm prepare`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--split", default=None, help="only loops of this split")
    p.add_argument("--source", default=None, choices=["camus", "phantom"], help="only loops of this source")
    p.add_argument("--patient", default=None, help="loops of this patient (default: the first of the selection)")
    p.add_argument("--loops", type=int, default=4, help="number of loops to show")
    p.add_argument("--alphas", type=float, nargs="+", default=None, help="render the patient's pair at these alphas")
    p.add_argument("--frames", type=int, default=30, help="cycle length for --alphas")
    p.add_argument("--columns", type=int, default=8, help="frames per montage row")
    p.add_argument("--scale", type=int, default=2, help="integer upscaling of the frames")
    p.add_argument("--montage", default=None, help="path of the montage PNG (default OUT/montage.png)")
    p.add_argument("--no-mp4", action="store_true", help="skip the MP4s")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from PIL import Image

    from ..cli import CommandError
    from ..data.loops import CycleTiming
    from ..data.prepared import PreparedLoops
    from ..data.preview import montage, overlay_contours
    from ..io import write_mp4

    try:
        ds = PreparedLoops(args.data, split=args.split, source=args.source)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.alphas:
        patient = args.patient or next((p for p in ds.patients if not p.startswith("phantom")), None)
        if patient is None:
            raise CommandError("no CAMUS patient in the selection to render at --alphas.")
        try:
            samples = [ds.counterfactual(patient, a, CycleTiming(args.frames)) for a in args.alphas]
        except (KeyError, ValueError) as exc:
            raise CommandError(str(exc).strip("'\"")) from exc
    else:
        indices = ds.loops_of(args.patient) if args.patient else list(range(len(ds)))
        if not indices:
            raise CommandError("no loops match the selection.")
        samples = [ds[i] for i in indices[: args.loops]]
    rows = []
    for s in samples:
        origin = "CAMUS anatomy" if s.source == "camus" else "phantom"
        caption = (f"EF {s.ef:.0f}%\nalpha {s.alpha:g}\n{s.patient} ({s.split})\n{origin}\n"
                   f"{len(s.frames)} fr, {s.fps:.0f} fps")
        rows.append((s.frames, s.labels, s.es_index, caption))
    picture = montage(rows, columns=args.columns, scale=args.scale)
    path = Path(args.montage) if args.montage else out / "montage.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    # A 256-colour palette (grey levels plus the contour and caption colours) keeps the PNG small.
    Image.fromarray(picture).quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                                      dither=Image.Dither.NONE).save(path, optimize=True)
    print(f"montage -> {path} ({path.stat().st_size / 1e3:.0f} kB)")
    if not args.no_mp4:
        for s in samples:
            mp4 = write_mp4(overlay_contours(s.frames, s.labels, args.scale), out / f"{s.loop_id}.mp4", fps=s.fps)
            print(f"mp4 -> {mp4}")
    return 0
