"""``edgedistill pipeline``: teacher → students (with and without distillation) → GGUF/ONNX → bench → report.

The stages live in :mod:`edgedistill.stages`, one module each, and run in the order of the registry
(:data:`edgedistill.stages.registry.DEFAULT`), each recorded in ``OUT/pipeline.json``:

``teacher``
    the teacher's top-K cache over the (budget-limited) data, built once for every student (``top_k = 0``: the
    students run the teacher online instead), the teacher's own held-out perplexity, and the held-out text the bench
    measures quality on.
``distill``
    every student preset trained twice on the same data, budget and seed: with distillation (``alpha``) and
    without (alpha 1, cross-entropy only: the seed's "before distillation").
``export``
    the teacher and the distilled students to GGUF and ONNX in the configured quantizations, each checked against
    PyTorch (the students' CE-only twins are not exported: their speed and memory are those of the same shape).
``bench``
    every artifact measured on this host (latency, throughput, memory, quality through the runtime), with projections
    for a target profile, and the seed's claims checked.
``report``
    ``report.md``: the seed's three tables with measured numbers, plots, claims and sample generations, each stage
    writing its own sections.

:data:`PipelineConfig` is assembled from the stages' settings (each field one flag and one TOML key, its help text
beside it in the stage's module). A rerun skips each stage whose settings (its own and its predecessors') are
unchanged and that finished; a stage whose settings changed is redone from scratch, with the stages after it; an
interrupted stage resumes (training from its last checkpoint, the cache from its last shard). ``--stages`` runs a
subset.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgeDistillError
from edgedistill.stages.base import MANIFEST, Layout, PipelineSettings, RunSettings, Stage, Upstream, log, write_json
from edgedistill.stages.registry import DEFAULT, Registry

SCHEMA = 1
STAGES = DEFAULT.names
# The default pipeline's config class: RunSettings and every default stage's settings, flattened.
PipelineConfig = DEFAULT.config_class
FULL_BUDGET = dict(PipelineConfig.full_budget)

__all__ = ["MANIFEST", "SCHEMA", "STAGES", "FULL_BUDGET", "Layout", "PipelineConfig", "run_pipeline"]


def run_pipeline(config: PipelineSettings, stages: Sequence[str] | None = None, registry: Registry = DEFAULT) -> Path:
    """Run (or resume) the pipeline; returns the report's path.

    Args:
        config: an instance of ``registry.config_class`` (:data:`PipelineConfig` for the default stages).
        stages: the names of the stages to run (None: every stage that has not finished with these settings).
        registry: the stages and their order.
    """
    from edgedistill.files import claim

    if not isinstance(config, registry.config_class):
        raise TypeError(f"config: expected the registry's config class, got {type(config).__name__}")
    # One pipeline per directory at a time; the claim also sweeps the temporary files a killed run left at the top
    # level (each stage's command claims its own directory the same way).
    out = Path(config.part(RunSettings).out)
    with claim(out, "out") as claimed:
        return _run_stages(config, Layout(claimed), registry, list(stages) if stages else list(registry.names))


def _run_stages(config: PipelineSettings, layout: Layout, registry: Registry, wanted: list[str]) -> Path:
    unknown = [s for s in wanted if s not in registry.names]
    if unknown:
        raise EdgeDistillError(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(registry.names)}")
    state = _read_state(layout)
    from edgedistill.files import atomic_write_text

    atomic_write_text(layout.config, config.to_toml())
    stale = False  # once a stage is redone, every later stage is redone too
    for index, stage in enumerate(registry):
        record = state["stages"].get(stage.name, {})
        fingerprint = config.fingerprint(stage.name)
        finished = record.get("status") == "done" and record.get("fingerprint") == fingerprint and not stale
        if stage.name not in wanted:
            later = registry.names[index + 1 :]
            if not finished and any(s in wanted for s in later):
                raise EdgeDistillError(
                    f"--stages: stage {stage.name!r} has not finished with these settings; run it first "
                    "(or omit --stages)"
                )
            continue
        if finished:
            log(f"{stage.name}: finished earlier with the same settings, skipped")
            continue
        if record.get("fingerprint") not in (None, fingerprint) or (stale and record):
            log(f"{stage.name}: settings changed since its last run; redoing it")
            _remove_outputs(layout, stage)
        stale = True
        _run_stage(stage, config, layout, registry, state, fingerprint)
    return layout.report


def _run_stage(
    stage: Stage[Any, Any],
    config: PipelineSettings,
    layout: Layout,
    registry: Registry,
    state: dict[str, Any],
    fingerprint: str,
) -> None:
    """Run one stage, recording it in ``pipeline.json`` as running, then as done with its record."""
    log(f"{stage.name}: running")
    started = time.perf_counter()
    state["stages"][stage.name] = {"status": "running", "fingerprint": fingerprint, "started": _now()}
    write_json(layout.manifest, state)
    records = {name: rec.get("outputs", {}) for name, rec in state["stages"].items()}
    upstream = Upstream(layout=layout, config=config, records=records, stages=registry.stages)
    result = stage.run(config.part(stage.settings), upstream)
    seconds = time.perf_counter() - started
    state["stages"][stage.name] = {
        "status": "done",
        "fingerprint": fingerprint,
        "seconds": round(seconds, 1),
        "finished": _now(),
        "outputs": result.to_dict(),
    }
    write_json(layout.manifest, state)
    log(f"{stage.name}: done in {seconds:.0f} s")


def _remove_outputs(layout: Layout, stage: Stage[Any, Any]) -> None:
    for relative in stage.outputs:
        path = layout.path(relative)
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _read_state(layout: Layout) -> dict[str, Any]:
    import json

    if not layout.manifest.is_file():
        return {"schema": SCHEMA, "stages": {}}
    try:
        state = json.loads(layout.manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise EdgeDistillError(f"{layout.manifest}: unreadable pipeline manifest ({err}); remove it to start over")
    if not isinstance(state, dict) or state.get("schema") != SCHEMA or not isinstance(state.get("stages"), dict):
        raise EdgeDistillError(f"{layout.manifest}: not a pipeline manifest of schema {SCHEMA}; remove it")
    return state


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
