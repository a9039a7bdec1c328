"""Teacher once, students many: an offline top-K teacher cache.

``edgedistill teacher-cache`` runs the teacher once over the packed training and held-out data and stores, for every
input position, the teacher's top-K token ids with their log-probabilities at temperature 1, the log of the
probability mass outside the top K (the *tail*) and the log-probability of the data's own next token (the *label*:
what scores the teacher on the cached text without running it again, :meth:`TeacherCache.evaluate`).
``edgedistill distill --teacher-cache`` then trains students from it without loading the teacher: a forward KL over
K + 1 buckets (``losses.sparse_forward_kl``).

Layout of a cache directory::

    manifest.json            teacher identity and hash, tokenizer hash, data hash, K, seq_len, token count, shards
    config.json, tokenizer*  the teacher's configuration and tokenizer (what a student needs; no weights)
    train-00000.npy ...      one structured array [rows, seq_len] per shard: ids (K,), logprobs (K,), tail, label
    heldout-00000.npy ...
    outside-00000.npy ...    with ``eval_data``: text that is only evaluated on (never trained on)

Every shard is written under a temporary name and renamed into place when complete, so an interrupted build
resumes at the first missing shard. Shards are read memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill import __version__
from edgedistill.distill.data import PackedData
from edgedistill.errors import EdgeDistillError
from edgedistill.files import atomic_open, atomic_write_text, claim

MANIFEST = "manifest.json"
SCHEMA = 2  # 2: the label log-probability; optional evaluation-only splits
BACKENDS = ("torch", "llama.cpp")
EVAL_SPLIT = "outside"  # the split of CacheConfig.eval_data


def record_dtype(top_k: int, vocab_size: int) -> np.dtype:
    """One position's record: top-K ids (uint16 while the vocabulary fits), their log-probs, the tail log-mass and
    the log-probability of the data's next token."""
    id_type = np.uint16 if vocab_size <= 1 << 16 else np.int32
    return np.dtype(
        [("ids", id_type, (top_k,)), ("logprobs", np.float32, (top_k,)), ("tail", np.float32), ("label", np.float32)]
    )


def ids_sha256(*arrays: np.ndarray) -> str:
    """Hash of packed token ids: what the teacher's outputs depend on (weights and tags do not matter)."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype=np.int32).tobytes())
    return digest.hexdigest()


def tokenizer_sha256(tokenizer: Any) -> str:
    """Hash of the tokenizer's full definition (vocabulary, merges, pre-tokenizer, special tokens)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


@dataclass
class CacheManifest:
    teacher: dict[str, Any]
    backend: str
    tokenizer_sha256: str
    data_sha256: str
    data_files: list[str]
    seq_len: int
    top_k: int
    vocab_size: int
    rows_per_shard: int
    splits: dict[str, int]  # split -> rows
    split_sha256: dict[str, str] = field(default_factory=dict)  # split -> ids_sha256 of its packed rows
    tokens: int = 0
    complete: bool = False
    seconds: float = 0.0
    tokens_per_second: float = 0.0
    schema: int = SCHEMA
    edgedistill_version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)

    def shard_names(self, split: str) -> list[str]:
        count = -(-self.splits[split] // self.rows_per_shard)
        return [f"{split}-{index:05d}.npy" for index in range(count)]

    def identity(self) -> dict[str, Any]:
        """What must be equal for an interrupted build to be resumed."""
        return {
            k: getattr(self, k)
            for k in (
                "schema",
                "teacher",
                "backend",
                "tokenizer_sha256",
                "data_sha256",
                "seq_len",
                "top_k",
                "vocab_size",
                "rows_per_shard",
                "splits",
                "split_sha256",
            )
        }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_manifest(directory: Path) -> CacheManifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise EdgeDistillError(
            f"teacher cache: {directory} has no {MANIFEST} (build one with edgedistill teacher-cache)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return CacheManifest(**data)
    except (json.JSONDecodeError, TypeError) as err:
        raise EdgeDistillError(f"teacher cache: {path} is not a valid cache manifest ({err})") from None


# ------------------------------------------------------------------------------------------------------ backends
Outputs = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
# [B, L] inputs and [B, L] labels (the next tokens) -> ids [B, L, K], log-probs [B, L, K], tail log-mass [B, L],
# the labels' log-probs [B, L]
TopK = Callable[[np.ndarray, np.ndarray], Outputs]


def torch_topk(model: Any, top_k: int, vocab_size: int) -> TopK:
    """Top-K from a PyTorch teacher."""
    import torch

    def run(ids: np.ndarray, labels: np.ndarray) -> Outputs:
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids).long().to(model.device)).logits[..., :vocab_size]
            return _topk_torch(logits.float().contiguous(), top_k, torch.from_numpy(labels).long().to(logits.device))

    return run


def _topk_torch(logits: Any, top_k: int, labels: Any) -> Outputs:
    """Three reads of the [.., V] logits and no full-size copy: their log-normaliser, the top-K, and (after the
    top-K entries are set to -inf in place, K writes a row) the tail's log-normaliser; the labels' logits are
    gathered first. ``logits`` is consumed."""
    import torch

    total = torch.logsumexp(logits, dim=-1)
    label = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - total
    values, indices = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    logits.scatter_(-1, indices, float("-inf"))
    tail = torch.logsumexp(logits, dim=-1) - total  # -inf when the top-K hold the whole vocabulary
    values -= total.unsqueeze(-1)
    return indices.cpu().numpy(), values.cpu().numpy(), tail.cpu().numpy(), label.cpu().numpy()


def llama_cpp_topk(gguf_path: Path, top_k: int, vocab_size: int, seq_len: int, threads: int) -> TopK:
    """Top-K from llama.cpp: the GGUF runs in its own quantization, nothing is dequantized into PyTorch."""
    from edgedistill.llamacpp import LlamaCpp

    threads = threads or len(os.sched_getaffinity(0))
    # f32 KV cache: no rounding that the torch backend does not have
    model = LlamaCpp(gguf_path, n_ctx=seq_len, n_batch=seq_len, threads=threads, f32_cache=True)

    def run(ids: np.ndarray, labels: np.ndarray) -> Outputs:
        out_ids = np.empty((*ids.shape, top_k), np.int64)
        out_lp = np.empty((*ids.shape, top_k), np.float32)
        out_tail = np.empty(ids.shape, np.float32)
        out_label = np.empty(ids.shape, np.float32)
        for row, tokens in enumerate(ids):
            logits = model.evaluate(tokens.tolist(), all_logits=True)[:, :vocab_size]
            out_ids[row], out_lp[row], out_tail[row], out_label[row] = _topk_numpy(logits, top_k, labels[row])
        return out_ids, out_lp, out_tail, out_label

    return run


def _topk_numpy(logits: np.ndarray, top_k: int, labels: np.ndarray) -> Outputs:
    """The same computation as :func:`_topk_torch` in numpy: [n, V], [n] -> [n, K], [n, K], [n], [n]."""
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    label = np.take_along_axis(log_probs, labels[:, None].astype(np.int64), -1)[:, 0].astype(np.float32)
    part = (
        np.argpartition(-log_probs, top_k - 1, axis=-1)[:, :top_k]
        if top_k < logits.shape[-1]
        else np.tile(np.arange(logits.shape[-1]), (len(logits), 1))
    )
    values = np.take_along_axis(log_probs, part, -1)
    order = np.argsort(-values, axis=-1, kind="stable")
    indices, values = np.take_along_axis(part, order, -1), np.take_along_axis(values, order, -1)
    rest = log_probs.copy()
    np.put_along_axis(rest, indices, -np.inf, -1)
    peak = rest.max(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        tail = np.where(np.isfinite(peak[:, 0]), peak[:, 0] + np.log(np.exp(rest - peak).sum(-1)), -np.inf)
    return indices, values, tail.astype(np.float32), label


# ------------------------------------------------------------------------------------------------------ build
def build_cache(
    out: Path,
    manifest: CacheManifest,
    data: dict[str, PackedData],
    topk: TopK,
    batch_size: int = 8,
    progress: bool = True,
    on_shard: Callable[[str], None] | None = None,
) -> CacheManifest:
    """Fill the cache's shards, skipping those already complete; returns the finished manifest."""
    from tqdm import tqdm

    existing = out / MANIFEST
    if existing.is_file():
        previous = read_manifest(out)
        if previous.identity() != manifest.identity():
            changed = next(k for k, v in manifest.identity().items() if previous.identity()[k] != v)
            raise EdgeDistillError(
                f"teacher cache: {out} holds a cache with a different {changed}; choose another --out or remove it"
            )
        if previous.complete:
            return previous
    _write_json(existing, asdict(manifest))
    dtype = record_dtype(manifest.top_k, manifest.vocab_size)
    total_rows = sum(manifest.splits.values())
    bar = tqdm(total=total_rows * manifest.seq_len, disable=not progress, unit="tok", unit_scale=True)
    started, computed = time.perf_counter(), 0
    for split, packed in data.items():
        for index, name in enumerate(manifest.shard_names(split)):
            first = index * manifest.rows_per_shard
            rows = packed.ids[first : first + manifest.rows_per_shard, :-1]
            final = out / name
            if final.is_file():
                bar.update(rows.size)
                continue
            labels = packed.ids[first : first + manifest.rows_per_shard, 1:]
            records = np.zeros(rows.shape, dtype=dtype)
            for start in range(0, len(rows), batch_size):
                part = slice(start, start + batch_size)
                chunk = records[part]
                chunk["ids"], chunk["logprobs"], chunk["tail"], chunk["label"] = topk(rows[part], labels[part])
                bar.update(rows[part].size)
            with atomic_open(final) as stream:
                np.save(stream, records, allow_pickle=False)
            computed += rows.size
            if on_shard is not None:
                on_shard(name)
    bar.close()
    seconds = time.perf_counter() - started
    manifest.tokens = total_rows * manifest.seq_len
    manifest.complete = True
    manifest.seconds = seconds
    manifest.tokens_per_second = computed / seconds if computed and seconds else 0.0
    _write_json(existing, asdict(manifest))
    return manifest


# ------------------------------------------------------------------------------------------------------ read
class TeacherCache:
    """A finished cache, memory-mapped: ``signal(split, rows, positions)`` gives the objective its teacher."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.manifest = read_manifest(directory)
        if not self.manifest.complete:
            raise EdgeDistillError(
                f"teacher cache: {directory} is incomplete; finish it by running teacher-cache again"
            )
        self._shards: dict[str, list[np.ndarray]] = {}
        for split in self.manifest.splits:
            shards = []
            for name in self.manifest.shard_names(split):
                path = directory / name
                if not path.is_file():
                    raise EdgeDistillError(f"teacher cache: shard {path} is missing")
                shards.append(np.load(path, mmap_mode="r"))
            self._shards[split] = shards

    def evaluate(self, split: str, data: PackedData, byte_lengths: np.ndarray | None = None) -> dict[str, float]:
        """The teacher's own scores on a cached split of packed ``data`` (the rows the cache was built from), read
        from the cache instead of running the teacher: cross-entropy over the supervised tokens (each weighs 1),
        perplexity, top-1 accuracy against the text and, with ``byte_lengths``, bits per byte, as
        :func:`~edgedistill.distill.evaluation.evaluate` scores a student."""
        from edgedistill.distill.evaluation import scores

        expected = self.manifest.split_sha256.get(split)
        if split not in self.manifest.splits or "label" not in self._shards[split][0].dtype.names:
            raise EdgeDistillError(
                f"teacher cache: {self.directory} has no teacher scores for the {split!r} split (build it again)"
            )
        if (expected and expected != ids_sha256(data.ids)) or data.num_sequences != self.manifest.splits[split]:
            raise EdgeDistillError(f"teacher cache: its {split!r} split was built from other data than these")
        records = self.records(split, slice(None))
        supervised = data.weights[:, 1:] > 0
        labels = data.ids[:, 1:][supervised]
        return scores(
            -float(records["label"][supervised].astype(np.float64).sum()),
            len(labels),
            int((records["ids"][..., 0][supervised] == labels).sum()),
            int(byte_lengths[labels].sum()) if byte_lengths is not None else None,
        )

    def check_run(self, seq_len: int, data_sha256: str, tokenizer_hash: str) -> None:
        """Stop before training when the run's data, tokenizer or sequence length differ from the cache's."""
        m = self.manifest
        if seq_len != m.seq_len:
            raise EdgeDistillError(f"teacher cache: built with --seq-len {m.seq_len}, this run asks for {seq_len}")
        if tokenizer_hash != m.tokenizer_sha256:
            raise EdgeDistillError("teacher cache: the run's tokenizer differs from the one the cache was built with")
        if data_sha256 != m.data_sha256:
            raise EdgeDistillError(
                f"teacher cache: the run's data differ from those the cache was built on ({', '.join(m.data_files)})"
            )

    def records(self, split: str, rows: list[int] | slice) -> np.ndarray:
        """Records of some rows: [len(rows), seq_len]."""
        per = self.manifest.rows_per_shard
        indices = range(self.manifest.splits[split])[rows] if isinstance(rows, slice) else rows
        return np.stack([self._shards[split][i // per][i % per] for i in indices])

    def signal(self, split: str, rows: list[int] | slice, positions: Any) -> dict[str, Any]:
        """The objective's sparse teacher at the supervised positions: ids [N, K], logprobs [N, K], tail [N]."""
        import torch

        records = self.records(split, rows).reshape(-1)
        chosen = records[positions.cpu().numpy()]
        device = positions.device
        return {
            "teacher_ids": torch.from_numpy(chosen["ids"].astype(np.int64)).to(device),
            "teacher_logprobs": torch.from_numpy(np.ascontiguousarray(chosen["logprobs"])).to(device),
            "teacher_tail": torch.from_numpy(np.ascontiguousarray(chosen["tail"])).to(device),
        }


# ------------------------------------------------------------------------------------------------------ command
def make_cache(config: Any, progress: bool = True, on_shard: Callable[[str], None] | None = None) -> CacheManifest:
    """``edgedistill teacher-cache``: resolve the teacher, pack the data as ``distill`` will, run the teacher once."""
    from edgedistill.deps import require

    require("torch")
    # The claim sweeps the temporary shards of a killed run; finished shards are kept and skipped.
    with claim(Path(config.out), "out") as out:
        return _make_cache(config, out, progress, on_shard)


def _make_cache(config: Any, out: Path, progress: bool, on_shard: Callable[[str], None] | None) -> CacheManifest:
    import torch

    from edgedistill.distill import teacher as teachers
    from edgedistill.distill.data import load_data, load_eval_data
    from edgedistill.distill.heads import resolve_dtype
    from edgedistill.system import resolve_device

    if config.threads:
        torch.set_num_threads(config.threads)
    source = teachers.resolve_teacher(config.teacher)
    if config.backend == "llama.cpp" and source.kind != "gguf":
        raise EdgeDistillError(f"backend: llama.cpp needs a .gguf teacher, got the checkpoint directory {source.path}")
    tokenizer = teachers.load_tokenizer(source)
    teacher_config = teachers.load_config(source)
    train, heldout, stats = load_data(
        config.data,
        tokenizer,
        config.seq_len,
        config.val_fraction,
        1.0,
        config.skip_bad_lines,
        config.train_tokens,
        config.heldout_tokens,
    )
    splits = {"train": train, "heldout": heldout}
    if config.eval_data:  # scored and cached like the held-out split, never trained on
        splits[EVAL_SPLIT] = load_eval_data(config.eval_data, tokenizer, config.seq_len)
    vocab = min(teacher_config.vocab_size, len(tokenizer))
    if not 0 < config.top_k <= vocab:
        raise EdgeDistillError(f"top_k: expected 1 to {vocab} (the vocabulary), got {config.top_k}")
    manifest = CacheManifest(
        teacher={
            "spec": config.teacher,
            "name": source.name,
            "kind": source.kind,
            "path": str(source.path),
            "sha256": source.fingerprint(),
        },
        backend=config.backend,
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        data_sha256=ids_sha256(train.ids, heldout.ids),
        data_files=stats.files,
        seq_len=config.seq_len,
        top_k=config.top_k,
        vocab_size=vocab,
        rows_per_shard=config.rows_per_shard,
        splits={name: packed.num_sequences for name, packed in splits.items()},
        split_sha256={name: ids_sha256(packed.ids) for name, packed in splits.items()},
    )
    if (out / MANIFEST).is_file():  # finished already: do not load the teacher at all
        previous = read_manifest(out)
        if previous.complete and previous.identity() == manifest.identity():
            return previous
    tokenizer.save_pretrained(out)
    teacher_config.save_pretrained(out)
    if config.backend == "llama.cpp":
        topk = llama_cpp_topk(source.path, config.top_k, vocab, config.seq_len, config.threads)
    else:
        device = resolve_device(config.device)
        model = teachers.load_model(source, resolve_dtype(config.teacher_dtype, device), device)
        topk = torch_topk(model, config.top_k, vocab)
    return build_cache(out, manifest, splits, topk, config.batch_size, progress, on_shard)
