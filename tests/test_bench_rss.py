"""The RSS sampler sees a known allocation, at 100 Hz or more."""

from __future__ import annotations

import time

import numpy as np

from edgedistill.bench.rss import MIN_RATE_HZ, RssSampler, current_rss, kernel_peak_rss

SIZE = 160 << 20  # bytes


def test_sampler_sees_a_known_allocation_and_its_release():
    with RssSampler() as sampler:
        time.sleep(0.05)
        block = np.ones(SIZE // 8)  # ones: every page is written, so it is resident
        time.sleep(0.05)
        del block
        time.sleep(0.1)
    grown = sampler.peak - sampler.baseline
    assert SIZE * 0.95 <= grown <= SIZE * 1.3, grown
    assert current_rss() < sampler.peak - SIZE * 0.8  # freed again, yet the peak was kept
    assert sampler.rate_hz >= MIN_RATE_HZ, sampler.rate_hz
    assert sampler.samples >= 0.2 * MIN_RATE_HZ
    peak = kernel_peak_rss()
    assert peak is None or peak >= sampler.peak * 0.99


def test_sampler_keeps_its_rate_while_the_main_thread_computes():
    """numpy releases the GIL in large operations, as llama.cpp and onnxruntime do in theirs."""
    data = np.random.default_rng(0).standard_normal((600, 600))
    with RssSampler() as sampler:
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:
            data = data @ data.T / 600
    assert sampler.rate_hz >= MIN_RATE_HZ, sampler.rate_hz


def test_report_fields_are_in_megabytes():
    sampler = RssSampler().start().stop()
    fields = sampler.to_dict()
    assert fields["peak_rss_mb"] == sampler.peak / 1e6
    assert fields["rss_before_mb"] == sampler.baseline / 1e6
