"""Held-out quality: reading data, windows, perplexity and agreement against hand computations."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest

from edgedistill.bench.quality import agreement, evaluate, read_texts, retention, token_windows, window_scores
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


def test_agreement_and_retention():
    assert agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    with pytest.raises(ValueError):
        agreement(np.array([1]), np.array([1, 2]))
    assert retention(10.0, 12.5) == pytest.approx(0.8)


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
