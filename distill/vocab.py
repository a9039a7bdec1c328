"""A vocabulary cut to the student's size: lossless trimming of a byte-level BPE tokenizer, and the map that carries
distillation, export and evaluation across it.

**What is kept** (:func:`choose_vocab`): every added/special token, the 256 byte-level base tokens (so that any text
still encodes: it only takes more tokens), the tokens the chat template renders, and the tokens the data uses
(``auto``) or the ``N`` most frequent of them; then the set is **closed under the merges** that build its tokens:
for every kept token, every merge whose result it is keeps both of its parts. A merge survives when its two parts
and its result are all kept, in the teacher's order.

Why the data tokenizes identically: BPE applies, at each step, the lowest-ranked merge among the adjacent pairs.
Every merge that fires while the teacher encodes the data produces a token that is either a final token of the data
(kept) or a part of a later merge (kept by the closure), so that merge is kept; the trimmed tokenizer's merges are
a subset in the same order, so at each step the merge the teacher would apply is still the lowest available one.
Text outside the data encodes exactly too (decode(encode(x)) == x): the base bytes are all there.

**The map** (:class:`VocabMap`, ``vocab_map.json`` beside the checkpoint): student id -> teacher id, ascending, so
specials keep their relative order. Training data is tokenized by the teacher's tokenizer (as the teacher cache is)
and mapped into the student's ids; the teacher's distributions are mapped into the student's vocabulary by
:func:`map_teacher_signal`: a cached top-K loses its dropped ids into the tail bucket (``tail``) or drops them and
renormalises (``renorm``); a dense online teacher's head is cut to the kept rows, which renormalises.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.distill.config import KD_MODES
from edgedistill.errors import EdgeDistillError
from edgedistill.token_pieces import byte_level_alphabet

VOCAB_MAP = "vocab_map.json"
# ---------------------------------------------------------------------------------------------------- the map
@dataclass(frozen=True)
class VocabMap:
    """Student id ``s`` is the teacher's id ``teacher_ids[s]`` (ascending); ``teacher_size``: the teacher tokenizer's
    size; ``mode``: what becomes of a cached teacher's probability on dropped ids (:data:`KD_MODES`)."""

    teacher_ids: np.ndarray
    teacher_size: int
    mode: str = "tail"

    @property
    def size(self) -> int:
        return int(self.teacher_ids.shape[0])

    @property
    def to_student(self) -> np.ndarray:
        """[teacher_size] int64: the student id of each teacher id, -1 where dropped."""
        table = np.full(self.teacher_size, -1, dtype=np.int64)
        table[self.teacher_ids] = np.arange(self.size, dtype=np.int64)
        return table

    def student_ids(self, ids: np.ndarray, where: str) -> np.ndarray:
        """Teacher ids -> student ids; a dropped id raises naming ``where`` (the data it came from)."""
        mapped = self.to_student[ids]
        if (mapped < 0).any():
            missing = int(np.asarray(ids)[mapped < 0].reshape(-1)[0])
            raise EdgeDistillError(
                f"vocabulary: {where} uses teacher token {missing}, which the student's trimmed vocabulary dropped "
                "(trim it on these data: --vocab auto)"
            )
        return mapped.astype(np.asarray(ids).dtype, copy=False)

    def save(self, directory: Path) -> Path:
        """Write ``vocab_map.json`` into ``directory`` (a staging directory: the caller publishes it)."""
        path = Path(directory) / VOCAB_MAP
        body = {"teacher_size": self.teacher_size, "mode": self.mode, "teacher_ids": self.teacher_ids.tolist()}
        path.write_text(json.dumps(body) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, directory: Path) -> VocabMap | None:
        """The map of a checkpoint directory, or None where it has the teacher's full vocabulary."""
        path = Path(directory) / VOCAB_MAP
        if not path.is_file():
            return None
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            ids = np.asarray(body["teacher_ids"], dtype=np.int64)
            size = int(body["teacher_size"])
            mode = str(body.get("mode", "tail"))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise EdgeDistillError(f"{path}: unreadable vocabulary map ({type(err).__name__}: {err})") from None
        if ids.ndim != 1 or len(ids) == 0 or (np.diff(ids) <= 0).any() or ids[0] < 0 or ids[-1] >= size:
            raise EdgeDistillError(f"{path}: teacher_ids must be ascending ids below teacher_size {size}")
        if mode not in KD_MODES:
            raise EdgeDistillError(f"{path}: mode: expected one of {', '.join(KD_MODES)}, got {mode!r}")
        return cls(ids, size, mode)

    def with_mode(self, mode: str) -> VocabMap:
        return VocabMap(self.teacher_ids, self.teacher_size, mode)


# ---------------------------------------------------------------------------------------------------- choosing
def to_student_ids(ids: Any, vocab: list[int], teacher_size: int, where: str) -> Any:
    """Teacher token ids (a torch tensor) in the ids of a student keeping the rows ``vocab``, on the same device, as
    :meth:`VocabMap.student_ids` maps them: a dropped id stops with an error naming ``where``."""
    import torch

    mapped = VocabMap(np.asarray(vocab), teacher_size).student_ids(ids.cpu().numpy(), where)
    return torch.from_numpy(mapped).to(ids.device)


def _spec(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise EdgeDistillError("vocab: trimming needs a fast (tokenizers) tokenizer")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or '"ByteLevel"' not in json.dumps(spec.get("pre_tokenizer")):
        raise EdgeDistillError(
            f"vocab: trimming supports byte-level BPE tokenizers only (this one is {model.get('type')} with "
            f"pre-tokenizer {(spec.get('pre_tokenizer') or {}).get('type')})"
        )
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise EdgeDistillError("vocab: trimming does not support BPE dropout or subword prefixes/suffixes")
    return spec


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def mandatory_ids(tokenizer: Any) -> set[int]:
    """What every student keeps: added (special) tokens, the byte-level alphabet and the chat template's tokens."""
    vocab = tokenizer.get_vocab()
    keep = {int(i) for i in (tokenizer.added_tokens_decoder or {})}
    # a base the teacher lacks (SmolLM2 has no token for 0xC0, 0xC1, 0xF5-0xFF, bytes UTF-8 never uses) it cannot
    # encode either: the student encodes exactly what the teacher can
    keep.update(vocab[char] for char in byte_level_alphabet() if char in vocab)
    if getattr(tokenizer, "chat_template", None):
        conversation = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"},
        ]
        for messages in (conversation, conversation[1:]):
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
                prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            except Exception:  # a template that needs other roles: the data's own chats bring their tokens
                continue
            for rendered in (text, prompt):
                keep.update(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return keep


def choose_vocab(tokenizer: Any, counts: np.ndarray, size: int = 0) -> np.ndarray:
    """The teacher ids a student keeps (ascending): :func:`mandatory_ids`, then the tokens with ``counts > 0``
    (``size`` 0: ``auto``) or the most frequent of them while the closed set stays within ``size``, then, while
    room is left under ``size``, the products of the teacher's earliest merges; all closed under merges. A
    ``size`` at least ``auto``'s keeps every token of the data, so the data tokenize identically."""
    spec = _spec(tokenizer)
    vocab: dict[str, int] = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    producers: dict[str, list[tuple[str, str]]] = {}
    for left, right in _merge_pairs(spec["model"]):
        producers.setdefault(left + right, []).append((left, right))
    kept: set[int] = set()

    def close(token_id: int) -> list[int]:
        """``token_id`` and what building it needs, as ids not yet kept."""
        new, stack = [], [token_id]
        seen = set()
        while stack:
            current = stack.pop()
            if current in kept or current in seen:
                continue
            seen.add(current)
            new.append(current)
            for left, right in producers.get(by_id.get(current, ""), ()):
                stack.extend(vocab[part] for part in (left, right) if part in vocab)
        return new

    for token_id in sorted(mandatory_ids(tokenizer)):
        kept.update(close(token_id))
    if size and len(kept) > size:
        raise EdgeDistillError(
            f"vocab: {size} tokens cannot hold the {len(kept)} that every student keeps (special tokens, the 256 "
            "byte-level bases, the chat template's); ask for more or auto"
        )
    counts = np.asarray(counts)
    used = np.nonzero(counts > 0)[0]
    for token_id in used[np.argsort(-counts[used], kind="stable")].tolist():
        if token_id not in by_id and token_id not in kept:
            continue  # an id beyond the model's vocabulary (added token outside it): kept above if added
        new = close(token_id)
        if size and len(kept) + len(new) > size:
            continue
        kept.update(new)
    # room left under ``size``: the teacher's earliest merges (BPE learns merges in order of frequency in the
    # teacher's own training text), for text outside the data; a subset of the teacher's merges still includes
    # every merge that fires on the data, so the data still tokenize identically
    for left, right in _merge_pairs(spec["model"]) if size and len(kept) < size else ():
        token_id = vocab.get(left + right)
        if token_id is None or token_id in kept:
            continue
        new = close(token_id)
        if len(kept) + len(new) <= size:
            kept.update(new)
        if len(kept) >= size:
            break
    return np.array(sorted(kept), dtype=np.int64)


# ---------------------------------------------------------------------------------------------------- trimming
def trim_tokenizer(tokenizer: Any, teacher_ids: np.ndarray, mode: str = "tail") -> tuple[Any, VocabMap]:
    """A ``PreTrainedTokenizerFast`` over ``teacher_ids`` (ascending; a set from :func:`choose_vocab`), renumbered
    0..n-1 in that order, with the merges among them, the same pre-tokenizer, decoder, specials and chat template;
    and its :class:`VocabMap`. Saved with ``save_pretrained`` it is a normal ``tokenizer.json`` for AutoTokenizer."""
    from transformers import AutoTokenizer

    spec = _spec(tokenizer)
    model = spec["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    new_id = {int(old): new for new, old in enumerate(teacher_ids.tolist())}
    missing = [i for i in new_id if i not in by_id and i not in (tokenizer.added_tokens_decoder or {})]
    if missing:
        raise EdgeDistillError(f"vocab: id {missing[0]} is not in the tokenizer's vocabulary")
    model["vocab"] = {by_id[old]: new for old, new in new_id.items() if old in by_id}
    kept_strings = model["vocab"]
    pairs = _merge_pairs(model)
    model["merges"] = [
        [left, right] for left, right in pairs if left in kept_strings and right in kept_strings and left + right in
        kept_strings
    ]
    spec["added_tokens"] = [dict(t, id=new_id[t["id"]]) for t in spec.get("added_tokens", []) if t["id"] in new_id]
    _remap_post_processor(spec.get("post_processor"), new_id)
    with tempfile.TemporaryDirectory(prefix="edgedistill-vocab-") as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        config_path = Path(tmp, "tokenizer_config.json")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        decoder = config.get("added_tokens_decoder") or {}
        config["added_tokens_decoder"] = {str(new_id[int(k)]): v for k, v in decoder.items() if int(k) in new_id}
        config_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
        for name in ("vocab.json", "merges.txt"):  # a slow tokenizer's files would disagree: the fast one rules
            Path(tmp, name).unlink(missing_ok=True)
        trimmed = AutoTokenizer.from_pretrained(tmp)
    size = len(tokenizer)
    return trimmed, VocabMap(np.asarray(teacher_ids, dtype=np.int64), size, mode)


def _remap_post_processor(processor: Any, new_id: dict[int, int]) -> None:
    """TemplateProcessing (and Sequence) name special tokens by id: renumber them in place."""
    if not isinstance(processor, dict):
        return
    for child in processor.get("processors", []) or []:
        _remap_post_processor(child, new_id)
    for token in (processor.get("special_tokens") or {}).values():
        if isinstance(token, dict) and "ids" in token:
            token["ids"] = [new_id[i] for i in token["ids"]]


def check_map(tokenizer: Any, student_tokenizer: Any, vocab_map: VocabMap) -> None:
    """The vocabulary audit of a trimmed student: every student token is, as a string, the teacher's token its map
    names. Raises one line naming the first that is not."""
    teacher = {i: t for t, i in tokenizer.get_vocab().items()}
    student = student_tokenizer.get_vocab()
    if vocab_map.teacher_size != len(tokenizer):
        raise EdgeDistillError(
            f"vocabulary mismatch: the student's map is over a {vocab_map.teacher_size}-token teacher vocabulary, "
            f"the teacher's tokenizer has {len(tokenizer)} tokens"
        )
    if len(student) != vocab_map.size:
        raise EdgeDistillError(
            f"vocabulary mismatch: the student's tokenizer has {len(student)} tokens, its map {vocab_map.size}"
        )
    for token, index in sorted(student.items(), key=lambda kv: kv[1]):
        expected = teacher.get(int(vocab_map.teacher_ids[index]))
        if token != expected:
            raise EdgeDistillError(
                f"vocabulary mismatch: student token {index} {token!r} maps to teacher token "
                f"{int(vocab_map.teacher_ids[index])} {expected!r}; distillation needs one vocabulary or a true map"
            )


# ---------------------------------------------------------------------------------------------------- the teacher
class TeacherMapper:
    """The teacher's side of distillation carried into a trimmed student's vocabulary (tensors on ``device``)."""

    def __init__(self, vocab_map: VocabMap, device: Any) -> None:
        import torch

        self.mode = vocab_map.mode
        self.to_teacher = torch.from_numpy(vocab_map.teacher_ids).to(device)
        self.to_student = torch.from_numpy(vocab_map.to_student).to(device)
        self._head: tuple[Any, Any] | None = None

    def teacher_inputs(self, student_inputs: Any) -> Any:
        """Student ids -> the teacher's ids of the same tokens."""
        return self.to_teacher[student_inputs]

    def signal(self, signal: dict[str, Any] | None) -> dict[str, Any] | None:
        """A teacher signal (``heads.teacher_signal`` or a cache's) over the student's vocabulary."""
        if signal is None:
            return None
        if "teacher_ids" in signal:
            return map_sparse(signal, self.to_student, self.mode)
        if "teacher_logits" in signal:
            return dict(signal, teacher_logits=signal["teacher_logits"].index_select(-1, self.to_teacher))
        weight = signal["teacher_head_weight"]
        if self._head is None or self._head[0] is not weight:  # the teacher's kept rows, cut once, without a graph
            self._head = (weight, weight.detach().index_select(0, self.to_teacher))
        return dict(signal, teacher_head_weight=self._head[1])


def map_sparse(signal: dict[str, Any], to_student: Any, mode: str) -> dict[str, Any]:
    """A cached top-K (teacher ids [N, K], log-probs [N, K], tail [N]) over the student's ids.

    Dropped ids become padding slots: log-prob -inf and an id that no kept slot of the row uses (the losses count
    such a slot's student probability in the tail bucket). ``tail``: their teacher mass joins the tail bucket;
    ``renorm``: it is removed, and the losses' log-softmax over the buckets renormalises the rest."""
    import torch

    ids, logprobs, tail = signal["teacher_ids"], signal["teacher_logprobs"], signal["teacher_tail"]
    mapped = to_student[ids]
    valid = mapped >= 0
    if bool(valid.all()):
        return dict(signal, teacher_ids=mapped)
    minus_inf = torch.full_like(logprobs, float("-inf"))
    if mode == "tail":
        dropped = torch.where(valid, minus_inf, logprobs).logsumexp(-1)
        tail = torch.logaddexp(tail, dropped)
    # distinct padding ids (a scatter's backward counts a repeated index once per slot): the j-th padding slot of
    # a row takes the j-th of 2K candidate ids that no valid slot of the row holds (K valid slots leave K free)
    k = ids.shape[-1]
    candidates = torch.arange(2 * k, device=ids.device)
    taken = ((mapped.unsqueeze(-1) == candidates) & valid.unsqueeze(-1)).any(1)  # [N, 2K]
    free_rank = (~taken).to(torch.int64).cumsum(-1)  # [N, 2K], non-decreasing
    pad_rank = (~valid).to(torch.int64).cumsum(-1).clamp(min=1)  # [N, K]: 1 for the first padding slot, ...
    pad = torch.searchsorted(free_rank, pad_rank)  # the first candidate whose free count reaches that rank
    return dict(
        signal,
        teacher_ids=torch.where(valid, mapped, pad),
        teacher_logprobs=torch.where(valid, logprobs, minus_inf),
        teacher_tail=tail,
    )
