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
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor | None = None,
    temperature: float = 1.0,
    beta: float = 0.5,
) -> Tensor:
    """T² · generalized JSD with mixing weight ``beta`` (see :func:`divergence`). Logits: [N, V]; -> scalar."""
    return divergence("jsd", student_logits, teacher_logits, weights, temperature, beta=beta)


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor | None = None,
    temperature: float = 1.0,
    skew: float = 0.1,
) -> Tensor:
    """T² · skew forward KL (see :func:`divergence`). Logits: [N, V]; -> scalar."""
    return divergence("skl", student_logits, teacher_logits, weights, temperature, skew=skew)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weights: Tensor | None = None,
    temperature: float = 1.0,
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


def sparse_distillation_loss(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``alpha * CE + (1 - alpha) * sparse_forward_kl``: the seed's mix with a cached top-K teacher.
    Shapes as in :func:`sparse_forward_kl`; ``labels``: [N]; returns ``(total, ce, kd)``."""
    ce = cross_entropy(student_logits, labels, weights)
    kd = sparse_forward_kl(student_logits, teacher_ids, teacher_logprobs, teacher_tail, weights, temperature)
    return mix(ce, kd, alpha), ce, kd


def sparse_forward_kl(
    student_logits: Tensor,
    teacher_ids: Tensor,
    teacher_logprobs: Tensor,
    teacher_tail: Tensor,
    weights: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """T² · KL(teacher || student) over K + 1 buckets: the teacher's top-K tokens and one bucket for the rest.

    ``student_logits``: [N, V]; ``teacher_ids``: [N, K] (int); ``teacher_logprobs``: [N, K], the teacher's
    log-probabilities at T = 1; ``teacher_tail``: [N], log of the teacher's mass outside its top K; -> scalar.
    The temperature is applied to the stored log-probabilities (log p / T, renormalised over the buckets); the tail
    bucket is tempered as one token of its mass, exact at T = 1 and an approximation otherwise. With K = V the tail
    is empty and this is :func:`forward_kl`; for any K it is a proper divergence (zero when the student's buckets
    equal the teacher's, which holds when the student's distribution equals the teacher's).
    """
    teacher_buckets = torch.cat([_upcast(teacher_logprobs), _upcast(teacher_tail).unsqueeze(-1)], dim=-1)
    teacher = F.log_softmax(teacher_buckets / temperature, dim=-1)  # [N, K + 1]
    student = _log_probs(student_logits, temperature)  # [N, V]
    student_top = student.gather(-1, teacher_ids)
    # a padding slot (log-prob -inf: an id a trimmed student dropped) is no bucket: its token stays in the tail
    not_top = torch.where(torch.isfinite(_upcast(teacher_logprobs)), float("-inf"), student_top)
    student_tail = student.scatter(-1, teacher_ids, not_top).logsumexp(-1, keepdim=True)
    student_buckets = torch.cat([student_top, student_tail], dim=-1)
    teacher_probs = teacher.exp()
    # 0 · log 0 = 0: an empty tail (K = V, or all mass in the top K) contributes nothing
    terms = torch.where(teacher_probs > 0, teacher_probs * (teacher - student_buckets), torch.zeros_like(teacher))
    return temperature**2 * _reduce(terms.sum(-1), weights)


def chunk_rows(vocab_size: int, budget_bytes: int = 8 << 20, min_rows: int = 128) -> int:
    """Positions per chunk: one [chunk, V] float32 tensor within ``budget_bytes`` (8 MiB: about ten such tensors
    live at once inside a chunk), but at least ``min_rows`` so that the head's matmul stays efficient."""
    return max(min_rows, budget_bytes // (4 * vocab_size))


def _fused_sparse_chunk(
    logits: Tensor,
    labels: Tensor,
    scale: Tensor,
    sparse: tuple[Tensor, Tensor, Tensor] | None,
    alpha: float,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """:func:`sparse_distillation_loss` (or, with ``sparse`` None, CE alone) and its gradient in closed form.

    ``logits``: [n, V] float32, overwritten; ``scale``: [n], each position's weight / the batch's supervised count;
    ``sparse``: (``teacher_ids``, ``teacher_logprobs``, ``teacher_tail``) rows. Returns ([total, ce, kd] sums,
    gradient of total w.r.t. the logits). Autograd through the reference functions makes about a dozen passes over
    [n, V] (two log-softmaxes, a scattered copy for the tail, their backward passes); this makes four or five. With
    q the student's tempered distribution, t the teacher's buckets and ``tail`` the bucket outside the teacher's
    top K, d(T² KL)/dz is T·(q_j − t_j) on a top-K token and T·q_j·(1 − t_tail / q_tail) elsewhere; d CE / dz is
    p − onehot(label). A padding slot (teacher log-prob -inf, :func:`~edgedistill.distill.vocab.map_sparse`) is
    no bucket: its token is counted in the tail, by value and by gradient.
    """
    label_logit = logits.gather(-1, labels[:, None]).squeeze(-1)
    peak = logits.amax(-1, keepdim=True)
    tempered = None
    if sparse is not None:
        ids = sparse[0]
        top_logits = logits.gather(-1, ids)
        if temperature != 1.0:
            tempered = logits.sub(peak).div_(temperature).exp_()
    probs = logits.sub_(peak).exp_()  # unnormalised softmax at T = 1, in place
    mass = probs.sum(-1, keepdim=True)
    log_mass = mass.log()
    ce_rows = (log_mass + peak).squeeze(-1) - label_logit
    if sparse is None:
        grad = probs.mul_(scale[:, None] / mass)
        grad.scatter_add_(-1, labels[:, None], -scale[:, None])
        ce = (scale * ce_rows).sum()
        return torch.stack([ce, ce, torch.zeros_like(ce)]), grad
    ids, teacher_logprobs, teacher_tail = sparse
    student = probs if tempered is None else tempered
    student_mass = mass if tempered is None else tempered.sum(-1, keepdim=True)
    valid = torch.isfinite(_upcast(teacher_logprobs))
    padded = not bool(valid.all())
    # the top-K entries are written again below; the rest (padding slots' tokens included) is the tail
    student.scatter_(-1, ids, torch.where(valid, 0.0, student.gather(-1, ids)) if padded else 0.0)
    tail_mass = student.sum(-1)
    log_student_top = (top_logits - peak) / temperature - student_mass.log()  # [n, K]
    log_student_tail = tail_mass.log() - student_mass.squeeze(-1).log()  # [n]
    buckets = torch.cat([_upcast(teacher_logprobs), _upcast(teacher_tail).unsqueeze(-1)], dim=-1)
    teacher = F.log_softmax(buckets / temperature, dim=-1)  # [n, K + 1]
    teacher_probs = teacher.exp()
    student_buckets = torch.cat([log_student_top, log_student_tail.unsqueeze(-1)], dim=-1)
    terms = torch.where(teacher_probs > 0, teacher_probs * (teacher - student_buckets), torch.zeros_like(teacher))
    kd_rows = temperature**2 * terms.sum(-1)
    teacher_tail_prob = teacher_probs[:, -1]
    student_tail_prob = log_student_tail.exp()
    ratio = torch.where(
        teacher_tail_prob > 0,
        teacher_tail_prob / student_tail_prob.clamp_min(torch.finfo(student_tail_prob.dtype).tiny),
        0.0,
    )
    kd_scale = ((1 - alpha) * temperature) * scale  # [n]
    if tempered is None:
        grad = student.mul_(((alpha * scale + kd_scale * (1 - ratio)) / mass.squeeze(-1))[:, None])
    else:
        grad = probs.mul_((alpha * scale / mass.squeeze(-1))[:, None])
        grad.add_(tempered.mul_((kd_scale * (1 - ratio) / student_mass.squeeze(-1))[:, None]))
    top_probs = (top_logits - peak - log_mass).exp()  # p at the teacher's top K (T = 1)
    top_student = log_student_top.exp()  # q there
    top_grad = alpha * scale[:, None] * top_probs + kd_scale[:, None] * (top_student - teacher_probs[:, :-1])
    grad.scatter_(-1, ids, torch.where(valid, top_grad, grad.gather(-1, ids)) if padded else top_grad)
    grad.scatter_add_(-1, labels[:, None], -alpha * scale[:, None])
    ce = (scale * ce_rows).sum()
    kd = (scale * kd_rows).sum()
    return torch.stack([alpha * ce + (1 - alpha) * kd, ce, kd]), grad


class _ChunkedDistillation(torch.autograd.Function):
    """Loss and its gradients computed chunk by chunk in the forward pass (the idea of Liger Kernel's fused
    linear losses): no [N, V] logits, probabilities or gradients of the whole batch ever exist at once, only those
    of one chunk. The per-chunk math is :func:`distillation_loss` differentiated by autograd, or, for CE alone and
    a cached top-K teacher, :func:`_fused_sparse_chunk`'s closed form of :func:`sparse_distillation_loss`."""

    @staticmethod
    def forward(
        ctx, hidden, head_weight, teacher_hidden, teacher_head_weight, teacher_logits, sparse, labels, weights, options
    ):
        alpha, temperature, name, beta, skew, chunk, matmul_dtype = options
        supervised = (weights > 0).to(torch.int64)
        count = max(1, int(supervised.sum()))
        grad_hidden = torch.zeros_like(hidden)
        # a frozen head (``freeze_embeddings``) needs no weight gradient: a third of the head's matmuls saved
        need_weight = ctx.needs_input_grad[1]
        grad_weight = torch.zeros_like(head_weight) if need_weight else None
        sums = torch.zeros(3, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        weight = head_weight.detach().requires_grad_(need_weight)
        closed_form = sparse is not None or teacher_hidden is teacher_logits is None
        # The head's matmuls may run in bf16 (``matmul_dtype``); softmax and loss are float32 in every case.
        low_weight = head_weight.detach().to(matmul_dtype or head_weight.dtype)
        low_hidden = hidden.detach().to(low_weight.dtype)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            share = int(supervised[rows].sum()) / count  # chunk losses are means over the chunk's positions
            if share == 0:
                continue
            if closed_form:  # CE alone or with a cached top-K teacher
                student_logits = _upcast(F.linear(low_hidden[rows], low_weight))
                sparse_rows = None if sparse is None else tuple(part[rows] for part in sparse)
                scale = weights[rows].to(student_logits.dtype) / count
                values, grad_logits = _fused_sparse_chunk(
                    student_logits, labels[rows], scale, sparse_rows, alpha, temperature
                )
                grad_logits = grad_logits.to(low_weight.dtype)
                grad_hidden[rows] = grad_logits @ low_weight
                if need_weight:
                    grad_weight += grad_logits.T @ low_hidden[rows]
                sums += values
                continue
            piece = hidden[rows].detach().requires_grad_(True)
            with torch.enable_grad():
                student_logits = _upcast(F.linear(piece.to(low_weight.dtype), weight.to(low_weight.dtype)))
                if sparse is not None:
                    total, ce, kd = sparse_distillation_loss(
                        student_logits,
                        *(part[rows] for part in sparse),
                        labels[rows],
                        weights[rows],
                        alpha,
                        temperature,
                    )
                else:
                    if teacher_logits is not None:
                        chunk_teacher = teacher_logits[rows]
                    elif teacher_hidden is not None:
                        chunk_teacher = F.linear(teacher_hidden[rows], teacher_head_weight)
                    else:
                        chunk_teacher = None
                    vocab = student_logits.shape[-1] if chunk_teacher is None else chunk_teacher.shape[-1]
                    vocab = min(vocab, student_logits.shape[-1])
                    total, ce, kd = distillation_loss(
                        student_logits[:, :vocab],
                        None if chunk_teacher is None else chunk_teacher[:, :vocab],
                        labels[rows],
                        weights[rows],
                        alpha,
                        temperature,
                        name,
                        beta,
                        skew,
                    )
                if need_weight:
                    grad_piece, grad_chunk_weight = torch.autograd.grad(total * share, (piece, weight))
                    grad_weight += grad_chunk_weight
                else:
                    (grad_piece,) = torch.autograd.grad(total * share, (piece,))
            grad_hidden[rows] = grad_piece
            kd_value = kd.detach() if kd is not None else ce.new_zeros(())
            sums += share * torch.stack([total.detach(), ce.detach(), kd_value])
        ctx.save_for_backward(grad_hidden, grad_weight if need_weight else None)
        ce, kd = sums[1].clone(), sums[2].clone()
        ctx.mark_non_differentiable(ce, kd)
        return sums[0].clone(), ce, kd

    @staticmethod
    def backward(ctx, grad_total, grad_ce, grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_weight = None if grad_weight is None else grad_weight * grad_total
        return grad_hidden * grad_total, grad_weight, None, None, None, None, None, None, None


def chunked_distillation_loss(
    hidden: Tensor,
    head_weight: Tensor,
    labels: Tensor,
    weights: Tensor | None = None,
    teacher_hidden: Tensor | None = None,
    teacher_head_weight: Tensor | None = None,
    teacher_logits: Tensor | None = None,
    teacher_ids: Tensor | None = None,
    teacher_logprobs: Tensor | None = None,
    teacher_tail: Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    name: str = "fkl",
    beta: float = 0.5,
    skew: float = 0.1,
    chunk: int | None = None,
    matmul_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """:func:`distillation_loss` from the LM heads' inputs, computed in chunks of positions; returns
    ``(total, ce, kd)``, with gradients flowing from ``total`` into ``hidden`` and ``head_weight`` only.

    ``hidden``: [N, H] student hidden states at the supervised positions; ``head_weight``: [V, H] the student's LM
    head (tied embedding); the teacher is either ``teacher_hidden`` [N, Ht] with ``teacher_head_weight`` [Vt, Ht], or
    full ``teacher_logits`` [N, Vt], or a cached top-K (``teacher_ids``, ``teacher_logprobs`` [N, K],
    ``teacher_tail`` [N], see :func:`sparse_forward_kl`), or nothing when ``alpha == 1``; ``labels``, ``weights``:
    [N]. Logits are cut to the rows both vocabularies share. ``chunk`` positions at a time (default:
    :func:`chunk_rows`). ``matmul_dtype`` (e.g. ``torch.bfloat16``): the student head's matmuls in that type, the
    softmax and the loss still in float32 (None: the head's own type). CE alone and a cached top-K teacher take a
    closed-form gradient (:func:`_fused_sparse_chunk`); other teachers and divergences go through autograd.
    """
    if weights is None:
        weights = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
    sparse = None if teacher_ids is None else (teacher_ids, teacher_logprobs, teacher_tail)
    has_teacher = teacher_logits is not None or teacher_hidden is not None or sparse is not None
    if alpha < 1.0 and not has_teacher:
        raise ValueError("chunked_distillation_loss: a teacher is required when alpha < 1")
    if sparse is not None and name != "fkl":
        raise ValueError("chunked_distillation_loss: a cached top-K teacher supports the forward KL (fkl) only")
    options = (alpha, temperature, name, beta, skew, chunk or chunk_rows(head_weight.shape[0]), matmul_dtype)
    total, ce, kd = _ChunkedDistillation.apply(
        hidden, head_weight, teacher_hidden, teacher_head_weight, teacher_logits, sparse, labels, weights, options
    )
    return total, ce, (kd if has_teacher else None)
