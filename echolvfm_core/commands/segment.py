"""``echolvfm segment PATH [--json] [--overlay OUT.mp4] [--models DIR]``: EF by LV segmentation.

The echo is read (:func:`echolvfm_core.io.load_echo`), brought onto the model grid
(:func:`echolvfm_core.preprocess.preprocess`), segmented frame by frame, and measured: LV area curve, ED / ES
frames, area-length and Simpson EF (:mod:`echolvfm_core.estimators.segmentation`).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Overlay colours (RGB) of LV cavity, myocardium and left atrium, and their opacity.
OVERLAY_COLOURS = {1: (230, 60, 60), 2: (60, 200, 90), 3: (70, 130, 240)}
OVERLAY_ALPHA = 0.35


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment the LV in every frame and measure EF (area-length, Simpson)")
    p.add_argument("path", metavar="PATH", help="DICOM, NIfTI or video file of an apical four-chamber loop")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--overlay", metavar="OUT.mp4", default=None, help="write the loop with the labels overlaid")
    p.add_argument("--models", metavar="DIR", default=None,
                   help="folder with segmenter/ (or a segmenter folder itself); default: the bundled assets/")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.set_defaults(func=run)


def model_folder(models: str | None, name: str, default: Path) -> Path:
    """``models`` itself when it holds a config.json, else ``models/name``; the default folder when None."""
    if models is None:
        return default
    root = Path(models)
    return root if (root / "config.json").is_file() else root / name


def overlay(frames, labels):
    """RGB uint8 (T, H, W, 3) of grey frames (T, H, W) in [0, 1] with labels (T, h, w) blended in (nearest resize)."""
    import cv2
    import numpy as np

    t, h, w = frames.shape
    rgb = np.repeat((frames * 255.0)[..., None], 3, axis=-1)
    for i in range(t):
        lab = cv2.resize(labels[i], (w, h), interpolation=cv2.INTER_NEAREST)
        for cls, colour in OVERLAY_COLOURS.items():
            m = lab == cls
            rgb[i][m] = (1 - OVERLAY_ALPHA) * rgb[i][m] + OVERLAY_ALPHA * np.asarray(colour, dtype=np.float64)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _beat_to_beat(pre, m, fps: float) -> dict:
    """Beat-to-beat EF: the loop cut ED to ED (:func:`~echolvfm_core.beats.find_beats`), each beat measured on its
    own labels."""
    from echolvfm_core.beats import beat_summary, find_beats
    from echolvfm_core.estimators.segmentation import measure_labels

    beats = find_beats(pre.echo.frames, fps, m.lv_area, pre.mask)
    efs = []
    for b in beats.beats:
        try:
            efs.append(measure_labels(m.labels[b.start : b.stop], pre.echo.spacing_mm).ef)
        except ValueError:
            efs.append(None)
    return beat_summary(beats, efs)


def run(args: argparse.Namespace) -> int:
    from echolvfm_core.cli import CommandError
    from echolvfm_core.estimators.segmentation import SegmentationEF, SegmentationError, default_segmenter_dir
    from echolvfm_core.io import load_echo, write_mp4
    from echolvfm_core.preprocess import preprocess

    folder = model_folder(args.models, "segmenter", default_segmenter_dir())
    if not (folder / "config.json").is_file():
        raise CommandError(
            f"No segmenter in {folder}; train one with `echolvfm train segmenter` or point --models at one."
        )
    if args.overlay is not None and not Path(args.overlay).resolve().parent.is_dir():
        raise CommandError(f"The folder of --overlay {args.overlay} does not exist.")
    echo = load_echo(args.path).require_loop("Segmentation EF")
    pre = preprocess(echo, size=112)
    seg = SegmentationEF.from_pretrained(folder, device=args.device)
    try:
        m = seg.measure(pre.echo.frames, pre.echo.spacing_mm)
    except SegmentationError as exc:
        raise CommandError(str(exc)) from None
    if args.overlay is not None:
        write_mp4(overlay(pre.display.frames, m.labels), args.overlay, fps=echo.fps or 25.0)
    record = {"path": str(args.path), "n_frames": int(pre.echo.n_frames),
              "fps": echo.fps, **m.to_dict()}
    if echo.fps:
        record["beat_to_beat"] = _beat_to_beat(pre, m, echo.fps)
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"EF (area-length): {m.ef:.1f} %   (Simpson, single plane: {m.ef_simpson:.1f} %)")
    print(f"ED frame {m.ed_index}, ES frame {m.es_index}; "
          f"EDV {m.edv:.1f} {m.volume_unit}, ESV {m.esv:.1f} {m.volume_unit}")
    b2b = record.get("beat_to_beat")
    if b2b and b2b["beats_measured"] > 1:
        hr = b2b["heart_rate_bpm"]
        print(f"{b2b['beats_measured']} beats (ED to ED): " + ", ".join(
            f"{b['ef']:.1f} %" for b in b2b["beats"] if b["ef"] is not None)
            + f"; mean {b2b['ef_mean']:.1f} %, SD {b2b['ef_sd']:.1f}" + (f"; heart rate {hr:.0f} bpm" if hr else ""))
    if not m.phases_found:
        print("note: no full cardiac cycle was found on the LV area curve; largest and smallest areas were used.")
    if args.overlay is not None:
        print(f"overlay written to {args.overlay}")
    return 0
