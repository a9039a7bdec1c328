"""The pipeline's ``report.md``: the seed's three tables filled with measured numbers, the claims, plots, samples.

Everything in the report is read from the files the stages wrote (``teacher/heldout_eval.json``, each student's
``train_summary.json``, the export manifests, ``bench/bench.json``), so a report can be rebuilt without rerunning
anything. Host numbers are labelled as this host's; target numbers are labelled projections.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

from edgedistill.bench.report import claim_value, markdown_table
from edgedistill.pipeline import student_label

# The seed document's tables (MiniMind: a 104M teacher; students 26M, 13M, 6.5M).
SEED_RETENTION = {4: "100 % (its baseline)", 8: "85 %", 16: "70 %"}
SEED_SPEEDUP = {4: "3.5x", 8: "6x"}
SEED_MEMORY = {1: "~400 MB, GPU / high-end CPU", 4: "~100 MB, ordinary CPU", 8: "~50 MB, mobile devices"}


def size_class(teacher_params: int, params: int) -> int | None:
    """4, 8 or 16 when the model has about that many times fewer parameters than the teacher (1 for the teacher)."""
    if not params or not teacher_params:
        return None
    ratio = teacher_params / params
    if ratio < 1.5:
        return 1
    return min((4, 8, 16), key=lambda k: abs(math.log(ratio / k)))


def sample_generations(config: Any, artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """Greedy continuations of ``config.sample_prompts`` by the teacher and each distilled student, through the
    runtime on one artifact per model (GGUF q8_0 when exported, else the first that passed parity)."""
    from edgedistill.runtime import load

    chosen: dict[str, dict[str, Any]] = {}
    for artifact in artifacts:
        if not artifact["passed"]:
            continue
        best = chosen.get(artifact["label"])
        preferred = artifact["format"] == "gguf" and artifact["quantization"] == "q8_0"
        if best is None or preferred:
            chosen[artifact["label"]] = artifact
    samples: dict[str, Any] = {"prompts": list(config.sample_prompts), "max_tokens": config.sample_tokens, "models": {}}
    for label, artifact in chosen.items():
        threads = max(config.bench_threads)
        with load(artifact["path"], threads=threads) as model:
            outputs = [
                model.generate(prompt, max_tokens=config.sample_tokens, temperature=0.0)
                for prompt in config.sample_prompts
            ]
        samples["models"][label] = {
            "artifact": f"{artifact['format']} {artifact['quantization']}",
            "path": artifact["path"],
            "outputs": outputs,
        }
    return samples


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _fmt(value: Any, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def _mean(stat: Any) -> float | None:
    if isinstance(stat, dict):
        return stat.get("mean")
    return stat


def _is_teacher(row: dict[str, Any]) -> bool:
    """The teacher's rows: the bench's --teacher artifact and the pipeline's other teacher artifacts."""
    return row.get("role") == "teacher" or _split_label(row["label"])[0] == "teacher"


def _split_label(label: str) -> tuple[str, str]:
    name, _, quant = label.rpartition(" ")
    return (name, quant) if name else (label, "")


def quality_table(config: Any, layout: Any, teacher_eval: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """Seed table 1: size and held-out quality of each student before (CE only) and after distillation."""
    teacher_ppl = teacher_eval.get("perplexity")
    teacher_params = teacher_eval.get("parameters") or 0
    rows = [
        [
            "teacher",
            _fmt(teacher_params / 1e6, 1, "M"),
            "1",
            _fmt(teacher_ppl, 1),
            _fmt(teacher_ppl, 1),
            "100 %",
            "100 %",
            "—",
            "—",
        ]
    ]
    records = []
    for student in config.students:
        after = _read(layout.student(student, True) / "train_summary.json")
        before = _read(layout.student(student, False) / "train_summary.json")
        if not after or not before:
            continue
        params = after["student"]["parameters"]
        name = student_label(student)
        ppl_after, ppl_before = after["heldout"]["perplexity"], before["heldout"]["perplexity"]
        record = {
            "student": name,
            "parameters": params,
            "ratio": teacher_params / params if teacher_params else None,
            "ppl_before": ppl_before,
            "ppl_after": ppl_after,
            "retention_before": teacher_ppl / ppl_before if teacher_ppl else None,
            "retention_after": teacher_ppl / ppl_after if teacher_ppl else None,
            "agreement_after": after["heldout"].get("top1_agreement"),
            "agreement_before": before["heldout"].get("top1_agreement"),
            "size_class": size_class(teacher_params, params),
        }
        records.append(record)
        rows.append(
            [
                name,
                _fmt(params / 1e6, 1, "M"),
                _fmt(record["ratio"], 1),
                _fmt(ppl_before, 1),
                _fmt(ppl_after, 1),
                _pct(record["retention_before"]),
                _pct(record["retention_after"]),
                f"{_pct(record['agreement_before'])} → {_pct(record['agreement_after'])}",
                SEED_RETENTION.get(record["size_class"], "—"),
            ]
        )
    headers = [
        "model",
        "parameters",
        "teacher ÷ model",
        "held-out ppl, CE only (before)",
        "held-out ppl, distilled (after)",
        "retention before",
        "retention after",
        "top-1 agreement with teacher (before → after)",
        "seed's retention",
    ]
    return markdown_table(headers, rows), records


def speed_table(bench: dict[str, Any]) -> str:
    """Seed table 2: decode speed and speed-up against the teacher's artifact of the same format and threads."""
    rows_out = []
    bench_rows = bench.get("rows", [])
    teacher = {(r["format"], r["quantization"], r["threads"]): r for r in bench_rows if _is_teacher(r)}
    teacher_params = next((r["parameters"] for r in teacher.values()), 0)
    for row in sorted(bench_rows, key=lambda r: (r["format"], r["quantization"], r["threads"], -r["parameters"])):
        name, _ = _split_label(row["label"])
        base = teacher.get((row["format"], row["quantization"], row["threads"]))
        decode = _mean(row["decode_tps"])
        speedup = decode / _mean(base["decode_tps"]) if base and row is not base and decode else None
        projection = row.get("projection") or {}
        klass = size_class(teacher_params, row["parameters"])
        rows_out.append(
            [
                name,
                f"{row['format']} {row['quantization']}",
                str(row["threads"]),
                _fmt(row["parameters"] / 1e6, 1, "M"),
                _fmt(decode, 1),
                "1x (reference)" if row is base else (_fmt(speedup, 2, "x") if speedup else "—"),
                _fmt(_mean(row["prefill_tps"]), 0),
                _fmt(_mean(row["ttft_ms"]), 1),
                _fmt(row.get("bound_share") and 100 * row["bound_share"], 0, " %"),
                _fmt(projection.get("decode_tps"), 1) + (" (projection)" if projection else ""),
                "1x" if _is_teacher(row) else SEED_SPEEDUP.get(klass, "—"),
            ]
        )
    target = next((r["projection"]["target"] for r in bench_rows if r.get("projection")), None)
    headers = [
        "model",
        "artifact",
        "threads",
        "parameters",
        "decode tokens/s (this host)",
        "speed-up vs teacher",
        "prefill tokens/s",
        "time to first token, ms",
        "share of bandwidth bound",
        f"decode tokens/s on {target or 'a target'}: **projection**",
        "seed's speed-up",
    ]
    return markdown_table(headers, rows_out)


def memory_table(bench: dict[str, Any]) -> str:
    """Seed table 3: file size and measured peak memory of each artifact, beside the seed's memory claims."""
    bench_rows = bench.get("rows", [])
    teacher_params = next((r["parameters"] for r in bench_rows if _is_teacher(r)), 0)
    rows = []
    seen = set()
    for row in sorted(bench_rows, key=lambda r: (-r["parameters"], r["format"], r["quantization"])):
        key = (row["label"], row["format"], row["quantization"])
        if key in seen:  # one line per artifact: the largest peak over thread counts
            continue
        seen.add(key)
        peers = [r for r in bench_rows if (r["label"], r["format"], r["quantization"]) == key]
        peak = max(peers, key=lambda r: r["peak_rss_mb"])
        name, _ = _split_label(row["label"])
        klass = size_class(teacher_params, row["parameters"])
        rows.append(
            [
                name,
                f"{row['format']} {row['quantization']}",
                _fmt(row["parameters"] / 1e6, 1, "M"),
                _fmt(row["file_bytes"] / 1e6, 1),
                _fmt(peak["peak_rss_mb"], 0),
                _fmt(peak["model_rss_mb"], 0),
                SEED_MEMORY.get(klass, "—"),
            ]
        )
    headers = [
        "model",
        "artifact",
        "parameters",
        "file MB",
        "peak RSS MB (whole process)",
        "peak RSS MB above the pre-load baseline",
        "seed's memory and minimum hardware",
    ]
    return markdown_table(headers, rows)


def write_report(config: Any, layout: Any, outputs: dict[str, Any], samples: dict[str, Any]) -> Path:
    """Write ``report.md`` from the stages' files; returns its path."""
    from edgedistill.bench.claims import check_claims
    from edgedistill.bench.report import markdown_tables
    from edgedistill.files import atomic_write_text

    teacher_eval = _read(layout.teacher_eval)
    bench = _read(layout.bench / "bench.json")
    state = _read(layout.manifest)
    quality, quality_records = quality_table(config, layout, teacher_eval)
    speed = speed_table(bench) if bench else "(the bench stage has not run)"
    memory = memory_table(bench) if bench else "(the bench stage has not run)"
    claims = check_claims(bench) if bench else []
    env = bench.get("environment", {})
    host = env.get("cpu_model") or platform.processor() or "this host"
    lines = [
        "# edgedistill pipeline report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} on {host}"
        f" ({env.get('available_cpus', '?')} CPUs available); settings in `{layout.config.name}`. Every number "
        "below was measured on this host by this run, except columns and lines marked **projection**, which scale this "
        "host's measured decode speed to a target's memory bandwidth; host timings are not Raspberry Pi or phone "
        "timings.",
        "",
        f"Teacher: `{config.teacher}`; data: {', '.join(config.data) or 'the embedded corpus'}; students: "
        f"{', '.join(config.students)}, each trained {config.steps} steps of {config.batch_size} x {config.seq_len} "
        f"tokens (seed {config.seed}) twice: distilled (alpha {config.alpha}, T {config.temperature}"
        + (f", from a top-{config.top_k} teacher cache" if config.top_k else ", teacher online")
        + ') and CE only (alpha 1, the seed\'s "before distillation").',
        "",
        "## 1. Size and quality before and after distillation",
        "",
        "Held-out perplexity of the PyTorch checkpoints on the same "
        f"{_fmt(teacher_eval.get('heldout_tokens'), 0)} held-out tokens as the teacher. **Retention = teacher "
        "perplexity ÷ student perplexity** (100 % = as good as the teacher). The seed does not say what its "
        '"performance" measures, so its percentages are compared with ours as the closest reading.',
        "",
        quality,
        "",
    ]
    lines += _quality_verdicts(quality_records)
    lines += [
        "",
        "## 2. Speed against the teacher",
        "",
        "Decode tokens/s through edgedistill's runtime on this host; speed-up = student ÷ teacher, same format, "
        "quantization and threads.",
        "",
        speed,
        "",
        "## 3. Memory and minimum hardware",
        "",
        "Peak resident memory sampled while the model loads, prefills and generates, in a fresh process per model.",
        "",
        memory,
        "",
    ]
    lines += _hardware_lines(bench)
    lines += ["", "## Exported artifacts and their parity with PyTorch", ""]
    lines += _artifact_lines(outputs.get("export", {}).get("artifacts", []))
    lines += ["", "## Claims of the seed document", ""]
    lines += _verdict_lines(claims, bench)
    lines += [""]
    if claims:
        lines.append(
            markdown_table(
                ["claim", "seed", "measured", "verdict", "how"],
                [
                    [
                        c["claim"],
                        str(c["seed"]),
                        claim_value(c),
                        f"**{c['verdict']}**",
                        c.get("note", ""),
                    ]
                    for c in claims
                ],
            )
        )
    else:
        lines.append("(not checked: the bench stage has not run)")
    lines += ["", "## Plots", ""]
    for name in sorted(p.name for p in layout.bench.glob("*.png")) if layout.bench.is_dir() else []:
        lines.append(f"![{name}](bench/{name})")
    for student in config.students:
        for distilled in (True, False):
            curve = layout.student(student, distilled) / "loss_curve.png"
            if curve.is_file():
                lines.append(f"![{curve.parent.name} loss]({curve.relative_to(layout.out).as_posix()})")
    lines += ["", "## Sample generations", ""]
    lines += _samples_section(samples)
    if bench:
        lines += ["", "## The bench's own tables", "", markdown_tables(bench)]
    lines += ["", "## Stages", ""]
    stage_rows = [
        [name, record.get("status", "—"), _fmt(record.get("seconds"), 0, " s")]
        for name, record in state.get("stages", {}).items()
        if name != "report"
    ]
    total = sum(record.get("seconds") or 0 for name, record in state.get("stages", {}).items() if name != "report")
    stage_rows.append(["report", "writing this file", "—"])
    lines.append(markdown_table(["stage", "status", "wall time"], stage_rows))
    lines += ["", f"Stages before the report: {_fmt(total / 60, 1)} minutes of wall time on this host."]
    atomic_write_text(layout.report, "\n".join(lines) + "\n")
    return layout.report


def _hardware_lines(bench: dict[str, Any]) -> list[str]:
    """What the measured memory and speed say about the seed's "minimum hardware" column."""
    rows = [r for r in bench.get("rows", []) if r.get("peak_rss_mb")]
    if not rows:
        return []
    lines = []
    teacher_rows = [r for r in rows if _is_teacher(r)]
    if teacher_rows:
        fastest = max(teacher_rows, key=lambda r: _mean(r["decode_tps"]) or 0)
        leanest = min(teacher_rows, key=lambda r: r["peak_rss_mb"])
        projection = fastest.get("projection") or {}
        lines.append(
            f'- The seed lists "GPU / high-end CPU" as the teacher\'s minimum hardware. Here the '
            f"{fastest['parameters'] / 1e6:.0f}M-parameter teacher decodes {_mean(fastest['decode_tps']):.0f} "
            f"tokens/s on {fastest['threads']} CPU threads of this host ({fastest['format']} "
            f"{fastest['quantization']}) and needs {leanest['peak_rss_mb']:.0f} MB at peak "
            f"({leanest['format']} {leanest['quantization']})"
            + (
                f"; **projection** for {projection['target']}: {projection['decode_tps']:.0f} tokens/s"
                if projection
                else ""
            )
            + ". At this size no GPU is needed: that part of the seed's table is **refuted** for this teacher."
        )
    onnx = [r for r in rows if r["format"] == "onnx"]
    gguf = [r for r in rows if r["format"] == "gguf"]
    if onnx and gguf:
        ratio = max(r["peak_rss_mb"] / r["file_bytes"] * 1e6 for r in onnx)
        lines.append(
            f"- ONNX artifacts peak at up to {ratio:.1f}x their file size (onnxruntime holds the weights in its own "
            "memory, and the runtime rewrites the graph at load time); GGUF files are memory-mapped and peak "
            "near their file size. On a 1-2 GB board, prefer GGUF."
        )
    return lines


def _artifact_lines(artifacts: list[dict[str, Any]]) -> list[str]:
    """Every exported file with its parity figures; a file that failed is named (and was not benchmarked)."""
    if not artifacts:
        return ["(the export stage has not run)"]
    rows = [
        [
            a["label"],
            f"{a['format']} {a['quantization']}",
            _fmt(a["bytes"] / 1e6, 1),
            _fmt(a["parity"].get("max_logit_diff"), 3),
            _pct(a["parity"].get("top1_agreement")),
            "yes" if a["parity"].get("greedy_equal") else "no",
            "passed" if a["passed"] else "**failed** (not benchmarked)",
        ]
        for a in artifacts
    ]
    headers = ["model", "artifact", "MB", "max logit difference", "top-1 agreement", "greedy text equal", "parity"]
    return [markdown_table(headers, rows)]


def _verdict_lines(claims: list[dict[str, Any]], bench: dict[str, Any]) -> list[str]:
    """One plain sentence per claim: where it holds and where our numbers refute it."""
    lines = []
    cached = {r["label"] for r in bench.get("rows", []) if r.get("fits_in_host_cache")}
    for name in dict.fromkeys(c["claim"] for c in claims):
        group = [c for c in claims if c["claim"] == name]
        parts = []
        for verdict in ("confirmed", "refuted", "not measured"):
            hits = [c for c in group if c["verdict"] == verdict]
            if not hits:
                continue
            if verdict == "not measured":
                parts.append("not measured (no model of that size)")
                continue
            which = ", ".join(
                f"{c.get('model', '?')} ({claim_value(c)}"
                + (", in host cache: inflated" if name.startswith("speed") and c.get("model") in cached else "")
                + ")"
                for c in hits
            )
            parts.append(f"**{verdict}** for {which}")
        lines.append(f"- {name} — {group[0]['seed']}: " + "; ".join(parts) + ".")
    if any(c["claim"].startswith("retention") and c["verdict"] == "refuted" for c in claims):
        lines.append(
            "- Retention is measured on students trained with this run's budget (section 1): a refutation says "
            "that *these* students keep that little of the teacher's quality, not what a longer run would reach."
        )
    return lines


def _quality_verdicts(records: list[dict[str, Any]]) -> list[str]:
    lines = []
    for record in records:
        gain = record["ppl_before"] / record["ppl_after"] - 1
        verdict = "improved" if gain > 0.005 else ("made no difference to" if gain > -0.005 else "worsened")
        lines.append(
            f"- `{record['student']}`: distillation {verdict} held-out perplexity "
            f"({_fmt(record['ppl_before'], 1)} → {_fmt(record['ppl_after'], 1)}, {100 * gain:+.1f} %)."
        )
    return lines


def _samples_section(samples: dict[str, Any]) -> list[str]:
    lines = [
        f"Greedy, {samples.get('max_tokens', '?')} new tokens, through the runtime (the artifact is named per model).",
        "",
    ]
    for index, prompt in enumerate(samples.get("prompts", [])):
        lines.append(f"**Prompt:** `{prompt}`")
        lines.append("")
        for label, record in samples.get("models", {}).items():
            text = record["outputs"][index].replace("\n", " ⏎ ").strip()
            lines.append(f"- *{label}* ({record['artifact']}): {text}")
        lines.append("")
    return lines
