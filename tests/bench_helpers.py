"""Hand-made bench rows and results (the shape run_bench returns), for the claim checker and report tests."""

from __future__ import annotations

from typing import Any

from edgedistill.bench.harness import DEFINITIONS
from edgedistill.bench.report import SCHEMA, SCHEMA_VERSION


def stat(mean: float, std: float = 0.0, n: int = 3) -> dict[str, float | int]:
    return {"mean": mean, "std": std, "n": n, "min": mean - std, "max": mean + std}


def make_row(
    label: str,
    parameters: int,
    decode: float,
    peak_mb: float = 200.0,
    before_mb: float = 50.0,
    threads: int = 2,
    role: str = "student",
    backend: str = "llama.cpp",
    quantization: str = "q8_0",
    quality: dict[str, Any] | None = None,
    projection: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    file_bytes = parameters  # about one byte per weight (q8_0)
    row = {
        "label": label,
        "role": role,
        "path": f"/models/{label}.gguf",
        "backend": backend,
        "format": "gguf",
        "quantization": quantization,
        "parameters": parameters,
        "file_bytes": file_bytes,
        "threads": threads,
        "cpus": [0, 1][:threads],
        "load_s": 0.1,
        "load_mode": "mmap (llama.cpp; pages are read on first use)",
        "ttft_ms": stat(10.0, 1.0),
        "prefill_tps": stat(1000.0, 10.0),
        "decode_tps": stat(decode, decode * 0.02),
        "token_ms_p50": 1000.0 / decode,
        "token_ms_p95": 1100.0 / decode,
        "decode_steps": 30,
        "prompt_tokens": 16,
        "gen_tokens": 11,
        "peak_rss_mb": peak_mb,
        "rss_before_mb": before_mb,
        "model_rss_mb": peak_mb - before_mb,
        "rss_after_load_mb": peak_mb - 1,
        "kernel_peak_rss_mb": peak_mb,
        "sampled_peak_rss_mb": peak_mb - 1,
        "peak_source": "kernel high-water mark (VmHWM)",
        "rss_rate_hz": 350.0,
        "rss_samples": 100,
        "bytes_per_token": float(file_bytes),
        "weight_bytes_per_token": file_bytes,
        "kv_bytes_per_position": 1000,
        "bytes_method": "hand-made",
        "bandwidth_gbs": 20.0,
        "bound_tps": 20e9 / file_bytes,
        "bound_share": decode / (20e9 / file_bytes),
        "fits_in_host_cache": file_bytes <= 32 << 20,
        "runs": [],
        "load_average": [0.1, 0.1, 0.1],
        "unstable": False,
        "measured_on": "host",
    }
    if quality is not None:
        row["quality"] = quality
    if projection is not None:
        row["projection"] = projection
    row.update(extra)
    return row


def make_result(rows: list[dict[str, Any]], target: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": "2026-11-30T10:00:00+0000",
        "config": {"prompt_tokens": 16, "gen_tokens": 11, "repeat": 3, "warmup": 1, "threads": [2]},
        "environment": {
            "cpu_model": "Test CPU",
            "device_model": "",
            "machine": "x86_64",
            "system": "Linux",
            "logical_cpus": 2,
            "available_cpus": 2,
            "caches": [{"level": 3, "type": "Unified", "bytes": 32 << 20, "shared_by": 2}],
            "last_level_cache_bytes": 32 << 20,
            "memory_total_bytes": 8e9,
            "libraries": {"python": "3.11"},
            "bandwidth_gbs": {"1": 18.0, "2": 20.0},
        },
        "target": target,
        "on_target": False,
        "definitions": DEFINITIONS,
        "rows": rows,
        "skipped": [],
        "notes": [],
        "claims": None,
    }
