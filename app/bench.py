"""Latency benchmark of the Studio through its public API, and a helper that runs the app in a subprocess.

:func:`benchmark_app` measures what a user waits for after releasing the EF slider: the time from sending the
``/counterfactual`` request (the slider's release event) with ``gradio_client`` until the side-by-side MP4 has been
generated, written, sent and downloaded by the client, i.e. is playable. The case is loaded once (``/load_sample``),
so, as in the app, each request runs only the one-step generator, the decoder and the video writer on cached latents.

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

__all__ = ["COUNTERFACTUAL_DEFAULTS", "LocalServer", "benchmark_app", "free_port"]

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

    ``url`` is set once the app answers; the server's output goes to ``log_path`` (see :meth:`log`), which the
    context manager deletes on a clean exit and keeps when an exception left the block.
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

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if exc_type is None:
            self.log_path.unlink(missing_ok=True)

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
        """Stop the app (SIGTERM, then SIGKILL after 30 s: a busy server on a loaded machine takes a while to clean
        up its temporary folder)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def log(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the server's output."""
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""


def _fetch_video(value) -> int:
    """Download the video an endpoint returned (as a browser would) and check it is an MP4; returns its size."""
    import httpx

    data = value.get("video", value) if isinstance(value, dict) else None
    url = data.get("url") if isinstance(data, dict) else None
    if not url:
        raise RuntimeError(f"/counterfactual returned no video URL: {value!r}")
    response = httpx.get(url, timeout=60)
    response.raise_for_status()
    if response.content[4:8] != b"ftyp":
        raise RuntimeError(f"{url} is not an MP4 file.")
    return len(response.content)


def _measure(url: str, n: int, warmup: int, efs: list[float], length: int | None, seed: int,
             case: str = "sample") -> dict:
    from gradio_client import Client

    # download_files=False: the bench fetches each video itself, into memory, as the browser does.
    client = Client(url, verbose=False, download_files=False)
    t0 = time.perf_counter()
    loaded = client.predict(api_name=f"/load_{case}")
    load_ms = (time.perf_counter() - t0) * 1000.0
    # /load_sample returns the case's outputs (video, case text, case numbers, ...); /load_cine only loads.
    info = loaded[2] if isinstance(loaded, (list, tuple)) and len(loaded) > 2 else {}
    mode, k, _, _, reject, reject_k, contours = COUNTERFACTUAL_DEFAULTS
    length = int(length or info.get("frames") or 16)
    wall, server, stages, sizes = [], [], {}, []
    for i in range(warmup + n):
        ef = efs[i % len(efs)]
        t0 = time.perf_counter()
        video, _, summary = client.predict(ef, mode, k, length, seed, reject, reject_k, contours,
                                           api_name="/counterfactual")
        size = _fetch_video(video)
        elapsed = (time.perf_counter() - t0) * 1000.0
        if i >= warmup:
            wall.append(elapsed)
            server.append(float(summary["latency_ms"]))
            sizes.append(size)
            for name, ms in summary.get("timings_ms", {}).items():
                stages.setdefault(name, []).append(float(ms))
    wall_sorted = sorted(wall)
    return {
        "n": n,
        "warmup": warmup,
        "frames": length,
        "median_ms": statistics.median(wall),
        "p90_ms": wall_sorted[min(len(wall_sorted) - 1, round(0.9 * (len(wall_sorted) - 1)))],
        "min_ms": wall_sorted[0],
        "max_ms": wall_sorted[-1],
        "server_median_ms": statistics.median(server),
        "stage_median_ms": {name: statistics.median(v) for name, v in stages.items()},
        "video_kb": statistics.median(sizes) / 1024,
        "load_sample_ms": load_ms,
        "efs": efs,
        "case": case,
        "display_size": summary.get("display_size"),
        "fps": summary.get("fps"),
    }


def benchmark_app(url: str | None = None, models: str | Path = "assets", device: str = "cpu", n: int = 20,
                  warmup: int = 2, efs: list[float] | None = None, length: int | None = None, seed: int = 0,
                  threads: int | None = None, case: str = "sample") -> dict:
    """Median time from slider release (a ``/counterfactual`` request) to a playable video on the client.

    Args:
        url: a running app; ``None`` starts one with :class:`LocalServer` (``models``, ``device``).
        n: timed requests; ``warmup`` untimed requests go first (model loading, caches).
        efs: requested EFs, cycled (default 20, 35, 50, 65, 80 %).
        length: output length in frames (default: the sample's).
        seed: generator seed (fixed, as when a user drags the slider).
        threads: when starting the app, limit torch / BLAS threads to this many (OMP_NUM_THREADS etc.).
        case: "sample" (the 30-frame sample, decoded on the model grid) or "cine" (the 120-frame cine: a beat
            rendered on its acquired frames at display resolution and 30 fps).

    Returns:
        ``{n, warmup, frames, median_ms, p90_ms, min_ms, max_ms, server_median_ms, stage_median_ms, video_kb,
        load_sample_ms, efs, url, models, device, threads}``: times in ms from request to the downloaded MP4;
        ``server_median_ms`` is the app's own generation-to-file time and ``stage_median_ms`` its parts (flow,
        decode, video, ...); the rest of ``median_ms`` is queueing, transfer and the client.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1; got {n}.")
    if case not in ("sample", "cine"):
        raise ValueError(f"case must be 'sample' or 'cine'; got {case!r}.")
    efs = list(efs or [20.0, 35.0, 50.0, 65.0, 80.0])
    meta = {"models": str(models), "device": device, "threads": threads}
    if url is not None:
        return {**_measure(url, n, warmup, efs, length, seed, case), "url": url, **meta}
    env = {}
    if threads is not None:
        env = {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    with LocalServer(models, device, env=env) as server:
        return {**_measure(server.url, n, warmup, efs, length, seed, case), "url": server.url, **meta}
