"""``echolvfm info PATH [--json]``: what an echo file holds (frames, frame rate, size, pixel spacing, format)."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show frames, fps, size, spacing and format of an echo file")
    p.add_argument("path", metavar="PATH", help="DICOM, NIfTI or video file")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from echolvfm_core.io import load_echo

    echo = load_echo(args.path)
    record = {
        "frames": echo.n_frames,
        "fps": round(echo.fps, 3) if echo.fps is not None else None,
        "height": echo.height,
        "width": echo.width,
        "spacing_mm": [round(float(s), 4) for s in echo.spacing_mm] if echo.spacing_mm is not None else None,
        "format": echo.source_format,
    }
    if args.json:
        print(json.dumps(record))
        return 0
    fps = f"{record['fps']:g}" if record["fps"] is not None else "unknown"
    spacing = (
        f"{record['spacing_mm'][0]:g} x {record['spacing_mm'][1]:g} mm (row x column)"
        if record["spacing_mm"] is not None
        else "unknown"
    )
    print(f"format:   {record['format']}")
    print(f"frames:   {record['frames']}" + ("" if echo.is_loop else " (still image)"))
    print(f"fps:      {fps}")
    print(f"size:     {record['width']} x {record['height']} pixels (width x height)")
    print(f"spacing:  {spacing}")
    if echo.info.ef is not None:
        print(f"EF:       {echo.info.ef:g} %")
    return 0
