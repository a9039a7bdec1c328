"""The seed's claims (MiniMind's tables) checked against a bench result, and how measured numbers are written.

Each claim is mapped to our models by parameter ratio to the teacher, as the seed's models relate to its 104 M
teacher: "4x fewer" means a ratio in [2.83, 5.66), "8x fewer" [5.66, 11.3), "16x fewer" [11.3, 22.6) (a factor of
sqrt(2) either side). These buckets are the one definition of the seed's size classes: the bench's claims and the
pipeline's report.md both use :func:`size_class`. Verdicts:

* speed-up (seed: 3.5x at 1/4, 6x at 1/8): measured = student decode tokens/s / teacher decode tokens/s at the same
  thread count (same backend and quantization when such a pair exists; the highest thread count measured for
  both). **confirmed** when measured >= claimed x (1 - SPEED_TOLERANCE), else **refuted**.
* memory (seed: ~400 MB teacher, ~100 MB 1/4, ~50 MB 1/8): measured = peak RSS minus the RSS before loading (the
  model's own memory: weights touched, KV cache, buffers), at the highest thread count. The seed's "~X MB" is read
  as "runs in about X MB": **confirmed** when measured <= claimed x (1 + MEMORY_TOLERANCE), else **refuted**.
* retention (seed: 85 % at 1/8, 70 % at 1/16): measured = teacher bits per byte / student bits per byte on the
  held-out data (tokenizer-independent, so a student that tokenizes differently is measured too). The seed's
  percentages were relative to its 1/4 model; ours are relative to the teacher, which is stricter. **confirmed** when
  measured >= claimed - RETENTION_TOLERANCE (absolute), else **refuted**.

A claim with no model in its size bucket, no teacher, or no quality data is **not measured**.

The number formatters at the end (:func:`number`, :func:`percent`, :data:`MISSING`) are the one style of bench.md,
the stdout table and report.md: ``10.4 %``, ``1,234.5``, and ``—`` for a value that was not measured. They live here,
at the bottom of the bench's imports, so that the claims' own sentences use them too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SPEED_TOLERANCE = 0.15
MEMORY_TOLERANCE = 0.15
RETENTION_TOLERANCE = 0.05
CONFIRMED = "confirmed"
REFUTED = "refuted"
NOT_MEASURED = "not measured"
# Size buckets: nominal ratio -> [low, high) of teacher parameters / student parameters.
BUCKETS = {1: (0.0, 1.41), 4: (2.83, 5.66), 8: (5.66, 11.3), 16: (11.3, 22.6)}
# The seed's tables (MiniMind README): ratio -> claimed value.
SEED_SPEEDUP = {4: 3.5, 8: 6.0}
SEED_MEMORY_MB = {1: 400.0, 4: 100.0, 8: 50.0}
SEED_HARDWARE = {1: "GPU / high-end CPU", 4: "ordinary CPU", 8: "mobile devices"}  # beside SEED_MEMORY_MB
SEED_RETENTION = {8: 0.85, 16: 0.70}  # its 1/4 model is the baseline (100 %) of these
DEFINITIONS = {
    "size": "students are matched to the seed's sizes by teacher/student parameter ratio: 4x = [2.83, 5.66), "
    "8x = [5.66, 11.3), 16x = [11.3, 22.6); the teacher is --teacher, else the largest model",
    "speed-up": f"student / teacher decode tokens/s, equal threads; confirmed if >= claim x {1 - SPEED_TOLERANCE:.2f}",
    "memory": f"peak RSS - RSS before loading (MB = 1e6 bytes); confirmed if <= claim x {1 + MEMORY_TOLERANCE:.2f}",
    "retention": f"teacher bits per byte / student bits per byte (tokenizer-independent); confirmed if >= claim - "
    f"{RETENTION_TOLERANCE:.2f} (the seed measured against its 1/4 model, we against the teacher)",
}


def size_bucket(ratio: float) -> int | None:
    """The seed's size class (1, 4, 8 or 16) of a teacher/model parameter ratio, or None between the buckets."""
    for nominal, (low, high) in BUCKETS.items():
        if low <= ratio < high:
            return nominal
    return None


def size_class(teacher_params: int | None, params: int | None) -> int | None:
    """:func:`size_bucket` of ``teacher_params / params``; None when either count is unknown."""
    if not params or not teacher_params:
        return None
    return size_bucket(teacher_params / params)


def _teacher_label(rows: list[dict[str, Any]]) -> tuple[str | None, str]:
    labels = {r["label"] for r in rows if r.get("role") == "teacher"}
    if labels:
        return sorted(labels)[0], "the --teacher model"
    if not rows:
        return None, ""
    largest = max(rows, key=lambda r: r.get("parameters") or 0)
    return largest["label"], "no --teacher given: the largest model benchmarked"


def _claim(name: str, seed: str, measured: Any, verdict: str, note: str, **extra: Any) -> dict[str, Any]:
    return {"claim": name, "seed": seed, "measured": measured, "verdict": verdict, "note": note, **extra}


def _pair(student_rows: list[dict[str, Any]], teacher_rows: list[dict[str, Any]]) -> tuple[Any, Any, str]:
    """The student and teacher rows to compare: same threads, preferring same backend and quantization."""
    best = None
    for s in student_rows:
        for t in teacher_rows:
            if s["threads"] != t["threads"]:
                continue
            same = s["backend"] == t["backend"] and s["quantization"] == t["quantization"]
            stable = not s.get("unstable") and not t.get("unstable")
            key = (same, stable, s["threads"])
            if best is None or key > best[0]:
                best = (key, s, t)
    if best is None:
        return None, None, ""
    (same, stable, threads), s, t = best
    how = (
        ("" if stable else "UNSTABLE rows (repetitions disagree), ")
        + f"{threads} threads, "
        + (
            f"both {s['backend']} {s['quantization']}"
            if same
            else f"student {s['backend']} {s['quantization']} vs teacher {t['backend']} {t['quantization']}"
        )
    )
    return s, t, how


@dataclass
class _Matched:
    """A bench result's rows matched to the seed's sizes: the teacher, its rows, and each bucket's models."""

    rows: list[dict[str, Any]]
    teacher: str | None
    why: str  # how the teacher was chosen
    teacher_rows: list[dict[str, Any]]
    buckets: dict[int, list[str]] = field(default_factory=dict)  # nominal ratio -> model labels
    ratios: dict[str, float] = field(default_factory=dict)  # model label -> teacher/model parameter ratio

    def rows_of(self, label: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["label"] == label]


def _match(result: dict[str, Any]) -> _Matched:
    rows = [r for r in result.get("rows", []) if r.get("parameters")]
    teacher, why = _teacher_label(rows)
    teacher_rows = [r for r in rows if r["label"] == teacher]
    teacher_params = teacher_rows[0]["parameters"] if teacher_rows else 0
    # The teacher exported to other formats too (same parameter count): speed-ups then compare like with like.
    teacher_rows += [r for r in rows if r["label"] != teacher and teacher_params and r["parameters"] == teacher_params]
    matched = _Matched(rows, teacher, why, teacher_rows)
    for row in rows:
        if row["label"] == teacher or not teacher_params:
            continue
        ratio = teacher_params / row["parameters"]
        nominal = size_bucket(ratio)
        matched.ratios[row["label"]] = ratio
        if nominal is not None and row["label"] not in matched.buckets.get(nominal, []):
            matched.buckets.setdefault(nominal, []).append(row["label"])
    return matched


def _speed_claims(matched: _Matched) -> list[dict[str, Any]]:
    out = []
    for nominal, claimed in SEED_SPEEDUP.items():
        name = f"speed-up 1/{nominal}"
        seed = f"a student with {nominal}x fewer parameters decodes {claimed:g}x faster than its teacher"
        labels = matched.buckets.get(nominal, [])
        if not matched.teacher_rows or not labels:
            why = "no teacher" if not matched.teacher_rows else f"no student with {nominal}x fewer parameters"
            out.append(_claim(name, seed, None, NOT_MEASURED, why))
            continue
        for label in labels:
            s, t, how = _pair(matched.rows_of(label), matched.teacher_rows)
            if s is None:
                why = f"{label} and the teacher share no thread count"
                out.append(_claim(name, seed, None, NOT_MEASURED, why, model=label))
                continue
            measured = s["decode_tps"]["mean"] / t["decode_tps"]["mean"] if t["decode_tps"]["mean"] > 0 else math.nan
            verdict = CONFIRMED if measured >= claimed * (1 - SPEED_TOLERANCE) else REFUTED
            reference = matched.why if t["label"] == matched.teacher else "the teacher, same format"
            note = f"{label} vs {t['label']} ({reference}); {how}; host decode tokens/s"
            out.append(_claim(name, seed, measured, verdict, note, model=label, ratio=matched.ratios[label]))
    return out


def _memory_claims(matched: _Matched) -> list[dict[str, Any]]:
    out = []
    for nominal, claimed in SEED_MEMORY_MB.items():
        name = f"memory 1/{nominal}"
        seed = f"{'the teacher' if nominal == 1 else f'a 1/{nominal} student'} needs about {claimed:g} MB"
        labels = [matched.teacher] if nominal == 1 and matched.teacher_rows else matched.buckets.get(nominal, [])
        if not labels:
            out.append(_claim(name, seed, None, NOT_MEASURED, f"no model of that size ({matched.why})"))
            continue
        for label in labels:
            row = max(matched.rows_of(label), key=lambda r: r["threads"])
            measured = row["peak_rss_mb"] - row["rss_before_mb"]
            verdict = CONFIRMED if measured <= claimed * (1 + MEMORY_TOLERANCE) else REFUTED
            note = (
                f"{label} {row['backend']} {row['quantization']}, {row['threads']} threads: peak RSS "
                f"{row['peak_rss_mb']:.0f} MB - {row['rss_before_mb']:.0f} MB before loading"
            )
            out.append(_claim(name, seed, measured, verdict, note, model=label, ratio=matched.ratios.get(label, 1.0)))
    return out


def _retention_claims(matched: _Matched) -> list[dict[str, Any]]:
    out = []
    for nominal, claimed in SEED_RETENTION.items():
        name = f"retention 1/{nominal}"
        seed = f"a 1/{nominal} student keeps {percent(claimed, 0)} of the quality"
        labels = matched.buckets.get(nominal, [])
        if not labels:
            out.append(_claim(name, seed, None, NOT_MEASURED, f"no student with {nominal}x fewer parameters"))
            continue
        for label in labels:
            quality = next((r["quality"] for r in matched.rows_of(label) if r.get("quality")), None)
            value = quality.get("retention") if quality else None
            if value is None or (isinstance(value, float) and math.isnan(value)):
                out.append(_claim(name, seed, None, NOT_MEASURED, _no_retention_reason(quality), model=label))
                continue
            verdict = CONFIRMED if value >= claimed - RETENTION_TOLERANCE else REFUTED
            teacher_bpb = _teacher_quality(matched.rows, matched.teacher).get("bits_per_byte")
            note = (
                f"{label}: teacher {number(teacher_bpb, 3)} bits/byte / student "
                f"{number(quality.get('bits_per_byte'), 3)} bits/byte over {quality['tokens']} held-out tokens"
            )
            out.append(_claim(name, seed, value, verdict, note, model=label, ratio=matched.ratios[label]))
    return out


def _no_retention_reason(quality: dict[str, Any] | None) -> str:
    if quality is None:
        return "no --data (held-out text) given"
    return quality.get("retention_note") or "no teacher bits per byte (--teacher and --data are both needed)"


# The claim families, in the order they are reported.
_ClaimCheck = Callable[[_Matched], list[dict[str, Any]]]
CLAIM_CHECKS: tuple[_ClaimCheck, ...] = (_speed_claims, _memory_claims, _retention_claims)


def check_claims(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the seed's speed-up, memory and retention claims against a bench result.

    Args:
        result: the dict :func:`~edgedistill.bench.harness.run_bench` returns (only ``rows`` is read).

    Returns:
        One dict per claim and matching model: ``claim``, ``seed`` (the claim as the seed states it), ``measured``
        (a number, or None), ``verdict`` (confirmed / refuted / not measured), ``note`` (how it was measured), and
        ``model``/``ratio`` where a model was matched.
    """
    matched = _match(result)
    return [claim for check in CLAIM_CHECKS for claim in check(matched)]


def _teacher_quality(rows: list[dict[str, Any]], teacher: str | None) -> dict[str, Any]:
    """The teacher's quality figures (``{}`` when it has none)."""
    for row in rows:
        if row["label"] == teacher and row.get("quality"):
            return row["quality"]
    return {}


# --------------------------------------------------------------------------------------- how numbers are written
MISSING = "—"  # a value that was not measured or could not be computed


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def number(value: Any, digits: int = 1, suffix: str = "") -> str:
    """``1,234.5`` (thousands separated, ``digits`` decimals, then ``suffix``), or :data:`MISSING`."""
    if _absent(value):
        return MISSING
    return f"{value:,.{digits}f}{suffix}"


def percent(value: Any, digits: int = 1) -> str:
    """A fraction as ``10.4 %`` (one more decimal below 1 % so that it does not read as 0), or :data:`MISSING`."""
    if _absent(value):
        return MISSING
    if digits and value and abs(value) < 0.01:
        digits += 1
    return f"{100 * value:.{digits}f} %"


def claim_value(claim: dict[str, Any]) -> str:
    """A claim's measured value with its unit (``1.10x``, ``12 MB``, ``85.0 %``), or :data:`MISSING`."""
    value = claim.get("measured")
    if _absent(value):
        return MISSING
    if claim["claim"].startswith("speed-up"):
        return number(value, 2, "x")
    if claim["claim"].startswith("memory"):
        return number(value, 0, " MB")
    return percent(value)
