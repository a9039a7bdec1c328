"""Batched generation from a GGUF teacher in llama.cpp: several sequences decoded together, each as if alone.

The library half of ``edgedistill teacher-data`` (:mod:`edgedistill.distill.teacher_data`); the idea is the one
``corpus/build_chat.py`` used in PyTorch (a batch of prompts through the teacher with its KV cache, one token per
sequence per forward), done in llama.cpp so that a quantized GGUF teacher runs in its own quantization.

How a group of prompts is decoded (:meth:`BatchedGenerator.generate`):

- Each sequence has its own id and its own stream of the KV cache (:class:`~edgedistill.llamacpp.LlamaCpp` with
  ``sequences``), so its keys and values lie in the cells they would occupy if it were alone. (In one unified
  cache, measured on SmolLM2 Q4_1, the interleaved cells changed the attention sums' rounding and so greedy
  tokens; separate streams gave the same tokens as one sequence alone.)
- A multi-token evaluation (a prompt, or the forced tags of a reasoning answer) runs one sequence per call, exactly
  as it would alone; every decoding step then evaluates the last sampled token of *every* unfinished sequence in
  one ``llama_decode`` call. llama.cpp's CPU matrix products treat the rows of a batch independently, so each
  sequence gets the logits it would get alone, and the answers do not depend on the batch size or on which
  prompts share a batch (checked token for token in ``tests/test_teacher_data.py``, and on SmolLM2 Q4_1).
- A group decodes until its last answer ends (finished sequences leave the step; their slot is not refilled), so a
  resumed run, which regroups only the prompts still to do, decodes every group exactly as before.
- Every sequence samples with its own random generator (seeded by the caller per prompt and sample), so the text
  is the same whatever batch a prompt lands in: a resumed run writes what an uninterrupted one would.

**Reasoning answers by construction.** A small teacher does not write ``<think>``/``<answer>`` tags by itself, so
the structure is imposed: the prompt ends with the assistant turn opened by ``<think>\\n`` (the caller adds it); the
teacher writes until it emits a tag of its own (cut there), ends its turn, or reaches the think budget; the cache is
then rewound to the end of the prompt and re-fed the think text followed by ``\\n</think>\\n<answer>\\n``, and the
teacher writes the answer until it ends its turn, writes a tag (cut there) or reaches the token budget;
``\\n</answer>`` closes it. The content is therefore always
``<think>\\nTHINK\\n</think>\\n<answer>\\nANSWER\\n</answer>`` with each tag exactly once, in order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgedistill.errors import EdgeDistillError

THINK_OPEN = "<think>\n"  # what the caller appends to a reasoning prompt's opened assistant turn
THINK_CLOSE = "\n</think>\n<answer>\n"
ANSWER_CLOSE = "\n</answer>"
TAGS = (b"<think>", b"</think>", b"<answer>", b"</answer>")
# Finish reasons: the teacher ended its turn, wrote a reasoning tag itself (cut there), reached the token budget,
# or filled the sequence's context.
FINISHES = ("end", "tag", "limit", "context")


@dataclass(frozen=True)
class Sampling:
    """How a token is chosen: ``temperature`` 0 is greedy; else softmax(logits / T) within top-k, then top-p."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0


def choose_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token id from ``logits`` ([n_vocab]); one uniform draw from ``rng`` unless greedy.

    Candidates are ordered by probability, then id, before the draw, so that equal logits give equal tokens.

    Raises:
        EdgeDistillError: the logits are not finite.
    """
    if sampling.temperature <= 0:
        token_id = int(np.argmax(logits))
        if not math.isfinite(float(logits[token_id])):
            raise EdgeDistillError("teacher: the logits are not finite (NaN or infinity); the model file is broken")
        return token_id
    scaled = np.asarray(logits, dtype=np.float64) / sampling.temperature
    vocab = scaled.shape[0]
    candidates = np.arange(vocab)
    if 0 < sampling.top_k < vocab:
        candidates = np.argpartition(scaled, vocab - sampling.top_k)[vocab - sampling.top_k :]
    scores = scaled[candidates]
    peak = float(scores.max())
    if not math.isfinite(peak) or np.isnan(scores).any():
        raise EdgeDistillError("teacher: the logits are not finite (NaN or infinity); the model file is broken")
    order = np.lexsort((candidates, -scores))  # most likely first, ties by id
    candidates, weights = candidates[order], np.exp(scores[order] - peak)
    cumulative = np.cumsum(weights)
    if sampling.top_p < 1.0:
        keep = int(np.searchsorted(cumulative, sampling.top_p * cumulative[-1], side="left")) + 1
        candidates, cumulative = candidates[:keep], cumulative[:keep]
    index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    return int(candidates[min(index, len(candidates) - 1)])


@dataclass
class Job:
    """One answer to generate: ``prompt_ids`` is the rendered prompt (the assistant turn opened, and for a
    reasoning prompt ``<think>\\n`` after it); ``seed`` seeds this answer's own random generator."""

    key: tuple[int, int]  # (prompt index, sample)
    prompt_ids: list[int]
    reasoning: bool
    seed: Sequence[int]


@dataclass
class Answer:
    """The assistant content for a :class:`Job`, its sampled token count and why it stopped (:data:`FINISHES`)."""

    key: tuple[int, int]
    content: str
    tokens: int
    finish: str
    think_tokens: int = 0
    think_finish: str = ""
    token_ids: list[int] = field(default_factory=list)  # every sampled id, in order (forced tags not included)


@dataclass
class GenerationStats:
    """Where the time of :meth:`BatchedGenerator.generate` went.

    ``tokens``: tokens sampled (every answer token, end-of-turn tokens included); ``prompt_tokens`` and
    ``prompt_seconds``: the multi-token evaluations (prompts, forced tags); ``decode_tokens`` and
    ``decode_seconds``: the batched one-token-per-sequence steps (``decode_steps`` calls); ``seconds``: wall time.
    The ``*cpu_seconds`` are this process's CPU time over the same spans: a fairer rate than wall time on a shared
    machine when llama.cpp runs one thread (with more, its threads also count while they spin at a barrier).
    """

    tokens: int = 0
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    prompt_cpu_seconds: float = 0.0
    decode_tokens: int = 0
    decode_steps: int = 0
    decode_seconds: float = 0.0
    decode_cpu_seconds: float = 0.0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    def add(self, other: GenerationStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


def _decode_text(data: bytes) -> str:
    """UTF-8 text of generated bytes, stripped; a character cut off by the token budget is dropped."""
    return data.decode("utf-8", errors="replace").strip().removesuffix("\ufffd").strip()


def _first_tag(data: bytes) -> int:
    """The byte offset of the first reasoning tag in ``data``, or -1."""
    found = [i for i in (data.find(tag) for tag in TAGS) if i >= 0]
    return min(found) if found else -1


@dataclass
class _Stream:
    """One sequence being generated: its slot (sequence id), position, phase and text so far."""

    job: Job
    slot: int
    rng: np.random.Generator
    position: int = 0  # the next position to evaluate
    phase: str = "answer"  # "think" or "answer"
    text: bytearray = field(default_factory=bytearray)  # what the current phase has written
    phase_tokens: int = 0
    tokens: int = 0
    think: str = ""
    think_tokens: int = 0
    think_finish: str = ""
    pending: int = -1  # the sampled token to evaluate at the next step
    sampled: list[int] = field(default_factory=list)
    answer: Answer | None = None


class BatchedGenerator:
    """A GGUF teacher in llama.cpp that generates answers for groups of prompts, decoded together.

    Args:
        path: the ``.gguf`` file.
        sequences: the most prompts in one group (the batch).
        context: positions per sequence (prompt, think text, tags and answer).
        threads: llama.cpp CPU threads.
        f32_cache: float32 keys and values (for a float32 file: llama.cpp's float16 cache moves its logits).
        flash_attn: llama.cpp's flash attention.

    Raises:
        EdgeDistillError: llama.cpp cannot load the file or make the context.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        sequences: int,
        context: int,
        threads: int,
        f32_cache: bool = False,
        flash_attn: bool = True,
    ) -> None:
        from edgedistill.llamacpp import LlamaCpp

        self.llama = LlamaCpp(
            path,
            n_ctx=context,
            n_batch=min(512, context),
            threads=threads,
            f32_cache=f32_cache,
            flash_attn=flash_attn,
            sequences=sequences,
        )
        self.sequences, self.context = sequences, context
        self._pieces: dict[int, bytes] = {}
        self._think_close = self.llama.tokenize(THINK_CLOSE, add_special=False)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text (special tokens such as ``<|im_start|>`` parsed, nothing added)."""
        return self.llama.tokenize(text, add_special=False, parse_special=True)

    def close(self) -> None:
        self.llama.close()

    def __enter__(self) -> BatchedGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------------------------- generate

    def generate(
        self, jobs: Sequence[Job], sampling: Sampling, max_new_tokens: int, think_tokens: int
    ) -> tuple[list[Answer], GenerationStats]:
        """Answers for ``jobs`` (at most ``sequences`` of them), decoded together.

        Args:
            jobs: the prompts of one group.
            sampling: how tokens are chosen.
            max_new_tokens: the most tokens an answer samples (a reasoning answer: think and answer together).
            think_tokens: the most tokens of a reasoning answer's think part (< ``max_new_tokens``).

        Returns:
            The answers in the order of ``jobs``, and the time spent.

        Raises:
            EdgeDistillError: more jobs than sequences, a prompt that leaves no room in the context, or llama.cpp
                failed.
        """
        if not 0 < len(jobs) <= self.sequences:
            raise EdgeDistillError(f"teacher: a group of {len(jobs)} prompts (expected 1 to {self.sequences})")
        if not 0 < think_tokens < max_new_tokens:
            raise EdgeDistillError(f"teacher: think tokens {think_tokens} must be in [1, {max_new_tokens - 1}]")
        run = _Run(sampling, max_new_tokens, think_tokens, GenerationStats())
        started, cpu_started = time.perf_counter(), time.process_time()
        streams = [
            _Stream(job, slot, np.random.default_rng(list(job.seed)), phase="think" if job.reasoning else "answer")
            for slot, job in enumerate(jobs)
        ]
        try:
            for stream in streams:
                if len(stream.job.prompt_ids) + len(self._think_close) + 2 > self.context:
                    raise EdgeDistillError(
                        f"prompt {stream.job.key[0] + 1}: {len(stream.job.prompt_ids)} tokens leave no room for an "
                        f"answer in the context of {self.context}"
                    )
                self._take(stream, self._evaluate(stream, stream.job.prompt_ids, 0, run), run)
            active = [s for s in streams if s.answer is None]
            while active:
                tick, cpu_tick = time.perf_counter(), time.process_time()
                rows = self.llama.decode_step([(s.slot, s.pending, s.position) for s in active])
                run.stats.decode_seconds += time.perf_counter() - tick
                run.stats.decode_cpu_seconds += time.process_time() - cpu_tick
                run.stats.decode_tokens += len(active)
                run.stats.decode_steps += 1
                for stream, row in zip(active, rows):
                    stream.position += 1
                    self._take(stream, row, run)
                active = [s for s in active if s.answer is None]
        finally:
            for stream in streams:
                self.llama.truncate(0, stream.slot)  # the slot is free for the next group
        run.stats.tokens = sum(s.tokens for s in streams)
        run.stats.seconds = time.perf_counter() - started
        run.stats.cpu_seconds = time.process_time() - cpu_started
        return [s.answer for s in streams if s.answer is not None], run.stats

    def _evaluate(self, stream: _Stream, token_ids: list[int], start: int, run: _Run) -> np.ndarray:
        """Evaluate several tokens of one sequence, alone in the call; the next token's logits."""
        tick, cpu_tick = time.perf_counter(), time.process_time()
        logits = self.llama.evaluate(token_ids, start, seq=stream.slot)
        run.stats.prompt_seconds += time.perf_counter() - tick
        run.stats.prompt_cpu_seconds += time.process_time() - cpu_tick
        run.stats.prompt_tokens += len(token_ids)
        stream.position = start + len(token_ids)
        return logits

    def _piece(self, token_id: int) -> bytes:
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._pieces[token_id] = self.llama.piece(token_id, special=False)
        return piece

    def _take(self, stream: _Stream, logits: np.ndarray, run: _Run) -> None:
        """Sample the stream's next token from ``logits`` and move on: continue, end the think part, or finish."""
        token_id = choose_token(logits, run.sampling, stream.rng)
        stream.sampled.append(token_id)
        stream.tokens += 1
        stream.phase_tokens += 1
        cut = -1
        if self.llama.is_end(token_id):
            finish = "end"
        else:
            stream.text += self._piece(token_id)
            cut = _first_tag(bytes(stream.text)) if stream.job.reasoning else -1
            budget = run.think_tokens if stream.phase == "think" else run.max_new_tokens - stream.think_tokens
            if cut >= 0:
                finish = "tag"
            elif stream.phase_tokens >= budget:
                finish = "limit"
            elif stream.position >= self.context:
                finish = "context"
            else:
                stream.pending = token_id
                return
        text = _decode_text(bytes(stream.text[:cut] if cut >= 0 else stream.text))
        if stream.phase == "think":
            # rewind to the end of the prompt, feed the think text and the tags, and let the teacher answer
            stream.think, stream.think_tokens, stream.think_finish = text, stream.phase_tokens, finish
            stream.phase, stream.phase_tokens, stream.text = "answer", 0, bytearray()
            forced = (self.tokenize(text) if text else []) + self._think_close
            start = len(stream.job.prompt_ids)
            if start + len(forced) < self.context:
                self._take(stream, self._evaluate(stream, forced, start, run), run)
                return
            text, finish = "", "context"  # no room left for an answer
        content = f"{THINK_OPEN}{stream.think}{THINK_CLOSE}{text}{ANSWER_CLOSE}" if stream.job.reasoning else text
        stream.answer = Answer(
            stream.job.key, content, stream.tokens, finish, stream.think_tokens, stream.think_finish, stream.sampled
        )


@dataclass
class _Run:
    """The settings and the running statistics of one :meth:`BatchedGenerator.generate` call."""

    sampling: Sampling
    max_new_tokens: int
    think_tokens: int
    stats: GenerationStats
