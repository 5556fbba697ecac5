"""Start EchoLVFM Studio: ``python launch.py`` serves http://127.0.0.1:7860 with the bundled models.

Flags: --host, --port, --device, --models DIR, --auth USER:PASS, --data DIR, --max-upload SIZE, and for the
realism quiz --quiz-db PATH, --quiz-study ID, --admin-password PASS (or the ECHOLVFM_ADMIN_PASSWORD variable).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from pathlib import Path

from app.server import StudioConfig, prepare_environment


def parse_args(argv: list[str] | None = None) -> StudioConfig:
    """Parse the command line into a :class:`StudioConfig` (exits with a usage message on bad flags)."""
    p = argparse.ArgumentParser(prog="launch.py", description="EchoLVFM Studio: EF counterfactual echocardiograms.")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--models", type=Path, default=Path(__file__).resolve().parent / "assets",
                   help="folder with vae/, generator/, segmenter/, ef_regressor/ (default: the bundled assets/)")
    p.add_argument("--auth", default=None, metavar="USER:PASS", help="require this user name and password")
    p.add_argument("--data", type=Path, default=None, help="a CAMUS or echo folder to pick cases from")
    p.add_argument("--max-upload", default="200mb", metavar="SIZE",
                   help="largest accepted upload, e.g. 200mb or 1gb (default 200mb)")
    p.add_argument("--quiz-db", type=Path, default=None, metavar="PATH",
                   help="realism-quiz database (from `echolvfm quiz create`): adds the Quiz and Results tabs")
    p.add_argument("--quiz-study", default=None, metavar="ID", help="study to take (default: the newest in --quiz-db)")
    p.add_argument("--admin-password", default=os.environ.get("ECHOLVFM_ADMIN_PASSWORD"), metavar="PASS",
                   help="opens the Results tab (default: $ECHOLVFM_ADMIN_PASSWORD; without it the tab stays locked)")
    args = p.parse_args(argv)
    auth = None
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            p.error("--auth must be USER:PASS with a non-empty user name and password.")
        auth = (user, password)
    if not re.fullmatch(r"\d+(\.\d+)?\s*(b|kb|mb|gb)", args.max_upload.strip().lower()):
        p.error(f"--max-upload must look like 200mb or 1gb; got {args.max_upload!r}.")
    if args.data is not None and not args.data.is_dir():
        p.error(f"--data {args.data} is not a folder.")
    if args.quiz_db is not None and not args.quiz_db.is_file():
        p.error(f"--quiz-db {args.quiz_db} is not a file; create a study with `echolvfm quiz create`.")
    if args.quiz_study is not None and args.quiz_db is None:
        p.error("--quiz-study needs --quiz-db.")
    if not 0 < args.port < 65536:
        p.error(f"--port must be between 1 and 65535; got {args.port}.")
    return StudioConfig(host=args.host, port=args.port, device=args.device, models=args.models, auth=auth,
                        data=args.data, max_upload=args.max_upload.strip().lower(), quiz_db=args.quiz_db,
                        quiz_study=args.quiz_study, admin_password=args.admin_password or None)


def _exit_on_signal(*_) -> None:
    # a second SIGTERM (e.g. from both a wrapper and a process-group kill) must not interrupt the clean-up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    temp = prepare_environment()  # before Gradio is imported: temp folder, analytics off
    # SIGTERM exits like Ctrl-C, so that the temporary folder is removed (atexit) when a service manager stops us.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from app.engine import StudioEngine, resolve_device
    from app.server import serve

    try:
        device = resolve_device(config.device)
    except ValueError as exc:
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return 2
    status = StudioEngine(config.models, device).status()
    missing = ", ".join(name for name, ok in status.items() if not ok)
    print(f"EchoLVFM Studio on http://{config.host}:{config.port} (device {device}, models {config.models}"
          + (f"; missing: {missing}" if missing else "") + f"; temporary files in {temp}, removed on exit)",
          flush=True)
    serve(config, block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
