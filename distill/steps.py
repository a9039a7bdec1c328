"""One optimizer step of the recipe (:mod:`edgedistill.distill.train`), also run alone by ``bench/distill_speed.py``:
the warm-up + cosine schedule, the order of the packed rows (a pure function of seed and step, so a resumed run
sees the batches the interrupted one would have), AdamW, the step with gradient accumulation, and the check that
stops a step whose loss, gradient norm or weights went non-finite before it is applied."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

from edgedistill.distill.config import TrainConfig
from edgedistill.errors import EdgeDistillError


def _lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` of the peak (MiniMind decays to 10 %)."""

    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = min(1.0, (step - config.warmup) / max(1, config.steps - config.warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class BatchOrder:
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
        """The packed rows of micro-batch ``micro_batch``, counted over the whole run (epochs follow each other)."""
        first = micro_batch * self.batch_size
        return [self._order(p // self.per_epoch)[p % self.per_epoch] for p in range(first, first + self.batch_size)]


def make_optimizer(student: Any, config: TrainConfig, extra: Any = ()) -> tuple[Any, Any]:
    """AdamW (no weight decay on norms) and the warm-up + cosine schedule; ``extra`` parameters (feature
    distillation's projections) train with the student, after its own."""
    import torch

    trained = [p for p in [*student.parameters(), *extra] if p.requires_grad]
    decay = [p for p in trained if p.ndim >= 2]
    no_decay = [p for p in trained if p.ndim < 2]
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
    accumulation; returns ([loss, ce, kd, *terms] means, grad norm). ``objective`` (a
    :class:`DistillationObjective`, or a :class:`~edgedistill.distill.feature_losses.StateDistillation` that adds
    the feature and attention terms, possibly inside DistributedDataParallel) returns the loss (and those terms);
    gradients are all-reduced on the last micro-batch.
    """
    import torch

    sums: list[float] = []
    count = len(micro_batches)
    for index, (inputs, positions, labels, weights, teacher) in enumerate(micro_batches):
        defer_sync = index < count - 1 and hasattr(objective, "no_sync")
        with objective.no_sync() if defer_sync else contextlib.nullcontext():
            loss, ce, kd, *terms = objective(inputs, positions, labels, weights, teacher)
            (loss / count).backward()
        values = [loss.item(), ce.item(), kd.item() if kd is not None else 0.0, *(term.item() for term in terms)]
        sums = sums or [0.0] * len(values)
        for position, value in enumerate(values):
            sums[position] += value / count
    grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters(), grad_clip or float("inf"))
    if not math.isfinite(float(grad_norm)):
        # the step would write NaN into every weight; the gradients are all-reduced, so every rank stops here
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(*(first_non_finite(sums) or ("gradient norm", float(grad_norm))))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return sums, float(grad_norm)


class NonFiniteLoss(EdgeDistillError):
    """A loss or the gradient norm of a step is NaN or infinite; raised before the optimizer applies the step."""

    def __init__(self, what: str, value: float) -> None:
        super().__init__(f"the {what} became non-finite ({value})")
        self.what, self.value = what, value


def first_non_finite(sums: list[float]) -> tuple[str, float] | None:
    """(name, value) of the first non-finite of the step's [loss, ce, kd, *terms] means, the parts before the
    total."""
    parts = [("CE loss", sums[1]), ("KD loss", sums[2])] + [("feature/attention loss", v) for v in sums[3:]]
    for name, value in (*parts, ("total loss", sums[0])):
        if not math.isfinite(value):
            return name, value
    return None


def check_weights(model: Any) -> None:
    """Raise :class:`NonFiniteLoss` naming the first weight that holds a NaN or infinity."""
    import torch

    bad = next((name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())), None)
    if bad is not None:
        raise NonFiniteLoss(f"weight {bad}", float("nan"))
