"""Target profiles carry sourced numbers; the projection follows its formula."""

from __future__ import annotations

import math

import pytest

from edgedistill.bench.targets import PROJECTION_LABEL, TARGET_NAMES, load_target, project_decode_tps
from edgedistill.errors import EdgeDistillError


def test_projection_formula():
    """Host: 100 tok/s with 100 MB per token against 20 GB/s (bound 200 tok/s): efficiency 0.5.
    Target at 10 GB/s: bound 100 tok/s, projection 0.5 x 100 = 50 tok/s."""
    projected = project_decode_tps(100.0, 100e6, 20.0, 10.0)
    assert projected["efficiency"] == pytest.approx(0.5)
    assert projected["bound_tps"] == pytest.approx(100.0)
    assert projected["decode_tps"] == pytest.approx(50.0)
    assert projected["capped"] is False
    assert projected["label"] == PROJECTION_LABEL == "projection"


def test_projection_caps_a_cache_inflated_host_at_its_bound():
    projected = project_decode_tps(500.0, 100e6, 20.0, 10.0)  # 2.5x above the host's DRAM bound
    assert projected["efficiency"] == pytest.approx(2.5)
    assert projected["capped"] is True
    assert projected["decode_tps"] == pytest.approx(100.0)  # the target's bound, not 250


def test_projection_without_numbers_is_nan():
    assert math.isnan(project_decode_tps(0.0, 100e6, 20.0, 10.0)["decode_tps"])
    assert math.isnan(project_decode_tps(10.0, 0, 20.0, 10.0)["decode_tps"])


@pytest.mark.parametrize("name", TARGET_NAMES)
def test_every_profile_loads_and_sources_its_numbers(name):
    target = load_target(name)
    assert target.name == name
    if name == "host":
        assert target.measured
        return
    assert target.cores >= 4 and target.bandwidth_gbs and target.isa
    for key in ("cores", "bandwidth_gbs", "isa", "memory"):
        assert target.sources.get(key), f"{name}: no source for {key}"


def test_pi5_bandwidth_by_threads_is_the_measured_stream_read():
    pi5 = load_target("rpi5")
    assert [pi5.bandwidth(t) for t in (1, 2, 3, 4, 8)] == [9.3, 13.2, 13.2, 11.6, 11.6]
    assert pi5.cache_bytes == 2 << 20
    assert pi5.matches("Raspberry Pi 5 Model B Rev 1.0", "")
    assert not pi5.matches("", "AMD EPYC")


def test_a_profile_file_without_sources_is_refused(tmp_path):
    path = tmp_path / "board.toml"
    path.write_text('name = "board"\ncores = 4\n[bandwidth_gbs]\n1 = 5.0\n', encoding="utf-8")
    with pytest.raises(EdgeDistillError, match="sources"):
        load_target(path)
    path.write_text(path.read_text() + '[sources]\ncores = "datasheet"\nbandwidth_gbs = "STREAM"\n', encoding="utf-8")
    assert load_target(path).bandwidth(2) == 5.0


def test_unknown_target_and_keys_are_refused(tmp_path):
    with pytest.raises(EdgeDistillError, match="rpi5"):
        load_target("pi9")
    path = tmp_path / "bad.toml"
    path.write_text('name = "bad"\ncores = 4\nspeed = 3\n', encoding="utf-8")
    with pytest.raises(EdgeDistillError, match="unknown keys speed"):
        load_target(path)
