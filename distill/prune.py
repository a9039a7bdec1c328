"""Students derived from a teacher by structured pruning (Minitron-style), on a laptop CPU.

Four kinds of structure are ranked by how much they do on calibration tokens of the training data (one forward of
the teacher, with hooks):

- **hidden channels**: the energy (mean square) of each channel of every RMSNorm's output, summed over the norms
  (each layer's two and the final one), as Minitron ranks embedding channels by their LayerNorm outputs;
- **FFN neurons**: the energy of each input of each layer's down-projection;
- **attention heads, by whole KV group** (GQA): the energy of each head's output (the o-projection's input),
  summed over the query heads that share a key/value head, so that a group is kept or removed whole;
- **layers**: block influence (ShortGPT: 1 - cosine between a layer's input and output, averaged over tokens), or,
  with ``layer_metric="drop"``, the calibration loss with that layer skipped.

:func:`slice_model` keeps the chosen structures and returns a plain ``LlamaForCausalLM`` (no remote code); with
everything kept it is the teacher exactly. Removing hidden channels changes what every RMSNorm divides by, so each
norm's weight is rescaled by the measured ratio of its input's RMS over the kept channels to that over all of them
(``rescale_norms``), which keeps the norm's output at the teacher's scale on average.

With ``reconstruct`` the winner is then refitted by least squares (:mod:`edgedistill.distill.reconstruct`).

:mod:`edgedistill.distill.shapes` lists the shapes that meet a parameter target with widths that every GGUF
quantization takes (multiples of 32; 256, the k-quants' super-block, preferred), and :func:`derive` ranks them by a
probe (the calibration loss of the pruned model, then a few distillation steps for the best few) and returns the
winner with every candidate's score.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from edgedistill.distill.config import LAYER_METRICS, PRESET_TOLERANCE, StudentShape
from edgedistill.distill.shapes import WIDTH_QUANTUM, candidate_shapes, select_candidates, shape_dict
from edgedistill.distill.vocab import VocabMap, to_student_ids
from edgedistill.errors import EdgeDistillError

# Calibration (importance) and probe (candidate scoring) sequences of ``distill --init prune``; `edgedistill
# prune` takes them as flags. 64 x 256 tokens: Minitron's ~1,000 samples scaled to a laptop CPU's minute.
CALIBRATION_ROWS = 64
PROBE_ROWS = 16


def teacher_shape(config: Any) -> StudentShape:
    heads = config.num_attention_heads
    return StudentShape(
        config.hidden_size,
        config.num_hidden_layers,
        heads,
        getattr(config, "num_key_value_heads", None) or heads,
        config.intermediate_size,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
    )


def check_prunable(model: Any) -> None:
    """Pruning slices Llama's tensors by name; other architectures (or biases, or untied heads with soft-capping)
    would be sliced wrongly, so they are refused up front."""
    config = model.config
    if config.model_type != "llama":
        raise EdgeDistillError(f"prune: needs a Llama model (model_type 'llama'), got '{config.model_type}'")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise EdgeDistillError(f"prune: {flag} is set; pruning handles Llama models without biases only")


# ------------------------------------------------------------------------------------------------- importance
@dataclass
class Importance:
    """Per-structure importance of one model on calibration tokens (float64, on the CPU)."""

    hidden: torch.Tensor  # [H]: summed over the RMSNorms' outputs
    norm_inputs: torch.Tensor  # [2 L + 1, H]: mean square of each norm's input channel (for rescaling)
    heads: torch.Tensor  # [L, G]: per KV group
    ffn: torch.Tensor  # [L, I]
    influence: torch.Tensor  # [L]: block influence, 1 - cos(input, output)
    drop_loss: torch.Tensor | None  # [L]: calibration loss with the layer skipped (layer_metric "drop")
    base_loss: float  # the model's own calibration loss
    tokens: int

    def layer_scores(self, metric: str) -> torch.Tensor:
        """Higher = more important."""
        if metric == "drop":
            if self.drop_loss is None:
                raise EdgeDistillError("prune: layer metric 'drop' was not measured")
            return self.drop_loss - self.base_loss
        return self.influence

    def summary(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "base_loss": self.base_loss,
            "layer_influence": [round(float(v), 5) for v in self.influence],
            "layer_drop_loss": None if self.drop_loss is None else [round(float(v), 4) for v in self.drop_loss],
        }


def _hidden_states(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def measure_importance(
    model: Any, ids: torch.Tensor, batch_size: int = 8, layer_metric: str = "influence"
) -> Importance:
    """Importance of every hidden channel, KV group, FFN neuron and layer of ``model`` on ``ids`` ([N, T+1]
    token rows; inputs ``[:, :-1]``, labels ``[:, 1:]``)."""
    check_prunable(model)
    if layer_metric not in LAYER_METRICS:
        raise EdgeDistillError(f"layer_metric: expected one of {', '.join(LAYER_METRICS)}, got {layer_metric!r}")
    shape = teacher_shape(model.config)
    layers = model.model.layers
    count_l, hidden = len(layers), shape.hidden_size
    group = shape.num_attention_heads // shape.num_key_value_heads
    acc = {
        "hidden": torch.zeros(hidden, dtype=torch.float64),
        "norm_inputs": torch.zeros(2 * count_l + 1, hidden, dtype=torch.float64),
        "heads": torch.zeros(count_l, shape.num_attention_heads, dtype=torch.float64),
        "ffn": torch.zeros(count_l, shape.intermediate_size, dtype=torch.float64),
        "influence": torch.zeros(count_l, dtype=torch.float64),
    }
    tokens = 0

    def energy(x: torch.Tensor) -> torch.Tensor:
        return x.detach().double().pow(2).reshape(-1, x.shape[-1]).sum(0)

    def add(target: torch.Tensor, value: torch.Tensor) -> None:  # hooks must return None to change nothing
        target.add_(value)

    norms = [m for layer in layers for m in (layer.input_layernorm, layer.post_attention_layernorm)]
    norms.append(model.model.norm)
    handles = []
    for index, norm in enumerate(norms):
        handles.append(norm.register_forward_pre_hook(lambda m, a, i=index: add(acc["norm_inputs"][i], energy(a[0]))))
        handles.append(norm.register_forward_hook(lambda m, a, out: add(acc["hidden"], energy(out))))
    inputs: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        per_head = (-1, shape.num_attention_heads, shape.head_dim)
        handles.append(
            attn.o_proj.register_forward_pre_hook(
                lambda m, a, i=index: add(acc["heads"][i], a[0].detach().double().pow(2).reshape(per_head).sum((0, 2)))
            )
        )
        handles.append(mlp.down_proj.register_forward_pre_hook(lambda m, a, i=index: add(acc["ffn"][i], energy(a[0]))))

        def remember(module: Any, args: Any, kwargs: Any, i: int = index) -> None:
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach()

        def influence(module: Any, args: Any, kwargs: Any, output: Any, i: int = index) -> None:
            before, after = inputs.pop(i).float(), _hidden_states(output).detach().float()
            cos = torch.nn.functional.cosine_similarity(before, after, dim=-1)
            acc["influence"][i] += (1 - cos).double().sum()

        handles.append(layer.register_forward_pre_hook(remember, with_kwargs=True))
        handles.append(layer.register_forward_hook(influence, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        base_loss = _calibration_loss(model, ids, batch_size)
        tokens = ids.shape[0] * (ids.shape[1] - 1)
    finally:
        for handle in handles:
            handle.remove()
    drop_loss = None
    if layer_metric == "drop":
        drop_loss = torch.tensor([_loss_without_layer(model, ids, batch_size, i) for i in range(count_l)])
    model.train(was_training)
    heads = acc["heads"].reshape(count_l, shape.num_key_value_heads, group).sum(-1)
    return Importance(
        hidden=acc["hidden"] / tokens,
        norm_inputs=acc["norm_inputs"] / tokens,
        heads=heads / tokens,
        ffn=acc["ffn"] / tokens,
        influence=acc["influence"] / tokens,
        drop_loss=drop_loss,
        base_loss=base_loss,
        tokens=tokens,
    )


@torch.no_grad()
def _calibration_loss(model: Any, ids: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy of ``model`` on ``ids`` rows, the LM head applied in chunks of rows."""
    base = model.model
    head = model.get_output_embeddings().weight
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        rows = ids[start : start + batch_size]
        hidden = base(input_ids=rows[:, :-1]).last_hidden_state.reshape(-1, head.shape[1])
        labels = rows[:, 1:].reshape(-1)
        for first in range(0, hidden.shape[0], 1024):
            logits = torch.nn.functional.linear(hidden[first : first + 1024].float(), head.float())
            total += torch.nn.functional.cross_entropy(logits, labels[first : first + 1024], reduction="sum").item()
        count += labels.numel()
    return total / max(1, count)


def _loss_without_layer(model: Any, ids: torch.Tensor, batch_size: int, index: int) -> float:
    layer = model.model.layers[index]

    def skip(module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = layer.register_forward_hook(skip, with_kwargs=True)
    try:
        return _calibration_loss(model, ids, batch_size)
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------- slicing
@dataclass
class PrunePlan:
    """What a pruned model keeps of its source, as indices into the source's structures (each sorted)."""

    hidden: list[int]
    layers: list[int]
    groups: list[list[int]]  # per kept layer: its kept KV groups
    ffn: list[list[int]]  # per kept layer: its kept FFN neurons
    norm_scale: list[float] = field(default_factory=list)  # per source norm (2 L + 1); empty: no rescaling
    vocab: list[int] | None = None  # the source's embedding rows kept (a trimmed vocabulary); None: all

    def kept_rows(self, new: int, config: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows of the source (``config``: its configuration) that kept layer ``new`` holds: q_proj's,
        k/v_proj's and gate/up_proj's."""
        source = teacher_shape(config)
        group, head_dim = source.num_attention_heads // source.num_key_value_heads, source.head_dim

        def rows(units: list[int]) -> torch.Tensor:
            return torch.cat([torch.arange(u * head_dim, (u + 1) * head_dim) for u in units])

        groups = self.groups[new]
        return rows([g * group + h for g in groups for h in range(group)]), rows(groups), torch.tensor(self.ffn[new])

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "hidden_channels": len(self.hidden),
            "kv_groups": self.groups,
            "ffn_neurons": [len(f) for f in self.ffn],
        }


def make_plan(
    importance: Importance,
    source: StudentShape,
    shape: StudentShape,
    layer_metric: str,
    rescale_norms: bool,
    vocab: list[int] | None = None,
) -> PrunePlan:
    """The structures of ``source`` a model of ``shape`` keeps: the most important of each kind (and the
    embedding rows ``vocab`` of a trimmed vocabulary)."""
    _check_sliceable(source, shape)

    def top(scores: torch.Tensor, k: int) -> list[int]:
        return sorted(torch.topk(scores, k).indices.tolist())

    hidden = top(importance.hidden, shape.hidden_size)
    layers = top(importance.layer_scores(layer_metric), shape.num_hidden_layers)
    groups = [top(importance.heads[i], shape.num_key_value_heads) for i in layers]
    ffn = [top(importance.ffn[i], shape.intermediate_size) for i in layers]
    scale: list[float] = []
    if rescale_norms:
        energy = importance.norm_inputs
        scale = torch.sqrt(energy[:, hidden].mean(1) / energy.mean(1).clamp_min(1e-30)).tolist()
    return PrunePlan(hidden, layers, groups, ffn, scale, vocab)


def _check_sliceable(source: StudentShape, shape: StudentShape) -> None:
    if shape.head_dim != source.head_dim:
        raise EdgeDistillError(f"prune: head_dim must stay {source.head_dim} (got {shape.head_dim})")
    group = source.num_attention_heads // source.num_key_value_heads
    if shape.num_attention_heads != shape.num_key_value_heads * group:
        raise EdgeDistillError(
            f"prune: heads are kept by whole KV group of {group}, so num_attention_heads must be "
            f"{group} x num_key_value_heads ({shape.num_key_value_heads * group}), got {shape.num_attention_heads}"
        )
    for name in ("hidden_size", "num_hidden_layers", "num_key_value_heads", "intermediate_size"):
        if getattr(shape, name) > getattr(source, name):
            raise EdgeDistillError(
                f"prune: {name} {getattr(shape, name)} is larger than the source's {getattr(source, name)}"
            )


@torch.no_grad()
def slice_model(model: Any, plan: PrunePlan) -> Any:
    """A new ``LlamaForCausalLM`` holding the kept weights of ``model`` (float32, training mode)."""
    from transformers import LlamaForCausalLM

    check_prunable(model)
    source = teacher_shape(model.config)
    config = model.config.to_dict()
    for key in ("architectures", "_name_or_path", "torch_dtype", "dtype", "transformers_version"):
        config.pop(key, None)
    config.update(
        hidden_size=len(plan.hidden),
        num_hidden_layers=len(plan.layers),
        num_key_value_heads=len(plan.groups[0]),
        num_attention_heads=len(plan.groups[0]) * source.num_attention_heads // source.num_key_value_heads,
        intermediate_size=len(plan.ffn[0]),
        head_dim=source.head_dim,
    )
    vocab = torch.arange(model.config.vocab_size) if plan.vocab is None else torch.tensor(plan.vocab)
    if plan.vocab is not None:  # special ids in the config follow their rows
        new_id = {old: new for new, old in enumerate(plan.vocab)}
        config["vocab_size"] = len(plan.vocab)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(config.get(key), int):
                config[key] = new_id.get(config[key])
    if "layer_types" in config:
        config["layer_types"] = [config["layer_types"][i] for i in plan.layers]
    student = LlamaForCausalLM(type(model.config)(**config))
    hid = torch.tensor(plan.hidden)
    scales = plan.norm_scale or [1.0] * (2 * source.num_hidden_layers + 1)

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src.to(dst.dtype))

    copy(student.model.embed_tokens.weight, model.model.embed_tokens.weight[vocab][:, hid])
    for new, old_index in enumerate(plan.layers):
        old, dst = model.model.layers[old_index], student.model.layers[new]
        q_rows, kv_rows, ffn_rows = plan.kept_rows(new, model.config)
        copy(dst.input_layernorm.weight, old.input_layernorm.weight[hid] * scales[2 * old_index])
        copy(dst.post_attention_layernorm.weight, old.post_attention_layernorm.weight[hid] * scales[2 * old_index + 1])
        attn, new_attn = old.self_attn, dst.self_attn
        copy(new_attn.q_proj.weight, attn.q_proj.weight[q_rows][:, hid])
        copy(new_attn.k_proj.weight, attn.k_proj.weight[kv_rows][:, hid])
        copy(new_attn.v_proj.weight, attn.v_proj.weight[kv_rows][:, hid])
        copy(new_attn.o_proj.weight, attn.o_proj.weight[hid][:, q_rows])
        mlp, new_mlp = old.mlp, dst.mlp
        copy(new_mlp.gate_proj.weight, mlp.gate_proj.weight[ffn_rows][:, hid])
        copy(new_mlp.up_proj.weight, mlp.up_proj.weight[ffn_rows][:, hid])
        copy(new_mlp.down_proj.weight, mlp.down_proj.weight[hid][:, ffn_rows])
    copy(student.model.norm.weight, model.model.norm.weight[hid] * scales[-1])
    if not model.config.tie_word_embeddings:
        copy(student.lm_head.weight, model.lm_head.weight[vocab][:, hid])
    student.train()
    return student


# ------------------------------------------------------------------------------------------------- probe
@dataclass
class Candidate:
    shape: StudentShape
    parameters: int
    zero_shot_loss: float | None = None
    probe_loss: float | None = None  # calibration loss after the probe's distillation steps
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": shape_dict(self.shape),
            "parameters": self.parameters,
            "zero_shot_loss": _round(self.zero_shot_loss),
            "probe_loss": _round(self.probe_loss),
            "seconds": round(self.seconds, 2),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def probe_distill(
    student: Any,
    teacher: Any,
    ids: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    dtype: torch.dtype,
    vocab_rows: torch.Tensor | None = None,
) -> None:
    """``steps`` steps of forward-KL distillation (T = 1, alpha 0.5) of ``student`` from ``teacher`` on rows of
    ``ids`` (the teacher's token ids), cycled: the short retraining by which candidate shapes are compared. A
    trimmed student (``vocab_rows``: the teacher ids it keeps) reads its own ids and learns the teacher's
    distribution over the kept rows, renormalised."""
    from edgedistill.distill.heads import SupervisedLogits, autocast, teacher_signal
    from edgedistill.distill.losses import chunked_distillation_loss

    head, teacher_head = SupervisedLogits(student), SupervisedLogits(teacher).eval()
    mapper = None
    if vocab_rows is not None:
        from edgedistill.distill.vocab import TeacherMapper, VocabMap

        vocab_map = VocabMap(vocab_rows.cpu().numpy(), teacher.config.vocab_size, "renorm")
        mapper = TeacherMapper(vocab_map, ids.device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    student.train()
    for step in range(steps):
        start = (step * batch_size) % ids.shape[0]
        rows = ids[start : start + batch_size]
        signal = teacher_signal(teacher_head, rows[:, :-1], torch.arange(rows[:, 1:].numel()))
        if mapper is not None:
            rows = mapper.to_student[rows]
            signal = mapper.signal(signal)
        inputs, labels = rows[:, :-1], rows[:, 1:].reshape(-1)
        positions = torch.arange(labels.numel())
        with autocast(inputs.device, dtype):
            hidden = head.hidden(inputs, positions)
        low = None if dtype == torch.float32 else dtype
        loss, _, _ = chunked_distillation_loss(
            hidden.float(),
            head.head_weight,
            labels,
            torch.ones_like(labels, dtype=torch.float32),
            **signal,
            alpha=0.5,
            temperature=1.0,
            name="fkl",
            matmul_dtype=low,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@dataclass
class PruneSettings:
    """How :func:`derive` measures, searches and probes."""

    layer_metric: str = "influence"
    rescale_norms: bool = False
    reconstruct: bool = False  # refit the chosen student by least squares (:mod:`~edgedistill.distill.reconstruct`)
    candidates: int = 12  # shapes scored by zero-shot loss (the most promising by a cheap prior)
    probe_top: int = 3  # of those, the best few given ``probe_steps`` distillation steps
    probe_steps: int = 8
    probe_lr: float = 3e-4
    batch_size: int = 4
    tolerance: float = PRESET_TOLERANCE


def probe_set(candidates: list[Candidate], count: int) -> list[Candidate]:
    """The candidates worth a probe: the best zero-shot one in each of ``count`` bands of hidden width.

    Zero-shot loss favours narrow, deep shapes (they keep more layers) while a few steps of distillation favour
    wide ones (on SmolLM2-135M at 1/4: 192 x 25 layers had the best zero-shot loss, 7.91 against 8.70, and 384 x 15
    the best after five steps, 6.49 against 7.09), so the probes are spread over widths instead of taking the
    zero-shot top few."""
    by_width = sorted(candidates, key=lambda c: (c.shape.hidden_size, c.zero_shot_loss))
    count = max(1, min(count, len(by_width)))
    bands = [by_width[i * len(by_width) // count : (i + 1) * len(by_width) // count] for i in range(count)]
    return [min(band, key=lambda c: c.zero_shot_loss) for band in bands if band]


@dataclass
class Derivation:
    """What :func:`derive` returns: the pruned student, its plan, and the record written to ``prune.json``."""

    student: Any
    shape: StudentShape
    plan: PrunePlan
    record: dict[str, Any]


def derive(
    source_model: Any,
    target: float,
    calibration: torch.Tensor,
    probe: torch.Tensor,
    settings: PruneSettings,
    teacher: Any = None,
    dtype: torch.dtype = torch.float32,
    shape: StudentShape | None = None,
    log: Any = None,
    vocab_rows: torch.Tensor | None = None,
) -> Derivation:
    """Prune ``source_model`` to about ``target`` parameters (or exactly to ``shape``).

    ``calibration`` rows measure importance; ``probe`` rows (other rows of the training data) score candidates:
    their loss zero-shot, then after ``probe_steps`` of distillation from ``teacher`` (the source when None) for
    the ``probe_top`` best. The best probe score wins. Both are in the source's token ids. ``vocab_rows``: the
    source's embedding rows a trimmed student keeps (its ids are their positions; the parameter target counts only
    them, so the rows saved go into the layers); the probes' teacher is then cut to the same rows.
    """
    started = time.perf_counter()
    source = teacher_shape(source_model.config)
    source_params = sum(p.numel() for p in source_model.parameters())
    tied = bool(source_model.config.tie_word_embeddings)
    vocab = source_model.config.vocab_size if vocab_rows is None else len(vocab_rows)
    rows = None if vocab_rows is None else [int(i) for i in vocab_rows]
    student_probe = probe
    if rows is not None:  # the candidates read the probe rows in their own ids
        student_probe = to_student_ids(probe, rows, source_model.config.vocab_size, "the probe data")
    importance = measure_importance(source_model, calibration, settings.batch_size, settings.layer_metric)
    importance_seconds = time.perf_counter() - started
    if shape is not None:
        shapes = [shape]
    else:
        shapes = candidate_shapes(source, vocab, target, settings.tolerance, tied)
        if not shapes:
            raise EdgeDistillError(
                f"prune: no shape within {settings.tolerance:.0%} of {target / 1e6:.2f} M parameters can be cut "
                f"from a {source_params / 1e6:.1f} M model with widths in multiples of "
                f"{WIDTH_QUANTUM} (the embeddings alone are {vocab * WIDTH_QUANTUM / 1e6:.1f} M at width "
                f"{WIDTH_QUANTUM})"
            )
        shapes = select_candidates(shapes, source, settings.candidates)
    candidates = []
    for candidate_shape in shapes:
        begun = time.perf_counter()
        plan = make_plan(importance, source, candidate_shape, settings.layer_metric, settings.rescale_norms, rows)
        model = slice_model(source_model, plan)
        candidate = Candidate(candidate_shape, sum(p.numel() for p in model.parameters()))
        candidate.zero_shot_loss = _calibration_loss(model, student_probe, settings.batch_size)
        candidate.seconds = time.perf_counter() - begun
        candidates.append(candidate)
        if log:
            log(f"prune: candidate {_describe(candidate_shape)}: zero-shot loss {candidate.zero_shot_loss:.3f}")
    ranked = sorted(candidates, key=lambda c: c.zero_shot_loss)
    if settings.probe_steps and len(ranked) > 1:
        for candidate in probe_set(candidates, settings.probe_top):
            begun = time.perf_counter()
            plan = make_plan(importance, source, candidate.shape, settings.layer_metric, settings.rescale_norms, rows)
            model = slice_model(source_model, plan)
            probe_distill(
                model,
                teacher if teacher is not None else source_model,
                probe,
                settings.probe_steps,
                settings.batch_size,
                settings.probe_lr,
                dtype,
                vocab_rows,
            )
            candidate.probe_loss = _calibration_loss(model, student_probe, settings.batch_size)
            candidate.seconds += time.perf_counter() - begun
            if log:
                log(f"prune: probe {_describe(candidate.shape)}: loss {candidate.probe_loss:.3f}")
        best = min((c for c in candidates if c.probe_loss is not None), key=lambda c: c.probe_loss)
    else:
        best = ranked[0]
    plan = make_plan(importance, source, best.shape, settings.layer_metric, settings.rescale_norms, rows)
    student = slice_model(source_model, plan)
    chosen = best.to_dict()
    if settings.reconstruct:  # the winner only: refitting every candidate would cost a forward of each
        from edgedistill.distill.reconstruct import RECONSTRUCT_ROWS, reconstruct

        begun = time.perf_counter()
        reconstruct(source_model, student, plan, calibration[:RECONSTRUCT_ROWS])
        chosen.update(
            reconstructed_loss=_round(_calibration_loss(student, student_probe, settings.batch_size)),
            reconstruct_seconds=round(time.perf_counter() - begun, 2),
        )
        if log:
            log(f"prune: refitted by least squares: loss {best.zero_shot_loss:.3f} -> {chosen['reconstructed_loss']}")
    record = {
        "source": {"shape": shape_dict(source), "parameters": source_params},
        "target_parameters": int(target),
        "settings": dataclasses.asdict(settings),
        "importance": importance.summary(),
        "importance_seconds": round(importance_seconds, 2),
        "candidates": [c.to_dict() for c in candidates],
        # hidden_ids: the source's residual channels kept, which initialise feature distillation's projection
        "chosen": dict(chosen, plan=dict(plan.to_dict(), hidden_ids=plan.hidden)),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return Derivation(student, best.shape, plan, record)


def _describe(shape: StudentShape) -> str:
    return (
        f"hidden {shape.hidden_size}, {shape.num_hidden_layers} layers, {shape.num_key_value_heads} KV groups "
        f"({shape.num_attention_heads} heads), FFN {shape.intermediate_size}"
    )


# ------------------------------------------------------------------------------------------------- runs
def calibration_rows(ids: torch.Tensor, calibration: int, probe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced rows of the training data's packed ``ids``: ``calibration`` rows to measure importance on and
    ``probe`` other rows to score candidates on (each at least one row)."""
    count = ids.shape[0]
    if count < 2:
        raise EdgeDistillError("prune: the training data has fewer than 2 sequences; calibration needs more")
    calibration = max(1, min(calibration, count - 1))
    probe = max(1, min(probe, count - calibration))
    picked = torch.linspace(0, count - 1, calibration + probe).round().long().unique()
    probe_rows = picked[1 :: max(1, len(picked) // probe)][:probe]
    keep = torch.ones(len(picked), dtype=torch.bool)
    keep[torch.isin(picked, probe_rows)] = False
    return ids[picked[keep]], ids[probe_rows]


def save_derived(out: Any, derivation: Derivation, tokenizer: Any, vocab_map: Any = None) -> None:
    """``out``: the derived student as a Hugging Face checkpoint (:func:`~edgedistill.distill.checkpoint.save_final`)
    plus ``prune.json``, written last: its presence marks a complete derivation."""
    import json
    from pathlib import Path

    from edgedistill.distill.checkpoint import save_final
    from edgedistill.files import atomic_write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_final(out, derivation.student, tokenizer, vocab_map)
    atomic_write_text(out / PRUNE_RECORD, json.dumps(derivation.record, indent=2) + "\n")


PRUNE_RECORD = "prune.json"


def target_parameters(spec: str, reference_params: int) -> float | None:
    """The parameter target of ``--student``: a preset's share of the reference (original teacher); None for a
    shape file (its shape is exact)."""
    from edgedistill.distill.config import STUDENT_PRESETS

    if spec in STUDENT_PRESETS:
        return reference_params * STUDENT_PRESETS[spec]["fraction"]
    return None


def run_prune(config: Any, log: Any = print) -> dict[str, Any]:
    """``edgedistill prune``: cut ``config.source`` to ``config.student`` and write ``config.out`` (a Hugging
    Face checkpoint plus ``prune.json``). Returns the record."""
    from pathlib import Path

    from edgedistill.distill import teacher as teachers
    from edgedistill.distill.data import load_data
    from edgedistill.distill.heads import release_free_memory, resolve_dtype
    from edgedistill.distill.student import resolve_shape, teacher_parameter_count
    from edgedistill.files import claim
    from edgedistill.system import resolve_device

    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    try:
        source = teachers.resolve_teacher(config.source)
    except EdgeDistillError as err:  # resolve_teacher names --teacher; here the path is the source
        raise EdgeDistillError(f"source: {str(err).removeprefix('teacher: ')}") from None
    reference = teachers.resolve_teacher(config.teacher) if config.teacher else source
    tokenizer = teachers.load_tokenizer(reference)
    reference_config = teachers.load_config(reference)
    target = target_parameters(config.student, teacher_parameter_count(reference_config))
    shape = None if target is not None else resolve_shape(config.student, reference_config)
    train, _, stats = load_data(config.data, tokenizer, config.seq_len, config.val_fraction, 1.0, config.skip_bad_lines)
    vocab_map, student_tokenizer = _prune_vocabulary(config, source, tokenizer, stats.token_counts)
    ids = torch.from_numpy(train.ids).long()
    vocab_rows = None
    if vocab_map is not None:  # the student's tokens, in the ids of the model being cut
        train, _, _ = load_data(
            config.data, student_tokenizer, config.seq_len, config.val_fraction, 1.0, config.skip_bad_lines
        )
        ids = torch.from_numpy(train.ids).long()
        if source.kind != "hf" or VocabMap.load(source.path) is None:  # cut from a full-vocabulary model
            vocab_rows = torch.from_numpy(vocab_map.teacher_ids)
            ids = vocab_rows[ids]
    calibration, probe = calibration_rows(ids, config.calibration, config.probe_rows)
    with claim(Path(config.out), "out") as out:
        model = teachers.load_model(source, torch.float32, str(device))
        teacher = None
        # a trimmed source (a chain) is probed against itself: it speaks the student's vocabulary, the teacher not
        if reference is not source and config.probe_steps and not (vocab_map is not None and vocab_rows is None):
            teacher = teachers.load_model(reference, resolve_dtype("auto", device), str(device))
        if source.kind == "hf" and vocab_rows is None and vocab_map is None:
            _check_same_vocabulary(model, tokenizer, source)
        settings = PruneSettings(
            layer_metric=config.layer_metric,
            rescale_norms=config.rescale_norms,
            reconstruct=config.reconstruct,
            candidates=config.candidates,
            probe_top=config.probe_top,
            probe_steps=config.probe_steps,
            probe_lr=config.probe_lr,
            batch_size=config.batch_size,
        )
        derivation = derive(
            model,
            target if target is not None else 0.0,
            calibration.to(device),
            probe.to(device),
            settings,
            teacher=teacher,
            dtype=resolve_dtype("auto", device),
            shape=shape,
            log=log,
            vocab_rows=vocab_rows,
        )
        derivation.record.update(
            vocab=None if vocab_map is None else {"size": vocab_map.size, "teacher_size": vocab_map.teacher_size},
            source=dict(derivation.record["source"], spec=config.source, sha256=source.fingerprint()),
            teacher=config.teacher or config.source,
            student=config.student,
            calibration_rows=int(calibration.shape[0]),
            probe_rows=int(probe.shape[0]),
            seq_len=config.seq_len,
        )
        del model, teacher
        release_free_memory()
        save_derived(out, derivation, student_tokenizer, vocab_map)
    return derivation.record


def _prune_vocabulary(config: Any, source: Any, tokenizer: Any, counts: Any) -> tuple[Any, Any]:
    """(VocabMap or None, the student's tokenizer): a trimmed source's own vocabulary (a chain keeps it), else
    ``--vocab`` trimmed on the data's token counts, else the teacher's."""
    from edgedistill.distill.config import parse_vocab
    from edgedistill.distill.student import load_student_checkpoint
    from edgedistill.distill.vocab import choose_vocab, trim_tokenizer

    if source.kind == "hf":
        own = VocabMap.load(source.path)
        if own is not None:
            return own, load_student_checkpoint(source.path, weights=False)[1]
    size = parse_vocab(config.vocab)
    if size is None:
        return None, tokenizer
    student_tokenizer, vocab_map = trim_tokenizer(tokenizer, choose_vocab(tokenizer, counts, size))
    return vocab_map, student_tokenizer


def _check_same_vocabulary(model: Any, tokenizer: Any, source: Any) -> None:
    if model.config.vocab_size < len(tokenizer):
        raise EdgeDistillError(
            f"prune: {source.path} has {model.config.vocab_size} vocabulary rows but the teacher's tokenizer "
            f"{len(tokenizer)} tokens; a source must share the teacher's vocabulary"
        )
