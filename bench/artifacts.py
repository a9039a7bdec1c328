"""What a benchmarked artifact is, and how many bytes one decoding step reads from memory.

A decoding step reads every weight once, except the token-embedding table, of which it reads one row (unless the
output head shares that table, as tied embeddings do, and reads all of it), and the keys and values of every cached
position. Those bytes and the measured bandwidth give the decode bound of the roofline: ``bandwidth / bytes``.

The counts come from the files without loading the weights: the GGUF header's tensor table, the ONNX graph's
initializers (external data described, not read), a safetensors header. None of this needs torch.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedistill.errors import EdgeDistillError

KIND_GGUF = "gguf"
KIND_ONNX = "onnx"
KIND_TORCH = "torch"
# Operators that read one row of a table per token (an embedding lookup), not the whole table.
_LOOKUP_OPS = {"Gather", "GatherBlockQuantized"}
_ONNX_ELEMENT_BYTES = {
    1: 4,
    2: 1,
    3: 1,
    4: 2,
    5: 2,
    6: 4,
    7: 8,
    9: 1,
    10: 2,
    11: 8,
    12: 4,
    13: 8,
    16: 2,
    21: 0.5,
    22: 0.5,
}


@dataclass(frozen=True)
class DecodeBytes:
    """Bytes one decoding step reads.

    Attributes:
        weights: weight bytes read per token.
        kv_per_position: key and value bytes per cached position (all layers).
        method: how ``weights`` was counted (for the report).
    """

    weights: int
    kv_per_position: int
    method: str

    def per_token(self, positions: float) -> float:
        """Bytes read by a step that attends over ``positions`` cached positions."""
        return self.weights + self.kv_per_position * positions


def artifact_kind(path: Path) -> str:
    """``gguf``, ``onnx`` or ``torch`` (a Hugging Face checkpoint directory) for a bench MODEL argument.

    Raises:
        EdgeDistillError: the path does not exist or is none of these.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return KIND_ONNX
        if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
            return KIND_TORCH
        raise EdgeDistillError(
            f"{path}: a directory must hold an ONNX export (model.onnx) or a checkpoint (config.json and weights)"
        )
    if not path.is_file():
        raise EdgeDistillError(f"{path}: no such model file or directory")
    from edgedistill.runtime import detect_format

    return detect_format(path)


def decode_bytes(path: Path, kind: str) -> DecodeBytes:
    """The bytes a decoding step of this artifact reads (see the module docstring)."""
    path = Path(path)
    if kind == KIND_GGUF:
        return _gguf_bytes(path)
    if kind == KIND_ONNX:
        return _onnx_bytes(path)
    if kind == KIND_TORCH:
        return _torch_bytes(path)
    raise EdgeDistillError(f"{path}: unknown artifact kind {kind!r}")


def _kv_bytes(layers: Any, kv_heads: Any, head_dim: Any, element_bytes: int) -> int:
    try:
        return 2 * int(layers) * int(kv_heads) * int(head_dim) * element_bytes
    except (TypeError, ValueError):
        return 0


def _gguf_bytes(path: Path) -> DecodeBytes:
    import gguf

    from edgedistill.gguf_header import read_gguf_header

    header = read_gguf_header(path)
    sizes = {}
    for name, ggml_type, count in header.tensors:
        block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
        sizes[name] = count // block * type_bytes
    weights = sum(sizes.values())
    method = "GGUF tensor table: all tensors"
    if "output.weight" in sizes and "token_embd.weight" in sizes:
        weights -= sizes["token_embd.weight"]
        method += " except token_embd (untied: one row per token)"
    heads = header.arch_value("attention.head_count")
    kv_heads = header.arch_value("attention.head_count_kv") or heads
    embedding = header.arch_value("embedding_length")
    head_dim = header.arch_value("attention.key_length")
    if not isinstance(head_dim, int) and isinstance(embedding, int) and isinstance(heads, int) and heads:
        head_dim = embedding // heads
    # The runtime keeps float32 keys and values for a float32 file, llama.cpp's float16 otherwise (gguf_backend.py).
    element = 4 if header.quantization == "f32" else 2
    return DecodeBytes(weights, _kv_bytes(header.arch_value("block_count"), kv_heads, head_dim, element), method)


def _onnx_bytes(path: Path) -> DecodeBytes:
    from edgedistill.runtime.onnx_backend import CONFIG_FILE, resolve_onnx_path

    model_file = resolve_onnx_path(path)
    directory = model_file.parent
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads and "hidden_size" in config else 0)
    kv_heads = config.get("num_key_value_heads") or heads
    layers = config.get("num_hidden_layers")
    try:
        import onnx
    except ImportError:
        files = sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith(model_file.name))
        return DecodeBytes(files, _kv_bytes(layers, kv_heads, head_dim, 4), "file size (onnx not installed)")
    model = onnx.load(str(model_file), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, set()).add(node.op_type if position == 0 else f"{node.op_type}:{position}")
    weights = 0
    skipped = 0
    element = 4
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values."):
            element = int(_ONNX_ELEMENT_BYTES.get(inp.type.tensor_type.elem_type, 4))
            break
    for tensor in model.graph.initializer:
        size = _onnx_tensor_bytes(tensor)
        uses = consumers.get(tensor.name, set())
        if uses and uses <= _LOOKUP_OPS:
            skipped += size
            continue
        weights += size
    method = "ONNX initializers" + (" except embedding lookups (one row per token)" if skipped else "")
    return DecodeBytes(weights, _kv_bytes(layers, kv_heads, head_dim, element), method)


def _onnx_tensor_bytes(tensor: Any) -> int:
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = 1
    for dim in tensor.dims:
        count *= int(dim)
    return int(count * _ONNX_ELEMENT_BYTES.get(tensor.data_type, 4))


def _torch_bytes(path: Path) -> DecodeBytes:
    """A checkpoint as the PyTorch backend runs it: float32 weights (bench/torch_backend.py loads float32)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise EdgeDistillError(f"{path}/config.json: not readable JSON ({err})") from None
    counts: dict[str, int] = {}
    for file in sorted(path.glob("*.safetensors")):
        for name, shape in _safetensors_shapes(file).items():
            count = 1
            for dim in shape:
                count *= int(dim)
            counts[name] = count
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config["hidden_size"] // heads if heads and "hidden_size" in config else 0)
    kv = _kv_bytes(config.get("num_hidden_layers"), config.get("num_key_value_heads") or heads, head_dim, 4)
    if not counts:
        return DecodeBytes(0, kv, "unknown (no safetensors files)")
    embed = next((n for n in counts if n.endswith("embed_tokens.weight")), None)
    total = sum(counts.values())
    method = "safetensors shapes x 4 bytes (float32 as loaded)"
    if embed and any(n.endswith("lm_head.weight") for n in counts) and not config.get("tie_word_embeddings", True):
        total -= counts[embed]
        method += " except the untied embedding table"
    return DecodeBytes(total * 4, kv, method)


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors file's JSON header (8-byte length, then JSON), without reading the data."""
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) != 8:
            raise EdgeDistillError(f"{file}: not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", head)
        if length > 100 << 20:
            raise EdgeDistillError(f"{file}: not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise EdgeDistillError(f"{file}: not a safetensors file (its header is not JSON)") from None
    return {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}
