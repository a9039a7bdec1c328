"""Scoring a model on packed data: :func:`evaluate` (held-out cross-entropy, perplexity, top-1 accuracy, bits per
byte, and the KL and top-1 agreement with a teacher), the providers of a teacher's signal (:func:`online_teacher`,
:func:`cached_teacher`) and :func:`supervised_batch`, which training and evaluation share."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from edgedistill.distill.data import PackedData


def supervised_batch(data: PackedData, rows: list[int] | slice, device: Any) -> tuple[Any, Any, Any, Any]:
    """(inputs [B, L], positions [N], labels [N], weights [N]) of packed ``rows``: the inputs are each row but its
    last token, ``positions`` index the supervised (weight > 0) targets in the flattened [B * L] inputs."""
    import torch

    ids = torch.from_numpy(data.ids[rows]).long()
    weights = torch.from_numpy(data.weights[rows])[:, 1:].reshape(-1)
    positions = torch.nonzero(weights > 0).squeeze(1)
    labels = ids[:, 1:].reshape(-1)[positions]
    return ids[:, :-1].to(device), positions.to(device), labels.to(device), weights[positions].to(device)


def scores(ce_sum: float, tokens: int, correct: int, size: int | None = None) -> dict[str, float]:
    """Cross-entropy per token, perplexity and top-1 accuracy from a summed next-token loss (nats) over ``tokens``
    supervised tokens of which ``correct`` were ranked first; with ``size`` (UTF-8 bytes of those tokens) bytes and
    bits per byte. What :func:`evaluate` and ``TeacherCache.evaluate`` report."""
    per_token = ce_sum / max(1, tokens)
    result = {
        "tokens": tokens,
        "ce": per_token,
        "perplexity": math.exp(per_token),
        "top1_accuracy": correct / max(1, tokens),
    }
    if size is not None:
        result.update(bytes=size, bits_per_byte=ce_sum / math.log(2) / max(1, size))
    return result


TeacherFor = Callable[[str, Any, Any, Any], "dict[str, Any] | None"]


def online_teacher(teacher: Any, mapper: Any = None) -> TeacherFor:
    """The live teacher as a provider of the objective's teacher signal (hidden states + head weight); with a
    trimmed student's ``mapper`` (:class:`~edgedistill.distill.vocab.TeacherMapper`) it reads the teacher's ids of
    the student's inputs and gives its head's kept rows."""
    from edgedistill.distill.heads import SupervisedLogits, teacher_signal

    head = SupervisedLogits(teacher).eval() if teacher is not None else None
    if mapper is None:
        return lambda split, rows, inputs, positions: teacher_signal(head, inputs, positions)
    return lambda split, rows, inputs, positions: mapper.signal(
        teacher_signal(head, mapper.teacher_inputs(inputs), positions)
    )


def cached_teacher(cache: Any, mapper: Any = None) -> TeacherFor:
    """A :class:`~edgedistill.distill.cache.TeacherCache` as a provider of the objective's teacher signal (mapped
    into a trimmed student's vocabulary by ``mapper``)."""
    if mapper is None:
        return lambda split, rows, inputs, positions: cache.signal(split, rows, positions)
    return lambda split, rows, inputs, positions: mapper.signal(cache.signal(split, rows, positions))


def evaluate(
    student: Any,
    teacher_for: TeacherFor | None,
    data: PackedData,
    batch_size: int,
    device: Any,
    max_tokens: int = 0,
    byte_lengths: Any = None,
) -> dict[str, float]:
    """Held-out cross-entropy (every supervised token weighs 1), perplexity, top-1 accuracy against the text, bits
    per byte (with ``byte_lengths``, :func:`~edgedistill.distill.data.token_byte_lengths`), forward KL (T = 1) to
    the teacher and top-1 agreement with the teacher, over up to ``max_tokens`` supervised tokens (0: all). With a
    cached teacher
    the KL is the top-K one (``sparse_forward_kl``) and agreement is with the teacher's top-1 id. The student runs in
    float32 whatever its training precision, so that held-out numbers compare across runs and machines."""
    import torch

    from edgedistill.distill.heads import SupervisedLogits, dense_teacher_logits
    from edgedistill.distill.losses import chunk_rows, divergence, sparse_forward_kl

    student_head = SupervisedLogits(student).eval()
    totals = {"ce": 0.0, "kd": 0.0, "agree": 0.0, "correct": 0, "bytes": 0, "tokens": 0}
    lengths = torch.from_numpy(byte_lengths) if byte_lengths is not None else None
    with torch.no_grad():
        for start in range(0, data.num_sequences, batch_size):
            rows = slice(start, start + batch_size)
            inputs, positions, labels, weights = supervised_batch(data, rows, device)
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
                predicted = student_logits.argmax(-1)
                totals["correct"] += (predicted == labels[part]).sum().item()
                if lengths is not None:
                    totals["bytes"] += lengths[labels[part].cpu()].sum().item()
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
                totals["agree"] += (predicted == teacher_top1).sum().item()
            if max_tokens and totals["tokens"] >= max_tokens:
                break
    tokens = max(1, totals["tokens"])
    result = scores(totals["ce"], totals["tokens"], totals["correct"], totals["bytes"] if lengths is not None else None)
    if teacher_for is not None:
        result.update(kd_to_teacher=totals["kd"] / tokens, top1_agreement=totals["agree"] / tokens)
    student.train()
    return result
