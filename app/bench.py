"""Latency benchmark of the Studio through its public API, and a helper that runs the app in a subprocess.

:func:`benchmark_app` measures what a user waits for after releasing the EF slider: the time from sending the
``/counterfactual`` request (the slider's release event) with ``gradio_client`` until the side-by-side MP4 has been
generated, written, sent and saved on the client, i.e. is playable. The case is loaded once (``/load_sample``), so, as
in the app, each request runs only the one-step generator, the decoder and the video writer on cached latents.

    from app.bench import benchmark_app
    benchmark_app(models="assets", n=20)          # starts the app on a free local port, returns a dict
    benchmark_app(url="http://127.0.0.1:7860/")   # or measures an app that is already running

:class:`LocalServer` starts ``launch.py`` on 127.0.0.1 and a free port and waits (bounded) until it answers; the app's
tests use it too.
"""
from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["LocalServer", "free_port", "benchmark_app", "COUNTERFACTUAL_DEFAULTS"]

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Default values of the /counterfactual endpoint's inputs after the EF: observed-frames mode, k, output length,
#: seed, rejection sampling on/off, candidates, LV contours on/off.
COUNTERFACTUAL_DEFAULTS = ("ed", 4, None, 0, False, 4, False)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalServer:
    """``python launch.py`` in a subprocess on 127.0.0.1 and a free port, as a context manager.

    Args:
        models: models folder passed as --models.
        device: passed as --device.
        extra_args: further launch.py flags (e.g. ["--data", DIR]).
        startup_timeout: seconds to wait for the app to answer before giving up (the process is then stopped).
        env: extra environment variables for the subprocess.

    ``url`` is set once the app answers; the server log is kept in ``log_path`` (read it when start-up fails).
    """

    def __init__(self, models: str | Path = "assets", device: str = "cpu", extra_args: list[str] | None = None,
                 startup_timeout: float = 120.0, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.cmd = [sys.executable, str(REPO_ROOT / "launch.py"), "--port", str(self.port), "--models",
                    str(models), "--device", device, *(extra_args or [])]
        self.startup_timeout = startup_timeout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = Path(tempfile.mkstemp(prefix="echolvfm-studio-server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "LocalServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO_ROOT, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"The app exited with code {self.proc.returncode} during start-up: {self.log()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"The app did not answer on {self.url} within {self.startup_timeout:.0f} s: {self.log()}")

    def stop(self) -> None:
        """Stop the app (SIGTERM, then SIGKILL after 10 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the server's output."""
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""


def _measure(url: str, n: int, warmup: int, efs: list[float], length: int | None, seed: int) -> dict:
    from gradio_client import Client

    client = Client(url, verbose=False, download_files=tempfile.mkdtemp(prefix="echolvfm-bench-"))
    t0 = time.perf_counter()
    loaded = client.predict(api_name="/load_sample")
    load_ms = (time.perf_counter() - t0) * 1000.0
    info = loaded[2]  # outputs without the session state: video, case text, case numbers, ...
    mode, k, _, _, reject, reject_k, contours = COUNTERFACTUAL_DEFAULTS
    length = int(length or info["frames"])
    wall, server = [], []
    for i in range(warmup + n):
        ef = efs[i % len(efs)]
        t0 = time.perf_counter()
        video, _, summary = client.predict(ef, mode, k, length, seed, reject, reject_k, contours,
                                              api_name="/counterfactual")
        elapsed = (time.perf_counter() - t0) * 1000.0
        path = video["video"] if isinstance(video, dict) else video
        if not path or not Path(path).is_file() or Path(path).stat().st_size == 0:
            raise RuntimeError(f"/counterfactual returned no video for EF {ef}.")
        if i >= warmup:
            wall.append(elapsed)
            server.append(float(summary["latency_ms"]))
    wall_sorted = sorted(wall)
    return {
        "n": n,
        "warmup": warmup,
        "frames": length,
        "median_ms": statistics.median(wall),
        "p90_ms": wall_sorted[min(len(wall_sorted) - 1, int(round(0.9 * (len(wall_sorted) - 1))))],
        "min_ms": wall_sorted[0],
        "max_ms": wall_sorted[-1],
        "server_median_ms": statistics.median(server),
        "load_sample_ms": load_ms,
        "efs": efs,
    }


def benchmark_app(url: str | None = None, models: str | Path = "assets", device: str = "cpu", n: int = 20,
                  warmup: int = 2, efs: list[float] | None = None, length: int | None = None, seed: int = 0,
                  threads: int | None = None) -> dict:
    """Median time from slider release (a ``/counterfactual`` request) to a playable video on the client.

    Args:
        url: a running app; ``None`` starts one with :class:`LocalServer` (``models``, ``device``).
        n: timed requests; ``warmup`` untimed requests go first (model loading, caches).
        efs: requested EFs, cycled (default 20, 35, 50, 65, 80 %).
        length: output length in frames (default: the sample's).
        seed: generator seed (fixed, as when a user drags the slider).
        threads: when starting the app, limit torch / BLAS threads to this many (OMP_NUM_THREADS etc.).

    Returns:
        ``{n, warmup, frames, median_ms, p90_ms, min_ms, max_ms, server_median_ms, load_sample_ms, efs, url,
        models, device, threads}``; ``server_median_ms`` is the app's own generation-to-file time, the rest of
        ``median_ms`` is queueing, transfer and the client.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}.")
    efs = list(efs or [20.0, 35.0, 50.0, 65.0, 80.0])
    meta = {"models": str(models), "device": device, "threads": threads}
    if url is not None:
        return {**_measure(url, n, warmup, efs, length, seed), "url": url, **meta}
    env = {}
    if threads is not None:
        env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with LocalServer(models, device, env=env) as server:
        return {**_measure(server.url, n, warmup, efs, length, seed), "url": server.url, **meta}
