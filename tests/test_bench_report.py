"""Reports are written and parse back: bench.json (schema, no NaN), bench.csv, bench.md, PNG plots, stdout table."""

from __future__ import annotations

import csv
import json
import math

import pytest
from bench_helpers import make_result, make_row

from edgedistill.bench.claims import check_claims
from edgedistill.bench.report import CSV_COLUMNS, PLOTS, markdown_tables, read_json, text_table, write_reports
from edgedistill.bench.targets import load_target, project_decode_tps
from edgedistill.errors import EdgeDistillError


def _result() -> dict:
    pi5 = load_target("rpi5")
    rows = []
    for label, params, decode, role in (("teacher", 100_000_000, 100.0, "teacher"), ("tiny", 12_500_000, 700.0, "x")):
        projection = project_decode_tps(decode, float(params), 20.0, pi5.bandwidth(2))
        projection.update(target="rpi5", threads=2, target_bandwidth_gbs=13.2, fits_in_target_cache=False)
        teacher = role == "teacher"
        quality = {
            "perplexity": 10.0 if teacher else 14.0,
            "bits_per_byte": 1.0 if teacher else 1.25,
            "top1_accuracy": 0.4 if teacher else 0.3,
            "tokens": 500,
            "agreement": None,
            "retention": None if teacher else 0.8,
            "accuracy_ratio": None if teacher else 0.75,
        }
        if not teacher:
            quality["agreement_note"] = "not measured: the teacher tokenizes the held-out text differently"
        rows.append(make_row(label, params, decode, role=role, projection=projection, quality=quality))
    rows[1]["bound_share"] = math.nan  # a figure that could not be computed must not break JSON
    result = make_result(rows, target=pi5.to_dict())
    result["claims"] = check_claims(result)
    return result


def test_reports_are_written_and_parse_back(tmp_path):
    result = _result()
    written = write_reports(result, tmp_path)
    data = read_json(tmp_path / "bench.json")
    assert data["schema_version"] == 1 and len(data["rows"]) == 2
    assert data["rows"][1]["bound_share"] is None  # NaN became null
    assert data["rows"][0]["decode_tps"]["mean"] == 100.0
    assert data["rows"][0]["projection"]["label"] == "projection"
    json.loads((tmp_path / "bench.json").read_text(), parse_constant=pytest.fail)  # no NaN/Infinity literals

    with open(tmp_path / "bench.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == [name for name, _ in CSV_COLUMNS]
    assert [r["label"] for r in table] == ["teacher", "tiny"]
    assert float(table[1]["decode_tps_mean"]) == pytest.approx(700.0)
    assert float(table[1]["projection_decode_tps"]) == pytest.approx(rows_projection(result, 1))
    assert table[1]["bound_share"] == ""
    assert float(table[1]["bits_per_byte"]) == 1.25 and float(table[1]["retention"]) == pytest.approx(0.8)
    assert float(table[0]["top1_accuracy"]) == 0.4 and float(table[1]["top1_accuracy"]) == 0.3
    assert float(table[1]["accuracy_ratio"]) == pytest.approx(0.75) and table[0]["accuracy_ratio"] == ""
    assert data["rows"][1]["quality"]["top1_accuracy"] == 0.3 and data["rows"][1]["quality"]["accuracy_ratio"] == 0.75

    markdown = (tmp_path / "bench.md").read_text(encoding="utf-8")
    assert markdown_tables(result) in markdown
    assert "(projection)" in markdown and "projection, not a measurement" in markdown
    assert "**confirmed**" in markdown and "**refuted**" in markdown
    # the definitions are in the report: retention from bits per byte, top-1 accuracy against the text
    assert "teacher bits per byte / student bits per byte" in markdown
    assert "teacher perplexity / student perplexity" not in markdown
    assert "**top1_accuracy**" in markdown and "**accuracy_ratio**" in markdown
    # the quality table: perplexity beside bits per byte, accuracy beside agreement, retention and accuracy ratio
    quality = markdown.split("### Quality", 1)[1].split("###", 1)[0]
    assert "| perplexity | bits per byte | top-1 accuracy | top-1 agreement with teacher |" in quality
    assert "| retention (teacher bits/byte / student bits/byte) | accuracy ratio (student / teacher top-1) |" in quality
    assert "| teacher | 10.00 | 1.000 | 40.0 % | (teacher) | (teacher) | (teacher) | 500 |" in quality
    assert "| tiny | 14.00 | 1.250 | 30.0 % | — | 80.0 % | 75.0 % | 500 |" in quality
    assert "- tiny: agreement not measured: the teacher tokenizes the held-out text differently" in quality
    for name in PLOTS:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in markdown
        assert written[name] == tmp_path / name
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_the_quality_table_says_why_a_figure_is_not_measured():
    result = _result()
    quality = result["rows"][1]["quality"]
    quality.update(bits_per_byte=None, retention=None, accuracy_ratio=None)
    quality["retention_note"] = "not measured: no bits per byte for the student (a backend that gives no token bytes)"
    quality["accuracy_ratio_note"] = "not measured: the teacher's top-1 accuracy is 0"
    section = markdown_tables(result).split("### Quality", 1)[1].split("###", 1)[0]
    assert "| tiny | 14.00 | — | 30.0 % | — | — | — | 500 |" in section
    assert "- tiny: retention not measured: no bits per byte for the student (" in section
    assert "- tiny: accuracy ratio not measured: the teacher's top-1 accuracy is 0" in section


def rows_projection(result: dict, index: int) -> float:
    return result["rows"][index]["projection"]["decode_tps"]


def test_every_projected_number_is_labelled_in_the_stdout_table():
    text = text_table(_result())
    section = text.split("PROJECTION", 1)[1]
    projected_lines = [line for line in section.splitlines() if line.startswith(("teacher", "tiny"))]
    assert projected_lines and all("(projection)" in line for line in projected_lines)
    assert "REFUTED" in text or "CONFIRMED" in text


def test_a_foreign_json_is_refused(tmp_path):
    path = tmp_path / "other.json"
    path.write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(EdgeDistillError, match="not a edgedistill.bench"):
        read_json(path)
