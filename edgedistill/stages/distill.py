"""Stage ``distill``: every student preset trained twice on the same data, budget and seed: with distillation
(``alpha``) and without (alpha 1, cross-entropy only: the seed's "before distillation").

Its part of the report: how the students were trained (preamble), the seed's table 1 (size and held-out quality
before and after distillation) and the loss curves."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgedistill.bench.claims import MISSING, SEED_RETENTION, number, percent, size_class
from edgedistill.bench.report import markdown_table
from edgedistill.config import setting
from edgedistill.errors import EdgeDistillError
from edgedistill.stages.base import (
    Layout,
    Record,
    Section,
    Stage,
    Upstream,
    check_positive,
    check_strings,
    log,
    read_json,
)
from edgedistill.stages.teacher import TeacherSettings, cache_dir, teacher_eval

if TYPE_CHECKING:
    from edgedistill.distill.config import TrainConfig

STUDENTS = "students"


@dataclass
class DistillSettings:
    """The students and how each is trained (its CE-only twin differs only in alpha)."""

    students: list[str] = setting(
        factory=lambda: ["small", "tiny", "nano"],
        help="student presets (small, tiny, nano), shape files or checkpoint directories",
    )
    steps: int = setting(80, "optimizer steps per student run")
    batch_size: int = setting(8, "sequences per step")
    alpha: float = setting(0.5, "the distilled runs' CE weight (their twins use 1: CE only)")
    temperature: float = setting(1.0, "distillation temperature")
    lr: float = setting(1e-3, "peak learning rate")
    seed: int = setting(0, "random seed of every run")

    def __post_init__(self) -> None:
        check_strings(self, "students")
        if not self.students:
            raise EdgeDistillError("students: expected at least one student preset or shape file")
        check_positive(self, "steps", "batch_size")
        if not 0.0 <= self.alpha < 1.0:
            raise EdgeDistillError(f"alpha: expected a number in [0, 1) for the distilled students, got {self.alpha!r}")
        if not self.temperature > 0:
            raise EdgeDistillError(f"temperature: expected a positive number, got {self.temperature!r}")


def student_label(spec: str) -> str:
    """``tiny`` for a preset, the file or directory stem for a shape file or checkpoint."""
    return Path(spec).stem if ("/" in spec or "." in spec) else spec


def student_dir(layout: Layout, spec: str, distilled: bool) -> Path:
    """``students/<label>-kd`` (distilled) or ``students/<label>-ce`` (its CE-only twin)."""
    return layout.path(STUDENTS) / f"{student_label(spec)}-{'kd' if distilled else 'ce'}"


@dataclass
class StudentRun:
    path: str
    student: str
    distilled: bool
    alpha: float
    parameters: int
    heldout: dict[str, Any]  # the run's held-out metrics (train_summary.json's "heldout")
    seconds: float


@dataclass
class DistillRecord(Record):
    runs: dict[str, StudentRun]  # by directory name: s32-kd, s32-ce, ...


class DistillStage(Stage[DistillSettings, DistillRecord]):
    name = "distill"
    settings = DistillSettings
    record = DistillRecord
    outputs = (STUDENTS,)
    full_budget = {"steps": 3000, "batch_size": 16}

    def run(self, settings: DistillSettings, upstream: Upstream) -> DistillRecord:
        from edgedistill.distill.train import train

        runs = {}
        for student in settings.students:
            for distilled in (True, False):
                config = _train_config(settings, upstream, student, distilled)
                out = Path(config.out)
                how = f"alpha {settings.alpha}" if distilled else "CE only, alpha 1"
                log(f"distill: {out.name} ({how})")
                summary = train(config)
                runs[out.name] = StudentRun(
                    path=str(out),
                    student=student,
                    distilled=distilled,
                    alpha=config.alpha,
                    parameters=summary["student"]["parameters"],
                    heldout=summary["heldout"],
                    seconds=summary["train"]["seconds"],
                )
        return DistillRecord(runs=runs)

    def report(self, upstream: Upstream) -> list[Section]:
        settings = upstream.settings(DistillSettings)
        quality, rows = quality_table(upstream.layout, settings.students)
        verdicts = _quality_verdicts(rows)
        intro = (
            "Held-out perplexity of the PyTorch checkpoints on the same "
            f"{number(teacher_eval(upstream.layout).get('heldout_tokens'), 0)} held-out tokens as the teacher. "
            "**Retention = teacher perplexity ÷ student perplexity** (100 % = as good as the teacher). The seed does "
            'not say what its "performance" measures, so its percentages are compared with ours as the closest reading.'
        )
        return [
            Section(1, None, [_training_sentence(settings, upstream.settings(TeacherSettings))]),
            Section(10, "1. Size and quality before and after distillation", [intro, "", quality, "", *verdicts]),
            Section(61, "Plots", _loss_curves(upstream.layout, settings.students)),
        ]


def _train_config(settings: DistillSettings, upstream: Upstream, student: str, distilled: bool) -> TrainConfig:
    """The TrainConfig of one run: the student, distilled (``alpha``) or its CE-only twin (alpha 1)."""
    from edgedistill.distill.config import TrainConfig

    data = upstream.settings(TeacherSettings)
    run = upstream.run
    return TrainConfig(
        out=str(student_dir(upstream.layout, student, distilled)),
        teacher=data.teacher,
        teacher_cache=str(cache_dir(upstream.layout)) if data.top_k else "",
        student=student,
        data=list(data.data),
        alpha=settings.alpha if distilled else 1.0,
        temperature=settings.temperature,
        lr=settings.lr,
        steps=settings.steps,
        batch_size=settings.batch_size,
        seq_len=data.seq_len,
        seed=settings.seed,
        device=run.device,
        threads=run.threads,
        train_tokens=data.train_tokens,
        heldout_tokens=data.heldout_tokens,
        save_every=max(1, settings.steps // 4),
        resume=True,
    )


# ------------------------------------------------------------------------------------------------ report part
def _training_sentence(settings: DistillSettings, data: TeacherSettings) -> str:
    teacher = ", from a top-" + str(data.top_k) + " teacher cache" if data.top_k else ", teacher online"
    return (
        f"Teacher: `{data.teacher}`; data: {', '.join(data.data) or 'the embedded corpus'}; students: "
        f"{', '.join(settings.students)}, each trained {settings.steps} steps of {settings.batch_size} x "
        f"{data.seq_len} tokens (seed {settings.seed}) twice: distilled (alpha {settings.alpha}, T "
        f"{settings.temperature}{teacher}) and CE only (alpha 1, the seed's \"before distillation\")."
    )


def seed_retention(klass: int | None) -> str:
    """The seed's retention for a size class, as its table states it (its 1/4 model is its baseline)."""
    if klass == 4:
        return percent(1.0, 0) + " (its baseline)"
    return percent(SEED_RETENTION[klass], 0) if klass in SEED_RETENTION else MISSING


@dataclass
class StudentQuality:
    """One student's row of table 1: held-out perplexity before (CE only) and after distillation."""

    student: str
    parameters: int
    ratio: float | None  # teacher parameters / student parameters
    ppl_before: float
    ppl_after: float
    retention_before: float | None  # teacher perplexity / student perplexity
    retention_after: float | None
    agreement_before: float | None  # top-1 agreement with the teacher
    agreement_after: float | None
    size_class: int | None  # the seed's size class (bench/claims.py's buckets)

    def cells(self) -> list[str]:
        return [
            self.student,
            number(self.parameters / 1e6, 1, " M"),
            number(self.ratio, 1),
            number(self.ppl_before, 1),
            number(self.ppl_after, 1),
            percent(self.retention_before),
            percent(self.retention_after),
            f"{percent(self.agreement_before)} → {percent(self.agreement_after)}",
            seed_retention(self.size_class),
        ]


def _student_quality(
    layout: Layout, spec: str, teacher_ppl: float | None, teacher_params: int
) -> StudentQuality | None:
    """A student's row of table 1, or None while either of its two runs has no train_summary.json."""
    after = read_json(student_dir(layout, spec, True) / "train_summary.json")
    before = read_json(student_dir(layout, spec, False) / "train_summary.json")
    if not after or not before:
        return None
    params = after["student"]["parameters"]
    ppl_after, ppl_before = after["heldout"]["perplexity"], before["heldout"]["perplexity"]
    return StudentQuality(
        student=student_label(spec),
        parameters=params,
        ratio=teacher_params / params if teacher_params else None,
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        retention_before=teacher_ppl / ppl_before if teacher_ppl else None,
        retention_after=teacher_ppl / ppl_after if teacher_ppl else None,
        agreement_before=before["heldout"].get("top1_agreement"),
        agreement_after=after["heldout"].get("top1_agreement"),
        size_class=size_class(teacher_params, params),
    )


def quality_table(layout: Layout, students: list[str]) -> tuple[str, list[StudentQuality]]:
    """Seed table 1: size and held-out quality of each student before (CE only) and after distillation."""
    teacher = teacher_eval(layout)
    teacher_ppl = teacher.get("perplexity")
    teacher_params = teacher.get("parameters") or 0
    ppl = number(teacher_ppl, 1)
    rows = [["teacher", number(teacher_params / 1e6, 1, " M"), "1", ppl, ppl, percent(1.0, 0), percent(1.0, 0)]]
    rows[0] += [MISSING, MISSING]
    records = [q for q in (_student_quality(layout, s, teacher_ppl, teacher_params) for s in students) if q]
    rows += [record.cells() for record in records]
    headers = [
        "model",
        "parameters",
        "teacher ÷ model",
        "held-out ppl, CE only (before)",
        "held-out ppl, distilled (after)",
        "retention before",
        "retention after",
        "top-1 agreement with teacher (before → after)",
        "seed's retention",
    ]
    return markdown_table(headers, rows), records


def _quality_verdicts(records: list[StudentQuality]) -> list[str]:
    lines = []
    for record in records:
        gain = record.ppl_before / record.ppl_after - 1
        verdict = "improved" if gain > 0.005 else ("made no difference to" if gain > -0.005 else "worsened")
        lines.append(
            f"- `{record.student}`: distillation {verdict} held-out perplexity "
            f"({number(record.ppl_before, 1)} → {number(record.ppl_after, 1)}, {100 * gain:+.1f} %)."
        )
    return lines


def _loss_curves(layout: Layout, students: list[str]) -> list[str]:
    lines = []
    for student in students:
        for distilled in (True, False):
            curve = student_dir(layout, student, distilled) / "loss_curve.png"
            if curve.is_file():
                lines.append(f"![{curve.parent.name} loss]({curve.relative_to(layout.out).as_posix()})")
    return lines
