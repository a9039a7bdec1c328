"""Resident memory of this process, sampled by a background thread (default every 2.5 ms, i.e. up to 400 Hz).

The sampler runs inside the measuring process, so it sees exactly what the model costs there: weights read into
memory or mapped pages touched (a memory-mapped GGUF file's pages count once they are read), the KV cache,
scratch buffers, and the libraries. It reads ``/proc/self/statm`` where there is one (a single small read) and
``psutil`` elsewhere. Native code (llama.cpp, onnxruntime) releases the GIL while it computes, so the thread keeps
its rate during a forward pass; the achieved rate is recorded so that a report can say when it fell below 100 Hz.

The kernel's own high-water mark (``VmHWM``) is read as a cross-check: it cannot miss a short peak, but it covers
the process's whole life, imports included.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

# Sampling period. 2.5 ms leaves room below the required 100 Hz for a busy machine and the GIL's 5 ms switch interval.
DEFAULT_INTERVAL_S = 0.0025
MIN_RATE_HZ = 100.0
_STATM = "/proc/self/statm"


def _page_size() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 4096


_PAGE = _page_size()


def current_rss() -> int:
    """This process's resident set size in bytes."""
    try:
        with open(_STATM, "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def kernel_peak_rss() -> int | None:
    """The kernel's high-water mark of this process's RSS in bytes, or None where unavailable.

    Linux: ``VmHWM`` of ``/proc/self/status``, which belongs to the address space and starts afresh at ``exec``.
    (``ru_maxrss`` does not: Linux carries it across ``exec``, so a child would inherit its parent's peak.)
    Elsewhere ``ru_maxrss``, which then may include the parent's peak.
    """
    for line in _read_lines("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB elsewhere


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.readlines()
    except OSError:
        return []


class RssSampler:
    """Samples :func:`current_rss` in a daemon thread between :meth:`start` and :meth:`stop` (or a ``with`` block).

    Attributes:
        baseline: RSS in bytes when sampling started.
        peak: the highest RSS seen, in bytes.
        samples: how many samples were taken.
        seconds: how long the sampler ran.
    """

    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s: must be positive, got {interval_s}")
        self.interval_s = interval_s
        self.baseline = 0
        self.peak = 0
        self.samples = 0
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0

    def start(self) -> RssSampler:
        self.baseline = self.peak = current_rss()
        self.samples = 1
        self._stop.clear()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            value = current_rss()
            self.samples += 1
            if value > self.peak:
                self.peak = value

    def sample_now(self) -> int:
        """Take one sample from the calling thread (e.g. right after a step that may have peaked) and return it."""
        value = current_rss()
        self.samples += 1
        self.peak = max(self.peak, value)
        return value

    def stop(self) -> RssSampler:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.seconds = time.perf_counter() - self._started
            self.sample_now()
        return self

    @property
    def rate_hz(self) -> float:
        """Samples per second actually achieved."""
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def to_dict(self) -> dict[str, Any]:
        return {
            "rss_before_mb": self.baseline / 1e6,
            "peak_rss_mb": self.peak / 1e6,
            "rss_samples": self.samples,
            "rss_rate_hz": self.rate_hz,
        }


def run_with_peak_rss(command: list[str], interval_s: float = 0.02) -> tuple[int, float, str]:
    """Run ``command`` (stdout discarded); (exit code, its peak RSS in MB sampled every ``interval_s``, stderr).

    Sampled from outside with psutil rather than read from ``ru_maxrss``, which a child inherits from its parent."""
    import subprocess
    import tempfile

    import psutil

    with tempfile.TemporaryFile("w+") as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True)
        watched = psutil.Process(process.pid)
        peak = 0
        while process.poll() is None:
            try:
                peak = max(peak, watched.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(interval_s)
        errors.seek(0)
        return process.returncode, peak / 2**20, errors.read()
