"""Data reading, chat masks, reasoning-tag weights, splitting and packing."""

import gzip
import json

import numpy as np
import pytest
from conftest import make_tokenizer, write_jsonl

from edgedistill.distill.data import (
    CHAT_CORPUS,
    DEFAULT_CORPUS,
    OUTSIDE_TEXT,
    DataStats,
    Record,
    encode_records,
    load_data,
    pack,
    read_records,
)
from edgedistill.errors import EdgeDistillError


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _pieces(tokenizer, doc, selector):
    return [tokenizer.decode([int(i)]) for i, w in zip(doc.ids, doc.weights) if selector(w)]


def test_text_records_are_fully_supervised_and_end_with_eos(tokenizer):
    (doc,) = encode_records([Record("x.jsonl:1", text="hello world")], tokenizer, tag_weight=10)
    assert doc.ids[-1] == tokenizer.eos_token_id
    assert np.all(doc.weights == 1)
    assert tokenizer.decode(doc.ids[:-1].tolist()) == "hello world"


def test_chat_supervises_assistant_turns_only(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is two plus two"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "and three"},
        {"role": "assistant", "content": "three"},
    ]
    (doc,) = encode_records([Record("c.jsonl:1", messages=messages)], tokenizer, tag_weight=10)
    supervised = "".join(_pieces(tokenizer, doc, lambda w: w > 0))
    assert supervised == "four<|im_end|>\nthree<|im_end|>\n"
    unsupervised = "".join(_pieces(tokenizer, doc, lambda w: w == 0))
    assert "what is two plus two" in unsupervised and "be brief" in unsupervised and "four" not in unsupervised


def test_reasoning_tags_weighted_exactly_on_tag_spans(tokenizer):
    answer = "<think>if a < b then b > a</think>\n<answer>b<a is false</answer>"
    messages = [{"role": "user", "content": "is b<a? use <think>"}, {"role": "assistant", "content": answer}]
    (doc,) = encode_records([Record("r.jsonl:1", messages=messages)], tokenizer, tag_weight=7.0)
    text = tokenizer.decode(doc.ids.tolist())
    # Rebuild the character extent of every up-weighted token and check it covers the four tags and nothing else.
    position, weighted = 0, []
    for token, weight in zip(doc.ids, doc.weights):
        piece = tokenizer.decode([int(token)])
        if weight == 7.0:
            weighted.append((position, position + len(piece)))
        position += len(piece)
    assert set(np.unique(doc.weights)) <= {0.0, 1.0, 7.0}
    covered = "".join(text[a:b] for a, b in weighted)
    for tag in ("<think>", "</think>", "<answer>", "</answer>"):
        assert tag in covered
    # Every up-weighted token overlaps a tag in the assistant turn; the '<' of "a < b" and "b<a" are never weighted.
    start = text.index(answer)
    tag_spans = [
        (start + answer.index(t), start + answer.index(t) + len(t))
        for t in ("<think>", "</think>", "<answer>", "</answer>")
    ]
    for a, b in weighted:
        assert any(a < te and b > ts for ts, te in tag_spans), text[a:b]
    lone = start + answer.index(" < b")
    assert all(not (a <= lone + 1 < b) for a, b in weighted)
    # The user's "<think>" is in the prompt: not supervised, so not weighted.
    user_tag = text.index("use <think>") + 4
    assert all(not (a <= user_tag < b) for a, b in weighted)


def test_tag_weight_one_means_plain_supervision(tokenizer):
    (doc,) = encode_records([Record("t.jsonl:1", text="<think>x</think>")], tokenizer, tag_weight=1.0)
    assert np.all(doc.weights == 1)


def test_pack_uses_every_label_once():
    from edgedistill.distill.data import Document

    docs = [
        Document(np.arange(10, dtype=np.int32), np.ones(10, np.float32), "a"),
        Document(np.arange(10, 17, dtype=np.int32), np.ones(7, np.float32), "b"),
    ]
    packed = pack(docs, seq_len=4)
    assert packed.ids.shape == (4, 5)
    labels = packed.ids[:, 1:].reshape(-1).tolist()
    assert labels == list(range(1, 17))
    assert packed.ids[1, 0] == packed.ids[0, -1]


def test_load_data_splits_documents_apart(tokenizer, text_data):
    train, heldout, stats = load_data([text_data], tokenizer, seq_len=16, val_fraction=0.2)
    assert train.num_sequences > 0 and heldout.num_sequences > 0
    assert stats.train_tokens == train.supervised_tokens and stats.heldout_tokens == heldout.supervised_tokens
    assert len(stats.sha256) == 64
    # same inputs, same split and hash
    assert load_data([text_data], tokenizer, seq_len=16, val_fraction=0.2)[2].sha256 == stats.sha256


def test_txt_paragraphs(tokenizer, tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("\n".join(f"Paragraph {i} of a book.\nIt has two lines.\n" for i in range(40)))
    records = list(read_records(path, DataStats([str(path)]), skip_bad_lines=False))
    assert len(records) == 40 and records[0].where == f"{path}:1" and records[1].where == f"{path}:4"
    assert records[0].text == "Paragraph 0 of a book.\nIt has two lines.\n\n" and not records[0].end_with_eos
    train, heldout, _ = load_data([path], tokenizer, seq_len=8)
    assert train.num_sequences and heldout.num_sequences


def test_gzip_jsonl(tokenizer, tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for i in range(40):
            handle.write(json.dumps({"text": f"document {i} says hello"}) + "\n")
    train, _, stats = load_data([path], tokenizer, seq_len=8)
    assert stats.records == 40 and train.num_sequences > 0


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"prompt": "x"}', 'expected a key "text", "conversations" or "messages"'),
        ('{"text": ""}', '"text" must be a non-empty string'),
        ('{"messages": [{"role": "robot", "content": "hi"}]}', "role must be one of"),
        ('{"conversations": [{"role": "user", "content": "hi"}]}', "no assistant message"),
        ('{"messages": [{"role": "user"}]}', 'string "content"'),
    ],
)
def test_malformed_line_names_file_and_line(tokenizer, tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"text": "also fine"}, line])
    with pytest.raises(EdgeDistillError) as caught:
        load_data([path], tokenizer, seq_len=4)
    assert f"{path}:3:" in str(caught.value) and message in str(caught.value)


def test_skip_bad_lines_counts(tokenizer, tmp_path):
    records = [{"text": f"good line number {i}"} for i in range(30)] + ["{broken", '{"nope": 1}']
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    _, _, stats = load_data([path], tokenizer, seq_len=8, skip_bad_lines=True)
    assert stats.bad_lines == 2 and stats.records == 30 and f"{path}:31" in stats.bad_examples[0]


def test_empty_and_missing_data(tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(EdgeDistillError, match="empty"):
        load_data([empty], tokenizer, seq_len=8)
    with pytest.raises(EdgeDistillError, match="no such data file"):
        load_data([tmp_path / "missing.jsonl"], tokenizer, seq_len=8)
    with pytest.raises(EdgeDistillError, match="unsupported data file"):
        load_data([_touch(tmp_path / "x.csv")], tokenizer, 8)
    tiny = write_jsonl(tmp_path / "tiny.jsonl", [{"text": "hi"}])
    with pytest.raises(EdgeDistillError, match="too few"):
        load_data([tiny], tokenizer, seq_len=64)


def _touch(path):
    path.write_text("a,b\n")
    return path


def test_embedded_corpus_is_shipped():
    assert DEFAULT_CORPUS.is_file()
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as handle:
        first = json.loads(handle.readline())
    assert isinstance(first["text"], str) and len(first["text"]) > 100
    assert (DEFAULT_CORPUS.parent / "LICENSE-PSF.txt").is_file() and (DEFAULT_CORPUS.parent / "README.md").is_file()


def _shingles(text, n=8):
    words = text.lower().split()
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_chat_corpus_is_conversations_and_never_quotes_the_outside_text():
    stats = DataStats(files=[str(CHAT_CORPUS)])
    records = list(read_records(CHAT_CORPUS, stats, skip_bad_lines=False))
    assert len(records) >= 300 and all(r.messages and r.messages[-1]["role"] == "assistant" for r in records)
    outside = set()
    for line in OUTSIDE_TEXT.read_text(encoding="utf-8").splitlines():
        outside |= _shingles(json.loads(line)["text"])
    trained = set()
    for record in records:
        for message in record.messages:
            trained |= _shingles(message["content"])
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as handle:
        for line in handle:
            trained |= _shingles(json.loads(line)["text"])
    assert len(outside) > 3000 and not outside & trained  # no 8-word run of the outside text is trained on


def test_token_budget_keeps_evenly_spaced_sequences(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i} " * 40} for i in range(60)])
    train, heldout, _ = load_data([path], tokenizer, 16)
    small, small_heldout, stats = load_data([path], tokenizer, 16, train_tokens=80, heldout_tokens=16)
    assert small.num_sequences == 5 and small_heldout.num_sequences == 1
    spread = np.linspace(0, train.num_sequences - 1, 5).round().astype(int)  # first to last, evenly
    assert np.array_equal(small.ids, train.ids[spread]) and np.array_equal(small.weights, train.weights[spread])
    assert stats.train_tokens == small.supervised_tokens
    again, _, again_stats = load_data([path], tokenizer, 16, train_tokens=80, heldout_tokens=16)
    assert np.array_equal(again.ids, small.ids) and again_stats.sha256 == stats.sha256
    everything, _, _ = load_data([path], tokenizer, 16, train_tokens=10**9)
    assert everything.num_sequences == train.num_sequences
