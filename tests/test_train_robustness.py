"""Bad settings, bad files, diverging and killed runs: one line on stderr and exit code 2, never a traceback; a
killed run resumes from its last checkpoint; a checkpoint is data, never code."""

import gzip
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TRAINING_TEXT, make_tokenizer, write_jsonl

from edgedistill.cli import main
from edgedistill.distill import data as data_module
from edgedistill.distill.config import CacheConfig, TrainConfig
from edgedistill.distill.data import Record, encode_records
from edgedistill.distill.train import train
from edgedistill.errors import EdgeDistillError
from edgedistill.files import temp_path
from edgedistill.pipeline import PipelineConfig

FAST = ["--steps", "4", "--batch-size", "4", "--seq-len", "16", "--save-every", "2"]


def _cli(*args, timeout=120):
    """The real console entry point in a child process: (exit code, stdout, stderr)."""
    result = subprocess.run(
        [sys.executable, "-m", "edgedistill", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    return result.returncode, result.stdout, result.stderr


def _assert_one_line_error(code, stderr, *fragments):
    assert code == 2, f"exit {code} (negative: killed by a signal)\n{stderr}"
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgedistill: error:"), stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], lines[0]


def _write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _stray_files(out: Path) -> list[str]:
    """Temporary files an interrupted write can leave: dot files (mkstemp names) and *.tmp."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp"))


# --------------------------------------------------------------------------------------------- fuzz: the real CLI
def _gzip_records(count: int = 200) -> bytes:
    text = "".join(json.dumps({"text": f"{t} {i}"}) + "\n" for i in range(count) for t in TRAINING_TEXT)
    return gzip.compress(text.encode("utf-8"), mtime=0)


def _bad_checksum(raw: bytes) -> bytes:
    return raw[:-8] + bytes(8)  # the trailer's CRC-32 and length: the damage shows only at the end of the stream


def _data_case(case_id: str, name: str, content: bytes | str, where: str, *fragments: str) -> tuple:
    """A fuzz case whose data file ``name`` holds ``content``; the error names the file, then ``where`` (":line")."""
    return (case_id, {name: content}, ["--data", f"@{name}"], [f"@{name}{where}", *fragments])


# (id, files to write in the case's directory {name: content}, flags replacing the good ones (value None: flag left
#  out), fragments of the error line); "@name" stands for the path of a written file, "@tmp" for the directory.
FUZZ = [
    ("grad-clip-nan", {}, ["--grad-clip", "nan"], ["grad_clip", "finite"]),
    ("weight-decay-nan", {}, ["--weight-decay", "nan"], ["weight_decay", "finite"]),
    ("temperature-inf", {}, ["--temperature", "inf"], ["temperature", "finite"]),
    ("tag-weight-nan", {}, ["--tag-weight", "nan"], ["tag_weight", "finite"]),
    ("lr-inf", {}, ["--lr", "inf"], ["lr", "finite"]),
    ("steps-not-a-number", {}, ["--steps", "many"], ["--steps", "invalid int value", "edgedistill distill --help"]),
    ("warmup-negative", {}, ["--warmup-steps", "-5"], ["warmup_steps"]),
    ("steps-negative", {}, ["--steps", "-3"], ["steps", "positive integer"]),
    ("batch-zero", {}, ["--batch-size", "0"], ["batch_size", "positive integer"]),
    ("alpha-below-0", {}, ["--alpha", "-0.1"], ["alpha", "[0, 1]"]),
    ("temperature-zero", {}, ["--temperature", "0"], ["temperature", "positive"]),
    ("seed-negative", {}, ["--seed", "-1"], ["seed"]),
    ("device-tpu", {}, ["--device", "tpu"], ["device", "auto, cpu, cuda or cuda:N", "'tpu'"]),
    ("toml-nan", {"r.toml": "lr = nan\n"}, ["--config", "@r.toml"], ["@r.toml", "lr", "finite"]),
    ("toml-data-int", {"r.toml": "data = 5\n"}, ["--config", "@r.toml", "--data", None], ["@r.toml", "data"]),
    ("toml-not-utf8", {"r.toml": b"steps = 3\n# \xff\n"}, ["--config", "@r.toml"], ["@r.toml:2", "UTF-8"]),
    ("toml-syntax", {"r.toml": "steps = 3\nlr = = 1\n"}, ["--config", "@r.toml"], ["@r.toml:2", "invalid TOML"]),
    ("toml-unknown-key", {"r.toml": "stepz = 3\n"}, ["--config", "@r.toml"], ["@r.toml", "stepz"]),
    ("toml-wrong-type", {"r.toml": 'steps = "many"\n'}, ["--config", "@r.toml", "--steps", None], ["@r.toml", "steps"]),
    ("teacher-missing", {}, ["--teacher", "@tmp/nope"], ["teacher", "no such file or directory"]),
    ("teacher-no-config", {}, ["--teacher", "@tmp"], ["teacher", "without config.json"]),
    ("out-is-a-file", {"f": "x"}, ["--out", "@f"], ["out", "not a directory"]),
    # each of these children also imports torch and transformers and loads the tokenizer: the rest of the data
    # cases run in process, in test_bad_data_file_names_file_and_line
    _data_case("data-empty", "d.jsonl", "", "", "empty"),
    _data_case("data-not-utf8", "d.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', ":2", "UTF-8"),
    _data_case("data-surrogate", "d.jsonl", '{"text": "a\\ud800b"}\n', ":1:", "surrogate"),
    _data_case("gz-truncated", "d.jsonl.gz", _gzip_records()[:1500], ":", "gzip"),
]


FUZZ_TEST = "test_bad_input_is_one_line_and_exit_2"
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64)


@pytest.fixture(scope="module")
def fuzz_runs(request, tmp_path_factory, tiny_teacher, text_data):
    """The child process of every selected fuzz case, a few at a time (most of a child's ~4 s is importing torch
    and transformers): case id -> ((exit code, stdout, stderr), the case's "@name" resolver)."""
    wanted = {item.callspec.id for item in request.session.items if getattr(item, "originalname", "") == FUZZ_TEST}
    shape = _write(tmp_path_factory.mktemp("shape") / "student.json", json.dumps(SHAPE))
    prepared = {}
    for case_id, files, flags, _ in FUZZ:
        if case_id not in wanted:
            continue
        tmp = tmp_path_factory.mktemp(case_id)
        paths = {name: _write(tmp / name, content) for name, content in files.items()}

        def resolve(value, paths=paths, tmp=tmp):
            if not isinstance(value, str):
                return value
            for name in sorted(paths, key=len, reverse=True):
                value = value.replace(f"@{name}", str(paths[name]))
            return value.replace("@tmp", str(tmp))

        good = {"--teacher": tiny_teacher, "--student": shape, "--data": text_data, "--out": tmp / "out"}
        chosen = {**good, **dict(zip(FAST[::2], FAST[1::2])), **dict(zip(flags[::2], map(resolve, flags[1::2])))}
        argv = [item for flag, value in chosen.items() if value is not None for item in (flag, value)]
        prepared[case_id] = (argv, resolve)
    with ThreadPoolExecutor(max_workers=min(4, max(2, os.cpu_count() or 2))) as pool:
        futures = {case_id: pool.submit(_cli, "distill", *argv) for case_id, (argv, _) in prepared.items()}
        return {case_id: (future.result(), prepared[case_id][1]) for case_id, future in futures.items()}


@pytest.mark.parametrize("case_id, fragments", [(case[0], case[3]) for case in FUZZ], ids=[case[0] for case in FUZZ])
def test_bad_input_is_one_line_and_exit_2(fuzz_runs, case_id, fragments):
    (code, _, stderr), resolve = fuzz_runs[case_id]
    _assert_one_line_error(code, stderr, *map(resolve, fragments))


@pytest.mark.parametrize(
    "name, content, where, fragment",
    [
        ("blank.jsonl", "\n  \n\n", "", "the data is empty"),
        ("latin1.jsonl", b'{"text": "ok"}\n' * 3000 + b'{"text": "caf\xe9"}\n', ":3001", "not UTF-8"),  # past a block
        ("list.jsonl", '{"text": "ok"}\n[1, 2]\n', ":2:", "expected a JSON object"),
        ("null.jsonl", "null\n", ":1:", "expected a JSON object"),
        ("prompt.jsonl", '{"prompt": "x"}\n', ":1:", 'expected a key "text"'),
        ("number.jsonl", '{"text": 5}\n', ":1:", '"text" must be a non-empty string'),
        ("deep.jsonl", "[" * 100_000 + "\n", ":1:", "nested too deeply"),
        ("chat.jsonl", '{"messages": [{"role": "assistant", "content": "\\udc00"}]}\n', ":1:", "surrogate"),
        ("plain.jsonl.gz", '{"text": "plain"}\n', ":1:", "corrupt or truncated gzip data"),
        ("checksum.jsonl.gz", _bad_checksum(_gzip_records()), ":801:", "after line 800"),
        ("truncated.jsonl.gz", _gzip_records()[:1500], ":", "corrupt or truncated gzip data"),
        ("empty.jsonl.gz", b"", "", "the data is empty"),
        ("latin1.txt", b"caf\xe9\n", ":1", "not UTF-8"),
    ],
)
def test_bad_data_file_names_file_and_line(tmp_path, name, content, where, fragment):
    from edgedistill.distill.data import load_data

    path = _write(tmp_path / name, content)
    with pytest.raises(EdgeDistillError) as caught:
        load_data([path], make_tokenizer(), seq_len=8)
    message = str(caught.value)
    assert f"{path}{where}" in message and fragment in message and "\n" not in message, message


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_names_device_and_the_accepted_values(tmp_path, tiny_teacher, text_data, tiny_shape):
    code, _, stderr = _cli("distill", "--teacher", tiny_teacher, "--student", tiny_shape, "--data", text_data,
                           "--out", tmp_path / "o", "--device", "cuda", *FAST)  # fmt: skip
    _assert_one_line_error(code, stderr, "device", "'cuda'", "auto or cpu")


# --------------------------------------------------------------------------------------------- settings in process
@pytest.mark.parametrize(
    "cls, text, fragments",
    [
        (TrainConfig, "temperature = inf\n", ["temperature: expected a finite number"]),
        (TrainConfig, "grad_clip = -inf\n", ["grad_clip: expected a finite number"]),
        (TrainConfig, "weight_decay = 2000.0\n", ["weight_decay", "1 / lr"]),
        (TrainConfig, "lr = 10\n", ["lr: expected a positive number no larger than 1"]),
        (TrainConfig, 'data = ["a.jsonl", 3]\n', ["data: expected a list of strings"]),
        (TrainConfig, 'device = "cuda:x"\n', ["device: expected auto, cpu, cuda or cuda:N"]),
        (CacheConfig, 'out = "c"\nval_fraction = nan\n', ["val_fraction: expected a finite number"]),
        (CacheConfig, 'out = "c"\ndevice = "tpu"\n', ["device: expected"]),
        (PipelineConfig, "temperature = nan\n", ["temperature: expected a finite number"]),
        (PipelineConfig, "alpha = nan\n", ["alpha: expected a finite number"]),
        (PipelineConfig, 'students = {a = 1}\n', ["students: expected a list of strings"]),
        (PipelineConfig, 'device = "tpu"\n', ["device: expected auto, cpu, cuda or cuda:N, got 'tpu'"]),
    ],
)
def test_every_config_refuses_non_finite_and_wrong_types_naming_the_file(tmp_path, cls, text, fragments):
    path = _write(tmp_path / "run.toml", text)
    with pytest.raises(EdgeDistillError) as caught:
        cls.from_sources(str(path), {})
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_flags_win_and_are_checked_without_the_file_name(tmp_path):
    path = _write(tmp_path / "run.toml", "lr = 0.01\n")
    with pytest.raises(EdgeDistillError, match=r"^lr: expected a finite number, got nan$"):
        TrainConfig.from_sources(str(path), {"lr": float("nan")})
    with pytest.raises(EdgeDistillError, match="^skew: expected a finite number"):
        TrainConfig(out="x", skew=float("nan"))  # direct construction is checked too
    assert TrainConfig.from_sources(str(path), {"out": "x"}).lr == 0.01


# --------------------------------------------------------------------------------------------- non-finite loss
def test_a_loss_that_becomes_infinite_stops_the_run_and_keeps_the_last_good_checkpoint(
    tmp_path, tiny_teacher, tiny_shape, capsys
):
    """A data trick: tag tokens weighted 1e38 overflow float32 the first time a batch holds one (CE x 1e38 > 3.4e38);
    a seed is picked so that this happens at step 3 or later, after good checkpoints."""
    from transformers import AutoTokenizer

    from edgedistill.distill.data import load_data
    from edgedistill.distill.steps import BatchOrder

    plain = [{"text": f"{line} Example number {i}."} for i in range(20) for line in TRAINING_TEXT]
    data = write_jsonl(tmp_path / "d.jsonl", plain[:40] + [{"text": "so <think>here</think> it is"}] + plain[40:])
    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    train_rows, _, _ = load_data([data], tokenizer, 16, 0.1, 1e38)
    tagged = set(np.nonzero((train_rows.weights[:, 1:] > 1).any(axis=1))[0].tolist())
    assert tagged, "the trick needs a tag in the training split"

    def first_tagged_step(seed):
        order = BatchOrder(train_rows.num_sequences, 4, seed, 1, 0)
        return next(step for step in range(1, 10_000) if tagged & set(order.rows(step - 1)))

    seed, step = next((s, k) for s in range(200) if 3 <= (k := first_tagged_step(s)) <= 12)
    out = tmp_path / "run"
    code = main(["distill", "--teacher", str(tiny_teacher), "--student", str(tiny_shape), "--data", str(data),
                 "--out", str(out), "--tag-weight", "1e38", "--seed", str(seed), "--steps", str(step + 3),
                 "--batch-size", "4", "--seq-len", "16", "--save-every", "1"])  # fmt: skip
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"edgedistill: error: step {step}: the CE loss became non-finite (inf)"), error
    assert f"last good checkpoint, step {step - 1}" in error
    state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == step - 1
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, step)) and all(math.isfinite(r["loss"]) for r in rows)
    assert not (out / "model.safetensors").exists() and not _stray_files(out)


# --------------------------------------------------------------------------------------------- checkpoints are data
class _Planted:
    """Unpickling this calls ``open(marker, "w")``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_checkpoint_is_refused_without_running_its_code(tmp_path, tiny_teacher, text_data, tiny_shape):
    live = tmp_path / "live.pt"
    torch.save({"step": _Planted(tmp_path / "ran-in-sanity-check")}, live)
    torch.load(live, weights_only=False)  # the plant is live: an unrestricted load runs it
    assert (tmp_path / "ran-in-sanity-check").exists()

    out, marker = tmp_path / "run", tmp_path / "PWNED"
    out.mkdir()
    torch.save({"step": 1, "model": _Planted(marker)}, out / "checkpoint.pt")
    code, _, stderr = _cli("distill", "--teacher", tiny_teacher, "--student", tiny_shape, "--data", text_data,
                           "--out", out, "--resume", *FAST)  # fmt: skip
    _assert_one_line_error(code, stderr, out / "checkpoint.pt", "can run code")
    assert not marker.exists()


def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path, tiny_teacher, text_data, tiny_shape, capsys):
    out = tmp_path / "run"
    out.mkdir()
    args = ["distill", "--teacher", str(tiny_teacher), "--student", str(tiny_shape), "--data", str(text_data),
            "--out", str(out), "--resume", *FAST]  # fmt: skip
    for content, fragment in ((b"not a zip at all", "cannot be read"), (None, "no valid 'model'")):
        if content is None:
            torch.save({"step": 1, "model": [1, 2]}, out / "checkpoint.pt")
        else:
            (out / "checkpoint.pt").write_bytes(content)
        assert main(args) == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and f"{out / 'checkpoint.pt'}" in error[0] and fragment in error[0], error


# --------------------------------------------------------------------------------------------- metrics on resume
def test_resume_drops_a_torn_last_metrics_line_and_refuses_a_corrupt_one(
    tmp_path, tiny_teacher, text_data, tiny_shape, capsys
):
    def config(resume):
        paths = dict(out=str(tmp_path / "r"), teacher=str(tiny_teacher), student=str(tiny_shape), data=[str(text_data)])
        return TrainConfig(**paths, steps=8, batch_size=4, seq_len=16, save_every=2, resume=resume)

    def interrupt(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(False), on_step=interrupt, progress=False)
    metrics = tmp_path / "r" / "metrics.jsonl"
    good = metrics.read_text()
    assert len(good.splitlines()) == 5
    lines = good.splitlines(keepends=True)
    metrics.write_text(lines[0] + '{"step": 2, "lo\n' + "".join(lines[2:]))  # damage before the end
    with pytest.raises(EdgeDistillError, match=rf"^{re.escape(str(metrics))}:2: not a metrics row"):
        train(config(True), progress=False)
    metrics.write_text(good + '{"step": 6, "loss": 3.1')  # a kill in the middle of the append
    capsys.readouterr()
    train(config(True), progress=False)
    assert "dropped the incomplete last line 6" in capsys.readouterr().out
    text = metrics.read_text()
    assert text.endswith("\n")
    assert [json.loads(line)["step"] for line in text.splitlines()] == list(range(1, 9))


# --------------------------------------------------------------------------------------------- kill -9 and resume
def test_kill_9_then_resume_loses_at_most_one_checkpoint_interval(tmp_path, tiny_teacher, text_data, tiny_shape):
    out, save_every, steps = tmp_path / "killed", 4, 150
    argv = [sys.executable, "-m", "edgedistill", "distill", "--teacher", str(tiny_teacher), "--student",
            str(tiny_shape), "--data", str(text_data), "--out", str(out), "--steps", str(steps), "--batch-size", "4",
            "--seq-len", "16", "--save-every", str(save_every), "--threads", "1"]  # fmt: skip
    log = open(tmp_path / "first.log", "w")
    child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            # past the first checkpoint, in the middle of an interval
            rows = (out / "metrics.jsonl").read_bytes().count(b"\n") if (out / "metrics.jsonl").exists() else 0
            if (out / "checkpoint.pt").exists() and rows >= save_every + 2:
                break
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
        log.close()
    assert child.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-2000:]
    before = (out / "metrics.jsonl").read_bytes().decode()
    complete = [json.loads(line) for line in before.split("\n")[:-1]]  # a torn last line is cut off by split
    last_logged = complete[-1]["step"]
    checkpoint_step = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]

    # what a kill in the middle of a checkpoint, a metrics rewrite or the final save leaves
    _write(temp_path(out, "checkpoint.pt"), b"half a checkpoint")
    _write(temp_path(out, "metrics.jsonl"), '{"step": 1')
    final = temp_path(out, "final")
    final.mkdir()
    _write(final / "model.safetensors", b"half")
    code, stdout, stderr = _cli(*argv[3:], "--resume")
    assert code == 0, stderr[-2000:]
    summary = json.loads((out / "train_summary.json").read_text())
    resumed_from = summary["train"]["resumed_from"]
    assert resumed_from == checkpoint_step and resumed_from % save_every == 0 and resumed_from >= save_every
    assert last_logged - resumed_from <= save_every, (last_logged, resumed_from)  # at most one interval lost
    text = (out / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    steps_logged = [json.loads(line)["step"] for line in text.splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # every step once: no duplicates, no torn line, no gap
    assert not (out / "checkpoint.pt").exists() and (out / "model.safetensors").exists()
    assert not _stray_files(out), _stray_files(out)  # temporaries of the killed run are swept by the resume


# --------------------------------------------------------------------------------------------- tokenizing in pieces
class _Recording:
    """A tokenizer that records the length of every text it is asked to encode."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []
        self.eos_token_id = tokenizer.eos_token_id
        self.chat_template = tokenizer.chat_template

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self.tokenizer.apply_chat_template(*args, **kwargs)


def _long_text(paragraphs: int) -> str:
    rng = np.random.default_rng(0)
    words = " ".join(TRAINING_TEXT).split() + ["<think>", "</think>", "<answer>", "</answer>", "日本", "é", "42"]
    out = []
    for _ in range(paragraphs):
        line = " ".join(rng.choice(words, size=int(rng.integers(3, 30))))
        out.append(line + rng.choice(["\n", "\n\n", "  \n", "\n\t"]))
    return "".join(out)


def test_a_large_record_is_tokenized_in_bounded_pieces_with_the_same_ids():
    tokenizer = make_tokenizer()
    text = _long_text(8000)  # ~600 KB: ten pieces
    recording = _Recording(tokenizer)
    (doc,) = encode_records([Record("big.jsonl:1", text=text)], recording, tag_weight=10.0)
    assert len(recording.lengths) >= 8 and max(recording.lengths) <= data_module.PIECE_CHARS
    whole = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    assert doc.ids[:-1].tolist() == whole["input_ids"] and doc.ids[-1] == tokenizer.eos_token_id
    offsets = np.asarray(whole["offset_mapping"]).reshape(-1, 2)
    expected = np.ones(len(offsets), np.float32)
    expected[data_module._covering(offsets, data_module._tag_spans(text, data_module.REASONING_TAGS))] = 10.0
    assert np.array_equal(doc.weights[:-1], expected)


def test_small_records_are_one_call_and_pieces_equal_the_whole(monkeypatch):
    tokenizer = make_tokenizer()
    recording = _Recording(tokenizer)
    text = _long_text(40)
    chat = [{"role": "user", "content": _long_text(10)}, {"role": "assistant", "content": _long_text(20)}]
    records = [Record("a:1", text=text), Record("a:2", messages=chat)]
    whole = encode_records(records, recording, tag_weight=10.0)
    assert recording.lengths[0] == len(text)  # one call for the text record, as before pieces existed
    monkeypatch.setattr(data_module, "PIECE_CHARS", 97)  # now every record is cut into ~100-character pieces
    pieces = encode_records(records, tokenizer, tag_weight=10.0)
    for a, b in zip(whole, pieces):
        assert a.ids.tolist() == b.ids.tolist() and np.array_equal(a.weights, b.weights) and a.key == b.key


def test_a_text_without_spaces_is_still_cut():
    assert data_module._pieces("x" * 250, 100) == [(0, 100), (100, 200), (200, 250)]
    assert data_module._pieces("ab\ncd " * 40, 50)[0] == (0, 45)  # after the last newline in the window
