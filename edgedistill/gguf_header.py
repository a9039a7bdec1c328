"""The one GGUF header reader of every stage: a file's header parsed and checked in Python, without its weights.

llama.cpp trusts what a file declares. A layer count above its maximum, a NaN or negative norm epsilon, a repeated
token, an expert count without experts used or an unknown RoPE scaling type end the whole process in a
``GGML_ASSERT`` (SIGABRT) rather than an error code, and a context length of 2**31 overflows its 32-bit
arithmetic. So :func:`read_gguf_header` parses the header (magic, version, metadata, tensor table) with every read
bounds-checked, and :func:`check_model` refuses, in one line that names the file and the key, what llama.cpp would
abort on or misread: the layer count against the ``blk.N`` tensors present, epsilons, RoPE values, head counts,
widths against the tensor shapes, the vocabulary against the embedding rows, and the special token ids. The runtime
hands only a file that passes to llama.cpp.

:func:`read_gguf_metadata` is the same parse without the model checks, giving plain Python values (arrays read in
full): what the distillation stage builds a teacher's tokenizer from, and the export stage reads a GGUF source's
``general.*`` keys with.

Part of the shared core: it imports only :mod:`edgedistill.errors` and gguf-py. The key names and tensor names are
gguf-py's own (``gguf.Keys``, ``gguf.TENSOR_NAMES``).
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from edgedistill.errors import EdgeDistillError, one_line
from edgedistill.system import MAX_CONTEXT

# GGUF versions this reader understands; version 1 (2023) had 32-bit counts and llama.cpp no longer loads it.
SUPPORTED_VERSIONS = (2, 3)
MAX_TENSOR_DIMS = 4  # GGML_MAX_DIMS
# llama.cpp's limits (src/llama-hparams.h), past which it aborts: LLAMA_MAX_LAYERS, and LLAMA_MAX_EXPERTS (1024
# loads and 1025 aborts in llama-cpp-python 0.3.36).
MAX_LAYERS = 512
MAX_EXPERTS = 1024
# Bounds on declared sizes, far above any model today, that keep a corrupt value from sizing an allocation.
MAX_VOCAB = 1 << 24
MAX_WIDTH = 1 << 22  # embedding, feed-forward and head widths
MAX_HEADS = 1 << 14
# Numeric metadata arrays up to this length are read (per-layer head counts and widths); longer ones are skipped.
KEPT_ARRAY_ITEMS = 1 << 16
# Arrays always read in full (the vocabulary, to check it); other string arrays (merges) are only skipped over,
# unless the caller asks for them (``arrays_under``).
READ_STRING_ARRAYS = frozenset({gguf.Keys.Tokenizer.LIST})
# Special tokens the runtime uses; each must be a token of the vocabulary when the file names it.
SPECIAL_TOKEN_KEYS = (
    gguf.Keys.Tokenizer.BOS_ID,
    gguf.Keys.Tokenizer.EOS_ID,
    gguf.Keys.Tokenizer.EOT_ID,
    gguf.Keys.Tokenizer.EOM_ID,
)
# Layer tensors are named blk.{bid}.* (gguf.TENSOR_NAMES).
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.")
INT64_MAX = 2**63 - 1
_U64 = struct.Struct("<Q")
GGUF_MAGIC_BYTES = struct.pack("<I", gguf.GGUF_MAGIC)  # b"GGUF"
# The smallest file that holds the magic, the version and the two counts.
MIN_FILE_BYTES = 24

_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "B",
    gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I",
    gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f",
    gguf.GGUFValueType.BOOL: "?",
    gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class GgufArray:
    """A metadata array: its GGUF item type, its length, and its items where they were read (else None).

    Numeric arrays of at most :data:`KEPT_ARRAY_ITEMS` items are read as a tuple of numbers; the arrays of
    :data:`READ_STRING_ARRAYS`, and any the caller asks for (``arrays_under``), in full: strings as ``bytes``.
    """

    item_type: int
    length: int
    values: tuple | None = field(default=None, compare=False, repr=False)


@dataclass
class GgufHeader:
    """What :func:`read_gguf_header` found: the metadata and the tensor table of a GGUF file.

    Attributes:
        version: the GGUF version.
        metadata: scalar and string values by key; arrays as :class:`GgufArray`.
        tensors: ``(name, ggml type, element count)`` per tensor.
        shapes: each tensor's dimensions, in GGUF order (the row length first).
        data_end: the byte offset where the last tensor's data ends.
        file_bytes: the file's size.
    """

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[tuple[str, int, int]] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    data_end: int = 0
    file_bytes: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get(gguf.Keys.General.ARCHITECTURE, ""))

    def arch_value(self, key: str, default: Any = None) -> Any:
        """A ``{arch}.``-prefixed metadata value, e.g. ``arch_value("context_length")``."""
        return self.metadata.get(f"{self.architecture}.{key}", default)

    @property
    def parameters(self) -> int:
        return sum(count for _, _, count in self.tensors)

    @property
    def quantization(self) -> str:
        """The file type as llama.cpp names it, e.g. ``q8_0`` for ``MOSTLY_Q8_0``."""
        file_type = self.metadata.get(gguf.Keys.General.FILE_TYPE)
        try:
            name = gguf.LlamaFileType(int(file_type)).name  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return "unknown"
        return name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()

    def kv_bytes_per_token(self, f32_cache: bool) -> int:
        """Bytes of keys plus values one position takes in llama.cpp's cache (0 where the shape is not plain).

        Args:
            f32_cache: float32 keys and values (else llama.cpp's float16).
        """
        layers = self.arch_value("block_count")
        heads = self.arch_value("attention.head_count")
        kv_heads = self.arch_value("attention.head_count_kv", heads)
        width = self.arch_value("embedding_length")
        if not all(_is_int(v) and v > 0 for v in (layers, heads, kv_heads, width)):
            return 0
        key = self.arch_value("attention.key_length", width // heads)
        value = self.arch_value("attention.value_length", width // heads)
        if not _is_int(key) or not _is_int(value):
            return 0
        return layers * kv_heads * (key + value) * (4 if f32_cache else 2)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Reader:
    """Bounds-checked little-endian reads from a memory map; running past the end names the field being read.

    Args:
        arrays_under: arrays whose key starts with this are read in full, whatever their length (None: only
            :data:`READ_STRING_ARRAYS` and numeric arrays of at most :data:`KEPT_ARRAY_ITEMS` items).
    """

    def __init__(self, data: mmap.mmap | bytes, path: Path, arrays_under: str | None = None) -> None:
        self.data = data
        self.size = len(data)
        self.pos = 0
        self.path = path
        self.arrays_under = arrays_under

    def fail(self, what: str) -> EdgeDistillError:
        return EdgeDistillError(f"{self.path}: not a valid GGUF file ({what})")

    def reads_in_full(self, key: str) -> bool:
        return key in READ_STRING_ARRAYS or (self.arrays_under is not None and key.startswith(self.arrays_under))

    def take(self, size: int, what: str) -> int:
        if size < 0 or self.pos + size > self.size:
            raise self.fail(f"truncated: the file ends inside {what} at byte {self.pos}")
        start = self.pos
        self.pos += size
        return start

    def unpack(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from("<" + fmt, self.data, start)[0]

    def raw_string(self, what: str) -> bytes:
        length = self.unpack("Q", what)
        start = self.take(length, what)
        return bytes(self.data[start : start + length])

    def strings(self, count: int, what: str, keep: bool) -> list[bytes]:
        """``count`` length-prefixed strings (a vocabulary: 10**5 of them, hence the plain loop); their bytes when
        ``keep``, else an empty list."""
        data, pos, size = self.data, self.pos, self.size
        unpack = _U64.unpack_from
        items: list[bytes] = []
        for index in range(count):
            end = pos + 8
            if end > size:
                self.pos = pos
                raise self.fail(f"truncated: the file ends inside {what}[{index}] at byte {pos}")
            start, end = end, end + unpack(data, pos)[0]
            if end > size:
                self.pos = start
                raise self.fail(f"truncated: the file ends inside {what}[{index}] at byte {start}")
            if keep:
                items.append(data[start:end])
            pos = end
        self.pos = pos
        return items

    def string(self, what: str) -> str:
        try:
            return self.raw_string(what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8 text") from None


def read_gguf_header(path: Path, *, check: bool = True, arrays_under: str | None = None) -> GgufHeader:
    """Parse and check a GGUF file's header without loading its weights.

    Checks the magic and version, reads every metadata entry and tensor description, and verifies that each
    tensor's data (offset plus size for its ggml type) lies inside the file, so a truncated download is caught; then
    :func:`check_model` checks the model the metadata describes.

    Args:
        path: the ``.gguf`` file.
        check: also refuse a model llama.cpp cannot run (:func:`check_model`); without it, only the file's structure
            is checked (a vocabulary-only GGUF passes).
        arrays_under: read every metadata array whose key starts with this in full (e.g. ``"tokenizer."`` for the
            merges and token types); by default only the vocabulary and short numeric arrays are read.

    Raises:
        EdgeDistillError: the file is missing, not GGUF, of an unsupported version, corrupt, truncated, or declares
            a model llama.cpp cannot run, in one line naming the file and the key or tensor.
    """
    path = Path(path)
    if not path.is_file():
        raise EdgeDistillError(f"{path}: no such model file")
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            if size < MIN_FILE_BYTES:
                head = handle.read(len(GGUF_MAGIC_BYTES))
                if len(head) == len(GGUF_MAGIC_BYTES) and head != GGUF_MAGIC_BYTES:
                    raise _not_gguf(path, head)
                raise EdgeDistillError(f"{path}: not a valid GGUF file (only {size} bytes)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                header = _parse(_Reader(data, path, arrays_under), size)
    except OSError as err:
        raise EdgeDistillError(f"{path}: cannot be read ({err.strerror or err})") from None
    if check:
        check_model(header, path)
    return header


def read_gguf_metadata(path: Path, prefix: str = "") -> dict[str, Any]:
    """The metadata of a GGUF file whose keys start with ``prefix``, as plain Python values.

    Scalars and strings as they are, arrays as lists (string items decoded from UTF-8). The file gets the structural
    checks of :func:`read_gguf_header`, not the model checks: a tokenizer can be read from any well-formed file.

    Raises:
        EdgeDistillError: the file is missing, not GGUF, corrupt or truncated, or holds a string that is not UTF-8.
    """
    path = Path(path)
    header = read_gguf_header(path, check=False, arrays_under=prefix)
    return {key: _plain(value, key, path) for key, value in header.metadata.items() if key.startswith(prefix)}


def _plain(value: Any, key: str, path: Path) -> Any:
    """A metadata value read in full as plain Python: a :class:`GgufArray` as a list, its strings decoded."""
    if not isinstance(value, GgufArray):
        return value
    if value.item_type != gguf.GGUFValueType.STRING:
        return list(value.values or ())
    texts = []
    for index, item in enumerate(value.values or ()):
        try:
            texts.append(item.decode("utf-8"))
        except UnicodeDecodeError:
            raise EdgeDistillError(f"{path}: not a valid GGUF file ({key}[{index}] is not UTF-8 text)") from None
    return texts


def _not_gguf(path: Path, head: bytes) -> EdgeDistillError:
    return EdgeDistillError(f"{path}: not a GGUF file (it starts with {head!r}, not {GGUF_MAGIC_BYTES!r})")


def _parse(reader: _Reader, size: int) -> GgufHeader:
    """The header and tensor table at the start of ``reader``'s data (``size`` bytes)."""
    magic = reader.unpack("I", "the magic number")
    if magic != gguf.GGUF_MAGIC:
        raise _not_gguf(reader.path, bytes(reader.data[:4]))
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
    for index in range(kv_count):
        key = reader.string(f"metadata key {index}")
        if key in header.metadata:
            raise reader.fail(f"metadata key {key} appears twice")
        header.metadata[key] = _read_value(reader, key)
    alignment = header.metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if not _is_int(alignment) or alignment <= 0 or alignment & (alignment - 1):
        raise reader.fail(f"general.alignment = {alignment!r} is not a power of two")
    described = [_read_tensor_info(reader, header, index) for index in range(tensor_count)]
    data_start = -(-reader.pos // alignment) * alignment
    _place_tensor_data(reader, header, described, data_start, alignment)
    return header


def _read_tensor_info(reader: _Reader, header: GgufHeader, index: int) -> tuple[str, tuple[int, ...], int, int]:
    """One entry of the tensor table, ``(name, dims, ggml type, data offset)``; its shape goes into ``header``."""
    name = reader.string(f"the name of tensor {index}")
    if name in header.shapes:
        raise reader.fail(f"tensor {name} appears twice")
    n_dims = reader.unpack("I", f"tensor {name}")
    if not 1 <= n_dims <= MAX_TENSOR_DIMS:
        raise reader.fail(f"tensor {name} has {n_dims} dimensions, expected 1 to {MAX_TENSOR_DIMS}")
    dims = tuple(reader.unpack("Q", f"tensor {name}") for _ in range(n_dims))
    ggml_type = reader.unpack("I", f"tensor {name}")
    offset = reader.unpack("Q", f"tensor {name}")
    header.shapes[name] = dims
    return name, dims, ggml_type, offset


def _place_tensor_data(
    reader: _Reader,
    header: GgufHeader,
    described: list[tuple[str, tuple[int, ...], int, int]],
    data_start: int,
    alignment: int,
) -> None:
    """Check that each tensor's data follows the previous one's and lies inside the file; fill ``header.tensors``
    and ``header.data_end``."""
    size = header.file_bytes
    expected_offset = 0
    for name, dims, ggml_type, offset in described:
        try:
            block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        except (ValueError, KeyError):
            raise reader.fail(f"tensor {name} has unknown ggml type {ggml_type}") from None
        count = math.prod(dims)
        if count > INT64_MAX:
            raise reader.fail(f"tensor {name}: shape {list(dims)} holds more than 2**63 elements")
        if dims[0] % block:
            raise reader.fail(f"tensor {name}: {dims[0]} columns do not fill blocks of {block}")
        # llama.cpp (gguf.cpp) requires the tensors' data in table order, each padded to the alignment.
        if offset != expected_offset:
            raise reader.fail(
                f"tensor {name}: data offset {offset}, expected {expected_offset} (tensor data must follow the "
                f"table's order, each padded to {alignment} bytes)"
            )
        n_bytes = count // block * type_bytes
        tensor_end = data_start + offset + n_bytes
        if tensor_end > size:
            raise reader.fail(f"truncated: tensor {name} ends at byte {tensor_end} but the file has {size} bytes")
        expected_offset += -(-n_bytes // alignment) * alignment
        header.data_end = max(header.data_end, tensor_end)
        header.tensors.append((name, ggml_type, count))
    if not described:
        header.data_end = data_start


def _read_value(reader: _Reader, key: str) -> Any:
    """One metadata value: scalars and strings as Python values, arrays as :class:`GgufArray`."""
    value_type = reader.unpack("I", f"the type of {key}")
    if value_type in _SCALAR_FORMATS:
        return reader.unpack(_SCALAR_FORMATS[value_type], key)
    if value_type == gguf.GGUFValueType.STRING:
        return reader.string(key)
    if value_type != gguf.GGUFValueType.ARRAY:
        raise reader.fail(f"metadata {key} has unknown value type {value_type}")
    item_type = reader.unpack("I", f"the item type of {key}")
    count = reader.unpack("Q", f"the length of {key}")
    in_full = reader.reads_in_full(key)
    values: tuple | None = None
    if item_type in _SCALAR_FORMATS:
        item_format = _SCALAR_FORMATS[item_type]
        start = reader.take(count * struct.calcsize(item_format), key)
        if count <= KEPT_ARRAY_ITEMS or in_full:
            values = struct.unpack_from(f"<{count}{item_format}", reader.data, start)
    elif item_type == gguf.GGUFValueType.STRING:
        if count * 8 > reader.size - reader.pos:
            raise reader.fail(f"truncated: array {key} of {count} strings does not fit the file")
        items = reader.strings(count, key, keep=in_full)
        values = tuple(items) if in_full else None
    else:
        raise reader.fail(f"array {key} has items of unsupported type {item_type}")
    return GgufArray(item_type, count, values)


# ------------------------------------------------------------------------------------------------- the model


class _Checker:
    """The checks of :func:`check_model`, each raising one line that names the file and the key."""

    def __init__(self, header: GgufHeader, path: Path) -> None:
        self.header = header
        self.path = path
        self.arch = header.architecture

    def fail(self, key: str, message: str) -> EdgeDistillError:
        return EdgeDistillError(f"{self.path}: {key} {message}")

    def key(self, template: str) -> str:
        return template.format(arch=self.arch)

    def integer(self, template: str, low: int, high: int, per_layer: int | None = None) -> Any:
        """The value of an integer key in [low, high] (absent: None); with ``per_layer``, also an array of that
        many integers, each in [0, high]."""
        key = self.key(template)
        value = self.header.metadata.get(key)
        if value is None:
            return None
        if isinstance(value, GgufArray) and per_layer is not None:
            items = value.values
            if items is None or value.item_type in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64):
                raise self.fail(key, f"must be an integer or an array of {per_layer} integers")
            if len(items) != per_layer:
                raise self.fail(key, f"has {len(items)} values, expected one per layer ({per_layer})")
            bad = [v for v in items if isinstance(v, bool) or not 0 <= v <= high]
            if bad:
                raise self.fail(key, f"holds {bad[0]!r}, expected values in [0, {high}]")
            return value
        if not _is_int(value) or not low <= value <= high:
            shown = one_line(repr(value), 80) if not isinstance(value, GgufArray) else "an array"
            raise self.fail(key, f"= {shown}, expected an integer in [{low}, {high}]")
        return value

    def number(self, template: str, low: float, high: float, low_open: bool = False) -> float | None:
        """The value of a float key, finite and in [low, high] (``(low, high)`` with ``low_open``)."""
        key = self.key(template)
        value = self.header.metadata.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(key, f"= {one_line(repr(value), 80)}, expected a number")
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or value > high:  # NaN fails isfinite
            interval = f"({low:g}, {high:g})" if low_open else f"[{low:g}, {high:g}]"
            raise self.fail(key, f"= {value!r}, expected a finite number in {interval}")
        return float(value)

    def shape(self, tensor: str) -> tuple[int, ...] | None:
        return self.header.shapes.get(f"{tensor}.weight")


def check_model(header: GgufHeader, path: Path) -> None:
    """Refuse metadata that would make llama.cpp abort, divide by zero, overflow or allocate nonsense.

    Raises:
        EdgeDistillError: naming the file and the key (or tensor), the value and what was expected.
    """
    check = _Checker(header, path)
    keys = gguf.Keys
    arch = header.architecture
    if not arch or not isinstance(header.metadata.get(keys.General.ARCHITECTURE), str):
        raise EdgeDistillError(f"{path}: not a valid GGUF model (no general.architecture)")
    if not header.tensors:
        raise EdgeDistillError(f"{path}: holds no tensors (a vocabulary-only GGUF cannot generate)")

    # Layers: the declared count must match the blk.N tensor groups, numbered 0..N-1.
    layers = sorted({int(match.group(1)) for name in header.shapes if (match := LAYER_TENSOR.match(name))})
    block_key = check.key(keys.LLM.BLOCK_COUNT)
    blocks = check.integer(keys.LLM.BLOCK_COUNT, 1, MAX_LAYERS)
    if blocks is None and layers:
        raise check.fail(
            block_key,
            f"is missing (general.architecture is {arch!r}), but the file has tensors for {len(layers)} layers",
        )
    if blocks is not None and layers != list(range(blocks)):
        found = f"layers {layers[0]}..{layers[-1]} ({len(layers)} of them)" if layers else "none"
        raise check.fail(block_key, f"= {blocks}, but the file has tensors for {found}")
    per_layer = blocks or 0

    # Sizes.
    check.integer(keys.LLM.CONTEXT_LENGTH, 1, MAX_CONTEXT)
    width = check.integer(keys.LLM.EMBEDDING_LENGTH, 1, MAX_WIDTH)
    check.integer(keys.LLM.FEED_FORWARD_LENGTH, 1, MAX_WIDTH, per_layer)
    heads = check.integer(keys.Attention.HEAD_COUNT, 1, MAX_HEADS, per_layer)
    kv_heads = check.integer(keys.Attention.HEAD_COUNT_KV, 1, MAX_HEADS, per_layer)
    if _is_int(heads) and _is_int(kv_heads) and (kv_heads > heads or heads % kv_heads):
        raise check.fail(
            check.key(keys.Attention.HEAD_COUNT_KV), f"= {kv_heads} does not divide the {heads} attention heads"
        )
    key_width = check.integer(keys.Attention.KEY_LENGTH, 1, MAX_WIDTH)
    check.integer(keys.Attention.VALUE_LENGTH, 1, MAX_WIDTH)
    head_width = key_width or (width // heads if _is_int(width) and _is_int(heads) else MAX_WIDTH)
    check.integer(keys.Rope.DIMENSION_COUNT, 0, max(head_width, 1))
    experts = check.integer(keys.LLM.EXPERT_COUNT, 0, MAX_EXPERTS) or 0
    used_key = check.key(keys.LLM.EXPERT_USED_COUNT)
    used = check.integer(keys.LLM.EXPERT_USED_COUNT, 0, MAX_EXPERTS) or 0
    if experts and not 1 <= used <= experts:
        shown = f"= {used}" if used_key in header.metadata else "is missing"
        raise check.fail(used_key, f"{shown}, expected 1 to {experts} (the expert count)")
    if used and not experts:
        raise check.fail(used_key, f"= {used}, but the file declares no experts ({check.key(keys.LLM.EXPERT_COUNT)})")

    # Floating-point values: epsilons and RoPE values in range, and every other one of the architecture finite.
    check.number(keys.Attention.LAYERNORM_RMS_EPS, 0.0, 1.0, low_open=True)
    check.number(keys.Attention.LAYERNORM_EPS, 0.0, 1.0, low_open=True)
    check.number(keys.Rope.FREQ_BASE, 0.0, math.inf, low_open=True)
    check.number(keys.Rope.SCALING_FACTOR, 0.0, math.inf)  # 0 means no scaling (llama.cpp)
    for key, value in header.metadata.items():
        if key.startswith(f"{arch}.") and isinstance(value, float) and not math.isfinite(value):
            raise check.fail(key, f"= {value!r}, expected a finite number")
    scaling_key = check.key(keys.Rope.SCALING_TYPE)
    scaling = header.metadata.get(scaling_key)
    known_scaling = [kind.value for kind in gguf.RopeScalingType]
    if scaling is not None and scaling not in known_scaling:
        raise check.fail(scaling_key, f"= {one_line(repr(scaling), 80)}, expected one of {', '.join(known_scaling)}")

    _check_vocabulary(check, width)


def _check_vocabulary(check: _Checker, width: int | None) -> None:
    """The token list, its companion arrays and special ids, against each other and the embedding matrix."""
    header, keys = check.header, gguf.Keys.Tokenizer
    tokens = header.metadata.get(keys.LIST)
    if not isinstance(tokens, GgufArray) or tokens.item_type != gguf.GGUFValueType.STRING or tokens.values is None:
        raise check.fail(keys.LIST, "is missing or not an array of strings (the vocabulary)")
    n_tokens = tokens.length
    if not 1 <= n_tokens <= MAX_VOCAB:
        raise check.fail(keys.LIST, f"holds {n_tokens} tokens, expected 1 to {MAX_VOCAB}")
    if len(set(tokens.values)) != n_tokens:  # llama.cpp asserts that every token text is distinct
        first: dict[bytes, int] = {}
        for index, text in enumerate(tokens.values):
            if text in first:
                raise check.fail(keys.LIST, f"repeats token {first[text]} ({text!r}) at index {index}")
            first[text] = index
    for key, item_types in (
        (keys.TOKEN_TYPE, (gguf.GGUFValueType.INT32,)),
        (keys.SCORES, (gguf.GGUFValueType.FLOAT32,)),
    ):
        array = header.metadata.get(key)
        if array is None:
            continue
        if not isinstance(array, GgufArray) or array.item_type not in item_types:
            raise check.fail(key, f"must be an array of {item_types[0].name.lower()} values")
        if array.length != n_tokens:
            raise check.fail(key, f"has {array.length} entries for the {n_tokens} tokens of {keys.LIST}")
    merges = header.metadata.get(keys.MERGES)
    if merges is not None and (not isinstance(merges, GgufArray) or merges.item_type != gguf.GGUFValueType.STRING):
        raise check.fail(keys.MERGES, "must be an array of strings")
    if header.metadata.get(keys.MODEL) == "llama":
        # A SentencePiece vocabulary falls back to byte tokens <0xXX> (or the raw byte) for text it cannot cover;
        # llama.cpp's lookup of a missing one throws out of a C function and aborts the process.
        texts = set(tokens.values)
        missing = [b for b in range(256) if f"<0x{b:02X}>".encode() not in texts and bytes([b]) not in texts]
        if missing:
            raise check.fail(
                keys.LIST,
                f"lacks the byte token <0x{missing[0]:02X}> (and {len(missing) - 1} more) that a SentencePiece "
                "('llama') vocabulary needs",
            )

    vocab_key = check.key(gguf.Keys.LLM.VOCAB_SIZE)
    vocab = check.integer(gguf.Keys.LLM.VOCAB_SIZE, 1, MAX_VOCAB)
    if vocab is not None and vocab != n_tokens:
        raise check.fail(vocab_key, f"= {vocab}, but {keys.LIST} holds {n_tokens} tokens")
    for tensor in (gguf.MODEL_TENSOR.TOKEN_EMBD, gguf.MODEL_TENSOR.OUTPUT):
        name = gguf.TENSOR_NAMES[tensor]
        shape = check.shape(name)
        if shape is None:
            continue
        if len(shape) != 2 or shape[1] != n_tokens or (width is not None and shape[0] != width):
            expected = f"[{width if width is not None else 'embedding_length'}, {n_tokens}]"
            raise EdgeDistillError(
                f"{check.path}: tensor {name}.weight has shape {list(shape)}, expected {expected} (the embedding "
                f"length by the {n_tokens} tokens of {keys.LIST})"
            )
    for key in SPECIAL_TOKEN_KEYS:
        token_id = header.metadata.get(key)
        if token_id is not None and (not _is_int(token_id) or not 0 <= token_id < n_tokens):
            raise check.fail(key, f"= {one_line(repr(token_id), 80)}, expected a token id in [0, {n_tokens})")
