"""A pruned student refitted towards its source by least squares (``edgedistill prune --reconstruct``).

:func:`reconstruct` refits, layer by layer on the student's own activations, the matrices that slicing cut
(:mod:`edgedistill.distill.prune` chooses and slices them). On the default teacher's derived `small` it is a far
better start (2.62 -> 1.77 held-out bits per byte before training) whose lead 32 distillation steps erase and 64
reverse, so :func:`~edgedistill.distill.prune.derive` applies it only when asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from edgedistill.distill.vocab import to_student_ids

if TYPE_CHECKING:  # prune calls this module: a runtime import back would be a cycle
    from edgedistill.distill.prune import PrunePlan

# Ridge of the refits, relative to the mean diagonal of each Gram matrix: on the default teacher's derived `small`
# (416 x 20) it gave a probe loss of 5.06, against 5.14 at 1e-3 and 5.15 at 1e-1 (7.33 sliced only).
RECONSTRUCT_RIDGE = 1e-2
# Calibration rows the refit reads (the first ones): the source's activations it keeps grow with them, and 32 x 256
# tokens already fix a few hundred unknowns per output.
RECONSTRUCT_ROWS = 32


def _solve(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The ridge least-squares ``M`` with ``features @ M ~ target`` (float64)."""
    gram = features.T @ features
    gram.diagonal().add_(RECONSTRUCT_RIDGE * gram.diagonal().mean().clamp_min(1e-30))
    return torch.linalg.solve(gram, features.T @ target)


@torch.no_grad()
def reconstruct(source_model: Any, student: Any, plan: PrunePlan, ids: torch.Tensor) -> None:
    """Refit in place, by ridge least squares on ``ids`` ([N, T+1] calibration rows in the source's ids), the
    matrices of ``student`` (sliced from ``source_model`` by ``plan``) that touch a pruned dimension.

    Layer by layer, within one forward of the student over all the rows, each on the student's own inputs, so
    that a layer corrects what the ones before it missed: q/k/v and gate/up map the student's normalised input to
    the source's projections of its full one (whose RMS the removed channels shared); o_proj and down_proj map the
    kept heads' (neurons') outputs to what brings the student's residual stream to the source's after the same
    layer, so the kept layers also take up what the removed ones added. Embeddings, norms and the head are
    unchanged. SlimGPT and FLAP compensate pruned structures by least squares one layer at a time; the sequential
    residual targets are ours. Costs one forward of the source and one of the student over ``ids``, and memory
    for the source's activations at the kept layers (4 float32 values per token, channel and kept layer, each
    freed once its layer is refitted)."""
    hid = torch.tensor(plan.hidden, device=ids.device)
    seen: dict[tuple[str, int], torch.Tensor] = {}

    def flat(value: torch.Tensor) -> torch.Tensor:
        return value.detach().reshape(-1, value.shape[-1]).double()

    def record(key: str, index: int, output: bool, channels: torch.Tensor | None = None) -> Any:
        def hook(module: Any, args: Any, out: Any) -> None:
            if not output:
                value = args[0]
            else:  # a decoder layer returns a tuple in older transformers
                value = out[0] if isinstance(out, tuple) else out
            value = value.detach().reshape(-1, value.shape[-1]).float()  # float32 until solved: half the memory
            seen[key, index] = value if channels is None else value[:, channels]

        return hook

    handles = []
    for i in plan.layers:  # the source's normalised inputs and its residual stream (kept channels) around layer i
        layer = source_model.model.layers[i]
        handles.append(layer.input_layernorm.register_forward_hook(record("attn_in", i, True)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(record("mlp_in", i, True)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(record("mid", i, False, hid)))
        handles.append(layer.register_forward_hook(record("out", i, True, hid)))
    _hooked_forward(source_model, ids[:, :-1], handles)

    residual: dict[str, torch.Tensor] = {}
    handles = []
    for new, old_index in enumerate(plan.layers):
        old, dst = source_model.model.layers[old_index], student.model.layers[new]
        q_rows, kv_rows, ffn_rows = plan.kept_rows(new, source_model.config)

        def readers(key: str, names: tuple[tuple[str, torch.Tensor], ...], i: int = old_index, old=old, dst=dst) -> Any:
            def hook(module: Any, args: Any, out: Any) -> None:
                residual[key] = flat(args[0])  # the student's residual stream entering this norm
                mapping = _solve(flat(out), seen.pop((key, i)).double())  # [student width, source width]
                for name, rows in names:
                    weight = dst.get_submodule(name).weight
                    weight.copy_((old.get_submodule(name).weight.double()[rows] @ mapping.T).to(weight.dtype))

            return hook

        def writer(key: str, target: str, i: int = old_index) -> Any:
            def hook(module: Any, args: Any) -> None:
                mapping = _solve(flat(args[0]), seen.pop((target, i)).double() - residual[key])
                module.weight.copy_(mapping.T.to(module.weight.dtype))

            return hook

        attention = (("self_attn.q_proj", q_rows), ("self_attn.k_proj", kv_rows), ("self_attn.v_proj", kv_rows))
        handles.append(dst.input_layernorm.register_forward_hook(readers("attn_in", attention)))
        handles.append(dst.self_attn.o_proj.register_forward_pre_hook(writer("attn_in", "mid")))
        mlp = (("mlp.gate_proj", ffn_rows), ("mlp.up_proj", ffn_rows))
        handles.append(dst.post_attention_layernorm.register_forward_hook(readers("mlp_in", mlp)))
        handles.append(dst.mlp.down_proj.register_forward_pre_hook(writer("mlp_in", "out")))
    student_ids = (
        ids
        if plan.vocab is None
        else to_student_ids(ids, plan.vocab, source_model.config.vocab_size, "the calibration data")
    )
    _hooked_forward(student, student_ids[:, :-1], handles)


def _hooked_forward(model: Any, inputs: torch.Tensor, handles: list[Any]) -> None:
    """One forward of ``model``'s body over ``inputs`` in eval mode for the hooks of ``handles``, which are then
    removed; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        model.model(input_ids=inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
