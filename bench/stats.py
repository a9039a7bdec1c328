"""Statistics of repeated timings: mean and sample standard deviation over repetitions, percentiles of latencies.

Pure functions on plain lists, so that the numbers in a report can be checked against a hand computation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_std(values: Sequence[float]) -> dict[str, float | int]:
    """Mean and sample standard deviation (n - 1 in the denominator, as llama-bench reports) of ``values``.

    Returns:
        ``{"mean", "std", "n", "min", "max"}``; ``std`` is 0.0 for a single value. An empty input gives NaNs and
        ``n = 0``.
    """
    data = [float(v) for v in values]
    n = len(data)
    if n == 0:
        return {"mean": math.nan, "std": math.nan, "n": 0, "min": math.nan, "max": math.nan}
    mean = math.fsum(data) / n
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in data) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "min": min(data), "max": max(data)}


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation between order statistics (numpy's default).

    Raises:
        ValueError: no values, or ``q`` outside 0..100.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q: a percentile must lie in 0..100, got {q}")
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("values: a percentile of no values")
    position = (len(data) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def rate(count: int, seconds: float) -> float:
    """``count / seconds``, or 0.0 when no time passed (a clock too coarse, or nothing done)."""
    return count / seconds if seconds > 0 and count > 0 else 0.0


def summarize_runs(runs: Sequence[dict[str, float | list[float]]]) -> dict[str, object]:
    """The per-row statistics from the measured (not warm-up) repetitions of one model and thread count.

    Args:
        runs: one dict per repetition with ``prefill_s`` (prompt evaluation), ``ttft_s`` (prompt evaluation and
            the first token's choice), ``prompt_tokens`` and ``step_s`` (the wall time of each decoding step after
            the first token, seconds).

    Returns:
        ``ttft_ms``, ``prefill_tps`` and ``decode_tps`` as :func:`mean_std` over repetitions (each repetition's rate
        is computed first, then averaged, as llama-bench does); ``token_ms_p50``/``token_ms_p95`` over every
        decoding step of every repetition pooled; ``decode_steps``.
    """
    if not runs:
        raise ValueError("runs: no measured repetitions")
    ttft = [float(run["ttft_s"]) * 1000.0 for run in runs]  # type: ignore[arg-type]
    prefill = [rate(int(run["prompt_tokens"]), float(run["prefill_s"])) for run in runs]  # type: ignore[arg-type]
    decode = [rate(len(run["step_s"]), math.fsum(run["step_s"])) for run in runs]  # type: ignore[arg-type]
    steps = [float(s) * 1000.0 for run in runs for s in run["step_s"]]  # type: ignore[union-attr]
    return {
        "ttft_ms": mean_std(ttft),
        "prefill_tps": mean_std(prefill),
        "decode_tps": mean_std(decode),
        "token_ms_p50": percentile(steps, 50) if steps else math.nan,
        "token_ms_p95": percentile(steps, 95) if steps else math.nan,
        "decode_steps": len(steps),
    }
