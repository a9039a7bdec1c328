"""The distillation recipe: :func:`train` reads setup -> loop -> save, one function a stage.

``_setup`` resolves the teacher (or its cache), builds the student, audits the vocabulary, loads the data, builds
the objective and AdamW with a warm-up + cosine schedule, and loads a resumed run's checkpoint; ``_train_loop``
steps, appending to ``metrics.jsonl`` and checkpointing atomically; ``_save`` evaluates on the held-out split and
writes a Hugging Face checkpoint with ``train_summary.json``. The files of the run directory are
:mod:`edgedistill.distill.checkpoint`'s. Under ``torchrun`` it runs DDP (gloo on CPU, NCCL on CUDA); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill import __version__
from edgedistill.deps import require
from edgedistill.distill import teacher as teachers
from edgedistill.distill.checkpoint import (
    CHECKPOINT,
    METRICS,
    SUMMARY,
    load_checkpoint,
    metrics_through,
    plot_losses,
    prepare_out,
    save_checkpoint,
    save_final,
)
from edgedistill.distill.config import SHAPE_FIELDS, StudentShape, TrainConfig
from edgedistill.distill.data import DataStats, PackedData, load_data, load_eval_data, token_byte_lengths
from edgedistill.distill.distributed import Distributed
from edgedistill.distill.evaluation import TeacherFor, cached_teacher, evaluate, online_teacher, supervised_batch
from edgedistill.distill.steps import (
    BatchOrder,
    NonFiniteLoss,
    check_weights,
    first_non_finite,
    make_optimizer,
    train_step,
)
from edgedistill.distill.student import (
    VocabAudit,
    audit_vocab,
    build_student,
    freeze_embeddings,
    init_from_teacher,
    load_student_checkpoint,
    resolve_shape,
)
from edgedistill.errors import EdgeDistillError, one_line
from edgedistill.files import atomic_write_text, claim

StepHook = Callable[[int, dict[str, float]], None]


# ----------------------------------------------------------------------------------------------------------- helpers
def _stopped(step: int, err: NonFiniteLoss, out: Path, last_saved: int | None) -> EdgeDistillError:
    """The error that ends a run whose step ``step`` went non-finite; that step is never saved."""
    if last_saved is None:
        kept = "no checkpoint had been written yet"
    else:
        kept = f"the last good checkpoint, step {last_saved}, is kept in {out / CHECKPOINT}"
    return EdgeDistillError(f"step {step}: {err}; training stopped without saving it and {kept}; try a lower --lr")


# ----------------------------------------------------------------------------------------------------------- recipe
def train(config: TrainConfig, on_step: StepHook | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one distillation and return its summary (also written to ``OUT/train_summary.json``).

    ``on_step(step, metrics)`` is called after every optimizer step (and after that step's checkpoint).
    """
    require("torch")
    require("transformers")
    if not config.out:
        raise EdgeDistillError("out: expected an output directory (--out DIR)")
    out = Path(config.out)
    if config.resume and (out / SUMMARY).is_file() and not (out / CHECKPOINT).exists():
        return json.loads((out / SUMMARY).read_text())  # finished already: nothing to resume
    dist = Distributed(config.device)
    held = contextlib.ExitStack()
    try:
        if dist.is_main:  # only rank 0 writes to OUT; the claim sweeps what a killed run left there
            held.enter_context(claim(out, "out"))
            prepare_out(out, config.resume)
        run = _setup(config, dist, out)
        final_metrics, train_seconds = _train_loop(run, config, dist, on_step, progress)
        dist.barrier()
        summary = _save(run, config, dist, final_metrics, train_seconds) if dist.is_main else {}
        dist.barrier()
        return summary
    finally:
        held.close()
        dist.close()


@dataclass
class _Run:
    """What setup hands the loop and the save: models, data and optimizer on this rank's device."""

    out: Path
    device: Any
    source: teachers.TeacherSource | None  # None when a teacher cache stands in for the teacher
    cache: Any  # a TeacherCache, or None
    tokenizer: Any
    teacher_info: dict[str, Any]
    student: Any
    student_params: int
    audit: VocabAudit
    train_data: PackedData
    heldout: PackedData
    stats: DataStats
    objective: Any  # the DistillationObjective, inside DistributedDataParallel under torchrun
    teacher_for: TeacherFor | None  # None: CE only (alpha 1)
    optimizer: Any
    scheduler: Any
    resumed_step: int | None  # the step of the checkpoint this run resumed from; None: a fresh run
    outside: PackedData | None = None  # --eval-data, loaded before training (rank 0) so a bad file fails early
    vocab_map: Any = None  # a trimmed student's VocabMap (``tokenizer`` is then the student's); None: the teacher's
    mapper: Any = None  # its TeacherMapper on the device
    states: Any = None  # the StateDistillation adding feature / attention terms (unwrapped); None: neither
    plan: Any = None  # the schedule.Plan: each step's phase, data, batch order and on-policy choice

    @property
    def start_step(self) -> int:
        return self.resumed_step or 0


# ---------------------------------------------------------------- setup
def _setup(config: TrainConfig, dist: Distributed, out: Path) -> _Run:
    """Seed, resolve the teacher (or its cache), build the student, audit the vocabulary, load the data, build the
    objective and optimizer, and load the checkpoint of a resumed run."""
    import torch

    from edgedistill.distill.cache import ids_sha256, tokenizer_sha256
    from edgedistill.distill.heads import DistillationObjective, release_free_memory, resolve_dtype

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = dist.device
    cache, source, tokenizer, teacher_config, teacher_info = _resolve_teacher(config)
    train_data, heldout, stats = _load_run_data(config, tokenizer)
    if stats.bad_lines and dist.is_main:
        print(f"skipped {stats.bad_lines} malformed line(s); first: {stats.bad_examples[0]}")
    if cache is not None:
        cache.check_run(config.seq_len, ids_sha256(train_data.ids, heldout.ids), tokenizer_sha256(tokenizer))
    vocab_map, student_tokenizer = _student_vocabulary(config, tokenizer, stats)
    if vocab_map is not None:
        train_data, heldout, stats = _student_data(
            config, vocab_map, student_tokenizer, cache, train_data, heldout, stats
        )
    outside = None
    if config.eval_data and dist.is_main:  # a trimmed student reads it with its own tokenizer (more tokens, exact)
        outside = load_eval_data(config.eval_data, student_tokenizer, config.seq_len, config.eval_tokens)
    if config.init == "prune":
        source = _pruning_source(config, source, teacher_info)
    student, audit = _make_student(config, teacher_config, tokenizer, student_tokenizer, vocab_map)
    student, teacher = _training_teacher(config, source, student, device, train_data, out, dist.is_main, vocab_map)
    if config.init == "prune" and cache is not None:
        source = None  # the cache stands in for the teacher from here on
    student.to(device).train()
    if config.freeze_embeddings:
        freeze_embeddings(student)
    student_params = sum(p.numel() for p in student.parameters())
    release_free_memory()

    objective: Any = DistillationObjective(student, config, dtype=resolve_dtype(config.precision, device))
    states = None
    if any(c.uses_teacher_states for c in config.phase_configs):  # --init prune's record is rank 0's: read it
        from edgedistill.distill.feature_losses import build_state_distillation

        dist.barrier()
        objective = states = build_state_distillation(objective, teacher, config, out, teacher_info.get("sha256"))
    if dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        objective = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
    mapper = None
    if vocab_map is not None:
        from edgedistill.distill.vocab import TeacherMapper

        mapper = TeacherMapper(vocab_map, device)
    if cache is not None:
        kd = any(c.alpha < 1.0 for c in config.phase_configs)
        teacher_for: TeacherFor | None = cached_teacher(cache, mapper) if kd else None
    else:
        teacher_for = online_teacher(teacher, mapper) if teacher is not None else None
    if states is not None and teacher_for is not None:
        teacher_for = states.teacher_provider(teacher_for)

    plan = _plan(config, dist, train_data, stats, student_tokenizer)
    optimizer, scheduler = make_optimizer(student, config, states.projections.parameters() if states else ())
    resumed_step = _restore(out, config, stats.sha256, student, optimizer, scheduler, dist.is_main, states, plan)
    dist.barrier()
    return _Run(
        out=out,
        device=device,
        source=source,
        cache=cache,
        tokenizer=student_tokenizer,
        teacher_info=teacher_info,
        student=student,
        student_params=student_params,
        audit=audit,
        train_data=train_data,
        heldout=heldout,
        stats=stats,
        objective=objective,
        teacher_for=teacher_for,
        optimizer=optimizer,
        scheduler=scheduler,
        resumed_step=resumed_step,
        outside=outside,
        vocab_map=vocab_map,
        mapper=mapper,
        states=states,
        plan=plan,
    )


def _plan(config: TrainConfig, dist: Distributed, train_data: PackedData, stats: DataStats, tokenizer: Any) -> Any:
    """The run's :class:`~edgedistill.distill.schedule.Plan`: a phase's own data in ``tokenizer`` (the student's),
    each phase's batch order seeded by (seed, phase index)."""
    from edgedistill.distill.schedule import Plan, phase_seed

    def load(phase_config: TrainConfig) -> tuple[PackedData, str]:
        data, _, phase_stats = _load_run_data(phase_config, tokenizer)
        return data, phase_stats.sha256

    def order(rows: int, index: int) -> BatchOrder:
        return BatchOrder(rows, config.batch_size, phase_seed(config.seed, index), dist.world_size, dist.rank)

    return Plan(config, train_data, stats.sha256, load, order)


def _resolve_teacher(config: TrainConfig) -> tuple[Any, teachers.TeacherSource | None, Any, Any, dict[str, Any]]:
    """(cache, source, tokenizer, teacher configuration, teacher info for the summary). A teacher cache brings the
    teacher's tokenizer and configuration but no weights: then ``source`` is None."""
    if not config.teacher_cache:
        source = teachers.resolve_teacher(config.teacher)
        tokenizer = teachers.load_tokenizer(source)
        teacher_config = teachers.load_config(source)
        info = {"spec": config.teacher, "name": source.name, "path": str(source.path), "sha256": source.fingerprint()}
        return None, source, tokenizer, teacher_config, info
    from transformers import AutoConfig, AutoTokenizer

    from edgedistill.distill.cache import TeacherCache

    cache = TeacherCache(Path(config.teacher_cache))
    if config.init == "teacher":
        raise EdgeDistillError(
            "init: --init teacher needs the teacher's weights, which a --teacher-cache run does not load "
            "(--init prune loads them from --teacher for the pruning only)"
        )
    if config.loss != "fkl" and config.alpha < 1.0:
        raise EdgeDistillError(f"loss: a teacher cache holds a top-K, which supports fkl only, got {config.loss}")
    tokenizer = AutoTokenizer.from_pretrained(config.teacher_cache)
    teacher_config = AutoConfig.from_pretrained(config.teacher_cache)
    info = dict(cache.manifest.teacher, cache=config.teacher_cache, top_k=cache.manifest.top_k)
    return cache, None, tokenizer, teacher_config, info


def _pruning_source(
    config: TrainConfig, source: teachers.TeacherSource | None, teacher_info: dict[str, Any]
) -> teachers.TeacherSource:
    """The teacher whose weights ``--init prune`` cuts: the run's, or with a cache ``--teacher``, which must be the
    teacher the cache was made from."""
    if Path(config.student).is_dir():
        raise EdgeDistillError(
            f"init: --init prune derives the student from the teacher, but --student {config.student} is a "
            "checkpoint; pass a preset or shape file (or `edgedistill prune` a checkpoint into a smaller one)"
        )
    if source is not None:
        return source
    pruned = teachers.resolve_teacher(config.teacher)
    cached = teacher_info.get("sha256")
    if cached and pruned.fingerprint() != cached:
        raise EdgeDistillError(
            f"init: --init prune cuts --teacher {config.teacher}, but the teacher cache {config.teacher_cache} "
            "was made from another teacher (sha256 differs); pass the cache's teacher as --teacher"
        )
    return pruned


def _student_vocabulary(config: TrainConfig, tokenizer: Any, stats: DataStats) -> tuple[Any, Any]:
    """(VocabMap or None, the student's tokenizer): a checkpoint student's own (its ``vocab_map.json``), else
    ``--vocab`` trimmed on the data's token counts, else the teacher's (None, ``tokenizer``)."""
    from edgedistill.distill.config import parse_vocab
    from edgedistill.distill.vocab import VocabMap, choose_vocab, trim_tokenizer

    if Path(config.student).is_dir():
        vocab_map = VocabMap.load(Path(config.student))
        if vocab_map is None:
            return None, tokenizer
        _, student_tokenizer = load_student_checkpoint(Path(config.student), weights=False)
        return vocab_map.with_mode(config.vocab_kd), student_tokenizer
    size = parse_vocab(config.vocab)
    if size is None:
        return None, tokenizer
    student_tokenizer, vocab_map = trim_tokenizer(tokenizer, choose_vocab(tokenizer, stats.token_counts, size))
    return vocab_map.with_mode(config.vocab_kd), student_tokenizer


def _student_data(
    config: TrainConfig,
    vocab_map: Any,
    student_tokenizer: Any,
    cache: Any,
    train_data: PackedData,
    heldout: PackedData,
    stats: DataStats,
) -> tuple[PackedData, PackedData, DataStats]:
    """The data in the student's ids: the teacher's tokens mapped where the student kept every one (``auto`` on
    these data: identical tokenization), else the data tokenized again by the student's tokenizer, which a teacher
    cache (positions of the teacher's tokens) cannot serve."""
    try:
        return (
            PackedData(vocab_map.student_ids(train_data.ids, "the training data"), train_data.weights),
            PackedData(vocab_map.student_ids(heldout.ids, "the held-out data"), heldout.weights),
            stats,
        )
    except EdgeDistillError as err:
        if cache is not None:
            raise EdgeDistillError(
                f"{err}; a student that tokenizes the data differently cannot use a teacher cache: trim with "
                "--vocab auto, or run the teacher online"
            ) from None
    return _load_run_data(config, student_tokenizer)


def _load_run_data(config: TrainConfig, tokenizer: Any) -> tuple[PackedData, PackedData, DataStats]:
    """The run's training and held-out data, tokenized by ``tokenizer``, split and budgeted as ``config`` says."""
    return load_data(
        config.data,
        tokenizer,
        config.seq_len,
        config.val_fraction,
        config.tag_weight,
        config.skip_bad_lines,
        config.train_tokens,
        config.heldout_tokens,
    )


def _make_student(
    config: TrainConfig, teacher_config: Any, tokenizer: Any, student_tokenizer: Any, vocab_map: Any
) -> tuple[Any, VocabAudit]:
    """The student (a checkpoint directory, or built to a preset or shape file) and its vocabulary audit. With
    ``--init prune`` this is a stand-in of the teacher's shape until :func:`_training_teacher` derives it."""
    rows = vocab_map.size if vocab_map is not None else teacher_config.vocab_size
    if config.init == "prune":
        return None, audit_vocab(tokenizer, teacher_config.vocab_size, rows, student_tokenizer, vocab_map)
    own_tokenizer = None
    if Path(config.student).is_dir():
        student, own_tokenizer = load_student_checkpoint(Path(config.student))
    else:
        shape = resolve_shape(config.student, teacher_config, rows)
        student = build_student(shape, teacher_config, student_tokenizer, rows)
    if vocab_map is not None:
        own_tokenizer = student_tokenizer
    audit = audit_vocab(tokenizer, teacher_config.vocab_size, student.config.vocab_size, own_tokenizer, vocab_map)
    return student, audit


def _training_teacher(
    config: TrainConfig,
    source: teachers.TeacherSource | None,
    student: Any,
    device: Any,
    train_data: PackedData,
    out: Path,
    is_main: bool,
    vocab_map: Any = None,
) -> tuple[Any, Any]:
    """(student, the teacher model the loop runs or None). None: a cache run (``source`` None), or CE only
    (alpha 1), where no teacher is in memory while training (the final evaluation loads it). ``--init teacher``
    first copies the teacher's full-precision weights into ``student``; ``--init prune`` derives the student from
    them (:func:`_derive`). Either then runs the teacher in its own dtype."""
    import torch

    from edgedistill.distill.heads import resolve_dtype

    needs_teacher = config.needs_teacher_model and source is not None
    needs_teacher = needs_teacher and not config.teacher_cache
    if config.init in ("teacher", "prune"):
        teacher = teachers.load_model(source, torch.float32, device)
        if config.init == "teacher":
            init_from_teacher(student, teacher, None if vocab_map is None else vocab_map.teacher_ids)
        else:
            student = _derive(config, teacher, train_data, device, out, is_main, vocab_map)
        return student, teacher.to(resolve_dtype(config.teacher_dtype, device)) if needs_teacher else None
    if needs_teacher:
        return student, teachers.load_model(source, resolve_dtype(config.teacher_dtype, device), device)
    return student, None


def _derive(
    config: TrainConfig,
    teacher: Any,
    train_data: PackedData,
    device: Any,
    out: Path,
    is_main: bool,
    vocab_map: Any = None,
) -> Any:
    """``--init prune``: the student cut from ``teacher`` to ``--student`` (preset or shape file) on calibration
    rows of the training data, its candidates and scores written to ``OUT/prune.json`` (rank 0). A trimmed
    student keeps the embedding rows of its vocabulary (``vocab_map``); the data are then in its ids."""
    import torch

    from edgedistill.distill import prune
    from edgedistill.distill.heads import resolve_dtype

    ids = torch.from_numpy(train_data.ids).long()
    rows = None
    if vocab_map is not None:  # the teacher reads its own ids
        rows = torch.from_numpy(vocab_map.teacher_ids)
        ids = rows[ids]
    calibration, probe = prune.calibration_rows(ids, prune.CALIBRATION_ROWS, prune.PROBE_ROWS)
    reference = sum(p.numel() for p in teacher.parameters())
    target = prune.target_parameters(config.student, reference)
    vocab_size = len(rows) if rows is not None else None
    shape = None if target is not None else resolve_shape(config.student, teacher.config, vocab_size)
    record = out / prune.PRUNE_RECORD
    if config.resume and record.is_file():  # the shape chosen before the interruption: no second search
        try:
            shape = StudentShape(**json.loads(record.read_text(encoding="utf-8"))["chosen"]["shape"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise EdgeDistillError(f"{record}: unreadable pruning record ({one_line(err)}); remove it") from None
    derivation = prune.derive(
        teacher,
        target or 0.0,
        calibration.to(device),
        probe.to(device),
        prune.PruneSettings(),
        dtype=resolve_dtype(config.precision, device),
        shape=shape,
        log=print if is_main else None,
        vocab_rows=rows,
    )
    if is_main:
        atomic_write_text(record, json.dumps(derivation.record, indent=2) + "\n")
    return derivation.student


def _restore(
    out: Path,
    config: TrainConfig,
    data_sha256: str,
    student: Any,
    optimizer: Any,
    scheduler: Any,
    is_main: bool,
    states: Any = None,
    plan: Any = None,
) -> int | None:
    """Load a resumed run's checkpoint into the student, optimizer, scheduler (and ``states``' projections) and
    return its step, after dropping the metrics rows of later steps; None for a fresh run, whose stale metrics file
    is removed."""
    metrics_path = out / METRICS
    state = load_checkpoint(out, config, data_sha256) if config.resume else None
    if state is None:
        if is_main:
            metrics_path.unlink(missing_ok=True)
        return None
    try:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if states is not None:
            states.load_checkpoint_state(state)
        if plan is not None:
            plan.check_resumed(state, out)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise EdgeDistillError(f"resume: {out / CHECKPOINT} does not fit this run ({detail})") from None
    if is_main and metrics_path.exists():  # drop rows of steps the checkpoint does not contain
        atomic_write_text(metrics_path, metrics_through(metrics_path, state["step"]))
    return state["step"]


# ---------------------------------------------------------------- loop
def _train_loop(
    run: _Run, config: TrainConfig, dist: Distributed, on_step: StepHook | None, progress: bool
) -> tuple[dict[str, Any], float]:
    """Steps ``start_step + 1 .. steps``; rank 0 logs each to ``metrics.jsonl`` and checkpoints. Returns the last
    step's metrics (empty when the run resumed from its final step's checkpoint) and the loop's seconds."""
    from tqdm import tqdm

    tokens_per_step = _tokens_per_step(config, dist.world_size)
    progress_bar = tqdm(
        total=config.steps,
        initial=run.start_step,
        disable=not (progress and dist.is_main),
        unit="step",
        dynamic_ncols=True,
    )
    started = time.perf_counter()
    metrics: dict[str, Any] = {}
    last_saved = run.resumed_step
    with progress_bar as bar:  # closed before an error is printed, so it ends its own line
        for step in range(run.start_step + 1, config.steps + 1):
            step_start = time.perf_counter()
            phase = run.plan.apply(step, run.objective, run.states)
            on_policy = run.plan.on_policy(step)
            try:
                (loss_value, ce_value, kd_value, *term_values), grad_norm = _optimizer_step(
                    run, config, dist, step, phase.config, on_policy
                )
            except NonFiniteLoss as err:
                raise _stopped(step, err, run.out, last_saved) from None
            seconds = time.perf_counter() - step_start
            metrics = {
                "step": step,
                "loss": loss_value,
                "ce": None if on_policy else ce_value,  # no ground truth for the student's samples
                "kd": kd_value if run.teacher_for is not None and (on_policy or phase.config.alpha < 1.0) else None,
                **dict(zip(run.states.term_names if run.states is not None else (), term_values)),
                "lr": run.scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "seconds": seconds,
                "tokens_per_second": tokens_per_step / seconds,
                **run.plan.row(phase, on_policy),
            }
            if dist.is_main:
                last_saved = _log_and_checkpoint(run, config, step, metrics, last_saved)
                postfix = {"loss": f"{loss_value:.3f}", "ce": f"{ce_value:.3f}"}
                if metrics["kd"] is not None:
                    postfix["kd"] = f"{kd_value:.3f}"
                postfix["tok/s"] = f"{metrics['tokens_per_second']:.0f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
            if on_step is not None:
                on_step(step, metrics)
    return metrics, time.perf_counter() - started


def _tokens_per_step(config: TrainConfig, world_size: int) -> int:
    return config.batch_size * config.seq_len * config.grad_accum * world_size


def _optimizer_step(
    run: _Run, config: TrainConfig, dist: Distributed, step: int, phase: TrainConfig, on_policy: bool = False
) -> tuple[list[float], float]:
    """Step ``step`` of a phase with settings ``phase``: its ``grad_accum`` micro-batches (the student's samples on
    an on-policy step, :mod:`~edgedistill.distill.on_policy`) with the teacher's signal, one :func:`train_step`,
    and the ([loss, ce, kd, *terms] means over ranks, grad norm). A non-finite mean raises :class:`NonFiniteLoss`
    on every rank."""
    from edgedistill.distill import on_policy as gkd

    generator = gkd.generator(run.device, config.seed, step, dist.rank) if on_policy else None
    wants_signal = on_policy or phase.alpha < 1.0 or phase.uses_teacher_states
    micro_batches = []
    for micro in range(config.grad_accum):
        data, rows = run.plan.batch_rows(step, micro)
        if on_policy:
            inputs, positions, labels, weights = gkd.on_policy_batch(run.student, data, rows, generator, run.objective)
        else:
            inputs, positions, labels, weights = supervised_batch(data, rows, run.device)
        signal = None
        if run.teacher_for is not None and wants_signal:
            signal = run.teacher_for("train", rows, inputs, positions)
        micro_batches.append((inputs, positions, labels, weights, signal))
    with gkd.divergence_only(run.objective, run.states) if on_policy else contextlib.nullcontext():
        sums, grad_norm = train_step(run.objective, micro_batches, run.optimizer, run.scheduler, config.grad_clip)
    means = dist.all_mean(sums)
    non_finite = first_non_finite(means)
    if non_finite:  # the mean over ranks, so that every rank stops at the same step
        raise NonFiniteLoss(*non_finite)
    return means, grad_norm


def _log_and_checkpoint(
    run: _Run, config: TrainConfig, step: int, metrics: dict[str, Any], last_saved: int | None
) -> int | None:
    """Rank 0's writes after ``step``: its metrics row every ``log_every`` steps, a checkpoint every ``save_every``
    (both at the last step). Returns the step of the checkpoint now in OUT."""
    if step % config.log_every == 0 or step == config.steps:
        with open(run.out / METRICS, "a", encoding="utf-8") as log:
            log.write(json.dumps(metrics) + "\n")
    # the checkpoint after its row: a kill between the two leaves a row that a resume drops
    if step % config.save_every == 0 or step == config.steps:
        try:
            check_weights(run.student)  # a step that broke a weight must not replace the last good checkpoint
            extra = run.states.checkpoint_state() if run.states is not None else {}  # feature projections
            extra = {**extra, **run.plan.checkpoint_state()}  # a schedule's phases
            save_checkpoint(run.out, step, run.student, run.optimizer, run.scheduler, config, run.stats.sha256, extra)
        except NonFiniteLoss as err:
            raise _stopped(step, err, run.out, last_saved) from None
        return step
    return last_saved


# ---------------------------------------------------------------- save
def _save(
    run: _Run, config: TrainConfig, dist: Distributed, final_metrics: dict[str, Any], train_seconds: float
) -> dict[str, Any]:
    """Rank 0: evaluate on the held-out split, write the Hugging Face checkpoint in place of the training
    checkpoint, then ``train_summary.json`` and the loss plot. Returns the summary."""
    run.optimizer = run.scheduler = None  # AdamW's moments go before the evaluation (the scheduler holds them too)
    teacher_for = _evaluation_teacher(run, config)
    byte_lengths = token_byte_lengths(run.tokenizer)
    result = evaluate(
        run.student, teacher_for, run.heldout, config.batch_size, run.device, config.eval_tokens, byte_lengths
    )
    teacher_for = run.teacher_for = run.objective = None  # the teacher goes before the checkpoint is written
    outside = None
    if run.outside is not None:  # text outside the training data: the student alone (a cache holds no teacher)
        outside = evaluate(run.student, None, run.outside, config.batch_size, run.device, 0, byte_lengths)
        outside["files"] = list(config.eval_data)
    save_final(run.out, run.student, run.tokenizer, run.vocab_map)
    (run.out / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: the final checkpoint replaces it
    summary = _summary(run, config, dist.world_size, final_metrics, train_seconds, result, outside)
    atomic_write_text(run.out / SUMMARY, json.dumps(summary, indent=2) + "\n")
    plot_losses(run.out / METRICS, run.out / "loss_curve.png")
    return summary


def _evaluation_teacher(run: _Run, config: TrainConfig) -> TeacherFor:
    """The teacher signal the held-out evaluation compares with: the cache, the loop's teacher, or, after CE-only
    training, the teacher loaded now."""
    if run.cache is not None:
        return cached_teacher(run.cache, run.mapper)
    if run.teacher_for is not None:
        return run.teacher_for
    from edgedistill.distill.heads import resolve_dtype

    dtype = resolve_dtype(config.teacher_dtype, run.device)
    return online_teacher(teachers.load_model(run.source, dtype, run.device), run.mapper)


def _summary(
    run: _Run,
    config: TrainConfig,
    world_size: int,
    final_metrics: dict[str, Any],
    train_seconds: float,
    heldout: dict[str, float],
    outside: dict[str, Any] | None,
) -> dict[str, Any]:
    """The contents of ``train_summary.json``."""
    steps_run = config.steps - run.start_step
    tokens_per_second = steps_run * _tokens_per_step(config, world_size) / train_seconds if steps_run else None
    stats, student_config = run.stats, run.student.config
    return {
        "edgedistill_version": __version__,
        "teacher": dict(run.teacher_info, vocab_rows=run.audit.teacher_rows),
        "student": {
            "spec": config.student,
            "parameters": run.student_params,
            "shape": {k: getattr(student_config, k) for k in (*SHAPE_FIELDS, "head_dim", "vocab_size")},
            "init": config.init,
            "derived": _derivation(run.out, config),
        },
        "vocab": {
            "tokenizer_size": run.audit.tokenizer_size,
            "shared_rows": run.audit.shared_rows,
            "trimmed": None
            if run.vocab_map is None
            else {"size": run.vocab_map.size, "teacher_size": run.vocab_map.teacher_size, "kd": run.vocab_map.mode},
        },
        "data": {
            "files": stats.files,
            "records": stats.records,
            "bad_lines": stats.bad_lines,
            "train_tokens": stats.train_tokens,
            "heldout_tokens": stats.heldout_tokens,
            "tag_tokens": stats.tag_tokens,
            "sha256": stats.sha256,
        },
        "train": {
            "steps": config.steps,
            "resumed_from": run.start_step,
            "seconds": train_seconds,
            "tokens_per_second": tokens_per_second,
            "final": final_metrics,
            "world_size": world_size,
            "device": str(run.device),
            **({"terms": run.states.describe(config)} if run.states is not None else {}),
            **run.plan.describe(),
        },
        "heldout": heldout,
        "outside": outside,
        "config": config.to_dict(),
    }


def _derivation(out: Path, config: TrainConfig) -> dict[str, Any] | None:
    """What the student was pruned from and to (``prune.json``: this run's, or the checkpoint's it started from),
    or None for a student that was not derived by pruning."""
    from edgedistill.distill.prune import PRUNE_RECORD

    for record in (out / PRUNE_RECORD, Path(config.student) / PRUNE_RECORD):
        if record.is_file():
            data = json.loads(record.read_text(encoding="utf-8"))
            return {"record": str(record), "source": data.get("source"), "chosen": data.get("chosen")}
    return None
