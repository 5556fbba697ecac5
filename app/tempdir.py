"""The server's temporary folder, marked with the server's process ID so that a later start can remove the folders
of servers that died without cleaning up (``kill -9``, a crash, a power cut): their uploads, generated videos and
quiz files would otherwise stay on disk."""
from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["PID_FILE", "PREFIX", "make_server_folder", "sweep_dead_servers"]

log = logging.getLogger(__name__)

#: Name prefix of a server's folder, under the system temporary folder (``TMPDIR`` when set).
PREFIX = "echolvfm-studio-"
#: The file in a server's folder that holds the server's process ID.
PID_FILE = "server.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        return True
    return True


def sweep_dead_servers(parent: Path) -> list[Path]:
    """Remove this user's server folders under ``parent`` whose process is no longer running; return them.

    A folder without a readable process ID (made by an older version, or being created right now) is left alone,
    and so is one whose process ID has since been taken by another process.
    """
    removed = []
    for folder in sorted(parent.glob(PREFIX + "*")):
        try:
            if folder.stat().st_uid != os.getuid():
                continue
            pid = int((folder / PID_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d temporary folder(s) of servers that are no longer running", len(removed))
    return removed


def make_server_folder() -> Path:
    """Sweep the folders of dead servers, then make this server's folder (``tempfile.mkdtemp``), marked with this
    process's ID and removed at interpreter exit."""
    sweep_dead_servers(Path(tempfile.gettempdir()))
    root = Path(tempfile.mkdtemp(prefix=PREFIX))
    (root / PID_FILE).write_text(f"{os.getpid()}\n")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return root
