"""Stage ``export``: the teacher and the distilled students to GGUF and ONNX in the configured quantizations, each
checked against PyTorch (the students' CE-only twins are not exported: their speed and memory are those of the same
shape). Its part of the report: every exported file with its parity figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedistill.bench.claims import number, percent
from edgedistill.bench.report import markdown_table
from edgedistill.config import setting
from edgedistill.errors import EdgeDistillError
from edgedistill.stages.base import Record, Section, Stage, Upstream, check_strings, log
from edgedistill.stages.distill import DistillSettings, resolve_workers, student_dir, worker_pool
from edgedistill.stages.teacher import TeacherSettings

EXPORT = "export"
PARITY_KEYS = ("max_logit_diff", "top1_agreement", "greedy_equal", "passed")


@dataclass
class ExportSettings:
    gguf_quants: list[str] = setting(factory=lambda: ["q8_0", "q4_k_m"], help="GGUF quantizations to export")
    onnx_quants: list[str] = setting(factory=lambda: ["int8"], help="ONNX quantizations to export")

    def __post_init__(self) -> None:
        check_strings(self, "gguf_quants", "onnx_quants")
        if not self.gguf_quants and not self.onnx_quants:
            raise EdgeDistillError("gguf_quants, onnx_quants: expected at least one quantization to export")


@dataclass
class Parity:
    """The export's check of one artifact against PyTorch (from its manifest)."""

    max_logit_diff: float | None = None
    top1_agreement: float | None = None
    greedy_equal: bool | None = None
    passed: bool | None = None


@dataclass
class Artifact:
    label: str  # "teacher" or a distilled student's directory name (s32-kd)
    format: str  # gguf or onnx
    quantization: str
    path: str
    bytes: int
    parameters: int
    passed: bool
    parity: Parity = field(default_factory=Parity)


@dataclass
class ExportRecord(Record):
    artifacts: list[Artifact]


class ExportStage(Stage[ExportSettings, ExportRecord]):
    name = "export"
    settings = ExportSettings
    record = ExportRecord
    outputs = (EXPORT,)

    def run(self, settings: ExportSettings, upstream: Upstream) -> ExportRecord:
        models = {"teacher": upstream.settings(TeacherSettings).teacher}
        for student in upstream.settings(DistillSettings).students:
            distilled = student_dir(upstream.layout, student, True)
            models[distilled.name] = str(distilled)
        jobs = [
            (label, model, fmt, quants, upstream.layout.path(EXPORT) / label / fmt)
            for label, model in models.items()
            for fmt, quants in (("gguf", settings.gguf_quants), ("onnx", settings.onnx_quants))
            if quants
        ]
        workers = resolve_workers(upstream.run.workers, upstream.run.device)
        return ExportRecord(artifacts=_export_all(jobs, workers, upstream.run.threads))

    def report(self, upstream: Upstream) -> list[Section]:
        artifacts = upstream.record(self.name, ExportRecord).artifacts if self.name in upstream.records else []
        return [Section(40, "Exported artifacts and their parity with PyTorch", artifact_lines(artifacts))]


def _export_all(jobs: list[tuple[str, str, str, list[str], Path]], workers: int, threads: int) -> list[Artifact]:
    """The artifacts of every ``(label, model, format, quantizations, out)`` job, in the jobs' order: one job after
    another (``workers`` 1), else ``workers`` at once, each in its own process on its share of ``threads`` and
    started in the jobs' order, the teacher's first. Much of an export runs on one thread (tracing, graph
    rewrites, file writes), so two at once on 2 cores shorten the stage; a failed job stops it with its error."""
    if workers <= 1 or len(jobs) <= 1:
        return [artifact for job in jobs for artifact in _export(*job, threads)]
    pool, share = worker_pool(workers, threads)
    with pool:
        futures = [pool.submit(_export, *job, share) for job in jobs]
        try:
            return [artifact for future in futures for artifact in future.result()]
        except BaseException:
            for future in futures:  # the jobs not started yet; the running ones end first
                future.cancel()
            raise


def _export(label: str, model: str, fmt: str, quants: list[str], out: Path, threads: int) -> list[Artifact]:
    """``model`` exported to ``fmt`` in each of ``quants`` under ``out`` (what an earlier run exported is kept)."""
    from edgedistill.export.cli import export
    from edgedistill.export.recipe import ExportRecipe

    done = _manifest_records(out)
    if not all(q in done for q in quants):
        log(f"export: {label} -> {fmt} {','.join(quants)}")
        recipe = ExportRecipe(
            format=fmt, model=model, out=out, quant=list(quants), threads=threads, name=label, allow_mismatch=True
        )
        export(recipe)
        done = _manifest_records(out)
    return [
        Artifact(
            label=label,
            format=fmt,
            quantization=quant,
            path=str(out / done[quant]["path"]),
            bytes=done[quant]["bytes"],
            parameters=done[quant]["parameters"],
            passed=done[quant]["passed"],
            parity=Parity(**{k: done[quant]["parity"].get(k) for k in PARITY_KEYS}),
        )
        for quant in quants
    ]


def _manifest_records(out: Path) -> dict[str, dict[str, Any]]:
    """The export manifest's artifacts in ``out`` whose files exist, by quantization."""
    from edgedistill.export.manifest import read_manifest

    if not (out / "manifest.json").is_file():
        return {}
    records = read_manifest(out).get("artifacts", [])
    return {r["quantization"]: r for r in records if (out / r["path"]).exists()}


def artifact_lines(artifacts: list[Artifact]) -> list[str]:
    """Every exported file with its parity figures; a file that failed is named (and was not benchmarked)."""
    if not artifacts:
        return ["(the export stage has not run)"]
    rows = [
        [
            a.label,
            f"{a.format} {a.quantization}",
            number(a.bytes / 1e6, 1),
            number(a.parity.max_logit_diff, 3),
            percent(a.parity.top1_agreement),
            "yes" if a.parity.greedy_equal else "no",
            "passed" if a.passed else "**failed** (not benchmarked)",
        ]
        for a in artifacts
    ]
    headers = ["model", "artifact", "MB", "max logit difference", "top-1 agreement", "greedy text equal", "parity"]
    return [markdown_table(headers, rows)]
