"""Vocabulary trimming (``distill/vocab.py``) against independent computations: lossless round trips, identical
tokenization of the data the vocabulary was trimmed on, the ``--vocab N`` budget and its merge closure (KD through
the map: ``test_vocab_kd.py``), the vocabulary audit, and ``prune`` / ``distill`` / ``export``
end to end on a tiny teacher."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from conftest import SPECIAL, TRAINING_TEXT, make_tokenizer, write_jsonl

from edgedistill.cli import main
from edgedistill.distill.shapes import parameter_count
from edgedistill.distill.vocab import (
    VOCAB_MAP,
    VocabMap,
    check_map,
    choose_vocab,
    mandatory_ids,
    trim_tokenizer,
)
from edgedistill.errors import EdgeDistillError
from edgedistill.export.parity import probe_strings

# A second tokenizer, trained on more text than the data use, so that trimming drops many tokens.
BIG_CORPUS = [
    *TRAINING_TEXT,
    "Une phrase en français, avec des accents : été, garçon, naïve, où, Noël, cœur.",
    "Ein Satz auf Deutsch: Größe, Übung, schön, Straße. Una frase en español: niño, acción, pingüino.",
    "日本語のテキストも少し入れます。中文也有一点，用来测试。한국어 문장도 있습니다.",
    "Emoji 😀👍🏽 and families 👨‍👩‍👧 with flags 🏳️‍🌈 in a sentence.",
    "for i in range(10):\n    print(i ** 2)\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "Numbers 3.14159, 2024-01-15, 1,000,000 and $100 or €9,99 in prose.",
]
# The data every vocabulary here is trimmed on: part of what the tokenizers learned, and chats.
DATA_TEXT = [TRAINING_TEXT[0], TRAINING_TEXT[3], "Numbers: 12 and 345, said the fox."]
DATA_CHATS = [
    [
        {"role": "user", "content": "What does a student learn?"},
        {"role": "assistant", "content": "The teacher's distribution over tokens."},
    ],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Temperature?"},
        {"role": "assistant", "content": "It softens the probabilities."},
    ],
]
ZWJ_EMOJI = ["👨‍👩‍👧‍👦", "🏳️‍🌈", "👩🏽‍💻", "🧑‍🤝‍🧑", "👁️‍🗨️", "❤️‍🔥", "🐻‍❄️", "a👨‍👩‍👧b 🏴‍☠️\n"]
PYTHON_CODE = '''import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Vector:
    """A 2-D vector."""

    x: float = 0.0
    y: float = 0.0

    def norm(self) -> float:
\treturn math.hypot(self.x, self.y)  # tab-indented on purpose


def main(argv: list[str]) -> int:
    values = {k: v ** 2 for k, v in enumerate(argv) if v}
    print(f"{len(values):>8} värden — done\\n", end="")
    return 0 if values else 1
'''
SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
PRUNE_FAST = ["--seq-len", "16", "--calibration", "8", "--probe-rows", "4", "--threads", "1"]
DISTILL_FAST = ["--steps", "2", "--batch-size", "4", "--seq-len", "16", "--threads", "1"]


# ------------------------------------------------------------------------------------------------- helpers
def _data_ids(tokenizer) -> list[list[int]]:
    """Every document of the data as ``tokenizer`` encodes it: the texts, and the chats rendered by its template."""
    docs = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in DATA_TEXT]
    for chat in DATA_CHATS:
        rendered = tokenizer.apply_chat_template(chat, tokenize=False)
        docs.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return docs


def _counts(tokenizer) -> np.ndarray:
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    for ids in _data_ids(tokenizer):
        np.add.at(counts, ids, 1)
    return counts


def _merges(tokenizer) -> dict[str, list[tuple[str, str]]]:
    """Token string -> the merges (left, right) that produce it, read from the tokenizer's own JSON."""
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    producers: dict[str, list[tuple[str, str]]] = {}
    for merge in model["merges"]:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        producers.setdefault(left + right, []).append((left, right))
    return producers


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel.alphabet()


def _required(tokenizer) -> set[int]:
    """What every trimmed vocabulary must hold, computed here: the specials, the 256 byte-level bases and what the
    chat template renders around a conversation."""
    vocab = tokenizer.get_vocab()
    required = {vocab[s] for s in SPECIAL} | {vocab[c] for c in _byte_alphabet()}
    chat = [{"role": r, "content": "x"} for r in ("system", "user", "assistant")]
    rendered = tokenizer.apply_chat_template(chat, tokenize=False)
    prompt = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    for text in (rendered, prompt):
        required |= set(tokenizer(text, add_special_tokens=False)["input_ids"])
    return required


def _random_unicode(count: int, seed: int = 0) -> list[str]:
    """Seeded strings mixing ASCII, accented Latin, Greek, Cyrillic, CJK, kana, Hangul, emoji and whitespace; no
    control characters other than tab and newline, no surrogates."""
    rng = random.Random(seed)
    pools = [
        [chr(c) for c in range(0x20, 0x7F)],
        [chr(c) for c in range(0xC0, 0x17F)],
        [chr(c) for c in range(0x391, 0x3CA) if c != 0x3A2],
        [chr(c) for c in range(0x410, 0x450)],
        [chr(c) for c in range(0x4E00, 0x4E00 + 400)],
        [chr(c) for c in range(0x3041, 0x3097)],
        [chr(c) for c in range(0xAC00, 0xAC00 + 200)],
        [chr(c) for c in range(0x1F600, 0x1F650)] + [chr(c) for c in range(0x1F300, 0x1F380)],
        [" ", "  ", "\n", "\t", "\n\n", " \n"],
        ["\u0301", "\u200d", "\ufe0f", "\u00a0", "\u2014", "\u20ac"],
    ]
    strings = []
    for _ in range(count):
        length = rng.randint(1, 40)
        strings.append("".join(rng.choice(rng.choice(pools)) for _ in range(length)))
    return strings


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def _one_line_error(capsys, code, *fragments) -> str:
    stderr = capsys.readouterr().err
    assert code == 2, stderr
    line = _one_line(stderr)
    assert line.startswith("edgedistill: error:"), stderr
    for fragment in fragments:
        assert fragment in line, line
    return line


# ------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def teachers():
    return {"small": make_tokenizer(), "big": make_tokenizer(600, BIG_CORPUS)}


@pytest.fixture(scope="module")
def trimmed(teachers):
    """name -> (teacher tokenizer, student tokenizer, VocabMap): auto on the data, and the big one to a budget."""
    result = {}
    for name, teacher in teachers.items():
        student, vocab_map = trim_tokenizer(teacher, choose_vocab(teacher, _counts(teacher)))
        result[name] = (teacher, student, vocab_map)
    big = teachers["big"]
    floor = len(choose_vocab(big, np.zeros(len(big), dtype=np.int64)))
    student, vocab_map = trim_tokenizer(big, choose_vocab(big, _counts(big), floor + 20), "renorm")
    result["big-N"] = (big, student, vocab_map)
    return result


def _roundtrip_strings(tokenizer) -> list[str]:
    return [*probe_strings(tokenizer), *_random_unicode(300), *ZWJ_EMOJI, PYTHON_CODE, "", " ", "\n\n\n"]


# ------------------------------------------------------------------------------------------------- 1. round trip
def test_trimming_drops_tokens_and_keeps_the_teachers_order(trimmed):
    for name, (teacher, student, vocab_map) in trimmed.items():
        assert len(student) == vocab_map.size < len(teacher), name
        assert vocab_map.teacher_size == len(teacher)
        assert (np.diff(vocab_map.teacher_ids) > 0).all()
        # specials keep their ids' relative order, and every student token is the teacher's token its map names
        teacher_tokens = {i: t for t, i in teacher.get_vocab().items()}
        for token, index in student.get_vocab().items():
            assert teacher_tokens[int(vocab_map.teacher_ids[index])] == token
        assert [student.convert_tokens_to_ids(s) for s in SPECIAL] == sorted(
            student.convert_tokens_to_ids(s) for s in SPECIAL
        )
        assert student.chat_template == teacher.chat_template
        assert (student.eos_token, student.bos_token, student.pad_token) == (
            teacher.eos_token,
            teacher.bos_token,
            teacher.pad_token,
        )
    big_teacher, _, big_map = trimmed["big"]
    assert len(big_teacher) - big_map.size >= 100  # the big tokenizer's other languages and code are gone
    assert trimmed["big-N"][2].size < big_map.size


@pytest.mark.parametrize("name", ["small", "big", "big-N"])
def test_decode_encode_round_trip(trimmed, name):
    teacher, student, vocab_map = trimmed[name]
    strings = _roundtrip_strings(student)
    assert len(strings) > 500
    failures = []
    for text in strings:
        ids = student(text, add_special_tokens=False)["input_ids"]
        assert all(0 <= i < vocab_map.size for i in ids)
        if student.decode(ids) != text or teacher.decode(vocab_map.teacher_ids[ids].tolist()) != text:
            failures.append(text)
    assert not failures, failures[:5]


@pytest.mark.parametrize("name", ["small", "big", "big-N"])
def test_saved_trimmed_tokenizer_loads_and_gives_the_same_ids(trimmed, name, tmp_path):
    from transformers import AutoTokenizer

    _, student, _ = trimmed[name]
    student.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == student.get_vocab() and len(loaded) == len(student)
    assert loaded.chat_template == student.chat_template
    assert loaded.all_special_ids == student.all_special_ids
    strings = _roundtrip_strings(student)
    assert [loaded(s)["input_ids"] for s in strings] == [student(s)["input_ids"] for s in strings]
    assert loaded.decode(loaded(PYTHON_CODE)["input_ids"]) == PYTHON_CODE
    tokenizer_json = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tokenizer_json["model"]["vocab"]) == len(student)


# ------------------------------------------------------------------------------------------------- 2. the data
@pytest.mark.parametrize("name", ["small", "big"])
def test_the_data_tokenizes_identically(trimmed, name):
    teacher, student, vocab_map = trimmed[name]
    table = vocab_map.to_student
    assert table.shape == (len(teacher),) and (table[vocab_map.teacher_ids] == np.arange(vocab_map.size)).all()
    for teacher_ids, student_ids in zip(_data_ids(teacher), _data_ids(student)):
        assert student_ids == table[teacher_ids].tolist()
        mapped = vocab_map.student_ids(np.asarray(teacher_ids, dtype=np.int32), "the data")
        assert mapped.dtype == np.int32 and mapped.tolist() == student_ids
    for chat in DATA_CHATS:  # the template's own tokenization, and a generation prompt
        assert student.apply_chat_template(chat) == table[teacher.apply_chat_template(chat)].tolist()
        prompt = [teacher.apply_chat_template(chat[:-1], add_generation_prompt=True)]
        assert [student.apply_chat_template(chat[:-1], add_generation_prompt=True)] == table[prompt].tolist()
    # a token outside the data may be dropped: mapping it names where it came from
    dropped = int(np.nonzero(table < 0)[0][0])
    with pytest.raises(EdgeDistillError, match="the held-out data uses teacher token") as err:
        vocab_map.student_ids(np.array([[0, dropped]]), "the held-out data")
    assert str(dropped) in _one_line(str(err.value))


def test_load_data_packs_the_same_tokens(teachers, tmp_path):
    from edgedistill.distill.data import load_data

    teacher = teachers["big"]
    texts = [f"{DATA_TEXT[i % 3]} Example <think>{i}</think>." for i in range(24)]
    chats = [[{"role": "user", "content": f"Question {i}?"}, *DATA_CHATS[i % 2][-1:]] for i in range(6)]
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": t} for t in texts] + [{"messages": c} for c in chats])
    train, heldout, stats = load_data([path], teacher, 8, 0.25)
    # the counts cover every document of both splits: the texts (each ending with EOS) and the rendered chats
    expected = np.zeros(len(teacher), dtype=np.int64)
    for text in texts:
        np.add.at(expected, teacher(text, add_special_tokens=False)["input_ids"] + [teacher.eos_token_id], 1)
    for chat in chats:
        np.add.at(expected, teacher(teacher.apply_chat_template(chat, tokenize=False))["input_ids"], 1)
    assert np.array_equal(stats.token_counts, expected)
    student, vocab_map = trim_tokenizer(teacher, choose_vocab(teacher, stats.token_counts))
    assert vocab_map.size < len(teacher)
    student_train, student_heldout, student_stats = load_data([path], student, 8, 0.25)
    assert heldout.num_sequences > 0 and train.num_sequences > 0
    for ours, theirs in ((student_train, train), (student_heldout, heldout)):
        assert np.array_equal(ours.ids, vocab_map.to_student[theirs.ids])
        assert np.array_equal(ours.weights, theirs.weights)  # chat spans and reasoning tags land alike
    assert np.array_equal(student_stats.token_counts, stats.token_counts[vocab_map.teacher_ids])
    assert student_stats.token_counts.sum() == stats.token_counts.sum()


def test_specials_added_after_training_are_renumbered(tmp_path):
    """Specials and an added token at the end of the teacher's ids (as in Qwen's) move down with the trimmed rows:
    the post-processor's BOS, the config's added tokens and the chat template follow them."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=_byte_alphabet(), show_progress=False)
    backend.train_from_iterator(BIG_CORPUS * 10, trainer=trainer)
    backend.add_special_tokens(SPECIAL)
    backend.add_tokens(["<think>"])
    bos = backend.token_to_id("<|im_start|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B", special_tokens=[("<|im_start|>", bos)]
    )
    from conftest import chatml_tokenizer

    teacher = chatml_tokenizer(backend)
    assert teacher.bos_token_id == len(teacher) - 3
    student, vocab_map = trim_tokenizer(teacher, choose_vocab(teacher, _counts(teacher)))
    assert vocab_map.size < len(teacher) - 50
    assert [student.convert_tokens_to_ids(t) for t in [*SPECIAL, "<think>"]] == list(
        range(vocab_map.size - 4, vocab_map.size)
    )
    assert (student.bos_token_id, student.eos_token_id) == (vocab_map.size - 3, vocab_map.size - 2)
    check_map(teacher, student, vocab_map)
    student.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    table = vocab_map.to_student
    specials = [f"{DATA_TEXT[0]}<|im_end|>{DATA_TEXT[1]}<|endoftext|>", "Hello <think>world</think><|im_end|>\n"]
    for text in [*DATA_TEXT, *specials, PYTHON_CODE]:
        for tokenizer in (student, loaded):
            ids = tokenizer(text)["input_ids"]  # the post-processor's BOS first
            assert ids[0] == student.bos_token_id and tokenizer.decode(ids) == "<|im_start|>" + text
            if text != PYTHON_CODE and "Hello" not in text:  # tokens of the data: the teacher's, renumbered
                assert ids == table[teacher(text)["input_ids"]].tolist(), text
    for chat in DATA_CHATS:
        assert loaded.apply_chat_template(chat) == table[teacher.apply_chat_template(chat)].tolist()
    assert {str(k): v.content for k, v in loaded.added_tokens_decoder.items()} == {
        str(table[teacher.convert_tokens_to_ids(t)]): t for t in [*SPECIAL, "<think>"]
    }


# ------------------------------------------------------------------------------------------------- 3. --vocab N
def test_vocab_n_budget_mandatory_tokens_and_closure(teachers):
    teacher = teachers["big"]
    vocab = teacher.get_vocab()
    tokens = {i: t for t, i in vocab.items()}
    producers = _merges(teacher)
    bases = {vocab[c] for c in _byte_alphabet()}
    counts = _counts(teacher)
    floor = choose_vocab(teacher, np.zeros(len(teacher), dtype=np.int64))  # auto on no data: the mandatory set
    required = _required(teacher)
    assert required <= set(floor.tolist()) and required <= mandatory_ids(teacher)
    everything = choose_vocab(teacher, counts)
    for size in (len(floor), len(floor) + 1, len(floor) + 7, len(floor) + 30, len(everything) + 9, 100_000):
        kept = choose_vocab(teacher, counts, size)
        kept_set = set(kept.tolist())
        assert kept.dtype == np.int64 and (np.diff(kept) > 0).all()
        assert len(kept) <= size and set(floor.tolist()) <= kept_set and required <= kept_set
        # closure: every kept token that is not a base or a special is built by a merge of two kept tokens
        kept_strings = {tokens[i] for i in kept_set}
        for index in kept_set - bases - {vocab[s] for s in SPECIAL}:
            merges = producers.get(tokens[index], [])
            assert any(left in kept_strings and right in kept_strings for left, right in merges), tokens[index]
        # greedy and maximal: no token of the data that was left out could still be added within the budget
        room = size - len(kept)
        for index in np.nonzero(counts)[0].tolist():
            if index not in kept_set:
                assert _closure_cost(index, kept_set, tokens, vocab, producers) > room, tokens[index]
        if size >= len(everything):  # every token of the data, then the products of the teacher's earliest merges
            assert set(everything.tolist()) <= kept_set and len(kept) == min(size, len(teacher))
            in_order = []
            for merge in json.loads(teacher.backend_tokenizer.to_str())["model"]["merges"]:
                left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
                index = vocab[left + right]
                if index not in everything and index not in in_order:
                    in_order.append(index)
            assert kept_set - set(everything.tolist()) == set(in_order[: len(kept) - len(everything)])
    # the most frequent token of the data that is not mandatory comes first
    used = [i for i in np.argsort(-counts, kind="stable").tolist() if counts[i] and i not in set(floor.tolist())]
    cost = _closure_cost(used[0], set(floor.tolist()), tokens, vocab, producers)
    assert used[0] in choose_vocab(teacher, counts, len(floor) + cost)
    for size in (len(floor) - 1, 1):
        with pytest.raises(EdgeDistillError) as err:
            choose_vocab(teacher, counts, size)
        line = _one_line(str(err.value))
        assert line.startswith("vocab:") and f"{size} tokens" in line and str(len(floor)) in line


def _closure_cost(index, kept, tokens, vocab, producers) -> int:
    """How many ids adding ``index`` costs: it and every part of every merge building it (recursively), not kept."""
    seen, stack = set(), [index]
    while stack:
        current = stack.pop()
        if current in kept or current in seen:
            continue
        seen.add(current)
        for left, right in producers.get(tokens[current], []):
            stack += [vocab[left], vocab[right]]
    return len(seen)


# ------------------------------------------------------------------------------------------------- 4. the audit
def test_check_map_and_audit_vocab(trimmed, tmp_path):
    from edgedistill.distill.student import audit_vocab

    teacher, student, vocab_map = trimmed["big"]
    check_map(teacher, student, vocab_map)
    audit = audit_vocab(teacher, len(teacher) + 8, vocab_map.size, student, vocab_map)
    assert audit.tokenizer_size == vocab_map.size and audit.student_rows == vocab_map.size
    # one id shifted into a gap of the map: still ascending, but the wrong token
    ids = vocab_map.teacher_ids.copy()
    index = int(np.nonzero(np.diff(ids) > 1)[0][len(np.nonzero(np.diff(ids) > 1)[0]) // 2])
    ids[index] += 1
    shifted = VocabMap(ids, vocab_map.teacher_size)
    token = student.convert_ids_to_tokens(index)
    for check in (
        lambda: check_map(teacher, student, shifted),
        lambda: audit_vocab(teacher, len(teacher), vocab_map.size, student, shifted),
    ):
        with pytest.raises(EdgeDistillError) as err:
            check()
        line = _one_line(str(err.value))
        assert "vocabulary mismatch" in line and repr(token) in line and str(index) in line
    with pytest.raises(EdgeDistillError, match="output rows"):
        audit_vocab(teacher, len(teacher), vocab_map.size - 1, student, vocab_map)
    with pytest.raises(EdgeDistillError, match="teacher vocabulary"):
        check_map(teacher, student, VocabMap(vocab_map.teacher_ids, vocab_map.teacher_size + 1))
    other_teacher, other_student, _ = trimmed["big-N"]
    with pytest.raises(EdgeDistillError, match="tokens, its map"):
        check_map(other_teacher, other_student, vocab_map)

    # the map's file: a round trip, and a broken one named in one line
    assert vocab_map.save(tmp_path) == tmp_path / VOCAB_MAP
    loaded = VocabMap.load(tmp_path)
    assert np.array_equal(loaded.teacher_ids, vocab_map.teacher_ids)
    assert (loaded.teacher_size, loaded.mode, loaded.with_mode("renorm").mode) == (len(teacher), "tail", "renorm")
    assert VocabMap.load(tmp_path / "nowhere") is None
    for body in (
        "{",
        json.dumps({"teacher_size": 5, "teacher_ids": [0, 2, 2]}),
        json.dumps({"teacher_size": 3, "teacher_ids": [0, 3]}),
        json.dumps({"teacher_size": 5, "teacher_ids": [0, 1], "mode": "bogus"}),
    ):
        (tmp_path / VOCAB_MAP).write_text(body)
        with pytest.raises(EdgeDistillError) as err:
            VocabMap.load(tmp_path)
        assert str(tmp_path / VOCAB_MAP) in _one_line(str(err.value))


# ------------------------------------------------------------------------------------------------- 5. end to end
@pytest.fixture(scope="module")
def pipeline(tiny_teacher, tmp_path_factory):
    """``edgedistill prune TEACHER --vocab auto`` to the teacher's own shape (only rows removed), and a cache."""
    base = tmp_path_factory.mktemp("vocab-e2e")
    records = [{"text": f"{DATA_TEXT[i % 2]} Example {i}."} for i in range(40)]
    records += [{"messages": DATA_CHATS[i % 2]} for i in range(10)]
    data = write_jsonl(base / "data.jsonl", records)
    shape = base / "shape.json"
    shape.write_text(json.dumps(SHAPE))
    derived = base / "derived"
    code = main(
        ["prune", str(tiny_teacher), "--student", str(shape), "--vocab", "auto", "--out", str(derived),
         "--data", str(data), *PRUNE_FAST]
    )  # fmt: skip
    cache = base / "cache"
    cache_code = main(
        ["teacher-cache", "--teacher", str(tiny_teacher), "--data", str(data), "--seq-len", "16", "--top-k", "8",
         "--out", str(cache), "--threads", "1"]
    )  # fmt: skip
    return dict(code=code, cache_code=cache_code, data=data, shape=shape, derived=derived, cache=cache, base=base)


def test_prune_vocab_auto_keeps_only_the_kept_rows(pipeline, tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert pipeline["code"] == 0
    derived = pipeline["derived"]
    vocab_map = VocabMap.load(derived)
    teacher_tokenizer = AutoTokenizer.from_pretrained(tiny_teacher)
    student_tokenizer = AutoTokenizer.from_pretrained(derived)
    model = AutoModelForCausalLM.from_pretrained(derived).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    assert vocab_map is not None and vocab_map.teacher_size == len(teacher_tokenizer)
    assert vocab_map.size < len(teacher_tokenizer)
    assert not np.array_equal(vocab_map.teacher_ids, np.arange(vocab_map.size))  # rows dropped inside, not a prefix
    tokenizer_json = json.loads((derived / "tokenizer.json").read_text(encoding="utf-8"))
    assert len(tokenizer_json["model"]["vocab"]) == model.config.vocab_size == vocab_map.size == len(student_tokenizer)
    check_map(teacher_tokenizer, student_tokenizer, vocab_map)
    assert model.config.eos_token_id == student_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.config.bos_token_id == student_tokenizer.convert_tokens_to_ids("<|im_start|>")
    record = json.loads((derived / "prune.json").read_text())
    assert record["vocab"] == {"size": vocab_map.size, "teacher_size": len(teacher_tokenizer)}
    rows = torch.from_numpy(vocab_map.teacher_ids)
    assert torch.equal(model.model.embed_tokens.weight, teacher.model.embed_tokens.weight[rows])

    # the same network on the kept rows: its logits are the teacher's, restricted to them
    text = DATA_TEXT[0] + " " + DATA_TEXT[1]
    teacher_ids = torch.tensor([teacher_tokenizer(text)["input_ids"]])
    student_ids = torch.tensor([student_tokenizer(text)["input_ids"]])
    assert torch.equal(student_ids, torch.from_numpy(vocab_map.to_student)[teacher_ids])
    with torch.no_grad():
        expected = teacher(teacher_ids).logits[..., rows]
        got = model(student_ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_derive_with_vocab_rows_probes_and_slices_the_kept_rows():
    """``prune.derive(..., vocab_rows=...)``: candidates sized and probed on the trimmed vocabulary (the probe's
    teacher cut to the kept rows), the chosen slice keeps exactly those embedding rows and reads its own ids."""
    from conftest import make_llama

    from edgedistill.distill import prune
    from edgedistill.distill.config import StudentShape

    vocab = 320
    # frozen, as teacher.load_model leaves every model it loads (the test below checks one that is not)
    model = make_llama(vocab, seed=3, hidden=64, layers=3, heads=4, kv_heads=2, ffn=128).requires_grad_(False)
    gen = torch.Generator().manual_seed(2)
    kept = torch.cat([torch.arange(3), 3 + torch.randperm(vocab - 3, generator=gen)[:150].sort().values])
    kept = kept.sort().values
    table = torch.full((vocab,), -1, dtype=torch.long)
    table[kept] = torch.arange(len(kept))

    def rows(count, seed):
        picks = torch.randint(0, len(kept), (count, 17), generator=torch.Generator().manual_seed(seed))
        return kept[picks]  # teacher ids of kept tokens

    target = parameter_count(StudentShape(32, 2, 2, 1, 64, head_dim=16), len(kept))
    settings = prune.PruneSettings(candidates=3, probe_top=2, probe_steps=2, batch_size=4, tolerance=0.1)
    probe = rows(4, 2)
    derivation = prune.derive(model, target, rows(4, 1), probe, settings, vocab_rows=kept)
    student = derivation.student.eval()
    assert student.config.vocab_size == len(kept)
    assert (student.config.bos_token_id, student.config.eos_token_id) == (1, 2)
    record = derivation.record
    assert len([c for c in record["candidates"] if c["probe_loss"] is not None]) == 2
    assert all(math.isfinite(c["probe_loss"]) for c in record["candidates"] if c["probe_loss"] is not None)
    for candidate in record["candidates"]:
        assert abs(candidate["parameters"] / target - 1) <= 0.1
    assert record["chosen"]["parameters"] == sum(p.numel() for p in student.parameters())
    hidden = torch.tensor(derivation.plan.hidden)
    assert torch.equal(student.model.embed_tokens.weight, model.model.embed_tokens.weight[kept][:, hidden])
    with torch.no_grad():  # the chosen slice's zero-shot loss, on the probe rows in its own ids
        student_probe = table[probe]
        logits = student(student_probe[:, :-1]).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, len(kept)), student_probe[:, 1:].reshape(-1))
    assert ce.item() == pytest.approx(record["chosen"]["zero_shot_loss"], abs=1e-4)
    dropped = int(torch.nonzero(table < 0)[0])
    bad_probe = probe.clone()
    bad_probe[0, 3] = dropped
    with pytest.raises(EdgeDistillError, match="dropped"):
        prune.derive(model, target, rows(4, 1), bad_probe, settings, vocab_rows=kept)


def test_probe_distill_with_vocab_rows_and_a_teacher_that_requires_grad():
    from conftest import make_llama

    from edgedistill.distill import prune

    teacher = make_llama(320, seed=4)  # parameters require grad, as test_prune's derive tests pass them
    kept = torch.arange(0, 320, 2)
    student = make_llama(len(kept), seed=5, hidden=32, heads=2, kv_heads=1, ffn=64)
    ids = kept[torch.randint(0, len(kept), (4, 9), generator=torch.Generator().manual_seed(0))]
    prune.probe_distill(student, teacher, ids, 2, 4, 1e-3, torch.float32, vocab_rows=kept)


def _summary(out):
    summary = json.loads((out / "train_summary.json").read_text())
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, metrics


def _check_trimmed_run(out, vocab_map, kd_mode="tail"):
    from transformers import AutoModelForCausalLM

    summary, metrics = _summary(out)
    trimmed = summary["vocab"]["trimmed"]
    assert trimmed == {"size": vocab_map.size, "teacher_size": vocab_map.teacher_size, "kd": kd_mode}
    assert math.isfinite(summary["heldout"]["bits_per_byte"]) and summary["heldout"]["bits_per_byte"] > 0
    saved = VocabMap.load(out)
    assert saved is not None and np.array_equal(saved.teacher_ids, vocab_map.teacher_ids)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == vocab_map.size
    assert all(math.isfinite(row["loss"]) for row in metrics)
    return summary, metrics


def test_distill_a_trimmed_checkpoint_online_and_from_a_cache(pipeline, tiny_teacher, capsys):
    assert pipeline["code"] == pipeline["cache_code"] == 0
    derived, data, base = pipeline["derived"], pipeline["data"], pipeline["base"]
    vocab_map = VocabMap.load(derived)
    common = ["--student", str(derived), "--data", str(data), *DISTILL_FAST]

    online = base / "online"
    assert main(["distill", "--teacher", str(tiny_teacher), "--out", str(online), *common]) == 0, capsys.readouterr()
    _, metrics = _check_trimmed_run(online, vocab_map)
    # the student starts as the teacher's kept rows, and the online teacher is cut to them: no divergence at all
    assert metrics[0]["kd"] == pytest.approx(0.0, abs=1e-6)

    for mode in ("tail", "renorm"):
        cached = base / f"cached-{mode}"
        argv = ["distill", "--teacher-cache", str(pipeline["cache"]), "--out", str(cached), "--vocab-kd", mode]
        assert main([*argv, *common]) == 0, capsys.readouterr().err
        summary, metrics = _check_trimmed_run(cached, vocab_map, mode)
        assert summary["teacher"]["top_k"] == 8
        assert 0 <= metrics[0]["kd"] < 0.05  # only the dropped tokens' share of the buckets differs at the start


def test_distill_vocab_auto_from_scratch_and_vocab_n_online(pipeline, tiny_teacher, capsys):
    assert pipeline["code"] == 0
    data, shape, base = pipeline["data"], pipeline["shape"], pipeline["base"]
    vocab_map = VocabMap.load(pipeline["derived"])
    common = ["--teacher", str(tiny_teacher), "--student", str(shape), "--data", str(data), *DISTILL_FAST]
    scratch = base / "scratch"
    assert main(["distill", "--vocab", "auto", "--init", "random", "--out", str(scratch), *common]) == 0
    summary, _ = _check_trimmed_run(scratch, vocab_map)  # the same data: the same vocabulary as prune's
    assert summary["student"]["shape"]["vocab_size"] == vocab_map.size
    # --init teacher (the teacher's shape): its kept embedding rows and layers, so no divergence at the first step
    copied = base / "copied"
    assert main(["distill", "--vocab", "auto", "--init", "teacher", "--out", str(copied), *common]) == 0
    _, metrics = _check_trimmed_run(copied, vocab_map)
    assert metrics[0]["kd"] == pytest.approx(0.0, abs=1e-6)

    # N below what the data use: the data are tokenized again by the student's tokenizer (an online teacher)
    size = vocab_map.size - 12
    narrow = base / "narrow"
    assert main(["distill", "--vocab", str(size), "--out", str(narrow), *common]) == 0, capsys.readouterr().err
    summary, _ = _summary(narrow)
    assert summary["vocab"]["trimmed"]["size"] <= size and (narrow / VOCAB_MAP).is_file()
    assert math.isfinite(summary["heldout"]["bits_per_byte"])
    # ... which a teacher cache (positions of the teacher's tokens) cannot serve
    capsys.readouterr()
    code = main(
        ["distill", "--teacher-cache", str(pipeline["cache"]), "--vocab", str(size), "--student", str(shape),
         "--data", str(data), "--out", str(base / "no"), *DISTILL_FAST]
    )  # fmt: skip
    _one_line_error(capsys, code, "vocabulary", "cannot use a teacher cache")
    assert not (base / "no" / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------- 6. export
def test_trimmed_checkpoint_exports_with_parity(pipeline, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("optimum.onnxruntime")
    from export_helpers import read_manifest, run_export
    from transformers import AutoTokenizer

    assert pipeline["code"] == 0
    derived = pipeline["derived"]
    probes = probe_strings(AutoTokenizer.from_pretrained(derived))
    for fmt, quant in (("gguf", "q8_0"), ("onnx", "int8")):
        out = tmp_path / fmt
        assert run_export(fmt, str(derived), "--quant", quant, "--out", str(out), "--threads", "1") == 0
        (record,) = read_manifest(out)["artifacts"]
        assert record["format"] == fmt and record["quantization"] == quant
        parity = record["parity"]
        assert record["passed"] and parity["passed"], parity["failures"]
        assert parity["tokenizer_matches"] == parity["tokenizer_total"] == len(probes)
        assert parity["max_logit_diff"] <= parity["thresholds"]["max_logit_diff"]
        assert parity["top1_agreement"] >= parity["thresholds"]["min_top1"] and parity["positions"] > 0


# ------------------------------------------------------------------------------------------------- 7. bad values
@pytest.mark.parametrize("value", ["-3", "lots", "0", "2.5"])
def test_bad_vocab_values_exit_2_with_one_line(value, tiny_teacher, tiny_shape, tmp_path, capsys):
    out = str(tmp_path / "out")
    distill = ["distill", "--teacher", str(tiny_teacher), "--student", str(tiny_shape), "--out", out]
    _one_line_error(capsys, main([*distill, f"--vocab={value}"]), "vocab", repr(value))
    prune_argv = ["prune", str(tiny_teacher), "--student", str(tiny_shape), "--out", out, f"--vocab={value}"]
    _one_line_error(capsys, main(prune_argv), "vocab", repr(value))
    assert not (tmp_path / "out").exists()


def test_bad_vocab_kd_and_a_budget_below_the_mandatory_tokens(tiny_teacher, tiny_shape, text_data, tmp_path, capsys):
    base = ["distill", "--teacher", str(tiny_teacher), "--student", str(tiny_shape), "--data", str(text_data)]
    _one_line_error(capsys, main([*base, "--out", str(tmp_path / "a"), "--vocab-kd", "drop"]), "vocab_kd", "drop")
    code = main([*base, "--out", str(tmp_path / "b"), "--vocab", "100", *DISTILL_FAST])
    _one_line_error(capsys, code, "vocab: 100 tokens cannot hold")
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
