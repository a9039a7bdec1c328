"""``edgedistill teacher-data``: a tiny GGUF teacher, built and exported in process, answers prompts in llama.cpp."""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import write_jsonl
from export_helpers import run_export, save_checkpoint

from edgedistill.cli import main
from edgedistill.distill.data import OUTSIDE_TEXT, load_data
from edgedistill.distill.generation import THINK_OPEN, BatchedGenerator, Job, Sampling, choose_token
from edgedistill.distill.teacher import load_tokenizer, resolve_teacher
from edgedistill.distill.teacher_data import DEFAULT_PROMPTS, TeacherDataConfig, make_teacher_data, read_prompts
from edgedistill.errors import EdgeDistillError

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    {"prompt": "Write about a fox."},
    {"prompt": "Explain numbers 0 1 2 3.", "reasoning": False},
    {"prompt": "What is 2 plus 3?", "reasoning": True},
    {"prompt": "The quick brown dog"},
    {"prompt": "Is a student smaller than a teacher?", "reasoning": True},
]
REASONING = re.compile(r"<think>\n(.*)\n</think>\n<answer>\n(.*)\n</answer>", re.DOTALL)


@pytest.fixture(scope="module")
def gguf_teacher(tmp_path_factory) -> Path:
    """A tiny teacher (2 layers, width 64, ChatML template, logits that depend on attention, so that greedy text
    varies) as a q8_0 GGUF: llama.cpp's float16 cache and flash attention, the default teacher's path."""
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("checkpoint") / "teacher")
    out = tmp_path_factory.mktemp("gguf-teacher")
    assert run_export("gguf", str(checkpoint), "--quant", "q8_0", "--out", str(out), "--threads", "1") == 0
    return next(out.glob("*-q8_0.gguf"))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", PROMPTS)


def _config(teacher: Path, prompts: Path, out: Path, **settings) -> TeacherDataConfig:
    values = dict(max_new_tokens=24, think_tokens=10, batch=3, threads=1, temperature=0.8, seed=3)
    values.update(settings)
    return TeacherDataConfig(out=str(out), teacher=str(teacher), prompts=str(prompts), **values)


def _run(teacher: Path, prompts: Path, out: Path, after_group=None, **settings) -> dict:
    return make_teacher_data(_config(teacher, prompts, out, **settings), progress=False, after_group=after_group)


def test_answers_load_as_chat_data_with_well_formed_reasoning_and_a_full_manifest(gguf_teacher, prompts, tmp_path):
    out = tmp_path / "data.jsonl"
    manifest = _run(gguf_teacher, prompts, out, samples=2)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 2 * len(PROMPTS)  # prompt by prompt, sample by sample
    for number, line in enumerate(lines):
        user, assistant = line["conversations"]
        prompt = PROMPTS[number // 2]
        assert user == {"role": "user", "content": prompt["prompt"]} and assistant["role"] == "assistant"
        tags = [assistant["content"].count(t) for t in ("<think>", "</think>", "<answer>", "</answer>")]
        if prompt.get("reasoning"):
            assert REASONING.fullmatch(assistant["content"]) and tags == [1, 1, 1, 1], assistant["content"]
        else:
            assert tags == [0, 0, 0, 0]
    assert lines[0] != lines[1]  # two samples of one prompt, each with its own seed
    tokenizer = load_tokenizer(resolve_teacher(str(gguf_teacher)))
    _, _, stats = load_data([out], tokenizer, seq_len=16, tag_weight=10.0)
    assert stats.records == len(lines) and stats.tag_tokens > 0

    assert not Path(f"{out}.partial").exists()
    assert json.loads(Path(f"{out}.manifest.json").read_text(encoding="utf-8")) == manifest
    assert manifest["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert manifest["teacher"]["sha256"] == hashlib.sha256(gguf_teacher.read_bytes()).hexdigest()
    assert manifest["prompts"] == {
        "path": str(prompts),
        "sha256": hashlib.sha256(prompts.read_bytes()).hexdigest(),
        "count": 5,
        "reasoning": 2,
    }
    settings = manifest["settings"]
    assert (settings["temperature"], settings["top_k"], settings["top_p"], settings["seed"]) == (0.8, 40, 1.0, 3)
    lengths = (settings["max_new_tokens"], settings["think_tokens"], settings["samples"], settings["batch"])
    assert lengths == (24, 10, 2, 3)
    assert manifest["records"] == 10 and manifest["edgedistill_version"]
    assert manifest["answers"]["tokens"] == manifest["generation"]["tokens"] > 0
    assert sum(manifest["answers"]["finish"].values()) == 10
    for part in ("generation", "single_sequence"):
        rates = (
            "tokens_per_second",
            "tokens_per_cpu_second",
            "decode_tokens_per_second",
            "decode_tokens_per_cpu_second",
        )
        assert all(manifest[part][rate] > 0 for rate in rates), manifest[part]
    assert manifest["llama_cpp"]["sequences"] == 3 and 0 < manifest["generation"]["batch_fill"] <= 1
    assert set(manifest["batching_speedup"]) == set(rates) and all(manifest["batching_speedup"].values())


def test_batched_decoding_equals_one_sequence_at_a_time_token_for_token(gguf_teacher):
    """Greedy decoding, where the tiny model's many near-ties would show any difference in the logits: the same ids
    whether a prompt is decoded alone or with others, in a fresh slot or a reused one, reasoning or not."""
    texts = ["Write about a fox.", "The quick brown", "numbers 0 1 2 3", "Is a student small?", "A teacher"]
    ids = {}
    for batch in (1, 2, 5):
        with BatchedGenerator(gguf_teacher, sequences=batch, context=96, threads=1) as generator:
            rendered = [
                f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n" + (THINK_OPEN if i % 2 else "")
                for i, text in enumerate(texts)
            ]
            jobs = [Job((i, 0), generator.tokenize(text), i % 2 == 1, (0, i)) for i, text in enumerate(rendered)]
            answers = []
            for first in range(0, len(jobs), batch):
                found, stats = generator.generate(jobs[first : first + batch], Sampling(0.0, 0, 1.0), 40, 12)
                answers += found
        ids[batch] = [(a.key, a.token_ids, a.content) for a in answers]
    assert ids[1] == ids[2] == ids[5]
    assert stats.decode_steps < stats.decode_tokens  # five sequences a step
    assert all(len(set(token_ids)) > 5 for _, token_ids, _ in ids[1])  # not one repeated token


def test_output_file_does_not_depend_on_the_batch(gguf_teacher, prompts, tmp_path):
    files = []
    for batch in (1, 4):
        out = tmp_path / f"b{batch}.jsonl"
        manifest = _run(gguf_teacher, prompts, out, batch=batch, max_new_tokens=40)
        files.append((out.read_bytes(), manifest["answers"]))
    assert files[0] == files[1]
    assert manifest["llama_cpp"]["sequences"] == 4


def test_interrupted_run_resumes_to_the_same_file_and_refuses_other_settings(gguf_teacher, prompts, tmp_path):
    whole = tmp_path / "whole.jsonl"
    _run(gguf_teacher, prompts, whole, batch=2)

    out = tmp_path / "data.jsonl"
    partial = Path(f"{out}.partial")

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(gguf_teacher, prompts, out, after_group=interrupt, batch=2)
    assert not out.exists() and len(partial.read_text(encoding="utf-8").splitlines()) == 2  # header, one group
    with partial.open("ab") as handle:
        handle.write(b'{"records": [{"index": 4, "sam')  # a line torn by a kill: dropped on resume

    with pytest.raises(EdgeDistillError, match=r"data\.jsonl\.partial: made with temperature 0\.8, .* has 0\.5"):
        _run(gguf_teacher, prompts, out, temperature=0.5, batch=2)
    with partial.open("rb") as held:  # another live run holds the partial file
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        with pytest.raises(EdgeDistillError, match="is in use by another edgedistill run"):
            _run(gguf_teacher, prompts, out, batch=2)
    progress = []
    manifest = _run(gguf_teacher, prompts, out, after_group=progress.append, batch=2)
    assert progress == [4, 5]  # the first group was not generated again
    assert out.read_bytes() == whole.read_bytes() and manifest["groups"] == 3 and not partial.exists()

    again = _run(gguf_teacher, prompts, out, batch=5, threads=2)  # batch and threads do not change the output
    assert again["already_complete"] and out.read_bytes() == whole.read_bytes()
    with pytest.raises(EdgeDistillError, match=r"data\.jsonl: made with seed 3, this run has 4"):
        _run(gguf_teacher, prompts, out, seed=4)
    other = write_jsonl(tmp_path / "other.jsonl", PROMPTS[:2])
    with pytest.raises(EdgeDistillError, match="made with prompts_sha256"):
        _run(gguf_teacher, other, out)


def test_a_partial_file_without_answers_is_replaced_and_a_damaged_one_is_refused(gguf_teacher, prompts, tmp_path):
    out = tmp_path / "data.jsonl"
    partial = Path(f"{out}.partial")
    partial.write_text('{"fingerprint": {"seed": 99}}\n', encoding="utf-8")  # an earlier run stopped before any answer
    assert _run(gguf_teacher, prompts, out)["records"] == len(PROMPTS) and not partial.exists()
    other = tmp_path / "other.jsonl"
    Path(f"{other}.partial").write_text('{"fingerprint": {}}\nnot json\n{"records": []}\n', encoding="utf-8")
    with pytest.raises(EdgeDistillError, match=r"other\.jsonl\.partial:2: damaged; delete the file"):
        _run(gguf_teacher, prompts, other)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"prompt": "fine"}\n{"prompt": ""}', r'bad\.jsonl:2: "prompt" must be a non-empty string'),
        ('{"prompt": "fine"}\n\n["a list"]', r"bad\.jsonl:3: expected a JSON object .*, got list"),
        ('{"prompt": "x", "reasoning": "yes"}', r'bad\.jsonl:1: "reasoning" must be true or false'),
        ('{"prompt": "x", "reasonning": true}', r"bad\.jsonl:1: unknown key 'reasonning'"),
        ('{"prompt": "x"', r"bad\.jsonl:1: invalid JSON"),
    ],
)
def test_bad_prompt_lines_are_one_line_errors(gguf_teacher, tmp_path, capsys, line, expected):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line, encoding="utf-8")
    argv = ["teacher-data", "--teacher", str(gguf_teacher), "--prompts", str(bad), "--out", str(tmp_path / "o.jsonl")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.search(expected, err) and err.count("\n") == 1, err


def test_cli_exits_2_with_one_line_for_a_bad_prompt_file_and_a_checkpoint_teacher(gguf_teacher, tiny_teacher, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"prompt": "fine"}\n{"text": "not a prompt"}\n')
    out = tmp_path / "o.jsonl"
    argv = [sys.executable, "-m", "edgedistill", "teacher-data", "--teacher", str(gguf_teacher), "--prompts", str(bad)]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"edgedistill: error: {bad}:2: unknown key 'text'; expected a JSON object " + (
        '{"prompt": "...", "reasoning": false}\n'
    )
    assert not out.exists() and not Path(f"{out}.partial").exists()
    argv = ["teacher-data", "--teacher", str(tiny_teacher), "--out", str(out)]
    with pytest.raises(EdgeDistillError, match="needs a .gguf file; export the checkpoint first: edgedistill export"):
        make_teacher_data(TeacherDataConfig(out=str(out), teacher=str(tiny_teacher)), progress=False)


def test_settings_are_checked():
    for settings, message in [
        (dict(out="x.json"), "out: expected a .jsonl"),
        (dict(out="x.jsonl", think_tokens=8, max_new_tokens=8), "think_tokens: expected"),
        (dict(out="x.jsonl", top_p=0.0), "top_p: expected a number in"),
        (dict(out="x.jsonl", batch=0), "batch: expected a positive integer"),
        (dict(out="x.jsonl", temperature=-1.0), "temperature: expected 0"),
    ]:
        with pytest.raises(EdgeDistillError, match=message):
            TeacherDataConfig(**settings)
    assert TeacherDataConfig(out="x.jsonl", max_new_tokens=9).think_budget == 4


def test_txt_prompts_are_one_a_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\n  second prompt  \n", encoding="utf-8")
    assert [(p.text, p.reasoning, p.where) for p in read_prompts(path)] == [
        ("first prompt", False, f"{path}:1"),
        ("second prompt", False, f"{path}:3"),
    ]
    path.write_bytes(b"ok\n\xff\n")
    with pytest.raises(EdgeDistillError, match=r"p\.txt:2: not UTF-8"):
        read_prompts(path)


def test_sampler_limits_and_seeds():
    logits = np.array([0.0, 3.0, 2.9, -1.0], np.float32)
    rng = np.random.default_rng(0)
    assert choose_token(logits, Sampling(0.0, 0, 1.0), rng) == 1
    assert {choose_token(logits, Sampling(1.0, 1, 1.0), rng) for _ in range(20)} == {1}
    assert {choose_token(logits, Sampling(1.0, 0, 0.3), rng) for _ in range(20)} == {1}
    assert {choose_token(logits, Sampling(1.0, 2, 1.0), rng) for _ in range(200)} == {1, 2}
    draws = [[choose_token(logits, Sampling(5.0, 0, 1.0), np.random.default_rng([7, 1])) for _ in range(3)]]
    assert draws == [[choose_token(logits, Sampling(5.0, 0, 1.0), np.random.default_rng([7, 1])) for _ in range(3)]]


def _shingles(text: str, n: int = 8) -> set[str]:
    words = text.lower().split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


# The 24 topics of outside.jsonl (distill/corpus/README.md), as words a prompt on them would use.
OUTSIDE_TOPICS = (
    r"cook|autumn|lighthouse|\bbees?\b|moving house|card game|market|weather|bedtime|houseplant|\btrains?\b|frog|"
    r"football|puncture|paint|grocer|budget|swim|night sky|\bstars?\b|\bmoon\b|bread|\bbak(e|ing)|museum|fable|"
    r"\btides?\b|interview|f[êe]te"
)


def test_default_prompt_set_is_ours_and_stays_off_the_outside_topics():
    prompts = read_prompts(DEFAULT_PROMPTS)
    reasoning = [p for p in prompts if p.reasoning]
    assert 60 <= len(prompts) <= 100 and 12 <= len(reasoning) <= 20
    assert len({p.text for p in prompts}) == len(prompts)
    outside = set()
    for line in OUTSIDE_TEXT.read_text(encoding="utf-8").splitlines():
        outside |= _shingles(json.loads(line)["text"])
    assert not outside & set().union(*(_shingles(p.text) for p in prompts))
    assert [p.text for p in prompts if re.search(OUTSIDE_TOPICS, p.text, re.IGNORECASE)] == []


def test_a_student_distilled_on_the_answers_saves_and_exports_with_parity(gguf_teacher, prompts, tmp_path):
    """Sequence-level distillation end to end: the teacher's answers as ``distill --data``, the GGUF teacher online,
    and the student through the real exporters."""
    from export_helpers import read_manifest
    from transformers import AutoModelForCausalLM

    from edgedistill.distill.config import TrainConfig
    from edgedistill.distill.train import train

    data = tmp_path / "answers.jsonl"
    _run(gguf_teacher, prompts, data, samples=3)
    student = tmp_path / "student"
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps(dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=64)))  # fmt: skip
    config = TrainConfig(out=str(student), teacher=str(gguf_teacher), student=str(shape), data=[str(data)], steps=3,
                         batch_size=2, seq_len=32, threads=1, val_fraction=0.25, precision="float32")  # fmt: skip
    summary = train(config, progress=False)
    assert summary["data"]["files"] == [str(data)] and summary["heldout"]["tokens"] > 0
    _, info = AutoModelForCausalLM.from_pretrained(student, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for fmt, quant in (("gguf", "q8_0"), ("onnx", "fp32")):
        target = tmp_path / fmt
        assert run_export(fmt, str(student), "--quant", quant, "--out", str(target), "--threads", "1") == 0
        (record,) = read_manifest(target)["artifacts"]
        assert record["passed"], record["parity"]["failures"]
