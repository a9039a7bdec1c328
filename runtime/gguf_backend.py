"""The GGUF backend: llama.cpp (through llama-cpp-python) computes the logits, our sampler chooses the tokens.

llama.cpp can abort the whole process on a malformed file, so :func:`edgedistill.gguf_header.read_gguf_header` (the
shared core's GGUF reader) parses the header first (magic, version, metadata, tensor table) and checks the model it
declares against what llama.cpp asserts on. Only a file that passes is handed to llama.cpp.

The model is opened with :class:`edgedistill.llamacpp.LlamaCpp` (llama-cpp-python's low-level API, with the
weight-buffer choice that keeps AMX CPUs from crashing). Decoding evaluates one token at a time, asking for the
logits of the last position only, and reads them straight from llama.cpp's buffer (``llama_get_logits_ith``, no
copy); the shared sampler chooses the token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

from edgedistill.deps import require
from edgedistill.errors import EdgeDistillError
from edgedistill.gguf_header import read_gguf_header
from edgedistill.llamacpp import LlamaCpp
from edgedistill.runtime.model import (
    LanguageModel,
    ModelInfo,
    check_cache_memory,
    resolve_context,
    resolve_threads,
)
from edgedistill.runtime.text import ChatTemplate, check_utf8

# Prompt tokens per llama.cpp batch.
PREFILL_BATCH = 512
# Metadata keys tokenizer.ggml.{kind}_token_id that end a generation.
END_TOKEN_KINDS = ("eos", "eot", "eom")


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
        llama_cpp = require("llama_cpp")
        path = Path(path)
        header = read_gguf_header(path)
        template = header.metadata.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
        origin = f"{path}: {gguf.Keys.Tokenizer.CHAT_TEMPLATE}"
        if template is not None and not isinstance(template, str):
            raise EdgeDistillError(f"{origin}: must be a string, got {type(template).__name__}")
        if template:
            ChatTemplate(template, origin=origin)  # compiles it: a broken one fails before llama.cpp loads the weights
        trained = header.arch_value("context_length")
        trained = trained if isinstance(trained, int) and trained > 0 else None
        context = resolve_context(context, trained)
        threads = resolve_threads(threads)
        # A float32 file keeps float32 keys and values: llama.cpp's default float16 cache alone moves the logits of
        # a float32 model by up to 0.05 (export/gguf.py), enough to flip a close greedy choice.
        f32_cache = header.quantization == "f32"
        check_cache_memory(context, header.kv_bytes_per_token(f32_cache=f32_cache), path)
        batch = min(PREFILL_BATCH, context)
        # With a float16 cache, llama.cpp's attention without flash attention computes a position's logits
        # differently in a batch of tokens than alone (up to 0.9 on SmolLM2-135M q8_0), so a speculative teacher's
        # batched check could choose other tokens than its one-at-a-time decoding; flash attention computes both
        # alike (bit for bit, measured), and decodes faster here. A float32 cache is alike either way.
        self.llama = LlamaCpp(
            path,
            n_ctx=context,
            n_batch=batch,
            threads=threads,
            f32_cache=f32_cache,
            flash_attn=not f32_cache,
            verbose=verbose,
        )
        vocab = self.llama.vocab
        n_vocab = self.llama.n_vocab
        self._n_vocab = n_vocab
        # Generation ends at the ids the file names (end of sequence, of turn, of message), as the ONNX backend ends
        # at generation_config.json's: llama.cpp's own end-of-generation set also guesses from token texts (it
        # counts SmolLM2's <|endoftext|> and <reponame>), which would stop where PyTorch goes on.
        named = [header.metadata.get(f"tokenizer.ggml.{kind}_token_id") for kind in END_TOKEN_KINDS]
        self.eos_ids = frozenset(i for i in named if isinstance(i, int) and 0 <= i < n_vocab)
        if not self.eos_ids:
            is_eog = llama_cpp.llama_vocab_is_eog
            self.eos_ids = frozenset(i for i in range(n_vocab) if is_eog(vocab, i))
        is_control = llama_cpp.llama_vocab_is_control
        self._control = frozenset(i for i in range(n_vocab) if is_control(vocab, i)) | self.eos_ids
        self._piece_cache: dict[int, bytes] = {}
        specials = {}
        for name, token_id in (("bos_token", self.llama.token_bos()), ("eos_token", self.llama.token_eos())):
            if 0 <= token_id < n_vocab:
                specials[name] = self._piece(token_id, special=True).decode("utf-8", errors="replace")
        self.chat_template = ChatTemplate(template, specials, origin) if template else None
        self.info = ModelInfo(
            backend="llama.cpp",
            format="gguf",
            path=str(path),
            name=str(header.metadata.get("general.name") or path.stem),
            architecture=header.architecture,
            parameters=self.llama.n_params() or header.parameters,
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
        check_utf8(text, "tokenize: text")
        return self.llama.tokenize(text, add_special=add_special)

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
        return self.llama.piece(token_id, special)

    # -------------------------------------------------------------------------------------------------- compute

    def _evaluate(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        return self.llama.evaluate(token_ids, start)

    def _truncate(self, length: int) -> None:
        self.llama.truncate(length)

    def _all_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.llama.evaluate(token_ids, 0, all_logits=True)

    def _score(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        return self.llama.evaluate(token_ids, start, all_logits=True)

    def close(self) -> None:
        llama = getattr(self, "llama", None)
        if llama is not None:
            llama.close()
            self.llama = None  # type: ignore[assignment]
