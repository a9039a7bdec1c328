"""The methods bench: method names, the schedule files it writes, its table and verdicts, its bad input, and a
whole run of three methods on a tiny in-process teacher (real prune and distill processes, the same init, the same
held-out text for every student)."""

from __future__ import annotations

import json
import math

import pytest
from pipeline_helpers import student_shape

from edgedistill.bench import methods
from edgedistill.config import tomllib
from edgedistill.errors import EdgeDistillError


def _result(rows):
    teacher = {"heldout": {"bits_per_byte": 1.0}, "outside": {"bits_per_byte": 1.2}}
    budget = {"steps": 24, "batch_size": 4, "seq_len": 256, "tokens": 24576, "threads": 2}
    full = [
        dict(
            method=name,
            summary=methods.METHODS[name].summary,
            heldout_bpb=bpb,
            outside_bpb=bpb + 0.4,
            top1_agreement=0.3,
            kd_to_teacher=1.5,
            top1_accuracy=0.2,
            seconds=100.0,
            train_seconds=90.0,
            peak_rss_mb=900,
            extra={},
        )
        for name, bpb in rows
    ]
    return {"teacher": teacher, "student": "tiny", "budget": budget, "rows": full, "seconds": 1.0}


def test_parse_methods_keeps_order_and_refuses_unknown_names():
    assert methods.parse_methods("feature, kd") == ["feature", "kd"]
    with pytest.raises(EdgeDistillError, match="--methods: expected names from kd, feature"):
        methods.parse_methods("kd,dropout")
    with pytest.raises(EdgeDistillError, match="--methods"):
        methods.parse_methods(" , ")


def test_schedule_files_are_valid_toml_with_every_step_accounted_for():
    class Args:
        steps = 25
        data: list[str] = []

    bench = methods.MethodsBench.__new__(methods.MethodsBench)
    bench.args = Args()
    for name in ("progressive", "multi-stage"):
        phases = bench.phases(name, 7)
        parsed = tomllib.loads(methods._schedule_toml(phases))["phase"]
        assert parsed == phases
        assert sum(p["steps"] for p in parsed) == 25
        assert all(p["steps"] > 0 and p["name"] for p in parsed)
    progressive = bench.phases("progressive", 7)
    assert progressive[0]["logit_weight"] == 0.0 and "logit_weight" not in progressive[-1]
    assert progressive[0]["feature_layers"] == "0,1,2" and "feature_layers" not in progressive[1]


def test_verdicts_name_the_methods_that_beat_kd_and_those_that_did_not():
    result = _result([("kd", 1.60), ("feature", 1.55), ("attention", 1.60), ("sequence", 1.70)])
    assert methods.verdicts(result) == [
        "- Beat logit KD on held-out bits per byte at this budget: feature.",
        "- Did not: attention, sequence.",
    ]
    table = methods.markdown(result)
    assert "| feature: + feature distillation" in table and "-0.050" in table
    assert methods.verdicts(_result([("feature", 1.5)])) == []  # no baseline, no verdict


def test_write_produces_json_csv_markdown(tmp_path):
    methods.write(_result([("kd", 1.6), ("feature", 1.5)]), tmp_path)
    assert (tmp_path / "methods.json").is_file() and (tmp_path / "methods.md").is_file()
    lines = (tmp_path / "methods.csv").read_text().splitlines()
    assert lines[0].startswith("method,summary,heldout_bpb") and len(lines) == 3


def test_bad_arguments_exit_2_with_one_line(capsys):
    assert methods.main(["--methods", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgedistill: error: --methods")
    assert methods.main(["--steps", "2"]) == 2


def test_three_methods_on_a_tiny_teacher(tmp_path, tiny_teacher, text_data):
    out = tmp_path / "methods"
    argv = [
        "--teacher", str(tiny_teacher), "--student", student_shape(tmp_path / "s.json", 32, 2),
        "--data", str(text_data), "--seq-len", "32", "--steps", "3", "--batch-size", "2",
        "--methods", "kd,feature,progressive", "--out", str(out), "--threads", "1",
    ]  # fmt: skip
    assert methods.main(argv) == 0
    result = json.loads((out / "methods.json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["kd", "feature", "progressive"]
    for row in rows.values():
        assert math.isfinite(row["heldout_bpb"]) and math.isfinite(row["outside_bpb"]) and row["heldout_bpb"] > 0
        assert 0 <= row["top1_agreement"] <= 1 and row["peak_rss_mb"] > 0 and row["seconds"] > 0
    summaries = {name: json.loads((out / "runs" / name / "train_summary.json").read_text()) for name in rows}
    assert {s["student"]["spec"] for s in summaries.values()} == {str(out / "derived")}  # one init for all
    assert summaries["feature"]["train"]["terms"]["feature"]["loss"] == "cosine"
    assert [p["name"] for p in summaries["progressive"]["train"]["schedule"]["phases"]] == [
        "lower-features", "all-features", "logits",
    ]  # fmt: skip
    assert "Beat logit KD" in (out / "methods.md").read_text()
    assert (out / "methods.csv").read_text().count("\n") == 4
    # a second run reuses every finished run and reports the same numbers
    assert methods.main(argv) == 0
    again = json.loads((out / "methods.json").read_text())
    assert [r["heldout_bpb"] for r in again["rows"]] == [r["heldout_bpb"] for r in result["rows"]]
    assert [r["train_seconds"] for r in again["rows"]] == [r["train_seconds"] for r in result["rows"]]
