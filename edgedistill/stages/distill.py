"""Stage ``distill``: every student derived from the teacher by structured pruning, then trained three ways on the
same data, budget and seed, so that the report shows what pruning buys and what distillation buys:

- ``<label>-random``: random initialisation, cross-entropy only (a preset shape of the same size);
- ``<label>-ce``: the derived student, cross-entropy only (alpha 1: the seed's "before distillation");
- ``<label>-kd``: the derived student, distilled (``alpha``: the seed's "after").

With ``chain`` (the default) the first student is cut from the teacher and each later one from the student before
it, distilled (a teacher-assistant chain: teacher -> 1/4 -> 1/8 -> 1/16 halves the model at each cut, within
ModelOpt's advice not to cut more than about half at once); every run still distils from the original teacher.
A derived student is ``students/<label>-derived`` (a checkpoint plus ``prune.json``).

Its part of the report: how the students were made (preamble), the seed's table 1 (size and quality on a common
scale, bits per byte, held out and outside the corpus) and the loss curves."""

from __future__ import annotations

from dataclasses import dataclass, field
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


INITS = ("prune", "random")


@dataclass
class DistillSettings:
    """The students, how each is derived and how each is trained (its twins differ in alpha and init only)."""

    students: list[str] = setting(
        factory=lambda: ["small", "tiny", "nano"],
        help="student presets (small, tiny, nano) or shape files, largest first",
    )
    init: str = setting("prune", "prune: derive each student from the teacher (and random twins); random: no pruning")
    chain: bool = setting(True, "derive each later student from the one before it, distilled (teacher-assistant chain)")
    # README "A vocabulary cut to the student's size": measured on tiny and nano at the demo budget
    vocab: str = setting(
        "auto", "each student's vocabulary: auto (the tokens the data use, closed under merges), N, or full"
    )
    steps: int = setting(32, "optimizer steps per student run")
    batch_size: int = setting(8, "sequences per step")
    alpha: float = setting(0.5, "the distilled runs' CE weight (their twins use 1: CE only)")
    temperature: float = setting(1.0, "distillation temperature")
    # measured on `small` (40 steps, derived, cache): 5e-4 -> 1.937 bits/byte, 1.5e-3 -> 1.835; alpha 0 was worse.
    # Again on the demo's trimmed `tiny` (32 steps, 2026-12-04; held-out / outside bits per byte): lr 1.5e-3 ->
    # 1.728 / 2.214, 7e-4 -> 1.752 / 2.250, 3e-3 -> 1.765 / 2.247; alpha 0.1 -> 1.755 / 2.231; T 2 -> 1.916 / 2.550;
    # 48 steps instead of 32 -> 1.662 / 2.207 (more steps is what helps, and it costs time the demo does not have)
    lr: float = setting(1.5e-3, "peak learning rate of the derived students")
    # measured on the demo's derived nano (32 steps, 2026-12-04; held-out / outside bits per byte): lr 1.5e-3 ->
    # KD 2.012 / 2.316, CE 2.008; 3e-3 -> KD 1.975 / 2.310, CE 1.994. tiny at 2.2e-3: 1.741 (1.5e-3: 1.728)
    student_lr: list[str] = setting(
        factory=lambda: ["nano=0.003"],
        help="peak learning rate of named derived students, label=lr (overrides lr for them)",
    )
    random_lr: float = setting(1e-3, "peak learning rate of the randomly initialised students")
    # measured on the derived `small` in fp32 (a CPU without bf16): a 1-step warm-up (5 % of 32) diverged at step 2
    # (CE 7.6 -> 10.1) and ended at 2.540 bits/byte held out; 4 steps reached 1.892 (full vocabulary), 1.536 (auto)
    warmup_steps: int = setting(4, "linear warm-up steps (-1: 5%% of --steps)")
    # measured on the derived `small` (demo cache): 32 steps trained, 81 s -> 1.902 bits/byte; 48 frozen, 87 s -> 1.795
    freeze_embeddings: bool = setting(True, "derived runs keep the teacher's embedding and LM head fixed (faster)")
    calibration: int = setting(32, "training sequences that measure each pruning's importance")
    # the last demo: the zero-shot ranking chose the same shape as 4-step probes for small and tiny, for ~40 s more
    probe_steps: int = setting(0, "distillation steps of each pruning probe (0: zero-shot loss alone)")
    candidates: int = setting(8, "candidate shapes scored per pruning")
    seed: int = setting(0, "random seed of every run")

    def __post_init__(self) -> None:
        check_strings(self, "students", "student_lr")
        self.lr_of(None)  # student_lr's entries parse
        if not self.students:
            raise EdgeDistillError("students: expected at least one student preset or shape file")
        if self.init not in INITS:
            raise EdgeDistillError(f"init: expected one of {', '.join(INITS)}, got {self.init!r}")
        from edgedistill.distill.config import parse_vocab

        parse_vocab(self.vocab)
        check_positive(self, "steps", "batch_size", "calibration", "candidates")
        for name in ("lr", "random_lr"):
            if not 0 < getattr(self, name) <= 1:
                raise EdgeDistillError(
                    f"{name}: expected a positive number no larger than 1, got {getattr(self, name)!r}"
                )
        if self.probe_steps < 0 or self.warmup_steps < -1:
            raise EdgeDistillError("probe_steps, warmup_steps: expected a non-negative integer (warmup_steps: or -1)")
        if not 0.0 <= self.alpha < 1.0:
            raise EdgeDistillError(f"alpha: expected a number in [0, 1) for the distilled students, got {self.alpha!r}")
        if not self.temperature > 0:
            raise EdgeDistillError(f"temperature: expected a positive number, got {self.temperature!r}")

    def lr_of(self, student: str | None) -> float:
        """The peak learning rate of a derived ``student`` (its ``student_lr`` entry, else ``lr``)."""
        rates = {}
        for entry in self.student_lr:
            label, _, value = entry.partition("=")
            try:
                rates[label.strip()] = rate = float(value)
            except ValueError:
                rate = -1.0
            if not label.strip() or not 0 < rate <= 1:
                raise EdgeDistillError(f"student_lr: expected label=lr with 0 < lr <= 1, got {entry!r}")
        return rates.get(student_label(student), self.lr) if student else self.lr


def student_label(spec: str) -> str:
    """``tiny`` for a preset, the file or directory stem for a shape file or checkpoint."""
    return Path(spec).stem if ("/" in spec or "." in spec) else spec


# The runs of each student: directory suffix -> (distilled, derived from the pruned student). With init "random"
# there is no pruning: kd and ce both start from random weights and "random" is not run.
RUNS = {"kd": (True, True), "ce": (False, True), "random": (False, False)}


def student_dir(layout: Layout, spec: str, distilled: bool) -> Path:
    """``students/<label>-kd`` (distilled) or ``students/<label>-ce`` (its CE-only twin)."""
    return layout.path(STUDENTS) / f"{student_label(spec)}-{'kd' if distilled else 'ce'}"


def random_dir(layout: Layout, spec: str) -> Path:
    """``students/<label>-random``: the randomly initialised CE-only run (with init "prune")."""
    return layout.path(STUDENTS) / f"{student_label(spec)}-random"


def derived_dir(layout: Layout, spec: str) -> Path:
    """``students/<label>-derived``: the pruned checkpoint that the -kd and -ce runs start from."""
    return layout.path(STUDENTS) / f"{student_label(spec)}-derived"


@dataclass
class StudentRun:
    path: str
    student: str
    distilled: bool
    alpha: float
    parameters: int
    heldout: dict[str, Any]  # the run's held-out metrics (train_summary.json's "heldout")
    seconds: float
    derived: bool = False  # started from the pruned student (else: random init)
    outside: dict[str, Any] | None = None  # train_summary.json's "outside": English text outside the corpus


@dataclass
class Derived:
    """One pruning: where the student came from and what it became (``prune.json``'s chosen shape)."""

    path: str
    student: str
    source: str
    parameters: int
    shape: dict[str, int]
    seconds: float


@dataclass
class DistillRecord(Record):
    runs: dict[str, StudentRun]  # by directory name: s32-kd, s32-ce, s32-random, ...
    derived: dict[str, Derived] = field(default_factory=dict)  # by student label


class DistillStage(Stage[DistillSettings, DistillRecord]):
    name = "distill"
    settings = DistillSettings
    record = DistillRecord
    outputs = (STUDENTS,)
    # --full: within an hour on 2 cores without bf16 (the stages' budgets together): nine runs of 64 x 8 x 256 =
    # 131,072 tokens, twice the default's steps and data (140 steps, the earlier --full, measured ~85 min in all)
    full_budget = {"steps": 64, "batch_size": 8}

    def run(self, settings: DistillSettings, upstream: Upstream) -> DistillRecord:
        tasks = _tasks(settings, upstream)
        workers = resolve_workers(upstream.run.workers, upstream.run.device)
        results = run_tasks(tasks, workers, upstream.run.threads)
        runs, derivations = {}, {}
        for task in tasks:
            if task.kind == "prune":
                derivations[task.student_label] = _derived(task, results[task.name])
                continue
            config, summary = task.config, results[task.name]
            runs[task.name] = StudentRun(
                path=config.out,
                student=task.student,
                distilled=config.alpha < 1.0,
                alpha=config.alpha,
                parameters=summary["student"]["parameters"],
                heldout=summary["heldout"],
                seconds=summary["train"]["seconds"],
                derived=task.derived,
                outside=summary.get("outside"),
            )
        return DistillRecord(runs=runs, derived=derivations)

    def report(self, upstream: Upstream) -> list[Section]:
        settings = upstream.settings(DistillSettings)
        quality, rows = quality_table(upstream.layout, settings.students)
        teacher = teacher_eval(upstream.layout)
        intro = (
            "Quality of the PyTorch checkpoints in **bits per byte** (summed next-token loss in bits ÷ UTF-8 bytes of "
            "the text: lower is better, and unlike perplexity it compares models whatever their tokenizer), on the "
            f"same {number(teacher.get('heldout_tokens'), 0)} held-out tokens of the corpus as the teacher, and on "
            f"English text outside the corpus (`{Path((teacher.get('outside') or {}).get('files', ['?'])[0]).name}`, "
            f"{number((teacher.get('outside') or {}).get('tokens'), 0)} tokens, never trained on). **Retention = "
            "teacher bits per byte ÷ student bits per byte** (100 % = as good as the teacher). Top-1 accuracy: the "
            "share of next tokens the model ranks first, and its ratio to the teacher's. The seed does not say what "
            'its "performance" measures, so its percentages are compared with ours as the closest reading.'
        )
        return [
            Section(1, None, [_training_sentence(settings, upstream.settings(TeacherSettings))]),
            Section(
                10,
                "1. Size and quality before and after distillation",
                [intro, "", quality, "", *_quality_verdicts(rows), "", *_derivation_lines(upstream.layout, settings)],
            ),
            Section(61, "Plots", _loss_curves(upstream.layout, settings.students)),
        ]


@dataclass
class Task:
    """One unit of the stage's work: a pruning (``kind`` "prune", a PruneConfig) or a training run ("train", a
    TrainConfig), run once every task named in ``after`` has finished."""

    name: str  # small-derived, small-kd, small-ce, small-random, ...
    kind: str
    config: Any
    student: str
    after: tuple[str, ...] = ()
    derived: bool = False  # a training run that starts from the pruned student

    @property
    def student_label(self) -> str:
        return student_label(self.student)


def _tasks(settings: DistillSettings, upstream: Upstream) -> list[Task]:
    """Every pruning and run of the stage in the sequential order (the chain's critical path first within each
    student: pruning, distilled run, CE twin, random twin), with what each must wait for."""
    tasks: list[Task] = []
    source, source_task = upstream.settings(TeacherSettings).teacher, None
    for student in settings.students:
        init = None
        if settings.init == "prune":
            derived = derived_dir(upstream.layout, student)
            prune = _prune_config(settings, upstream, student, source)
            tasks.append(Task(derived.name, "prune", prune, student, (source_task,) if source_task else ()))
            init = str(derived)
        for kind in RUNS if init is not None else ("kd", "ce"):
            start = init if RUNS[kind][1] else None
            config = _train_config(settings, upstream, student, kind, start)
            after = (Path(start).name,) if start else ()
            tasks.append(Task(Path(config.out).name, "train", config, student, after, derived=start is not None))
        if settings.chain and init is not None:
            source = str(student_dir(upstream.layout, student, True))
            source_task = Path(source).name
    return tasks


def _prune_config(settings: DistillSettings, upstream: Upstream, student: str, source: str) -> Any:
    """``students/<label>-derived``: ``student`` cut from ``source`` (the teacher, or the distilled student before
    it), sized against and probed with the teacher."""
    from edgedistill.distill.config import PruneConfig

    data = upstream.settings(TeacherSettings)
    return PruneConfig(
        source=source,
        out=str(derived_dir(upstream.layout, student)),
        student=student,
        teacher=data.teacher,
        data=list(data.data),
        seq_len=data.seq_len,
        calibration=settings.calibration,
        candidates=settings.candidates,
        probe_steps=settings.probe_steps,
        vocab=settings.vocab,
        seed=settings.seed,
        device=upstream.run.device,
        threads=upstream.run.threads,
    )


def _derived(task: Task, record: dict[str, Any]) -> Derived:
    """A pruning task's summary, from the prune.json record it returned."""
    chosen = record["chosen"]
    return Derived(
        task.config.out, task.student, task.config.source, chosen["parameters"], chosen["shape"], record["seconds"]
    )


def resolve_workers(workers: int, device: str) -> int:
    """``workers`` 0: two processes on a CPU with at least two cores (each on half the threads: small models use
    one core better than two), one on CUDA (one device, no gain)."""
    from edgedistill.system import available_cpus, resolve_device

    if workers:
        return workers
    if device.startswith("cuda") or resolve_device(device).type == "cuda":
        return 1
    return 2 if len(available_cpus()) >= 2 else 1


def worker_pool(workers: int, threads: int) -> tuple[Any, int]:
    """A pool of ``workers`` spawned processes (no forked copy of this process's torch threads) and each one's
    share of ``threads`` (0: the CPUs this process may use)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from edgedistill.system import available_cpus

    share = max(1, (threads or len(available_cpus())) // workers)
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")), share


def run_task(kind: str, config: Any, progress: bool = True) -> dict[str, Any]:
    """Run one task (in this process or a worker's); returns prune.json's record or train_summary.json."""
    if kind == "prune":
        from edgedistill.distill.prune import PRUNE_RECORD, run_prune

        if (Path(config.out) / PRUNE_RECORD).is_file():  # a finished derivation is reused
            return read_json(Path(config.out) / PRUNE_RECORD)
        return run_prune(config, log=log if progress else (lambda message: None))
    from edgedistill.distill.train import train

    return train(config, progress=progress)


def _describe_task(task: Task) -> str:
    if task.kind == "prune":
        return f"deriving {task.name} from {task.config.source}"
    how = f"alpha {task.config.alpha}" if task.config.alpha < 1 else "CE only, alpha 1"
    return f"{task.name} ({how}, {'derived' if task.derived else 'random init'})"


def _critical_first(tasks: list[Task]) -> Any:
    """A sort key: the tasks that more tasks wait on (directly or not) first, the stage's order among equals, so
    that the chain (pruning, distilled run, next pruning, ...) never waits behind a twin."""
    waiting: dict[str, set[str]] = {t.name: set() for t in tasks}
    for task in reversed(tasks):  # a task's dependencies come before it
        for name in task.after:
            waiting[name] |= {task.name} | waiting[task.name]
    order = {t.name: i for i, t in enumerate(tasks)}
    return lambda task: (-len(waiting[task.name]), order[task.name])


def run_tasks(tasks: list[Task], workers: int, threads: int) -> dict[str, dict[str, Any]]:
    """Run ``tasks`` respecting ``after``: in order in this process (``workers`` 1), else in ``workers`` processes,
    each task as soon as what it waits for is done, the chain's critical path first (:func:`_critical_first`),
    each process on its share of ``threads`` (0: the CPUs this process may use). A failed task stops the stage
    with its error once the running ones end; finished runs and prunings are kept and reused by a rerun."""
    import dataclasses

    results: dict[str, dict[str, Any]] = {}
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            log(f"distill: {_describe_task(task)}")
            results[task.name] = run_task(task.kind, task.config)
        return results
    from concurrent.futures import FIRST_COMPLETED, wait

    pending, running = sorted(tasks, key=_critical_first(tasks)), {}
    pool, share = worker_pool(workers, threads)
    with pool:
        while pending or running:
            for task in [t for t in pending if all(a in results for a in t.after)][: workers - len(running)]:
                pending.remove(task)
                config = dataclasses.replace(task.config, threads=share)
                log(f"distill: {_describe_task(task)} [{share} thread{'s' if share > 1 else ''}]")
                running[pool.submit(run_task, task.kind, config, False)] = task
            if not running:
                raise EdgeDistillError(f"distill: {pending[0].name} waits for a task that is not scheduled")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                task = running.pop(future)
                results[task.name] = future.result()  # a worker's error stops the stage here
                log(f"distill: {task.name} done")
    return results


def _train_config(
    settings: DistillSettings, upstream: Upstream, student: str, kind: str, init: str | None
) -> TrainConfig:
    """The TrainConfig of run ``kind`` (:data:`RUNS`) of a student: from the derived checkpoint ``init``, else the
    preset or shape file randomly initialised; distilled (``alpha``) or CE only (alpha 1)."""
    from edgedistill.distill.config import TrainConfig
    from edgedistill.distill.data import OUTSIDE_TEXT

    data = upstream.settings(TeacherSettings)
    run = upstream.run
    return TrainConfig(
        out=str(upstream.layout.path(STUDENTS) / f"{student_label(student)}-{kind}"),
        teacher=data.teacher,
        teacher_cache=str(cache_dir(upstream.layout)) if data.top_k else "",
        student=init or student,
        vocab=settings.vocab,  # a derived student keeps its checkpoint's vocabulary; a random twin is trimmed alike
        data=list(data.data),
        alpha=settings.alpha if RUNS[kind][0] else 1.0,
        temperature=settings.temperature,
        lr=settings.lr_of(student) if init else settings.random_lr,
        freeze_embeddings=settings.freeze_embeddings and init is not None,
        warmup_steps=settings.warmup_steps,
        steps=settings.steps,
        batch_size=settings.batch_size,
        seq_len=data.seq_len,
        seed=settings.seed,
        device=run.device,
        threads=run.threads,
        train_tokens=data.train_tokens,
        heldout_tokens=data.heldout_tokens,
        eval_data=[str(OUTSIDE_TEXT)],
        save_every=max(1, settings.steps // 4),
        resume=True,
    )


# ------------------------------------------------------------------------------------------------ report part
def _training_sentence(settings: DistillSettings, data: TeacherSettings) -> str:
    teacher = ", from a top-" + str(data.top_k) + " teacher cache" if data.top_k else ", teacher online"
    sources = ", ".join(data.data) or "the embedded corpus and the teacher's chat answers"
    budget = f"{settings.steps} steps of {settings.batch_size} x {data.seq_len} tokens (seed {settings.seed})"
    if settings.init == "random":
        return (
            f"Teacher: `{data.teacher}`; data: {sources}; students: "
            f"{', '.join(settings.students)}, randomly initialised, each trained {budget} twice: distilled (alpha "
            f"{settings.alpha}, T {settings.temperature}{teacher}) and CE only (alpha 1)."
        )
    chain = (
        "the first from the teacher, each later one from the distilled student before it (a teacher-assistant chain)"
        if settings.chain
        else "each from the teacher"
    )
    probe = f"{settings.probe_steps} distillation steps each" if settings.probe_steps else "zero-shot loss"
    frozen = " (the derived runs with the teacher's embedding and LM head frozen)" if settings.freeze_embeddings else ""
    vocab = {
        "full": "the teacher's full vocabulary",
        "auto": "a vocabulary trimmed to the tokens the data use (closed under merges; the data tokenize identically)",
    }.get(settings.vocab, f"a vocabulary trimmed to the {settings.vocab} most frequent tokens of the data")
    return (
        f"Teacher: `{data.teacher}`; data: {sources}; students: "
        f"{', '.join(settings.students)}, each with {vocab}, derived by structured pruning ({chain}; importance on "
        f"{settings.calibration} training sequences, {settings.candidates} candidate shapes ranked by {probe}), then "
        f"trained {budget} three ways{frozen}: derived + distilled (alpha {settings.alpha}, T "
        f"{settings.temperature}{teacher}, peak lr {_lrs(settings)}), derived + CE only (alpha 1, the seed's "
        f'"before distillation") and random init + CE only (the preset shape, peak lr {settings.random_lr:g}). '
        "Every run distils from the original teacher."
    )


def _lrs(settings: DistillSettings) -> str:
    """``0.0015`` or ``0.0015 (nano 0.003)``: the derived runs' peak learning rates, as the report states them."""
    others = [
        f"{student_label(s)} {settings.lr_of(s):g}" for s in settings.students if settings.lr_of(s) != settings.lr
    ]
    return f"{settings.lr:g}" + (f" ({', '.join(others)})" if others else "")


def seed_retention(klass: int | None) -> str:
    """The seed's retention for a size class, as its table states it (its 1/4 model is its baseline)."""
    if klass == 4:
        return percent(1.0, 0) + " (its baseline)"
    return percent(SEED_RETENTION[klass], 0) if klass in SEED_RETENTION else MISSING


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


@dataclass
class StudentQuality:
    """One student's row of table 1: bits per byte of its three runs, retention, accuracy, outside text."""

    student: str
    parameters: int
    ratio: float | None  # teacher parameters / student parameters
    bpb_random: float | None  # random init, CE only
    bpb_before: float | None  # derived, CE only
    bpb_after: float  # derived (or random with init "random"), distilled
    ppl_after: float
    retention_before: float | None  # teacher bits per byte / student bits per byte
    retention_after: float | None
    accuracy_after: float | None
    accuracy_ratio: float | None  # of the teacher's
    agreement_after: float | None  # top-1 agreement with the teacher
    outside_bpb: float | None
    outside_retention: float | None
    size_class: int | None  # the seed's size class (bench/claims.py's buckets)

    def cells(self) -> list[str]:
        return [
            self.student,
            number(self.parameters / 1e6, 1, " M"),
            number(self.ratio, 1),
            number(self.bpb_random, 3),
            number(self.bpb_before, 3),
            number(self.bpb_after, 3),
            f"{percent(self.retention_before)} → {percent(self.retention_after)}",
            f"{percent(self.accuracy_after)} ({number(self.accuracy_ratio, 2)})",
            percent(self.agreement_after),
            number(self.ppl_after, 1),
            f"{number(self.outside_bpb, 3)} ({percent(self.outside_retention)})",
            seed_retention(self.size_class),
        ]


def _bpb(summary: dict[str, Any] | None, part: str = "heldout") -> float | None:
    return ((summary or {}).get(part) or {}).get("bits_per_byte")


def _student_quality(layout: Layout, spec: str, teacher: dict[str, Any]) -> StudentQuality | None:
    """A student's row of table 1, or None while its distilled run has no train_summary.json."""
    after = read_json(student_dir(layout, spec, True) / "train_summary.json")
    before = read_json(student_dir(layout, spec, False) / "train_summary.json")
    random = read_json(random_dir(layout, spec) / "train_summary.json")
    if not after:
        return None
    derived = bool(after["student"].get("derived"))
    if not derived:  # init "random": the CE-only twin is the random-init run and nothing was derived
        random, before = before, {}
    params, teacher_params = after["student"]["parameters"], teacher.get("parameters") or 0
    teacher_bpb, teacher_outside = teacher.get("bits_per_byte"), _bpb(teacher, "outside")
    return StudentQuality(
        student=student_label(spec),
        parameters=params,
        ratio=teacher_params / params if teacher_params else None,
        bpb_random=_bpb(random),
        bpb_before=_bpb(before),
        bpb_after=_bpb(after),
        ppl_after=after["heldout"]["perplexity"],
        retention_before=_ratio(teacher_bpb, _bpb(before)),
        retention_after=_ratio(teacher_bpb, _bpb(after)),
        accuracy_after=after["heldout"].get("top1_accuracy"),
        accuracy_ratio=_ratio(after["heldout"].get("top1_accuracy"), teacher.get("top1_accuracy")),
        agreement_after=after["heldout"].get("top1_agreement"),
        outside_bpb=_bpb(after, "outside"),
        outside_retention=_ratio(teacher_outside, _bpb(after, "outside")),
        size_class=size_class(teacher_params, params),
    )


def quality_table(layout: Layout, students: list[str]) -> tuple[str, list[StudentQuality]]:
    """Seed table 1: size and quality (bits per byte) of each student's three runs."""
    teacher = teacher_eval(layout)
    teacher_params = teacher.get("parameters") or 0
    bpb = number(teacher.get("bits_per_byte"), 3)
    rows = [
        ["teacher", number(teacher_params / 1e6, 1, " M"), "1", bpb, bpb, bpb, f"{percent(1.0, 0)}"]
        + [f"{percent(teacher.get('top1_accuracy'))} (1)", MISSING, number(teacher.get("perplexity"), 1)]
        + [f"{number(_bpb(teacher, 'outside'), 3)} ({percent(1.0, 0)})", MISSING]
    ]
    records = [q for q in (_student_quality(layout, s, teacher) for s in students) if q]
    rows += [record.cells() for record in records]
    headers = [
        "model",
        "parameters",
        "teacher ÷ model",
        "bits/byte, random init + CE",
        "bits/byte, derived + CE (before)",
        "bits/byte, derived + KD (after)",
        "retention before → after",
        "top-1 accuracy after (÷ teacher's)",
        "top-1 agreement with teacher",
        "perplexity after",
        "outside the corpus: bits/byte after (retention)",
        "seed's retention",
    ]
    return markdown_table(headers, rows), records


def _verdict(before: float | None, after: float | None, what: str, student: str) -> str | None:
    if before is None or after is None:
        return None
    gain = before / after - 1  # bits per byte: lower is better
    verdict = "improved" if gain > 0.005 else ("made no difference to" if gain > -0.005 else "worsened")
    return (
        f"- `{student}`: {what} {verdict} held-out bits per byte ({number(before, 3)} → {number(after, 3)}, "
        f"{100 * -gain / (1 + gain):+.1f} %)."
    )


def _quality_verdicts(records: list[StudentQuality]) -> list[str]:
    lines = []
    for record in records:
        for line in (
            _verdict(
                record.bpb_random,
                record.bpb_before,
                "pruning from the teacher (random init → derived, both CE)",
                record.student,
            ),
            _verdict(record.bpb_before, record.bpb_after, "distillation (derived + CE → derived + KD)", record.student),
        ):
            if line:
                lines.append(line)
    return lines


def _derivation_lines(layout: Layout, settings: DistillSettings) -> list[str]:
    """How each student was derived: from what, to which shape, with the candidates' scores."""
    from edgedistill.distill.prune import PRUNE_RECORD

    rows = []
    for student in settings.students:
        record = read_json(derived_dir(layout, student) / PRUNE_RECORD)
        if not record:
            continue
        chosen, shape = record["chosen"], record["chosen"]["shape"]
        probe = chosen.get("probe_loss")
        rows.append(
            [
                student_label(student),
                f"`{Path(str(record['source'].get('spec', '?'))).name}`",
                f"{shape['hidden_size']} × {shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads "
                f"({shape['num_key_value_heads']} KV), FFN {shape['intermediate_size']}",
                number(chosen["parameters"] / 1e6, 2, " M"),
                str(len(record["candidates"])),
                number(chosen.get("zero_shot_loss"), 3),
                number(probe, 3),
                number(record.get("seconds"), 0, " s"),
            ]
        )
    if not rows:
        return []
    headers = [
        "student",
        "cut from",
        "shape",
        "parameters",
        "candidates",
        "zero-shot loss",
        "after probe",
        "time",
    ]
    return [
        "How each student was derived (each `students/<name>-derived/prune.json` lists every candidate's scores):",
        "",
        markdown_table(headers, rows),
    ]


def _loss_curves(layout: Layout, students: list[str]) -> list[str]:
    lines = []
    for student in students:
        for directory in (
            student_dir(layout, student, True),
            student_dir(layout, student, False),
            random_dir(layout, student),
        ):
            curve = directory / "loss_curve.png"
            if curve.is_file():
                lines.append(f"![{curve.parent.name} loss]({curve.relative_to(layout.out).as_posix()})")
    return lines
