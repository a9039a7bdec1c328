"""Structured pruning (``distill/prune.py``), ``edgedistill prune``, ``distill --init prune`` and bits per byte, on
tiny in-process Llamas: slices are checked weight by weight, importance against weights zeroed on purpose, and
the figures of ``evaluate`` against a hand computation."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_llama, make_tokenizer, one_group_shape, save_teacher, write_jsonl

from edgedistill.cli import main
from edgedistill.distill import prune
from edgedistill.distill.config import StudentShape
from edgedistill.distill.data import PackedData, load_eval_data, token_byte_lengths
from edgedistill.distill.evaluation import evaluate
from edgedistill.distill.shapes import candidate_shapes, parameter_count, select_candidates, shape_dict

VOCAB = len(make_tokenizer())
HEAD_DIM = 16
# The brief's GQA source: 4 query heads in 2 KV groups of 2, head size 16.
SOURCE = dict(hidden=64, layers=3, heads=4, kv_heads=2, ffn=128)
PRUNE_FAST = ["--seq-len", "16", "--calibration", "8", "--probe-rows", "4", "--threads", "1"]


def _source_model(seed: int = 0):
    """The GQA source with random (not all-ones) RMSNorm weights, so that slicing them is visible."""
    model = make_llama(VOCAB, seed=seed, **SOURCE)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
    return model.eval()


def _ids(rows: int = 6, length: int = 17, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, length), generator=generator)


def _shape_file(path, **shape):
    path.write_text(json.dumps(shape))
    return path


def _one_line_error(capsys, code, *fragments):
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgedistill: error:"), stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def gqa_teacher(tmp_path_factory):
    """A saved 3-layer GQA teacher (hidden 64, 4 heads in 2 KV groups, FFN 128)."""
    return save_teacher(tmp_path_factory.mktemp("gqa-teacher"), **SOURCE)


# ------------------------------------------------------------------------------------------------- 1. identity
@pytest.mark.parametrize("rescale_norms", [False, True])
def test_plan_keeping_everything_reproduces_the_teacher(rescale_norms):
    model = _source_model()
    ids = _ids()
    importance = prune.measure_importance(model, ids, batch_size=4)
    source = prune.teacher_shape(model.config)
    assert source == StudentShape(64, 3, 4, 2, 128, head_dim=HEAD_DIM)
    plan = prune.make_plan(importance, source, source, "influence", rescale_norms)
    assert plan.hidden == list(range(64)) and plan.layers == [0, 1, 2]
    assert plan.groups == [[0, 1]] * 3 and plan.ffn == [list(range(128))] * 3
    if rescale_norms:
        assert plan.norm_scale == pytest.approx([1.0] * 7, abs=1e-12)
    student = prune.slice_model(model, plan).eval()
    assert type(student).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in student.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        expected = model(ids).logits.float()
        got = student(ids).logits.float()
    torch.testing.assert_close(got, expected)


# ------------------------------------------------------------------------------------------------- 2. slicing
def test_slice_keeps_exactly_the_planned_rows_and_columns():
    model = _source_model(seed=3)
    hidden = [c for c in range(64) if c != 5]
    layers = [0, 2]
    groups = [[1], [0]]  # source layer 0 keeps KV group 1, source layer 2 keeps group 0
    ffn = [[n for n in range(128) if n != 7], [n for n in range(128) if n != 100]]
    plan = prune.PrunePlan(hidden, layers, groups, ffn)
    student = prune.slice_model(model, plan)

    config = student.config
    assert (config.hidden_size, config.num_hidden_layers) == (63, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)
    assert (config.intermediate_size, config.head_dim) == (127, HEAD_DIM)
    hid = torch.tensor(hidden)

    def block_rows(units):
        return torch.cat([torch.arange(u * HEAD_DIM, (u + 1) * HEAD_DIM) for u in units])

    torch.testing.assert_close(
        student.model.embed_tokens.weight, model.model.embed_tokens.weight[:, hid], rtol=0, atol=0
    )
    torch.testing.assert_close(student.model.norm.weight, model.model.norm.weight[hid], rtol=0, atol=0)
    for new, (old_index, kept_groups, kept_ffn) in enumerate(zip(layers, groups, ffn)):
        old, dst = model.model.layers[old_index], student.model.layers[new]
        heads = [2 * g + h for g in kept_groups for h in range(2)]
        q_rows, kv_rows, neurons = block_rows(heads), block_rows(kept_groups), torch.tensor(kept_ffn)
        exact = dict(rtol=0, atol=0)
        torch.testing.assert_close(dst.input_layernorm.weight, old.input_layernorm.weight[hid], **exact)
        torch.testing.assert_close(
            dst.post_attention_layernorm.weight, old.post_attention_layernorm.weight[hid], **exact
        )
        torch.testing.assert_close(dst.self_attn.q_proj.weight, old.self_attn.q_proj.weight[q_rows][:, hid], **exact)
        torch.testing.assert_close(dst.self_attn.k_proj.weight, old.self_attn.k_proj.weight[kv_rows][:, hid], **exact)
        torch.testing.assert_close(dst.self_attn.v_proj.weight, old.self_attn.v_proj.weight[kv_rows][:, hid], **exact)
        torch.testing.assert_close(dst.self_attn.o_proj.weight, old.self_attn.o_proj.weight[hid][:, q_rows], **exact)
        torch.testing.assert_close(dst.mlp.gate_proj.weight, old.mlp.gate_proj.weight[neurons][:, hid], **exact)
        torch.testing.assert_close(dst.mlp.up_proj.weight, old.mlp.up_proj.weight[neurons][:, hid], **exact)
        torch.testing.assert_close(dst.mlp.down_proj.weight, old.mlp.down_proj.weight[hid][:, neurons], **exact)

        # GQA groups stay whole: find, for every head-sized block of the pruned q/k rows, the source head it is.
        def source_units(weight, source_weight, count):
            found = []
            for block in weight.reshape(-1, HEAD_DIM, weight.shape[1]):
                matches = [
                    u
                    for u in range(count)
                    if torch.equal(block, source_weight[u * HEAD_DIM : (u + 1) * HEAD_DIM][:, hid])
                ]
                assert len(matches) == 1
                found += matches
            return found

        kv_found = source_units(dst.self_attn.k_proj.weight, old.self_attn.k_proj.weight, 2)
        q_found = source_units(dst.self_attn.q_proj.weight, old.self_attn.q_proj.weight, 4)
        assert kv_found == kept_groups
        assert sorted(q_found) == sorted(h for g in kv_found for h in (2 * g, 2 * g + 1))
    # Nothing else: every parameter of the student was checked above (tied head, no biases).
    assert sum(p.numel() for p in student.parameters()) == (
        VOCAB * 63 + 63 + 2 * (2 * 63 * 32 + 2 * 63 * 16 + 3 * 63 * 127 + 2 * 63)
    )


def test_sliced_model_runs_on_the_kept_structures_only():
    """Dropping a layer that does nothing (o_proj and down_proj zeroed) leaves the logits unchanged."""
    model = _source_model(seed=4)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    plan = prune.PrunePlan(list(range(64)), [0, 2], [[0, 1], [0, 1]], [list(range(128))] * 2)
    ids = _ids(rows=2)
    with torch.no_grad():
        torch.testing.assert_close(prune.slice_model(model, plan).eval()(ids).logits, model(ids).logits)


# ------------------------------------------------------------------------------------------------- 3. importance
def test_measure_importance_shapes_and_zeroed_structures_are_dropped_first():
    model = _source_model(seed=1)
    channel, group, neuron = 9, 0, 41
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):  # every RMSNorm's output channel 9 is zero
                parameter[channel] = 0.0
        layer0, layer1, layer2 = model.model.layers
        layer0.self_attn.v_proj.weight[group * HEAD_DIM : (group + 1) * HEAD_DIM] = 0.0  # KV group 0's heads output 0
        layer2.mlp.up_proj.weight[neuron] = 0.0  # down_proj's input 41 is zero in layer 2
        layer1.self_attn.o_proj.weight.zero_()  # layer 1 is the identity
        layer1.mlp.down_proj.weight.zero_()
    ids = _ids(rows=6)
    importance = prune.measure_importance(model, ids, batch_size=4)

    assert importance.hidden.shape == (64,) and importance.hidden.dtype == torch.float64
    assert importance.norm_inputs.shape == (7, 64)
    assert importance.heads.shape == (3, 2) and importance.ffn.shape == (3, 128)
    assert importance.influence.shape == (3,) and importance.drop_loss is None
    assert importance.tokens == 6 * 16
    assert (importance.hidden >= 0).all() and (importance.ffn >= 0).all() and (importance.heads >= 0).all()

    assert importance.hidden[channel] == 0 and importance.hidden.min() == importance.hidden[channel]
    assert sorted(importance.hidden.tolist())[1] > 0
    assert importance.heads[0, group] == 0 and importance.heads[0, 1 - group] > 0
    assert (importance.heads[[1, 2]] > 0).all()
    assert importance.ffn[2, neuron] == 0 and (importance.ffn[2] > 0).sum() == 127
    assert importance.influence[1] == pytest.approx(0.0, abs=1e-6)
    assert (importance.influence[[0, 2]] > 1e-3).all()

    source = prune.teacher_shape(model.config)
    shape = StudentShape(63, 2, 2, 1, 127, head_dim=HEAD_DIM)
    plan = prune.make_plan(importance, source, shape, "influence", rescale_norms=False)
    assert plan.hidden == [c for c in range(64) if c != channel]
    assert plan.layers == [0, 2]
    assert plan.groups[0] == [1 - group]
    assert plan.ffn[1] == [n for n in range(128) if n != neuron]
    assert plan.to_dict() == {
        "layers": [0, 2],
        "hidden_channels": 63,
        "kv_groups": plan.groups,
        "ffn_neurons": [127, 127],
    }


def test_importance_figures_match_an_independent_forward():
    """The hidden, FFN and per-group head energies, and the block influence, recomputed with plain hooks."""
    model = _source_model(seed=2)
    ids = _ids(rows=4)
    importance = prune.measure_importance(model, ids, batch_size=3)  # 2 batches: accumulation across batches
    captured: dict[str, list] = {"norm_out": [], "down_in": [], "o_in": [], "layer": []}
    handles = []
    for layer in model.model.layers:
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            handles.append(norm.register_forward_hook(lambda m, a, o: captured["norm_out"].append(o)))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured["down_in"].append(a[0])))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: captured["o_in"].append(a[0])))
    handles.append(model.model.norm.register_forward_hook(lambda m, a, o: captured["norm_out"].append(o)))
    with torch.no_grad():
        states = model.model(ids[:, :-1], output_hidden_states=True).hidden_states
    for handle in handles:
        handle.remove()
    tokens = 4 * 16
    hidden = sum(o.double().pow(2).sum((0, 1)) for o in captured["norm_out"]) / tokens
    torch.testing.assert_close(importance.hidden, hidden)
    ffn = torch.stack([x.double().pow(2).sum((0, 1)) for x in captured["down_in"]]) / tokens
    torch.testing.assert_close(importance.ffn, ffn)
    per_head = torch.stack([x.double().pow(2).reshape(-1, 4, HEAD_DIM).sum((0, 2)) for x in captured["o_in"]])
    torch.testing.assert_close(importance.heads, (per_head[:, [0, 2]] + per_head[:, [1, 3]]) / tokens)
    # hidden_states[i] is layer i's input; the last entry is after the final norm, so layer 2's output is rebuilt
    outputs = list(states[1:-1])
    with torch.no_grad():
        last_out = []
        handle = model.model.layers[2].register_forward_hook(
            lambda m, a, o: last_out.append(o[0] if isinstance(o, tuple) else o)
        )
        model.model(ids[:, :-1])
        handle.remove()
    outputs.append(last_out[0])
    influence = torch.stack(
        [(1 - torch.nn.functional.cosine_similarity(states[i], outputs[i], dim=-1)).double().mean() for i in range(3)]
    )
    torch.testing.assert_close(importance.influence, influence, rtol=1e-5, atol=1e-7)


def test_drop_metric_losses_and_base_loss():
    model = _source_model(seed=5)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    ids = _ids(rows=5)
    importance = prune.measure_importance(model, ids, batch_size=2, layer_metric="drop")

    def loss(m):
        with torch.no_grad():
            logits = m(ids[:, :-1], use_cache=False).logits.float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()

    assert importance.base_loss == pytest.approx(loss(model), rel=1e-5)
    assert importance.drop_loss.shape == (3,)
    for index in range(3):
        without = copy.deepcopy(model)
        without.model.layers = torch.nn.ModuleList(m for i, m in enumerate(without.model.layers) if i != index)
        without.config.num_hidden_layers = 2
        assert float(importance.drop_loss[index]) == pytest.approx(loss(without), rel=1e-5), index
    assert float(importance.drop_loss[2]) == pytest.approx(importance.base_loss, rel=1e-6)  # the identity layer
    scores = importance.layer_scores("drop")
    torch.testing.assert_close(scores, importance.drop_loss - importance.base_loss)
    summary = importance.summary()
    assert summary["tokens"] == 5 * 16 and len(summary["layer_drop_loss"]) == 3
    with pytest.raises(Exception, match="layer_metric"):
        prune.measure_importance(model, ids, layer_metric="bogus")
    # The model is left as it was: no hook remains and the logits are unchanged.
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert loss(model) == pytest.approx(importance.base_loss, rel=1e-5)


def test_make_plan_refuses_shapes_it_cannot_cut():
    model = _source_model()
    importance = prune.measure_importance(model, _ids(rows=2), batch_size=2)
    source = prune.teacher_shape(model.config)
    with pytest.raises(Exception, match="head_dim must stay 16"):
        prune.make_plan(importance, source, StudentShape(32, 2, 2, 1, 64, head_dim=8), "influence", False)
    with pytest.raises(Exception, match="whole KV group of 2"):
        prune.make_plan(importance, source, StudentShape(32, 2, 3, 1, 64, head_dim=16), "influence", False)
    with pytest.raises(Exception, match="intermediate_size 256 is larger"):
        prune.make_plan(importance, source, StudentShape(32, 2, 2, 1, 256, head_dim=16), "influence", False)


def test_rescaled_norms_use_the_measured_rms_ratio():
    model = _source_model(seed=6)
    importance = prune.measure_importance(model, _ids(rows=3), batch_size=3)
    source = prune.teacher_shape(model.config)
    shape = StudentShape(32, 3, 4, 2, 128, head_dim=HEAD_DIM)
    plan = prune.make_plan(importance, source, shape, "influence", rescale_norms=True)
    energy = importance.norm_inputs
    expected = [math.sqrt(energy[i, plan.hidden].mean().item() / energy[i].mean().item()) for i in range(7)]
    assert plan.norm_scale == pytest.approx(expected, rel=1e-9)
    student = prune.slice_model(model, plan)
    hid = torch.tensor(plan.hidden)
    torch.testing.assert_close(
        student.model.layers[1].post_attention_layernorm.weight,
        model.model.layers[1].post_attention_layernorm.weight[hid] * expected[3],
    )
    torch.testing.assert_close(student.model.norm.weight, model.model.norm.weight[hid] * expected[6])


# ------------------------------------------------------------------------------------------------- 4. shapes
def test_candidate_shapes_meet_the_target_with_quantizable_widths():
    source = StudentShape(256, 4, 8, 4, 512, head_dim=32)
    target = source.parameter_count(VOCAB) / 4
    shapes = candidate_shapes(source, VOCAB, target, tolerance=0.05)
    assert len(shapes) >= 5 and len(set(shapes)) == len(shapes)
    for shape in shapes:
        assert abs(shape.parameter_count(VOCAB) / target - 1) <= 0.05, shape
        assert shape.hidden_size % 32 == 0 and shape.intermediate_size % 32 == 0, shape
        assert shape.num_attention_heads == shape.num_key_value_heads * 2, shape
        assert shape.head_dim == 32
        assert shape.hidden_size <= 256 and shape.intermediate_size <= 512 and shape.num_hidden_layers <= 4
    assert any(s.hidden_size != s.num_attention_heads * s.head_dim for s in shapes)
    # an untied head counts its own vocabulary rows
    untied = candidate_shapes(source, VOCAB, target, tolerance=0.05, tied=False)
    for shape in untied:
        assert abs((shape.parameter_count(VOCAB) + VOCAB * shape.hidden_size) / target - 1) <= 0.05
    assert candidate_shapes(source, VOCAB, 10.0) == []  # far below the smallest embedding

    chosen = select_candidates(shapes, source, limit=4)
    assert len(chosen) == 4 and len(set(chosen)) == 4 and set(chosen) <= set(shapes)
    widths = {s.hidden_size for s in shapes}
    everything = select_candidates(shapes, source, limit=len(shapes) + 3)
    assert sorted(everything, key=str) == sorted(shapes, key=str)
    spread = select_candidates(shapes, source, limit=len(widths))
    assert {s.hidden_size for s in spread} == widths  # one per hidden width before any second of a width


def test_parameter_count_equals_the_sliced_models_parameters():
    model = make_llama(VOCAB, hidden=128, layers=3, heads=4, kv_heads=2, ffn=256)
    source = prune.teacher_shape(model.config)
    assert source.head_dim == 32
    assert source.parameter_count(VOCAB) == sum(p.numel() for p in model.parameters())
    importance = prune.measure_importance(model, _ids(rows=2), batch_size=2)
    shapes = candidate_shapes(source, VOCAB, source.parameter_count(VOCAB) / 2, tolerance=0.05)
    picked = select_candidates(shapes, source, limit=4)
    assert any(s.hidden_size != s.num_attention_heads * s.head_dim for s in picked)
    for shape in picked:
        student = prune.slice_model(model, prune.make_plan(importance, source, shape, "influence", False))
        assert shape.parameter_count(VOCAB) == sum(p.numel() for p in student.parameters()), shape
        assert prune.teacher_shape(student.config) == shape


def test_derive_scores_candidates_and_keeps_the_best_probe():
    model = _source_model(seed=7)
    target = parameter_count(StudentShape(32, 2, 2, 1, 64, head_dim=16), VOCAB)
    settings = prune.PruneSettings(candidates=3, probe_top=2, probe_steps=2, batch_size=4, tolerance=0.1)
    derivation = prune.derive(model, target, _ids(rows=4, seed=1), _ids(rows=4, seed=2), settings)
    record = derivation.record
    candidates = record["candidates"]
    assert 2 <= len(candidates) <= 3
    for candidate in candidates:
        assert abs(candidate["parameters"] / target - 1) <= 0.1
        assert candidate["zero_shot_loss"] > 0
    probed = [c for c in candidates if c["probe_loss"] is not None]
    assert len(probed) == 2
    best_zero_shot = sorted(c["zero_shot_loss"] for c in candidates)[:2]
    assert sorted(c["zero_shot_loss"] for c in probed) == best_zero_shot
    best = min(probed, key=lambda c: c["probe_loss"])
    assert record["chosen"]["shape"] == best["shape"] == shape_dict(derivation.shape)
    assert sum(p.numel() for p in derivation.student.parameters()) == record["chosen"]["parameters"]
    assert record["source"]["parameters"] == sum(p.numel() for p in model.parameters())
    # the chosen student is the zero-shot slice (probes train copies), so its loss is the recorded zero-shot loss
    probe = _ids(rows=4, seed=2)
    with torch.no_grad():
        logits = derivation.student.eval()(probe[:, :-1]).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), probe[:, 1:].reshape(-1)).item()
    assert ce == pytest.approx(record["chosen"]["zero_shot_loss"], abs=1e-4)


def test_calibration_rows_are_disjoint_and_evenly_spaced():
    ids = torch.arange(40)[:, None].repeat(1, 5)
    calibration, probe = prune.calibration_rows(ids, 8, 4)
    cal_rows, probe_rows = calibration[:, 0].tolist(), probe[:, 0].tolist()
    assert len(cal_rows) == 8 and len(probe_rows) == 4
    assert not set(cal_rows) & set(probe_rows)
    assert cal_rows[0] == 0 and max(cal_rows + probe_rows) == 39
    calibration, probe = prune.calibration_rows(ids[:3], 64, 16)  # fewer rows than asked: each at least one
    assert calibration.shape[0] == 2 and probe.shape[0] == 1
    with pytest.raises(Exception, match="fewer than 2 sequences"):
        prune.calibration_rows(ids[:1], 4, 4)


def test_target_parameters_of_presets_and_shape_files():
    assert prune.target_parameters("tiny", 8000) == pytest.approx(1000)
    assert prune.target_parameters("small", 8000) == pytest.approx(2000)
    assert prune.target_parameters("student.json", 8000) is None


# ------------------------------------------------------------------------------------------------- 5. checkpoint
@pytest.fixture(scope="module")
def pruned(gqa_teacher, tmp_path_factory):
    """``edgedistill prune`` of the GQA teacher to hidden 32 with 4 heads of 16 (q width 64 != hidden 32)."""
    from conftest import TRAINING_TEXT

    base = tmp_path_factory.mktemp("pruned")
    sentences = [f"{line} Example number {i}." for i in range(30) for line in TRAINING_TEXT]
    data = write_jsonl(base / "text.jsonl", [{"text": s} for s in sentences])
    shape = _shape_file(
        base / "shape.json",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        head_dim=16,
    )
    out = base / "student"
    code = main(
        ["prune", str(gqa_teacher), "--student", str(shape), "--out", str(out), "--data", str(data), *PRUNE_FAST]
    )
    return code, out, data


def test_pruned_checkpoint_loads_without_remote_code(pruned, gqa_teacher, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, _ = pruned
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and config.tie_word_embeddings
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (32, 2, 64)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 16)
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (64, 32)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"

    record = json.loads((out / "prune.json").read_text())
    wanted = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    assert record["chosen"]["shape"] == dict(wanted, intermediate_size=64, head_dim=16)
    assert [c["shape"] for c in record["candidates"]] == [record["chosen"]["shape"]]
    assert record["chosen"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert record["source"]["shape"]["hidden_size"] == 64 and record["calibration_rows"] == 8
    assert record["probe_rows"] == 4 and record["seq_len"] == 16
    plan = record["chosen"]["plan"]
    assert len(plan["layers"]) == 2 and plan["kv_groups"] == [[0, 1], [0, 1]] and plan["ffn_neurons"] == [64, 64]

    # Every kept weight is the teacher's: embedding columns are 32 distinct teacher columns, and so on.
    teacher = AutoModelForCausalLM.from_pretrained(gqa_teacher)
    columns = []
    for column in model.model.embed_tokens.weight.T:
        matches = [c for c, t in enumerate(teacher.model.embed_tokens.weight.T) if torch.equal(column, t)]
        assert len(matches) == 1
        columns += matches
    assert columns == sorted(set(columns)) and len(columns) == 32
    hid = torch.tensor(columns)
    for new, old in enumerate(plan["layers"]):
        src, dst = teacher.model.layers[old], model.model.layers[new]
        assert torch.equal(dst.self_attn.q_proj.weight, src.self_attn.q_proj.weight[:, hid])
        assert torch.equal(dst.self_attn.o_proj.weight, src.self_attn.o_proj.weight[hid])
        assert torch.equal(dst.input_layernorm.weight, src.input_layernorm.weight[hid])


def test_a_pruned_checkpoint_counts_its_own_parameters(pruned):
    """A pruned checkpoint (4 heads of 16 on width 32) as the next source or teacher: its parameter count (the
    base of preset targets) comes from its config, head_dim included."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgedistill.distill.student import teacher_parameter_count

    _, out, _ = pruned
    model = AutoModelForCausalLM.from_pretrained(out)
    assert teacher_parameter_count(AutoConfig.from_pretrained(out)) == sum(p.numel() for p in model.parameters())
    assert prune.teacher_shape(model.config) == StudentShape(32, 2, 4, 2, 64, head_dim=16)


def test_pruned_checkpoint_exports_to_gguf_with_parity(pruned, tmp_path):
    pytest.importorskip("llama_cpp")
    from export_helpers import read_manifest, run_export

    code, out, _ = pruned
    assert code == 0
    target = tmp_path / "gguf"
    assert run_export("gguf", str(out), "--quant", "q8_0,q4_k_m", "--out", str(target), "--threads", "1") == 0
    records = {a["quantization"]: a for a in read_manifest(target)["artifacts"]}
    assert set(records) == {"q8_0", "q4_k_m"}
    for record in records.values():
        assert record["passed"], record["parity"]["failures"]
        assert record["parameters"] == json.loads((out / "prune.json").read_text())["chosen"]["parameters"]
        assert record["parity"]["tokenizer_matches"] == record["parity"]["tokenizer_total"]
        assert (target / record["path"]).stat().st_size == record["bytes"]


def test_pruned_checkpoint_exports_to_onnx_int8_with_parity(pruned, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.onnxruntime")
    from export_helpers import read_manifest, run_export

    code, out, _ = pruned
    assert code == 0
    target = tmp_path / "onnx"
    assert run_export("onnx", str(out), "--quant", "int8", "--out", str(target), "--threads", "1") == 0
    (record,) = read_manifest(target)["artifacts"]
    assert record["quantization"] == "int8" and record["format"] == "onnx"
    assert record["passed"], record["parity"]["failures"]
    assert record["parity"]["positions"] > 0 and record["parity"]["top1_agreement"] >= 0.5


def test_pruned_standard_shape_exports_to_gguf(gqa_teacher, pruned, tmp_path):
    """The brief's shape file (hidden 32 = 2 heads x 16, one KV head) through run_prune, then q8_0."""
    pytest.importorskip("llama_cpp")
    from export_helpers import read_manifest, run_export

    from edgedistill.distill.config import PruneConfig

    _, _, data = pruned
    shape = one_group_shape(tmp_path / "shape.json")
    config = PruneConfig(
        source=str(gqa_teacher),
        student=str(shape),
        out=str(tmp_path / "s"),
        data=[str(data)],
        seq_len=16,
        calibration=8,
        probe_rows=4,
        threads=1,
    )
    record = prune.run_prune(config, log=lambda line: None)
    assert record["chosen"]["shape"]["num_key_value_heads"] == 1
    assert record["chosen"]["plan"]["kv_groups"] in ([[0]] * 2, [[1]] * 2, [[0], [1]], [[1], [0]])
    target = tmp_path / "gguf"
    assert run_export("gguf", str(tmp_path / "s"), "--quant", "q8_0", "--out", str(target), "--threads", "1") == 0
    (artifact,) = read_manifest(target)["artifacts"]
    assert artifact["passed"], artifact["parity"]["failures"]


# ------------------------------------------------------------------------------------------------- 6. CLI
def test_prune_cli_with_a_preset(gqa_teacher, tiny_teacher, pruned, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, _, data = pruned
    out = tmp_path / "tiny"
    args = ["prune", str(gqa_teacher), "--student", "tiny", "--out", str(out), "--data", str(data), "--reconstruct"]
    code = main([*args, *PRUNE_FAST])
    stdout = capsys.readouterr().out
    assert code == 0
    last = json.loads(stdout.strip().splitlines()[-1])
    teacher_params = StudentShape(64, 3, 4, 2, 128).parameter_count(VOCAB)
    record = json.loads((out / "prune.json").read_text())
    assert record["target_parameters"] == int(teacher_params / 8) and record["student"] == "tiny"
    assert last["chosen"]["shape"] == record["chosen"]["shape"]
    assert record["settings"]["reconstruct"] and record["chosen"]["reconstruct_seconds"] >= 0
    assert math.isfinite(record["chosen"]["reconstructed_loss"])
    assert "refitted by least squares" in stdout
    model = AutoModelForCausalLM.from_pretrained(out)
    assert abs(sum(p.numel() for p in model.parameters()) / (teacher_params / 8) - 1) <= 0.05
    assert model.config.hidden_size % 32 == 0 and model.config.head_dim == 16

    # The 2-layer conftest teacher has 94,528 parameters: 1/8 is below any width-32 shape (16,480 at least).
    code = main(
        [
            "prune",
            str(tiny_teacher),
            "--student",
            "tiny",
            "--out",
            str(tmp_path / "no"),
            "--data",
            str(data),
            *PRUNE_FAST,
        ]
    )
    _one_line_error(capsys, code, "prune: no shape within 5%")
    assert not (tmp_path / "no" / "prune.json").exists()


def test_prune_cli_bad_inputs_exit_2_with_one_line(tiny_teacher, tmp_path, capsys):
    common = ["--student", "tiny", "--out", str(tmp_path / "out")]
    _one_line_error(
        capsys, main(["prune", str(tiny_teacher), *common, "--layer-metric", "bogus"]), "layer_metric", "bogus"
    )
    _one_line_error(capsys, main(["prune", str(tiny_teacher), *common, "--calibration", "0"]), "calibration")
    _one_line_error(capsys, main(["prune", str(tiny_teacher), *common, "--probe-lr", "0"]), "probe_lr")
    missing = tmp_path / "nope"
    _one_line_error(
        capsys, main(["prune", str(missing), *common]), "source:", str(missing), "no such file or directory"
    )
    _one_line_error(capsys, main(["prune", str(tiny_teacher), "--student", "tiny"]), "out")
    _one_line_error(
        capsys, main(["prune", str(tiny_teacher), "--source", str(missing), *common]), "source: given twice"
    )


# ------------------------------------------------------------------------------------------------- 7. --init prune
def test_distill_init_prune(gqa_teacher, pruned, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    _, _, data = pruned
    shape = one_group_shape(tmp_path / "shape.json")
    outside = write_jsonl(
        tmp_path / "outside.jsonl", [{"text": "Completely different prose about rivers and tea. " * 6}]
    )
    out = tmp_path / "run"
    args = ["distill", "--teacher", str(gqa_teacher), "--student", str(shape), "--init", "prune", "--data", str(data)]
    fast = ["--steps", "2", "--batch-size", "4", "--seq-len", "16", "--threads", "1"]
    code = main([*args, "--out", str(out), *fast, "--eval-data", str(outside)])
    assert code == 0, capsys.readouterr().err
    record = json.loads((out / "prune.json").read_text())
    wanted = json.loads(shape.read_text())
    assert record["chosen"]["shape"] == wanted
    summary = json.loads((out / "train_summary.json").read_text())
    student = summary["student"]
    assert student["init"] == "prune" and student["derived"] is not None
    assert student["derived"]["chosen"]["shape"] == wanted
    assert {k: student["shape"][k] for k in wanted} == wanted
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.head_dim) == (32, 2, 16)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.intermediate_size) == (
        2,
        1,
        64,
    )
    assert student["parameters"] == sum(p.numel() for p in model.parameters()) == record["chosen"]["parameters"]

    heldout = summary["heldout"]
    assert heldout["bytes"] > heldout["tokens"] > 0 and 0 <= heldout["top1_accuracy"] <= 1
    assert heldout["bits_per_byte"] == pytest.approx(heldout["ce"] * heldout["tokens"] / math.log(2) / heldout["bytes"])
    out_eval = summary["outside"]
    assert out_eval["files"] == [str(outside)] and out_eval["tokens"] > 0
    assert out_eval["bits_per_byte"] == pytest.approx(
        out_eval["ce"] * out_eval["tokens"] / math.log(2) / out_eval["bytes"]
    )
    assert "kd_to_teacher" not in out_eval

    capsys.readouterr()
    # --init prune cuts the teacher: an existing checkpoint as --student is refused.
    code = main([*args[:4], str(tmp_path / "run"), *args[5:], "--out", str(tmp_path / "again"), *fast])
    _one_line_error(capsys, code, "--init prune", "checkpoint")


def test_distill_without_eval_data_has_no_outside_entry_and_a_missing_eval_file_fails_early(
    tiny_teacher, text_data, tiny_shape, tmp_path, capsys
):
    out = tmp_path / "plain"
    fast = ["--steps", "1", "--batch-size", "4", "--seq-len", "16", "--threads", "1"]
    base = ["distill", "--teacher", str(tiny_teacher), "--student", str(tiny_shape), "--data", str(text_data)]
    assert main([*base, "--out", str(out), *fast]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["outside"] is None and summary["student"]["init"] == "random"
    assert summary["student"]["derived"] is None and summary["student"]["shape"]["head_dim"] == 16
    missing = tmp_path / "missing.jsonl"
    steps = []
    from edgedistill.distill.config import TrainConfig
    from edgedistill.distill.train import train

    config = TrainConfig(
        out=str(tmp_path / "late"),
        teacher=str(tiny_teacher),
        student=str(tiny_shape),
        data=[str(text_data)],
        steps=2,
        batch_size=4,
        seq_len=16,
        eval_data=[str(missing)],
    )
    with pytest.raises(Exception, match="no such evaluation file"):
        train(config, on_step=lambda step, metrics: steps.append(step), progress=False)
    assert steps == []  # refused before any training step, not after the run


# ------------------------------------------------------------------------------------------------- 8. bits per byte
def _independent_byte_lengths(tokenizer) -> np.ndarray:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    lengths = np.zeros(len(tokenizer), dtype=np.int64)
    for token, index in tokenizer.get_vocab().items():
        if index not in tokenizer.all_special_ids:
            lengths[index] = len(bytes(byte_of[c] for c in token))
    return lengths


def test_token_byte_lengths():
    tokenizer = make_tokenizer()
    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (len(tokenizer),) and lengths.dtype == np.int64
    special = tokenizer.all_special_ids
    assert sorted(special) == [0, 1, 2] and (lengths[special] == 0).all()
    ascii_checked = 0
    for index in range(len(tokenizer)):
        if index in special:
            continue
        token = tokenizer.convert_ids_to_tokens(index)
        text = tokenizer.convert_tokens_to_string([token])
        if text.isascii():
            assert lengths[index] == len(text.encode()), (index, token, text)
            ascii_checked += 1
        assert lengths[index] >= 1
    assert ascii_checked > 150
    np.testing.assert_array_equal(lengths, _independent_byte_lengths(tokenizer))
    # A multi-byte character split over byte tokens: the bytes still add up to its UTF-8 length.
    ids = tokenizer("é€ ok", add_special_tokens=False)["input_ids"]
    assert lengths[ids].sum() == len("é€ ok".encode())


def test_evaluate_bits_per_byte_and_accuracy_by_hand():
    tokenizer = make_tokenizer()
    model = make_llama(len(tokenizer) + 4, seed=11, hidden=32, layers=1, heads=2, kv_heads=1, ffn=64)  # padded rows
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, len(tokenizer), (5, 13), generator=generator)
    ids[0, 4] = tokenizer.eos_token_id  # a special label: 0 bytes, still scored
    weights = torch.ones(5, 13)
    weights[1, 3:9] = 0.0  # unsupervised labels are not counted
    weights[:, 0] = 0.0
    data = PackedData(ids.numpy().astype(np.int32), weights.numpy().astype(np.float32))
    lengths = _independent_byte_lengths(tokenizer)
    result = evaluate(
        model, None, data, batch_size=2, device=torch.device("cpu"), byte_lengths=token_byte_lengths(tokenizer)
    )

    with torch.no_grad():
        logits = model(ids[:, :-1]).logits.double()
    labels, mask = ids[:, 1:], weights[:, 1:] > 0
    ce = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum").item()
    count = int(mask.sum())
    nbytes = int(lengths[labels[mask].numpy()].sum())
    assert result["tokens"] == count == 5 * 12 - 6
    assert result["bytes"] == nbytes
    assert result["ce"] == pytest.approx(ce / count, rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(ce / math.log(2) / nbytes, rel=1e-5)
    accuracy = (logits[mask].argmax(-1) == labels[mask]).double().mean().item()
    assert result["top1_accuracy"] == pytest.approx(accuracy, abs=1e-12)
    # without byte lengths: no bits per byte, the same CE and accuracy (another batch size)
    without_bytes = evaluate(model, None, data, batch_size=3, device=torch.device("cpu"))
    assert "bits_per_byte" not in without_bytes and without_bytes["ce"] == pytest.approx(result["ce"], rel=1e-6)
    assert without_bytes["top1_accuracy"] == result["top1_accuracy"]


def test_load_eval_data_packs_every_record(tmp_path):
    tokenizer = make_tokenizer()
    text = "The quick brown fox jumps over the lazy dog. " * 8
    path = write_jsonl(tmp_path / "outside.jsonl", [{"text": text}, {"text": text.upper()}])
    packed = load_eval_data([path], tokenizer, seq_len=16)
    stream = []  # every record's tokens, each followed by EOS, concatenated
    for record in (text, text.upper()):
        stream += tokenizer(record, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = (len(stream) - 1) // 16
    assert packed.ids.shape == (rows, 17) and rows > 2
    for row in range(rows):
        assert packed.ids[row].tolist() == stream[row * 16 : row * 16 + 17]
    assert (packed.weights == 1).all()
    small = load_eval_data([path], tokenizer, seq_len=16, max_tokens=32)
    assert small.num_sequences == 2
    with pytest.raises(Exception, match="no such evaluation file"):
        load_eval_data([tmp_path / "nope.jsonl"], tokenizer, 16)
    short = write_jsonl(tmp_path / "short.jsonl", [{"text": "hi"}])
    with pytest.raises(Exception, match="too few for one sequence"):
        load_eval_data([short], tokenizer, 16)
