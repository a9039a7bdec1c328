"""The seed's claims (MiniMind's tables) checked against a bench result.

Each claim is mapped to our models by parameter ratio to the teacher, as the seed's models relate to its 104 M
teacher: "4x fewer" means a ratio in [2.83, 5.66), "8x fewer" [5.66, 11.3), "16x fewer" [11.3, 22.6) (a factor of
sqrt(2) either side). Verdicts:

* speed-up (seed: 3.5x at 1/4, 6x at 1/8): measured = student decode tokens/s / teacher decode tokens/s at the same
  thread count (same backend and quantization when such a pair exists; the highest thread count measured for
  both). **confirmed** when measured >= claimed x (1 - SPEED_TOLERANCE), else **refuted**.
* memory (seed: ~400 MB teacher, ~100 MB 1/4, ~50 MB 1/8): measured = peak RSS minus the RSS before loading (the
  model's own memory: weights touched, KV cache, buffers), at the highest thread count. The seed's "~X MB" is read
  as "runs in about X MB": **confirmed** when measured <= claimed x (1 + MEMORY_TOLERANCE), else **refuted**.
* retention (seed: 85 % at 1/8, 70 % at 1/16): measured = teacher perplexity / student perplexity on the held-out
  data. The seed's percentages were relative to its 1/4 model; ours are relative to the teacher, which is stricter.
  **confirmed** when measured >= claimed - RETENTION_TOLERANCE (absolute), else **refuted**.

A claim with no model in its size bucket, no teacher, or no quality data is **not measured**.
"""

from __future__ import annotations

import math
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
SEED_RETENTION = {8: 0.85, 16: 0.70}
DEFINITIONS = {
    "size": "students are matched to the seed's sizes by teacher/student parameter ratio: 4x = [2.83, 5.66), "
    "8x = [5.66, 11.3), 16x = [11.3, 22.6); the teacher is --teacher, else the largest model",
    "speed-up": f"student / teacher decode tokens/s, equal threads; confirmed if >= claim x {1 - SPEED_TOLERANCE:.2f}",
    "memory": f"peak RSS - RSS before loading (MB = 1e6 bytes); confirmed if <= claim x {1 + MEMORY_TOLERANCE:.2f}",
    "retention": f"teacher perplexity / student perplexity; confirmed if >= claim - {RETENTION_TOLERANCE:.2f} "
    "(the seed measured against its 1/4 model, we against the teacher)",
}


def _bucket(ratio: float) -> int | None:
    for nominal, (low, high) in BUCKETS.items():
        if low <= ratio < high:
            return nominal
    return None


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


def check_claims(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Check the seed's speed-up, memory and retention claims against a bench result.

    Args:
        result: the dict :func:`~edgedistill.bench.harness.run_bench` returns (only ``rows`` is read).

    Returns:
        One dict per claim and matching model: ``claim``, ``seed`` (the claim as the seed states it), ``measured``
        (a number, or None), ``verdict`` (confirmed / refuted / not measured), ``note`` (how it was measured), and
        ``model``/``ratio`` where a model was matched.
    """
    rows = [r for r in result.get("rows", []) if r.get("parameters")]
    teacher, why = _teacher_label(rows)
    out: list[dict[str, Any]] = []
    teacher_rows = [r for r in rows if r["label"] == teacher]
    teacher_params = teacher_rows[0]["parameters"] if teacher_rows else 0
    # The teacher exported to other formats too (same parameter count): speed-ups then compare like with like.
    teacher_rows += [r for r in rows if r["label"] != teacher and teacher_params and r["parameters"] == teacher_params]
    buckets: dict[int, list[str]] = {}
    ratios: dict[str, float] = {}
    for row in rows:
        if row["label"] == teacher or not teacher_params:
            continue
        ratio = teacher_params / row["parameters"]
        nominal = _bucket(ratio)
        ratios[row["label"]] = ratio
        if nominal is not None and row["label"] not in buckets.get(nominal, []):
            buckets.setdefault(nominal, []).append(row["label"])

    def rows_of(label: str) -> list[dict[str, Any]]:
        return [r for r in rows if r["label"] == label]

    # Speed-up.
    for nominal, claimed in SEED_SPEEDUP.items():
        seed = f"a student with {nominal}x fewer parameters decodes {claimed:g}x faster than its teacher"
        labels = buckets.get(nominal, [])
        if not teacher_rows or not labels:
            out.append(
                _claim(
                    f"speed-up 1/{nominal}",
                    seed,
                    None,
                    NOT_MEASURED,
                    "no teacher" if not teacher_rows else f"no student with {nominal}x fewer parameters",
                )
            )
            continue
        for label in labels:
            s, t, how = _pair(rows_of(label), teacher_rows)
            if s is None:
                out.append(
                    _claim(
                        f"speed-up 1/{nominal}",
                        seed,
                        None,
                        NOT_MEASURED,
                        f"{label} and the teacher share no thread count",
                        model=label,
                    )
                )
                continue
            measured = s["decode_tps"]["mean"] / t["decode_tps"]["mean"] if t["decode_tps"]["mean"] > 0 else math.nan
            verdict = CONFIRMED if measured >= claimed * (1 - SPEED_TOLERANCE) else REFUTED
            out.append(
                _claim(
                    f"speed-up 1/{nominal}",
                    seed,
                    measured,
                    verdict,
                    f"{label} vs {t['label']} ({why if t['label'] == teacher else 'the teacher, same format'}); "
                    f"{how}; host decode tokens/s",
                    model=label,
                    ratio=ratios[label],
                )
            )
    # Memory.
    for nominal, claimed in SEED_MEMORY_MB.items():
        seed = f"{'the teacher' if nominal == 1 else f'a 1/{nominal} student'} needs about {claimed:g} MB"
        labels = [teacher] if nominal == 1 and teacher_rows else buckets.get(nominal, [])
        if not labels:
            out.append(_claim(f"memory 1/{nominal}", seed, None, NOT_MEASURED, f"no model of that size ({why})"))
            continue
        for label in labels:
            mine = rows_of(label)
            row = max(mine, key=lambda r: r["threads"])
            measured = row["peak_rss_mb"] - row["rss_before_mb"]
            verdict = CONFIRMED if measured <= claimed * (1 + MEMORY_TOLERANCE) else REFUTED
            out.append(
                _claim(
                    f"memory 1/{nominal}",
                    seed,
                    measured,
                    verdict,
                    f"{label} {row['backend']} {row['quantization']}, {row['threads']} threads: peak RSS "
                    f"{row['peak_rss_mb']:.0f} MB - {row['rss_before_mb']:.0f} MB before loading",
                    model=label,
                    ratio=ratios.get(label, 1.0),
                )
            )
    # Retention.
    for nominal, claimed in SEED_RETENTION.items():
        seed = f"a 1/{nominal} student keeps {claimed:.0%} of the quality"
        labels = buckets.get(nominal, [])
        if not labels:
            out.append(
                _claim(
                    f"retention 1/{nominal}", seed, None, NOT_MEASURED, f"no student with {nominal}x fewer parameters"
                )
            )
            continue
        for label in labels:
            quality = next((r["quality"] for r in rows_of(label) if r.get("quality")), None)
            value = quality.get("retention") if quality else None
            if value is None or (isinstance(value, float) and math.isnan(value)):
                reason = (
                    "no --data (held-out text) given"
                    if quality is None
                    else (
                        quality.get("retention_note") or "no teacher perplexity (--teacher and --data are both needed)"
                    )
                )
                out.append(_claim(f"retention 1/{nominal}", seed, None, NOT_MEASURED, reason, model=label))
                continue
            verdict = CONFIRMED if value >= claimed - RETENTION_TOLERANCE else REFUTED
            out.append(
                _claim(
                    f"retention 1/{nominal}",
                    seed,
                    value,
                    verdict,
                    f"{label}: teacher perplexity {_teacher_ppl(rows, teacher):.2f} / student perplexity "
                    f"{quality['perplexity']:.2f} over {quality['tokens']} held-out tokens",
                    model=label,
                    ratio=ratios[label],
                )
            )
    return out


def _teacher_ppl(rows: list[dict[str, Any]], teacher: str | None) -> float:
    for row in rows:
        if row["label"] == teacher and row.get("quality"):
            return float(row["quality"]["perplexity"])
    return math.nan
