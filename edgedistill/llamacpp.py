"""llama.cpp through llama-cpp-python's public low-level API, loaded so that it runs on every CPU we meet.

Every stage that runs a GGUF file (export parity, the runtime, the bench, the teacher cache) opens it with
:class:`LlamaCpp` rather than ``llama_cpp.Llama``, because of one setting the high-level class does not expose:

**Extra weight buffers and AMX.** llama-cpp-python compiles llama.cpp with ``-march=native``. On a CPU with AMX
(Intel Xeon Sapphire Rapids and later: ``amx_int8 amx_tile`` in ``/proc/cpuinfo``) the build includes the AMX
backend, and llama.cpp 0.3.36 then places q8_0 and k-quant weights into AMX buffers whose matrix multiply
segfaults in ``llama_decode`` (ggml-org/llama.cpp#20824, no upstream fix; dspy removed its AMX build variant for the
same crash). Loading with ``llama_model_params.use_extra_bufts = False`` keeps the weights in plain CPU buffers,
which decode correctly on those machines. It also turns off the CPU "repack" buffers (weights re-laid out for
AVX2/AVX-512 kernels), so it is applied only where it is needed: :func:`extra_buffers_enabled` says when.
``bench/llama_buffers.py`` measures what it costs on a CPU where the default does not crash.

Override with ``EDGEDISTILL_LLAMA_EXTRA_BUFFERS=on|off`` (default ``auto``: off exactly when the llama.cpp build
has AMX kernels or the CPU reports AMX).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.deps import require
from edgedistill.errors import EdgeDistillError
from edgedistill.system import cpu_flags

EXTRA_BUFFERS_ENV = "EDGEDISTILL_LLAMA_EXTRA_BUFFERS"
AMX_FLAGS = frozenset({"amx_int8", "amx_tile", "amx_bf16"})


def build_has_amx(llama_cpp: Any) -> bool:
    """Whether this llama.cpp build contains the AMX backend (its system-info line says ``AMX_INT8 = 1``)."""
    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    return "AMX_INT8 = 1" in info


def extra_buffers_enabled(llama_cpp: Any) -> bool:
    """Whether to load weights into llama.cpp's extra buffer types (AMX, CPU repack): see the module docstring.

    Raises:
        EdgeDistillError: ``EDGEDISTILL_LLAMA_EXTRA_BUFFERS`` holds something other than auto, on or off.
    """
    setting = os.environ.get(EXTRA_BUFFERS_ENV, "auto").strip().lower() or "auto"
    if setting in ("on", "1", "true"):
        return True
    if setting in ("off", "0", "false"):
        return False
    if setting != "auto":
        raise EdgeDistillError(f"{EXTRA_BUFFERS_ENV}={setting!r}: expected auto, on or off")
    return not (build_has_amx(llama_cpp) or AMX_FLAGS & cpu_flags())


@functools.lru_cache(maxsize=1)
def _init_backend(llama_cpp: Any) -> None:
    llama_cpp.llama_backend_init()


class LlamaCpp:
    """One GGUF model and one context in llama.cpp, with a batch for evaluating token ids.

    Args:
        path: the GGUF file.
        n_ctx: context length (positions).
        n_batch: the most tokens evaluated in one ``llama_decode`` (also the micro-batch).
        threads: CPU threads for decoding and prompt evaluation.
        f32_cache: keep keys and values in float32 (llama.cpp's default float16 cache moves the logits of a
            float32 model by up to 0.05).
        flash_attn: llama.cpp's flash attention.
        vocab_only: load the tokenizer only (no weights, no context).
        verbose: let llama.cpp log to stderr (otherwise errors only).
        sequences: independent sequences (ids ``0 .. sequences - 1``) the context holds, each in its own stream of
            the KV cache of ``n_ctx`` positions (llama.cpp's ``kv_unified = false``): a sequence's keys and values
            lie in the same cells as when it is alone, so :meth:`decode_step` over several sequences gives each
            the logits it would get alone (measured bit for bit on SmolLM2 Q4_1; ``tests/test_teacher_data.py``).

    Raises:
        EdgeDistillError: llama-cpp-python missing, or llama.cpp refused the file or the context.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 512,
        n_batch: int = 512,
        threads: int = 1,
        f32_cache: bool = False,
        flash_attn: bool = False,
        vocab_only: bool = False,
        verbose: bool = False,
        sequences: int = 1,
    ) -> None:
        llama_cpp = require("llama_cpp")
        _init_backend(llama_cpp)
        # llama-cpp-python routes llama.cpp's log through this logger, printing everything while it is unset.
        logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
        self._lib = llama_cpp
        self.path = Path(path)
        self.threads, self.f32_cache, self.flash_attn = max(1, threads), f32_cache, flash_attn
        self.model: Any = None
        self.ctx: Any = None
        self._batch: Any = None
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        params.vocab_only = vocab_only
        params.use_extra_bufts = extra_buffers_enabled(llama_cpp)
        self.extra_buffers = bool(params.use_extra_bufts)
        # Weights paged in from the file on first use, as llama-cpp-python's Llama loads them (use_mmap=True); the
        # C default "auto" may pick another mode.
        params.load_mode = llama_cpp.LLAMA_LOAD_MODE_MMAP
        self.uses_mmap = True
        self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.model:
            raise EdgeDistillError(f"{self.path}: llama.cpp cannot load this model")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_ctx = self.n_batch = 0
        self.sequences = 0
        if vocab_only:
            return
        sequences = max(1, sequences)
        ctx_params = llama_cpp.llama_context_default_params()
        # llama.cpp gives each sequence's stream n_ctx / n_seq_max positions, rounded down to a multiple of 256
        per_sequence = n_ctx if sequences == 1 else -(-n_ctx // 256) * 256
        ctx_params.n_ctx = per_sequence * sequences
        ctx_params.n_seq_max = sequences
        ctx_params.kv_unified = False
        ctx_params.n_batch = ctx_params.n_ubatch = max(min(n_batch, n_ctx), sequences)
        ctx_params.n_threads = ctx_params.n_threads_batch = self.threads
        ctx_params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        if f32_cache:
            ctx_params.type_k = ctx_params.type_v = llama_cpp.GGML_TYPE_F32
        ctx_params.no_perf = False  # keep llama.cpp's own timings (llama_perf_context) for the bench
        self.ctx = llama_cpp.llama_init_from_model(self.model, ctx_params)
        if not self.ctx:
            self.close()
            raise EdgeDistillError(f"{self.path}: llama.cpp cannot create a context of {n_ctx} positions")
        self.n_ctx, self.n_batch, self.sequences = n_ctx, int(ctx_params.n_batch), sequences
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)

    # ------------------------------------------------------------------------------------------------ tokenizer

    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; BOS/EOS added as the file says when ``add_special``."""
        lib = self._lib
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (lib.llama_token * capacity)()
        count = lib.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_special, parse_special)
        if count < 0:  # the buffer was too small: -count is the size needed
            capacity = -count
            buffer = (lib.llama_token * capacity)()
            count = lib.llama_tokenize(self.vocab, data, len(data), buffer, capacity, add_special, parse_special)
        return list(buffer[:count])

    def piece(self, token_id: int, special: bool) -> bytes:
        """The bytes of one token (control tokens as their text when ``special``)."""
        lib = self._lib
        size = 64
        while True:
            buffer = (lib.ctypes.c_char * size)()
            count = lib.llama_token_to_piece(self.vocab, token_id, buffer, size, 0, special)
            if count >= 0:
                return bytes(buffer[:count])
            size = -count

    def token_bos(self) -> int:
        return int(self._lib.llama_vocab_bos(self.vocab))

    def token_eos(self) -> int:
        return int(self._lib.llama_vocab_eos(self.vocab))

    def n_params(self) -> int:
        return int(self._lib.llama_model_n_params(self.model))

    # ------------------------------------------------------------------------------------------------- compute

    def truncate(self, length: int, seq: int = -1) -> None:
        """Forget every cached position from ``length`` on, of sequence ``seq`` (-1: of every sequence)."""
        self._lib.llama_memory_seq_rm(self._lib.llama_get_memory(self.ctx), seq, length, -1)

    def is_end(self, token_id: int) -> bool:
        """Whether ``token_id`` ends a generation in llama.cpp's view (end of sequence, of turn, ...)."""
        return bool(self._lib.llama_vocab_is_eog(self.vocab, token_id))

    def evaluate(self, token_ids: Sequence[int], start: int = 0, all_logits: bool = False, seq: int = 0) -> np.ndarray:
        """Evaluate ``token_ids`` at positions ``start, start + 1, …`` of sequence ``seq`` after forgetting that
        sequence's cache from ``start``.

        Returns:
            ``[len(token_ids), n_vocab]`` float32 logits when ``all_logits``, else the last position's
            ``[n_vocab]`` (a view into llama.cpp's buffer, valid until the next call: copy it to keep it).

        Raises:
            EdgeDistillError: nothing to evaluate, the context is full, or llama.cpp failed.
        """
        lib, batch = self._lib, self._batch
        ids = [int(i) for i in token_ids]
        if not ids:
            raise EdgeDistillError("llama.cpp: nothing to evaluate (no token ids)")
        if start + len(ids) > self.n_ctx:
            raise EdgeDistillError(f"{self.path.name}: {start + len(ids)} positions exceed the context of {self.n_ctx}")
        self.truncate(start, seq if self.sequences > 1 else -1)
        out = np.empty((len(ids), self.n_vocab), np.float32) if all_logits else None
        for begin in range(0, len(ids), self.n_batch):
            part = ids[begin : begin + self.n_batch]
            last_chunk = begin + len(part) == len(ids)
            batch.n_tokens = len(part)
            for index, token_id in enumerate(part):
                batch.token[index] = token_id
                batch.pos[index] = start + begin + index
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = seq
                batch.logits[index] = all_logits or (last_chunk and index == len(part) - 1)
            status = lib.llama_decode(self.ctx, batch)
            if status != 0:
                raise EdgeDistillError(
                    f"{self.path.name}: llama.cpp failed to evaluate tokens {start + begin}.. (status {status})"
                )
            if out is not None:
                rows = lib.llama_get_logits(self.ctx)
                out[begin : begin + len(part)] = np.ctypeslib.as_array(rows, shape=(len(part), self.n_vocab))
        if out is not None:
            return out
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))

    def decode_step(self, steps: Sequence[tuple[int, int, int]]) -> np.ndarray:
        """One token for each of several sequences, evaluated in one ``llama_decode`` call.

        Args:
            steps: ``(sequence id, token id, position)`` per sequence, each sequence at most once; the position is
                the sequence's next (its cache holds the positions before it).

        Returns:
            ``[len(steps), n_vocab]`` float32 logits of each sequence's next token, in the order of ``steps``.

        Raises:
            EdgeDistillError: more sequences than the batch holds, a position past the context, or llama.cpp failed.
        """
        lib, batch = self._lib, self._batch
        if not 0 < len(steps) <= min(self.n_batch, self.sequences):
            raise EdgeDistillError(
                f"llama.cpp: {len(steps)} sequences in one step (expected 1 to {min(self.n_batch, self.sequences)})"
            )
        batch.n_tokens = len(steps)
        for index, (seq, token_id, position) in enumerate(steps):
            if not 0 <= position < self.n_ctx:
                raise EdgeDistillError(f"{self.path.name}: position {position} is past the context of {self.n_ctx}")
            batch.token[index] = token_id
            batch.pos[index] = position
            batch.n_seq_id[index] = 1
            batch.seq_id[index][0] = seq
            batch.logits[index] = True
        status = lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise EdgeDistillError(f"{self.path.name}: llama.cpp failed to decode a step of {len(steps)} sequences")
        # row by row through llama_get_logits_ith, which maps a batch index to its output row whatever order
        # llama.cpp computed the sequences in
        out = np.empty((len(steps), self.n_vocab), np.float32)
        for index in range(len(steps)):
            out[index] = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
        return out

    # ------------------------------------------------------------------------------------------------ lifetime

    def close(self) -> None:
        lib = self._lib
        if self._batch is not None:
            lib.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            lib.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may already be gone
            pass
