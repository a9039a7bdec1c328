"""`edgedistill pipeline` end to end on a tiny in-process teacher: every stage's outputs and the report's tables."""

from __future__ import annotations

import json

import pytest
from pipeline_helpers import tiny_pipeline_settings

from edgedistill.cli import main
from edgedistill.errors import EdgeDistillError
from edgedistill.pipeline import STAGES, PipelineConfig, run_pipeline


def _config(tmp_path, tiny_teacher, text_data, **overrides) -> PipelineConfig:
    return PipelineConfig(**tiny_pipeline_settings(tmp_path, tiny_teacher, text_data, **overrides))


@pytest.mark.slow
def test_pipeline_runs_every_stage_and_reports_the_seed_tables(tmp_path, tiny_teacher, text_data, capsys):
    config = _config(tmp_path, tiny_teacher, text_data)
    report = run_pipeline(config)
    run = tmp_path / "run"
    state = json.loads((run / "pipeline.json").read_text())
    assert [s for s in STAGES if state["stages"][s]["status"] == "done"] == list(STAGES)
    # teacher: the cache and the teacher's held-out perplexity
    assert json.loads((run / "teacher" / "cache" / "manifest.json").read_text())["complete"]
    teacher_eval = json.loads((run / "teacher" / "heldout_eval.json").read_text())
    assert teacher_eval["perplexity"] > 1 and teacher_eval["parameters"] > 0
    assert teacher_eval["bits_per_byte"] > 0 and teacher_eval["outside"]["bits_per_byte"] > 0
    # distill: every student derived by pruning (s16 from the distilled s32: the chain), then trained three ways
    # with the same steps: derived + KD, derived + CE only, random init + CE only
    derived = {
        name: json.loads((run / "students" / f"{name}-derived" / "prune.json").read_text()) for name in ("s32", "s16")
    }
    assert derived["s32"]["source"]["spec"] == str(tiny_teacher)
    assert derived["s16"]["source"]["spec"] == str(run / "students" / "s32-kd")
    for name in ("s32", "s16"):
        for kind, alpha, init in (("kd", 0.5, True), ("ce", 1.0, True), ("random", 1.0, False)):
            summary = json.loads((run / "students" / f"{name}-{kind}" / "train_summary.json").read_text())
            assert summary["config"]["alpha"] == alpha and summary["train"]["steps"] == 4
            assert (summary["student"]["derived"] is not None) == init
            assert summary["heldout"]["bits_per_byte"] > 0 and summary["outside"]["bits_per_byte"] > 0
    # export: teacher and distilled students, GGUF and ONNX, parity recorded
    artifacts = state["stages"]["export"]["outputs"]["artifacts"]
    assert {(a["label"], a["format"]) for a in artifacts} == {
        (label, fmt) for label in ("teacher", "s32-kd", "s16-kd") for fmt in ("gguf", "onnx")
    }
    # bench: one row per artifact, with quality and a Pi 5 projection
    bench = json.loads((run / "bench" / "bench.json").read_text())
    assert len(bench["rows"]) == len(artifacts)
    assert all(r["decode_tps"]["mean"] > 0 and "quality" in r for r in bench["rows"])
    assert all(r["projection"]["target"] == "rpi5" for r in bench["rows"])
    # bench: the teacher's GGUF drafted by each student's GGUF (trimmed vocabularies, mapped by token bytes)
    drafts = {r["draft"] for r in bench["speculative"]["rows"]}
    assert drafts == {"s32-kd-q8_0", "s16-kd-q8_0"}
    # a tiny model's few decode tokens can be too quick for the clock: the bench says None then, never 0 or less
    assert all(
        r["identical"] and (r["decode_tps"] is None or r["decode_tps"] > 0) for r in bench["speculative"]["rows"]
    )
    # report: the seed's three tables, claims, samples
    text = report.read_text()
    for heading in (
        "## 1. Size and quality before and after distillation",
        "## 2. Speed against the teacher",
        "## 2b. The teacher accelerated by its students",
        "## 3. Memory and minimum hardware",
        "## Claims of the seed document",
        "## Sample generations",
    ):
        assert heading in text
    quality_rows = [line for line in text.splitlines() if line.startswith("| s32 ") or line.startswith("| s16 ")]
    assert len(quality_rows) >= 4  # table 1 and the derivations
    assert "bits/byte, random init + CE" in text and "How each student was derived" in text
    assert "projection" in text and any(v in text for v in ("confirmed", "refuted", "not measured"))
    samples = json.loads((run / "samples.json").read_text())
    assert set(samples["models"]) == {"teacher", "s32-kd", "s16-kd"}

    # a rerun skips every finished stage; a changed bench setting redoes bench and report only
    capsys.readouterr()
    run_pipeline(config)
    assert capsys.readouterr().err.count("skipped") == len(STAGES)
    changed = _config(tmp_path, tiny_teacher, text_data, bench_gen_tokens=5)
    run_pipeline(changed)
    log = capsys.readouterr().err
    assert "teacher: finished earlier" in log and "export: finished earlier" in log
    assert "bench: settings changed" in log and "report: settings changed" in log


def test_pipeline_config_file_flags_and_full(tmp_path):
    config_file = tmp_path / "p.toml"
    config_file.write_text('students = ["tiny"]\nsteps = 7\nbench_threads = [1, 2]\n')
    config = PipelineConfig.from_sources(str(config_file), {"steps": 9, "full": None})
    assert config.students == ["tiny"] and config.steps == 9 and config.bench_threads == [1, 2]
    full = PipelineConfig.from_sources(str(config_file), {"full": True})
    assert full.steps == 7  # the file beats --full's budget; --full fills the rest:
    assert (full.train_tokens, full.heldout_tokens, full.bench_draft_tokens) == (131072, 32768, [1, 2, 4])
    (tmp_path / "bad.toml").write_text('steps = "many"\n')
    with pytest.raises(EdgeDistillError, match="bad.toml: steps: expected a int"):
        PipelineConfig.from_sources(str(tmp_path / "bad.toml"), {})
    (tmp_path / "unknown.toml").write_text("stepz = 3\n")
    with pytest.raises(EdgeDistillError, match="unknown setting 'stepz'"):
        PipelineConfig.from_sources(str(tmp_path / "unknown.toml"), {})
    assert PipelineConfig.from_sources(None, {}).fingerprint("bench") != full.fingerprint("bench")


def test_bench_threads_above_the_cpus_here_are_not_measured(monkeypatch, capsys):
    from edgedistill.stages import bench

    monkeypatch.setattr("edgedistill.system.available_cpus", lambda: [0, 1])
    assert bench._threads_here([1, 2, 4]) == [1, 2]
    assert "threads 4 not measured: 2 CPUs available here" in capsys.readouterr().err
    assert bench._threads_here([4, 8]) == [4]  # none fits: the smallest, oversubscribed (the bench notes it)
    with pytest.raises(EdgeDistillError, match="bench_draft_tokens: expected a list of integers from 1 to"):
        PipelineConfig.from_sources(None, {"bench_draft_tokens": [0]})


def test_pipeline_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path / "r"), "--stages", "train"]) == 2
    assert "unknown stage 'train'" in capsys.readouterr().err
    assert main(["pipeline", "--out", str(tmp_path / "r"), "--alpha", "1.0"]) == 2
    assert "alpha" in capsys.readouterr().err
    assert main(["pipeline", "--out", str(tmp_path / "r2"), "--stages", "bench"]) == 2
    assert "has not finished" in capsys.readouterr().err
