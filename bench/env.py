"""The machine a bench ran on: CPU, caches, memory, measured memory bandwidth, library versions.

Everything here is read from the system (``/proc/cpuinfo``, ``/sys/devices/system/cpu``, the device tree) or
measured; nothing is assumed. Library versions come from the installed distributions' metadata, so recording
torch's version does not import torch.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.system import available_cpus

# Distributions whose versions a report records (absent ones are left out).
LIBRARIES = (
    "edgedistill",
    "numpy",
    "onnxruntime",
    "onnx",
    "llama-cpp-python",
    "tokenizers",
    "gguf",
    "psutil",
    "torch",
    "transformers",
    "matplotlib",
)
# Bandwidth probe: an array well above any last-level cache here (32 MiB L3 on the dev host, 2 MB on a Pi 5), read
# a few times; the best pass counts (the others were disturbed by something else).
BANDWIDTH_BYTES = 256 << 20
BANDWIDTH_REPEATS = 5
_SYS_CPU = Path("/sys/devices/system/cpu")


def cpu_model() -> str:
    """The CPU's marketing name (x86 ``model name``; on ARM the implementer/part, or the SoC's name)."""
    text = _read("/proc/cpuinfo")
    for key in ("model name", "Model", "Hardware", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match:
            return match.group(1).strip()
    parts = re.search(r"^CPU part\s*:\s*(\S+)$", text, re.MULTILINE)
    if parts:
        return f"ARM CPU part {parts.group(1)}"
    return platform.processor() or platform.machine()


def device_model() -> str:
    """The board's name from the device tree (e.g. ``Raspberry Pi 5 Model B Rev 1.0``), '' where there is none."""
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        text = _read(path).strip("\x00\n ")
        if text:
            return text
    return ""


def cache_sizes(cpu: int = 0) -> list[dict[str, Any]]:
    """The caches of one CPU: level, type, size in bytes, and how many CPUs share each."""
    caches = []
    for index in sorted((_SYS_CPU / f"cpu{cpu}" / "cache").glob("index*")):
        size = _parse_size(_read(index / "size"))
        if not size:
            continue
        shared = _cpu_list(_read(index / "shared_cpu_list"))
        caches.append(
            {
                "level": int(_read(index / "level") or 0),
                "type": _read(index / "type").strip() or "Unknown",
                "bytes": size,
                "shared_by": max(len(shared), 1),
            }
        )
    return caches


def last_level_cache_bytes(caches: list[dict[str, Any]]) -> int:
    """The size of the largest (last) level of data cache that one CPU reaches, 0 when unknown."""
    data = [c for c in caches if c["type"] in ("Data", "Unified")]
    if not data:
        return 0
    top = max(c["level"] for c in data)
    return max(c["bytes"] for c in data if c["level"] == top)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def measure_bandwidth(threads: int = 1, nbytes: int = BANDWIDTH_BYTES, repeats: int = BANDWIDTH_REPEATS) -> float:
    """Memory read bandwidth in bytes/s: ``threads`` threads each take the maximum of their share of one large array.

    numpy releases the GIL inside ``max``, so the threads read in parallel. The best of ``repeats`` passes counts.
    A vectorized maximum is a pure streaming read, the pattern of a decoding step that reads every weight once
    (a float ``sum`` is slower here: numpy's pairwise summation made it compute-bound at 20 GB/s where ``max`` read
    35 GB/s on the 2-vCPU EPYC dev host).

    Args:
        threads: reading threads.
        nbytes: array size; keep it well above the last-level cache.
        repeats: passes; the fastest is returned.
    """
    threads = max(1, int(threads))
    data = np.ones(max(nbytes // 8, threads * 1024), dtype=np.float64)  # ones: every page really allocated
    chunks = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(np.max, chunks))
            best = min(best, time.perf_counter() - started)
    return data.nbytes / best


def environment(threads: list[int], bandwidth: bool = True) -> dict[str, Any]:
    """What a report records about the machine.

    Args:
        threads: the thread counts of the run; bandwidth is measured for each (at most the CPUs available).
        bandwidth: measure memory bandwidth (a few seconds at most); False leaves it out (tests).
    """
    cpus = available_cpus()
    caches = cache_sizes(cpus[0] if cpus else 0)
    memory_total = 0
    try:
        import psutil

        memory_total = int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001 - psutil is a core dependency; a platform without the figure records 0
        pass
    env: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "device_model": device_model(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "logical_cpus": os.cpu_count() or 0,
        "available_cpus": len(cpus),
        "caches": caches,
        "last_level_cache_bytes": last_level_cache_bytes(caches),
        "memory_total_bytes": memory_total,
        "libraries": library_versions(),
        "executable": sys.executable,
        "load_average": load_average(),
    }
    if bandwidth:
        counts = sorted({min(max(1, t), len(cpus) or 1) for t in threads} | {1})
        env["bandwidth_gbs"] = {str(t): measure_bandwidth(t) / 1e9 for t in counts}
        env["bandwidth_method"] = (
            f"numpy float64 max over a {BANDWIDTH_BYTES >> 20} MiB array split across N threads, "
            f"best of {BANDWIDTH_REPEATS} passes, in the parent process"
        )
    return env


def bandwidth_for(env: dict[str, Any], threads: int) -> float | None:
    """Measured bandwidth (GB/s) for ``threads``: that count's, else the nearest count measured below it."""
    table = env.get("bandwidth_gbs") or {}
    counts = sorted(int(k) for k in table)
    below = [c for c in counts if c <= threads] or counts[:1]
    return float(table[str(below[-1])]) if below else None


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _parse_size(text: str) -> int:
    """``32768K`` / ``2M`` / ``512`` (sysfs cache sizes) in bytes."""
    match = re.match(r"\s*(\d+)\s*([KMG]?)", text)
    if not match:
        return 0
    return int(match.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[match.group(2)]


def _cpu_list(text: str) -> list[int]:
    """``0-3,6`` -> [0, 1, 2, 3, 6]."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            cpus.extend(range(int(low), int(high) + 1))
        elif part.strip().isdigit():
            cpus.append(int(part))
    return cpus


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded to 0.01 (empty where the system has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return []
