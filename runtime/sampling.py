"""Choosing the next token from a row of logits, the same way for every backend.

Each backend hands over its float32 logits for the last position; :class:`Sampler` applies, in this order (the
order of Hugging Face's ``generate`` and llama.cpp's default chain): repetition penalty, then greedy choice when
the temperature is 0, else temperature, top-k, top-p and a draw from a seeded generator. numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.text import check_utf8

# A seed must fit numpy's SeedSequence and the JSON integers of an HTTP request.
MAX_SEED = 2**63 - 1
# Top-p first looks at this many most likely tokens; only when they hold less than the requested mass does it sort
# the whole vocabulary. The result is the same either way; a full sort of 49,152 logits costs about 2 ms a token.
NUCLEUS_PREFILTER = 512


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop.

    Attributes:
        max_tokens: the most new tokens to generate (>= 1).
        temperature: 0 chooses the most likely token (greedy); above 0 divides the logits before a random draw.
        top_k: draw among the k most likely tokens only; 0 means no limit.
        top_p: draw among the smallest set of most likely tokens whose probability reaches top_p (0 < top_p <= 1).
        repetition_penalty: divide positive (multiply negative) logits of tokens already in the prompt or the
            output by this factor (> 0; 1 means none), as Hugging Face's ``repetition_penalty``.
        seed: seed of the random draws; None draws a fresh one. Ignored by greedy choice.
        stop: strings that end the generation; the text returned stops before the first one.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise EdgeDistillError(f"sampling: max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise EdgeDistillError(
                f"sampling: temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise EdgeDistillError(f"sampling: top_k must be an integer >= 0 (0 = no limit), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise EdgeDistillError(f"sampling: top_p must lie in (0, 1], got {self.top_p!r}")
        if (
            not _is_number(self.repetition_penalty)
            or not math.isfinite(self.repetition_penalty)
            or self.repetition_penalty <= 0
        ):
            raise EdgeDistillError(
                f"sampling: repetition_penalty must be a finite number > 0 (1 = none), got {self.repetition_penalty!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise EdgeDistillError(f"sampling: seed must be an integer in [0, 2**63 - 1] or None, got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, Iterable) or isinstance(stop, (bytes, dict)):
            raise EdgeDistillError(f"sampling: stop must be a string or a list of strings, got {self.stop!r}")
        stop = tuple(stop)
        for index, item in enumerate(stop):
            if not isinstance(item, str) or not item:
                raise EdgeDistillError(f"sampling: every stop string must be a non-empty string, got {item!r}")
            check_utf8(item, f"sampling: stop[{index}]")
        object.__setattr__(self, "stop", stop)
        # Plain Python numbers from here on, whatever the caller passed (numpy scalars, ints for floats).
        for name in ("max_tokens", "top_k"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        """Whether tokens are chosen by argmax (temperature 0)."""
        return self.temperature == 0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SamplingParams:
        """Build from keyword options (None means the default), naming an unknown option in the error."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise EdgeDistillError(
                f"sampling: unknown option {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})"
            )
        return cls(**{name: value for name, value in options.items() if value is not None})


class Sampler:
    """Chooses one token per call from a row of logits; holds the random generator and the penalised tokens.

    Args:
        params: the sampling settings.
        vocab_size: columns of the logits.
        context_ids: the prompt's token ids; the repetition penalty counts them as already seen.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, context_ids: Sequence[int] = ()) -> None:
        self.params = params
        self.vocab_size = vocab_size
        self._rng = np.random.default_rng(params.seed)
        self._penalize = params.repetition_penalty != 1.0
        self._seen = np.zeros(vocab_size, dtype=bool) if self._penalize else None
        self._seen_ids: list[int] = []
        for token_id in context_ids:
            self.observe(token_id)

    def observe(self, token_id: int) -> None:
        """Record a token as seen (for the repetition penalty)."""
        if self._seen is not None and 0 <= token_id < self.vocab_size and not self._seen[token_id]:
            self._seen[token_id] = True
            self._seen_ids.append(token_id)

    def __call__(self, logits: np.ndarray) -> int:
        """The next token id.

        Args:
            logits: float ``[vocab]``, the model's scores for the next position. Not modified.

        Raises:
            EdgeDistillError: the logits are not finite where it matters (a broken model or file).
        """
        params = self.params
        logits = self.penalized(logits)
        if params.greedy:
            token_id = greedy_token(logits)
        else:
            token_id = sample_token(logits, params.temperature, params.top_k, params.top_p, self._rng)
        self.observe(token_id)
        return token_id

    def penalized(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` with the repetition penalty of the tokens seen so far (the same array when there is none)."""
        if self._penalize and self._seen_ids:
            return apply_repetition_penalty(logits, self._seen_ids, self.params.repetition_penalty)
        return logits

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What a sampling call would draw from, without drawing: ``(token ids, probabilities)`` after the
        repetition penalty, temperature, top-k and top-p (speculative decoding compares two of these).

        Raises:
            EdgeDistillError: greedy settings (temperature 0), or logits that are not finite.
        """
        if self.params.greedy:
            raise EdgeDistillError("sampling: a greedy sampler has no distribution (temperature is 0)")
        params = self.params
        return token_distribution(self.penalized(logits), params.temperature, params.top_k, params.top_p)

    @property
    def rng(self) -> np.random.Generator:
        """The seeded generator the draws come from."""
        return self._rng

    def mark(self) -> int:
        """A point to :meth:`rollback` to: the tokens observed so far."""
        return len(self._seen_ids)

    def rollback(self, mark: int) -> None:
        """Forget the tokens first observed after :meth:`mark` returned ``mark`` (drafted tokens a verifier refused)."""
        if self._seen is not None:
            for token_id in self._seen_ids[mark:]:
                self._seen[token_id] = False
            del self._seen_ids[mark:]


def greedy_token(logits: np.ndarray) -> int:
    """The most likely token id.

    Raises:
        EdgeDistillError: its logit is not finite (a broken model or file).
    """
    token_id = int(np.argmax(logits))
    if not math.isfinite(float(logits[token_id])):
        raise EdgeDistillError("model: the logits are not finite (NaN or infinity); the model file is broken")
    return token_id


def apply_repetition_penalty(logits: np.ndarray, token_ids: Sequence[int], penalty: float) -> np.ndarray:
    """A copy of ``logits`` with the scores of ``token_ids`` penalised (positive divided, negative multiplied).

    Args:
        logits: ``[vocab]``.
        token_ids: distinct ids to penalise.
        penalty: the factor (> 0).
    """
    out = np.array(logits, dtype=np.float32, copy=True)
    index = np.asarray(token_ids, dtype=np.int64)
    scores = out[index]
    out[index] = np.where(scores < 0, scores * penalty, scores / penalty)
    return out


def token_distribution(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """``softmax(logits / temperature)`` restricted by top-k, then top-p, and renormalised.

    Returns:
        ``(token ids, probabilities)``: int64 and float64 arrays of the same length; the probabilities sum to 1.

    Raises:
        EdgeDistillError: the logits hold NaN or no finite value.
    """
    candidates, weights = _candidate_weights(logits, temperature, top_k, top_p)
    if candidates is None:
        candidates = np.arange(weights.shape[0], dtype=np.int64)
    return candidates.astype(np.int64, copy=False), weights / float(weights.sum())


def sample_token(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """Draw one token id from ``softmax(logits / temperature)`` restricted by top-k and top-p.

    Args:
        logits: ``[vocab]`` scores.
        temperature: > 0.
        top_k: keep the k highest scores (0: all).
        top_p: then keep the smallest most-likely set with at least this probability mass (1: all).
        rng: the generator; one uniform draw per call, so a seed gives the same tokens for the same logits.

    Raises:
        EdgeDistillError: the logits hold NaN or no finite value.
    """
    candidates, weights = _candidate_weights(logits, temperature, top_k, top_p)
    return draw_token(candidates, weights, rng)


def draw_token(candidates: np.ndarray | None, weights: np.ndarray, rng: np.random.Generator) -> int:
    """One draw, with one uniform number, from unnormalised ``weights`` over ``candidates`` (None: ids 0..n-1)."""
    cumulative = np.cumsum(weights)
    draw = rng.random() * float(cumulative[-1])
    index = min(int(np.searchsorted(cumulative, draw, side="right")), len(cumulative) - 1)
    return int(index if candidates is None else candidates[index])


def _candidate_weights(
    logits: np.ndarray, temperature: float, top_k: int, top_p: float
) -> tuple[np.ndarray | None, np.ndarray]:
    """The tokens kept by top-k and top-p (None: every token) and their unnormalised weights."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    vocab = scaled.shape[0]
    candidates: np.ndarray | None = None  # None: every token
    if 0 < top_k < vocab:
        candidates = np.argpartition(scaled, vocab - top_k)[vocab - top_k :]
        scaled = scaled[candidates]
    peak = float(np.max(scaled))
    if not math.isfinite(peak):
        raise EdgeDistillError("model: the logits are not finite (NaN or infinity); the model file is broken")
    weights = np.exp(scaled - peak)
    total = float(weights.sum())
    if not math.isfinite(total):
        raise EdgeDistillError("model: the logits hold NaN; the model file is broken")
    if top_p < 1.0:
        order = _most_likely_first(weights, top_p * total)
        cumulative = np.cumsum(weights[order])
        keep = min(int(np.searchsorted(cumulative, top_p * total, side="left")) + 1, len(order))
        order = order[:keep]
        weights = weights[order]
        candidates = order if candidates is None else candidates[order]
    return candidates, weights


def _most_likely_first(weights: np.ndarray, mass: float) -> np.ndarray:
    """Indices of ``weights`` in descending order, as far as needed to reach ``mass`` (all of them if need be)."""
    count = weights.shape[0]
    if count > NUCLEUS_PREFILTER:
        top = np.argpartition(weights, count - NUCLEUS_PREFILTER)[count - NUCLEUS_PREFILTER :]
        if float(weights[top].sum()) >= mass:
            return top[np.argsort(-weights[top], kind="stable")]
    return np.argsort(-weights, kind="stable")
