"""``edgedistill pipeline``: teacher → students (with and without distillation) → GGUF/ONNX → bench → report.

The stages, in order, each recorded in ``OUT/pipeline.json``:

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
    ``report.md``: the seed's three tables with measured numbers, plots, claims and sample generations.

A rerun skips each stage whose settings are unchanged and finished; a stage whose settings changed is redone from
scratch, with the stages after it; an interrupted stage resumes (training from its last checkpoint, the cache from
its last shard). ``--stages`` runs a subset.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedistill.distill.config import FlagConfig
from edgedistill.errors import EdgeDistillError

STAGES = ("teacher", "distill", "export", "bench", "report")
MANIFEST = "pipeline.json"
SCHEMA = 1

# The settings each stage depends on (a stage also depends on everything its predecessors depend on).
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "teacher": ("teacher", "data", "seq_len", "top_k", "train_tokens", "heldout_tokens"),
    "distill": ("students", "steps", "batch_size", "alpha", "temperature", "lr", "seed"),
    "export": ("gguf_quants", "onnx_quants"),
    "bench": (
        "bench_threads",
        "bench_prompt_tokens",
        "bench_gen_tokens",
        "bench_repeat",
        "bench_warmup",
        "bench_target",
        "quality_tokens",
    ),
    "report": ("sample_prompts", "sample_tokens"),
}

DEFAULT_PROMPTS = [
    "The Python standard library",
    "A list comprehension is",
    "To read a file line by line,",
]

# `--full`: the budget for a machine with more time or a GPU (a config file and flags still override it).
FULL_BUDGET: dict[str, Any] = {
    "steps": 3000,
    "batch_size": 16,
    "train_tokens": 0,
    "heldout_tokens": 0,
    "bench_threads": [1, 2, 4],
    "bench_gen_tokens": 128,
    "bench_repeat": 5,
    "quality_tokens": 16384,
}


@dataclass
class PipelineConfig(FlagConfig):
    """Every choice of a pipeline run. Each field is a flag (``--field-name``) and a key of the TOML config file.

    The default budget is sized so that the whole run takes under 20 minutes on a 2-core CPU (README): 80 steps
    of 8 x 256 tokens per student (163,840 tokens: under half of the embedded corpus's training split, spread over
    all of it, each sequence seen once), the teacher cached over exactly those sequences.
    """

    out: str = "runs/pipeline"
    teacher: str = "smollm2-135m"
    data: list[str] = field(default_factory=list)  # empty: the embedded corpus
    students: list[str] = field(default_factory=lambda: ["small", "tiny", "nano"])
    steps: int = 80
    batch_size: int = 8
    seq_len: int = 256
    alpha: float = 0.5  # the distilled students; their twins train with alpha 1 (CE only)
    temperature: float = 1.0
    lr: float = 1e-3
    seed: int = 0
    train_tokens: int = 163840  # steps x batch x seq_len: one pass; 0 = the whole training split
    heldout_tokens: int = 16384  # 0 = the whole held-out split
    top_k: int = 64  # teacher cache width; 0: no cache, the teacher runs online in every distilled run
    gguf_quants: list[str] = field(default_factory=lambda: ["q8_0", "q4_k_m"])
    onnx_quants: list[str] = field(default_factory=lambda: ["int8"])
    bench_threads: list[int] = field(default_factory=lambda: [2])
    bench_prompt_tokens: int = 128
    bench_gen_tokens: int = 64
    bench_repeat: int = 3
    bench_warmup: int = 1
    bench_target: str = "rpi5"  # projections for this profile (bench/targets); "" for none
    quality_tokens: int = 4096  # held-out tokens each artifact's perplexity is measured on, through the runtime
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    sample_tokens: int = 40
    device: str = "auto"  # training and the teacher: auto, cpu or cuda
    threads: int = 0  # training and export threads (0: all); the bench uses bench_threads
    full: bool = False  # start from FULL_BUDGET instead of the 20-minute default

    def __post_init__(self) -> None:
        for name in ("data", "students", "gguf_quants", "onnx_quants", "sample_prompts"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise EdgeDistillError(f"{name}: expected a list of strings, got {value!r}")
            setattr(self, name, value)
        threads = self.bench_threads if isinstance(self.bench_threads, list) else [self.bench_threads]
        try:
            self.bench_threads = [int(t) for t in threads]
        except (TypeError, ValueError):
            raise EdgeDistillError(f"bench_threads: expected a list of integers, got {self.bench_threads!r}") from None
        if not self.bench_threads or min(self.bench_threads) < 1:
            raise EdgeDistillError(f"bench_threads: expected positive integers, got {self.bench_threads!r}")
        if not self.students:
            raise EdgeDistillError("students: expected at least one student preset or shape file")
        for name in ("steps", "batch_size", "seq_len", "bench_prompt_tokens", "bench_gen_tokens", "bench_repeat"):
            if getattr(self, name) <= 0:
                raise EdgeDistillError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ("train_tokens", "heldout_tokens", "top_k", "bench_warmup", "quality_tokens", "threads"):
            if getattr(self, name) < 0:
                raise EdgeDistillError(f"{name}: expected 0 or a positive integer, got {getattr(self, name)!r}")
        if not 0.0 <= self.alpha < 1.0:
            raise EdgeDistillError(f"alpha: expected a number in [0, 1) for the distilled students, got {self.alpha!r}")
        if not self.temperature > 0:
            raise EdgeDistillError(f"temperature: expected a positive number, got {self.temperature!r}")
        if not self.gguf_quants and not self.onnx_quants:
            raise EdgeDistillError("gguf_quants, onnx_quants: expected at least one quantization to export")

    @classmethod
    def preset(cls, chosen: dict[str, Any]) -> dict[str, Any]:
        """``full``: :data:`FULL_BUDGET` replaces the defaults (the config file and flags still win)."""
        return FULL_BUDGET if chosen.get("full") else {}

    def to_toml(self) -> str:
        """The resolved settings as a TOML file that reproduces this run (``--config``)."""
        lines = ["# edgedistill pipeline: every setting of this run (edgedistill pipeline --config THIS_FILE)"]
        for key, value in self.to_dict().items():
            lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"

    def fingerprint(self, stage: str) -> str:
        """A hash of the settings ``stage`` and the stages before it depend on."""
        keys: list[str] = []
        for name in STAGES[: STAGES.index(stage) + 1]:
            keys.extend(STAGE_KEYS[name])
        settings = {k: getattr(self, k) for k in keys}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------ layout
class Layout:
    """Where each stage writes, under the run directory."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.manifest = out / MANIFEST
        self.config = out / "pipeline.toml"
        self.cache = out / "teacher" / "cache"
        self.teacher_eval = out / "teacher" / "heldout_eval.json"
        self.heldout_text = out / "teacher" / "heldout.jsonl"
        self.students = out / "students"
        self.export = out / "export"
        self.bench = out / "bench"
        self.report = out / "report.md"
        self.samples = out / "samples.json"

    def student(self, name: str, distilled: bool) -> Path:
        return self.students / f"{student_label(name)}-{'kd' if distilled else 'ce'}"

    def stage_outputs(self, stage: str) -> list[Path]:
        return {
            "teacher": [self.out / "teacher"],
            "distill": [self.students],
            "export": [self.export],
            "bench": [self.bench],
            "report": [self.report, self.samples],
        }[stage]


def student_label(spec: str) -> str:
    """``tiny`` for a preset, the file or directory stem for a shape file or checkpoint."""
    return Path(spec).stem if ("/" in spec or "." in spec) else spec


def _write_json(path: Path, data: Any) -> None:
    from edgedistill.files import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _log(message: str) -> None:
    print(f"[pipeline] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------ stages
def stage_teacher(config: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """The teacher cache (once for every student), the teacher's held-out perplexity and the held-out text."""
    from edgedistill._deps import require

    torch = require("torch")
    from edgedistill.distill import teacher as teachers
    from edgedistill.distill.config import CacheConfig
    from edgedistill.distill.data import load_data
    from edgedistill.distill.heads import release_free_memory, resolve_device, resolve_dtype
    from edgedistill.distill.train import evaluate

    outputs: dict[str, Any] = {}
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.top_k:
        from edgedistill.distill.cache import make_cache

        cache = CacheConfig(
            out=str(layout.cache),
            teacher=config.teacher,
            data=list(config.data),
            seq_len=config.seq_len,
            top_k=config.top_k,
            train_tokens=config.train_tokens,
            heldout_tokens=config.heldout_tokens,
            device=config.device,
            threads=config.threads,
        )
        manifest = make_cache(cache)
        outputs["cache"] = {
            "path": str(layout.cache),
            "tokens": manifest.tokens,
            "top_k": manifest.top_k,
            "tokens_per_second": manifest.tokens_per_second,
            "backend": manifest.backend,
        }
    source = teachers.resolve_teacher(config.teacher)
    tokenizer = teachers.load_tokenizer(source)
    _, heldout, _ = load_data(
        config.data, tokenizer, config.seq_len, train_tokens=config.train_tokens, heldout_tokens=config.heldout_tokens
    )
    # The held-out split as text, for the bench's perplexity through the runtime (which tokenizes it again).
    lines = [json.dumps({"text": tokenizer.decode(row[:-1].tolist())}) for row in heldout.ids]
    from edgedistill.files import atomic_write_text

    atomic_write_text(layout.heldout_text, "\n".join(lines) + "\n")
    device = resolve_device(config.device)
    started = time.perf_counter()
    model = teachers.load_model(source, resolve_dtype("auto", device), str(device))
    parameters = sum(p.numel() for p in model.parameters())  # tied embeddings once
    result = evaluate(model, None, heldout, config.batch_size, device)
    del model
    release_free_memory()
    evaluation = {
        "teacher": config.teacher,
        "path": str(source.path),
        "parameters": parameters,
        "heldout_tokens": result["tokens"],
        "ce": result["ce"],
        "perplexity": result["perplexity"],
        "seconds": time.perf_counter() - started,
    }
    _write_json(layout.teacher_eval, evaluation)
    outputs["heldout"] = evaluation
    return outputs


def stage_distill(config: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """Every student twice: distilled (``alpha``) and CE only (alpha 1), same data, steps and seed."""
    from edgedistill.distill.config import TrainConfig
    from edgedistill.distill.train import train

    runs = {}
    for student in config.students:
        for distilled in (True, False):
            out = layout.student(student, distilled)
            _log(f"distill: {out.name} ({'alpha ' + str(config.alpha) if distilled else 'CE only, alpha 1'})")
            train_config = TrainConfig(
                out=str(out),
                teacher=config.teacher,
                teacher_cache=str(layout.cache) if config.top_k else "",
                student=student,
                data=list(config.data),
                alpha=config.alpha if distilled else 1.0,
                temperature=config.temperature,
                lr=config.lr,
                steps=config.steps,
                batch_size=config.batch_size,
                seq_len=config.seq_len,
                seed=config.seed,
                device=config.device,
                threads=config.threads,
                train_tokens=config.train_tokens,
                heldout_tokens=config.heldout_tokens,
                save_every=max(1, config.steps // 4),
                resume=True,
            )
            summary = train(train_config)
            runs[out.name] = {
                "path": str(out),
                "student": student,
                "distilled": distilled,
                "alpha": train_config.alpha,
                "parameters": summary["student"]["parameters"],
                "heldout": summary["heldout"],
                "seconds": summary["train"]["seconds"],
            }
    return {"runs": runs}


def stage_export(config: PipelineConfig, layout: Layout) -> dict[str, Any]:
    """The teacher and each distilled student to GGUF and ONNX, every artifact checked against PyTorch."""
    from edgedistill.export.cli import export
    from edgedistill.export.manifest import read_manifest
    from edgedistill.export.recipe import ExportRecipe

    models = {"teacher": config.teacher}
    for student in config.students:
        models[layout.student(student, True).name] = str(layout.student(student, True))
    artifacts = []
    for label, model in models.items():
        for fmt, quants in (("gguf", config.gguf_quants), ("onnx", config.onnx_quants)):
            if not quants:
                continue
            out = layout.export / label / fmt
            done = {r["quantization"]: r for r in _manifest_records(out, read_manifest)}
            if not all(q in done for q in quants):
                _log(f"export: {label} -> {fmt} {','.join(quants)}")
                recipe = ExportRecipe(
                    format=fmt,
                    model=model,
                    out=out,
                    quants=list(quants),
                    threads=config.threads,
                    name=label,
                    allow_mismatch=True,
                )
                export(recipe)
                done = {r["quantization"]: r for r in _manifest_records(out, read_manifest)}
            for quant in quants:
                record = done[quant]
                artifacts.append(
                    {
                        "label": label,
                        "format": fmt,
                        "quantization": quant,
                        "path": str(out / record["path"]),
                        "bytes": record["bytes"],
                        "parameters": record["parameters"],
                        "passed": record["passed"],
                        "parity": {
                            k: record["parity"].get(k)
                            for k in ("max_logit_diff", "top1_agreement", "greedy_equal", "passed")
                        },
                    }
                )
    return {"artifacts": artifacts}


def _manifest_records(out: Path, read_manifest: Any) -> list[dict[str, Any]]:
    if not (out / "manifest.json").is_file():
        return []
    records = read_manifest(out).get("artifacts", [])
    return [r for r in records if (out / r["path"]).exists()]


def stage_bench(config: PipelineConfig, layout: Layout, exported: dict[str, Any]) -> dict[str, Any]:
    """Every artifact that passed parity, measured on this host beside the teacher's."""
    from edgedistill.bench.harness import BenchConfig, run_bench

    artifacts = [a for a in exported["artifacts"] if a["passed"]]
    if not artifacts:
        raise EdgeDistillError("bench: no exported artifact passed its parity check; see the export manifests")
    teacher = next(
        (a for a in artifacts if a["label"] == "teacher" and a["format"] == "gguf"),
        next((a for a in artifacts if a["label"] == "teacher"), None),
    )
    bench = BenchConfig(
        models=[Path(a["path"]) for a in artifacts],
        labels=[f"{a['label']} {a['quantization']}" for a in artifacts],
        threads=list(config.bench_threads),
        prompt_tokens=config.bench_prompt_tokens,
        gen_tokens=config.bench_gen_tokens,
        repeat=config.bench_repeat,
        warmup=config.bench_warmup,
        data=[layout.heldout_text] if config.quality_tokens else [],
        teacher=Path(teacher["path"]) if teacher else None,
        target=config.bench_target or None,
        claims=True,
        out=layout.bench,
        quality_tokens=config.quality_tokens,
    )
    result = run_bench(bench, progress=True)
    return {"bench_json": str(layout.bench / "bench.json"), "rows": len(result.get("rows", []))}


def stage_report(config: PipelineConfig, layout: Layout, outputs: dict[str, Any]) -> dict[str, Any]:
    """Sample generations, then ``report.md``."""
    from edgedistill.report import sample_generations, write_report

    samples = sample_generations(config, outputs["export"]["artifacts"])
    _write_json(layout.samples, samples)
    write_report(config, layout, outputs, samples)
    return {"report": str(layout.report)}


# ------------------------------------------------------------------------------------------------------ driver
def run_pipeline(config: PipelineConfig, stages: list[str] | None = None) -> Path:
    """Run (or resume) the pipeline; returns the report's path."""
    from edgedistill.files import claim

    # One pipeline per directory at a time; the claim also sweeps the temporary files a killed run left at the top
    # level (each stage's command claims its own directory the same way).
    with claim(Path(config.out), "out") as out:
        return _run_stages(config, out, stages)


def _run_stages(config: PipelineConfig, out: Path, stages: list[str] | None) -> Path:
    layout = Layout(out)
    wanted = list(STAGES) if not stages else stages
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise EdgeDistillError(f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(STAGES)}")
    state = _read_state(layout)
    from edgedistill.files import atomic_write_text

    atomic_write_text(layout.config, config.to_toml())
    stale = False  # once a stage is redone, every later stage is redone too
    for stage in STAGES:
        record = state["stages"].get(stage, {})
        fingerprint = config.fingerprint(stage)
        finished = record.get("status") == "done" and record.get("fingerprint") == fingerprint and not stale
        if stage not in wanted:
            if not finished and any(s in wanted for s in STAGES[STAGES.index(stage) + 1 :]):
                raise EdgeDistillError(
                    f"--stages: stage {stage!r} has not finished with these settings; run it first (or omit --stages)"
                )
            continue
        if finished:
            _log(f"{stage}: finished earlier with the same settings, skipped")
            continue
        if record.get("fingerprint") not in (None, fingerprint) or (stale and record):
            _log(f"{stage}: settings changed since its last run; redoing it")
            for path in layout.stage_outputs(stage):
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        stale = True
        _log(f"{stage}: running")
        started = time.perf_counter()
        state["stages"][stage] = {"status": "running", "fingerprint": fingerprint, "started": _now()}
        _write_json(layout.manifest, state)
        outputs = {name: rec.get("outputs", {}) for name, rec in state["stages"].items()}
        if stage == "teacher":
            result = stage_teacher(config, layout)
        elif stage == "distill":
            result = stage_distill(config, layout)
        elif stage == "export":
            result = stage_export(config, layout)
        elif stage == "bench":
            result = stage_bench(config, layout, outputs["export"])
        else:
            result = stage_report(config, layout, outputs)
        seconds = time.perf_counter() - started
        state["stages"][stage] = {
            "status": "done",
            "fingerprint": fingerprint,
            "seconds": round(seconds, 1),
            "finished": _now(),
            "outputs": result,
        }
        _write_json(layout.manifest, state)
        _log(f"{stage}: done in {seconds:.0f} s")
    return layout.report


def _read_state(layout: Layout) -> dict[str, Any]:
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
