"""The ONNX backend: our own decoding loop on an onnxruntime session. numpy, onnxruntime, tokenizers (and onnx).

The file is optimum's decoder with past (``export/onnx.py``): inputs ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.{layer}.{key,value}``; outputs ``logits`` and ``present.{layer}.*``, each
present being the past with the new positions appended.

Two engines run it, both with every input and output bound (IOBinding) to memory allocated once at load, so that a
decoding step allocates nothing and Python copies nothing:

* :class:`InPlaceEngine` (the default, when the ``onnx`` package can rewrite the graph, see ``onnx_graph.py``):
  each layer's attention is onnxruntime's fused GroupQueryAttention, reading and writing one key/value buffer per
  layer sized for the whole context. A decoding step binds nothing new: it writes the token id and the cache
  length into bound arrays and runs.
* :class:`ConcatEngine` (the graph as exported): two buffers per past tensor, each sized for the whole context;
  a step reads the past from one while onnxruntime writes the present (past plus the new position) into the other,
  and they swap roles.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.deps import require
from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.model import (
    MAX_CONTEXT,
    LanguageModel,
    ModelInfo,
    check_cache_memory,
    resolve_context,
    resolve_threads,
)
from edgedistill.runtime.onnx_graph import SEQLENS_K, TOTAL_SEQUENCE_LENGTH, fuse_attention
from edgedistill.runtime.text import ChatTemplate, check_utf8, decode_utf8, one_line
from edgedistill.token_pieces import TokenPieces

# Names of optimum's decoder-with-past (the same as export/onnx.py declares; the runtime imports nothing from it).
MODEL_FILE = "model.onnx"
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."
LOGITS = "logits"
# Files beside model.onnx that the runtime reads.
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
MANIFEST_FILE = "manifest.json"
# Prompt tokens per onnxruntime run: bounds the logits output (tokens x vocabulary floats, 25 MB for 128 x 49,152).
PREFILL_CHUNK = 128
# Bytes of model.onnx searched for quantized operators when no manifest names the quantization. Protobuf writes
# the graph's nodes before its initializers, so the operator names sit at the start of the file.
OPERATOR_SCAN_BYTES = 8 << 20
ONNX_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# config.json's integers and the largest value each may take: a corrupt or hostile file must not make the runtime
# size buffers from it. Every Hugging Face model today sits far below these.
CONFIG_LIMITS = {
    "max_position_embeddings": MAX_CONTEXT,
    "vocab_size": 1 << 24,
    "hidden_size": 1 << 20,
    "intermediate_size": 1 << 22,
    "num_hidden_layers": 1 << 12,
    "num_attention_heads": 1 << 14,
    "num_key_value_heads": 1 << 14,
    "head_dim": 1 << 16,
}
# optimum's cache inputs: past_key_values.{layer}.{key|value}.
PAST_NAME = re.compile(r"past_key_values\.(\d+)\.(key|value)")


def resolve_onnx_path(path: Path) -> Path:
    """The ``model.onnx`` of an export directory, or the ``.onnx`` file itself.

    Raises:
        EdgeDistillError: neither exists.
    """
    path = Path(path)
    if path.is_dir():
        model_file = path / MODEL_FILE
        if not model_file.is_file():
            raise EdgeDistillError(f"{path}: an ONNX export directory must contain {MODEL_FILE}")
        return model_file
    if not path.is_file():
        raise EdgeDistillError(f"{path}: no such model file")
    return path


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise EdgeDistillError(f"{path.parent}: missing {path.name} (export with `edgedistill export onnx`)")
        return {}
    try:
        text = decode_utf8(path.read_bytes(), str(path))
    except OSError as err:
        raise EdgeDistillError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, an integer of over 4300 digits, deep nesting
        raise EdgeDistillError(f"{path}: not valid JSON ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise EdgeDistillError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(config: dict[str, Any], path: Path) -> None:
    """Refuse config.json integers that are not positive, not integers, or beyond :data:`CONFIG_LIMITS`."""
    for key, limit in CONFIG_LIMITS.items():
        value = config.get(key)
        if value is None:
            continue
        if not _is_int(value) or not 1 <= value <= limit:
            raise EdgeDistillError(f"{path}: {key} must be an integer in [1, {limit}], got {one_line(repr(value), 80)}")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an object with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def llama_parameters(config: dict[str, Any]) -> int:
    """Weights of a Llama-architecture model from its config (embeddings, layers, final norm, untied head)."""
    try:
        hidden = int(config["hidden_size"])
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        ffn = int(config["intermediate_size"])
        vocab = int(config["vocab_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return 0
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attention + 3 * hidden * ffn + 2 * hidden
    head = 0 if config.get("tie_word_embeddings", True) else vocab * hidden
    return vocab * hidden + layers * per_layer + hidden + head


class OnnxModel(LanguageModel):
    """An ONNX decoder-with-past export run by onnxruntime on the CPU, with the ``tokenizers`` tokenizer.

    Args:
        path: the export directory, or its ``model.onnx``.
        threads: onnxruntime intra-op threads (None: every CPU this process may use).
        context: tokens to allocate the KV cache for (None: the model's, at most
            :data:`~edgedistill.runtime.model.DEFAULT_CONTEXT`).

    Raises:
        EdgeDistillError: missing files, a file onnxruntime cannot load, a model without the expected inputs and
            outputs, a context beyond the model's, or onnxruntime not installed.
    """

    def __init__(
        self, path: Path, threads: int | None = None, context: int | None = None, fuse_attention: bool = True
    ) -> None:
        super().__init__()
        ort = require("onnxruntime")
        model_file = resolve_onnx_path(path)
        directory = model_file.parent
        config = _read_json(directory / CONFIG_FILE, required=True)
        generation = _read_json(directory / GENERATION_CONFIG_FILE, required=False)
        tokenizer_config = _read_json(directory / TOKENIZER_CONFIG_FILE, required=False)
        _check_config(config, directory / CONFIG_FILE)
        trained = config.get("max_position_embeddings")
        context = resolve_context(context, trained)
        threads = resolve_threads(threads)

        self._load_tokenizer(directory, config, generation, tokenizer_config)
        #: Why the attention runs as exported rather than fused ('' when fused).
        self.fallback_reason = "disabled by the caller"
        self.engine: Engine
        if fuse_attention:
            fused = _fuse(model_file, config, context)
            self.fallback_reason = fused.reason
            if fused.model is not None:
                try:  # an onnxruntime without GroupQueryAttention's inputs as used here refuses the rewrite
                    session = self._session(ort, fused.model, model_file, threads)
                    layout = _check_io(session, model_file, config, fused=True)
                    self.engine = _engine(InPlaceEngine, session, layout, context, model_file)
                except EdgeDistillError as err:
                    self.fallback_reason = f"onnxruntime refused the rewritten graph: {err}"
                del fused  # the serialized model: onnxruntime holds its own copy
        if not hasattr(self, "engine"):
            session = self._session(ort, str(model_file), model_file, threads)
            layout = _check_io(session, model_file, config, fused=False)
            self.engine = _engine(ConcatEngine, session, layout, context, model_file)
        self._vocab_size = layout.vocab_size
        bad = sorted(i for i in self.eos_ids if not 0 <= i < layout.vocab_size)
        if bad:
            raise EdgeDistillError(
                f"{self._eos_origin}: eos_token_id {bad[0]} is outside the model's vocabulary of "
                f"{layout.vocab_size} tokens"
            )

        self.info = ModelInfo(
            backend="onnxruntime",
            format="onnx",
            path=str(model_file),
            name=str(config.get("_name_or_path") or config.get("_model_name_or_path") or directory.name),
            architecture=str(config.get("model_type", "unknown")),
            parameters=llama_parameters(config),
            quantization=self._quantization(model_file, layout.dtype),
            file_bytes=sum(p.stat().st_size for p in directory.iterdir() if p.name.startswith(model_file.name)),
            context=context,
            trained_context=trained or context,
            vocab_size=self._vocab_size,
            threads=threads,
        )

    # ------------------------------------------------------------------------------------------------------ setup

    def _load_tokenizer(
        self, directory: Path, config: dict[str, Any], generation: dict[str, Any], tokenizer_config: dict[str, Any]
    ) -> None:
        tokenizers = require("tokenizers")
        tokenizer_file = directory / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise EdgeDistillError(f"{directory}: missing {TOKENIZER_FILE} (the runtime needs a fast tokenizer)")
        spec = _read_json(tokenizer_file, required=True)
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # tokenizers raises a bare Exception on a malformed file
            raise EdgeDistillError(f"{tokenizer_file}: cannot be loaded ({one_line(err)})") from None
        self._token_pieces = TokenPieces(self.tokenizer, spec)

        # The end ids: generation_config.json's, else config.json's, else the id of tokenizer_config's eos_token.
        source = GENERATION_CONFIG_FILE if generation.get("eos_token_id") is not None else CONFIG_FILE
        eos = (generation if source == GENERATION_CONFIG_FILE else config).get("eos_token_id")
        self._eos_origin = directory / source
        eos_list = [eos] if _is_int(eos) else eos if isinstance(eos, list) else None
        if eos is not None and (eos_list is None or not all(_is_int(i) for i in eos_list)):
            raise EdgeDistillError(
                f"{self._eos_origin}: eos_token_id must be an integer or a list of integers, "
                f"got {one_line(repr(eos), 80)}"
            )
        eos_ids = set(eos_list or [])
        eos_text = _token_text(tokenizer_config.get("eos_token"))
        if not eos_ids and eos_text is not None and self.tokenizer.token_to_id(eos_text) is not None:
            eos_ids.add(self.tokenizer.token_to_id(eos_text))
            self._eos_origin = directory / TOKENIZER_CONFIG_FILE
        self.eos_ids = frozenset(int(i) for i in eos_ids)

        template_file = directory / CHAT_TEMPLATE_FILE
        origin = str(template_file)
        if template_file.is_file():
            try:
                template = decode_utf8(template_file.read_bytes(), origin)
            except OSError as err:
                raise EdgeDistillError(f"{template_file}: cannot be read ({err.strerror})") from None
        else:
            origin = f"{directory / TOKENIZER_CONFIG_FILE}: chat_template"
            template = tokenizer_config.get("chat_template")
            if isinstance(template, list):  # several named templates: the default one
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if template is not None and not isinstance(template, str):
                raise EdgeDistillError(
                    f"{origin}: must be a string or a list of {{name, template}} objects, got {type(template).__name__}"
                )
        specials = {
            name: text
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (text := _token_text(tokenizer_config.get(name))) is not None
        }
        self.chat_template = ChatTemplate(template, specials, origin) if template else None

    @staticmethod
    def _session(ort: Any, model: str | bytes, model_file: Path, threads: int) -> Any:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # One sequence at a time: a fixed batch dimension lets onnxruntime fold part of the shape arithmetic.
        options.add_free_dimension_override_by_name("batch_size", 1)
        try:
            return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as err:  # onnxruntime raises its own exception types for every load failure
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise EdgeDistillError(f"{model_file}: onnxruntime cannot load this model ({message})") from None

    def _quantization(self, model_file: Path, dtype: Any) -> str:
        """The export's quantization: from the export manifest when there is one, else from the operators used."""
        manifest = _read_json(model_file.parent.parent / MANIFEST_FILE, required=False)
        wanted = f"{model_file.parent.name}/{model_file.name}"
        for artifact in manifest.get("artifacts", []) if isinstance(manifest.get("artifacts"), list) else []:
            if isinstance(artifact, dict) and artifact.get("path") == wanted and artifact.get("quantization"):
                return str(artifact["quantization"])
        with open(model_file, "rb") as handle:
            head = handle.read(OPERATOR_SCAN_BYTES)
        if b"DynamicQuantizeLinear" in head or b"MatMulInteger" in head:
            return "int8"
        if b"MatMulNBits" in head:
            return "int4"
        return "fp16" if dtype == np.float16 else "fp32"

    # -------------------------------------------------------------------------------------------------- tokenizer

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise EdgeDistillError(f"tokenize: text must be a string, got {type(text).__name__}")
        check_utf8(text, "tokenize: text")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special).ids)

    def detokenize(self, token_ids: Sequence[int], special: bool = True) -> str:
        ids = [int(i) for i in token_ids if 0 <= int(i) < self._vocab_size]
        return self.tokenizer.decode(ids, skip_special_tokens=not special)

    def token_bytes(self, token_id: int) -> bytes:
        return b"" if token_id in self.eos_ids else self._token_pieces(token_id)

    # ---------------------------------------------------------------------------------------------------- compute

    def _evaluate(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        engine = self.engine
        engine.truncate(start)
        if len(token_ids) == 1:
            return engine.step(token_ids[0])
        logits = None
        for begin in range(0, len(token_ids), PREFILL_CHUNK):
            part = token_ids[begin : begin + PREFILL_CHUNK]
            logits = np.empty((1, len(part), self._vocab_size), dtype=np.float32)
            engine.run(part, start + begin, logits)
        assert logits is not None
        return logits[0, -1]

    def _truncate(self, length: int) -> None:
        self.engine.truncate(length)

    def _all_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        out = self._score(token_ids, 0)
        self.engine.truncate(0)
        return out

    def _score(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        ids = list(token_ids)
        out = np.empty((1, len(ids), self._vocab_size), dtype=np.float32)
        self.engine.truncate(start)
        for begin in range(0, len(ids), PREFILL_CHUNK):
            part = ids[begin : begin + PREFILL_CHUNK]
            self.engine.run(part, start + begin, out[:, begin : begin + len(part)])
        return out[0]

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def _engine(kind: type[Engine], session: Any, layout: KVLayout, context: int, model_file: Path) -> Engine:
    """The engine with its cache for ``context`` positions, refused before allocation when it cannot fit."""
    itemsize = np.dtype(layout.dtype).itemsize
    buffers = 2 if kind is ConcatEngine else 1  # ConcatEngine keeps two copies (past and present)
    check_cache_memory(context, buffers * len(layout.pairs) * layout.heads * layout.head_dim * itemsize, model_file)
    try:
        return kind(session, layout, context)
    except MemoryError:
        raise EdgeDistillError(f"context: no memory for a cache of {context} tokens for {model_file.name}") from None


def _fuse(model_file: Path, config: dict[str, Any], context: int) -> Any:
    try:
        return fuse_attention(model_file, config, context)
    except Exception as err:  # the rewrite is an optimisation: any failure keeps the exported graph
        from edgedistill.runtime.onnx_graph import FusedGraph

        return FusedGraph(None, f"the rewrite failed ({type(err).__name__}: {err})")


class KVLayout:
    """What the exported graph's inputs and outputs say about its cache.

    Attributes:
        pairs: ``(past input, present output)`` names, layer by layer.
        heads: key/value heads; head_dim: their width; dtype: the cache's numpy type.
        vocab_size: columns of the logits; has_positions: whether the graph takes position_ids.
    """

    def __init__(
        self, pairs: list[tuple[str, str]], heads: int, head_dim: int, dtype: Any, vocab_size: int, positions: bool
    ) -> None:
        self.pairs = pairs
        self.heads = heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.has_positions = positions


def _check_io(session: Any, model_file: Path, config: dict[str, Any], fused: bool) -> KVLayout:
    """Check that the session is a decoder with past (as exported, or rewritten) and read the cache's layout."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    past_names = [n for n in inputs if n.startswith(PAST_PREFIX)]
    for name in past_names:
        if not PAST_NAME.fullmatch(name):
            raise EdgeDistillError(f"{model_file}: input {name} is not named past_key_values.<layer>.<key|value>")
    past_names.sort(key=lambda n: (int(n.split(".")[1]), n.split(".")[2]))
    needed = (INPUT_IDS, SEQLENS_K, TOTAL_SEQUENCE_LENGTH) if fused else (INPUT_IDS, ATTENTION_MASK)
    missing = [n for n in needed if n not in inputs]
    missing += [n for n in (LOGITS,) if n not in outputs] + ([] if past_names else ["past_key_values.*"])
    if missing:
        raise EdgeDistillError(
            f"{model_file}: not a decoder with past key/values (missing {', '.join(missing)}; "
            "export it with `edgedistill export onnx`)"
        )
    pairs = []
    for name in past_names:
        present = PRESENT_PREFIX + name[len(PAST_PREFIX) :]
        if present not in outputs:
            raise EdgeDistillError(f"{model_file}: input {name} has no matching output {present}")
        pairs.append((name, present))
    first = inputs[past_names[0]]
    dtype = ONNX_DTYPES.get(first.type)
    if dtype is None:
        raise EdgeDistillError(f"{model_file}: past key/values of type {first.type} are not supported")
    if len(first.shape) != 4:
        raise EdgeDistillError(f"{model_file}: input {first.name} has shape {first.shape}, expected 4 dimensions")
    heads, head_dim = first.shape[1], first.shape[3]
    try:
        if not isinstance(heads, int):
            heads = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        if not isinstance(head_dim, int):
            head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
        vocab = outputs[LOGITS].shape[-1]
        vocab = vocab if isinstance(vocab, int) else int(config["vocab_size"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise EdgeDistillError(f"{model_file}: config.json lacks the attention shape the graph leaves open") from None
    for what, value in (("key/value heads", heads), ("head size", head_dim), ("vocabulary (logits columns)", vocab)):
        if value <= 0:
            raise EdgeDistillError(f"{model_file}: the graph's {what} is {value}, expected a positive size")
    return KVLayout(pairs, heads, head_dim, dtype, vocab, POSITION_IDS in inputs)


class Engine(ABC):
    """Runs the session on a cache that lives in buffers allocated once.

    Args:
        session: the onnxruntime session.
        layout: the cache's layout.
        capacity: positions the cache holds (the context).
    """

    def __init__(self, session: Any, layout: KVLayout, capacity: int) -> None:
        self.session = session
        self.layout = layout
        self.capacity = capacity
        self.length = 0  # positions in the cache
        self.binding = session.io_binding()
        self.step_ids = np.zeros((1, 1), dtype=np.int64)
        self.step_logits = np.empty((1, 1, layout.vocab_size), dtype=np.float32)

    @abstractmethod
    def run(self, token_ids: Sequence[int], start: int, logits: np.ndarray) -> None:
        """``token_ids`` at positions ``start...`` (the cache holds ``start``); logits ``[1, n, vocab]`` land in
        ``logits``; the cache grows by ``len(token_ids)``."""

    def step(self, token_id: int) -> np.ndarray:
        """One token at the end of the cache; returns the logits row (a view of a reused buffer)."""
        self.run([token_id], self.length, self.step_logits)
        return self.step_logits[0, 0]

    @abstractmethod
    def truncate(self, length: int) -> None:
        """Keep the first ``length`` cached positions (no-op if the cache is not longer)."""

    def _execute(self) -> None:
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as err:  # onnxruntime's own exception types
            self.length = 0
            raise EdgeDistillError(f"onnxruntime failed to run the model ({str(err).strip()[:300]})") from None

    def close(self) -> None:
        self.binding = None
        self.session = None


class InPlaceEngine(Engine):
    """The rewritten graph: one key/value buffer per layer, read and written in place by GroupQueryAttention."""

    def __init__(self, session: Any, layout: KVLayout, capacity: int) -> None:
        super().__init__(session, layout, capacity)
        shape = (1, layout.heads, capacity, layout.head_dim)
        self.buffers = [np.zeros(shape, dtype=layout.dtype) for _ in layout.pairs]
        self.seqlens = np.zeros(1, dtype=np.int32)  # cache length after the run, minus one
        self.total = np.zeros((), dtype=np.int32)  # cache length after the run
        binding = self.binding
        for (past, present), buffer in zip(layout.pairs, self.buffers):
            binding.bind_input(past, "cpu", 0, layout.dtype, shape, buffer.ctypes.data)
            binding.bind_output(present, "cpu", 0, layout.dtype, shape, buffer.ctypes.data)
        binding.bind_input(SEQLENS_K, "cpu", 0, np.int32, (1,), self.seqlens.ctypes.data)
        binding.bind_input(TOTAL_SEQUENCE_LENGTH, "cpu", 0, np.int32, (), self.total.ctypes.data)
        self._stepping = False  # whether input_ids and logits are bound to the one-token buffers

    def run(self, token_ids: Sequence[int], start: int, logits: np.ndarray) -> None:
        count = len(token_ids)
        end = start + count
        binding = self.binding
        if count == 1 and logits is self.step_logits:
            self.step_ids[0, 0] = token_ids[0]
            if not self._stepping:
                binding.bind_input(INPUT_IDS, "cpu", 0, np.int64, (1, 1), self.step_ids.ctypes.data)
                binding.bind_output(LOGITS, "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
                self._stepping = True
            ids = self.step_ids
        else:
            ids = np.asarray(token_ids, dtype=np.int64).reshape(1, count)
            binding.bind_input(INPUT_IDS, "cpu", 0, np.int64, (1, count), ids.ctypes.data)
            binding.bind_output(LOGITS, "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
            self._stepping = False
        self.seqlens[0] = end - 1
        self.total[()] = end
        self._execute()
        del ids  # bound by address: alive until the run is over
        self.length = end

    def truncate(self, length: int) -> None:
        # GroupQueryAttention reads only the first seqlens_k + 1 positions; later ones are overwritten as needed.
        self.length = min(length, self.length)


class ConcatEngine(Engine):
    """The graph as exported: ping-pong buffers, the present of one step being the past of the next."""

    def __init__(self, session: Any, layout: KVLayout, capacity: int) -> None:
        super().__init__(session, layout, capacity)
        # np.empty leaves the pages untouched until the cache reaches them.
        size = layout.heads * capacity * layout.head_dim
        self.buffers = [[np.empty(size, dtype=layout.dtype) for _ in layout.pairs] for _ in range(2)]
        self.pointers = [[buffer.ctypes.data for buffer in side] for side in self.buffers]
        self.current = 0  # which side holds the cache
        self.mask = np.ones((1, capacity), dtype=np.int64)
        self.positions = np.arange(capacity, dtype=np.int64).reshape(1, capacity)

    def run(self, token_ids: Sequence[int], start: int, logits: np.ndarray) -> None:
        layout = self.layout
        count = len(token_ids)
        end = start + count
        binding = self.binding
        if count == 1:
            ids = self.step_ids
            ids[0, 0] = token_ids[0]
        else:
            ids = np.asarray(token_ids, dtype=np.int64).reshape(1, count)
        binding.bind_input(INPUT_IDS, "cpu", 0, np.int64, (1, count), ids.ctypes.data)
        binding.bind_input(ATTENTION_MASK, "cpu", 0, np.int64, (1, end), self.mask.ctypes.data)
        if layout.has_positions:
            pointer = self.positions.ctypes.data + start * self.positions.itemsize
            binding.bind_input(POSITION_IDS, "cpu", 0, np.int64, (1, count), pointer)
        binding.bind_output(LOGITS, "cpu", 0, np.float32, logits.shape, logits.ctypes.data)
        read, write = self.pointers[self.current], self.pointers[1 - self.current]
        past_shape = (1, layout.heads, start, layout.head_dim)
        present_shape = (1, layout.heads, end, layout.head_dim)
        for index, (past, present) in enumerate(layout.pairs):
            binding.bind_input(past, "cpu", 0, layout.dtype, past_shape, read[index])
            binding.bind_output(present, "cpu", 0, layout.dtype, present_shape, write[index])
        self._execute()
        del ids
        self.current = 1 - self.current
        self.length = end

    def truncate(self, length: int) -> None:
        old = self.length
        if length >= old:
            return
        heads, head_dim = self.layout.heads, self.layout.head_dim
        if length > 0 and heads > 1:
            # A buffer holds [heads, positions, head_dim] contiguously, so each head's block starts at a multiple of
            # the cache length: a shorter cache is a compacted copy (into the other buffer), not a prefix.
            source, target = self.buffers[self.current], self.buffers[1 - self.current]
            for src, dst in zip(source, target):
                kept = src[: heads * old * head_dim].reshape(heads, old, head_dim)[:, :length]
                dst[: heads * length * head_dim].reshape(heads, length, head_dim)[...] = kept
            self.current = 1 - self.current
        self.length = length
