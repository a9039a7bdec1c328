"""The GGUF backend: llama.cpp (through llama-cpp-python) computes the logits, our sampler chooses the tokens.

llama.cpp can abort the whole process on a malformed file, so :func:`read_gguf_header` parses the header first
(magic, version, metadata, tensor table) and checks that every tensor's data lies inside the file. Only a file
that passes is handed to llama.cpp.

Decoding runs ``Llama.eval`` one token at a time with ``logits_all=False`` and reads the last row of logits
straight from llama.cpp's buffer (``llama_get_logits_ith``, no copy); the shared sampler chooses the token.
"""

from __future__ import annotations

import logging
import mmap
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.model import LanguageModel, ModelInfo, require_module, resolve_context, resolve_threads
from edgedistill.runtime.text import ChatTemplate

# Prompt tokens per llama.cpp batch.
PREFILL_BATCH = 512
# GGUF versions this reader understands; version 1 (2023) had 32-bit counts and llama.cpp no longer loads it.
SUPPORTED_VERSIONS = (2, 3)
# Sanity bounds that keep a corrupt count from starting a near-endless loop (each entry takes at least 8 bytes,
# so the file size bounds them too).
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
# Metadata keys tokenizer.ggml.{kind}_token_id that end a generation.
END_TOKEN_KINDS = ("eos", "eot", "eom")


@dataclass
class GgufHeader:
    """What :func:`read_gguf_header` found: the metadata and the tensor table of a GGUF file.

    Attributes:
        version: the GGUF version.
        metadata: scalar and string values by key; arrays as :class:`GgufArray` (type and length only).
        tensors: ``(name, ggml type, element count)`` per tensor.
        data_end: the byte offset where the last tensor's data ends.
        file_bytes: the file's size.
    """

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[tuple[str, int, int]] = field(default_factory=list)
    data_end: int = 0
    file_bytes: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """A ``{arch}.``-prefixed metadata value, e.g. ``arch_value("context_length")``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def parameters(self) -> int:
        return sum(count for _, _, count in self.tensors)

    @property
    def quantization(self) -> str:
        """The file type as llama.cpp names it, e.g. ``q8_0`` for ``MOSTLY_Q8_0``."""
        import gguf

        file_type = self.metadata.get("general.file_type")
        try:
            name = gguf.LlamaFileType(int(file_type)).name  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return "unknown"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


class _Reader:
    """Bounds-checked little-endian reads from a memory map; running past the end names the field being read."""

    def __init__(self, data: mmap.mmap | bytes, path: Path) -> None:
        self.data = data
        self.size = len(data)
        self.pos = 0
        self.path = path

    def fail(self, what: str) -> EdgeDistillError:
        return EdgeDistillError(f"{self.path}: not a valid GGUF file ({what})")

    def take(self, size: int, what: str) -> int:
        if size < 0 or self.pos + size > self.size:
            raise self.fail(f"truncated: the file ends inside {what} at byte {self.pos}")
        start = self.pos
        self.pos += size
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from("<" + fmt, self.data, start)[0]

    def string(self, what: str) -> str:
        length = self.unpack("Q", what)
        start = self.take(length, what)
        try:
            return bytes(self.data[start : start + length]).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None


def _scalar_formats() -> dict[int, str]:
    from gguf import GGUFValueType as T  # noqa: N817

    return {
        T.UINT8: "B",
        T.INT8: "b",
        T.UINT16: "H",
        T.INT16: "h",
        T.UINT32: "I",
        T.INT32: "i",
        T.FLOAT32: "f",
        T.BOOL: "?",
        T.UINT64: "Q",
        T.INT64: "q",
        T.FLOAT64: "d",
    }


def read_gguf_header(path: Path) -> GgufHeader:
    """Parse and check a GGUF file's header without loading its weights.

    Checks the magic and version, reads every metadata entry and tensor description, and verifies that each
    tensor's data (offset plus size for its ggml type) lies inside the file, so a truncated download is caught.

    Raises:
        EdgeDistillError: the file is missing, not GGUF, of an unsupported version, corrupt or truncated.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise EdgeDistillError(f"{path}: no such model file")
    size = path.stat().st_size
    if size < 24:
        raise EdgeDistillError(f"{path}: not a valid GGUF file (only {size} bytes)")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        reader = _Reader(data, path)
        magic = reader.unpack("I", "the magic number")
        if magic != gguf.GGUF_MAGIC:
            raise reader.fail(f"the file starts with {bytes(data[:4])!r}, not b'GGUF'")
        version = reader.unpack("I", "the version")
        if version not in SUPPORTED_VERSIONS:
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            detail = "a big-endian file" if swapped in SUPPORTED_VERSIONS else f"version {version}"
            raise reader.fail(f"{detail}; supported: little-endian versions {SUPPORTED_VERSIONS}")
        header = GgufHeader(version=version, file_bytes=size)
        tensor_count = reader.unpack("Q", "the tensor count")
        kv_count = reader.unpack("Q", "the metadata count")
        if (tensor_count + kv_count) * 8 > size:
            raise reader.fail(f"counts of {tensor_count} tensors and {kv_count} metadata entries exceed the file")
        formats = _scalar_formats()
        for index in range(kv_count):
            key = reader.string(f"metadata key {index}")
            header.metadata[key] = _read_value(reader, key, formats)
        alignment = header.metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise reader.fail(f"general.alignment = {alignment!r} is not a power of two")
        described = []
        for index in range(tensor_count):
            name = reader.string(f"the name of tensor {index}")
            n_dims = reader.unpack("I", f"tensor {name}")
            if not 1 <= n_dims <= MAX_TENSOR_DIMS:
                raise reader.fail(f"tensor {name} has {n_dims} dimensions")
            dims = [reader.unpack("Q", f"tensor {name}") for _ in range(n_dims)]
            ggml_type = reader.unpack("I", f"tensor {name}")
            offset = reader.unpack("Q", f"tensor {name}")
            described.append((name, dims, ggml_type, offset))
        data_start = -(-reader.pos // alignment) * alignment
        end = data_start
        for name, dims, ggml_type, offset in described:
            try:
                block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise reader.fail(f"tensor {name} has unknown ggml type {ggml_type}") from None
            count = int(np.prod(dims, dtype=np.uint64)) if dims else 0
            if dims[0] % block:
                raise reader.fail(f"tensor {name}: {dims[0]} columns do not fill blocks of {block}")
            if offset % alignment:
                raise reader.fail(f"tensor {name}: data offset {offset} is not aligned to {alignment}")
            tensor_end = data_start + offset + count // block * type_bytes
            if tensor_end > size:
                raise reader.fail(f"truncated: tensor {name} ends at byte {tensor_end} but the file has {size} bytes")
            end = max(end, tensor_end)
            header.tensors.append((name, ggml_type, count))
        header.data_end = end
    _check_hyperparameters(header, path)
    return header


def _read_value(reader: _Reader, key: str, formats: dict[int, str]) -> Any:
    """One metadata value: scalars and strings as Python values, arrays skipped and recorded by their length."""
    from gguf import GGUFValueType

    value_type = reader.unpack("I", f"the type of {key}")
    if value_type in formats:
        return reader.unpack(formats[value_type], key)
    if value_type == GGUFValueType.STRING:
        return reader.string(key)
    if value_type != GGUFValueType.ARRAY:
        raise reader.fail(f"metadata {key} has unknown value type {value_type}")
    item_type = reader.unpack("I", f"the item type of {key}")
    count = reader.unpack("Q", f"the length of {key}")
    if item_type in formats:
        reader.take(count * struct.calcsize(formats[item_type]), key)
    elif item_type == GGUFValueType.STRING:
        if count * 8 > reader.size - reader.pos:
            raise reader.fail(f"truncated: array {key} of {count} strings does not fit the file")
        for index in range(count):
            length = reader.unpack("Q", key)
            reader.take(length, f"{key}[{index}]")
    else:
        raise reader.fail(f"array {key} has items of unsupported type {item_type}")
    return GgufArray(item_type, count)


@dataclass(frozen=True)
class GgufArray:
    """A metadata array whose items were skipped: their GGUF value type and how many there are."""

    item_type: int
    length: int


def _check_hyperparameters(header: GgufHeader, path: Path) -> None:
    """Refuse shapes that would make llama.cpp divide by zero or allocate nonsense."""
    if not header.architecture:
        raise EdgeDistillError(f"{path}: not a valid GGUF model (no general.architecture)")
    if not header.tensors:
        raise EdgeDistillError(f"{path}: holds no tensors (a vocabulary-only GGUF cannot generate)")
    for key in ("block_count", "embedding_length", "attention.head_count"):
        value = header.arch_value(key)
        if value is not None and not isinstance(value, GgufArray) and (not isinstance(value, int) or value <= 0):
            raise EdgeDistillError(f"{path}: not a valid GGUF model ({header.architecture}.{key} = {value!r})")


class GgufModel(LanguageModel):
    """A GGUF model in llama.cpp, sampled by :mod:`edgedistill.runtime.sampling`.

    Args:
        path: the ``.gguf`` file.
        threads: CPU threads for llama.cpp (None: every CPU this process may use).
        context: tokens to allocate the KV cache for (None: the model's, at most
            :data:`~edgedistill.runtime.model.DEFAULT_CONTEXT`).
        verbose: let llama.cpp log to stderr.

    Raises:
        EdgeDistillError: a missing, corrupt or truncated file, a context beyond the model's, or llama-cpp-python
            not installed.
    """

    def __init__(self, path: Path, threads: int | None = None, context: int | None = None, verbose: bool = False):
        super().__init__()
        llama_cpp = require_module("llama_cpp")
        path = Path(path)
        header = read_gguf_header(path)
        trained = header.arch_value("context_length")
        trained = trained if isinstance(trained, int) and trained > 0 else None
        context = resolve_context(context, trained)
        threads = resolve_threads(threads)
        if not verbose:
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        # A float32 file keeps float32 keys and values: llama.cpp's default float16 cache alone moves the logits of
        # a float32 model by up to 0.05 (export/gguf.py), enough to flip a close greedy choice.
        cache = {}
        if header.quantization == "f32":
            cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32}
        batch = min(PREFILL_BATCH, context)
        # Kept public so that a benchmark can build llama-cpp-python's own loop on an identical instance.
        self.llama_kwargs: dict[str, Any] = dict(
            model_path=str(path),
            n_ctx=context,
            n_batch=batch,
            n_ubatch=batch,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=0,
            logits_all=False,
            flash_attn=False,
            verbose=verbose,
            **cache,
        )
        try:
            self.llama = llama_cpp.Llama(**self.llama_kwargs)
        except (ValueError, RuntimeError, OSError) as err:
            raise EdgeDistillError(f"{path}: llama.cpp cannot load this model ({err})") from None
        self._llama_cpp = llama_cpp
        self._ctx = self.llama.ctx
        self._vocab = llama_cpp.llama_model_get_vocab(self.llama.model)
        n_vocab = int(self.llama.n_vocab())
        self._n_vocab = n_vocab
        # Generation ends at the ids the file names (end of sequence, of turn, of message), as the ONNX backend ends
        # at generation_config.json's: llama.cpp's own end-of-generation set also guesses from token texts (it
        # counts SmolLM2's <|endoftext|> and <reponame>), which would stop where PyTorch goes on.
        named = [header.metadata.get(f"tokenizer.ggml.{kind}_token_id") for kind in END_TOKEN_KINDS]
        self.eos_ids = frozenset(i for i in named if isinstance(i, int) and 0 <= i < n_vocab)
        if not self.eos_ids:
            is_eog = llama_cpp.llama_vocab_is_eog
            self.eos_ids = frozenset(i for i in range(n_vocab) if is_eog(self._vocab, i))
        is_control = llama_cpp.llama_vocab_is_control
        self._control = frozenset(i for i in range(n_vocab) if is_control(self._vocab, i)) | self.eos_ids
        self._piece_cache: dict[int, bytes] = {}
        template = header.metadata.get("tokenizer.chat_template")
        specials = {}
        for name, token_id in (("bos_token", self.llama.token_bos()), ("eos_token", self.llama.token_eos())):
            if 0 <= token_id < n_vocab:
                specials[name] = self._piece(token_id, special=True).decode("utf-8", errors="replace")
        self.chat_template = ChatTemplate(template, specials) if isinstance(template, str) and template else None
        self.info = ModelInfo(
            backend="llama.cpp",
            format="gguf",
            path=str(path),
            name=str(header.metadata.get("general.name") or path.stem),
            architecture=header.architecture,
            parameters=int(llama_cpp.llama_model_n_params(self.llama.model)) or header.parameters,
            quantization=header.quantization,
            file_bytes=header.file_bytes,
            context=context,
            trained_context=trained or context,
            vocab_size=n_vocab,
            threads=threads,
        )

    # ------------------------------------------------------------------------------------------------- tokenizer

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise EdgeDistillError(f"tokenize: text must be a string, got {type(text).__name__}")
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=True)

    def detokenize(self, token_ids: Sequence[int], special: bool = True) -> str:
        ids = [int(i) for i in token_ids]
        return b"".join(self._piece(i, special) for i in ids if 0 <= i < self._n_vocab).decode(
            "utf-8", errors="replace"
        )

    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._control:
            return b""
        piece = self._piece_cache.get(token_id)
        if piece is None:
            piece = self._piece_cache[token_id] = self._piece(token_id, special=False)
        return piece

    def _piece(self, token_id: int, special: bool) -> bytes:
        llama_cpp = self._llama_cpp
        size = 64
        while True:
            buffer = (llama_cpp.ctypes.c_char * size)()
            count = llama_cpp.llama_token_to_piece(self._vocab, token_id, buffer, size, 0, special)
            if count >= 0:
                return bytes(buffer[:count])
            size = -count

    # -------------------------------------------------------------------------------------------------- compute

    def _evaluate(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        llama = self.llama
        llama.n_tokens = start  # Llama.eval removes every cached position from n_tokens on before it runs
        try:
            llama.eval(token_ids)
        except RuntimeError as err:
            raise EdgeDistillError(f"llama.cpp failed to evaluate {len(token_ids)} tokens ({err})") from None
        pointer = self._llama_cpp.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def _truncate(self, length: int) -> None:
        self.llama.n_tokens = length

    def _all_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        llama_cpp = self._llama_cpp
        ids = list(token_ids)
        out = np.empty((len(ids), self._n_vocab), dtype=np.float32)
        chunk = min(PREFILL_BATCH, self.context)
        batch = llama_cpp.llama_batch_init(chunk, 0, 1)
        try:
            memory = llama_cpp.llama_get_memory(self._ctx)
            llama_cpp.llama_memory_seq_rm(memory, -1, 0, -1)
            for begin in range(0, len(ids), chunk):
                part = ids[begin : begin + chunk]
                batch.n_tokens = len(part)
                for index, token_id in enumerate(part):
                    batch.token[index] = token_id
                    batch.pos[index] = begin + index
                    batch.n_seq_id[index] = 1
                    batch.seq_id[index][0] = 0
                    batch.logits[index] = True
                status = llama_cpp.llama_decode(self._ctx, batch)
                if status != 0:
                    raise EdgeDistillError(f"llama.cpp failed to evaluate tokens {begin}.. (status {status})")
                for index in range(len(part)):
                    row = llama_cpp.llama_get_logits_ith(self._ctx, index)
                    out[begin + index] = np.ctypeslib.as_array(row, shape=(self._n_vocab,))
        finally:
            llama_cpp.llama_batch_free(batch)
            self.llama.n_tokens = 0
        return out

    def close(self) -> None:
        llama = getattr(self, "llama", None)
        if llama is not None:
            llama.close()
            self.llama = None  # type: ignore[assignment]
