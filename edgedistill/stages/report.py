"""Stage ``report``: sample generations of the teacher and each distilled student through the runtime, then
``report.md``, assembled from every stage's sections (:mod:`edgedistill.report`).

Its own part of the report: the preamble (when, where, what is measured and what is projected) and the samples."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from typing import Any

from edgedistill.bench.speculative import DEFAULT_PROMPTS  # the drafts are timed on the report's sample prompts
from edgedistill.config import setting
from edgedistill.stages.base import (
    REPORT,
    Layout,
    Record,
    Section,
    Stage,
    Upstream,
    check_strings,
    read_json,
    write_json,
)
from edgedistill.stages.bench import BenchSettings, bench_result
from edgedistill.stages.export import Artifact, ExportRecord

SAMPLES = "samples.json"


@dataclass
class ReportSettings:
    sample_prompts: list[str] = setting(
        factory=lambda: list(DEFAULT_PROMPTS), help="prompts of the sample generations in the report"
    )
    sample_tokens: int = setting(40, "new tokens per sample generation")

    def __post_init__(self) -> None:
        check_strings(self, "sample_prompts")


@dataclass
class ReportRecord(Record):
    report: str


class ReportStage(Stage[ReportSettings, ReportRecord]):
    name = "report"
    settings = ReportSettings
    record = ReportRecord
    outputs = (REPORT, SAMPLES)

    def run(self, settings: ReportSettings, upstream: Upstream) -> ReportRecord:
        from edgedistill.report import write_report

        artifacts = upstream.record("export", ExportRecord).artifacts
        threads = max(upstream.settings(BenchSettings).bench_threads)
        write_json(upstream.layout.path(SAMPLES), sample_generations(settings, artifacts, threads))
        return ReportRecord(report=str(write_report(upstream)))

    def report(self, upstream: Upstream) -> list[Section]:
        return [
            Section(0, None, [_generated_line(upstream.layout)]),
            Section(70, "Sample generations", samples_lines(read_json(upstream.layout.path(SAMPLES)))),
        ]


def _chosen_artifacts(artifacts: list[Artifact]) -> dict[str, Artifact]:
    """One artifact per model: GGUF q8_0 when exported, else the first that passed parity."""
    chosen: dict[str, Artifact] = {}
    for artifact in artifacts:
        if not artifact.passed:
            continue
        preferred = artifact.format == "gguf" and artifact.quantization == "q8_0"
        if artifact.label not in chosen or preferred:
            chosen[artifact.label] = artifact
    return chosen


def sample_generations(settings: ReportSettings, artifacts: list[Artifact], threads: int) -> dict[str, Any]:
    """Greedy continuations of ``settings.sample_prompts`` by the teacher and each distilled student, through the
    runtime on one artifact per model (GGUF q8_0 when exported, else the first that passed parity)."""
    from edgedistill.runtime import load

    samples: dict[str, Any] = {"prompts": list(settings.sample_prompts), "max_tokens": settings.sample_tokens}
    samples["models"] = {}
    for label, artifact in _chosen_artifacts(artifacts).items():
        with load(artifact.path, threads=threads) as model:
            outputs = [
                model.generate(prompt, max_tokens=settings.sample_tokens, temperature=0.0)
                for prompt in settings.sample_prompts
            ]
        samples["models"][label] = {
            "artifact": f"{artifact.format} {artifact.quantization}",
            "path": artifact.path,
            "outputs": outputs,
        }
    return samples


def _generated_line(layout: Layout) -> str:
    env = bench_result(layout).get("environment", {})
    host = env.get("cpu_model") or platform.processor() or "this host"
    return (
        f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} on {host} ({env.get('available_cpus', '?')} CPUs available); "
        f"settings in `{layout.config.name}`. Every number below was measured on this host by this run, except "
        "columns and lines marked **projection**, which scale this host's measured decode speed to a target's memory "
        "bandwidth; host timings are not Raspberry Pi or phone timings."
    )


def samples_lines(samples: dict[str, Any]) -> list[str]:
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
