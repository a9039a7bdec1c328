"""Reports of a bench result: bench.json (versioned schema), bench.csv, bench.md, PNG plots, and the stdout table.

Every number printed comes from the result: measured on this host, derived from measurements (roofline), or a
projection, and a projection is labelled "projection" in every table, column and plot where it appears.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from edgedistill.bench.claims import DEFINITIONS as CLAIM_DEFINITIONS
from edgedistill.bench.claims import MISSING, claim_value, number, percent
from edgedistill.files import atomic_write_bytes

# bench.json's identity: written by the harness, checked by read_json
SCHEMA = "edgedistill.bench"
SCHEMA_VERSION = 1

__all__ = ["claim_value", "markdown_table", "markdown_tables", "text_table", "write_reports", "read_json"]

# bench.csv columns, in order: (header, function of a row).
CSV_COLUMNS: list[tuple[str, Any]] = [
    ("label", lambda r: r["label"]),
    ("role", lambda r: r["role"]),
    ("path", lambda r: r["path"]),
    ("backend", lambda r: r["backend"]),
    ("quantization", lambda r: r["quantization"]),
    ("parameters", lambda r: r["parameters"]),
    ("file_bytes", lambda r: r["file_bytes"]),
    ("threads", lambda r: r["threads"]),
    ("measured_on", lambda r: r["measured_on"]),
    ("load_s", lambda r: r["load_s"]),
    ("load_mode", lambda r: r["load_mode"]),
    ("ttft_ms_mean", lambda r: r["ttft_ms"]["mean"]),
    ("ttft_ms_std", lambda r: r["ttft_ms"]["std"]),
    ("prefill_tps_mean", lambda r: r["prefill_tps"]["mean"]),
    ("prefill_tps_std", lambda r: r["prefill_tps"]["std"]),
    ("decode_tps_mean", lambda r: r["decode_tps"]["mean"]),
    ("decode_tps_std", lambda r: r["decode_tps"]["std"]),
    ("repetitions", lambda r: r["decode_tps"]["n"]),
    ("token_ms_p50", lambda r: r["token_ms_p50"]),
    ("token_ms_p95", lambda r: r["token_ms_p95"]),
    ("peak_rss_mb", lambda r: r["peak_rss_mb"]),
    ("rss_before_mb", lambda r: r["rss_before_mb"]),
    ("model_rss_mb", lambda r: r["model_rss_mb"]),
    ("sampled_peak_rss_mb", lambda r: r.get("sampled_peak_rss_mb")),
    ("kernel_peak_rss_mb", lambda r: r.get("kernel_peak_rss_mb")),
    ("rss_rate_hz", lambda r: r["rss_rate_hz"]),
    ("bytes_per_token", lambda r: r["bytes_per_token"]),
    ("bandwidth_gbs", lambda r: r["bandwidth_gbs"]),
    ("bound_tps", lambda r: r["bound_tps"]),
    ("bound_share", lambda r: r["bound_share"]),
    ("fits_in_host_cache", lambda r: r["fits_in_host_cache"]),
    ("projection_target", lambda r: (r.get("projection") or {}).get("target")),
    ("projection_decode_tps", lambda r: (r.get("projection") or {}).get("decode_tps")),
    ("perplexity", lambda r: (r.get("quality") or {}).get("perplexity")),
    ("bits_per_byte", lambda r: (r.get("quality") or {}).get("bits_per_byte")),
    ("top1_accuracy", lambda r: (r.get("quality") or {}).get("top1_accuracy")),
    ("agreement", lambda r: (r.get("quality") or {}).get("agreement")),
    ("retention", lambda r: (r.get("quality") or {}).get("retention")),
    ("accuracy_ratio", lambda r: (r.get("quality") or {}).get("accuracy_ratio")),
    ("quality_tokens", lambda r: (r.get("quality") or {}).get("tokens")),
]
PLOTS = ("decode_vs_size.png", "memory_vs_size.png", "quality_vs_size.png")


def clean(value: Any) -> Any:
    """A copy with NaN and infinities replaced by None (JSON has no NaN), numpy scalars made plain."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_reports(result: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write bench.json, bench.csv, bench.md and the plots (when matplotlib is installed) into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "json": out / "bench.json",
        "csv": out / "bench.csv",
        "md": out / "bench.md",
    }
    atomic_write_bytes(written["json"], (json.dumps(clean(result), indent=2, allow_nan=False) + "\n").encode())
    atomic_write_bytes(written["csv"], csv_text(result).encode())
    plots, why = write_plots(result, out)
    written.update({name: path for name, path in plots.items()})
    body = markdown_tables(result)
    if plots:
        body += "\n### Plots\n\n" + "".join(f"![{name}]({path.name})\n" for name, path in plots.items())
    elif why:
        body += f"\n### Plots\n\nNo plots: {why}\n"
    atomic_write_bytes(written["md"], ("# edgedistill bench\n\n" + body).encode())
    return written


def read_json(path: Path) -> dict[str, Any]:
    """A bench.json, checked for its schema."""
    from edgedistill.errors import EdgeDistillError

    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
        raise EdgeDistillError(f"{path}: not a {SCHEMA} v{SCHEMA_VERSION} report")
    return data


def csv_text(result: dict[str, Any]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _ in CSV_COLUMNS])
    for row in result["rows"]:
        writer.writerow(["" if (v := get(row)) is None else _csv_value(v) for _, get in CSV_COLUMNS])
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    return value


# ----------------------------------------------------------------------------------------------------- formatting
# One style for every number in bench.md, the stdout table and the pipeline's report.md (bench/claims.py).


def _pm(stat: dict[str, Any] | None, digits: int = 1) -> str:
    if not stat or stat.get("mean") is None:
        return MISSING
    return f"{number(stat['mean'], digits)} ± {number(stat.get('std'), digits)}"


def _params(count: Any) -> str:
    return number(count / 1e6, 1, " M") if count else MISSING


def _mb(count: Any) -> str:
    return number(count / 1e6, 1) if count else MISSING


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (ending with a newline)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def environment_line(result: dict[str, Any]) -> str:
    env = result["environment"]
    caches = ", ".join(
        f"L{c['level']}{'d' if c['type'] == 'Data' else 'i' if c['type'] == 'Instruction' else ''} "
        f"{c['bytes'] >> 10} KiB" + (f" (shared by {c['shared_by']})" if c["shared_by"] > 1 else "")
        for c in env.get("caches", [])
    )
    bandwidth = env.get("bandwidth_gbs") or {}
    bw = (
        ", ".join(f"{v:.1f} GB/s ({k} thread{'s' if k != '1' else ''})" for k, v in bandwidth.items()) or "not measured"
    )
    libs = ", ".join(f"{k} {v}" for k, v in env.get("libraries", {}).items())
    modes = sorted({f"{r['backend']}: {r['load_mode']}" for r in result["rows"]})
    cpus = sorted({len(r["cpus"]) for r in result["rows"] if r.get("cpus")})
    device = f" on {env['device_model']}" if env.get("device_model") else ""
    return (
        f"- Host{device}: {env['cpu_model']} ({env['machine']}), {env['available_cpus']} of {env['logical_cpus']} "
        f"CPUs available; CPUs used per row: {', '.join(map(str, cpus)) or MISSING}\n"
        f"- Caches: {caches or 'unknown'}\n"
        f"- Memory: {env.get('memory_total_bytes', 0) / 1e9:.1f} GB; measured read bandwidth: {bw}\n"
        f"- Load mode: {'; '.join(modes)}\n"
        f"- Libraries: {libs}\n"
    )


# ---------------------------------------------------------------------------------------------- bench.md sections
# Each returns one section of bench.md ("" when it has nothing to show); headings are level 3 (``###``) so that the
# pipeline's report can embed the body under a heading of its own.


def _speed_section(result: dict[str, Any], where: str) -> str:
    config = result.get("config", {})
    headers = ["model", "backend", "quant", "params", "file MB", "threads", "load s", "TTFT ms", "prefill tok/s"]
    headers += ["decode tok/s", "token ms p50", "p95"]
    rows = [
        [
            r["label"],
            r["backend"],
            r["quantization"],
            _params(r["parameters"]),
            _mb(r["file_bytes"]),
            str(r["threads"]),
            number(r["load_s"], 2),
            _pm(r["ttft_ms"]),
            _pm(r["prefill_tps"], 0),
            _pm(r["decode_tps"]) + (" (unstable)" if r.get("unstable") else ""),
            number(r["token_ms_p50"], 2),
            number(r["token_ms_p95"], 2),
        ]
        for r in result["rows"]
    ]
    return (
        f"\n### Speed (measured on {where})\n\n"
        f"Prompt {config.get('prompt_tokens')} tokens, {config.get('gen_tokens')} generated; mean ± stddev over "
        f"{config.get('repeat')} repetitions after {config.get('warmup')} warm-up.\n\n" + markdown_table(headers, rows)
    )


def _memory_section(result: dict[str, Any], where: str) -> str:
    headers = ["model", "threads", "RSS before load MB", "peak RSS MB", "peak - before MB", "sampled peak MB"]
    headers += ["kernel peak MB", "sampling Hz", "file MB"]
    rows = [
        [
            r["label"],
            str(r["threads"]),
            number(r["rss_before_mb"]),
            number(r["peak_rss_mb"]),
            number(r["model_rss_mb"]),
            number(r.get("sampled_peak_rss_mb")),
            number(r.get("kernel_peak_rss_mb")),
            number(r["rss_rate_hz"], 0),
            _mb(r["file_bytes"]),
        ]
        for r in result["rows"]
    ]
    return f"\n### Memory (measured on {where})\n\n" + markdown_table(headers, rows)


def _llama_perf_section(result: dict[str, Any]) -> str:
    """Our GGUF rates beside llama.cpp's own counters (``llama_perf_context``) over the same repetitions."""
    perf_rows = [r for r in result["rows"] if r.get("llama_perf")]
    if not perf_rows:
        return ""
    return "\n### GGUF rates against llama.cpp's own timing (llama_perf_context)\n\n" + markdown_table(
        ["model", "threads", "prefill tok/s: ours", "llama.cpp", "ratio", "decode tok/s: ours", "llama.cpp", "ratio"],
        [
            [
                r["label"],
                str(r["threads"]),
                number(r["prefill_tps"]["mean"]),
                number(r["llama_perf"].get("prefill_tps")),
                number(r["llama_perf"].get("prefill_ratio"), 3),
                number(r["decode_tps"]["mean"]),
                number(r["llama_perf"].get("decode_tps")),
                number(r["llama_perf"].get("decode_ratio"), 3),
            ]
            for r in perf_rows
        ],
    )


def _roofline_section(result: dict[str, Any]) -> str:
    headers = ["model", "threads", "MB read per token", "bandwidth GB/s", "bound tok/s", "decode tok/s"]
    headers += ["share of bound", "fits in host cache"]
    rows = [
        [
            r["label"],
            str(r["threads"]),
            _mb(r["bytes_per_token"]),
            number(r["bandwidth_gbs"]),
            number(r["bound_tps"]),
            number(r["decode_tps"]["mean"]),
            percent(r["bound_share"], 0),
            "yes: host numbers do not transfer" if r["fits_in_host_cache"] else "no",
        ]
        for r in result["rows"]
    ]
    title = "Roofline (decode bound = measured bandwidth / bytes read per token)"
    return f"\n### {title}\n\n" + markdown_table(headers, rows)


def _projection_caveat(projection: dict[str, Any], target: str) -> str:
    caveats = [
        "host ran from cache: efficiency capped at 1" if projection["capped"] else "",
        f"fits in {target}'s cache" if projection["fits_in_target_cache"] else "",
    ]
    return "; ".join(c for c in caveats if c) or MISSING


def _projection_section(result: dict[str, Any]) -> str:
    target = result.get("target")
    projected = [r for r in result["rows"] if r.get("projection")]
    if not target or not projected:
        return ""
    name = target["name"]
    headers = ["model", "threads", "host decode tok/s (measured)", "host efficiency", f"{name} bandwidth GB/s"]
    headers += [f"{name} decode tok/s (projection)", "caveat"]
    rows = [
        [
            r["label"],
            str(r["threads"]),
            number(r["decode_tps"]["mean"]),
            number(r["projection"]["efficiency"], 2),
            number(r["projection"]["target_bandwidth_gbs"]),
            number(r["projection"]["decode_tps"]) + " (projection)",
            _projection_caveat(r["projection"], name),
        ]
        for r in projected
    ]
    return (
        f"\n### Projection onto {name} ({target['description']}) - projection, not a measurement\n\n"
        f"projected decode tok/s = host efficiency (host decode / host bound, capped at 1) × "
        f"{name} bandwidth / bytes per token. {target.get('notes', '')}\n\n" + markdown_table(headers, rows)
    )


def _quality_section(result: dict[str, Any]) -> str:
    quality = [r for r in result["rows"] if r.get("quality")]
    if not quality:
        return ""
    headers = [
        "model",
        "perplexity",
        "bits per byte",
        "top-1 accuracy",
        "top-1 agreement with teacher",
        "retention (teacher bits/byte / student bits/byte)",
        "accuracy ratio (student / teacher top-1)",
        "tokens",
    ]

    def against_teacher(r: dict[str, Any], key: str) -> str:
        return percent(r["quality"].get(key)) if r["role"] != "teacher" else "(teacher)"

    rows = [
        [
            r["label"],
            number(r["quality"]["perplexity"], 2),
            number(r["quality"].get("bits_per_byte"), 3),
            percent(r["quality"].get("top1_accuracy")),
            against_teacher(r, "agreement"),
            against_teacher(r, "retention"),
            against_teacher(r, "accuracy_ratio"),
            str(r["quality"]["tokens"]),
        ]
        for r in quality
    ]
    # why a figure against the teacher is missing: another tokenizer (agreement), no bits per byte (retention), ...
    notes = [
        f"- {r['label']}: {key.replace('_', ' ')} {r['quality'][f'{key}_note']}\n"
        for r in quality
        for key in ("agreement", "retention", "accuracy_ratio")
        if r["quality"].get(f"{key}_note")
    ]
    table = markdown_table(headers, rows) + ("\n" + "".join(dict.fromkeys(notes)) if notes else "")
    return "\n### Quality (held-out data, through the runtime's logits)\n\n" + table


def _claims_section(result: dict[str, Any]) -> str:
    if not result.get("claims"):
        return ""
    return "\n### Claims of the seed (MiniMind) against these measurements\n\n" + claims_table(result)


def _definitions_section(result: dict[str, Any]) -> str:
    definitions = dict(result.get("definitions", {}))
    if result.get("claims"):
        definitions.update({f"claim: {k}": v for k, v in CLAIM_DEFINITIONS.items()})
    return "\n### Definitions\n\n" + "".join(f"- **{k}**: {v}\n" for k, v in definitions.items())


def _notes_section(result: dict[str, Any]) -> str:
    notes = list(result.get("notes", [])) + [f"{s['label']}: {s['reason']}" for s in result.get("skipped", [])]
    return "\n### Notes\n\n" + "".join(f"- {n}\n" for n in notes) if notes else ""


def markdown_tables(result: dict[str, Any]) -> str:
    """The body of bench.md: environment, speed, memory, roofline, projection, quality, claims, definitions, notes.

    Headings are level 3 (``###``) so that the pipeline's report can embed the body under a heading of its own.
    """
    where = "the target itself" if result.get("on_target") else "this host"
    return "".join(
        [
            "### Environment\n\n" + environment_line(result),
            _speed_section(result, where),
            _memory_section(result, where),
            _llama_perf_section(result),
            _roofline_section(result),
            _projection_section(result),
            _quality_section(result),
            _speculative_section(result),
            _claims_section(result),
            _definitions_section(result),
            _notes_section(result),
        ]
    )


def _speculative_section(result: dict[str, Any]) -> str:
    if not result.get("speculative"):
        return ""
    return "\n### The teacher accelerated by its drafts (speculative decoding)\n\n" + speculative_markdown(
        result["speculative"]
    )


# ------------------------------------------------------------------------------------ speculative decoding (drafts)


def best_draft_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each draft's row with the highest speed-up."""
    best: dict[str, dict[str, Any]] = {}
    for row in result.get("rows", []):
        if row["draft"] not in best or (row["speedup"] or 0) > (best[row["draft"]]["speedup"] or 0):
            best[row["draft"]] = row
    return list(best.values())


def draft_verdict(row: dict[str, Any]) -> str:
    """What a row says in words; a draft that makes the teacher slower says why (too weak or too slow)."""
    speedup = row.get("speedup")
    if speedup is None:
        return "not measured: too few tokens decoded to time"
    if not row.get("identical"):
        return "output differs from the teacher's (a rounding difference between batched and single evaluation)"
    if row.get("draft_tokens") == "auto" and row.get("tokens_per_round", 0) < 1.1:
        return "left idle by the schedule: its proposals do not pay here, so the teacher mostly runs alone"
    if speedup >= 1.05:
        return f"helps: {number(speedup, 2, 'x')} the teacher's decode speed"
    if speedup > 0.95:
        return "no gain: the kept proposals only pay for the draft's own cost"
    if row["acceptance"] < 0.5:
        return f"too weak to help: the teacher keeps {percent(row['acceptance'], 0)} of its proposals"
    return "too slow to help: its proposals cost more than the teacher's evaluations they save"


def speculative_markdown(result: dict[str, Any]) -> str:
    """The table "the teacher accelerated by its students" (Markdown)."""
    if not result.get("rows"):
        return "(no draft was measured)\n"
    head = (
        f"Teacher `{Path(result['teacher']).name}` alone: {number(result['teacher_decode_tps'], 1)} decode tokens/s, "
        f"{result['threads']} threads, greedy, {len(result['prompts'])} prompts x {result['max_tokens']} tokens, "
        f"median of {result['repeat']} passes. k = tokens proposed per round (auto: adapted).\n\n"
    )
    checks = result.get("teacher_check_ms") or {}
    if checks:
        head += (
            "The teacher's cost to check n tokens in one call: "
            + ", ".join(f"n = {n}: {number(ms, 1)} ms" for n, ms in checks.items())
            + " (n = 1 is plain decoding; a round with k proposals pays for n = k + 1).\n\n"
        )
    table = markdown_table(
        [
            "draft",
            "k",
            "proposals kept",
            "tokens / teacher call",
            "decode tok/s",
            "speed-up",
            "identical output",
            "draft alone tok/s",
            "verdict",
        ],
        [
            [
                row["draft"],
                str(row["draft_tokens"]),
                f"{percent(row['acceptance'], 0)} of {number(row.get('proposed_per_pass'), 0)}",
                number(row["tokens_per_round"], 2),
                number(row["decode_tps"], 1),
                number(row["speedup"], 2, "x"),
                "yes" if row["identical"] else "**no**",
                number(row["draft_decode_tps"], 1),
                draft_verdict(row),
            ]
            for row in result["rows"]
        ],
    )
    return head + table


def claims_table(result: dict[str, Any]) -> str:
    return markdown_table(
        ["claim", "model", "seed says", "measured", "verdict", "how"],
        [
            [c["claim"], c.get("model", MISSING), c["seed"], claim_value(c), f"**{c['verdict']}**", c["note"]]
            for c in result.get("claims") or []
        ],
    )


# ---------------------------------------------------------------------------------------------------- stdout table


def _text_row(r: dict[str, Any]) -> list[str]:
    bound = percent(r["bound_share"], 0)
    return [
        r["label"],
        r["backend"],
        r["quantization"],
        _params(r["parameters"]),
        str(r["threads"]),
        number(r["load_s"], 2),
        _pm(r["ttft_ms"]),
        _pm(r["prefill_tps"], 0),
        _pm(r["decode_tps"]) + ("!" if r.get("unstable") else ""),
        number(r["token_ms_p50"], 2),
        number(r["token_ms_p95"], 2),
        f"{number(r['peak_rss_mb'], 0)} ({number(r['rss_before_mb'], 0)})",
        bound + ("*" if bound != MISSING and r["fits_in_host_cache"] else ""),
        number((r.get("quality") or {}).get("perplexity"), 2),
    ]


def _text_projection(result: dict[str, Any]) -> list[str]:
    target = result.get("target")
    projected = [r for r in result["rows"] if r.get("projection")]
    if not target or not projected:
        return []
    rows = [
        [
            r["label"],
            str(r["threads"]),
            number(r["decode_tps"]["mean"]),
            number(r["projection"]["decode_tps"]) + " (projection)",
            "host ran from cache: capped" if r["projection"]["capped"] else "",
        ]
        for r in projected
    ]
    headers = ["model", "thr", "host decode tok/s", f"{target['name']} projection tok/s", "note"]
    title = f"\n{target['name']} decode tok/s - PROJECTION from host bandwidth efficiency, not measured:"
    return [title, _align(headers, rows)]


def text_table(result: dict[str, Any]) -> str:
    """The human table printed on stdout: one line per row, then projections and claims."""
    rows = result["rows"]
    where = "target" if result.get("on_target") else "host"
    headers = ["model", "backend", "quant", "params", "thr", "load s", "TTFT ms", "prefill tok/s", "decode tok/s"]
    headers += ["p50 ms", "p95 ms", "peak MB (before)", "bound", "ppl"]
    body = [_text_row(r) for r in rows]
    lines = [f"measured on this {where} ({result['environment']['cpu_model']}):", _align(headers, body)]
    if any(r["fits_in_host_cache"] for r in rows):
        lines.append("* fits in this host's last-level cache: host decode speed does not transfer to a smaller device")
    if any(r.get("unstable") for r in rows):
        lines.append("! unstable: repetitions disagree by more than 25 % (something else was running?)")
    lines += _text_projection(result)
    if result.get("claims"):
        lines.append("\nclaims of the seed:")
        lines.append(
            _align(
                ["claim", "model", "measured", "verdict"],
                [[c["claim"], c.get("model", MISSING), claim_value(c), c["verdict"].upper()] for c in result["claims"]],
            )
        )
    return "\n".join(lines) + "\n"


def _align(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*line).rstrip() for line in [headers, *rows])


# ------------------------------------------------------------------------------------------------------------ plots


def _scatter_plot(
    plt: Any,
    path: Path,
    values: list[tuple[dict[str, Any], float | None]],
    labels: tuple[str, str, str],
    projection: list[tuple[dict[str, Any], float | None]] | None = None,
    target: str = "",
) -> bool:
    """One value against file size (log scale), measured points filled, projected ones hollow; False when no value
    is finite (nothing written). ``labels``: the y axis, the title, and where the points were measured."""
    shown = [(r, v) for r, v in values if v is not None and math.isfinite(v)]
    if not shown:
        return False
    ylabel, title, where = labels
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    axis.scatter([r["file_bytes"] / 1e6 for r, _ in shown], [v for _, v in shown], label=f"measured ({where})")
    for r, v in shown:
        label = f"{r['label']} ({r['threads']}t)"
        axis.annotate(label, (r["file_bytes"] / 1e6, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
    projected = [(r, v) for r, v in projection or [] if v is not None and math.isfinite(v)]
    if projected:
        axis.scatter(
            [r["file_bytes"] / 1e6 for r, _ in projected],
            [v for _, v in projected],
            facecolors="none",
            edgecolors="tab:red",
            label=f"projection onto {target} (not measured)",
        )
    axis.set_xscale("log")
    axis.set_xlabel("file size (MB, log scale)")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return True


def write_plots(result: dict[str, Any], out: Path) -> tuple[dict[str, Path], str]:
    """Decode tokens/s, peak memory and perplexity against file size, one point per model (its highest thread
    count). Projections, when present, are drawn as hollow markers and labelled "projection" in the legend.

    Returns:
        ``({name: path}, "")``, or ``({}, reason)`` when matplotlib is missing or there is nothing to plot.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, "matplotlib is not installed (pip install 'edgedistill[bench]')"
    latest: dict[str, dict[str, Any]] = {}
    for row in result["rows"]:
        if row["label"] not in latest or row["threads"] >= latest[row["label"]]["threads"]:
            latest[row["label"]] = row
    points = list(latest.values())
    if not points:
        return {}, "no rows"
    where = "target" if result.get("on_target") else "host"
    target = (result.get("target") or {}).get("name", "")
    plots = {
        PLOTS[0]: (
            [(r, r["decode_tps"]["mean"]) for r in points],
            ("decode tokens/s", "Decode speed against size", where),
            [(r, r["projection"]["decode_tps"]) for r in points if r.get("projection")],
        ),
        PLOTS[1]: ([(r, r["peak_rss_mb"]) for r in points], ("peak RSS (MB)", "Peak memory against size", where), None),
        PLOTS[2]: (
            [(r, (r.get("quality") or {}).get("perplexity")) for r in points],
            ("held-out perplexity (lower is better)", "Quality against size", where),
            None,
        ),
    }
    written: dict[str, Path] = {}
    for name, (values, labels, projection) in plots.items():
        if _scatter_plot(plt, out / name, values, labels, projection, target):
            written[name] = out / name
    return written, "" if written else "nothing to plot"
