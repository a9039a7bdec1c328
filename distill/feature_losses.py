"""Feature (hidden-state) and attention-relation (MiniLMv2) distillation: the pure losses, the layer matching, and
the module that adds both terms to the :class:`~edgedistill.distill.heads.DistillationObjective`'s loss.

Both terms read the online teacher's intermediate states from the forward that the KD term already runs (forward
hooks on the chosen teacher layers only, armed while the teacher signal of a training batch is computed), and the
student's from its own training forward (hooks on its chosen layers). Nothing runs twice and no model is asked for
``output_attentions``.

Feature term (``--feature-weight``): student layer ``s`` is matched to teacher layer ``t``; the states are the
layers' outputs, i.e. the residual stream *before* the final norm (the same quantity at every depth; a hook on the
last layer sees it un-normed too; the final norm's input is what the head's logits are already distilled through).
A learned linear projection ``P_s`` (student width -> teacher width, no bias) per matched layer maps the student's
state; it trains with the student under the same optimizer, is saved in the training checkpoint (resume restores it
with its AdamW moments) and is dropped at save time, so the final checkpoint is a plain ``LlamaForCausalLM``.
``mse``: mean over supervised positions of ||P h_s - h_t||^2 / d_t; ``cosine``: mean of 1 - cos(P h_s, h_t). Every
supervised position counts once (the tag weight of reasoning tags applies to the logit terms only); the term is the
mean over matched layers.

Attention term (``--attention-weight``): for each (student layer, teacher layer) pair, the outputs of the layer's
``q_proj``, ``k_proj`` and ``v_proj`` (computed from the layer input after ``input_layernorm``; *before* RoPE, as
MiniLMv2 takes them) are each split, concatenated over heads, into ``R`` relation heads of width ``d_r = width / R``;
a relation is ``softmax(X X^T / sqrt(d_r))`` under the causal mask. With GQA, K and V are the projections' own
``num_key_value_heads * head_dim`` columns (not repeated per query head: repetition would count a KV group several
times), so the K-K and V-V relations use ``d_r = kv_width / R``. The loss is KL(teacher relation || student relation)
summed over keys, averaged over relation heads, over the Q-Q, K-K and V-V relations, over the supervised query
positions and over layer pairs. It does not depend on either model's number of attention heads: only the
concatenated projections enter. ``R`` must divide the q and k/v widths of both models; 0 picks the largest such ``R``
not above the teacher's attention head count.

Memory of the attention term, float32 maps of [B, R, L, L] (B sequences, L tokens): each relation keeps two such
maps for the backward pass (the student's log-softmax and the teacher's probabilities) and builds about three more
while it is computed, so about ``4 * B * R * L^2 * (6 * n_layers + 3)`` bytes (:func:`relation_bytes`); e.g. B = 8,
R = 8, L = 256, one layer: 144 MiB.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgedistill.distill.config import TrainConfig, parse_layer_pairs
from edgedistill.errors import EdgeDistillError

Tensor = torch.Tensor

# The teacher signal's entry that carries the captured teacher states to the objective.
STATES_KEY = "teacher_states"


# ------------------------------------------------------------------------------------------------------- losses
def _mse_rows(projected: Tensor, teacher: Tensor) -> Tensor:
    return (projected - teacher).pow(2).mean(-1)


def _cosine_rows(projected: Tensor, teacher: Tensor) -> Tensor:
    return 1 - F.cosine_similarity(projected, teacher, dim=-1, eps=1e-8)


_FEATURE_ROWS = {"mse": _mse_rows, "cosine": _cosine_rows}
FEATURE_LOSSES = tuple(_FEATURE_ROWS)


def feature_loss(student_hidden: Tensor, teacher_hidden: Tensor, projection: Tensor, kind: str = "mse") -> Tensor:
    """Hidden-state distillation loss of one layer pair, in float32.

    ``student_hidden``: [N, Ds] at the supervised positions; ``teacher_hidden``: [N, Dt] at the same positions;
    ``projection``: [Dt, Ds] (``P``); -> scalar. ``mse``: mean over the N rows of ||P h_s - h_t||^2 / Dt;
    ``cosine``: mean of 1 - cos(P h_s, h_t). N = 0 gives 0.
    """
    projected = F.linear(student_hidden.float(), projection.float())
    rows = _FEATURE_ROWS[kind](projected, teacher_hidden.float())
    return rows.sum() / max(1, rows.shape[0])


def _allowed(length: int, key_mask: Tensor | None, device: Any) -> Tensor:
    """[B or 1, 1, L, L] bool: query i may see key j <= i that is valid (its own key always, so no row is empty)."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    if key_mask is None:
        return causal[None, None]
    diagonal = torch.eye(length, dtype=torch.bool, device=device)
    return causal & (key_mask.bool()[:, None, None, :] | diagonal)


def _relation_scores(states: Tensor, heads: int, allowed: Tensor) -> Tensor:
    """[B, R, L, L] masked scaled dot products of ``states`` [B, L, D] split into ``heads`` relation heads."""
    batch, length, width = states.shape
    head_width = width // heads
    split = states.float().reshape(batch, length, heads, head_width).transpose(1, 2)  # [B, R, L, d_r]
    scores = split @ split.transpose(-1, -2) / math.sqrt(head_width)
    return scores.masked_fill(~allowed, float("-inf"))


def relation_kl_rows(
    student_states: Tensor, teacher_states: Tensor, heads: int, key_mask: Tensor | None = None
) -> Tensor:
    """KL(teacher relation || student relation) of every query position, averaged over relation heads.

    ``student_states``: [B, L, Ds]; ``teacher_states``: [B, L, Dt] (one of Q, K, V, concatenated over attention
    heads); ``heads``: R, dividing Ds and Dt; ``key_mask``: [B, L], False at padding keys (None: all valid);
    -> [B, L]. A relation is softmax(X X^T / sqrt(d_r)) per relation head under the causal mask.
    """
    allowed = _allowed(student_states.shape[1], key_mask, student_states.device)
    with torch.no_grad():
        teacher_log = torch.log_softmax(_relation_scores(teacher_states, heads, allowed), dim=-1)
        teacher_probs = teacher_log.exp()
        # sum_j p log p, then only p stays alive: KL = sum p log p - sum p log q
        negentropy = torch.where(allowed, teacher_probs * teacher_log, 0.0).sum(-1)
        del teacher_log
    student_log = torch.log_softmax(_relation_scores(student_states, heads, allowed), dim=-1)
    cross = (teacher_probs * torch.where(allowed, student_log, 0.0)).sum(-1)  # masked keys: p = 0, log q = -inf
    return (negentropy - cross).mean(1)


def _query_mean(rows: Tensor, positions: Tensor | None, key_mask: Tensor | None) -> Tensor:
    """Mean of [B, L] per-query values over ``positions`` (flattened [B * L] indices), else over valid queries."""
    flat = rows.reshape(-1)
    if positions is not None:
        return flat[positions].sum() / max(1, positions.numel())
    if key_mask is not None:
        valid = key_mask.reshape(-1).bool()
        return flat[valid].sum() / max(1, int(valid.sum()))
    return flat.mean()


def attention_relation_loss(
    student_qkv: tuple[Tensor, Tensor, Tensor],
    teacher_qkv: tuple[Tensor, Tensor, Tensor],
    heads: int,
    positions: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """MiniLMv2's self-attention relation loss of one layer pair.

    ``student_qkv``: the student layer's (Q [B, L, Hs*ds], K [B, L, Hkv_s*ds], V [B, L, Hkv_s*ds]) projections,
    pre-RoPE; ``teacher_qkv``: the teacher's, any widths that ``heads`` (R) divides; ``positions``: [N] supervised
    query positions in the flattened [B * L] (None: every valid query); ``key_mask``: [B, L] (None: no padding)
    -> scalar: the mean of :func:`relation_kl_rows` over the Q-Q, K-K and V-V relations and the query positions.
    """
    total = 0.0
    for student, teacher in zip(student_qkv, teacher_qkv):
        total = total + _query_mean(relation_kl_rows(student, teacher, heads, key_mask), positions, key_mask)
    return total / 3


def relation_bytes(batch: int, heads: int, length: int, layers: int) -> int:
    """About the peak bytes of the attention term's relation maps: 4 * B * R * L^2 * (6 * layers + 3)."""
    return 4 * batch * heads * length * length * (6 * layers + 3)


# ------------------------------------------------------------------------------------------------ layer matching
def uniform_teacher_layer(student_layer: int, student_layers: int, teacher_layers: int) -> int:
    """Teacher layer round((i + 1) * Lt / Ls) - 1 for student layer i (half rounds up; at least 0): the last
    student layer meets the last teacher layer and the others are spread evenly below it."""
    nearest = (2 * (student_layer + 1) * teacher_layers + student_layers) // (2 * student_layers)
    return max(0, nearest - 1)


@dataclass(frozen=True)
class Lineage:
    """What a student pruned from this run's teacher kept of it (``prune.json``'s chosen plan)."""

    record: str
    layers: list[int]  # teacher layer of each student layer
    hidden: list[int] | None  # teacher residual channel of each student channel; None: not recorded


def pruned_lineage(
    config: TrainConfig, out: Path, teacher_sha256: str | None, student_config: Any, teacher_config: Any
) -> Lineage | None:
    """The lineage of a student derived by pruning *this* teacher: ``--init prune``'s ``OUT/prune.json``, or the
    ``prune.json`` of a checkpoint ``--student`` whose source is the teacher (same sha256). A chained student's
    record describes another source's layers: None, as for a student not derived by pruning or a record that does
    not fit the two models."""
    if config.init == "prune":
        path = out / "prune.json"
    elif Path(config.student).is_dir():
        path = Path(config.student) / "prune.json"
    else:
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        source, plan = record["source"], record["chosen"]["plan"]
        if config.init != "prune" and (not teacher_sha256 or source.get("sha256") != teacher_sha256):
            return None
        layers = [int(i) for i in plan["layers"]]
        hidden = plan.get("hidden_ids")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    teacher_layers = teacher_config.num_hidden_layers
    if len(layers) != student_config.num_hidden_layers or not all(0 <= i < teacher_layers for i in layers):
        return None
    fits = (
        isinstance(hidden, list)
        and len(hidden) == student_config.hidden_size
        and all(isinstance(c, int) and 0 <= c < teacher_config.hidden_size for c in hidden)
    )
    return Lineage(str(path), layers, list(hidden) if fits else None)


def match_layers(
    spec: str, field: str, student_layers: int, teacher_layers: int, kept: list[int] | None = None
) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs of ``--feature-layers`` / ``--attention-layers`` ``spec``: ``auto``
    every student layer, ``last`` the two last layers, or the listed pairs. A student layer without a teacher
    layer gets ``kept[i]`` (a pruned student's) or :func:`uniform_teacher_layer`. Out-of-range layers: an error
    naming ``field``."""
    parsed = parse_layer_pairs(spec, field, ("auto", "last"))
    if parsed == "last":
        return [(student_layers - 1, teacher_layers - 1)]
    listed = [(i, None) for i in range(student_layers)] if parsed == "auto" else parsed
    pairs = []
    for student, teacher in listed:
        if student >= student_layers:
            raise EdgeDistillError(
                f"{field}: student layer {student} is out of range (the student has {student_layers} layers, "
                f"0..{student_layers - 1})"
            )
        if teacher is None:
            teacher = kept[student] if kept else uniform_teacher_layer(student, student_layers, teacher_layers)
        if teacher >= teacher_layers:
            raise EdgeDistillError(
                f"{field}: teacher layer {teacher} is out of range (the teacher has {teacher_layers} layers, "
                f"0..{teacher_layers - 1})"
            )
        pairs.append((student, teacher))
    return pairs


def choose_relation_heads(requested: int, widths: dict[str, int], teacher_heads: int) -> int:
    """``--relation-heads``: ``requested`` if it divides every width in ``widths`` (the q and k/v widths of both
    models), else an error; 0: the largest such R not above ``teacher_heads``."""
    common = math.gcd(*widths.values())
    if requested:
        if common % requested:
            described = ", ".join(f"{name} {width}" for name, width in widths.items())
            raise EdgeDistillError(
                f"relation_heads: {requested} does not divide every q and k/v width ({described}); choose a "
                f"divisor of {common}, or 0 for the automatic choice"
            )
        return requested
    return max(r for r in range(1, max(1, teacher_heads) + 1) if common % r == 0)


def init_projection(weight: Tensor, hidden: list[int] | None, generator: torch.Generator) -> str:
    """Initialise a [Dt, Ds] projection in place and say how: ``pruned channels`` (student channel j -> the
    teacher channel ``hidden[j]`` it was cut from, a 0/1 selection), ``identity`` (equal widths), or ``orthogonal``
    (orthonormal columns, seeded)."""
    with torch.no_grad():
        if hidden is not None:
            weight.zero_()
            weight[torch.tensor(hidden), torch.arange(weight.shape[1])] = 1.0
            return "pruned channels"
        if weight.shape[0] == weight.shape[1]:
            weight.copy_(torch.eye(weight.shape[0]))
            return "identity"
        torch.nn.init.orthogonal_(weight, generator=generator)
        return "orthogonal"


# ------------------------------------------------------------------------------------------------- the module
def _decoder_layers(model: Any) -> Any:
    return getattr(model, model.base_model_prefix).layers


class _Capture:
    """Forward hooks on named modules that keep each one's output while armed (and nothing otherwise)."""

    def __init__(self, modules: dict[str, Any]) -> None:
        self.outputs: dict[str, Tensor] = {}
        self.on = False
        self.handles = [module.register_forward_hook(self._keeper(name)) for name, module in modules.items()]

    def _keeper(self, name: str) -> Callable[..., None]:
        def keep(module: Any, args: Any, output: Any) -> None:
            if self.on:
                self.outputs[name] = output[0] if isinstance(output, tuple) else output

        return keep

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        self.outputs, self.on = {}, True
        try:
            yield
        finally:
            self.on = False

    def take(self) -> dict[str, Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _attention_modules(layers: Any, index: int, who: str) -> dict[str, Any]:
    attention = getattr(layers[index], "self_attn", None)
    projections = {name: getattr(attention, f"{name}_proj", None) for name in ("q", "k", "v")}
    if any(p is None for p in projections.values()):
        raise EdgeDistillError(
            f"attention_layers: the {who}'s layer {index} has no separate q_proj, k_proj and v_proj (only "
            "Llama-style attention is supported)"
        )
    return {f"{name}{index}": module for name, module in projections.items()}


class StateDistillation(torch.nn.Module):
    """The objective plus the feature and attention terms: ``forward`` returns ``(total, ce, kd, *terms)`` with
    ``terms`` the unweighted values of :attr:`term_names` (detached) and ``total`` the objective's loss plus each
    term times its weight. The teacher's states arrive in the teacher signal (:meth:`teacher_provider`)."""

    def __init__(
        self,
        objective: Any,
        teacher: Any,
        config: TrainConfig,
        feature_pairs: list[tuple[int, int]],
        attention_pairs: list[tuple[int, int]],
        relation_heads: int,
        hidden: list[int] | None = None,
        matching: str = "uniform",
    ) -> None:
        super().__init__()
        self.objective = objective
        student = objective.model
        self.feature_weight, self.attention_weight = config.feature_weight, config.attention_weight
        self.feature_kind, self.logit_kd = config.feature_loss, config.alpha < 1.0
        self.feature_pairs = feature_pairs if self.feature_weight > 0 else []
        self.attention_pairs = attention_pairs if self.attention_weight > 0 else []
        self.relation_heads = relation_heads
        # every pair of every phase of a schedule (one projection each); a phase uses its own (:meth:`set_phase`)
        self.all_feature_pairs, self.all_attention_pairs = list(self.feature_pairs), list(self.attention_pairs)
        self.phases: list[dict[str, Any]] = []
        student_width, teacher_width = student.config.hidden_size, teacher.config.hidden_size
        self.projections = torch.nn.ModuleList(
            torch.nn.Linear(student_width, teacher_width, bias=False) for _ in self.feature_pairs
        )
        generator = torch.Generator().manual_seed(config.seed)
        self.projection_init = [init_projection(p.weight, hidden, generator) for p in self.projections]
        self.projections.to(next(student.parameters()).device)
        self.matching = matching
        student_layers, teacher_layers = _decoder_layers(student), _decoder_layers(teacher)
        student_modules = {f"out{s}": student_layers[s] for s, _ in self.feature_pairs}
        teacher_modules = {f"out{t}": teacher_layers[t] for _, t in self.feature_pairs}
        for s, t in self.attention_pairs:
            student_modules.update(_attention_modules(student_layers, s, "student"))
            teacher_modules.update(_attention_modules(teacher_layers, t, "teacher"))
        self.student_capture = _Capture(student_modules)
        self.teacher_capture = _Capture(teacher_modules)

    @property
    def term_names(self) -> tuple[str, ...]:
        return (("feature",) if self.feature_pairs else ()) + (("attention",) if self.attention_pairs else ())

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        labels: Tensor,
        weights: Tensor,
        teacher: dict[str, Any] | None = None,
    ) -> tuple[Tensor, ...]:
        signal = dict(teacher or {})
        states = signal.pop(STATES_KEY, {})
        with self.student_capture.armed():
            total, ce, kd = self.objective(input_ids, positions, labels, weights, signal if self.logit_kd else None)
        student = self.student_capture.take()
        terms = []
        if self.feature_pairs:
            value = sum(
                feature_loss(
                    student[f"out{s}"].reshape(-1, student[f"out{s}"].shape[-1])[positions],
                    states[f"out{t}"],
                    projection.weight,
                    self.feature_kind,
                )
                for (s, t), projection in zip(self.feature_pairs, self._active_projections())
            ) / len(self.feature_pairs)
            total = total + self.feature_weight * value
            terms.append(value.detach())
        if self.attention_pairs:
            value = sum(
                attention_relation_loss(
                    tuple(student[f"{x}{s}"] for x in "qkv"),
                    tuple(states[f"{x}{t}"] for x in "qkv"),
                    self.relation_heads,
                    positions,
                )
                for s, t in self.attention_pairs
            ) / len(self.attention_pairs)
            total = total + self.attention_weight * value
            terms.append(value.detach())
        return (total, ce, kd, *terms)

    def _active_projections(self) -> list[Any]:
        return [self.projections[self.all_feature_pairs.index(pair)] for pair in self.feature_pairs]

    def set_phase(self, index: int) -> None:
        """Use phase ``index``'s weights, losses and layer pairs (a run without a schedule has the one phase)."""
        if not self.phases:
            return
        for name, value in self.phases[index].items():
            setattr(self, name, value)

    def teacher_provider(self, teacher_for: Callable[..., Any]) -> Callable[..., Any]:
        """``teacher_for`` with the teacher's captured states added to a training batch's signal (the teacher runs
        once, under its own ``no_grad``); layer outputs are kept at the supervised positions only."""

        def provide(split: str, rows: Any, inputs: Tensor, positions: Tensor) -> Any:
            if split != "train":
                return teacher_for(split, rows, inputs, positions)
            with self.teacher_capture.armed():
                signal = teacher_for(split, rows, inputs, positions)
            states = {}
            for name, value in self.teacher_capture.take().items():
                states[name] = value.reshape(-1, value.shape[-1])[positions] if name.startswith("out") else value
            return {**(signal or {}), STATES_KEY: states}

        return provide

    def checkpoint_state(self) -> dict[str, Any]:
        """The training checkpoint's entry: the projections (their AdamW moments are in the optimizer's state)."""
        return {"state_terms": {"projections": self.projections.state_dict()}}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`checkpoint_state` from a checkpoint (KeyError / RuntimeError when it does not fit)."""
        self.projections.load_state_dict(state["state_terms"]["projections"])

    def describe(self, config: TrainConfig) -> dict[str, Any]:
        """The settings and resolved matching, for ``train_summary.json``."""
        summary: dict[str, Any] = {}
        if self.all_feature_pairs:
            summary["feature"] = {
                "weight": self.feature_weight,
                "loss": self.feature_kind,
                "layers": [list(p) for p in self.all_feature_pairs],
                "teacher_layer_rule": self.matching,
                "states": "decoder layer outputs (residual stream, before the final norm)",
                "projection_init": sorted(set(self.projection_init)),
            }
        if self.all_attention_pairs:
            summary["attention"] = {
                "weight": self.attention_weight,
                "layers": [list(p) for p in self.all_attention_pairs],
                "relation_heads": self.relation_heads,
                "states": "q_proj, k_proj, v_proj outputs (pre-RoPE; k/v unrepeated under GQA)",
                "relation_bytes": relation_bytes(
                    config.batch_size, self.relation_heads, config.seq_len, len(self.all_attention_pairs)
                ),
            }
        if self.phases:  # a schedule: the weights above are the last phase's; each phase's own
            summary["phases"] = [
                {
                    "feature_weight": p["feature_weight"],
                    "feature_loss": p["feature_kind"],
                    "feature_layers": [list(x) for x in p["feature_pairs"]],
                    "attention_weight": p["attention_weight"],
                    "attention_layers": [list(x) for x in p["attention_pairs"]],
                    "relation_heads": p["relation_heads"],
                }
                for p in self.phases
            ]
        return summary


def _qkv_widths(model: Any, layers: list[int], who: str) -> dict[str, int]:
    decoder = _decoder_layers(model)
    widths: dict[str, int] = {}
    for index in layers:
        modules = _attention_modules(decoder, index, who)
        widths[f"{who} q"] = modules[f"q{index}"].out_features
        widths[f"{who} k/v"] = modules[f"k{index}"].out_features
    return widths


def build_state_distillation(
    objective: Any, teacher: Any, config: TrainConfig, out: Path, teacher_sha256: str | None
) -> StateDistillation:
    """The :class:`StateDistillation` of ``config`` around ``objective`` (whose ``model`` is the student), matched
    against ``teacher`` (see :func:`pruned_lineage` and :func:`match_layers`). Layers out of range, or relation
    heads that do not divide the widths, raise an error naming the setting."""
    student = objective.model
    lineage = pruned_lineage(config, out, teacher_sha256, student.config, teacher.config)
    kept = lineage.layers if lineage is not None else None
    phases = []
    for index, phase in enumerate(getattr(config, "phase_configs", [config])):
        try:
            phases.append(_phase_terms(phase, student, teacher, kept))
        except EdgeDistillError as err:
            if not config.phases:
                raise
            label = f"{config.schedule}: phase {index + 1} ({config.phases[index].name})"
            raise EdgeDistillError(f"{label}: {err}") from None
    if len(phases) == 1:
        feature_pairs, attention_pairs, heads = phases[0]
        union = config
    else:  # a schedule: the union of the phases' pairs, each phase then using its own
        feature_pairs = list(dict.fromkeys(pair for p in phases for pair in p[0]))
        attention_pairs = list(dict.fromkeys(pair for p in phases for pair in p[1]))
        heads = next((p[2] for p in phases if p[2]), 0)
        union = dataclasses.replace(
            config,
            schedule="",
            feature_weight=1.0 if feature_pairs else 0.0,
            attention_weight=1.0 if attention_pairs else 0.0,
        )
    matching = f"prune.json ({lineage.record})" if lineage is not None else "uniform"
    states = StateDistillation(
        objective,
        teacher,
        union,
        feature_pairs,
        attention_pairs,
        heads,
        hidden=lineage.hidden if lineage is not None else None,
        matching=matching,
    )
    if len(phases) > 1:
        states.phases = [
            dict(
                feature_weight=c.feature_weight,
                attention_weight=c.attention_weight,
                feature_kind=c.feature_loss,
                logit_kd=c.alpha < 1.0,
                feature_pairs=f,
                attention_pairs=a,
                relation_heads=h,
            )
            for c, (f, a, h) in zip(config.phase_configs, phases)
        ]
        states.set_phase(0)
    return states


def _phase_terms(
    config: TrainConfig, student: Any, teacher: Any, kept: list[int] | None
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
    """(feature pairs, attention pairs, relation heads) of one phase's settings (empty / 0 for a term that is
    off)."""
    student_layers, teacher_layers = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    feature_pairs: list[tuple[int, int]] = []
    attention_pairs: list[tuple[int, int]] = []
    if config.feature_weight > 0:
        feature_pairs = match_layers(config.feature_layers, "feature_layers", student_layers, teacher_layers, kept)
    heads = 0
    if config.attention_weight > 0:
        attention_pairs = match_layers(
            config.attention_layers, "attention_layers", student_layers, teacher_layers, kept
        )
        widths = {
            **_qkv_widths(student, [s for s, _ in attention_pairs], "student"),
            **_qkv_widths(teacher, [t for _, t in attention_pairs], "teacher"),
        }
        heads = choose_relation_heads(config.relation_heads, widths, teacher.config.num_attention_heads)
    return feature_pairs, attention_pairs, heads
