"""The models as distillation sees them: hidden states and logits at the supervised positions only.

The LM head is the widest matmul of a small model (49,152 x 576 for SmolLM2) and its softmax the largest tensor;
positions without supervision (chat prompts) need neither, and the training objective never materialises the
whole batch's [positions x vocabulary] logits at all (see ``losses.chunked_distillation_loss``).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from edgedistill.distill.config import TrainConfig
from edgedistill.distill.losses import chunked_distillation_loss, distillation_loss, sparse_distillation_loss


def _direct(model: Any) -> bool:
    """Whether logits are exactly ``lm_head(hidden)``: models that post-process them (Gemma 2's soft-capping)
    go through their own forward instead."""
    return getattr(model.config, "final_logit_softcapping", None) is None


class SupervisedLogits(torch.nn.Module):
    """A causal LM restricted to supervised positions. ``input_ids``: [B, L]; ``positions``: [N] indices into the
    flattened [B * L]."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.direct = _direct(model)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def hidden(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states at the positions: [N, H]."""
        base = getattr(self.model, self.model.base_model_prefix)
        hidden = base(input_ids=input_ids).last_hidden_state
        return hidden.reshape(-1, hidden.shape[-1])[positions]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits at the positions: [N, V]."""
        if not self.direct:
            logits = self.model(input_ids=input_ids).logits
            return logits.reshape(-1, logits.shape[-1])[positions]
        return torch.nn.functional.linear(self.hidden(input_ids, positions), self.head_weight)


class DistillationObjective(SupervisedLogits):
    """The student with the seed's loss on top: ``forward`` returns ``(total, ce, kd)``, so that DDP wraps a
    module whose output is the loss. The teacher's side is passed in as hidden states plus head weight (or logits).
    """

    def __init__(
        self, student: Any, config: TrainConfig, chunked: bool = True, dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__(student)
        self.chunked = chunked and self.direct  # soft-capped heads go through the model's own forward
        self.dtype = dtype  # the matmuls' type under autocast; float32: none
        self.options = dict(
            alpha=config.alpha,
            temperature=config.temperature,
            name=config.loss,
            beta=config.jsd_beta,
            skew=config.skew,
        )
        self.logit_weight = config.logit_weight  # multiplies the total (a phase of a schedule may change it)

    def _weighted(self, losses: tuple[torch.Tensor, torch.Tensor, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(total, ce, kd)`` with the total times ``logit_weight`` (left alone at 1, today's numbers exactly)."""
        total, ce, kd = losses
        return (total if self.logit_weight == 1.0 else total * self.logit_weight), ce, kd

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        teacher: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        teacher = teacher or {}
        if self.chunked:
            with autocast(input_ids.device, self.dtype):
                hidden = self.hidden(input_ids, positions)
            low = None if self.dtype == torch.float32 else self.dtype
            return self._weighted(
                chunked_distillation_loss(
                    hidden.float(), self.head_weight, labels, weights, **teacher, **self.options, matmul_dtype=low
                )
            )
        # The reference path: the whole batch's logits at once (models with post-processed logits, benchmarks).
        with autocast(input_ids.device, self.dtype):
            student_logits = super().forward(input_ids, positions)
        if "teacher_ids" in teacher:
            options = {k: self.options[k] for k in ("alpha", "temperature")}
            return self._weighted(
                sparse_distillation_loss(
                    student_logits,
                    teacher["teacher_ids"],
                    teacher["teacher_logprobs"],
                    teacher["teacher_tail"],
                    labels,
                    weights,
                    **options,
                )
            )
        teacher_logits = dense_teacher_logits(teacher) if teacher else None
        shared = (
            student_logits.shape[-1]
            if teacher_logits is None
            else min(student_logits.shape[-1], teacher_logits.shape[-1])
        )
        return self._weighted(
            distillation_loss(
                student_logits[:, :shared],
                None if teacher_logits is None else teacher_logits[:, :shared],
                labels,
                weights,
                **self.options,
            )
        )


def dense_teacher_logits(signal: dict[str, torch.Tensor], rows: slice = slice(None)) -> torch.Tensor:
    """The teacher's logits [n, Vt] for ``rows`` of a dense teacher signal (logits, or hidden states + head)."""
    if "teacher_logits" in signal:
        return signal["teacher_logits"][rows]
    return torch.nn.functional.linear(signal["teacher_hidden"][rows], signal["teacher_head_weight"])


def teacher_signal(
    teacher: SupervisedLogits | None, input_ids: torch.Tensor, positions: torch.Tensor
) -> dict[str, torch.Tensor] | None:
    """What the objective needs from the teacher, computed without gradients: its final hidden states at the
    supervised positions and its head weight ([N, Ht] and [Vt, Ht], far smaller than [N, Vt] logits)."""
    if teacher is None:
        return None
    with torch.no_grad(), autocast(input_ids.device, teacher.head_weight.dtype):
        if teacher.direct:
            return {"teacher_hidden": teacher.hidden(input_ids, positions), "teacher_head_weight": teacher.head_weight}
        return {"teacher_logits": teacher(input_ids, positions)}


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Autocast to ``dtype`` (bf16 or fp16) on ``device``; nothing for float32."""
    if dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``). Building and loading models leaves
    hundreds of MB of freed-but-kept heap behind, which otherwise counts in the process's resident memory for
    the whole run. A no-op where glibc is absent."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def cpu_has_native_bf16() -> bool:
    """Whether this x86 CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(choice: str, device: torch.device) -> torch.dtype:
    """``--teacher-dtype`` and ``--precision``: explicit, or ``auto``: bfloat16 on CUDA and on CPUs with native bf16
    matmuls, else fp32.

    The teacher only runs forward, without gradients, and its logits are upcast to fp32 before the softmax. On this
    project's Zen 4 machines a bf16 forward of SmolLM2-135M ran about 4.6x faster than fp32 (2,440 vs 530 tokens/s,
    2 threads); its weights are a Q4_1 GGUF dequantized, so bf16 rounding is far below the quantization error.
    The student trains in mixed precision: bf16 matmuls under autocast, fp32 weights, optimizer and softmax.
    """
    if choice == "float32":
        return torch.float32
    if choice == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32
