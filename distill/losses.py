"""Distillation losses as pure functions.

Shapes: ``N`` positions (batch and sequence flattened), ``V`` vocabulary entries.
``weights`` is ``[N]``: 0 for a position without supervision (a prompt token, padding), 1 for an ordinary supervised
position, and ``tag_weight`` for a reasoning tag. Every loss is a weighted sum over positions divided by the number
of supervised positions (``weights > 0``), which is how the seed's ``train_distill_reason.py`` normalises its
up-weighted mask. With all weights equal to 1 this is the plain mean (the seed's ``batchmean``).

Every divergence is computed at temperature ``T`` on both distributions and multiplied by ``T**2`` (Hinton et al.,
2015; the seed's ``distillation_loss_fn``), so gradients keep their scale as ``T`` changes. Callers should pass only
the supervised rows when most are unsupervised: a full-vocabulary softmax over rows that get weight 0 is wasted.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _reduce(per_position: Tensor, weights: Tensor | None) -> Tensor:
    """Weighted sum over positions / number of supervised positions. ``per_position``: [N]; ``weights``: [N]."""
    if weights is None:
        return per_position.mean()
    weights = weights.to(per_position.dtype)
    count = (weights > 0).sum().clamp(min=1)
    return (per_position * weights).sum() / count


def _upcast(logits: Tensor) -> Tensor:
    """bf16/fp16 logits are upcast: a softmax over tens of thousands of entries needs float32's precision."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return F.log_softmax(_upcast(logits) / temperature, dim=-1)


def cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """Cross-entropy of the student against the data. ``logits``: [N, V]; ``labels``: [N] (int); -> scalar."""
    return _reduce(F.cross_entropy(_upcast(logits), labels, reduction="none"), weights)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) for every row, from log-probabilities. ``log_p``, ``log_q``: [N, V] -> [N]."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def _mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w·p + (1-w)·q) from log-probabilities, without leaving log space. [N, V] -> [N, V]."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log1p(-weight_p))


# Per-row divergences from temperature-scaled log-probabilities: (student [N, V], teacher [N, V], params) -> [N].
def _forward_kl_rows(student: Tensor, teacher: Tensor, **_: float) -> Tensor:
    return _kl_rows(teacher, student)


def _reverse_kl_rows(student: Tensor, teacher: Tensor, **_: float) -> Tensor:
    return _kl_rows(student, teacher)


def _jsd_rows(student: Tensor, teacher: Tensor, beta: float = 0.5, **_: float) -> Tensor:
    if beta == 0.0:
        return _kl_rows(teacher, student)
    if beta == 1.0:
        return _kl_rows(student, teacher)
    mixture = _mixture(teacher, student, beta)
    return beta * _kl_rows(teacher, mixture) + (1 - beta) * _kl_rows(student, mixture)


def _skew_kl_rows(student: Tensor, teacher: Tensor, skew: float = 0.1, **_: float) -> Tensor:
    return _kl_rows(teacher, student if skew == 0 else _mixture(teacher, student, skew))


def _skew_reverse_kl_rows(student: Tensor, teacher: Tensor, skew: float = 0.1, **_: float) -> Tensor:
    return _kl_rows(student, teacher if skew == 0 else _mixture(student, teacher, skew))


_ROWS = {
    "fkl": _forward_kl_rows,
    "rkl": _reverse_kl_rows,
    "jsd": _jsd_rows,
    "skl": _skew_kl_rows,
    "srkl": _skew_reverse_kl_rows,
}
DIVERGENCES = tuple(_ROWS)


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew: float = 0.1,
) -> Tensor:
    """T² · the divergence ``name`` between temperature-scaled distributions. Logits: [N, V]; -> scalar.

    ``fkl``: KL(teacher || student), the seed's ``distillation_loss_fn``; mode-covering.
    ``rkl``: KL(student || teacher) (MiniLLM); mode-seeking.
    ``jsd``: generalized JSD (GKD, Agarwal et al. 2024): with M = β·teacher + (1-β)·student,
    β·KL(teacher || M) + (1-β)·KL(student || M). It vanishes at β = 0 and 1; as in TRL's
    ``generalized_jsd_loss`` those ends mean forward KL (β = 0) and reverse KL (β = 1).
    ``skl``: skew KL, KL(teacher || skew·teacher + (1-skew)·student) (DistiLLM, Ko et al. 2024): the mixture bounds
    the divergence where the student gives a token almost no mass. ``srkl``: KL(student || skew·student +
    (1-skew)·teacher). ``skew = 0`` gives plain forward / reverse KL.
    """
    teacher = _log_probs(teacher_logits, temperature)
    student = _log_probs(student_logits, temperature)
    rows = _ROWS[name](student, teacher, beta=beta, skew=skew)
    return temperature**2 * _reduce(rows, weights)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor | None = None, temperature: float = 1.0):
    """T² · KL(teacher_T || student_T), the seed's ``distillation_loss_fn``. Logits: [N, V]; -> scalar."""
    return divergence("fkl", student_logits, teacher_logits, weights, temperature)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor | None = None, temperature: float = 1.0):
    """T² · KL(student_T || teacher_T). Logits: [N, V]; -> scalar."""
    return divergence("rkl", student_logits, teacher_logits, weights, temperature)


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor | None = None, temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """T² · generalized JSD with mixing weight ``beta`` (see :func:`divergence`). Logits: [N, V]; -> scalar."""
    return divergence("jsd", student_logits, teacher_logits, weights, temperature, beta=beta)


def skew_kl(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor | None = None, temperature: float = 1.0,
    skew: float = 0.1,
) -> Tensor:
    """T² · skew forward KL (see :func:`divergence`). Logits: [N, V]; -> scalar."""
    return divergence("skl", student_logits, teacher_logits, weights, temperature, skew=skew)


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, weights: Tensor | None = None, temperature: float = 1.0,
    skew: float = 0.1,
) -> Tensor:
    """T² · skew reverse KL (see :func:`divergence`). Logits: [N, V]; -> scalar."""
    return divergence("srkl", student_logits, teacher_logits, weights, temperature, skew=skew)


def mix(ce: Tensor, kd: Tensor, alpha: float) -> Tensor:
    """The seed's total loss: ``alpha * CE + (1 - alpha) * KD``."""
    return alpha * ce + (1 - alpha) * kd


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    weights: Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    name: str = "fkl",
    beta: float = 0.5,
    skew: float = 0.1,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The seed's training loss ``alpha * CE + (1 - alpha) * KD``; returns ``(total, ce, kd)``.

    ``student_logits``, ``teacher_logits``: [N, V]; ``labels``, ``weights``: [N]. ``teacher_logits`` may be None
    only when ``alpha == 1`` (then ``kd`` is None). Equal to :func:`cross_entropy` and :func:`divergence` combined
    with :func:`mix`, but the student's full-vocabulary log-softmax is computed once when ``temperature == 1``.
    """
    student_log_probs = F.log_softmax(_upcast(student_logits), dim=-1)
    ce = _reduce(F.nll_loss(student_log_probs, labels, reduction="none"), weights)
    if alpha == 1.0 and teacher_logits is None:
        return ce, ce, None
    if teacher_logits is None:
        raise ValueError("distillation_loss: teacher_logits is required when alpha < 1")
    student = student_log_probs if temperature == 1.0 else _log_probs(student_logits, temperature)
    teacher = _log_probs(teacher_logits, temperature)
    kd = temperature**2 * _reduce(_ROWS[name](student, teacher, beta=beta, skew=skew), weights)
    return mix(ce, kd, alpha), ce, kd
