"""The distillation recipe: setup -> loop -> save.

Reads top to bottom like torchtune's KD recipe: resolve the teacher, build the student, audit the vocabulary, load
the data, then train with AdamW and a cosine schedule, checkpointing atomically, and finally evaluate on the
held-out split and write a Hugging Face checkpoint with ``train_summary.json``. Under ``torchrun`` it runs DDP
(gloo on CPU, NCCL on CUDA); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgedistill import __version__
from edgedistill._deps import require
from edgedistill.distill import teacher as teachers
from edgedistill.distill.config import TrainConfig
from edgedistill.distill.data import PackedData, load_data
from edgedistill.distill.student import (
    audit_vocab,
    build_student,
    init_from_teacher,
    load_student_checkpoint,
    resolve_shape,
)
from edgedistill.errors import EdgeDistillError
from edgedistill.files import atomic_write_text, claim, make_temp_dir, publish, temp_path

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"
# Settings a resumed run may change; anything else would make the resumed run a different run.
RESUMABLE_CHANGES = {"resume", "log_every", "save_every", "threads", "device", "eval_tokens", "out"}

StepHook = Callable[[int, dict[str, float]], None]


# ----------------------------------------------------------------------------------------------------------- helpers
class _Distributed:
    """The torchrun environment: world size, rank, and the device this rank trains on."""

    def __init__(self, requested_device: str) -> None:
        import torch

        from edgedistill.distill.heads import resolve_device

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if requested_device.startswith("cuda"):
            available = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = int(requested_device.partition(":")[2] or 0)
            if index >= available:
                accepted = "auto or cpu" if not available else f"auto, cpu, cuda or cuda:0..{available - 1}"
                raise EdgeDistillError(
                    f"device: {requested_device!r} was asked for but this machine has {available} CUDA device(s); "
                    f"expected {accepted}"
                )
        device = resolve_device(requested_device)
        if device.type == "cuda" and device.index is None and self.world_size > 1:
            device = torch.device(f"cuda:{local_rank}")
        self.device = device
        if self.world_size > 1:
            import torch.distributed as dist

            backend = "nccl" if self.device.type == "cuda" else "gloo"  # MiniMind hard-codes NCCL (FACTS.md)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(backend=backend)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_mean(self, values: list[float]) -> list[float]:
        if self.world_size == 1:
            return values
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak (MiniMind decays to 10 %)."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _BatchOrder:
    """Which packed rows form micro-batch ``m`` on this rank: a DistributedSampler order per epoch, so the order is
    a pure function of (seed, step) and a resumed run sees exactly the batches the interrupted one would have."""

    def __init__(self, num_rows: int, batch_size: int, seed: int, world_size: int, rank: int) -> None:
        from torch.utils.data import DistributedSampler

        self.sampler = DistributedSampler(range(num_rows), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.per_epoch = len(self.sampler)
        self.batch_size = batch_size
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {}  # keep one epoch's order in memory
            self.sampler.set_epoch(epoch)
            self._orders[epoch] = list(self.sampler)
        return self._orders[epoch]

    def rows(self, micro_batch: int) -> list[int]:
        first = micro_batch * self.batch_size
        return [self._order(p // self.per_epoch)[p % self.per_epoch] for p in range(first, first + self.batch_size)]


def _batch(data: PackedData, rows: list[int] | slice, device: Any) -> tuple[Any, Any, Any, Any]:
    """(inputs [B, L], positions [N], labels [N], weights [N]) for the supervised positions of some rows."""
    import torch

    ids = torch.from_numpy(data.ids[rows]).long()
    weights = torch.from_numpy(data.weights[rows])[:, 1:].reshape(-1)
    positions = torch.nonzero(weights > 0).squeeze(1)
    labels = ids[:, 1:].reshape(-1)[positions]
    return ids[:, :-1].to(device), positions.to(device), labels.to(device), weights[positions].to(device)


def make_optimizer(student: Any, config: TrainConfig) -> tuple[Any, Any]:
    """AdamW (no weight decay on norms) and the warm-up + cosine schedule."""
    import torch

    decay = [p for p in student.parameters() if p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config))


def train_step(
    objective: Any, micro_batches: list[tuple[Any, ...]], optimizer: Any, scheduler: Any, grad_clip: float
) -> tuple[list[float], float]:
    """One optimizer step over ``micro_batches`` of (inputs, positions, labels, weights, teacher signal) — gradient
    accumulation; returns ([loss, ce, kd] means, grad norm). ``objective`` (a :class:`DistillationObjective`,
    possibly inside DistributedDataParallel) returns the loss; gradients are all-reduced on the last micro-batch.
    """
    import torch

    sums = [0.0, 0.0, 0.0]
    count = len(micro_batches)
    for index, (inputs, positions, labels, weights, teacher) in enumerate(micro_batches):
        defer_sync = index < count - 1 and hasattr(objective, "no_sync")
        with objective.no_sync() if defer_sync else contextlib.nullcontext():
            loss, ce, kd = objective(inputs, positions, labels, weights, teacher)
            (loss / count).backward()
        sums[0] += loss.item() / count
        sums[1] += ce.item() / count
        sums[2] += (kd.item() if kd is not None else 0.0) / count
    grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip or float("inf"))
    if not math.isfinite(float(grad_norm)):
        # the step would write NaN into every weight; the gradients are all-reduced, so every rank stops here
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(*(_first_non_finite(sums) or ("gradient norm", float(grad_norm))))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, float(grad_norm)


class NonFiniteLoss(EdgeDistillError):
    """A loss or the gradient norm of a step is NaN or infinite; raised before the optimizer applies the step."""

    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"the {what} became non-finite ({value})")
        self.what, self.value = what, value


def _first_non_finite(sums: list[float]) -> tuple[str, float] | None:
    """(name, value) of the first non-finite of the step's [loss, ce, kd] means, the parts before the total."""
    for name, value in (("CE loss", sums[1]), ("KD loss", sums[2]), ("total loss", sums[0])):
        if not math.isfinite(value):
            return name, value
    return None


TeacherFor = Callable[[str, Any, Any, Any], "dict[str, Any] | None"]


def online_teacher(teacher: Any) -> TeacherFor:
    """The live teacher as a provider of the objective's teacher signal (hidden states + head weight)."""
    from edgedistill.distill.heads import SupervisedLogits, teacher_signal

    head = SupervisedLogits(teacher).eval() if teacher is not None else None
    return lambda split, rows, inputs, positions: teacher_signal(head, inputs, positions)


def cached_teacher(cache: Any) -> TeacherFor:
    """A :class:`~edgedistill.distill.cache.TeacherCache` as a provider of the objective's teacher signal."""
    return lambda split, rows, inputs, positions: cache.signal(split, rows, positions)


def evaluate(
    student: Any, teacher_for: TeacherFor | None, data: PackedData, batch_size: int, device: Any, max_tokens: int = 0
) -> dict[str, float]:
    """Held-out cross-entropy (every supervised token weighs 1), perplexity, forward KL (T = 1) to the teacher and
    top-1 agreement with the teacher, over up to ``max_tokens`` supervised tokens (0: all). With a cached teacher
    the KL is the top-K one (``sparse_forward_kl``) and agreement is with the teacher's top-1 id. The student runs in
    float32 whatever its training precision, so that held-out numbers compare across runs and machines."""
    import torch

    from edgedistill.distill.heads import SupervisedLogits, dense_teacher_logits
    from edgedistill.distill.losses import chunk_rows, divergence, sparse_forward_kl

    student_head = SupervisedLogits(student).eval()
    totals = {"ce": 0.0, "kd": 0.0, "agree": 0.0, "tokens": 0}
    with torch.no_grad():
        for start in range(0, data.num_sequences, batch_size):
            rows = slice(start, start + batch_size)
            inputs, positions, labels, weights = _batch(data, rows, device)
            if len(positions) == 0:
                continue
            # hidden states, or whole logits for heads that post-process them
            student_out = (student_head.hidden if student_head.direct else student_head)(inputs, positions).float()
            teacher = teacher_for("heldout", rows, inputs, positions) if teacher_for is not None else None
            # [chunk, V] logits at a time, as in training: a batch's full logits would be 2048 x 49,152 floats.
            chunk = chunk_rows(student_head.head_weight.shape[0])
            for first in range(0, len(positions), chunk):
                part = slice(first, first + chunk)
                student_logits = student_out[part]
                if student_head.direct:
                    student_logits = torch.nn.functional.linear(student_logits, student_head.head_weight.float())
                totals["ce"] += torch.nn.functional.cross_entropy(student_logits, labels[part], reduction="sum").item()
                count = student_logits.shape[0]
                totals["tokens"] += count
                if teacher is None:
                    continue
                if "teacher_ids" in teacher:
                    ids = teacher["teacher_ids"][part]
                    kd = sparse_forward_kl(
                        student_logits, ids, teacher["teacher_logprobs"][part], teacher["teacher_tail"][part]
                    )
                    teacher_top1 = ids[:, 0]
                else:
                    teacher_logits = dense_teacher_logits(teacher, part)
                    shared = min(student_logits.shape[-1], teacher_logits.shape[-1])
                    teacher_logits = teacher_logits[:, :shared].float()
                    kd = divergence("fkl", student_logits[:, :shared], teacher_logits)
                    teacher_top1 = teacher_logits.argmax(-1)
                totals["kd"] += kd.item() * count
                totals["agree"] += (student_logits.argmax(-1) == teacher_top1).sum().item()
            if max_tokens and totals["tokens"] >= max_tokens:
                break
    tokens = max(1, totals["tokens"])
    result = {"tokens": totals["tokens"], "ce": totals["ce"] / tokens, "perplexity": math.exp(totals["ce"] / tokens)}
    if teacher_for is not None:
        result.update(kd_to_teacher=totals["kd"] / tokens, top1_agreement=totals["agree"] / tokens)
    student.train()
    return result


# ----------------------------------------------------------------------------------------------------------- saving
def _save_checkpoint(
    out: Path, step: int, model: Any, optimizer: Any, scheduler: Any, config: TrainConfig, data_sha256: str
) -> None:
    import torch

    bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise NonFiniteLoss(f"weight {bad}", float("nan"))
    # Only tensors and plain data (dicts, lists, numbers, strings): _load_checkpoint reads it with weights_only.
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "config": config.to_dict(),
        "data_sha256": data_sha256,
        "version": __version__,
    }
    tmp = temp_path(out, CHECKPOINT)
    try:
        torch.save(state, tmp)
        publish(tmp, out / CHECKPOINT)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _stopped(step: int, err: NonFiniteLoss, out: Path, last_saved: int | None) -> EdgeDistillError:
    """The error that ends a run whose step ``step`` went non-finite; that step is never saved."""
    if last_saved is None:
        kept = "no checkpoint had been written yet"
    else:
        kept = f"the last good checkpoint, step {last_saved}, is kept in {out / CHECKPOINT}"
    return EdgeDistillError(f"step {step}: {err}; training stopped without saving it and {kept}; try a lower --lr")


def _load_checkpoint(out: Path, config: TrainConfig, data_sha256: str) -> dict[str, Any] | None:
    import torch

    path = out / CHECKPOINT
    if not path.is_file():
        return None  # nothing to resume: --resume starts the run, so that reruns of a script just continue
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects would run whatever code a planted file names
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" not in str(err):  # torch names a refused object so; anything else: a damaged file
            raise EdgeDistillError(
                f"resume: {path} cannot be read (not a checkpoint file); delete it to start the run over"
            ) from None
        raise EdgeDistillError(
            f"resume: {path} holds objects other than tensors and plain data, which are not loaded because "
            "unpickling them can run code; delete it to start the run over"
        ) from None
    except Exception as err:
        raise EdgeDistillError(
            f"resume: {path} cannot be read ({type(err).__name__}); delete it to start the run over"
        ) from None
    expected = {"step": int, "model": dict, "optimizer": dict, "scheduler": dict, "config": dict, "data_sha256": str}
    wrong = [k for k, kind in expected.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if wrong:
        raise EdgeDistillError(f"resume: {path} is not an edgedistill training checkpoint (no valid '{wrong[0]}')")
    if not 0 <= state["step"] <= config.steps:
        raise EdgeDistillError(f"resume: {path} is at step {state['step']}, outside this run's 0..{config.steps}")
    saved, current = state["config"], config.to_dict()
    defaults = TrainConfig().to_dict()  # a setting added after the checkpoint was written had its default then
    for name, value in current.items():
        if name not in RESUMABLE_CHANGES and saved.get(name, defaults[name]) != value:
            raise EdgeDistillError(
                f"resume: {name} is {value!r} but the checkpoint in {out} was trained with {saved.get(name)!r}"
            )
    if state["data_sha256"] != data_sha256:
        raise EdgeDistillError(f"resume: the data differ from those the checkpoint in {out} was trained on")
    return state


def _save_final(out: Path, student: Any, tokenizer: Any) -> None:
    """The Hugging Face checkpoint (config, safetensors, tokenizer, chat template), each file renamed into place."""
    staging = make_temp_dir(out, "final")
    try:
        student.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        files = sorted(staging.iterdir(), key=lambda p: p.suffix == ".safetensors")  # weights land last
        for file in files:
            publish(file, out / file.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _plot_losses(metrics_path: Path, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    if not rows:
        return
    figure, axes = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "total"), ("ce", "CE"), ("kd", "KD")):
        values = [r.get(key) for r in rows]
        if all(v is not None for v in values):
            axes.plot(steps, values, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title("edgedistill training loss")
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    tmp = temp_path(png_path.parent, png_path.name)
    figure.savefig(tmp, dpi=100, format="png")
    plt.close(figure)
    publish(tmp, png_path)


def _metrics_through(path: Path, last_step: int) -> str:
    """The rows of ``metrics.jsonl`` up to ``last_step`` (those of the resumed checkpoint), as text.

    An unreadable last line is the torn end of a write that a kill interrupted: it is dropped with a note. Any
    other unreadable line means the file was damaged, and resuming would silently lose its history: an error."""
    lines = path.read_bytes().split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the file ends with a newline
    kept = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("no integer 'step'")
        except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if number == len(lines):
                print(f"resume: dropped the incomplete last line {number} of {path} (an interrupted write)")
                break
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err).splitlines()[0][:80]
            raise EdgeDistillError(
                f"{path}:{number}: not a metrics row ({reason}); repair or delete the file to resume"
            ) from None
        if row["step"] <= last_step:
            kept.append(raw.decode("utf-8") + "\n")
    return "".join(kept)


def _prepare_out(out: Path, resume: bool) -> None:
    """Refuse to start over a finished or running run unless resuming (the claim made ``out`` and swept it)."""
    if not resume and ((out / CHECKPOINT).exists() or (out / SUMMARY).exists()):
        raise EdgeDistillError(f"out: {out} already holds a run; pass --resume to continue it or choose another --out")


# ----------------------------------------------------------------------------------------------------------- recipe
def train(config: TrainConfig, on_step: StepHook | None = None, progress: bool = True) -> dict[str, Any]:
    """Run one distillation and return its summary (also written to ``OUT/train_summary.json``).

    ``on_step(step, metrics)`` is called after every optimizer step (and after that step's checkpoint).
    """
    torch = require("torch")
    require("transformers")
    from tqdm import tqdm

    from edgedistill.distill.cache import TeacherCache, ids_sha256, tokenizer_sha256
    from edgedistill.distill.heads import DistillationObjective, release_free_memory, resolve_dtype

    if not config.out:
        raise EdgeDistillError("out: expected an output directory (--out DIR)")
    # ---------------------------------------------------------------- setup
    out = Path(config.out)
    if config.resume and (out / SUMMARY).is_file() and not (out / CHECKPOINT).exists():
        return json.loads((out / SUMMARY).read_text())  # finished already: nothing to resume
    dist = _Distributed(config.device)
    held = contextlib.ExitStack()
    try:
        if dist.is_main:  # only rank 0 writes to OUT; the claim sweeps what a killed run left there
            held.enter_context(claim(out, "out"))
            _prepare_out(out, config.resume)
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        device = dist.device

        cache = None
        if config.teacher_cache:  # the teacher's tokenizer and configuration come with the cache; no weights
            from transformers import AutoConfig, AutoTokenizer

            cache = TeacherCache(Path(config.teacher_cache))
            if config.init == "teacher":
                raise EdgeDistillError(
                    "init: --init teacher needs the teacher's weights, which a --teacher-cache run does not load"
                )
            if config.loss != "fkl" and config.alpha < 1.0:
                raise EdgeDistillError(
                    f"loss: a teacher cache holds a top-K, which supports fkl only, got {config.loss}"
                )
            tokenizer = AutoTokenizer.from_pretrained(config.teacher_cache)
            teacher_config = AutoConfig.from_pretrained(config.teacher_cache)
            teacher_info = dict(cache.manifest.teacher, cache=config.teacher_cache, top_k=cache.manifest.top_k)
        else:
            source = teachers.resolve_teacher(config.teacher)
            tokenizer = teachers.load_tokenizer(source)
            teacher_config = teachers.load_config(source)
            teacher_info = {
                "spec": config.teacher,
                "name": source.name,
                "path": str(source.path),
                "sha256": source.fingerprint(),
            }
        student_tokenizer = None
        if Path(config.student).is_dir():
            student, student_tokenizer = load_student_checkpoint(Path(config.student))
        else:
            student = build_student(resolve_shape(config.student, teacher_config), teacher_config, tokenizer)
        audit = audit_vocab(tokenizer, teacher_config.vocab_size, student.config.vocab_size, student_tokenizer)
        train_data, heldout, stats = load_data(
            config.data,
            tokenizer,
            config.seq_len,
            config.val_fraction,
            config.tag_weight,
            config.skip_bad_lines,
            config.train_tokens,
            config.heldout_tokens,
        )
        if stats.bad_lines and dist.is_main:
            print(f"skipped {stats.bad_lines} malformed line(s); first: {stats.bad_examples[0]}")
        if cache is not None:
            cache.check_run(config.seq_len, ids_sha256(train_data.ids, heldout.ids), tokenizer_sha256(tokenizer))

        needs_teacher = config.alpha < 1.0 and cache is None
        teacher = None
        if config.init == "teacher":  # copy full-precision weights, then run the teacher in its own dtype
            teacher = teachers.load_model(source, torch.float32, device)
            init_from_teacher(student, teacher)
            teacher = teacher.to(resolve_dtype(config.teacher_dtype, device)) if needs_teacher else None
        elif needs_teacher:
            teacher = teachers.load_model(source, resolve_dtype(config.teacher_dtype, device), device)
        # CE-only (alpha 1): no teacher in memory while training; it is loaded for the final evaluation only.
        student.to(device).train()
        student_params = sum(p.numel() for p in student.parameters())
        release_free_memory()

        objective: Any = DistillationObjective(student, config, dtype=resolve_dtype(config.precision, device))
        if dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            objective = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
        if cache is not None:
            teacher_for: TeacherFor | None = cached_teacher(cache) if config.alpha < 1.0 else None
        else:
            teacher_for = online_teacher(teacher) if teacher is not None else None

        optimizer, scheduler = make_optimizer(student, config)
        start_step = 0
        metrics_path = out / METRICS
        state = _load_checkpoint(out, config, stats.sha256) if config.resume else None
        if state is not None:
            try:
                student.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
            except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
                detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
                raise EdgeDistillError(f"resume: {out / CHECKPOINT} does not fit this run ({detail})") from None
            start_step = state["step"]
            if dist.is_main and metrics_path.exists():  # drop rows of steps the checkpoint does not contain
                atomic_write_text(metrics_path, _metrics_through(metrics_path, start_step))
        elif dist.is_main:
            metrics_path.unlink(missing_ok=True)
        dist.barrier()

        # ---------------------------------------------------------------- loop
        order = _BatchOrder(train_data.num_sequences, config.batch_size, config.seed, dist.world_size, dist.rank)
        tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * dist.world_size
        progress_bar = tqdm(
            total=config.steps,
            initial=start_step,
            disable=not (progress and dist.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        started = time.perf_counter()
        metrics: dict[str, float] = {}
        micro_batches: list[tuple[Any, ...]] = []  # none when the run resumes from its final step's checkpoint
        last_saved = start_step if state is not None else None
        with progress_bar as bar:  # closed before an error is printed, so it ends its own line
            for step in range(start_step + 1, config.steps + 1):
                step_start = time.perf_counter()
                micro_batches = []
                for micro in range(config.grad_accum):
                    rows = order.rows((step - 1) * config.grad_accum + micro)
                    inputs, positions, labels, weights = _batch(train_data, rows, device)
                    teacher = teacher_for("train", rows, inputs, positions) if teacher_for is not None else None
                    micro_batches.append((inputs, positions, labels, weights, teacher))
                try:
                    sums, grad_norm = train_step(objective, micro_batches, optimizer, scheduler, config.grad_clip)
                    loss_value, ce_value, kd_value = dist.all_mean(sums)
                    non_finite = _first_non_finite([loss_value, ce_value, kd_value])
                    if non_finite:  # the mean over ranks, so that every rank stops at the same step
                        raise NonFiniteLoss(*non_finite)
                except NonFiniteLoss as err:
                    raise _stopped(step, err, out, last_saved) from None
                seconds = time.perf_counter() - step_start
                metrics = {
                    "step": step,
                    "loss": loss_value,
                    "ce": ce_value,
                    "kd": kd_value if teacher_for is not None else None,
                    "lr": scheduler.get_last_lr()[0],
                    "grad_norm": grad_norm,
                    "seconds": seconds,
                    "tokens_per_second": tokens_per_step / seconds,
                }
                if dist.is_main:
                    if step % config.log_every == 0 or step == config.steps:
                        with open(metrics_path, "a", encoding="utf-8") as log:
                            log.write(json.dumps(metrics) + "\n")
                    # the checkpoint after its row: a kill between the two leaves a row that a resume drops
                    if step % config.save_every == 0 or step == config.steps:
                        try:
                            _save_checkpoint(out, step, student, optimizer, scheduler, config, stats.sha256)
                        except NonFiniteLoss as err:
                            raise _stopped(step, err, out, last_saved) from None
                        last_saved = step
                    postfix = {"loss": f"{loss_value:.3f}", "ce": f"{ce_value:.3f}"}
                    if teacher_for is not None:
                        postfix["kd"] = f"{kd_value:.3f}"
                    postfix["tok/s"] = f"{metrics['tokens_per_second']:.0f}"
                    bar.set_postfix(postfix, refresh=False)
                    bar.update(1)
                if on_step is not None:
                    on_step(step, metrics)
        train_seconds = time.perf_counter() - started
        dist.barrier()

        # ---------------------------------------------------------------- save
        summary: dict[str, Any] = {}
        if dist.is_main:
            del optimizer, micro_batches
            if cache is not None:
                teacher_for = cached_teacher(cache)
            elif teacher is None:  # CE-only training: the teacher is needed now, for the comparison
                teacher = teachers.load_model(source, resolve_dtype(config.teacher_dtype, device), device)
                teacher_for = online_teacher(teacher)
            result = evaluate(student, teacher_for, heldout, config.batch_size, device, config.eval_tokens)
            teacher = teacher_for = objective = None
            _save_final(out, student, tokenizer)
            (out / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: the final checkpoint replaces it
            steps_run = config.steps - start_step
            summary = {
                "edgedistill_version": __version__,
                "teacher": dict(teacher_info, vocab_rows=audit.teacher_rows),
                "student": {
                    "spec": config.student,
                    "parameters": student_params,
                    "shape": {
                        k: getattr(student.config, k)
                        for k in (
                            "hidden_size",
                            "num_hidden_layers",
                            "num_attention_heads",
                            "num_key_value_heads",
                            "intermediate_size",
                            "vocab_size",
                        )
                    },
                },
                "vocab": {"tokenizer_size": audit.tokenizer_size, "shared_rows": audit.shared_rows},
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
                    "resumed_from": start_step,
                    "seconds": train_seconds,
                    "tokens_per_second": steps_run * tokens_per_step / train_seconds if steps_run else None,
                    "final": metrics,
                    "world_size": dist.world_size,
                    "device": str(device),
                },
                "heldout": result,
                "config": config.to_dict(),
            }
            atomic_write_text(out / SUMMARY, json.dumps(summary, indent=2) + "\n")
            _plot_losses(metrics_path, out / "loss_curve.png")
        dist.barrier()
        return summary
    finally:
        held.close()
        dist.close()
