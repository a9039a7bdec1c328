"""The bench harness: every model x thread count measured in a fresh process, then roofline, projection, quality,
claims and reports.

    from edgedistill.bench.harness import BenchConfig, run_bench

    result = run_bench(BenchConfig(models=[Path("student-q8_0.gguf")], threads=[1, 2], out=Path("bench-out")))

What is measured (per model x backend x quantization x thread count; mean +- sample stddev over ``repeat``
repetitions after ``warmup`` unrecorded ones): load time, time to first token, prefill tokens/s, decode tokens/s,
per-token latency p50/p95 (every decoding step of every repetition), peak RSS sampled in the measuring process
(with the RSS before loading), file size, parameters. What is derived: bytes read per generated token, the decode
bound (measured bandwidth / bytes), the share of it achieved, whether the model fits in the host's cache, and - for
a ``target`` other than the host - a decode speed *projected* onto that target (``targets.py``).

The teacher (``teacher``), when given, is benchmarked as a model of its own (it is the reference of the speed-up
and memory claims) and, with ``data``, scored first so that every student's top-1 agreement is counted against it.
Each student's retention (teacher bits per byte / student bits per byte) and accuracy ratio (student top-1 accuracy /
teacher top-1 accuracy) are then set against the teacher's row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import MISSING, Field, asdict, dataclass, fields
from pathlib import Path
from typing import Any

from edgedistill.bench.artifacts import KIND_TORCH, artifact_kind, decode_bytes
from edgedistill.bench.env import bandwidth_for, environment
from edgedistill.bench.quality import DEFINITIONS as QUALITY_DEFINITIONS
from edgedistill.bench.quality import accuracy_ratio, read_texts, retention
from edgedistill.bench.report import SCHEMA, SCHEMA_VERSION
from edgedistill.bench.targets import (
    PROJECTION_LABEL,
    TARGET_NAMES,
    TargetProfile,
    load_target,
    project_decode_tps,
)
from edgedistill.config import FlagConfig, setting
from edgedistill.errors import EdgeDistillError
from edgedistill.files import claim
from edgedistill.isolate import describe_exit
from edgedistill.runtime.speculative import check_draft_tokens
from edgedistill.system import available_cpus

# How each derived figure is defined; written into bench.json and bench.md.
DEFINITIONS = {
    **QUALITY_DEFINITIONS,
    "ttft_ms": "prompt evaluation in one call plus the greedy choice of the first token, from an empty cache",
    "prefill_tps": "prompt tokens / prompt evaluation time",
    "decode_tps": "(gen_tokens - 1) / time of the single-token steps after the first token; EOS ignored",
    "token_ms": "wall time of one decoding step (evaluate one token + argmax), p50/p95 over all measured steps",
    "peak_rss_mb": "peak RSS of the measuring process from before loading to the last repetition (MB = 1e6 bytes): "
    "the higher of the RSS sampled every 2.5 ms (sampled_peak_rss_mb) and the kernel's high-water mark (VmHWM, "
    "kernel_peak_rss_mb), which catches peaks the sampler misses while native code holds the GIL; rss_before_mb "
    "is the RSS after importing the backend, before loading",
    "bytes_per_token": "weights read per decoding step (all but an untied embedding table) + key/value bytes of "
    "the mean cached length (prompt + gen/2)",
    "bound_tps": "measured host read bandwidth at the row's thread count / bytes_per_token (the decode roofline)",
    "bound_share": "decode_tps / bound_tps (above 1: the weights were served from cache, not memory)",
    "fits_in_host_cache": "bytes_per_token <= the host's last-level cache: host decode speed is cache-inflated and "
    "does not transfer to a device with a smaller cache",
    "projection": "host efficiency (decode_tps / bound_tps, capped at 1) x target bandwidth / bytes_per_token - "
    "a projection, not a measurement",
}
DEFAULT_QUALITY_TOKENS = 4096
DEFAULT_QUALITY_WINDOW = 256
WORKER_TIMEOUT_S = 3600
# A row whose decode tokens/s vary more than this across repetitions (stddev / mean) is flagged unstable.
UNSTABLE_CV = 0.25


@dataclass
class BenchConfig(FlagConfig):
    """One bench run.

    Every field is a setting: a key of ``--config FILE`` and a flag of ``edgedistill bench`` (see
    :meth:`add_flags`), with the help text declared here. A Hugging Face checkpoint directory among ``models`` runs
    in PyTorch when torch and transformers are installed and is skipped with a note otherwise; ``teacher`` is
    benchmarked as a row of its own and is the reference of agreement, retention, accuracy ratio and the claims.
    """

    models: list[Path] = setting(
        factory=list, help=".gguf file, .onnx file or ONNX export directory, or a checkpoint directory (PyTorch)"
    )
    labels: list[str] | None = setting(None, "display names, one per MODEL")
    threads: list[int] = setting(
        factory=lambda: [len(available_cpus())],
        help="thread counts, each measured separately (default: every CPU here)",
    )
    prompt_tokens: int = setting(128, "prompt length")
    gen_tokens: int = setting(128, "tokens generated per repetition")
    repeat: int = setting(5, "measured repetitions")
    warmup: int = setting(1, "unrecorded repetitions first")
    data: list[Path] = setting(
        factory=list,
        help='held-out .jsonl ({"text": ...}) or .txt files: adds perplexity, bits per byte and top-1 accuracy '
        "through the runtime",
        metavar="FILE",
    )
    quality_tokens: int = setting(DEFAULT_QUALITY_TOKENS, "held-out tokens scored")
    quality_window: int = setting(DEFAULT_QUALITY_WINDOW, "tokens per scored window")
    teacher: Path | None = setting(
        None, "the teacher artifact: benchmarked too; reference of agreement, retention, accuracy ratio and claims"
    )
    target: str | None = setting(
        None,
        f"{', '.join(TARGET_NAMES)} or a profile .toml: limits threads/affinity to its cores "
        "and adds projected decode speed (labelled projection)",
        metavar="NAME",
    )
    claims: bool = setting(False, "check the seed's speed/memory/retention claims")
    out: Path = setting(Path("bench-out"), "directory for bench.json, bench.csv, bench.md and the plots")
    measure_bandwidth: bool = setting(True, "measure memory bandwidth (a second or two); without it, no roofline")
    context: int | None = setting(
        None, "positions to allocate (default: prompt + gen tokens, or the quality window if larger)"
    )
    draft: list[Path] = setting(
        factory=list,
        help="draft models of the teacher (its students): rows of the teacher decoding speculatively with each "
        "(acceptance, decode tokens/s, speed-up; needs --teacher)",
        metavar="MODEL",
    )
    draft_tokens: list[int] = setting(
        factory=lambda: [1, 2, 4], help="tokens a draft proposes per round, measured besides the adaptive choice"
    )

    def __post_init__(self) -> None:
        if not self.models and self.teacher is None:
            raise EdgeDistillError("models: give at least one model (.gguf, .onnx, ONNX or checkpoint directory)")
        self.models = _paths("models", self.models)
        self.data = _paths("data", self.data or [])
        self.out = _path("out", self.out)
        self.teacher = _path("teacher", self.teacher) if self.teacher is not None else None
        self.draft = _paths("draft", self.draft or [])
        if self.draft and self.teacher is None:
            raise EdgeDistillError("draft: a draft model speeds up the teacher: give the teacher too (--teacher)")
        if not isinstance(self.draft_tokens, (list, tuple)) or not self.draft_tokens:
            raise EdgeDistillError(f"draft_tokens: expected a list of integers, got {self.draft_tokens!r}")
        for k in self.draft_tokens:
            check_draft_tokens(k)
        if self.labels is not None:
            if not isinstance(self.labels, (list, tuple)):
                raise EdgeDistillError(f"labels: expected a list of names, got {self.labels!r}")
            self.labels = [str(label) for label in self.labels]
            if len(self.labels) != len(self.models):
                raise EdgeDistillError(f"labels: {len(self.labels)} labels for {len(self.models)} models")
        if (
            not isinstance(self.threads, (list, tuple))
            or not self.threads
            or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in self.threads)
        ):
            raise EdgeDistillError(f"threads: expected positive integers, got {self.threads!r}")
        self.threads = sorted(set(self.threads))
        for name, low in (
            ("prompt_tokens", 1),
            ("gen_tokens", 2),
            ("repeat", 1),
            ("warmup", 0),
            ("quality_tokens", 2),
            ("quality_window", 2),
        ):
            _check_int(name, getattr(self, name), low)
        if self.context is not None:
            _check_int("context", self.context, 1)
        for name in ("claims", "measure_bandwidth"):
            if not isinstance(getattr(self, name), bool):
                raise EdgeDistillError(f"{name}: expected true or false, got {getattr(self, name)!r}")
        if self.target is not None and not isinstance(self.target, (str, os.PathLike)):
            raise EdgeDistillError(f"target: expected a profile name or a .toml file, got {self.target!r}")

    # ------------------------------------------------------------------------------------------------- sources
    # FlagConfig's own add_flags knows int, float, str, bool and list fields, not paths or optional values; and
    # bench's flags predate it: MODEL is positional, --threads and --labels take comma lists. These two methods keep
    # that syntax; the sources are merged by FlagConfig.from_sources (paths are checked by __post_init__).

    @classmethod
    def add_flags(cls, parser: argparse.ArgumentParser, help_texts: dict[str, str] | None = None) -> None:
        """``--config FILE``, the positional MODEL arguments and one ``--field-name`` flag per other field, each
        defaulting to None so that the file fills what the flags leave (help from each field's :func:`setting`)."""
        parser.add_argument(
            "--config",
            metavar="FILE",
            help="TOML or JSON file of settings (keys as the flags, models = [...] for MODEL); flags win",
        )
        for item in fields(cls):
            names, options = _flag(item, item.metadata.get("help") or (help_texts or {}).get(item.name, ""))
            parser.add_argument(*names, **options)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchConfig:
        """The configuration that :meth:`add_flags`' parser read."""
        values = {item.name: getattr(args, item.name, None) for item in fields(cls)}
        values["models"] = values["models"] or None  # no MODEL reads as []: leave the models to the file
        return cls.from_sources(getattr(args, "config", None), values)


def _path(name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)):
        raise EdgeDistillError(f"{name}: expected a path, got {value!r}")
    return Path(value)


def _paths(name: str, values: Any) -> list[Path]:
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in values):
        raise EdgeDistillError(f"{name}: expected a list of paths, got {values!r}")
    return [Path(v) for v in values]


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise EdgeDistillError(f"{name}: expected an integer >= {low}, got {value!r}")


def comma_ints(text: str) -> list[int]:
    """``--threads 1,2,4``: positive integers, comma-separated (an argparse ``type``: errors are usage errors)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def comma_names(text: str) -> list[str] | None:
    """``--labels a,b``: names, comma-separated and stripped; an empty text is no list."""
    return [part.strip() for part in text.split(",")] if text else None


# Fields read in another syntax than FlagConfig's ``nargs="+"``: comma lists (the bench's flags since v1).
_COMMA_LISTS = {"threads": comma_ints, "labels": comma_names}
_FLAG_TYPES = {"int": int, "str": str, "Path": Path}


def _flag(item: Field, help_text: str) -> tuple[list[str], dict[str, Any]]:
    """The ``add_argument`` names and options of one field: ``models`` positional (MODEL...), comma lists for
    :data:`_COMMA_LISTS`, ``--name`` / ``--no-name`` for a bool that is on by default, store_true for one that is
    off, ``nargs="+"`` for other lists, else one typed value, its default shown in the help."""
    flag = "--" + item.name.replace("_", "-")
    kind = item.type.removesuffix(" | None")
    metavar = item.metadata.get("metavar")
    default = item.default_factory() if item.default_factory is not MISSING else item.default  # type: ignore[misc]
    if item.name == "models":
        return [item.name], {"nargs": "*", "type": Path, "metavar": "MODEL", "help": help_text}
    if item.name in _COMMA_LISTS:
        return [flag], {"type": _COMMA_LISTS[item.name], "metavar": metavar, "help": f"comma-separated {help_text}"}
    if kind == "bool":
        action = argparse.BooleanOptionalAction if default else "store_true"
        return [flag], {"action": action, "default": None, "help": help_text}
    if kind.startswith("list["):
        item_type = _FLAG_TYPES[kind.removeprefix("list[").removesuffix("]")]
        return [flag], {"nargs": "+", "type": item_type, "metavar": metavar, "help": help_text}
    shown = f"{help_text} (default: {default})" if default is not None else help_text
    return [flag], {"type": _FLAG_TYPES[kind], "metavar": metavar, "help": shown}


def default_label(path: Path) -> str:
    path = Path(path)
    if path.name == "model.onnx":
        return path.parent.name
    return path.stem if path.is_file() else path.name


@dataclass
class _Model:
    path: Path
    label: str
    kind: str
    role: str  # "teacher" or "student"
    bytes: Any = None


def _plan_models(config: BenchConfig) -> list[_Model]:
    labels = config.labels or [default_label(p) for p in config.models]
    models = [_Model(p, label, artifact_kind(p), "student") for p, label in zip(config.models, labels)]
    if config.teacher is not None:
        kind = artifact_kind(config.teacher)
        same = [m for m in models if m.path.resolve() == config.teacher.resolve()]
        if same:
            same[0].role = "teacher"
            models.remove(same[0])
            models.insert(0, same[0])
        else:
            models.insert(0, _Model(config.teacher, "teacher", kind, "teacher"))
    seen: dict[str, int] = {}
    for model in models:  # unique labels: a second "student" becomes "student-2"
        seen[model.label] = seen.get(model.label, 0) + 1
        if seen[model.label] > 1:
            model.label = f"{model.label}-{seen[model.label]}"
    return models


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


def _plan_threads(config: BenchConfig, target: TargetProfile | None, notes: list[str]) -> tuple[list[int], list[int]]:
    """Thread counts and the CPUs to pin to (empty: no pinning)."""
    cpus = available_cpus()
    threads = list(config.threads)
    pinned: list[int] = []
    if target is not None and not target.measured:
        limit = target.usable_cores
        kept = [t for t in threads if t <= limit]
        if len(kept) < len(threads):
            notes.append(
                f"threads {', '.join(str(t) for t in threads if t > limit)} dropped: target {target.name} has "
                f"{limit} usable cores"
            )
        if not kept:
            raise EdgeDistillError(f"threads: none of {threads} fits target {target.name} ({limit} usable cores)")
        threads = kept
        pinned = cpus[: min(limit, len(cpus))]
    over = [t for t in threads if t > len(pinned or cpus)]
    if over:
        notes.append(
            f"threads {', '.join(map(str, over))} exceed the {len(pinned or cpus)} CPUs available here: "
            "those rows are oversubscribed"
        )
    return threads, pinned


@dataclass
class _Plan:
    """What a run measures, settled before the first measurement."""

    models: list[_Model]
    threads: list[int]
    pinned: list[int]  # the CPUs every measuring process is pinned to (empty: no pinning)
    target: TargetProfile | None
    on_target: bool  # this machine is the target itself: everything is measured, nothing projected
    env: dict[str, Any]
    texts: list[str] | None
    context: int
    skipped: list[dict[str, str]]
    notes: list[str]


def run_bench(config: BenchConfig, progress: bool = True) -> dict[str, Any]:
    """Run the bench and write bench.json, bench.csv, bench.md and the plots into ``config.out``.

    Args:
        config: what to measure.
        progress: show a progress bar on stderr.

    Returns:
        The same dict as bench.json (``rows``, ``environment``, ``claims``, ...).

    Raises:
        EdgeDistillError: bad input (a missing model, an unknown target, unreadable data) or a model that fails to
            load or run; the message names the model.
    """
    from edgedistill.bench.report import clean, write_reports

    plan = _plan(config)
    rows = _measure(config, plan, progress)
    result = _result(config, plan, rows)
    if config.draft:
        result["speculative"] = _measure_drafts(config, plan)
    result = clean(result)
    with claim(Path(config.out), "--out"):  # also sweeps the temporary reports of a bench killed while writing
        write_reports(result, config.out)
    return result


def _plan(config: BenchConfig) -> _Plan:
    """Check the inputs (target, models, threads, data), describe the machine, and size each model's decode step."""
    notes: list[str] = []
    target = load_target(config.target) if config.target else None
    models = _plan_models(config)
    threads, pinned = _plan_threads(config, target, notes)
    texts = read_texts(config.data) if config.data else None
    env = environment(threads, bandwidth=config.measure_bandwidth)
    on_target = bool(target and not target.measured and target.matches(env["device_model"], env["cpu_model"]))
    if on_target:
        notes.append(
            f"this machine is a {target.name} ({env['device_model'] or env['cpu_model']}): every number is "  # type: ignore[union-attr]
            "measured on the target itself; nothing is projected"
        )
    skipped = _skip_torch(models)
    if not models:
        raise EdgeDistillError("models: nothing left to measure (" + "; ".join(s["reason"] for s in skipped) + ")")
    for model in models:
        model.bytes = decode_bytes(model.path, model.kind)
    context = config.context or config.prompt_tokens + config.gen_tokens
    if texts is not None:
        context = max(context, config.quality_window)
    return _Plan(models, threads, pinned, target, on_target, env, texts, context, skipped, notes)


def _skip_torch(models: list[_Model]) -> list[dict[str, str]]:
    """Take the PyTorch checkpoints out of ``models`` where torch or transformers is missing; what was skipped."""
    torch_models = [m for m in models if m.kind == KIND_TORCH]
    if not torch_models or _torch_available():
        return []
    for model in torch_models:
        models.remove(model)
    reason = "PyTorch checkpoint skipped: torch and transformers are not installed"
    return [{"label": m.label, "path": str(m.path), "reason": reason} for m in torch_models]


def _measure(config: BenchConfig, plan: _Plan, progress: bool) -> list[dict[str, Any]]:
    """One measuring process per model x thread count, in order; held-out quality in each model's last one."""
    config.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    per_task = config.warmup + config.repeat
    total = len(plan.models) * len(plan.threads) * per_task + (len(plan.models) if plan.texts is not None else 0)
    bar = _progress(total, progress)
    with tempfile.TemporaryDirectory(prefix="edgedistill-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        texts_file = None
        if plan.texts is not None:
            texts_file = scratch / "texts.json"
            texts_file.write_text(json.dumps(plan.texts), encoding="utf-8")
        teacher_scores = scratch / "teacher_scores.npz"
        for model in plan.models:
            for index, count in enumerate(plan.threads):
                quality = None
                if texts_file is not None and index == len(plan.threads) - 1:
                    quality = _quality_spec(config, model, texts_file, teacher_scores)
                spec = _worker_spec(config, plan, model, count, quality, scratch / f"result-{len(rows)}.json")
                bar.set_description(f"{model.label} x{count}")
                measured = _run_worker(spec, scratch, bar)
                rows.append(_row(model, count, measured, plan, config))
    bar.close()
    return rows


def _measure_drafts(config: BenchConfig, plan: _Plan) -> dict[str, Any]:
    """The teacher decoding speculatively with each draft (``bench/speculative.py``), in a process of its own, at
    the largest thread count measured (at most the CPUs here)."""
    threads = min(max(plan.threads), len(plan.pinned or available_cpus()))
    labels = [default_label(path) for path in config.draft]
    with tempfile.TemporaryDirectory(prefix="edgedistill-drafts-") as scratch:
        out = Path(scratch) / "speculative.json"
        command = [
            sys.executable, "-m", "edgedistill.bench.speculative", str(config.teacher),
            "--draft", *map(str, config.draft), "--labels", ",".join(labels), "--threads", str(threads),
            "--draft-tokens", ",".join(map(str, config.draft_tokens)), "--max-tokens", str(config.gen_tokens),
            "--repeat", str(config.repeat), "--json", str(out),
        ]  # fmt: skip
        print(f"bench: the teacher with {len(config.draft)} draft(s), {threads} threads", file=sys.stderr)
        done = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        if done.returncode != 0 or not out.is_file():
            tail = [line for line in done.stderr.strip().splitlines() if line.strip()][-3:]
            raise EdgeDistillError(
                f"bench of the drafts: the measuring process failed ({describe_exit(done.returncode)}): "
                f"{' | '.join(tail) or 'no output'}"
            )
        return json.loads(out.read_text(encoding="utf-8"))


def _quality_spec(config: BenchConfig, model: _Model, texts_file: Path, teacher_scores: Path) -> dict[str, Any]:
    """The worker's quality task: the teacher saves its predictions, a student after it is compared with them."""
    return {
        "texts": str(texts_file),
        "max_tokens": config.quality_tokens,
        "window": config.quality_window,
        "save": str(teacher_scores) if model.role == "teacher" else None,
        "reference": str(teacher_scores) if model.role != "teacher" and teacher_scores.is_file() else None,
    }


def _worker_spec(
    config: BenchConfig, plan: _Plan, model: _Model, threads: int, quality: dict[str, Any] | None, result: Path
) -> dict[str, Any]:
    """What one measuring process (``bench/worker.py``) reads."""
    return {
        "path": str(model.path),
        "kind": model.kind,
        "label": model.label,
        "threads": threads,
        "cpus": plan.pinned,
        "context": plan.context,
        "prompt_tokens": config.prompt_tokens,
        "gen_tokens": config.gen_tokens,
        "warmup": config.warmup,
        "repeat": config.repeat,
        "quality": quality,
        "result": str(result),
    }


def _result(config: BenchConfig, plan: _Plan, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """bench.json: the rows with retention, the run's settings and machine, notes, and the claims if asked for."""
    _add_retention(rows)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": _config_dict(config, plan.threads),
        "environment": plan.env,
        "target": plan.target.to_dict() if plan.target else None,
        "on_target": plan.on_target,
        "definitions": DEFINITIONS,
        "rows": rows,
        "skipped": plan.skipped,
        "notes": plan.notes + _cache_notes(rows, plan.target, plan.on_target),
        "claims": None,
    }
    if config.claims:
        from edgedistill.bench.claims import check_claims

        result["claims"] = check_claims(result)
    return result


def _config_dict(config: BenchConfig, threads: list[int]) -> dict[str, Any]:
    data = asdict(config)
    data["threads"] = threads
    return json.loads(json.dumps(data, default=str))


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True, leave=False)


def _run_worker(spec: dict[str, Any], scratch: Path, bar: Any) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter and return its result; errors become EdgeDistillError."""
    from edgedistill.bench.worker import MARKER

    spec_file = Path(spec["result"]).with_suffix(".spec.json")
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    stderr_file = spec_file.with_suffix(".stderr")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    with open(stderr_file, "w", encoding="utf-8") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "edgedistill.bench.worker", str(spec_file)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith(MARKER):
                event = json.loads(line[len(MARKER) :])
                if event.get("event") in ("rep", "quality"):
                    bar.update(1)
        code = process.wait(timeout=WORKER_TIMEOUT_S)
    result_file = Path(spec["result"])
    where = f"{spec['label']} ({spec['path']}, {spec['threads']} threads)"
    if not result_file.is_file():
        tail = stderr_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-5:]
        raise EdgeDistillError(
            f"bench of {where}: the measuring process died ({describe_exit(code)}): {' | '.join(tail) or 'no output'}"
        )
    result = json.loads(result_file.read_text(encoding="utf-8"))
    if "error" in result:
        raise EdgeDistillError(f"bench of {where}: {result['error']}")
    return result


def _row(model: _Model, threads: int, measured: dict[str, Any], plan: _Plan, config: BenchConfig) -> dict[str, Any]:
    """One row of bench.json: what the worker measured, the roofline around it, and the projection onto a target."""
    info = measured["info"]
    decode = measured["decode_tps"]["mean"]
    roofline = _roofline(model, threads, decode, plan.env, config)
    row: dict[str, Any] = {
        "label": model.label,
        "role": model.role,
        "path": str(model.path),
        "backend": info["backend"],
        "format": info["format"],
        "quantization": info["quantization"],
        "parameters": info["parameters"],
        "file_bytes": info["file_bytes"],
        "threads": threads,
        "cpus": measured["cpus"],
        "load_s": measured["load_s"],
        "load_mode": measured["load_mode"],
        "ttft_ms": measured["ttft_ms"],
        "prefill_tps": measured["prefill_tps"],
        "decode_tps": measured["decode_tps"],
        "token_ms_p50": measured["token_ms_p50"],
        "token_ms_p95": measured["token_ms_p95"],
        "decode_steps": measured["decode_steps"],
        "prompt_tokens": config.prompt_tokens,
        "gen_tokens": config.gen_tokens,
        "peak_rss_mb": measured["peak_rss_mb"],
        "rss_before_mb": measured["rss_before_mb"],
        "model_rss_mb": measured["peak_rss_mb"] - measured["rss_before_mb"],
        "rss_after_load_mb": measured["rss_after_load_mb"],
        "kernel_peak_rss_mb": measured["kernel_peak_rss_mb"],
        "sampled_peak_rss_mb": measured["sampled_peak_rss_mb"],
        "peak_source": measured["peak_source"],
        "rss_rate_hz": measured["rss_rate_hz"],
        "rss_samples": measured["rss_samples"],
        **roofline,
        "runs": measured["runs"],
        "load_average": measured.get("load_average", []),
        "unstable": _unstable(measured),
        "measured_on": "target" if plan.on_target else "host",
    }
    target = plan.target
    if target is not None and not target.measured and not plan.on_target and roofline["bandwidth_gbs"]:
        row["projection"] = _projection(target, threads, decode, roofline)
    if measured.get("llama_perf"):
        row["llama_perf"] = _llama_perf(measured)
    if "quality" in measured:
        quality = dict(measured["quality"])
        quality.setdefault("agreement", None)
        quality.setdefault("top1_accuracy", None)
        quality["retention"] = None  # set by _add_retention once the teacher's row is in
        quality["accuracy_ratio"] = None
        row["quality"] = quality
    return row


def _roofline(
    model: _Model, threads: int, decode_tps: float, env: dict[str, Any], config: BenchConfig
) -> dict[str, Any]:
    """Bytes a decoding step reads, the decode bound they give at the measured bandwidth, and the share achieved."""
    positions = config.prompt_tokens + config.gen_tokens / 2
    bytes_per_token = model.bytes.per_token(positions)
    bandwidth = bandwidth_for(env, threads)
    bound = bandwidth * 1e9 / bytes_per_token if bandwidth and bytes_per_token > 0 else math.nan
    llc = env.get("last_level_cache_bytes") or 0
    return {
        "bytes_per_token": bytes_per_token,
        "weight_bytes_per_token": model.bytes.weights,
        "kv_bytes_per_position": model.bytes.kv_per_position,
        "bytes_method": model.bytes.method,
        "bandwidth_gbs": bandwidth,
        "bound_tps": bound,
        "bound_share": decode_tps / bound if bound and bound > 0 and not math.isnan(bound) else math.nan,
        "fits_in_host_cache": bool(llc and bytes_per_token <= llc),
    }


def _projection(target: TargetProfile, threads: int, decode_tps: float, roofline: dict[str, Any]) -> dict[str, Any]:
    """The host's decode speed projected onto ``target`` at the same thread count (``targets.py``)."""
    bytes_per_token = roofline["bytes_per_token"]
    projection = project_decode_tps(decode_tps, bytes_per_token, roofline["bandwidth_gbs"], target.bandwidth(threads))
    projection.update(
        {
            "target": target.name,
            "threads": threads,
            "target_bandwidth_gbs": target.bandwidth(threads),
            "fits_in_target_cache": bool(target.cache_bytes and bytes_per_token <= target.cache_bytes),
            "label": PROJECTION_LABEL,
        }
    )
    return projection


def _llama_perf(measured: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's own counters over the same repetitions, and how far our measurement (Python loop, argmax and
    per-call overhead included) is from the library's pure compute time."""
    perf = dict(measured["llama_perf"])
    for key in ("prefill_tps", "decode_tps"):
        ours, theirs = measured[key]["mean"], perf.get(key)
        perf[f"{key.removesuffix('_tps')}_ratio"] = ours / theirs if ours and theirs else None
    return perf


def _unstable(measured: dict[str, Any]) -> bool:
    """Repetitions that disagree by more than :data:`UNSTABLE_CV` (coefficient of variation of decode tokens/s):
    usually another process was using the CPUs."""
    decode = measured["decode_tps"]
    return bool(decode["n"] > 1 and decode["mean"] > 0 and decode["std"] / decode["mean"] > UNSTABLE_CV)


def _add_retention(rows: list[dict[str, Any]]) -> None:
    """Each non-teacher row's retention (teacher bits per byte / student bits per byte) and accuracy ratio (student
    top-1 accuracy / teacher top-1 accuracy) against the teacher's row; bits per byte does not depend on the tokenizer,
    so retention is measured whatever each model's tokenizer, and noted as not measured only where it is missing."""
    teacher = next((r for r in rows if r["role"] == "teacher" and "quality" in r), None)
    if teacher is None:
        return
    reference = teacher["quality"]
    for row in rows:
        if row is teacher:
            reference["reference"] = "teacher: agreement, retention and accuracy ratio are measured against it"
        elif "quality" in row:
            quality = row["quality"]
            value = retention(reference.get("bits_per_byte"), quality.get("bits_per_byte"))
            if math.isnan(value):
                quality["retention"] = None
                quality["retention_note"] = _no_bits_per_byte(reference, quality)
            else:
                quality["retention"] = value
            ratio = accuracy_ratio(quality.get("top1_accuracy"), reference.get("top1_accuracy"))
            quality["accuracy_ratio"] = None if math.isnan(ratio) else ratio
            if math.isnan(ratio):
                quality["accuracy_ratio_note"] = _no_accuracy(reference, quality)


def _no_bits_per_byte(teacher: dict[str, Any], student: dict[str, Any]) -> str:
    """Why a row's retention is not measured: whose bits per byte is missing."""
    missing = [
        who
        for who, quality in (("the student", student), ("the teacher", teacher))
        if not _finite(quality.get("bits_per_byte"))
    ]
    if not missing:  # both present, but the student's is not > 0
        return "not measured: the student's bits per byte is not positive"
    return (
        f"not measured: no bits per byte for {' and '.join(missing)} (a backend that gives no token bytes, "
        "e.g. the PyTorch reference)"
    )


def _no_accuracy(teacher: dict[str, Any], student: dict[str, Any]) -> str:
    """Why a row's accuracy ratio is not measured: a missing top-1 accuracy, or a teacher that never ranks first."""
    missing = [
        who
        for who, quality in (("the student", student), ("the teacher", teacher))
        if not _finite(quality.get("top1_accuracy"))
    ]
    if missing:
        return f"not measured: no top-1 accuracy for {' and '.join(missing)}"
    return "not measured: the teacher's top-1 accuracy is 0"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _cache_notes(rows: list[dict[str, Any]], target: TargetProfile | None, on_target: bool) -> list[str]:
    notes = []
    cached = sorted({r["label"] for r in rows if r["fits_in_host_cache"]})
    if cached:
        notes.append(
            f"{', '.join(cached)}: small enough to sit in this host's last-level cache; their host decode speed is "
            "cache-inflated and does not transfer to a device with less cache"
            + (
                " (projections cap the host efficiency at 1)"
                if target and not on_target and not target.measured
                else ""
            )
        )
    missed = sorted(
        {
            f"{r['label']} ({r['sampled_peak_rss_mb']:.0f} sampled, {r['kernel_peak_rss_mb']:.0f} MB kernel)"
            for r in rows
            if r.get("kernel_peak_rss_mb") and r["kernel_peak_rss_mb"] > 1.05 * r["sampled_peak_rss_mb"]
        }
    )
    if missed:
        notes.append(
            f"{', '.join(missed)}: the RSS sampler missed a short peak (native code held the GIL); the peak reported "
            "is the kernel's high-water mark"
        )
    unstable = sorted({f"{r['label']} ({r['threads']} threads)" for r in rows if r.get("unstable")})
    if unstable:
        notes.append(
            f"{', '.join(unstable)}: decode speed varied by more than {UNSTABLE_CV:.0%} between repetitions "
            "(stddev / mean); something else was probably running - rerun those rows on a quiet machine"
        )
    above = sorted({r["label"] for r in rows if isinstance(r["bound_share"], float) and r["bound_share"] > 1})
    if above:
        notes.append(f"{', '.join(above)}: decoded above the DRAM bound, i.e. from cache")
    return notes
