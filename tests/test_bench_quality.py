"""Held-out quality: reading data, windows, perplexity, bits per byte, top-1 accuracy, agreement, retention and the
accuracy ratio against hand computations."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from edgedistill.bench import worker
from edgedistill.bench.harness import _add_retention
from edgedistill.bench.quality import (
    DEFINITIONS,
    accuracy_ratio,
    agreement,
    evaluate,
    read_texts,
    retention,
    token_windows,
    window_scores,
)
from edgedistill.errors import EdgeDistillError


def test_read_texts_from_jsonl_txt_and_gzip(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"text": "one"})
        + "\n\n"
        + json.dumps({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
        + "\n"
    )
    (tmp_path / "b.txt").write_text("plain text")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as handle:
        handle.write(json.dumps({"text": "zipped"}) + "\n")
    texts = read_texts([tmp_path / "a.jsonl", tmp_path / "b.txt", tmp_path / "c.jsonl.gz"])
    assert texts == ["one", "hi\nyo", "plain text", "zipped"]


def test_bad_data_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": 3}) + "\n")
    with pytest.raises(EdgeDistillError, match=r"bad.jsonl:2: expected an object"):
        read_texts([bad])
    with pytest.raises(EdgeDistillError, match="no such file"):
        read_texts([tmp_path / "missing.jsonl"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(EdgeDistillError, match=".jsonl or .txt"):
        read_texts([tmp_path / "x.csv"])


def test_windows_are_cut_from_the_concatenated_tokens():
    windows = token_windows(lambda text: [int(c) for c in text], ["0123", "4567", "89"], max_tokens=9, window=4)
    assert windows == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the ninth token alone cannot be scored and is dropped


def test_uniform_logits_have_the_vocabulary_as_perplexity():
    vocab = 50
    result = evaluate(lambda ids: np.zeros((len(ids), vocab), dtype=np.float32), [[1, 2, 3, 4], [5, 6]])
    assert result["tokens"] == 4
    assert result["perplexity"] == pytest.approx(vocab)


def test_window_scores_against_a_hand_computed_softmax():
    logits = np.array([[2.0, 0.0, 0.0], [0.0, 3.0, 1.0], [9.0, 9.0, 9.0]], dtype=np.float32)
    nll, count, argmax = window_scores(logits, [0, 0, 2])
    expected = -math.log(math.exp(2) / (math.exp(2) + 2)) - math.log(math.exp(1) / (1 + math.exp(3) + math.exp(1)))
    assert (count, argmax.tolist()) == (2, [0, 1])
    assert nll == pytest.approx(expected)


def test_agreement_retention_and_accuracy_ratio():
    assert agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError):
        agreement(np.array([1]), np.array([1, 2]))
    # retention = teacher bits per byte / student bits per byte: 1.013 / 1.52
    assert retention(1.013, 1.52) == pytest.approx(0.666447, abs=1e-6)
    assert retention(1.2, 1.2) == 1.0
    for teacher, student in ((None, 1.5), (1.0, None), (1.0, 0.0), (math.nan, 1.5), (1.0, math.inf)):
        assert math.isnan(retention(teacher, student)), (teacher, student)
    # accuracy ratio = student top-1 accuracy / teacher top-1 accuracy
    assert accuracy_ratio(0.3, 0.4) == pytest.approx(0.75)
    assert math.isnan(accuracy_ratio(0.3, 0.0)) and math.isnan(accuracy_ratio(None, 0.4))
    assert "bits per byte" in DEFINITIONS["retention"] and "perplexity" not in DEFINITIONS["retention"]
    assert "actual next token" in DEFINITIONS["top1_accuracy"] and "accuracy_ratio" in DEFINITIONS


def test_top1_accuracy_against_the_actual_next_tokens():
    """A fixed logits function: every position predicts token (id + 1) % 5. Position i is right where
    ids[i + 1] == ids[i] + 1; a window's first token is context only, and its last position predicts nothing."""

    def logits(ids):
        out = np.zeros((len(ids), 5), dtype=np.float32)
        out[np.arange(len(ids)), (np.asarray(ids) + 1) % 5] = 4.0
        return out

    windows = [[0, 1, 2, 4], [3, 4, 0], [2, 2]]
    # window 1: 0->1 yes, 1->2 yes, 2->4 no; window 2: 3->4 yes, 4->0 yes; window 3: 2->2 no
    result = evaluate(logits, windows)
    assert result["tokens"] == 6
    assert result["top1_accuracy"] == pytest.approx(4 / 6)
    assert result["argmax"].tolist() == [1, 2, 3, 4, 0, 3]
    # the NLL agrees: a right guess costs -log(e^4 / (e^4 + 4)), a wrong one -log(1 / (e^4 + 4))
    right, wrong = -math.log(math.exp(4) / (math.exp(4) + 4)), math.log(math.exp(4) + 4)
    assert result["nll"] == pytest.approx((4 * right + 2 * wrong) / 6)
    uniform = evaluate(lambda ids: np.zeros((len(ids), 5)), [[3, 0, 0]])  # ties: argmax is token 0
    assert uniform["top1_accuracy"] == pytest.approx(1.0)


def _rows(teacher: dict, *students: dict) -> list[dict]:
    rows = [{"label": "teacher", "role": "teacher", "quality": dict(teacher, retention=None, accuracy_ratio=None)}]
    rows += [
        {"label": f"s{i}", "role": "student", "quality": dict(q, retention=None, accuracy_ratio=None)}
        for i, q in enumerate(students)
    ]
    return rows


def test_retention_and_accuracy_ratio_are_set_against_the_teacher_row():
    teacher = {"perplexity": 10.0, "bits_per_byte": 1.013, "top1_accuracy": 0.40, "agreement": None}
    same = {"perplexity": 14.0, "bits_per_byte": 1.52, "top1_accuracy": 0.30, "agreement": 0.7}
    # another tokenizer: no agreement, but bits per byte does not depend on the tokenizer, so retention is measured
    other = {
        "perplexity": 30.0,
        "bits_per_byte": 2.026,
        "top1_accuracy": 0.20,
        "agreement": None,
        "agreement_note": "not measured: the teacher tokenizes the held-out text differently",
    }
    rows = _rows(teacher, same, other)
    _add_retention(rows)
    assert rows[1]["quality"]["retention"] == pytest.approx(1.013 / 1.52)
    assert rows[1]["quality"]["accuracy_ratio"] == pytest.approx(0.75)
    assert rows[2]["quality"]["retention"] == pytest.approx(0.5)
    assert rows[2]["quality"]["accuracy_ratio"] == pytest.approx(0.5)
    for row in rows[1:]:
        assert "retention_note" not in row["quality"] and "accuracy_ratio_note" not in row["quality"]
    assert rows[0]["quality"]["retention"] is None and "accuracy ratio" in rows[0]["quality"]["reference"]


def test_retention_and_accuracy_ratio_are_noted_as_not_measured_only_without_their_inputs():
    teacher = {"perplexity": 10.0, "bits_per_byte": 1.0, "top1_accuracy": 0.4}
    no_bytes = {"perplexity": 10.5, "top1_accuracy": 0.38}  # e.g. the PyTorch reference: no byte map
    rows = _rows(teacher, no_bytes)
    _add_retention(rows)
    quality = rows[1]["quality"]
    assert quality["retention"] is None and quality["accuracy_ratio"] == pytest.approx(0.95)
    assert quality["retention_note"].startswith("not measured: no bits per byte for the student (")
    rows = _rows({"perplexity": 10.0, "top1_accuracy": 0.4}, {"perplexity": 11.0, "top1_accuracy": 0.0})
    _add_retention(rows)
    assert "for the student and the teacher" in rows[1]["quality"]["retention_note"]
    rows = _rows({"perplexity": 10.0, "top1_accuracy": 0.4}, {"perplexity": 11.0, "bits_per_byte": 1.1})
    _add_retention(rows)
    assert "for the teacher" in rows[1]["quality"]["retention_note"]
    assert rows[1]["quality"]["accuracy_ratio"] is None  # the student has no top-1 accuracy
    assert rows[1]["quality"]["accuracy_ratio_note"] == "not measured: no top-1 accuracy for the student"
    rows = _rows({"bits_per_byte": 8.0, "top1_accuracy": 0.0}, {"bits_per_byte": 8.0, "top1_accuracy": 0.0})
    _add_retention(rows)  # an untrained teacher that never ranks the next token first
    assert rows[1]["quality"]["retention"] == 1.0 and rows[1]["quality"]["accuracy_ratio"] is None
    assert rows[1]["quality"]["accuracy_ratio_note"] == "not measured: the teacher's top-1 accuracy is 0"
    student = {"perplexity": 10.0, "bits_per_byte": 1.0, "top1_accuracy": 0.4}
    rows = [{"label": "s", "role": "student", "quality": dict(student, retention=None)}]
    _add_retention(rows)  # no teacher row: nothing to measure against, nothing noted
    assert rows[0]["quality"]["retention"] is None and "retention_note" not in rows[0]["quality"]


class _FakeModel:
    """The worker's view of a backend: a character tokenizer, one byte per token, logits predicting id + 1."""

    context = 64

    def tokenize(self, text, special):
        return [ord(c) - ord("a") for c in text]

    def logits(self, ids):
        out = np.zeros((len(ids), 26), dtype=np.float32)
        out[np.arange(len(ids)), (np.asarray(ids) + 1) % 26] = 3.0
        return out

    def token_bytes(self, token):
        return chr(ord("a") + token).encode()


def test_the_worker_passes_top1_accuracy_and_bits_per_byte_on(tmp_path):
    texts = tmp_path / "texts.json"
    # one stream, a b c d z a b d: a->b, b->c, c->d, z->a, a->b right; d->z, b->d wrong
    texts.write_text(json.dumps(["abcdz", "abd"]))
    spec = {"quality": {"texts": str(texts), "window": 8, "max_tokens": 100}}
    out = worker._quality(_FakeModel(), spec)
    assert out["tokens"] == 7 and out["bytes"] == 7
    assert out["top1_accuracy"] == pytest.approx(5 / 7)
    assert out["bits_per_byte"] == pytest.approx(out["nll"] * 7 / math.log(2) / 7)


def test_bits_per_byte_against_a_hand_computation():
    """Uniform logits over 50 tokens cost log2(50) bits per scored token; the scored tokens (not a window's first,
    context-only token) stand for 1, 2 or 0 (special) bytes."""
    vocab = 50
    pieces = {1: b"a", 2: "é".encode(), 3: b"", 4: b"xy", 5: b"q", 6: b"rs"}
    result = evaluate(
        lambda ids: np.zeros((len(ids), vocab), dtype=np.float32), [[1, 2, 3, 4], [5, 6]], pieces.__getitem__
    )
    scored_bytes = 2 + 0 + 2 + 2  # 2, 3, 4 of the first window; 6 of the second
    assert result["bytes"] == scored_bytes
    assert result["bits_per_byte"] == pytest.approx(4 * math.log2(vocab) / scored_bytes)
    assert "bits_per_byte" not in evaluate(lambda ids: np.zeros((len(ids), vocab)), [[1, 2]])  # no byte map given
