"""Feature (hidden-state) and MiniLMv2 attention-relation distillation (``distill/feature_losses.py``): the losses
against float64 loops, the layer matching, masking, head-count invariance, weight 0 = today's training, resume,
the saved student (a plain Llama that exports with parity) and the bad settings through the CLI."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TRAINING_TEXT, make_llama, make_tokenizer, one_group_shape, save_teacher, write_jsonl

from edgedistill.distill import feature_losses as fl
from edgedistill.distill.config import FEATURE_LOSSES, TrainConfig, parse_layer_pairs
from edgedistill.distill.evaluation import online_teacher
from edgedistill.distill.heads import DistillationObjective
from edgedistill.distill.train import train
from edgedistill.errors import EdgeDistillError

VOCAB = len(make_tokenizer())
STUDENT = dict(hidden=32, layers=2, heads=2, kv_heads=1, ffn=64)  # q width 32, k/v width 16
TEACHER = dict(hidden=64, layers=3, heads=4, kv_heads=2, ffn=128)  # q width 64, k/v width 32


# ------------------------------------------------------------------------------------------------ independent math
def _feature_reference(student, teacher, projection, kind):
    """Mean over rows of ||P s - t||^2 / Dt or 1 - cos(P s, t), row by row in float64."""
    s, t, p = (np.asarray(x.detach(), dtype=np.float64) for x in (student, teacher, projection))
    values = []
    for row in range(s.shape[0]):
        projected = p @ s[row]
        if kind == "mse":
            values.append(sum((a - b) ** 2 for a, b in zip(projected, t[row])) / t.shape[1])
        else:
            cosine = projected @ t[row] / (np.linalg.norm(projected) * np.linalg.norm(t[row]))
            values.append(1 - cosine)
    return sum(values) / max(1, len(values))


def _relation_reference(student, teacher, heads, queries, key_mask=None):
    """KL(teacher || student) of softmax(x_i . x_j / sqrt(d_r)) over visible keys j <= i, averaged over relation
    heads and the listed (batch, query) pairs, with explicit loops in float64."""
    s, t = np.asarray(student.detach(), np.float64), np.asarray(teacher.detach(), np.float64)
    total = 0.0
    for b, i in queries:
        for r in range(heads):
            rows = []
            for x in (s, t):
                width = x.shape[-1] // heads
                part = x[b, :, r * width : (r + 1) * width]
                keys = [j for j in range(i + 1) if j == i or key_mask is None or key_mask[b, j]]
                scores = np.array([part[i] @ part[j] / math.sqrt(width) for j in keys])
                probs = np.exp(scores - scores.max())
                rows.append(probs / probs.sum())
            q, p = rows
            total += float(np.sum(p * (np.log(p) - np.log(q)))) / heads
    return total / len(queries)


def test_feature_loss_names_agree_with_the_config():
    assert fl.FEATURE_LOSSES == FEATURE_LOSSES


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_against_float64_loops(kind):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(7, 5, generator=generator), torch.randn(7, 9, generator=generator)
    projection = torch.randn(9, 5, generator=generator)
    value = fl.feature_loss(student, teacher, projection, kind)
    assert value.item() == pytest.approx(_feature_reference(student, teacher, projection, kind), rel=1e-5)
    assert fl.feature_loss(student[:0], teacher[:0], projection, kind).item() == 0.0  # no supervised positions


def test_relation_loss_against_float64_loops_with_padding_and_positions():
    generator = torch.Generator().manual_seed(1)
    batch, length = 2, 6
    student_qkv = tuple(torch.randn(batch, length, w, generator=generator) for w in (8, 4, 4))
    teacher_qkv = tuple(torch.randn(batch, length, w, generator=generator) for w in (12, 6, 6))
    key_mask = torch.ones(batch, length, dtype=torch.bool)
    key_mask[1, 4:] = False  # padding at the end of row 1
    positions = torch.tensor([1, 2, 5, 6, 7, 9])  # (0,1) (0,2) (0,5) (1,0) (1,1) (1,3)
    queries = [(int(p) // length, int(p) % length) for p in positions]
    value = fl.attention_relation_loss(student_qkv, teacher_qkv, 2, positions, key_mask)
    expected = np.mean(
        [_relation_reference(s, t, 2, queries, key_mask.numpy()) for s, t in zip(student_qkv, teacher_qkv)]
    )
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # every valid query when no positions are given; padding keys and queries play no part
    valid = [(b, i) for b in range(batch) for i in range(length) if key_mask[b, i]]
    value = fl.attention_relation_loss(student_qkv, teacher_qkv, 2, None, key_mask)
    expected = np.mean(
        [_relation_reference(s, t, 2, valid, key_mask.numpy()) for s, t in zip(student_qkv, teacher_qkv)]
    )
    assert value.item() == pytest.approx(expected, rel=1e-5)
    changed = tuple(x.clone() for x in student_qkv)
    for x in changed:
        x[1, 4:] = 100.0  # the padding's own states
    assert fl.attention_relation_loss(changed, teacher_qkv, 2, None, key_mask).item() == pytest.approx(
        value.item(), rel=1e-6
    )
    same = fl.attention_relation_loss(teacher_qkv, teacher_qkv, 3, positions)
    assert abs(same.item()) < 1e-6
    # the gradient is finite although masked entries are -inf
    student = student_qkv[0].clone().requires_grad_(True)
    fl.attention_relation_loss((student, *student_qkv[1:]), teacher_qkv, 2, positions, key_mask).backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ layer matching
def test_layer_lists_matching_and_relation_heads():
    assert parse_layer_pairs("3:8, 7:16", "f", ("auto",)) == [(3, 8), (7, 16)]
    assert parse_layer_pairs("1,4", "f", ("auto",)) == [(1, None), (4, None)]
    assert parse_layer_pairs("AUTO", "f", ("auto",)) == "auto"
    for bad in ("", "a", "1:2:3", "-1", "1,1", "1:", "²"):
        with pytest.raises(EdgeDistillError, match="^f: "):
            parse_layer_pairs(bad, "f", ("auto",))
    # round((i + 1) * Lt / Ls) - 1: the last layers meet, the rest spread evenly (30 -> 4: 7, 14, 22, 29)
    assert [fl.uniform_teacher_layer(i, 4, 30) for i in range(4)] == [7, 14, 22, 29]
    assert [fl.uniform_teacher_layer(i, 3, 3) for i in range(3)] == [0, 1, 2]
    assert [fl.uniform_teacher_layer(i, 4, 1) for i in range(4)] == [0, 0, 0, 0]
    assert fl.match_layers("auto", "f", 2, 30) == [(0, 14), (1, 29)]
    assert fl.match_layers("auto", "f", 2, 30, kept=[3, 11]) == [(0, 3), (1, 11)]
    assert fl.match_layers("1,0:5", "f", 2, 30, kept=[3, 11]) == [(1, 11), (0, 5)]
    assert fl.match_layers("last", "a", 2, 30, kept=[3, 11]) == [(1, 29)]
    with pytest.raises(EdgeDistillError, match="^f: student layer 2 is out of range"):
        fl.match_layers("2", "f", 2, 30)
    with pytest.raises(EdgeDistillError, match="^a: teacher layer 30 is out of range"):
        fl.match_layers("0:30", "a", 2, 30)
    widths = {"student q": 192, "student k/v": 64, "teacher q": 576, "teacher k/v": 192}  # SmolLM2 and a 1/3 cut
    assert fl.choose_relation_heads(0, widths, 9) == 8 and fl.choose_relation_heads(16, widths, 9) == 16
    with pytest.raises(EdgeDistillError, match="^relation_heads: 3 does not divide"):
        fl.choose_relation_heads(3, widths, 9)
    assert fl.relation_bytes(8, 8, 256, 1) == 4 * 8 * 8 * 256**2 * 9


def test_projection_init_and_pruned_lineage(tmp_path):
    weight = torch.empty(6, 3)
    assert fl.init_projection(weight, [0, 2, 5], torch.Generator().manual_seed(0)) == "pruned channels"
    assert torch.equal(weight @ torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 0, 2, 0, 0, 3]))
    assert fl.init_projection(weight, None, torch.Generator().manual_seed(0)) == "orthogonal"
    assert torch.allclose(weight.T @ weight, torch.eye(3), atol=1e-5)
    square = torch.empty(4, 4)
    assert fl.init_projection(square, None, torch.Generator()) == "identity" and torch.equal(square, torch.eye(4))

    student_dir = tmp_path / "pruned"
    student_dir.mkdir()
    plan = {"layers": [0, 2], "hidden_ids": list(range(0, 64, 2))}
    record = {"source": {"sha256": "abc"}, "chosen": {"plan": plan}}
    (student_dir / "prune.json").write_text(json.dumps(record))
    student_config = make_llama(VOCAB, **STUDENT).config
    teacher_config = make_llama(VOCAB, **TEACHER).config
    config = TrainConfig(student=str(student_dir))
    lineage = fl.pruned_lineage(config, tmp_path, "abc", student_config, teacher_config)
    assert lineage.layers == [0, 2] and lineage.hidden == plan["hidden_ids"]
    # a chained student's record names another source: uniform matching
    assert fl.pruned_lineage(config, tmp_path, "other", student_config, teacher_config) is None
    assert fl.pruned_lineage(TrainConfig(), tmp_path, "abc", student_config, teacher_config) is None


# ------------------------------------------------------------------------------------------------ the objective
def _states(student, teacher, **settings):
    config = TrainConfig(**settings)
    objective = DistillationObjective(student, config)
    states = fl.build_state_distillation(objective, teacher, config, None, None)
    return states, states.teacher_provider(online_teacher(teacher)), objective


def _batch(seed=0, rows=3, length=10):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(3, VOCAB, (rows, length), generator=generator)
    weights = torch.ones(rows, length)
    weights[:, :3] = 0  # a prompt
    weights[:, -2:] = 0  # padding at the end
    positions = torch.nonzero(weights.reshape(-1) > 0).squeeze(1)
    labels = torch.randint(3, VOCAB, (len(positions),), generator=generator)
    return inputs, positions, labels, weights.reshape(-1)[positions]


def _run_terms(states, provider, batch):
    inputs, positions, labels, weights = batch
    return states(inputs, positions, labels, weights, provider("train", None, inputs, positions))


def test_terms_match_an_independent_forward_and_ignore_unsupervised_positions():
    student, teacher = make_llama(VOCAB, seed=1, **STUDENT), make_llama(VOCAB, seed=2, **TEACHER)
    states, provider, _ = _states(
        student, teacher, feature_weight=1.0, feature_layers="0:1", attention_weight=1.0, attention_layers="1:1"
    )
    assert [tuple(p.weight.shape) for p in states.projections] == [(64, 32)]
    assert states.relation_heads == 4  # gcd(32, 16, 64, 32) = 16, at most the teacher's 4 heads
    batch = _batch()
    inputs, positions, *_ = batch
    total, ce, kd, feature, attention = _run_terms(states, provider, batch)
    with torch.no_grad():
        s_out = student(inputs, output_hidden_states=True).hidden_states
        t_out = teacher(inputs, output_hidden_states=True).hidden_states
    # feature: the output of student layer 0 (hidden_states[1]) against teacher layer 1's (hidden_states[2])
    flat = [h.reshape(-1, h.shape[-1])[positions] for h in (s_out[1], t_out[2])]
    expected = _feature_reference(*flat, states.projections[0].weight, "mse")
    assert feature.item() == pytest.approx(expected, rel=1e-4)

    # attention: q/k/v of layer 1 from its input after input_layernorm, before RoPE
    def qkv(model, hidden):
        layer = model.model.layers[1]
        normed = layer.input_layernorm(hidden)
        return tuple(getattr(layer.self_attn, f"{x}_proj")(normed) for x in "qkv")

    with torch.no_grad():
        pairs = zip(qkv(student, s_out[1]), qkv(teacher, t_out[1]))
    queries = [(int(p) // inputs.shape[1], int(p) % inputs.shape[1]) for p in positions]
    expected = np.mean([_relation_reference(s, t, 4, queries) for s, t in pairs])
    assert attention.item() == pytest.approx(expected, rel=1e-4)
    assert total.item() == pytest.approx((0.5 * ce + 0.5 * kd + feature + attention).item(), rel=1e-6)

    # padding: other tokens at the unsupervised end of every row change neither term
    padded = (inputs.clone(), *batch[1:])
    padded[0][:, -2:] = torch.randint(3, VOCAB, (inputs.shape[0], 2), generator=torch.Generator().manual_seed(9))
    _, _, _, feature_2, attention_2 = _run_terms(states, provider, padded)
    assert feature_2.item() == pytest.approx(feature.item(), rel=1e-6)
    assert attention_2.item() == pytest.approx(attention.item(), rel=1e-6)
    # the unsupervised positions are excluded: counting them would give other values
    every = torch.arange(inputs.numel())
    everything = (inputs, every, torch.zeros_like(every), torch.ones(inputs.numel()))
    _, _, _, feature_3, attention_3 = _run_terms(states, provider, everything)
    assert abs(feature_3.item() - feature.item()) > 1e-4 * feature.item()
    assert abs(attention_3.item() - attention.item()) > 1e-4 * attention.item()


def test_relation_loss_ignores_head_counts_and_vanishes_for_the_teacher_itself():
    from transformers import LlamaConfig, LlamaForCausalLM

    teacher = make_llama(VOCAB, seed=3, **TEACHER)  # 4 heads of 16, 2 KV heads
    layout = dict(teacher.config.to_dict(), num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    regrouped = LlamaForCausalLM(LlamaConfig(**layout)).eval()  # 2 heads of 32, 1 KV head: same projections
    regrouped.load_state_dict(teacher.state_dict())
    student = make_llama(VOCAB, seed=4, **STUDENT)
    batch = _batch(seed=5)
    settings = dict(attention_weight=1.0, attention_layers="0:0", relation_heads=2, alpha=1.0)
    values = [_run_terms(*_states(student, t, **settings)[:2], batch)[-1].item() for t in (teacher, regrouped)]
    assert values[0] > 1e-4 and values[0] == pytest.approx(values[1], rel=1e-6)

    itself = copy.deepcopy(teacher)
    settings = dict(settings, feature_weight=1.0, feature_layers="auto", attention_layers="2", relation_heads=0)
    states, provider, _ = _states(itself, teacher, **settings)
    assert states.projection_init == ["identity"] * 3
    _, _, _, feature, attention = _run_terms(states, provider, batch)
    assert feature.item() == 0.0 and abs(attention.item()) < 1e-6


def test_hooks_leave_the_objective_unchanged():
    """With the terms' hooks on both models, the plain objective gives the same loss and gradients as before
    them (the hooks only read), and the wrapper's total is that loss plus the weighted terms."""
    student, teacher = make_llama(VOCAB, seed=1, **STUDENT), make_llama(VOCAB, seed=2, **TEACHER)
    batch = _batch(seed=6)
    inputs, positions, labels, weights = batch

    def plain_step(objective, provider):
        student.zero_grad()
        signal = dict(provider("train", None, inputs, positions))
        signal.pop(fl.STATES_KEY, None)
        total, ce, kd = objective(inputs, positions, labels, weights, signal)
        total.backward()
        return (total, ce, kd), {n: p.grad.clone() for n, p in student.named_parameters()}

    before, grads = plain_step(DistillationObjective(student, TrainConfig()), online_teacher(teacher))
    states, provider, objective = _states(
        student, teacher, feature_weight=0.5, attention_weight=2.0, attention_layers="0,1"
    )
    after, grads_after = plain_step(objective, provider)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.equal(grads[name], grads_after[name]) for name in grads)
    total, ce, kd, feature, attention = _run_terms(states, provider, batch)
    assert torch.equal(ce, before[1]) and torch.equal(kd, before[2])
    assert total.item() == pytest.approx((before[0] + 0.5 * feature + 2.0 * attention).item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------ training runs
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("features")
    teacher = save_teacher(base / "teacher", **TEACHER)
    sentences = [f"{line} Example number {i}." for i in range(30) for line in TRAINING_TEXT]
    data = write_jsonl(base / "text.jsonl", [{"text": s} for s in sentences])
    return base, teacher, data, one_group_shape(base / "shape.json")  # prunable from TEACHER


def _config(setup, name, **settings):
    base, teacher, data, shape = setup
    values = dict(
        out=str(base / name),
        teacher=str(teacher),
        student=str(shape),
        data=[str(data)],
        steps=6,
        batch_size=4,
        seq_len=16,
        save_every=3,
        lr=3e-3,
        threads=1,
    )
    return TrainConfig(**{**values, **settings})


def _rows(setup, name):
    return [json.loads(line) for line in (setup[0] / name / "metrics.jsonl").read_text().splitlines()]


def test_weight_zero_is_todays_training(setup):
    from safetensors.torch import load_file

    train(_config(setup, "today", steps=3), progress=False)
    zero = dict(feature_weight=0.0, feature_loss="cosine", feature_layers="0:1", attention_layers="1", relation_heads=2)
    train(_config(setup, "zero", steps=3, **zero), progress=False)
    today, off = _rows(setup, "today"), _rows(setup, "zero")
    assert [(r["loss"], r["ce"], r["kd"]) for r in today] == [(r["loss"], r["ce"], r["kd"]) for r in off]
    assert all("feature" not in r and "attention" not in r for r in off)
    a, b = (load_file(setup[0] / name / "model.safetensors") for name in ("today", "zero"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "terms" not in json.loads((setup[0] / "zero" / "train_summary.json").read_text())["train"]


def test_resume_restores_the_projections(setup):
    settings = dict(feature_weight=1.0, feature_loss="cosine", attention_weight=1.0, attention_layers="0,1")
    train(_config(setup, "straight", **settings), progress=False)

    def interrupt(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_config(setup, "interrupted", **settings), on_step=interrupt, progress=False)
    state = torch.load(setup[0] / "interrupted" / "checkpoint.pt", weights_only=True)
    assert (
        state["step"] == 3 and [tuple(w.shape) for w in state["state_terms"]["projections"].values()] == [(64, 32)] * 2
    )
    train(_config(setup, "interrupted", resume=True, **settings), progress=False)
    straight, resumed = _rows(setup, "straight"), _rows(setup, "interrupted")
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for a, b in zip(straight, resumed):
        for key in ("loss", "ce", "kd", "feature", "attention"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)
    assert straight[-1]["loss"] == pytest.approx(
        0.5 * straight[-1]["ce"] + 0.5 * straight[-1]["kd"] + straight[-1]["feature"] + straight[-1]["attention"],
        rel=1e-5,
    )


@pytest.fixture(scope="module")
def pruned_run(setup):
    """``--init prune`` with both terms: the feature term matches the kept teacher layers through projections
    initialised as the kept-channel selection."""
    config = _config(setup, "pruned", init="prune", steps=3, feature_weight=1.0, attention_weight=0.5, relation_heads=0)
    return train(config, progress=False), setup[0] / "pruned"


def test_a_pruned_student_distils_its_kept_layers_and_saves_as_a_plain_llama(pruned_run):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    summary, out = pruned_run
    kept = json.loads((out / "prune.json").read_text())["chosen"]["plan"]["layers"]
    terms = summary["train"]["terms"]
    assert terms["feature"]["layers"] == [[0, kept[0]], [1, kept[1]]]
    assert terms["feature"]["teacher_layer_rule"].startswith("prune.json")
    assert terms["feature"]["projection_init"] == ["pruned channels"]
    assert terms["attention"]["layers"] == [[1, 2]] and terms["attention"]["relation_heads"] == 4
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["feature"] > 0 and r["attention"] > 0 for r in rows)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with safe_open(out / "model.safetensors", "pt") as handle:
        assert set(handle.keys()) == set(model.state_dict()) - {"lm_head.weight"}  # tied head


def test_the_saved_student_exports_to_gguf_and_onnx_with_parity(pruned_run, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.onnxruntime")
    from export_helpers import read_manifest, run_export

    _, out = pruned_run
    assert run_export("gguf", str(out), "--quant", "q8_0", "--out", str(tmp_path / "gguf"), "--threads", "1") == 0
    (gguf,) = read_manifest(tmp_path / "gguf")["artifacts"]
    assert gguf["passed"], gguf["parity"]["failures"]
    assert run_export("onnx", str(out), "--quant", "fp32", "--out", str(tmp_path / "onnx"), "--threads", "1") == 0
    (onnx,) = read_manifest(tmp_path / "onnx")["artifacts"]
    assert onnx["passed"], onnx["parity"]["failures"]
    assert onnx["parity"]["positions"] > 0


# ------------------------------------------------------------------------------------------------ the CLI
def _cli_errors(commands):
    """Run ``python -m edgedistill`` with each argument list at once; (exit code, stderr) of each."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "edgedistill", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for args in commands
    ]
    return [(p.wait(timeout=300), p.stderr.read()) for p in processes]


def test_bad_settings_exit_2_with_one_line(setup, tmp_path):
    base, teacher, data, shape = setup
    run = ["distill", "--teacher", str(teacher), "--student", str(shape), "--data", str(data), "--steps", "1"]
    run += ["--seq-len", "8", "--threads", "1"]
    cases = [
        (["--teacher-cache", str(tmp_path), "--feature-weight", "1"], "feature_weight: needs the teacher's hidden"),
        (["--teacher-cache", str(tmp_path), "--attention-weight", "1"], "attention_weight: needs the teacher's"),
        (["--attention-weight", "1", "--attention-layers", ""], "attention_layers: expected last or"),
        (["--feature-loss", "l1"], "feature_loss: expected one of mse, cosine"),
        (["--feature-weight", "-1"], "feature_weight: expected a non-negative number"),
        (["--feature-weight", "1", "--feature-layers", "5:0"], "feature_layers: student layer 5 is out of range"),
        (["--attention-weight", "1", "--attention-layers", "0:7"], "attention_layers: teacher layer 7 is out of"),
        (["--attention-weight", "1", "--relation-heads", "3"], "relation_heads: 3 does not divide"),
    ]
    commands = [[*run, "--out", str(tmp_path / f"out{i}"), *extra] for i, (extra, _) in enumerate(cases)]
    for (code, stderr), (_, fragment) in zip(_cli_errors(commands), cases):
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("edgedistill: error:"), stderr
        assert fragment in lines[0], lines[0]
