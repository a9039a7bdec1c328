"""The distillation recipe end to end on tiny in-process models."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import make_llama, make_tokenizer, save_teacher, write_jsonl

from edgedistill.cli import main
from edgedistill.distill.config import TrainConfig
from edgedistill.distill.train import train

FAST = ["--steps", "6", "--batch-size", "4", "--seq-len", "16", "--save-every", "3", "--lr", "3e-3"]


def _run(tmp_path, tiny_teacher, text_data, tiny_shape, *extra, out="run"):
    args = [
        "distill",
        "--teacher",
        str(tiny_teacher),
        "--student",
        str(tiny_shape),
        "--data",
        str(text_data),
        "--out",
        str(tmp_path / out),
        *FAST,
        *extra,
    ]
    return main(args), tmp_path / out


def test_distill_writes_a_loadable_checkpoint(tmp_path, tiny_teacher, text_data, tiny_shape, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out = _run(tmp_path, tiny_teacher, text_data, tiny_shape)
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    summary = json.loads((out / "train_summary.json").read_text())
    heldout = summary["heldout"]
    for key in ("ce", "perplexity", "kd_to_teacher", "top1_agreement", "tokens"):
        assert key in heldout
    assert heldout["perplexity"] == pytest.approx(2.718281828 ** heldout["ce"], rel=1e-6)
    assert 0 <= heldout["top1_agreement"] <= 1 and heldout["tokens"] == summary["data"]["heldout_tokens"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-5) for r in rows)
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "checkpoint.pt").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    assert '"heldout"' in capsys.readouterr().out.strip().splitlines()[-1]


@pytest.mark.parametrize("freeze", [False, True])
def test_every_parameter_changes_after_one_step(tmp_path, tiny_teacher, text_data, tiny_shape, freeze):
    """... except, with ``freeze_embeddings``, the (tied) embedding, which stays exactly as initialised."""
    from edgedistill.distill import teacher as teachers
    from edgedistill.distill.config import StudentShape
    from edgedistill.distill.student import build_student

    source = teachers.resolve_teacher(str(tiny_teacher))
    torch.manual_seed(0)
    initial = build_student(
        StudentShape.from_file(tiny_shape), teachers.load_config(source), teachers.load_tokenizer(source)
    )
    config = TrainConfig(
        out=str(tmp_path / "one"),
        teacher=str(tiny_teacher),
        student=str(tiny_shape),
        data=[str(text_data)],
        steps=1,
        batch_size=4,
        seq_len=16,
        lr=1e-2,
        warmup_steps=0,
        freeze_embeddings=freeze,
    )
    train(config, progress=False)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "one")
    before = dict(initial.named_parameters())
    for name, parameter in trained.named_parameters():
        frozen = freeze and name == "model.embed_tokens.weight"
        assert torch.equal(parameter, before[name]) == frozen, f"{name}: changed is {not frozen} expected"


def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, tiny_teacher, text_data, tiny_shape):
    def config(name, resume=False):
        return TrainConfig(
            out=str(tmp_path / name),
            teacher=str(tiny_teacher),
            student=str(tiny_shape),
            data=[str(text_data)],
            steps=8,
            batch_size=4,
            seq_len=16,
            save_every=3,
            lr=3e-3,
            resume=resume,
        )

    train(config("straight"), progress=False)

    def interrupt(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config("interrupted"), on_step=interrupt, progress=False)
    interrupted = tmp_path / "interrupted"
    assert (interrupted / "checkpoint.pt").exists() and not (interrupted / "model.safetensors").exists()
    # Resuming loses at most one checkpoint interval: it restarts after step 3.
    train(config("interrupted", resume=True), progress=False)

    def losses(name):
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    straight, resumed = losses("straight"), losses("interrupted")
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for a, b in zip(straight, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == pytest.approx(b["lr"])
    summary_a = json.loads((tmp_path / "straight" / "train_summary.json").read_text())["heldout"]
    summary_b = json.loads((interrupted / "train_summary.json").read_text())["heldout"]
    assert summary_a["ce"] == pytest.approx(summary_b["ce"], abs=1e-5)


def test_resume_refuses_a_changed_run(tmp_path, tiny_teacher, text_data, tiny_shape):
    def interrupt(step, metrics):
        raise KeyboardInterrupt

    base = dict(
        out=str(tmp_path / "r"),
        teacher=str(tiny_teacher),
        student=str(tiny_shape),
        data=[str(text_data)],
        steps=4,
        batch_size=4,
        seq_len=16,
        save_every=1,
    )
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base), on_step=interrupt, progress=False)
    with pytest.raises(Exception, match="alpha is 0.2 but the checkpoint"):
        train(TrainConfig(**base, alpha=0.2, resume=True), progress=False)
    with pytest.raises(Exception, match="already holds a run"):
        train(TrainConfig(**base), progress=False)


def test_ce_only_and_other_losses_run(tmp_path, tiny_teacher, text_data, tiny_shape):
    code, out = _run(tmp_path, tiny_teacher, text_data, tiny_shape, "--alpha", "1", out="ce")
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] is None and r["loss"] == r["ce"] for r in rows)
    # the teacher is still used for the final comparison
    assert "top1_agreement" in json.loads((out / "train_summary.json").read_text())["heldout"]
    for loss in ("rkl", "jsd", "skl", "srkl"):
        code, _ = _run(
            tmp_path,
            tiny_teacher,
            text_data,
            tiny_shape,
            "--loss",
            loss,
            "--temperature",
            "2",
            "--steps",
            "2",
            out=loss,
        )
        assert code == 0


def test_chat_and_reasoning_data_with_grad_accum(tmp_path, tiny_teacher, tiny_shape):
    records = []
    for i in range(30):
        records.append(
            {
                "conversations": [
                    {"role": "user", "content": f"question {i}?"},
                    {"role": "assistant", "content": f"<think>step {i}</think><answer>{i}</answer>"},
                ]
            }
        )
    data = write_jsonl(tmp_path / "reason.jsonl", records)
    code, out = _run(tmp_path, tiny_teacher, data, tiny_shape, "--grad-accum", "2", "--tag-weight", "10", out="reason")
    assert code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["data"]["tag_tokens"] > 0 and summary["data"]["train_tokens"] > summary["data"]["tag_tokens"]


def test_padded_teacher_vocabulary_is_not_a_mismatch(tmp_path, text_data, tiny_shape):
    """Qwen-style padding: the teacher has 64 output rows more than its tokenizer has tokens."""
    teacher = save_teacher(tmp_path / "padded", vocab_pad=64)
    code, out = _run(tmp_path, teacher, text_data, tiny_shape, out="padded-run")
    assert code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["vocab"]["tokenizer_size"] == 320 and summary["vocab"]["shared_rows"] == 384
    # an existing student checkpoint with unpadded rows distils from the padded teacher on the shared rows
    student_dir = tmp_path / "unpadded-student"
    tokenizer = make_tokenizer()
    make_llama(len(tokenizer), hidden=32, heads=2, kv_heads=1, ffn=64).save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    code, out = _run(tmp_path, teacher, text_data, student_dir, out="unpadded-run")
    assert code == 0
    assert json.loads((out / "train_summary.json").read_text())["vocab"]["shared_rows"] == 320


def test_init_from_teacher_copies_every_kth_layer(tmp_path, text_data):
    from transformers import AutoModelForCausalLM

    teacher_dir = save_teacher(tmp_path / "deep", layers=4)
    shape = tmp_path / "half.toml"
    shape.write_text(
        "hidden_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\n"
        "intermediate_size = 128\n"
    )
    config = TrainConfig(
        out=str(tmp_path / "init"),
        teacher=str(teacher_dir),
        student=str(shape),
        data=[str(text_data)],
        steps=1,
        batch_size=2,
        seq_len=16,
        lr=1e-12,
        init="teacher",
        warmup_steps=0,
    )
    train(config, progress=False)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "init")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    for student_index, teacher_index in ((0, 0), (1, 2)):
        a = student.model.layers[student_index].mlp.down_proj.weight
        b = teacher.model.layers[teacher_index].mlp.down_proj.weight
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight, atol=1e-6)


def _cli(*args, cwd=None):
    result = subprocess.run(
        [sys.executable, "-m", "edgedistill", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )
    return result.returncode, result.stderr


def _assert_one_line_error(code, stderr, *fragments):
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgedistill: error:"), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, tiny_teacher, text_data, tiny_shape):
    common = ["--teacher", str(tiny_teacher), "--steps", "1", "--seq-len", "8"]
    missing = tmp_path / "missing.jsonl"
    _assert_one_line_error(
        *_cli("distill", *common, "--student", str(tiny_shape), "--data", str(missing), "--out", str(tmp_path / "a")),
        str(missing),
        "no such data file",
    )
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, "{oops"])
    _assert_one_line_error(
        *_cli("distill", *common, "--student", str(tiny_shape), "--data", str(bad), "--out", str(tmp_path / "b")),
        f"{bad}:2:",
        "invalid JSON",
    )
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _assert_one_line_error(
        *_cli("distill", *common, "--student", str(tiny_shape), "--data", str(empty), "--out", str(tmp_path / "c")),
        "empty",
    )
    _assert_one_line_error(
        *_cli("distill", *common, "--student", "gigantic", "--data", str(text_data), "--out", str(tmp_path / "d")),
        "unknown preset 'gigantic'",
    )
    shape = tmp_path / "shape.json"
    shape.write_text('{"hidden_size": 32}')
    _assert_one_line_error(
        *_cli("distill", *common, "--student", str(shape), "--data", str(text_data), "--out", str(tmp_path / "e")),
        str(shape),
        "num_hidden_layers",
    )
    _assert_one_line_error(
        *_cli("distill", *common, "--student", str(tiny_shape), "--alpha", "1.5", "--out", str(tmp_path / "f")), "alpha"
    )
    _assert_one_line_error(
        *_cli("distill", "--teacher", str(tmp_path / "nope"), "--out", str(tmp_path / "g")), "no such file or directory"
    )


def test_vocabulary_mismatch_exits_2(tmp_path, tiny_teacher, text_data):
    other = make_tokenizer(corpus=["completely different words make a different vocabulary entirely"] * 3)
    student_dir = tmp_path / "foreign-student"
    make_llama(len(other), hidden=32, heads=2, kv_heads=1, ffn=64).save_pretrained(student_dir)
    other.save_pretrained(student_dir)
    code, stderr = _cli(
        "distill",
        "--teacher",
        str(tiny_teacher),
        "--student",
        str(student_dir),
        "--data",
        str(text_data),
        "--out",
        str(tmp_path / "mm"),
        "--steps",
        "1",
        "--seq-len",
        "8",
    )
    _assert_one_line_error(code, stderr, "vocabulary mismatch")
    assert not (tmp_path / "mm" / "model.safetensors").exists()


def test_help_imports_no_torch():
    code = (
        "import sys; from edgedistill.cli import main\n"
        "try:\n    main(['distill', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--alpha" in result.stdout and "--tag-weight" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_run(tmp_path, tiny_teacher, text_data, tiny_shape):
    code, out = _run(tmp_path, tiny_teacher, text_data, tiny_shape, "--device", "cuda", out="cuda")
    assert code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["train"]["device"].startswith("cuda")
    assert summary["heldout"]["ce"] < 20


def test_distill_speed_bench_reports_measurements(capsys):
    from edgedistill.bench import distill_speed

    args = ["--teacher-hidden", "64", "--teacher-layers", "2", "--student-hidden", "32", "--student-layers", "1",
            "--heads", "2", "--kv-heads", "1", "--vocab", "300", "--batch-size", "2", "--seq-len", "16",
            "--steps", "3", "--warmup", "1", "--threads", "1"]
    assert distill_speed.main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps_timed"] == 3 and result["seconds_per_step"] > 0
    assert result["tokens_per_second"] == pytest.approx(2 * 16 / result["seconds_per_step"])
    assert result["peak_rss_mb"] >= result["rss_after_imports_mb"] > 0
