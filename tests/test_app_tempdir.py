"""The server's temporary folder: a server killed with SIGKILL leaves its folder behind; the next start removes it."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

from app.server import prepare_environment


def test_next_start_sweeps_the_folders_of_dead_servers(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for name in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED", "HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.delenv(name, raising=False)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    folders = {}
    for name, pid in (("dead", int(dead.stdout)), ("alive", os.getpid()), ("no-pid", None)):
        folders[name] = tmp_path / f"echolvfm-studio-{name}"
        (folders[name] / "studio").mkdir(parents=True)
        (folders[name] / "studio" / "case.mp4").write_bytes(b"video")
        if pid is not None:
            (folders[name] / "server.pid").write_text(f"{pid}\n")
    (tmp_path / "someone-else-dead").mkdir()
    (tmp_path / "someone-else-dead" / "server.pid").write_text(dead.stdout)

    root = prepare_environment()

    assert not folders["dead"].exists()
    assert folders["alive"].is_dir() and folders["no-pid"].is_dir() and (tmp_path / "someone-else-dead").is_dir()
    assert root.parent == tmp_path and (root / "server.pid").read_text() == f"{os.getpid()}\n"
    assert os.environ["GRADIO_TEMP_DIR"] == str(root)
