"""Start EchoLVFM Studio from a :class:`StudioConfig` (flags are parsed in ``launch.py`` only).

Offline and safe by construction: Gradio analytics off (environment set before Gradio is imported), fonts served
locally by the default theme, no SSR / share link / run history / MCP server, a maximum upload size, and a
controlled temporary folder (``GRADIO_TEMP_DIR``) that holds every upload and generated file: per-session files are
deleted when the session ends, cached files older than an hour are swept every ten minutes, and the whole folder
is removed when the server stops (or, after a ``kill -9``, by the next start).
"""
from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["StudioConfig", "create_demo", "prepare_environment", "serve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StudioConfig:
    """Everything ``launch.py`` can set.

    Attributes:
        host: interface to bind (127.0.0.1 keeps the app local).
        port: TCP port.
        device: "auto" (CUDA when present), "cpu", "cuda", ...
        models: folder with vae/, generator/, segmenter/, ef_regressor/.
        auth: (user, password) required to open the app, or ``None``.
        data: optional folder of cases (CAMUS patients or echo files) to pick from.
        max_upload: largest accepted upload, e.g. "200mb".
        quiz_db: a realism-quiz database; when set, the Quiz and Results tabs are added.
        quiz_study: the study readers take (default: the newest in ``quiz_db``).
        admin_password: opens the Results tab (None: it stays locked); left out of the repr.
    """

    host: str = "127.0.0.1"
    port: int = 7860
    device: str = "auto"
    models: Path = Path("assets")
    auth: tuple[str, str] | None = None
    data: Path | None = None
    max_upload: str = "200mb"
    quiz_db: Path | None = None
    quiz_study: str | None = None
    admin_password: str | None = field(default=None, repr=False)


def prepare_environment() -> Path:
    """Create the controlled temporary folder and set the environment Gradio reads at import time.

    Call before ``import gradio``. Returns the folder, made by :func:`app.tempdir.make_server_folder` (under
    ``TMPDIR`` when set, removed at interpreter exit; the folders of servers killed before they could remove theirs
    are removed first).
    """
    from .tempdir import make_server_folder

    root = make_server_folder()
    os.environ["GRADIO_TEMP_DIR"] = str(root)
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    return root


def create_demo(config: StudioConfig, extra_tabs: Sequence[Callable[[], None]] = ()):
    """Build the app (models are not loaded until first use); with ``config.quiz_db`` the Quiz and Results tabs come
    before ``extra_tabs``. Returns ``(demo, engine)``."""
    from .engine import StudioEngine
    from .ui import build_demo

    if config.data is not None and not Path(config.data).is_dir():
        raise FileNotFoundError(config.data)
    work_root = Path(os.environ.get("GRADIO_TEMP_DIR") or tempfile.gettempdir()) / "studio"
    header = None
    if config.quiz_db is not None:
        from .quiz.tabs import QUIZ_HEADER, quiz_tabs

        extra_tabs = [*quiz_tabs(config.quiz_db, work_root, config.quiz_study, config.admin_password,
                                 signed_in=config.auth is not None), *extra_tabs]
        header = QUIZ_HEADER
    engine = StudioEngine(config.models, config.device)
    return build_demo(engine, work_root, config.data, extra_tabs=extra_tabs, header=header), engine


def serve(config: StudioConfig, block: bool = True, extra_tabs: Sequence[Callable[[], None]] = ()):
    """Launch the app on ``config.host:config.port``; with ``block=False`` return the running demo."""
    if "GRADIO_TEMP_DIR" not in os.environ:
        prepare_environment()
    import gradio as gr

    from .ui import CSS, HEAD

    demo, _ = create_demo(config, extra_tabs)
    demo.queue(default_concurrency_limit=4)
    demo.launch(
        server_name=config.host,
        server_port=config.port,
        auth=config.auth,
        max_file_size=config.max_upload,
        share=False,
        ssr_mode=False,
        mcp_server=False,
        pwa=False,
        enable_monitoring=False,
        run_history=False,
        footer_links=["api", "settings"],
        show_error=True,
        quiet=True,
        prevent_thread_lock=not block,
        theme=gr.themes.Default(),
        css=CSS,
        head=HEAD,
    )
    return demo
