"""The machine a command runs on: the CPUs it may use, their feature flags, and the torch device it asked for.

Part of the shared core: every stage imports it, ``runtime/`` included; torch is imported only by
:func:`resolve_device`, and only when it is called.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

from edgedistill.errors import EdgeDistillError

DEVICES = "auto, cpu, cuda or cuda:N"
# The longest context a model file may declare and a caller may ask for (tokens): 16 times the 1M of the longest
# open models today, and small enough that llama.cpp's 32-bit position arithmetic cannot overflow.
MAX_CONTEXT = 1 << 24


def available_cpus() -> list[int]:
    """The CPU ids this process may run on: its affinity mask, which containers and ``taskset`` narrow."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity mask
        return list(range(os.cpu_count() or 1))


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The feature flags of the first CPU in ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def check_device(value: Any) -> None:
    """``--device``: the spellings :func:`resolve_device` accepts (whether CUDA is there is checked there).

    Raises:
        EdgeDistillError: anything else, naming the accepted values.
    """
    if not (isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value)):
        raise EdgeDistillError(f"device: expected {DEVICES}, got {value!r}")


def resolve_device(choice: str) -> Any:
    """``--device`` as a ``torch.device``: ``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        EdgeDistillError: an unknown spelling, or CUDA asked for on a machine without it.
    """
    import torch

    check_device(choice)
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(choice.partition(":")[2] or 0)
        if index >= count:
            raise EdgeDistillError(
                f"device: {choice!r} was asked for but this machine has {count} CUDA device(s); expected auto or cpu"
                + (f" or cuda:0..cuda:{count - 1}" if count else "")
            )
    return torch.device(choice)
