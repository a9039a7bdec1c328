"""What every backend shares: the model interface, the generation loop, the KV-cache prefix reuse and the lock.

A backend implements five primitives (tokenize, the bytes of a token, evaluate tokens into its cache, truncate
its cache, logits at every position); :class:`LanguageModel` builds ``generate``, ``stream``, ``chat`` and the
rest on them, so that both formats sample, stop and detokenize identically.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.sampling import Sampler, SamplingParams
from edgedistill.runtime.text import ChatTemplate, IncrementalDecoder, StopMatcher, check_utf8
from edgedistill.system import MAX_CONTEXT, available_cpus

# The context a backend allocates when the caller gives none (tokens), capped by what the model was built for.
# (The most a caller may ask for, MAX_CONTEXT, is the core's: a GGUF file may declare no more.)
DEFAULT_CONTEXT = 2048
FINISH_STOP = "stop"  # an end-of-generation token or a stop string
FINISH_LENGTH = "length"  # max_tokens reached, or the context is full


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is.

    Attributes:
        backend: ``onnxruntime`` or ``llama.cpp``.
        format: ``onnx`` or ``gguf``.
        path: the model file.
        name: the model's name (from its metadata or file name).
        architecture: e.g. ``llama``.
        parameters: number of weights.
        quantization: e.g. ``fp32``, ``int8``, ``q8_0``, ``f16``.
        file_bytes: size on disk of the weights (an ONNX model's external data included).
        context: tokens this instance can hold (prompt plus output).
        trained_context: the longest context the model was built for.
        vocab_size: columns of the logits.
        threads: CPU threads used.
    """

    backend: str
    format: str
    path: str
    name: str
    architecture: str
    parameters: int
    quantization: str
    file_bytes: int
    context: int
    trained_context: int
    vocab_size: int
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    """The result of one generation.

    Attributes:
        text: the generated text (stop string excluded).
        finish_reason: ``stop`` (end token or stop string) or ``length`` (max_tokens or a full context).
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens generated (the end token included, as llama.cpp and OpenAI count).
        token_ids: the generated ids.
        prefill_seconds: time to evaluate the prompt and choose the first token.
        decode_seconds: time for the remaining tokens.
        speculative: with a draft model, what the drafting did (:class:`~edgedistill.runtime.speculative.
            SpeculativeModel`: rounds, drafted and accepted tokens); None without one.
    """

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    prefill_seconds: float
    decode_seconds: float
    speculative: dict[str, Any] | None = None

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first per second of decoding (0 when fewer than two were generated)."""
        steps = self.completion_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


class TextStream:
    """An iterator of text pieces; once exhausted, :attr:`completion` holds the whole result.

    The model stays locked for this stream from the first ``next`` until the end or :meth:`close`.
    """

    def __init__(self, pieces: Iterator[str], holder: dict[str, Completion]) -> None:
        self._pieces = pieces
        self._holder = holder

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating and release the model."""
        self._pieces.close()  # type: ignore[attr-defined]

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def completion(self) -> Completion:
        """The result; raises if the stream has not been read to its end."""
        if "completion" not in self._holder:
            raise EdgeDistillError("stream: the completion is known only after the stream has been read to its end")
        return self._holder["completion"]


class LanguageModel(ABC):
    """A loaded model: tokenizer, chat template, KV cache, and the generation methods.

    Backends set :attr:`info`, :attr:`eos_ids` and :attr:`chat_template` and implement the abstract primitives.
    One generation runs at a time per model: other threads wait for the model's lock; starting a second
    generation in a thread whose first one is still open raises.
    """

    info: ModelInfo
    eos_ids: frozenset[int]
    chat_template: ChatTemplate | None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._cached: list[int] = []  # the token ids whose keys and values are in the cache, in order

    # ------------------------------------------------------------------------------------------- backend primitives

    @abstractmethod
    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Token ids of ``text``; special-token text (e.g. ``<|im_end|>``) becomes its id.

        Args:
            text: the text.
            add_special: add BOS/EOS as the model's tokenizer configuration says (chat prompts rendered from the
                template already hold them and pass False).
        """

    @abstractmethod
    def detokenize(self, token_ids: Sequence[int], special: bool = True) -> str:
        """The text of ``token_ids``; control tokens are written out when ``special``, omitted otherwise."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for in generated text (empty for control tokens)."""

    @abstractmethod
    def _evaluate(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Run ``token_ids`` at positions ``start...`` (the cache holds exactly ``start`` tokens before).

        Returns:
            float32 ``[vocab]``: the logits after the last of them. May be a view of a buffer that the next call
            overwrites.
        """

    @abstractmethod
    def _truncate(self, length: int) -> None:
        """Forget cached positions from ``length`` on."""

    @abstractmethod
    def _all_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 ``[n, vocab]`` logits at every position of ``token_ids`` from an empty cache."""

    @abstractmethod
    def _score(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Like :meth:`_evaluate` (the cache then holds ``start + len(token_ids)`` tokens), returning the logits
        after each of them: float32 ``[len(token_ids), vocab]``, an array of its own. A speculative model's
        teacher checks a draft's tokens with one call."""

    def close(self) -> None:
        """Free the backend's resources; the model cannot be used afterwards."""

    def __enter__(self) -> LanguageModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------------ public

    @property
    def context(self) -> int:
        """Tokens this instance holds: prompt plus output."""
        return self.info.context

    def reset_cache(self) -> None:
        """Empty the KV cache: the next :meth:`evaluate` starts at position 0."""
        with self._locked():
            self._cached = []
            self._truncate(0)

    def evaluate(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Run ``token_ids`` at positions ``start...`` through the cache and return the last position's logits.

        The low-level step that generation is made of, for measurement loops (the bench times prefill and each
        decode step with it): the cache must hold exactly ``start`` tokens (after :meth:`reset_cache`, 0).
        The result may be a view of a buffer that the next call overwrites. Call :meth:`reset_cache` afterwards:
        generation does not reuse what this left in the cache.
        """
        with self._locked():
            self._cached = []  # what is cached is no longer a prefix generation may reuse
            return self._evaluate(token_ids, start)

    def score(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        """Like :meth:`evaluate`, but the logits after each of ``token_ids``: float32 ``[n, vocab]``, an array of
        its own. What a speculative teacher's check of n tokens costs (the bench times it)."""
        with self._locked():
            self._cached = []
            return self._score(token_ids, start)

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 ``[len(token_ids), vocab]``: the logits at every position, for evaluation (perplexity, parity).

        Raises:
            EdgeDistillError: no ids, ids outside the vocabulary, or more ids than the context holds.
        """
        ids = self._check_ids(token_ids, "token_ids")
        with self._locked():
            self._cached = []
            self._truncate(0)
            return self._all_logits(ids)

    def stream(self, prompt: str, **options: Any) -> TextStream:
        """Generate from a plain-text prompt, as an iterator of text pieces.

        Args:
            prompt: the text; BOS is added as the model's tokenizer says.
            **options: :class:`~edgedistill.runtime.sampling.SamplingParams` fields: ``max_tokens``,
                ``temperature`` (0 = greedy, the default), ``top_k``, ``top_p``, ``repetition_penalty``, ``seed``,
                ``stop``.

        Raises:
            EdgeDistillError: a nonsense option, or a prompt that leaves no room in the context. Checked here,
                before the first piece.
        """
        if not isinstance(prompt, str):
            raise EdgeDistillError(f"prompt: must be a string, got {type(prompt).__name__}")
        check_utf8(prompt, "prompt")
        return self.stream_ids(self.tokenize(prompt, add_special=True), SamplingParams.from_options(options))

    def generate(self, prompt: str, **options: Any) -> str:
        """The generated text for a plain-text prompt (options as :meth:`stream`)."""
        return self.complete(prompt, **options).text

    def complete(self, prompt: str, **options: Any) -> Completion:
        """Like :meth:`generate`, with token counts, finish reason and timings."""
        stream = self.stream(prompt, **options)
        for _ in stream:
            pass
        return stream.completion

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text the chat template makes of ``messages``, ending with the assistant's turn.

        Raises:
            EdgeDistillError: malformed messages, or a model without a chat template.
        """
        if self.chat_template is None:
            raise EdgeDistillError(f"{Path(self.info.path).name} has no chat template; use generate() with plain text")
        return self.chat_template.render(messages, add_generation_prompt=True)

    def chat_stream(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> TextStream:
        """The assistant's reply to ``messages`` as an iterator of text pieces (options as :meth:`stream`)."""
        prompt_ids = self.tokenize(self.render_chat(messages), add_special=False)
        return self.stream_ids(prompt_ids, SamplingParams.from_options(options))

    def chat(self, messages: Sequence[Mapping[str, Any]], **options: Any) -> str:
        """The assistant's reply to ``messages``, e.g. ``[{"role": "user", "content": "Hi"}]``."""
        stream = self.chat_stream(messages, **options)
        return "".join(stream)

    def stream_ids(self, prompt_ids: Sequence[int], params: SamplingParams) -> TextStream:
        """Generate from token ids (the other methods end here).

        Raises:
            EdgeDistillError: empty prompt, ids outside the vocabulary, or no room left in the context.
        """
        ids = self._check_ids(prompt_ids, "prompt", limit=False)
        if len(ids) >= self.context:
            raise EdgeDistillError(
                f"prompt: {len(ids)} tokens do not fit the context of {self.context} tokens with room for output "
                f"(load the model with a larger context, up to {self.info.trained_context}, or shorten the prompt)"
            )
        holder: dict[str, Completion] = {}
        return TextStream(self._pieces(ids, params, holder), holder)

    # ----------------------------------------------------------------------------------------------------- helpers

    def _check_ids(self, token_ids: Sequence[int], what: str, limit: bool = True) -> list[int]:
        if isinstance(token_ids, (str, bytes)) or not all(
            isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) for i in token_ids
        ):
            raise EdgeDistillError(f"{what}: token ids must be a sequence of integers")
        ids = [int(i) for i in token_ids]
        if not ids:
            raise EdgeDistillError(f"{what}: is empty (no tokens)")
        vocab = self.info.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise EdgeDistillError(f"{what}: token id {bad[0]} is outside the vocabulary of {vocab}")
        if limit and len(ids) > self.context:
            raise EdgeDistillError(f"{what}: {len(ids)} tokens exceed the context of {self.context} tokens")
        return ids

    def _locked(self) -> _ModelLock:
        return _ModelLock(self)

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Evaluate the prompt, reusing the cached prefix it shares with the previous generation."""
        # At least one token runs, so that there are logits to sample from.
        shared = min(common_prefix(self._cached, ids), len(ids) - 1)
        self._cached = self._cached[:shared]
        self._truncate(shared)
        try:
            logits = self._evaluate(ids[shared:], shared)
        except BaseException:
            self._cached = []
            self._truncate(0)
            raise
        self._cached = list(ids)
        return logits

    def _tokens(self, ids: list[int], sampler: Sampler, params: SamplingParams, stats: dict[str, Any]) -> Iterator[int]:
        """The generated token ids, one per ``next``: the prompt is evaluated first, then each token when the next
        one is asked for. Keeps ``self._cached`` equal to what the cache holds. (A speculative model overrides this
        to produce several tokens per teacher evaluation; ``stats`` receives what it measured.)"""
        logits = self._prefill(ids)
        while True:
            token_id = sampler(logits)
            yield token_id
            try:
                logits = self._evaluate([token_id], len(self._cached))
            except BaseException:
                self._cached = []
                self._truncate(0)
                raise
            self._cached.append(token_id)

    def _pieces(self, ids: list[int], params: SamplingParams, holder: dict[str, Completion]) -> Iterator[str]:
        with self._locked():
            started = time.perf_counter()
            sampler = Sampler(params, self.info.vocab_size, ids)
            decoder = IncrementalDecoder(self.token_bytes)
            stops = StopMatcher(params.stop)
            generated: list[int] = []
            finish = FINISH_LENGTH
            stopped = False  # by a stop string
            text_parts: list[str] = []
            first_token_at = None
            stats: dict[str, Any] = {}
            tokens = self._tokens(ids, sampler, params, stats)
            try:
                for token_id in tokens:
                    generated.append(token_id)
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    if token_id in self.eos_ids:
                        finish = FINISH_STOP
                        break
                    piece, stopped = stops.push(decoder.add(token_id))
                    if piece:
                        text_parts.append(piece)
                        yield piece
                    # The next token needs this one evaluated: it must fit the context.
                    if stopped or len(generated) >= params.max_tokens or len(ids) + len(generated) > self.context:
                        break
            finally:
                tokens.close()
            if stopped:
                finish = FINISH_STOP
            else:
                # Bytes of an incomplete character, then the text held back in case it began a stop string.
                tail, stopped = stops.push(decoder.flush())
                if stopped:
                    finish = FINISH_STOP
                else:
                    tail += stops.flush()
                if tail:
                    text_parts.append(tail)
                    yield tail
            ended = time.perf_counter()
            holder["completion"] = Completion(
                text="".join(text_parts),
                finish_reason=finish,
                prompt_tokens=len(ids),
                completion_tokens=len(generated),
                token_ids=generated,
                prefill_seconds=(first_token_at or ended) - started,
                decode_seconds=ended - (first_token_at or ended),
                speculative=stats or None,
            )


def common_prefix(cached: Sequence[int], ids: Sequence[int]) -> int:
    """How many leading tokens two sequences share (the cached prefix a new prompt can reuse)."""
    shared = 0
    for old, new in zip(cached, ids):
        if old != new:
            break
        shared += 1
    return shared


def resolve_context(context: int | None, trained: int | None) -> int:
    """The context to allocate: the caller's (checked against the model's maximum) or the default.

    Args:
        context: what the caller asked for (None: :data:`DEFAULT_CONTEXT`, capped by ``trained``).
        trained: the model's maximum, when known.

    Raises:
        EdgeDistillError: not an integer >= 2, or beyond the model's maximum.
    """
    if context is None:
        return min(DEFAULT_CONTEXT, trained) if trained else DEFAULT_CONTEXT
    if isinstance(context, bool) or not isinstance(context, int) or context < 2:
        raise EdgeDistillError(f"context: must be an integer >= 2 tokens, got {context!r}")
    if trained and context > trained:
        raise EdgeDistillError(f"context: {context} tokens exceed the model's maximum of {trained}")
    if context > MAX_CONTEXT:
        raise EdgeDistillError(f"context: {context} tokens exceed the runtime's maximum of {MAX_CONTEXT}")
    return context


def check_cache_memory(context: int, bytes_per_token: int, path: str | Path) -> None:
    """Refuse a key/value cache larger than this machine's memory before a backend tries to allocate it.

    Args:
        context: positions the cache holds.
        bytes_per_token: keys plus values of one position, all layers.
        path: the model, for the message.

    Raises:
        EdgeDistillError: the cache would not fit the physical memory.
    """
    import psutil

    needed = context * bytes_per_token
    total = psutil.virtual_memory().total
    if needed > total:
        raise EdgeDistillError(
            f"context: a cache of {context} tokens for {Path(path).name} needs {needed / 2**30:.1f} GiB, more than "
            f"this machine's {total / 2**30:.1f} GiB of memory (load it with a smaller context)"
        )


def resolve_threads(threads: int | None) -> int:
    """CPU threads to use: the caller's, or every CPU this process may run on (None or 0).

    Raises:
        EdgeDistillError: not a non-negative integer.
    """
    if threads is None or (isinstance(threads, int) and not isinstance(threads, bool) and threads == 0):
        return len(available_cpus())
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise EdgeDistillError(f"threads: must be a positive integer (0 or None: all CPUs), got {threads!r}")
    return threads


class _ModelLock:
    """The model's lock for one generation; refuses re-entry from the thread that holds it."""

    def __init__(self, model: LanguageModel) -> None:
        self._model = model

    def __enter__(self) -> None:
        model = self._model
        if model._owner == threading.get_ident():
            raise EdgeDistillError(
                "model: a generation from this model is still open in this thread; read it to the end or close() it"
            )
        model._lock.acquire()
        model._owner = threading.get_ident()

    def __exit__(self, *exc: object) -> None:
        self._model._owner = None
        self._model._lock.release()
