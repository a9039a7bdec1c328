"""The claim checker on hand-made results: confirmed, refuted and not measured, each said plainly."""

from __future__ import annotations

import pytest
from bench_helpers import make_result, make_row

from edgedistill.bench.claims import CONFIRMED, DEFINITIONS, NOT_MEASURED, REFUTED, check_claims

TEACHER = 100_000_000


def _quality(ppl: float, bpb: float | None, retention: float | None, **extra) -> dict:
    quality = {"perplexity": ppl, "tokens": 1000, "agreement": 0.5, "retention": retention}
    if bpb is not None:
        quality["bits_per_byte"] = bpb
    return {**quality, **extra}


def _by(claims: list[dict], name: str, model: str | None = None) -> dict:
    found = [c for c in claims if c["claim"] == name and (model is None or c.get("model") == model)]
    assert len(found) == 1, (name, model, claims)
    return found[0]


def test_claims_confirmed_and_refuted():
    rows = [
        make_row(
            "teacher",
            TEACHER,
            100.0,
            peak_mb=420.0,
            before_mb=40.0,
            role="teacher",
            quality=_quality(10.0, 1.013, None),
        ),
        # 1/4: 3.2x faster (>= 3.5 x 0.85 = 2.975: confirmed), 110 MB (<= 115: confirmed)
        make_row("small", TEACHER // 4, 320.0, peak_mb=150.0, before_mb=40.0),
        # 1/8: 4.0x faster (< 6 x 0.85 = 5.1: refuted), 70 MB (> 57.5: refuted), retention 0.81 (>= 0.80: confirmed)
        # (retention = teacher bits per byte / student bits per byte = 1.013 / 1.251)
        make_row(
            "tiny", TEACHER // 8, 400.0, peak_mb=110.0, before_mb=40.0, quality=_quality(12.35, 1.251, 1.013 / 1.251)
        ),
        # 1/16: retention 0.5 (< 0.65: refuted)
        make_row("nano", TEACHER // 16, 800.0, quality=_quality(20.0, 2.026, 0.5)),
    ]
    claims = check_claims(make_result(rows))
    speed4 = _by(claims, "speed-up 1/4")
    assert speed4["verdict"] == CONFIRMED and speed4["measured"] == pytest.approx(3.2) and speed4["model"] == "small"
    speed8 = _by(claims, "speed-up 1/8")
    assert speed8["verdict"] == REFUTED and speed8["measured"] == pytest.approx(4.0)
    assert _by(claims, "memory 1/1")["measured"] == pytest.approx(380.0)
    assert _by(claims, "memory 1/1")["verdict"] == CONFIRMED
    assert _by(claims, "memory 1/4")["verdict"] == CONFIRMED
    memory8 = _by(claims, "memory 1/8")
    assert memory8["verdict"] == REFUTED and memory8["measured"] == pytest.approx(70.0)
    retention8 = _by(claims, "retention 1/8")
    assert retention8["verdict"] == CONFIRMED and retention8["measured"] == pytest.approx(0.8097, abs=1e-4)
    # the evidence is in bits per byte, the tokenizer-independent figure retention is computed from
    assert retention8["note"] == "tiny: teacher 1.013 bits/byte / student 1.251 bits/byte over 1000 held-out tokens"
    assert _by(claims, "retention 1/16")["verdict"] == REFUTED
    for claim in claims:
        assert set(claim) >= {"claim", "seed", "measured", "verdict", "note"}
        assert claim["verdict"] in (CONFIRMED, REFUTED, NOT_MEASURED)


def test_without_matching_models_or_data_claims_are_not_measured():
    rows = [make_row("teacher", TEACHER, 100.0, role="teacher"), make_row("tiny", TEACHER // 8, 700.0)]
    claims = check_claims(make_result(rows))
    assert _by(claims, "speed-up 1/4")["verdict"] == NOT_MEASURED
    assert _by(claims, "speed-up 1/8")["verdict"] == CONFIRMED
    assert _by(claims, "memory 1/4")["verdict"] == NOT_MEASURED
    retention = _by(claims, "retention 1/8")
    assert retention["verdict"] == NOT_MEASURED and "--data" in retention["note"]
    assert _by(claims, "retention 1/16")["verdict"] == NOT_MEASURED


def test_the_largest_model_is_the_reference_without_a_teacher():
    rows = [make_row("big", TEACHER, 100.0), make_row("tiny", TEACHER // 8, 650.0)]
    claim = _by(check_claims(make_result(rows)), "speed-up 1/8")
    assert claim["verdict"] == CONFIRMED and "largest model" in claim["note"]


def test_speed_up_compares_equal_threads_and_prefers_the_same_format():
    rows = [
        make_row("teacher", TEACHER, 100.0, threads=1, role="teacher"),
        make_row("teacher", TEACHER, 180.0, threads=2, role="teacher"),
        make_row("tiny", TEACHER // 8, 700.0, threads=1),
        make_row("tiny", TEACHER // 8, 900.0, threads=2),
        make_row("tiny-onnx", TEACHER // 8, 2000.0, threads=2, backend="onnxruntime", quantization="fp32"),
    ]
    claims = check_claims(make_result(rows))
    assert _by(claims, "speed-up 1/8", "tiny")["measured"] == pytest.approx(5.0)  # 900 / 180 at 2 threads
    onnx = _by(claims, "speed-up 1/8", "tiny-onnx")
    assert onnx["measured"] == pytest.approx(2000 / 180) and "onnxruntime fp32 vs teacher llama.cpp" in onnx["note"]


def test_an_unstable_pair_is_avoided_when_a_stable_one_exists():
    rows = [
        make_row("teacher", TEACHER, 100.0, threads=1, role="teacher"),
        make_row("teacher", TEACHER, 30.0, threads=2, role="teacher", unstable=True),
        make_row("tiny", TEACHER // 8, 700.0, threads=1),
        make_row("tiny", TEACHER // 8, 900.0, threads=2),
    ]
    assert _by(check_claims(make_result(rows)), "speed-up 1/8")["measured"] == pytest.approx(7.0)


def test_retention_of_a_student_with_another_tokenizer_is_checked_on_bits_per_byte():
    teacher = _quality(10.0, 1.0, None, agreement=None)
    # another tokenizer: no agreement, a perplexity on other tokens, but bits per byte compares
    other = _quality(40.0, 1.25, 0.8, agreement=None, agreement_note="not measured: the teacher tokenizes differently")
    rows = [
        make_row("teacher", TEACHER, 100.0, role="teacher", quality=teacher),
        make_row("tiny", TEACHER // 8, 700.0, quality=other),
    ]
    claim = _by(check_claims(make_result(rows)), "retention 1/8")
    assert claim["verdict"] == CONFIRMED and claim["measured"] == pytest.approx(0.8)
    assert "1.000 bits/byte" in claim["note"] and "1.250 bits/byte" in claim["note"]


def test_retention_without_bits_per_byte_says_why():
    note = "not measured: no bits per byte for the student (a backend that gives no token bytes)"
    rows = [
        make_row("teacher", TEACHER, 100.0, role="teacher", quality=_quality(10.0, 1.0, None)),
        make_row("tiny", TEACHER // 8, 700.0, quality=_quality(12.0, None, None, retention_note=note)),
    ]
    claim = _by(check_claims(make_result(rows)), "retention 1/8")
    assert claim["verdict"] == NOT_MEASURED and claim["measured"] is None and claim["note"] == note
    assert "teacher bits per byte / student bits per byte" in DEFINITIONS["retention"]
