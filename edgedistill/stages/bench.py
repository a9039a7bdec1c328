"""Stage ``bench``: every artifact that passed parity measured on this host (latency, throughput, memory, quality
through the runtime: perplexity, bits per byte, top-1 accuracy, and retention = teacher bits per byte ÷ student bits
per byte), with projections for a target profile, and the seed's claims checked (by the bench, once:
``bench/bench.json`` holds them).

Its part of the report: the seed's tables 2 (speed against the teacher) and 3 (memory and minimum hardware), the
claims' verdicts, the bench's plots and the bench's own tables. Size classes, seed numbers and number formats are
bench/claims.py's, so that report.md and bench.md say the same thing the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.bench.claims import (
    MISSING,
    SEED_HARDWARE,
    SEED_MEMORY_MB,
    SEED_SPEEDUP,
    claim_value,
    number,
    percent,
    size_class,
)
from edgedistill.bench.report import best_draft_rows, markdown_table, markdown_tables, speculative_markdown
from edgedistill.config import setting
from edgedistill.errors import EdgeDistillError
from edgedistill.stages.base import (
    Layout,
    Record,
    Section,
    Stage,
    Upstream,
    check_at_least_zero,
    check_positive,
    check_strings,
    log,
    read_json,
)
from edgedistill.stages.export import Artifact, ExportRecord
from edgedistill.stages.teacher import heldout_text

BENCH = "bench"
METHODS = "methods"  # bench/methods/: the methods bench of ``bench_methods``
NOT_RUN = "(the bench stage has not run)"


@dataclass
class BenchSettings:
    bench_threads: list[int] = setting(factory=lambda: [2], help="thread counts the bench measures")
    bench_prompt_tokens: int = setting(128, "prompt tokens per bench repetition")
    bench_gen_tokens: int = setting(64, "generated tokens per bench repetition")
    bench_repeat: int = setting(3, "measured repetitions")
    bench_warmup: int = setting(1, "unrecorded warm-up repetitions")
    bench_target: str = setting("rpi5", "target profile for projections (rpi4, rpi5, phone; empty: none)")
    quality_tokens: int = setting(4096, "held-out tokens scored through the runtime per artifact (0: no quality)")
    bench_drafts: bool = setting(
        True, "also measure the teacher's GGUF decoding speculatively with each student's GGUF as its draft"
    )
    bench_draft_tokens: list[int] = setting(
        factory=lambda: [1, 2],
        help="tokens a draft proposes per round, measured besides the adaptive choice (the demo's drafts gained "
        "nothing at 4: --full adds it)",
    )
    bench_methods: list[str] = setting(
        factory=list,
        help="distillation methods to compare on the first student preset (python -m edgedistill.bench.methods: kd, "
        "feature, attention, sequence, on-policy, progressive, multi-stage, chain; empty: not run)",
    )

    def __post_init__(self) -> None:
        threads = self.bench_threads if isinstance(self.bench_threads, list) else [self.bench_threads]
        try:
            self.bench_threads = [int(t) for t in threads]
        except (TypeError, ValueError):
            raise EdgeDistillError(f"bench_threads: expected a list of integers, got {self.bench_threads!r}") from None
        if not self.bench_threads or min(self.bench_threads) < 1:
            raise EdgeDistillError(f"bench_threads: expected positive integers, got {self.bench_threads!r}")
        check_positive(self, "bench_prompt_tokens", "bench_gen_tokens", "bench_repeat")
        check_at_least_zero(self, "bench_warmup", "quality_tokens")
        check_strings(self, "bench_methods")
        from edgedistill.runtime.speculative import MAX_DRAFT_TOKENS

        ks = self.bench_draft_tokens
        if not isinstance(ks, list) or not ks or not all(type(k) is int and 1 <= k <= MAX_DRAFT_TOKENS for k in ks):
            raise EdgeDistillError(
                f"bench_draft_tokens: expected a list of integers from 1 to {MAX_DRAFT_TOKENS}, got {ks!r}"
            )
        if self.bench_methods:
            from edgedistill.bench.methods import parse_methods

            parse_methods(",".join(self.bench_methods))


@dataclass
class BenchRecord(Record):
    bench_json: str
    rows: int


def bench_result(layout: Layout) -> dict[str, Any]:
    """``bench/bench.json`` as the bench wrote it (``{}`` before the stage has run)."""
    return read_json(layout.path(BENCH) / "bench.json")


class BenchStage(Stage[BenchSettings, BenchRecord]):
    name = "bench"
    settings = BenchSettings
    record = BenchRecord
    outputs = (BENCH,)
    full_budget = {
        "bench_threads": [1, 2, 4],
        "bench_gen_tokens": 128,
        "bench_repeat": 5,
        "quality_tokens": 8192,
        "bench_draft_tokens": [1, 2, 4],
    }

    def run(self, settings: BenchSettings, upstream: Upstream) -> BenchRecord:
        from edgedistill.bench.harness import BenchConfig, run_bench

        artifacts = [a for a in upstream.record("export", ExportRecord).artifacts if a.passed]
        if not artifacts:
            raise EdgeDistillError("bench: no exported artifact passed its parity check; see the export manifests")
        teacher = _teacher_artifact(artifacts)
        out = upstream.layout.path(BENCH)
        threads = _threads_here(settings.bench_threads)
        bench = BenchConfig(
            models=[Path(a.path) for a in artifacts],
            labels=[f"{a.label} {a.quantization}" for a in artifacts],
            threads=threads,
            prompt_tokens=settings.bench_prompt_tokens,
            gen_tokens=settings.bench_gen_tokens,
            repeat=settings.bench_repeat,
            warmup=settings.bench_warmup,
            data=[heldout_text(upstream.layout)] if settings.quality_tokens else [],
            teacher=Path(teacher.path) if teacher else None,
            target=settings.bench_target or None,
            claims=True,
            out=out,
            quality_tokens=settings.quality_tokens,
            draft=[Path(a.path) for a in _draft_artifacts(upstream, teacher)] if settings.bench_drafts else [],
            draft_tokens=list(settings.bench_draft_tokens),
        )
        result = run_bench(bench, progress=True)
        if settings.bench_methods:
            _methods_bench(settings, upstream, out / METHODS)
        return BenchRecord(bench_json=str(out / "bench.json"), rows=len(result.get("rows", [])))

    def report(self, upstream: Upstream) -> list[Section]:
        bench = bench_result(upstream.layout)
        sections = [
            Section(
                20,
                "2. Speed against the teacher",
                [
                    "Decode tokens/s through edgedistill's runtime on this host; speed-up = student ÷ teacher, same "
                    "format, quantization and threads.",
                    "",
                    speed_table(bench) if bench else NOT_RUN,
                ],
            ),
            Section(25, "2b. The teacher accelerated by its students", _speculative_lines(bench)),
            Section(
                30,
                "3. Memory and minimum hardware",
                [
                    "Peak resident memory sampled while the model loads, prefills and generates, in a fresh process "
                    "per model.",
                    "",
                    memory_table(bench) if bench else NOT_RUN,
                    "",
                    *hardware_lines(bench),
                ],
            ),
            Section(50, "Claims of the seed document", claims_lines(bench)),
            *_methods_sections(upstream),
            Section(60, "Plots", _plots(upstream.layout)),
        ]
        if bench:
            sections.append(Section(80, "The bench's own tables", [markdown_tables(bench)]))
        return sections


def _threads_here(counts: list[int]) -> list[int]:
    """``bench_threads`` without the counts above this machine's CPUs (oversubscribed rows measure contention, not
    the model), said in the log; the smallest count stays if none fits."""
    from edgedistill.system import available_cpus

    cpus = len(available_cpus())
    kept = [t for t in counts if t <= cpus] or [min(counts)]
    if len(kept) < len(counts):
        dropped = ", ".join(str(t) for t in counts if t not in kept)
        log(f"bench: threads {dropped} not measured: {cpus} CPUs available here")
    return kept


def _methods_bench(settings: BenchSettings, upstream: Upstream, out: Path) -> None:
    """The methods bench on the run's teacher and first student preset, in a process of its own (each method is a
    distill process of its own there too)."""
    import subprocess
    import sys

    from edgedistill.stages.distill import DistillSettings
    from edgedistill.stages.teacher import TeacherSettings

    student = upstream.settings(DistillSettings).students[0]
    command = [sys.executable, "-m", "edgedistill.bench.methods", "--teacher",
               upstream.settings(TeacherSettings).teacher, "--student", student, "--out", str(out),
               "--methods", ",".join(settings.bench_methods), "--threads", str(upstream.run.threads)]  # fmt: skip
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EdgeDistillError(f"bench: the methods bench failed (exit {done.returncode}): {last}")


def _methods_sections(upstream: Upstream) -> list[Section]:
    """The methods bench's table, when the run had ``bench_methods``."""
    table = upstream.layout.path(BENCH) / METHODS / "methods.md"
    if not table.is_file():
        return []
    body = table.read_text(encoding="utf-8").split("\n", 1)[1].strip()  # without its own title
    return [Section(55, "Distillation methods compared", [body])]


def _speculative_lines(bench: dict[str, Any]) -> list[str]:
    """Speculative decoding: the teacher's GGUF with each student's GGUF as its draft (bench/speculative.py)."""
    result = bench.get("speculative") if bench else None
    if not result:
        return [NOT_RUN if not bench else "(no student GGUF was measured as a draft)"]
    best = [
        f"- **{row['draft']}**: best {number(row['speedup'], 2, 'x')} at k = {row['draft_tokens']} "
        f"({percent(row['acceptance'], 0)} kept of {number(row.get('proposed_per_pass'), 0)} proposals per pass; "
        f"output {'identical' if row['identical'] else 'NOT identical'})"
        for row in best_draft_rows(result)
    ]
    return [
        "Each student drafts tokens that the teacher verifies in one batched evaluation: the output is the "
        "teacher's own (greedy, token for token), only faster or slower. Measured on this host, same process and "
        "threads, the report's sample prompts.",
        "",
        speculative_markdown(result),
        "",
        *best,
    ]


def _draft_artifacts(upstream: Upstream, teacher: Artifact | None) -> list[Artifact]:
    """Each student's first GGUF quantization (q8_0 by default), as drafts of the teacher's GGUF. Parity is not
    required: a draft cannot change the teacher's output, only its speed."""
    if teacher is None or teacher.format != "gguf":
        return []
    drafts: dict[str, Artifact] = {}
    for artifact in upstream.record("export", ExportRecord).artifacts:
        if artifact.label != "teacher" and artifact.format == "gguf":
            drafts.setdefault(artifact.label, artifact)
    return list(drafts.values())


def _teacher_artifact(artifacts: list[Artifact]) -> Artifact | None:
    """The bench's --teacher: the teacher's GGUF when there is one, else its first artifact."""
    teachers = [a for a in artifacts if a.label == "teacher"]
    return next((a for a in teachers if a.format == "gguf"), teachers[0] if teachers else None)


# ------------------------------------------------------------------------------------------------ report part
def seed_speedup(klass: int | None) -> str:
    return f"{SEED_SPEEDUP[klass]:g}x" if klass in SEED_SPEEDUP else MISSING


def seed_memory(klass: int | None) -> str:
    if klass not in SEED_MEMORY_MB:
        return MISSING
    return f"~{SEED_MEMORY_MB[klass]:g} MB, {SEED_HARDWARE[klass]}"


def _mean(stat: Any) -> float | None:
    return stat.get("mean") if isinstance(stat, dict) else stat


def _split_label(label: str) -> tuple[str, str]:
    name, _, quant = label.rpartition(" ")
    return (name, quant) if name else (label, "")


def _is_teacher(row: dict[str, Any]) -> bool:
    """The teacher's rows: the bench's --teacher artifact and the pipeline's other teacher artifacts."""
    return row.get("role") == "teacher" or _split_label(row["label"])[0] == "teacher"


def _speed_cells(row: dict[str, Any], base: dict[str, Any] | None, teacher_params: int) -> list[str]:
    decode = _mean(row["decode_tps"])
    speedup = decode / _mean(base["decode_tps"]) if base and row is not base and decode else None
    projection = row.get("projection") or {}
    return [
        _split_label(row["label"])[0],
        f"{row['format']} {row['quantization']}",
        str(row["threads"]),
        number(row["parameters"] / 1e6, 1, " M"),
        number(decode, 1),
        "1x (reference)" if row is base else number(speedup, 2, "x") if speedup else MISSING,
        number(_mean(row["prefill_tps"]), 0),
        number(_mean(row["ttft_ms"]), 1),
        percent(row.get("bound_share"), 0),
        number(projection.get("decode_tps"), 1) + (" (projection)" if projection else ""),
        "1x" if _is_teacher(row) else seed_speedup(size_class(teacher_params, row["parameters"])),
    ]


def speed_table(bench: dict[str, Any]) -> str:
    """Seed table 2: decode speed and speed-up against the teacher's artifact of the same format and threads."""
    rows = bench.get("rows", [])

    def same_artifact(r: dict[str, Any]) -> tuple[str, str, int]:
        return r["format"], r["quantization"], r["threads"]

    teacher = {same_artifact(r): r for r in rows if _is_teacher(r)}
    teacher_params = next((r["parameters"] for r in teacher.values()), 0)
    ordered = sorted(rows, key=lambda r: (*same_artifact(r), -r["parameters"]))
    cells = [_speed_cells(r, teacher.get(same_artifact(r)), teacher_params) for r in ordered]
    target = next((r["projection"]["target"] for r in rows if r.get("projection")), None)
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
    return markdown_table(headers, cells)


def memory_table(bench: dict[str, Any]) -> str:
    """Seed table 3: file size and measured peak memory of each artifact, beside the seed's memory claims."""
    rows = bench.get("rows", [])
    teacher_params = next((r["parameters"] for r in rows if _is_teacher(r)), 0)
    peaks: dict[tuple[str, str, str], dict[str, Any]] = {}  # one line per artifact: its largest peak over threads
    for row in sorted(rows, key=lambda r: (-r["parameters"], r["format"], r["quantization"])):
        key = (row["label"], row["format"], row["quantization"])
        if key not in peaks or row["peak_rss_mb"] > peaks[key]["peak_rss_mb"]:
            peaks[key] = row
    cells = [
        [
            _split_label(peak["label"])[0],
            f"{peak['format']} {peak['quantization']}",
            number(peak["parameters"] / 1e6, 1, " M"),
            number(peak["file_bytes"] / 1e6, 1),
            number(peak["peak_rss_mb"], 0),
            number(peak["model_rss_mb"], 0),
            seed_memory(size_class(teacher_params, peak["parameters"])),
        ]
        for peak in peaks.values()
    ]
    headers = [
        "model",
        "artifact",
        "parameters",
        "file MB",
        "peak RSS MB (whole process)",
        "peak RSS MB above the pre-load baseline",
        "seed's memory and minimum hardware",
    ]
    return markdown_table(headers, cells)


def hardware_lines(bench: dict[str, Any]) -> list[str]:
    """What the measured memory and speed say about the seed's "minimum hardware" column."""
    rows = [r for r in bench.get("rows", []) if r.get("peak_rss_mb")]
    lines = []
    teacher_rows = [r for r in rows if _is_teacher(r)]
    if teacher_rows:
        fastest = max(teacher_rows, key=lambda r: _mean(r["decode_tps"]) or 0)
        leanest = min(teacher_rows, key=lambda r: r["peak_rss_mb"])
        projection = fastest.get("projection") or {}
        projected = (
            f"; **projection** for {projection['target']}: {number(projection['decode_tps'], 0)} tokens/s"
            if projection
            else ""
        )
        lines.append(
            f'- The seed lists "GPU / high-end CPU" as the teacher\'s minimum hardware. Here the '
            f"{number(fastest['parameters'] / 1e6, 0)}M-parameter teacher decodes "
            f"{number(_mean(fastest['decode_tps']), 0)} tokens/s on {fastest['threads']} CPU threads of this host "
            f"({fastest['format']} {fastest['quantization']}) and needs {number(leanest['peak_rss_mb'], 0)} MB at "
            f"peak ({leanest['format']} {leanest['quantization']}){projected}. At this size no GPU is needed: that "
            "part of the seed's table is **refuted** for this teacher."
        )
    onnx = [r for r in rows if r["format"] == "onnx"]
    if onnx and any(r["format"] == "gguf" for r in rows):
        ratio = max(r["peak_rss_mb"] / r["file_bytes"] * 1e6 for r in onnx)
        lines.append(
            f"- ONNX artifacts peak at up to {number(ratio, 1)}x their file size (onnxruntime holds the weights in its "
            "own memory, and the runtime rewrites the graph at load time); GGUF files are memory-mapped and peak "
            "near their file size. On a 1-2 GB board, prefer GGUF."
        )
    return lines


def claims_lines(bench: dict[str, Any]) -> list[str]:
    """The claims the bench checked (bench.json's ``claims``): one sentence per claim, then the table."""
    claims = bench.get("claims") or []
    if not claims:
        return [*_verdict_lines(claims, bench), "", "(not checked: the bench stage has not run)"]
    rows = [[c["claim"], str(c["seed"]), claim_value(c), f"**{c['verdict']}**", c.get("note", "")] for c in claims]
    return [*_verdict_lines(claims, bench), "", markdown_table(["claim", "seed", "measured", "verdict", "how"], rows)]


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
            "- Retention (teacher bits per byte ÷ student bits per byte, through the runtime) is measured on "
            "students trained with this run's budget (section 1): a refutation says that *these* students keep that "
            "little of the teacher's quality, not what a longer run would reach."
        )
    return lines


def _plots(layout: Layout) -> list[str]:
    directory = layout.path(BENCH)
    names = sorted(p.name for p in directory.glob("*.png")) if directory.is_dir() else []
    return [f"![{name}]({BENCH}/{name})" for name in names]
