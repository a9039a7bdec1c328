"""Stage ``teacher``: the teacher's top-K cache over the (budget-limited) data, built once for every student
(``top_k = 0``: the students run the teacher online instead), the teacher's own held-out and outside-the-corpus
scores (read from the cache, which holds the log-probability of every next token: the teacher runs once), and the
held-out text the bench measures quality on."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgedistill.config import setting
from edgedistill.files import atomic_write_text
from edgedistill.stages.base import (
    Layout,
    Record,
    Stage,
    Upstream,
    check_at_least_zero,
    check_positive,
    check_strings,
    read_json,
    write_json,
)

if TYPE_CHECKING:  # distill imports this module: the teacher reads its batch size by stage name
    from edgedistill.stages.distill import DistillSettings

CACHE = "teacher/cache"
HELDOUT_EVAL = "teacher/heldout_eval.json"
HELDOUT_TEXT = "teacher/heldout.jsonl"


@dataclass
class TeacherSettings:
    """The teacher and the data: what every student is trained and measured on."""

    teacher: str = setting("smollm2-135m", "a checkpoint directory, a .gguf file, or smollm2-135m (default)")
    data: list[str] = setting(factory=list, help="training data files (default: the embedded corpus and chat answers)")
    seq_len: int = setting(256, "tokens per packed sequence")
    top_k: int = setting(64, "teacher cache width; 0 runs the teacher online in every distilled run")
    # The default budget (README: the pipeline in under 20 minutes on 2 cores) is steps x batch_size x seq_len =
    # 32 x 8 x 256 = 65,536 tokens: one pass, each sequence seen once, spread over all of the embedded corpus's
    # training split. Nine runs share it (three per student), so the teacher's cache covers only these tokens.
    train_tokens: int = setting(65536, "training tokens used, evenly spaced sequences (0: all)")
    heldout_tokens: int = setting(16384, "held-out tokens used for evaluation (0: all)")

    def __post_init__(self) -> None:
        check_strings(self, "data")
        check_positive(self, "seq_len")
        check_at_least_zero(self, "train_tokens", "heldout_tokens", "top_k")


@dataclass
class CacheInfo:
    path: str
    tokens: int
    top_k: int
    tokens_per_second: float
    backend: str


@dataclass
class TeacherEval:
    """The teacher's held-out perplexity (``teacher/heldout_eval.json``)."""

    teacher: str
    path: str
    parameters: int  # tied embeddings counted once
    heldout_tokens: int
    ce: float
    perplexity: float
    seconds: float
    bits_per_byte: float | None = None
    top1_accuracy: float | None = None  # argmax next token == the text's
    outside: dict[str, Any] | None = None  # the same measures on English text outside the corpus


@dataclass
class TeacherRecord(Record):
    cache: CacheInfo | None  # None: top_k = 0, no cache
    heldout: TeacherEval

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().to_dict().items() if v is not None}


def cache_dir(layout: Layout) -> Path:
    return layout.path(CACHE)


def heldout_text(layout: Layout) -> Path:
    """The held-out split as JSONL text, for the bench's perplexity through the runtime."""
    return layout.path(HELDOUT_TEXT)


def teacher_eval(layout: Layout) -> dict[str, Any]:
    """``teacher/heldout_eval.json`` as written (``{}`` before the stage has run)."""
    return read_json(layout.path(HELDOUT_EVAL))


class TeacherStage(Stage[TeacherSettings, TeacherRecord]):
    name = "teacher"
    settings = TeacherSettings
    record = TeacherRecord
    outputs = ("teacher",)
    full_budget = {"train_tokens": 131072, "heldout_tokens": 32768}  # --full's 64 steps of 8 x 256, each seen once

    def run(self, settings: TeacherSettings, upstream: Upstream) -> TeacherRecord:
        from edgedistill.deps import require

        torch = require("torch")
        run = upstream.run
        if run.threads:
            torch.set_num_threads(run.threads)
        cache = _make_cache(settings, run.device, run.threads, cache_dir(upstream.layout)) if settings.top_k else None
        # scored in batches of the students' batch size (a distill setting: it changes memory, not the result)
        distill: DistillSettings = upstream.stage_settings("distill")
        batch_size = distill.batch_size
        evaluation = _evaluate_teacher(settings, run.device, batch_size, upstream.layout, cache is not None)
        return TeacherRecord(cache=cache, heldout=evaluation)


def _make_cache(settings: TeacherSettings, device: str, threads: int, out: Path) -> CacheInfo:
    from edgedistill.distill.cache import make_cache
    from edgedistill.distill.config import CacheConfig
    from edgedistill.distill.data import OUTSIDE_TEXT

    cache = CacheConfig(
        out=str(out),
        teacher=settings.teacher,
        data=list(settings.data),
        seq_len=settings.seq_len,
        top_k=settings.top_k,
        train_tokens=settings.train_tokens,
        heldout_tokens=settings.heldout_tokens,
        eval_data=[str(OUTSIDE_TEXT)],  # the teacher's outside-the-corpus scores come from the cache too
        device=device,
        threads=threads,
    )
    manifest = make_cache(cache)
    return CacheInfo(str(out), manifest.tokens, manifest.top_k, manifest.tokens_per_second, manifest.backend)


def _evaluate_teacher(
    settings: TeacherSettings, device_name: str, batch_size: int, layout: Layout, cached: bool
) -> TeacherEval:
    """Write the held-out text, then score the teacher on the same held-out split and on the outside text; writes
    heldout_eval.json. With a cache (``cached``) the scores are read from it; without one the teacher runs."""
    from edgedistill.distill import teacher as teachers
    from edgedistill.distill.cache import EVAL_SPLIT, TeacherCache
    from edgedistill.distill.data import OUTSIDE_TEXT, load_data, load_eval_data, token_byte_lengths
    from edgedistill.distill.evaluation import evaluate
    from edgedistill.distill.heads import release_free_memory, resolve_dtype
    from edgedistill.distill.student import teacher_parameter_count
    from edgedistill.system import resolve_device

    source = teachers.resolve_teacher(settings.teacher)
    tokenizer = teachers.load_tokenizer(source)
    _, heldout, _ = load_data(
        settings.data,
        tokenizer,
        settings.seq_len,
        train_tokens=settings.train_tokens,
        heldout_tokens=settings.heldout_tokens,
    )
    # The held-out split as text, for the bench's perplexity through the runtime (which tokenizes it again).
    lines = [json.dumps({"text": tokenizer.decode(row[:-1].tolist())}) for row in heldout.ids]
    heldout_text(layout).parent.mkdir(parents=True, exist_ok=True)  # with top_k = 0 no cache made it
    atomic_write_text(heldout_text(layout), "\n".join(lines) + "\n")
    started = time.perf_counter()
    byte_lengths = token_byte_lengths(tokenizer)
    outside_data = load_eval_data([OUTSIDE_TEXT], tokenizer, settings.seq_len)
    if cached:
        cache = TeacherCache(cache_dir(layout))
        result = cache.evaluate("heldout", heldout, byte_lengths)
        outside = cache.evaluate(EVAL_SPLIT, outside_data, byte_lengths)
        parameters = teacher_parameter_count(teachers.load_config(source))
    else:
        device = resolve_device(device_name)
        model = teachers.load_model(source, resolve_dtype("auto", device), str(device))
        parameters = sum(p.numel() for p in model.parameters())  # tied embeddings once
        result = evaluate(model, None, heldout, batch_size, device, byte_lengths=byte_lengths)
        outside = evaluate(model, None, outside_data, batch_size, device, byte_lengths=byte_lengths)
        del model
        release_free_memory()
    evaluation = TeacherEval(
        teacher=settings.teacher,
        path=str(source.path),
        parameters=parameters,
        heldout_tokens=result["tokens"],
        ce=result["ce"],
        perplexity=result["perplexity"],
        seconds=time.perf_counter() - started,
        bits_per_byte=result["bits_per_byte"],
        top1_accuracy=result["top1_accuracy"],
        outside=dict(outside, files=[str(OUTSIDE_TEXT)]),
    )
    write_json(layout.path(HELDOUT_EVAL), dataclasses.asdict(evaluation))
    return evaluation
