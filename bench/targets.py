"""Mobile-class target profiles (``bench/targets/*.toml``) and the decode projection onto them.

A profile states a device's cores, frequency, caches, instruction set and memory read bandwidth, each number with
its source. The harness never presents host timings as a target's: it measures on the host and *projects* decode
speed onto the target from memory bandwidth, because decoding one token reads every weight once and a CPU decodes
at a roughly constant share of its read bandwidth (llama.cpp on a Pi 5: 84-91 %, FACTS.md)::

    host efficiency    = host decode tokens/s / (host bandwidth / bytes read per token)
    projected tokens/s = host efficiency x target bandwidth / bytes read per token

The projection is labelled "projection" wherever it appears. It is optimistic where the target is compute-bound
(a Pi 4 has no dot-product instructions) and meaningless where the host ran from cache (a model that fits in the
host's last-level cache decodes above the DRAM bound); the efficiency is capped at 1 and the report says so.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgeDistillError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TARGET_NAMES = ("host", "rpi4", "rpi5", "phone")
PROJECTION_LABEL = "projection"


@dataclass(frozen=True)
class TargetProfile:
    """One device class.

    Attributes:
        name: the profile's name (``rpi5``).
        description: one line.
        measured: True for ``host``: the numbers come from this machine at run time, not from the file.
        cores: CPU cores; ``--target`` limits threads and CPU affinity to them.
        big_cores: cores worth using (a phone's big cores); defaults to ``cores``.
        frequency_ghz: the fastest core's clock.
        bandwidth_gbs: memory read bandwidth in GB/s by thread count (a count without an entry uses the nearest
            count below it).
        l2_bytes_per_core, l2_shared_bytes, l3_bytes: caches (0: none or not published).
        memory, isa, notes: text.
        device_match: substrings of the board or SoC name that identify the device itself (then the bench measures
            for real and projects nothing).
        sources: where each number comes from, by field name.
    """

    name: str
    description: str = ""
    measured: bool = False
    cores: int = 0
    big_cores: int = 0
    frequency_ghz: float = 0.0
    bandwidth_gbs: dict[int, float] = field(default_factory=dict)
    l2_bytes_per_core: int = 0
    l2_shared_bytes: int = 0
    l3_bytes: int = 0
    memory: str = ""
    isa: str = ""
    notes: str = ""
    device_match: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.measured:
            return
        where = f"target {self.name}"
        if not isinstance(self.cores, int) or self.cores < 1:
            raise EdgeDistillError(f"{where}: cores must be a positive integer, got {self.cores!r}")
        if not self.bandwidth_gbs:
            raise EdgeDistillError(f"{where}: bandwidth_gbs needs at least one entry (threads = GB/s)")
        for threads, value in self.bandwidth_gbs.items():
            if not isinstance(threads, int) or threads < 1 or not isinstance(value, (int, float)) or value <= 0:
                raise EdgeDistillError(f"{where}: bandwidth_gbs.{threads} = {value!r} (expected threads = GB/s > 0)")
        for key in ("cores", "bandwidth_gbs"):
            if key not in self.sources:
                raise EdgeDistillError(f"{where}: [sources] must say where {key} comes from")

    @property
    def usable_cores(self) -> int:
        return self.big_cores or self.cores

    @property
    def cache_bytes(self) -> int:
        """The largest cache level's size (what a model must exceed for the projection to hold)."""
        return max(self.l3_bytes, self.l2_shared_bytes, self.l2_bytes_per_core * self.cores)

    def bandwidth(self, threads: int) -> float:
        """Read bandwidth in GB/s at ``threads`` threads (the nearest count measured at or below it)."""
        counts = sorted(self.bandwidth_gbs)
        below = [c for c in counts if c <= threads] or counts[:1]
        return float(self.bandwidth_gbs[below[-1]])

    def matches(self, device: str, cpu: str) -> bool:
        """Whether this machine is the device itself (its board or SoC name contains one of ``device_match``)."""
        text = f"{device} {cpu}".lower()
        return any(token.lower() in text for token in self.device_match)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "bandwidth_gbs"}
        out["bandwidth_gbs"] = {str(k): v for k, v in self.bandwidth_gbs.items()}
        out["device_match"] = list(self.device_match)
        return out


def load_target(name_or_path: str | Path) -> TargetProfile:
    """A profile by name (``rpi4``, ``rpi5``, ``phone``, ``host``) or from a TOML file of the same form.

    Raises:
        EdgeDistillError: an unknown name, an unreadable file, or a profile without sourced numbers.
    """
    text = str(name_or_path)
    if text in TARGET_NAMES:
        raw = resources.files("edgedistill.bench").joinpath("targets", f"{text}.toml").read_text(encoding="utf-8")
        origin = f"bench/targets/{text}.toml"
    else:
        path = Path(text)
        if not path.is_file():
            raise EdgeDistillError(f"target: {text}: expected one of {', '.join(TARGET_NAMES)} or a .toml profile")
        raw = path.read_text(encoding="utf-8")
        origin = str(path)
    try:
        data = tomllib.loads(raw)
    except tomllib.TOMLDecodeError as err:
        raise EdgeDistillError(f"{origin}: not valid TOML ({err})") from None
    known = set(TargetProfile.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise EdgeDistillError(
            f"{origin}: unknown keys {', '.join(unknown)} (expected some of {', '.join(sorted(known))})"
        )
    try:
        bandwidth = {int(k): float(v) for k, v in (data.get("bandwidth_gbs") or {}).items()}
    except (TypeError, ValueError):
        raise EdgeDistillError(f"{origin}: bandwidth_gbs must map thread counts to GB/s") from None
    data["bandwidth_gbs"] = bandwidth
    data["device_match"] = tuple(data.get("device_match") or ())
    data.setdefault("name", Path(origin).stem)
    return TargetProfile(**data)


def project_decode_tps(
    host_decode_tps: float, bytes_per_token: float, host_bandwidth_gbs: float, target_bandwidth_gbs: float
) -> dict[str, float | bool | str]:
    """Project a host's measured decode speed onto a target with another memory bandwidth.

    Args:
        host_decode_tps: measured decode tokens/s on the host.
        bytes_per_token: bytes a decoding step reads (weights plus KV cache).
        host_bandwidth_gbs: the host's measured read bandwidth (GB/s) at the same thread count.
        target_bandwidth_gbs: the target's read bandwidth (GB/s) at the thread count it would use.

    Returns:
        ``efficiency`` (host tokens/s / host bound, before capping), ``capped`` (the host ran above its DRAM bound,
        i.e. from cache, and the efficiency was capped at 1), ``decode_tps`` (the projection), ``bound_tps`` (the
        target's bound), ``label`` ("projection").
    """
    if bytes_per_token <= 0 or host_bandwidth_gbs <= 0 or target_bandwidth_gbs <= 0 or not host_decode_tps > 0:
        return {
            "efficiency": math.nan,
            "capped": False,
            "decode_tps": math.nan,
            "bound_tps": math.nan,
            "label": PROJECTION_LABEL,
        }
    host_bound = host_bandwidth_gbs * 1e9 / bytes_per_token
    efficiency = host_decode_tps / host_bound
    target_bound = target_bandwidth_gbs * 1e9 / bytes_per_token
    used = min(efficiency, 1.0)
    return {
        "efficiency": efficiency,
        "capped": efficiency > 1.0,
        "decode_tps": used * target_bound,
        "bound_tps": target_bound,
        "label": PROJECTION_LABEL,
    }
