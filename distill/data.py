"""Training data: read text, chat and reasoning-chat files, tokenize, weight, split off a held-out set, pack.

Formats, one record per line for ``.jsonl`` (optionally ``.gz``):

- ``{"text": "..."}``: pretraining text (MiniMind's format); every token is supervised, an EOS token ends it.
- ``{"conversations": [{"role": ..., "content": ...}, ...]}`` or ``{"messages": [...]}``: a chat, rendered with the
  tokenizer's chat template; only the assistant turns (through their end-of-turn token) are supervised.
- a reasoning chat is a chat whose assistant turns carry ``<think>…</think>`` and ``<answer>…</answer>``.

``.txt`` files are plain text; each blank-line-separated paragraph is a document.

Every token carries a *label weight*: 0 (not supervised), 1, or ``tag_weight`` for the tokens that make up a
reasoning tag. Tags are found as whole strings in the text and mapped through the tokenizer's offsets to the
tokens that spell them *in context*, so the tag is matched as the token sequence it really became (which may
differ from the tag tokenized on its own) and a ``<`` or ``think`` elsewhere is never up-weighted — the seed's
``torch.isin`` over the tags' token ids up-weights every such piece (FACTS.md).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.errors import EdgeDistillError

REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
CHAT_ROLES = ("system", "user", "assistant", "tool")
DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "default.jsonl.gz"
# The default teacher's answers to general-English requests (corpus/build_chat.py); the default data is both files.
CHAT_CORPUS = Path(__file__).parent / "corpus" / "chat.jsonl.gz"
# English prose written for this project, outside the corpus's domain: quality on text no student was trained on.
OUTSIDE_TEXT = Path(__file__).parent / "corpus" / "outside.jsonl"
# Longer texts are tokenized in pieces of at most this many characters, cut between words (see _pieces): a fast
# tokenizer's encoding of one 50 MB record (ids, offsets, token strings, Python lists) peaked at 8.8 GB RSS.
PIECE_CHARS = 1 << 16
_SURROGATE = re.compile(r"[\ud800-\udfff]")  # JSON "\\ud800" decodes to a str that no tokenizer can encode


@dataclass
class Record:
    """One parsed record: ``text`` for plain text, ``messages`` for a chat."""

    where: str  # "file:line"
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    end_with_eos: bool = True  # a jsonl text record is a whole document; a .txt paragraph is not


@dataclass
class Document:
    ids: np.ndarray  # [n] int32
    weights: np.ndarray  # [n] float32, weight of predicting this token
    key: str  # what the held-out split hashes


@dataclass
class PackedData:
    """Packed sequences: row i holds ``seq_len + 1`` tokens; inputs are ``[:, :-1]``, labels ``[:, 1:]``."""

    ids: np.ndarray  # [S, seq_len + 1] int32
    weights: np.ndarray  # [S, seq_len + 1] float32; column 0 is never a label

    @property
    def num_sequences(self) -> int:
        return int(self.ids.shape[0])

    @property
    def supervised_tokens(self) -> int:
        return int((self.weights[:, 1:] > 0).sum())


def subsample(packed: PackedData, tokens: int, seq_len: int) -> PackedData:
    """At most ``tokens`` tokens of ``packed`` (0: all), as evenly spaced sequences: a budget-limited run sees the
    whole corpus's variety instead of its first documents. Deterministic, so a teacher cache and a run agree."""
    rows = -(-tokens // seq_len)
    if tokens <= 0 or rows >= packed.num_sequences:
        return packed
    keep = np.linspace(0, packed.num_sequences - 1, rows).round().astype(np.int64)
    return PackedData(packed.ids[keep], packed.weights[keep])


@dataclass
class DataStats:
    files: list[str]
    records: int = 0
    bad_lines: int = 0
    bad_examples: list[str] = field(default_factory=list)
    train_tokens: int = 0
    heldout_tokens: int = 0
    tag_tokens: int = 0
    sha256: str = ""
    # occurrences of each token id in every document of the files (both splits, before any budget): what a trimmed
    # vocabulary keeps (``vocab.choose_vocab``)
    token_counts: np.ndarray | None = field(default=None, repr=False)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _format(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s != ".gz"]
    return suffixes[-1] if suffixes else ""


def decode_json_line(line: str) -> Any:
    """One JSON Lines record, or ValueError("invalid JSON (...)") saying what is wrong and at which column."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None


def _parse_json_line(line: str) -> Record:
    obj = decode_json_line(line)
    if not isinstance(obj, dict):
        raise ValueError(f'expected a JSON object with "text", "conversations" or "messages", got {type(obj).__name__}')
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise ValueError('"text" must be a non-empty string')
        if _SURROGATE.search(obj["text"]):
            raise ValueError('"text" holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff), not a character')
        return Record("", text=obj["text"])
    key = "conversations" if "conversations" in obj else "messages" if "messages" in obj else None
    if key is None:
        raise ValueError(f'expected a key "text", "conversations" or "messages", got {sorted(obj)[:5]}')
    messages = obj[key]
    if not isinstance(messages, list) or not messages:
        raise ValueError(f'"{key}" must be a non-empty list of messages')
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f'"{key}"[{index}] must be an object with a string "content"')
        if message.get("role") not in CHAT_ROLES:
            raise ValueError(
                f'"{key}"[{index}].role must be one of {", ".join(CHAT_ROLES)}, got {message.get("role")!r}'
            )
        if _SURROGATE.search(message["content"]):
            raise ValueError(f'"{key}"[{index}].content holds an unpaired UTF-16 surrogate escape, not a character')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f'"{key}" has no assistant message, so nothing to learn from')
    return Record("", messages=[{"role": m["role"], "content": m["content"]} for m in messages])


def read_records(path: Path, stats: DataStats, skip_bad_lines: bool) -> Iterator[Record]:
    """Parse one data file. A malformed line raises an error naming file and line, or is counted and skipped."""
    kind = _format(path)
    if kind not in (".jsonl", ".txt"):
        raise EdgeDistillError(f"{path}: unsupported data file (expected .jsonl or .txt, optionally .gz)")
    number = 0  # the last line read, for errors the reader raises between lines
    try:
        with _open_text(path) as handle:
            if kind == ".txt":
                paragraph_start, lines = 1, []
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        if not lines:
                            paragraph_start = number
                        lines.append(line)
                    elif lines:
                        yield Record(f"{path}:{paragraph_start}", text="".join(lines) + "\n", end_with_eos=False)
                        lines = []
                if lines:
                    yield Record(f"{path}:{paragraph_start}", text="".join(lines) + "\n", end_with_eos=False)
                return
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = _parse_json_line(line)
                except ValueError as err:
                    if not skip_bad_lines:
                        raise EdgeDistillError(
                            f"{path}:{number}: {err} (use --skip-bad-lines to skip such lines)"
                        ) from None
                    stats.bad_lines += 1
                    if len(stats.bad_examples) < 5:
                        stats.bad_examples.append(f"{path}:{number}: {err}")
                    continue
                record.where = f"{path}:{number}"
                yield record
    except UnicodeDecodeError:
        raise EdgeDistillError(f"{path}:{_first_undecodable_line(path)}: not UTF-8 text") from None
    except (gzip.BadGzipFile, zlib.error, EOFError) as err:
        # decompression runs ahead of the lines handed out, so the line is where reading stopped, not the damage
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise EdgeDistillError(
            f"{path}:{number + 1}: corrupt or truncated gzip data after line {number} ({detail})"
        ) from None
    except OSError as err:
        raise EdgeDistillError(f"{path}: cannot read ({err.strerror or type(err).__name__})") from None


def _first_undecodable_line(path: Path) -> str:
    """The number of the first line of ``path`` that is not UTF-8 (the text reader decodes whole blocks, so its
    error does not say which line), or ``?`` when the file cannot be read again."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return str(number)
    except (OSError, EOFError, zlib.error):
        pass
    return "?"


def _tag_spans(text: str, tags: tuple[str, ...]) -> list[tuple[int, int]]:
    spans = []
    for tag in tags:
        start = text.find(tag)
        while start != -1:
            spans.append((start, start + len(tag)))
            start = text.find(tag, start + len(tag))
    return spans


def _covering(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Tokens whose character range overlaps any span. ``offsets``: [n, 2] -> bool [n].

    A token [a, b) overlaps a span [s, e) when s < b and e > a. Overlapping spans are merged, so that the spans
    starting before b have increasing ends and the last of them decides: O((n + m) log m) for m spans, where a
    test of every span against every token took minutes for a large record full of reasoning tags."""
    if not spans:
        return np.zeros(len(offsets), dtype=bool)
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    starts, ends = np.asarray(merged, dtype=np.int64).T
    last = np.searchsorted(starts, offsets[:, 1], side="left") - 1  # the last span starting before b
    return (last >= 0) & (ends[np.maximum(last, 0)] > offsets[:, 0])


def _render_chat(tokenizer: Any, record: Record) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (through end-of-turn)."""
    messages = record.messages or []
    if not getattr(tokenizer, "chat_template", None):
        raise EdgeDistillError(
            f"{record.where}: a chat record needs a chat template, and the teacher's tokenizer has none"
        )
    try:
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
            if not (full.startswith(through) and through.startswith(before)):
                raise ValueError(
                    "the chat template does not render this conversation's turns as prefixes of each other"
                )
            spans.append((len(before), len(through)))
    except Exception as err:  # jinja raises TemplateError subclasses for templates that reject a conversation
        raise EdgeDistillError(f"{record.where}: cannot render the conversation ({err})") from None
    return full, spans


def _cut(text: str, start: int, end: int) -> int:
    """Where to end the piece that starts at ``start`` and may reach ``end``: after a newline, else before a space,
    with a non-space character on either side, in the second half of the range; ``end`` when there is none.

    A byte-level BPE pre-tokenizer (GPT-2's and Llama 3's regexes, SmolLM2's) always ends a pre-token after such a
    newline and starts one at such a space, and merges never cross pre-tokens, so the pieces' ids concatenate to
    the ids of the whole text. Tokenizers that add a prefix to each input (SentencePiece's ``▁``) may differ at a cut.
    """
    floor = start + (end - start) // 2
    for separator, cut_after in (("\n", 1), (" ", 0)):
        position = text.rfind(separator, floor, end)
        while position > floor:
            if not text[position - 1].isspace() and position + 1 < len(text) and not text[position + 1].isspace():
                return position + cut_after
            position = text.rfind(separator, floor, position)
    return end


def _pieces(text: str, limit: int = 0) -> list[tuple[int, int]]:
    """(start, end) character ranges of at most ``limit`` (default :data:`PIECE_CHARS`) characters that cover
    ``text``: one for a short text."""
    limit = max(2, limit or PIECE_CHARS)
    pieces, start = [], 0
    while len(text) - start > limit:
        end = _cut(text, start, start + limit)
        pieces.append((start, end))
        start = end
    pieces.append((start, len(text)))
    return pieces


def tokenize(tokenizer: Any, text: str, offsets: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ids of ``text`` ([n] int32) and, with ``offsets``, each token's character range ([n, 2] int64; else
    [0, 2]), tokenized in pieces of at most :data:`PIECE_CHARS` characters so that memory stays bounded."""
    ids_parts, offset_parts = [], []
    for start, end in _pieces(text):
        encoding = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=offsets)
        ids_parts.append(np.asarray(encoding["input_ids"], dtype=np.int32))
        if offsets:
            offset_parts.append(np.asarray(encoding["offset_mapping"], dtype=np.int64).reshape(-1, 2) + start)
    ids = ids_parts[0] if len(ids_parts) == 1 else np.concatenate(ids_parts)
    if not offsets:
        return ids, np.zeros((0, 2), np.int64)
    return ids, offset_parts[0] if len(offset_parts) == 1 else np.concatenate(offset_parts)


def encode_records(records: list[Record], tokenizer: Any, tag_weight: float) -> list[Document]:
    """Tokenize records into documents with label weights (see the module docstring)."""
    eos = tokenizer.eos_token_id
    documents = []
    for record in records:
        if record.messages is not None:
            text, supervised_spans = _render_chat(tokenizer, record)
            separator: list[int] = []
        else:
            text, supervised_spans = record.text or "", None
            separator = [eos] if eos is not None and record.end_with_eos else []
        tags = _tag_spans(text, REASONING_TAGS) if tag_weight != 1.0 else []
        need_offsets = supervised_spans is not None or bool(tags)
        ids, offsets = tokenize(tokenizer, text, need_offsets)
        if supervised_spans is None:
            weights = np.ones(len(ids), dtype=np.float32)
        else:
            weights = _covering(offsets, supervised_spans).astype(np.float32)
        if tags:
            weights[_covering(offsets, tags) & (weights > 0)] = tag_weight
        if separator:
            ids = np.concatenate([ids, np.asarray(separator, dtype=np.int32)])
            weights = np.concatenate([weights, np.ones(len(separator), dtype=np.float32)])
        if len(ids):
            documents.append(Document(ids, weights, key=text))
    return documents


def pack(documents: list[Document], seq_len: int) -> PackedData:
    """Concatenate documents and cut ``seq_len + 1``-token rows with stride ``seq_len``: every token after the
    first is a label exactly once."""
    if not documents:
        return PackedData(np.zeros((0, seq_len + 1), np.int32), np.zeros((0, seq_len + 1), np.float32))
    ids = np.concatenate([d.ids for d in documents])
    weights = np.concatenate([d.weights for d in documents])
    rows = (len(ids) - 1) // seq_len
    index = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return PackedData(ids[index], weights[index])


def _is_heldout(key: str, fraction: float) -> bool:
    """A stable, content-based split: the same document is held out whatever files come with it."""
    digest = hashlib.sha1(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def load_eval_data(files: list[str | Path], tokenizer: Any, seq_len: int, max_tokens: int = 0) -> PackedData:
    """Every record of ``files`` packed for evaluation only (no split, nothing trained on): text outside the
    training data, such as the embedded :data:`OUTSIDE_TEXT`. ``max_tokens`` (0: all) as ``heldout_tokens``."""
    stats = DataStats(files=[str(f) for f in files])
    records: list[Record] = []
    for path in map(Path, files):
        if not path.is_file():
            raise EdgeDistillError(f"{path}: no such evaluation file")
        records.extend(read_records(path, stats, False))
    packed = pack(encode_records(records, tokenizer, 1.0), seq_len)
    if packed.num_sequences == 0:
        raise EdgeDistillError(
            f"eval data: {', '.join(stats.files)} holds fewer than {seq_len + 1} tokens, too few for one sequence"
        )
    return subsample(packed, max_tokens, seq_len)


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """[len(tokenizer)] int64: the UTF-8 bytes each token id stands for (special tokens 0), for bits per byte.
    Read from the fast tokenizer's vocabulary as the runtime reads it (:class:`~edgedistill.token_pieces.TokenPieces`),
    so that training-side and runtime-side bits per byte divide by the same bytes."""
    import json

    from edgedistill.token_pieces import TokenPieces

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EdgeDistillError("bits per byte: needs a fast (tokenizers) tokenizer")
    pieces = TokenPieces(backend, json.loads(backend.to_str()))
    lengths = np.array([len(pieces(i)) for i in range(len(tokenizer))], dtype=np.int64)
    special = [i for i in tokenizer.all_special_ids if 0 <= i < len(lengths)]
    lengths[special] = 0
    return lengths


def load_data(
    files: list[str | Path],
    tokenizer: Any,
    seq_len: int,
    val_fraction: float = 0.1,
    tag_weight: float = 10.0,
    skip_bad_lines: bool = False,
    train_tokens: int = 0,
    heldout_tokens: int = 0,
) -> tuple[PackedData, PackedData, DataStats]:
    """Read, tokenize, split and pack ``files`` (the embedded corpus and chat answers when empty) into train and
    held-out data; ``train_tokens`` / ``heldout_tokens`` (0: all) keep that many tokens of a split in evenly spaced
    sequences."""
    paths = [Path(f) for f in files] or [DEFAULT_CORPUS, CHAT_CORPUS]
    stats = DataStats(files=[str(p) for p in paths])
    records: list[Record] = []
    for path in paths:
        if not path.is_file():
            raise EdgeDistillError(f"{path}: no such data file")
        records.extend(read_records(path, stats, skip_bad_lines))
    stats.records = len(records)
    if not records:
        raise EdgeDistillError(f"no usable records in {', '.join(stats.files)}: the data is empty")
    documents = encode_records(records, tokenizer, tag_weight)
    stats.token_counts = np.bincount(np.concatenate([d.ids for d in documents]), minlength=len(tokenizer))
    train_docs = [d for d in documents if not _is_heldout(d.key, val_fraction)]
    heldout_docs = [d for d in documents if _is_heldout(d.key, val_fraction)]
    train, heldout = pack(train_docs, seq_len), pack(heldout_docs, seq_len)
    if heldout.num_sequences == 0 or train.num_sequences == 0:
        # Too few documents for a document-level split: hold out the tail of the token stream instead.
        everything = pack(documents, seq_len)
        cut = int(round(everything.num_sequences * (1 - val_fraction)))
        if everything.num_sequences < 2 or cut == everything.num_sequences:
            total = sum(len(d.ids) for d in documents)
            raise EdgeDistillError(
                f"data: {total} tokens in {', '.join(stats.files)}, too few for a training and a held-out "
                f"sequence of --seq-len {seq_len} (need at least {2 * seq_len + 2})"
            )
        train = PackedData(everything.ids[:cut], everything.weights[:cut])
        heldout = PackedData(everything.ids[cut:], everything.weights[cut:])
    train, heldout = subsample(train, train_tokens, seq_len), subsample(heldout, heldout_tokens, seq_len)
    if train.supervised_tokens == 0:
        raise EdgeDistillError(f"data: no supervised tokens in {', '.join(stats.files)}")
    stats.train_tokens = train.supervised_tokens
    stats.heldout_tokens = heldout.supervised_tokens
    stats.tag_tokens = int((train.weights[:, 1:] > 1).sum())
    digest = hashlib.sha256()
    for array in (train.ids, train.weights, heldout.ids, heldout.weights):
        digest.update(np.ascontiguousarray(array).tobytes())
    stats.sha256 = digest.hexdigest()
    return train, heldout, stats
