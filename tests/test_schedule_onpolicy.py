"""On-policy distillation (``--on-policy-fraction``, distill/on_policy.py) and phase schedules (``--schedule``,
distill/schedule.py) on tiny in-process models: λ = 0 is today's training, an on-policy step's loss is the
divergence on the student's own sample, the steps are a deterministic share, a schedule logs its phases and resumes
mid-phase exactly, and bad settings exit 2 with one line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import TRAINING_TEXT, write_jsonl

from edgedistill.distill import on_policy
from edgedistill.distill.config import TrainConfig
from edgedistill.distill.train import train


def _config(tmp_path, teacher, data, shape, name, **settings):
    values = dict(
        out=str(tmp_path / name),
        teacher=str(teacher),
        student=str(shape),
        data=[str(data)],
        steps=6,
        batch_size=2,
        seq_len=16,
        save_every=3,
        lr=3e-3,
        threads=1,
        precision="float32",
        teacher_dtype="float32",
    )
    return TrainConfig(**{**values, **settings})


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _loads_cleanly(out):
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def _exports_with_parity(out, tmp_path):
    """The saved student through the real exporters: GGUF q8_0 and ONNX fp32, both passing parity."""
    from export_helpers import read_manifest, run_export

    for fmt, quant in (("gguf", "q8_0"), ("onnx", "fp32")):
        target = tmp_path / f"{out.name}-{fmt}"
        assert run_export(fmt, str(out), "--quant", quant, "--out", str(target), "--threads", "1") == 0
        (record,) = read_manifest(target)["artifacts"]
        assert record["passed"], record["parity"]["failures"]


# ------------------------------------------------------------------------------------------------ on-policy
def test_on_policy_steps_are_the_deterministic_share():
    chosen = [i for i in range(8) if on_policy.is_on_policy(i, 0.25)]
    assert chosen == [3, 7]
    for fraction in (0.0, 0.3, 0.5, 1.0):
        assert sum(on_policy.is_on_policy(i, fraction) for i in range(20)) == int(20 * fraction)
    assert on_policy.sample_seed(0, 3) == on_policy.sample_seed(0, 3) != on_policy.sample_seed(0, 4)


def test_lambda_zero_is_off_policy(tmp_path, tiny_teacher, text_data, tiny_shape):
    train(_config(tmp_path, tiny_teacher, text_data, tiny_shape, "today", steps=3), progress=False)
    train(
        _config(tmp_path, tiny_teacher, text_data, tiny_shape, "zero", steps=3, on_policy_fraction=0.0),
        progress=False,
    )
    today, zero = _rows(tmp_path / "today"), _rows(tmp_path / "zero")
    assert [(r["loss"], r["ce"], r["kd"]) for r in today] == [(r["loss"], r["ce"], r["kd"]) for r in zero]
    assert all(r["on_policy"] == 0 for r in zero)
    summary = json.loads((tmp_path / "zero" / "train_summary.json").read_text())
    assert summary["train"]["on_policy"] == {"fraction": 0.0, "steps": 0}


def test_lambda_one_loss_is_the_divergence_on_the_sampled_positions(
    tmp_path, tiny_teacher, text_data, tiny_shape, monkeypatch
):
    from transformers import AutoModelForCausalLM

    samples = []
    original = on_policy.sample

    def recording(student, prompts, new_tokens, generator, dtype=None):
        before = copy.deepcopy(student)
        result = original(student, prompts, new_tokens, generator, dtype)
        samples.append((before, prompts.clone(), result.clone()))
        return result

    monkeypatch.setattr(on_policy, "sample", recording)
    settings = dict(steps=1, on_policy_fraction=1.0, loss="jsd", temperature=1.0)
    train(_config(tmp_path, tiny_teacher, text_data, tiny_shape, "one", **settings), progress=False)
    (row,) = _rows(tmp_path / "one")
    assert row["on_policy"] == 1 and row["ce"] is None
    (student, prompts, sequence) = samples[0]
    assert prompts.shape == (2, 8) and sequence.shape == (2, 17) and torch.equal(sequence[:, :8], prompts)

    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        inputs = sequence[:, :-1]
        s = torch.log_softmax(student(input_ids=inputs).logits[:, 7:16].double(), -1)  # predicted tokens 8..16
        t = torch.log_softmax(teacher(input_ids=inputs).logits[:, 7:16].double(), -1)
        m = torch.log(0.5 * t.exp() + 0.5 * s.exp())
        jsd = 0.5 * (t.exp() * (t - m)).sum(-1) + 0.5 * (s.exp() * (s - m)).sum(-1)
    assert row["loss"] == pytest.approx(jsd.mean().item(), rel=1e-4)
    assert row["kd"] == pytest.approx(row["loss"], rel=1e-6)

    # the same run samples the same tokens
    train(_config(tmp_path, tiny_teacher, text_data, tiny_shape, "again", **settings), progress=False)
    assert torch.equal(samples[1][2], sequence)
    _loads_cleanly(tmp_path / "one")


def test_a_trimmed_student_with_features_on_policy_half_the_steps(tmp_path, tiny_teacher, text_data, tiny_shape):
    settings = dict(vocab="auto", on_policy_fraction=0.5, loss="rkl", feature_weight=0.5, feature_loss="cosine")
    summary = train(_config(tmp_path, tiny_teacher, text_data, tiny_shape, "half", **settings), progress=False)
    rows = _rows(tmp_path / "half")
    assert summary["vocab"]["trimmed"] is not None
    assert [r["on_policy"] for r in rows] == [0, 1, 0, 1, 0, 1]
    assert all((r["ce"] is None) == bool(r["on_policy"]) for r in rows)
    for r in rows:
        logit = r["kd"] if r["on_policy"] else 0.5 * r["ce"] + 0.5 * r["kd"]
        assert r["loss"] == pytest.approx(logit + 0.5 * r["feature"], rel=1e-5)
    assert summary["train"]["on_policy"] == {"fraction": 0.5, "steps": 3}
    _loads_cleanly(tmp_path / "half")
    _exports_with_parity(tmp_path / "half", tmp_path)


# ------------------------------------------------------------------------------------------------ schedules
SCHEDULE = """
[[phase]]
name = "lower-features"
steps = 4
feature_weight = 1.0
feature_layers = "0"
logit_weight = 0.0

[[phase]]
name = "general"
steps = 4
data = ["{data}"]
alpha = 0.25
on_policy_fraction = 0.5
"""


@pytest.fixture
def schedule(tmp_path):
    other = [f"Phase two text {i}: {line}" for i in range(30) for line in reversed(TRAINING_TEXT)]
    data = write_jsonl(tmp_path / "other.jsonl", [{"text": s} for s in other])
    path = tmp_path / "schedule.toml"
    path.write_text(SCHEDULE.format(data=data))
    return path


def test_a_two_phase_schedule_logs_its_phases_and_resumes_mid_phase(
    tmp_path, tiny_teacher, text_data, tiny_shape, schedule
):
    def config(name, **more):
        return _config(tmp_path, tiny_teacher, text_data, tiny_shape, name, schedule=str(schedule), **more)

    assert config("x").steps == 8  # the phases' sum, whatever --steps says
    summary = train(config("straight"), progress=False)
    rows = _rows(tmp_path / "straight")
    assert [r["phase"] for r in rows] == ["lower-features"] * 4 + ["general"] * 4
    assert [r["on_policy"] for r in rows] == [0] * 4 + [0, 1, 0, 1]
    for r in rows[:4]:  # features only: the logit term weighs 0
        assert r["loss"] == pytest.approx(r["feature"], rel=1e-6)
    for r in rows[4:]:
        assert "feature" not in r
        logit = r["kd"] if r["on_policy"] else 0.25 * r["ce"] + 0.75 * r["kd"]
        assert r["loss"] == pytest.approx(logit, rel=1e-5)
    phases = summary["train"]["schedule"]["phases"]
    assert [(p["name"], p["steps"]) for p in phases] == [("lower-features", 4), ("general", 4)]
    assert phases[1]["overrides"]["alpha"] == 0.25 and summary["train"]["on_policy"]["steps"] == 2
    _loads_cleanly(tmp_path / "straight")
    _exports_with_parity(tmp_path / "straight", tmp_path)

    def interrupt(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config("interrupted"), on_step=interrupt, progress=False)
    assert torch.load(tmp_path / "interrupted" / "checkpoint.pt", weights_only=True)["step"] == 3  # mid-phase
    train(config("interrupted", resume=True), progress=False)
    resumed = _rows(tmp_path / "interrupted")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(rows, resumed):
        assert a["phase"] == b["phase"] and a["on_policy"] == b["on_policy"]
        for key in ("loss", "kd", "feature", "lr"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-6), (a["step"], key)


# ------------------------------------------------------------------------------------------------ the CLI
BAD = {
    "unknown": ('[[phase]]\nname = "a"\nsteps = 2\nlearning_rate = 1.0\n', "phase 1 (a): learning_rate: unknown key"),
    "nosteps": ('[[phase]]\nname = "a"\nsteps = 2\n[[phase]]\nname = "b"\n', "phase 2 (b): steps: missing"),
    "twice": ('[[phase]]\nname = "a"\nsteps = 2\n[[phase]]\nname = "a"\nsteps = 1\n', "phase 2 (a): name: 'a' is"),
    "alpha": ('[[phase]]\nname = "a"\nsteps = 2\nalpha = 2\n', "phase 1 (a): alpha: expected a number in [0, 1]"),
    "loss": ('[[phase]]\nname = "a"\nsteps = 2\nloss = "kl2"\n', "phase 1 (a): loss: expected one of fkl"),
}


def test_bad_settings_exit_2_with_one_line(tmp_path, tiny_teacher, text_data, tiny_shape):
    run = ["distill", "--teacher", str(tiny_teacher), "--student", str(tiny_shape), "--data", str(text_data)]
    cases = [(["--teacher-cache", str(tmp_path), "--on-policy-fraction", "0.5"], "on_policy_fraction: ")]
    cases.append((["--on-policy-fraction", "1.5"], "on_policy_fraction: expected a number in [0, 1]"))
    phase_data = tmp_path / "phase_data.toml"
    phase_data.write_text(f'[[phase]]\nname = "a"\nsteps = 2\ndata = ["{text_data}.other"]\n')
    cases.append((["--teacher-cache", str(tmp_path), "--schedule", str(phase_data)], "phase 1 (a): data: a --teach"))
    for name, (text, fragment) in BAD.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        cases.append((["--schedule", str(path)], f"{path}: {fragment}"))
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "edgedistill", *run, "--out", str(tmp_path / f"out{i}"), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, (extra, _) in enumerate(cases)
    ]
    for process, (_, fragment) in zip(processes, cases):
        code, stderr = process.wait(timeout=300), process.stderr.read()
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("edgedistill: error:"), stderr
        assert fragment in lines[0], lines[0]
