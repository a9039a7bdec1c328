"""The stage registry: a stage is one definition plus one registration; report.md is assembled from the stages'
sections; the report and the bench share one definition of size classes, one source of claims and one number style."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from bench_helpers import make_result, make_row
from pipeline_helpers import student_shape, tiny_pipeline_settings

from edgedistill.bench import claims as bench_claims
from edgedistill.bench.claims import MISSING, number, percent, size_bucket
from edgedistill.bench.report import markdown_tables
from edgedistill.config import setting
from edgedistill.errors import EdgeDistillError
from edgedistill.pipeline import STAGES, PipelineConfig, run_pipeline
from edgedistill.report import assemble, write_report
from edgedistill.stages import DEFAULT, Layout, Record, Registry, Section, Stage, Upstream
from edgedistill.stages.base import NoSettings, write_json
from edgedistill.stages.bench import BenchStage, memory_table, seed_memory, seed_speedup, speed_table
from edgedistill.stages.distill import DistillRecord, StudentRun
from edgedistill.stages.export import Artifact, ExportRecord, Parity
from edgedistill.stages.teacher import CacheInfo, TeacherEval, TeacherRecord

TEACHER = 100_000_000


# ------------------------------------------------------------------------------------------- a toy stage
@dataclass
class ToySettings:
    toy_greeting: str = setting("hello toy", "what the toy stage writes")


@dataclass
class ToyRecord(Record):
    path: str
    words: int


class ToyStage(Stage[ToySettings, ToyRecord]):
    """The whole definition of a stage: settings, record, outputs, run and its line of the report."""

    name = "toy"
    settings = ToySettings
    record = ToyRecord
    outputs = ("toy",)

    def run(self, settings: ToySettings, upstream: Upstream) -> ToyRecord:
        path = upstream.layout.path("toy") / "greeting.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(settings.toy_greeting + "\n")
        return ToyRecord(path=str(path), words=len(settings.toy_greeting.split()))

    def report(self, upstream: Upstream) -> list[Section]:
        if self.name not in upstream.records:
            return []
        record = upstream.record(self.name, ToyRecord)
        return [Section(45, "Toy", [f"The toy stage wrote {record.words} words to `toy/greeting.txt`."])]


class ToyReportStage(Stage[NoSettings, Record]):
    """A report stage without the real one's samples (those need exported models)."""

    name = "report"
    settings = NoSettings
    record = ToyRecord
    outputs = ("report.md",)

    def run(self, settings: NoSettings, upstream: Upstream) -> ToyRecord:
        return ToyRecord(path=str(write_report(upstream)), words=0)


def _lines_with(text: str, fragment: str) -> list[str]:
    return [line for line in text.splitlines() if fragment in line]


# ------------------------------------------------------------------------------------------- the registry
def test_a_toy_stage_runs_through_its_own_registry_resumes_and_reports(tmp_path, capsys):
    registry = Registry([ToyStage(), ToyReportStage()])
    config = registry.config_class(out=str(tmp_path / "run"))
    report = run_pipeline(config, registry=registry)
    assert (tmp_path / "run" / "toy" / "greeting.txt").read_text() == "hello toy\n"
    text = report.read_text()
    assert "## Toy\n\nThe toy stage wrote 2 words to `toy/greeting.txt`." in text
    assert text.index("## Toy") < text.index("## Stages")
    state = json.loads((tmp_path / "run" / "pipeline.json").read_text())
    assert state["stages"]["toy"]["outputs"] == {"path": str(tmp_path / "run" / "toy" / "greeting.txt"), "words": 2}
    assert "toy_greeting = " in (tmp_path / "run" / "pipeline.toml").read_text()

    capsys.readouterr()
    run_pipeline(config, registry=registry)
    assert capsys.readouterr().err.count("finished earlier with the same settings, skipped") == 2
    changed = registry.config_class(out=str(tmp_path / "run"), toy_greeting="three words here")
    with pytest.raises(EdgeDistillError, match="stage 'toy' has not finished with these settings"):
        run_pipeline(changed, ["report"], registry=registry)
    run_pipeline(changed, registry=registry)
    log = capsys.readouterr().err
    assert "toy: settings changed since its last run; redoing it" in log and "report: settings changed" in log
    assert "wrote 3 words" in report.read_text()


def test_a_stage_setting_is_a_flag_a_toml_key_and_part_of_the_fingerprints(tmp_path):
    registry = DEFAULT.with_stage(ToyStage(), before="report")
    assert registry.names == ("teacher", "distill", "export", "bench", "toy", "report")
    parser = argparse.ArgumentParser()
    registry.config_class.add_flags(parser)
    assert "what the toy stage writes" in parser.format_help()
    (tmp_path / "p.toml").write_text('toy_greeting = "from the file"\nsteps = 3\n')
    config = registry.config_class.from_sources(str(tmp_path / "p.toml"), {})
    assert config.toy_greeting == "from the file" and config.steps == 3
    other = registry.config_class.from_sources(str(tmp_path / "p.toml"), {"toy_greeting": "a flag"})
    assert [s for s in registry.names if config.fingerprint(s) != other.fingerprint(s)] == ["toy", "report"]
    # the default is a value nobody changed: no toy stage, no toy setting
    assert DEFAULT.names == STAGES == ("teacher", "distill", "export", "bench", "report")
    assert "toy_greeting" not in {f.name for f in dataclasses.fields(PipelineConfig)}
    with pytest.raises(EdgeDistillError, match="unknown setting 'toy_greeting'"):
        PipelineConfig.from_sources(str(tmp_path / "p.toml"), {})


def test_the_registry_refuses_clashing_stages():
    with pytest.raises(ValueError, match="stage 'toy' is registered twice"):
        Registry([ToyStage(), ToyStage()])

    class Clash(ToyStage):
        name = "clash"

    with pytest.raises(ValueError, match="setting 'toy_greeting' is declared by both ToySettings and ToySettings"):
        Registry([ToyStage(), Clash()])

    class Steal(ToyStage):
        full_budget = {"steps": 5}

    with pytest.raises(ValueError, match="full_budget sets 'steps'"):
        DEFAULT.with_stage(Steal(), before="report")


def test_the_default_fingerprints_are_pinned():
    """A stage's keys and fingerprint change only on purpose: a change redoes that stage (and the later ones) in every
    existing run directory. Last changed when the derived students got learning rates of their own (distill's
    student_lr)."""
    assert DEFAULT.stage_keys() == {
        "teacher": ("teacher", "data", "seq_len", "top_k", "train_tokens", "heldout_tokens"),
        "distill": (
            "students",
            "init",
            "chain",
            "vocab",
            "steps",
            "batch_size",
            "alpha",
            "temperature",
            "lr",
            "student_lr",
            "random_lr",
            "warmup_steps",
            "freeze_embeddings",
            "calibration",
            "probe_steps",
            "candidates",
            "seed",
        ),
        "export": ("gguf_quants", "onnx_quants"),
        "bench": (
            "bench_threads",
            "bench_prompt_tokens",
            "bench_gen_tokens",
            "bench_repeat",
            "bench_warmup",
            "bench_target",
            "quality_tokens",
            "bench_drafts",
            "bench_draft_tokens",
            "bench_methods",
        ),
        "report": ("sample_prompts", "sample_tokens"),
    }
    config = PipelineConfig()
    assert {s: config.fingerprint(s) for s in STAGES} == {
        "teacher": "b54eaa67d752a100",
        "distill": "3872c537711d7d6b",
        "export": "ce3d569806dd90e4",
        "bench": "3531410502eeeaeb",
        "report": "e2870e3b811d1c5c",
    }


def test_every_pipeline_setting_has_its_help_beside_it():
    fields = dataclasses.fields(PipelineConfig)
    assert len(fields) == 42
    assert [f.name for f in fields if not f.metadata.get("help")] == []


def test_records_round_trip_through_pipeline_json():
    evaluation = TeacherEval("t", "/t", 10, 64, 5.0, 148.4, 1.5)
    assert "cache" not in TeacherRecord(None, evaluation).to_dict()  # top_k = 0: as before the registry
    records = [
        TeacherRecord(CacheInfo("/c", 100, 8, 1e3, "torch"), evaluation),
        TeacherRecord(None, evaluation),
        DistillRecord({"s-kd": StudentRun("/s", "s.json", True, 0.5, 1000, {"perplexity": 9.0}, 2.0)}),
        ExportRecord([Artifact("teacher", "gguf", "q8_0", "/a.gguf", 10, 5, True, Parity(0.01, 1.0, True, True))]),
    ]
    for record in records:
        stored = json.loads(json.dumps(record.to_dict()))
        assert type(record).from_dict(stored) == record


# ------------------------------------------------------------------------------------------- report.md
def test_sections_are_sorted_and_a_shared_heading_is_joined():
    lines = assemble(
        [
            Section(60, "Plots", ["bench plot"]),
            Section(1, None, ["second paragraph"]),
            Section(61, "Plots", ["loss curve"]),
            Section(0, None, ["first paragraph"]),
            Section(10, "1. Table", ["a table"]),
        ]
    )
    expected = "# edgedistill pipeline report\n\nfirst paragraph\n\nsecond paragraph\n\n## 1. Table\n\na table\n\n"
    assert "\n".join(lines) == expected + "## Plots\n\nbench plot\nloss curve"


def _bench_with(ratios: list[float]) -> dict:
    rows = [make_row("teacher q8_0", TEACHER, 100.0, role="teacher", peak_mb=400.0)]
    rows += [make_row(f"s{r:g}-kd q8_0", int(TEACHER / r), 100.0 * r, peak_mb=100.0) for r in ratios]
    result = make_result(rows)
    result["claims"] = bench_claims.check_claims(result)
    return result


def _column(table: str, model: str, column: int) -> str:
    return next(line for line in table.splitlines() if line.startswith(f"| {model} ")).split(" | ")[column].strip(" |")


def test_the_report_size_classes_are_the_bench_buckets():
    ratios = [1.2, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 30.0]
    bench = _bench_with(ratios)
    speed, memory = speed_table(bench), memory_table(bench)
    for ratio in ratios:
        bucket = size_bucket(ratio)
        assert _column(speed, f"s{ratio:g}-kd", 10) == seed_speedup(bucket), ratio
        assert _column(memory, f"s{ratio:g}-kd", 6) == seed_memory(bucket), ratio
    # the example: a 2x student was "4x class" in the report and in no bucket for the claims
    assert _column(speed, "s2-kd", 10) == MISSING and _column(memory, "s2-kd", 6) == MISSING
    assert not any(c.get("model") == "s2-kd q8_0" for c in bench["claims"])
    import edgedistill.stages.distill as distill_stage

    assert distill_stage.size_class is bench_claims.size_class  # table 1 uses the same definition


def test_the_report_takes_the_claims_bench_json_holds(tmp_path, monkeypatch):
    bench = _bench_with([4.0])
    bench["claims"][0]["note"] = "written by the bench"
    write_json(tmp_path / "bench" / "bench.json", bench)

    def refuse(result):
        raise AssertionError("the report must not check the claims again")

    monkeypatch.setattr(bench_claims, "check_claims", refuse)
    upstream = Upstream(Layout(tmp_path), PipelineConfig(out=str(tmp_path)), {}, DEFAULT.stages)
    sections = {s.heading: s.lines for s in BenchStage().report(upstream)}
    assert "written by the bench" in "\n".join(sections["Claims of the seed document"])


MIXED_STYLE = [
    re.compile(r"\d%"),  # 10.4% beside 10.4 %
    re.compile(r"\| - \|"),  # - beside — for a missing value
    re.compile(r"\| -$", re.M),
]


def test_one_number_style_in_the_bench_and_the_report_parts(tmp_path):
    assert (percent(0.104), percent(0.005), percent(1.0, 0), percent(None)) == ("10.4 %", "0.50 %", "100 %", MISSING)
    assert (number(1234.56), number(float("nan")), number(3.2, 2, "x")) == ("1,234.6", MISSING, "3.20x")
    bench = _bench_with([4.0, 8.0, 16.0])
    bench["rows"][1]["bound_share"] = None  # a value that could not be computed
    bench["rows"][2]["quality"] = {
        "perplexity": 12.0,
        "bits_per_byte": 1.25,
        "top1_accuracy": 0.3,
        "tokens": 64,
        "agreement": None,
        "retention": 0.8,
        "accuracy_ratio": 0.75,
    }
    write_json(tmp_path / "bench" / "bench.json", bench)
    upstream = Upstream(Layout(tmp_path), PipelineConfig(out=str(tmp_path)), {}, DEFAULT.stages)
    text = markdown_tables(bench) + "\n".join(line for s in BenchStage().report(upstream) for line in s.lines)
    for pattern in MIXED_STYLE:
        assert not pattern.search(text), pattern.search(text)
    assert MISSING in text and " %" in text


# ------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_a_toy_stage_added_to_the_real_pipeline(tmp_path, tiny_teacher, text_data, capsys):
    registry = DEFAULT.with_stage(ToyStage(), before="report")
    students = [student_shape(tmp_path / "s16.json", 16, 1)]
    values = tiny_pipeline_settings(tmp_path, tiny_teacher, text_data, students=students, steps=2, onnx_quants=[])
    report = run_pipeline(registry.config_class(**values), registry=registry)
    text = report.read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    assert headings == [
        "## 1. Size and quality before and after distillation",
        "## 2. Speed against the teacher",
        "## 2b. The teacher accelerated by its students",
        "## 3. Memory and minimum hardware",
        "## Exported artifacts and their parity with PyTorch",
        "## Toy",
        "## Claims of the seed document",
        "## Plots",
        "## Sample generations",
        "## The bench's own tables",
        "## Stages",
    ]
    assert _lines_with(text, "The toy stage wrote 2 words")
    assert (tmp_path / "run" / "toy" / "greeting.txt").is_file()
    assert _lines_with(text, "| toy | done |")
    for pattern in MIXED_STYLE:
        assert not pattern.search(text), pattern.search(text)
    # the claims in report.md are bench.json's
    bench = json.loads((tmp_path / "run" / "bench" / "bench.json").read_text())
    for claim in bench["claims"]:
        assert claim["note"] in text

    capsys.readouterr()
    run_pipeline(registry.config_class(**values, toy_greeting="bye"), registry=registry)
    log = capsys.readouterr().err
    assert all(f"{s}: finished earlier" in log for s in ("teacher", "distill", "export", "bench"))
    assert "toy: settings changed" in log and "report: settings changed" in log
    assert _lines_with(report.read_text(), "The toy stage wrote 1 words")


def test_the_stages_package_imports_on_its_own():
    """The registry builds the pipeline config class at import time: that must not depend on import order."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import edgedistill.stages"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


# ------------------------------------------------------------------------------------------- distill's tasks
def test_the_distill_stage_schedules_the_chain_first_and_each_student_its_own_lr(tmp_path):
    from edgedistill.stages.distill import DistillStage, _critical_first, _tasks

    config = PipelineConfig(out=str(tmp_path), students=["small", "tiny", "nano"], student_lr=["nano=0.003"])
    upstream = Upstream(Layout(tmp_path), config, {}, DEFAULT.stages)
    tasks = _tasks(upstream.settings(DistillStage.settings), upstream)
    graph = {t.name: t.after for t in tasks}
    assert [t.name for t in tasks[:4]] == ["small-derived", "small-kd", "small-ce", "small-random"]
    assert graph["small-derived"] == () and graph["small-random"] == ()  # nothing to wait for
    assert graph["tiny-derived"] == ("small-kd",) and graph["nano-derived"] == ("tiny-kd",)  # the chain
    assert graph["tiny-kd"] == graph["tiny-ce"] == ("tiny-derived",)
    ordered = [t.name for t in sorted(tasks, key=_critical_first(tasks))]  # what two workers take first
    assert ordered[:5] == ["small-derived", "small-kd", "tiny-derived", "tiny-kd", "nano-derived"]
    rates = {t.name: t.config.lr for t in tasks if t.kind == "train"}
    assert rates["small-kd"] == rates["tiny-ce"] == 1.5e-3 and rates["nano-kd"] == rates["nano-ce"] == 3e-3
    assert rates["nano-random"] == config.random_lr
    unchained = Upstream(Layout(tmp_path), PipelineConfig(out=str(tmp_path), chain=False), {}, DEFAULT.stages)
    tasks = _tasks(unchained.settings(DistillStage.settings), unchained)
    assert all(t.after == () for t in tasks if t.kind == "prune")
    with pytest.raises(EdgeDistillError, match="student_lr: expected label=lr"):
        PipelineConfig(out=str(tmp_path), student_lr=["nano:0.003"])


def test_a_failed_run_in_a_worker_stops_the_stage_with_its_one_line_error(
    tmp_path, tiny_teacher, text_data, tiny_shape
):
    from edgedistill.distill.config import TrainConfig
    from edgedistill.stages.distill import Task, resolve_workers, run_tasks

    assert resolve_workers(3, "cpu") == 3 and resolve_workers(0, "cuda") == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    tasks = [
        Task(
            f"run-{i}",
            "train",
            TrainConfig(
                out=str(tmp_path / f"run-{i}"),
                teacher=str(tiny_teacher),
                student=str(tiny_shape),
                data=[str(data)],
                steps=1,
                batch_size=2,
                seq_len=16,
            ),
            "tiny",
        )
        for i, data in enumerate((text_data, bad))
    ]
    with pytest.raises(EdgeDistillError, match="bad.jsonl:2"):
        run_tasks(tasks, 2, 2)
    assert (tmp_path / "run-0" / "train_summary.json").is_file()  # the other worker's run finished


def test_exports_run_in_two_workers_and_come_back_in_the_jobs_order(tmp_path, tiny_teacher):
    from edgedistill.stages.export import _export_all

    jobs = [(f"model-{i}", str(tiny_teacher), "gguf", ["q8_0"], tmp_path / f"model-{i}") for i in range(2)]
    artifacts = _export_all(jobs, 2, 2)
    assert [(a.label, a.format, a.quantization) for a in artifacts] == [
        ("model-0", "gguf", "q8_0"),
        ("model-1", "gguf", "q8_0"),
    ]
    assert all(Path(a.path).is_file() and a.bytes == Path(a.path).stat().st_size for a in artifacts)
    missing = ("missing", str(tmp_path / "no-such-model"), "gguf", ["q8_0"], tmp_path / "missing")
    with pytest.raises(EdgeDistillError, match="no-such-model"):
        _export_all([missing, jobs[0]], 2, 2)
