"""On-policy distillation (GKD, Agarwal et al. 2024): ``--on-policy-fraction λ`` of the optimizer steps train on
the student's own samples.

Which steps: step ``s`` (0-based, within its phase; a run without a schedule is one phase) is on-policy iff
``floor((s + 1) * λ) > floor(s * λ)`` (:func:`is_on_policy`), so a run and its resumption agree and a phase of
``n`` steps has ``floor(n * λ)`` on-policy steps; λ = 0 is today's training, step for step.

An on-policy step: every packed sequence of a micro-batch keeps its first ``seq_len // 2`` tokens as the prompt and
the student (eval mode, no gradient, KV cache) samples the rest of the row at temperature 1 from its full
distribution (no top-k / top-p), with a ``torch.Generator`` seeded from (seed, step, rank) (:func:`sample_seed`), so
the samples are reproducible. (This module imports none of the project's modules: the configuration's schedule
loader reaches it.) The teacher (online only: a cache cannot score the student's tokens) and the student
then read the whole row, and the loss is the run's divergence (``--loss``, at ``--temperature``; GKD recommends
``jsd`` or ``rkl``, ``fkl`` works too) times ``--logit-weight`` at the positions that predicted a sampled token,
each weighing 1. There is no CE there (the samples have no ground truth): alpha does not apply and the metrics row's
``ce`` is null. Feature and attention terms, when on, apply at the same positions. A trimmed-vocabulary student
samples its own ids; the teacher reads their teacher ids (the run's ``TeacherMapper``, as on every step).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator
from typing import Any


def is_on_policy(index: int, fraction: float) -> bool:
    """Whether step ``index`` (0-based) of a phase whose on-policy share is ``fraction`` is on-policy."""
    return fraction > 0 and math.floor((index + 1) * fraction) > math.floor(index * fraction)


def sample_seed(seed: int, step: int, rank: int = 0) -> int:
    """The sampling generator's seed of global step ``step`` on ``rank``: a pure function of the three."""
    digest = hashlib.sha256(f"edgedistill-on-policy:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (2**63)


def sample(student: Any, prompts: Any, new_tokens: int, generator: Any, dtype: Any = None) -> Any:
    """``prompts`` [B, P] followed by ``new_tokens`` tokens the student samples (temperature 1, no truncation) ->
    [B, P + new_tokens]. Runs in eval mode without gradients, one token at a time over the KV cache."""
    import torch

    training = student.training
    student.eval()
    pieces = [prompts]
    low = dtype is not None and dtype not in (torch.float32, torch.float64)
    compute = torch.autocast(prompts.device.type, dtype=dtype) if low else contextlib.nullcontext()
    try:
        with torch.no_grad(), compute:
            out = student(input_ids=prompts, use_cache=True)
            for index in range(new_tokens):
                probs = torch.softmax(out.logits[:, -1].float(), dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
                pieces.append(token)
                if index + 1 < new_tokens:
                    out = student(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
    finally:
        student.train(training)
    return torch.cat(pieces, dim=1)


def generator(device: Any, seed: int, step: int, rank: int = 0) -> Any:
    """The sampling generator of step ``step`` on ``rank`` (one per optimizer step, shared by its micro-batches)."""
    import torch

    return torch.Generator(device=device).manual_seed(sample_seed(seed, step, rank))


def on_policy_batch(
    student: Any, data: Any, rows: list[int], generator: Any, objective: Any = None
) -> tuple[Any, Any, Any, Any]:
    """(inputs [B, L], positions [N], labels [N], weights [N]) of an on-policy micro-batch of packed ``rows`` of
    ``data`` (rows of L + 1 tokens): the first ``L // 2`` tokens stay, the student samples the rest (in the
    ``objective``'s compute type), and the positions are those whose next token was sampled (each weighing 1)."""
    import torch

    device = next(student.parameters()).device
    rows = torch.from_numpy(data.ids[rows]).long().to(device)
    dtype = base_objective(objective).dtype if objective is not None else None
    batch, width = rows.shape
    length = width - 1
    prompt = max(1, length // 2)
    sequence = sample(student, rows[:, :prompt], width - prompt, generator, dtype)
    inputs = sequence[:, :-1]
    columns = torch.arange(prompt - 1, length, device=rows.device)
    positions = (torch.arange(batch, device=rows.device)[:, None] * length + columns[None, :]).reshape(-1)
    labels = sequence[:, 1:].reshape(-1)[positions]
    weights = torch.ones(positions.shape, dtype=torch.float32, device=rows.device)
    return inputs, positions, labels, weights


@contextlib.contextmanager
def divergence_only(objective: Any, states: Any) -> Iterator[None]:
    """The logit term as the divergence alone (alpha 0) while an on-policy step runs, the teacher's logits passed
    to it even when the phase's alpha is 1."""
    base = base_objective(objective)
    alpha = base.options["alpha"]
    logit_kd = getattr(states, "logit_kd", None)
    base.options["alpha"] = 0.0
    if states is not None:
        states.logit_kd = True
    try:
        yield
    finally:
        base.options["alpha"] = alpha
        if states is not None:
            states.logit_kd = logit_kd


def base_objective(objective: Any) -> Any:
    """The :class:`~edgedistill.distill.heads.DistillationObjective` inside DDP and the feature/attention wrapper."""
    module = getattr(objective, "module", objective)
    return getattr(module, "objective", module)
