"""Held-out quality through the runtime's own logits: perplexity, bits per byte, top-1 accuracy against the text,
top-1 agreement with a teacher, retention.

Definitions (written into every report):

* perplexity = exp(mean negative log-likelihood of each next token), over windows of ``window`` tokens cut from
  the held-out texts (each text tokenized as the model tokenizes a prompt, texts concatenated, at most ``max_tokens``
  tokens); the first token of a window is context only.
* top-1 agreement = share of predicted positions where the student's most likely next token equals the teacher's,
  over the same token ids (it needs a shared tokenizer; otherwise it is not measured).
* bits per byte = the same negative log-likelihood summed over the scored positions, in bits, divided by the UTF-8
  bytes those positions' tokens stand for (the runtime's ``token_bytes``; special tokens count 0 bytes). Unlike
  perplexity it does not depend on the tokenizer, so models with different vocabularies compare on it.
* top-1 accuracy = share of scored positions where the model's most likely next token is the text's actual next
  token (position ``i`` against ``ids[i + 1]``), each model over its own tokens.
* retention = teacher bits per byte / student bits per byte (1.0 = as good as the teacher). Bits per byte does not
  depend on the tokenizer, so retention is measured whatever each model's tokenizer; it is not measured only where
  bits per byte is missing for the student or the teacher.
* accuracy ratio = student top-1 accuracy / teacher top-1 accuracy (1.0 = as accurate as the teacher).
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.errors import EdgeDistillError

DEFINITIONS = {
    "perplexity": "exp(mean next-token negative log-likelihood) over held-out windows, through the runtime's logits",
    "bits_per_byte": "summed next-token negative log-likelihood in bits / UTF-8 bytes of the scored tokens "
    "(tokenizer-independent)",
    "top1_accuracy": "share of scored positions where the model's argmax next token is the text's actual next token "
    "(each model over its own tokens)",
    "agreement": "share of positions where the student's argmax next token equals the teacher's (same token ids)",
    "retention": "teacher bits per byte / student bits per byte (1.0 = as good as the teacher; tokenizer-independent, "
    "so measured also for a student that tokenizes differently; not measured where either lacks bits per byte)",
    "accuracy_ratio": "student top-1 accuracy / teacher top-1 accuracy (1.0 = as accurate as the teacher)",
}


def read_texts(paths: Iterable[Path]) -> list[str]:
    """Texts from ``.jsonl`` (``{"text": ...}`` or ``{"conversations": [{"role", "content"}, ...]}`` per line) or
    ``.txt`` files, optionally gzipped.

    Raises:
        EdgeDistillError: a missing file, or a line that is not such an object (named by file and line).
    """
    texts: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise EdgeDistillError(f"data: {path}: no such file")
        opener = gzip.open if path.suffix == ".gz" else open
        stem = path.name.removesuffix(".gz")
        try:
            with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
                if stem.endswith(".jsonl"):
                    for number, line in enumerate(handle, 1):
                        if line.strip():
                            texts.append(_record_text(line, f"{path}:{number}"))
                elif stem.endswith(".txt"):
                    text = handle.read()
                    if text.strip():
                        texts.append(text)
                else:
                    raise EdgeDistillError(f"data: {path}: expected a .jsonl or .txt file (optionally .gz)")
        except (OSError, UnicodeDecodeError) as err:
            raise EdgeDistillError(f"data: {path}: cannot be read ({err})") from None
    if not texts:
        raise EdgeDistillError("data: the files hold no text")
    return texts


def _record_text(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise EdgeDistillError(f"{where}: not JSON ({err.msg})") from None
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    turns = record.get("conversations") if isinstance(record, dict) else None
    if isinstance(turns, list) and all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in turns):
        return "\n".join(t["content"] for t in turns)
    raise EdgeDistillError(f'{where}: expected an object with "text" (string) or "conversations" (list of turns)')


def token_windows(tokenize: Any, texts: Sequence[str], max_tokens: int, window: int) -> list[list[int]]:
    """Cut the texts' tokens into windows.

    Args:
        tokenize: ``text -> token ids`` (the model's, with its special tokens).
        texts: the held-out texts, in order.
        max_tokens: stop after this many tokens in total.
        window: tokens per window (the last window may be shorter; one shorter than 2 tokens is dropped).
    """
    if window < 2 or max_tokens < 2:
        raise EdgeDistillError(f"quality: window ({window}) and max tokens ({max_tokens}) must be at least 2")
    stream: list[int] = []
    for text in texts:
        stream.extend(int(i) for i in tokenize(text))
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    windows = [stream[i : i + window] for i in range(0, len(stream), window)]
    return [w for w in windows if len(w) >= 2]


def window_scores(logits: np.ndarray, ids: Sequence[int]) -> tuple[float, int, np.ndarray]:
    """Negative log-likelihood sum, positions scored and argmax predictions of one window.

    Args:
        logits: float ``[n, vocab]``, the logits at every position of ``ids``.
        ids: the ``n`` token ids.

    Returns:
        ``(nll_sum, n - 1, argmax[n - 1])``: position ``i`` predicts ``ids[i + 1]``.
    """
    scores = np.asarray(logits[:-1], dtype=np.float64)
    targets = np.asarray(ids[1:], dtype=np.int64)
    top = scores.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(scores - top).sum(axis=-1)) + top[:, 0]
    nll = log_norm - scores[np.arange(len(targets)), targets]
    return float(nll.sum()), len(targets), scores.argmax(axis=-1).astype(np.int32)


def evaluate(
    logits_fn: Any, windows: Sequence[Sequence[int]], token_bytes: Callable[[int], bytes] | None = None
) -> dict[str, Any]:
    """Perplexity over ``windows`` with ``logits_fn(ids) -> [n, vocab]``; also the argmax predictions, top-1 accuracy
    (share of scored positions whose argmax is the actual next token ``ids[i + 1]``), and bits per byte when
    ``token_bytes(id)`` gives each token's bytes (the first token of a window is context, not scored)."""
    total = 0.0
    count = 0
    correct = 0
    predictions = []
    for ids in windows:
        nll, scored, argmax = window_scores(logits_fn(ids), ids)
        total += nll
        count += scored
        correct += int(np.count_nonzero(argmax == np.asarray(ids[1:], dtype=np.int64)))
        predictions.append(argmax)
    if count == 0:
        raise EdgeDistillError("quality: no held-out positions to score")
    result = {
        "nll": total / count,
        "perplexity": math.exp(total / count),
        "tokens": count,
        "top1_accuracy": correct / count,
        "argmax": np.concatenate(predictions) if predictions else np.zeros(0, dtype=np.int32),
    }
    if token_bytes is not None:
        scored_bytes = sum(len(token_bytes(int(t))) for ids in windows for t in ids[1:])
        result["bytes"] = scored_bytes
        result["bits_per_byte"] = total / math.log(2) / scored_bytes if scored_bytes else math.nan
    return result


def agreement(student_argmax: np.ndarray, teacher_argmax: np.ndarray) -> float:
    """Share of positions where the two predictions agree.

    Raises:
        ValueError: predictions of different lengths (they must come from the same token ids).
    """
    if len(student_argmax) != len(teacher_argmax) or len(student_argmax) == 0:
        raise ValueError(f"predictions: lengths {len(student_argmax)} and {len(teacher_argmax)} must match and be > 0")
    return float(np.mean(np.asarray(student_argmax) == np.asarray(teacher_argmax)))


def _ratio(numerator: float | None, denominator: float | None) -> float:
    if numerator is None or denominator is None or not math.isfinite(numerator) or not 0 < denominator < math.inf:
        return math.nan
    return numerator / denominator


def retention(teacher_bits_per_byte: float | None, student_bits_per_byte: float | None) -> float:
    """Teacher bits per byte / student bits per byte (NaN when either is missing or the student's is not > 0)."""
    return _ratio(teacher_bits_per_byte, student_bits_per_byte)


def accuracy_ratio(student_top1_accuracy: float | None, teacher_top1_accuracy: float | None) -> float:
    """Student top-1 accuracy / teacher top-1 accuracy (NaN when either is missing or the teacher's is 0)."""
    return _ratio(student_top1_accuracy, teacher_top1_accuracy)
