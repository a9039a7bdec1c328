"""Statistics of the bench on synthetic timings, checked against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgedistill.bench.stats import mean_std, percentile, rate, summarize_runs


def test_mean_and_sample_stddev():
    result = mean_std([10.0, 12.0, 14.0])
    assert result["mean"] == pytest.approx(12.0)
    assert result["std"] == pytest.approx(2.0)  # sqrt(((-2)^2 + 0 + 2^2) / (3 - 1))
    assert (result["n"], result["min"], result["max"]) == (3, 10.0, 14.0)


def test_one_value_has_zero_spread_and_none_is_nan():
    assert mean_std([5.0])["std"] == 0.0
    empty = mean_std([])
    assert empty["n"] == 0 and math.isnan(empty["mean"])


@pytest.mark.parametrize("q", [0, 5, 50, 90, 95, 100])
def test_percentile_matches_numpy_linear(q):
    values = np.random.default_rng(0).exponential(2.0, size=101).tolist() + [50.0]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_rejects_nonsense():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_rate_of_nothing_is_zero():
    assert rate(0, 1.0) == 0.0 and rate(5, 0.0) == 0.0 and rate(10, 2.0) == 5.0


def test_summary_of_synthetic_runs():
    """Two repetitions: 8 prompt tokens in 0.1 s / 0.2 s, three decoding steps of 10 ms / 20 ms each."""
    runs = [
        {"prefill_s": 0.1, "ttft_s": 0.11, "prompt_tokens": 8, "step_s": [0.01, 0.01, 0.01]},
        {"prefill_s": 0.2, "ttft_s": 0.21, "prompt_tokens": 8, "step_s": [0.02, 0.02, 0.02]},
    ]
    summary = summarize_runs(runs)
    assert summary["ttft_ms"]["mean"] == pytest.approx(160.0)
    assert summary["ttft_ms"]["std"] == pytest.approx(math.sqrt(2 * 50.0**2))
    assert summary["prefill_tps"]["mean"] == pytest.approx((80 + 40) / 2)
    # Each repetition's rate first (100 and 50 tokens/s), then their mean: not the pooled 3+3 / 0.09.
    assert summary["decode_tps"]["mean"] == pytest.approx(75.0)
    assert summary["decode_tps"]["std"] == pytest.approx(math.sqrt(2 * 25.0**2))
    assert summary["token_ms_p50"] == pytest.approx(15.0)
    assert summary["token_ms_p95"] == pytest.approx(20.0)
    assert summary["decode_steps"] == 6


def test_no_runs_is_an_error():
    with pytest.raises(ValueError):
        summarize_runs([])
