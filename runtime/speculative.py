"""Speculative decoding: a small draft model proposes tokens, the teacher checks them all in one evaluation.

    from edgedistill.runtime import load

    model = load("teacher-q8_0.gguf", draft="student-q8_0.gguf", threads=2)
    print(model.generate("The capital of France is", max_tokens=64))
    print(model.complete("Once upon a time", max_tokens=64).speculative)  # rounds, drafted, accepted

Each round the draft proposes up to k tokens, one at a time from its own cache; the teacher evaluates the token it
has not seen yet plus the k proposals in one batched call (at prefill speed) and gets its own distribution at each
of them. Proposals are kept from the left while the teacher agrees; the first refused one is replaced by the
teacher's own choice, and when all are kept the teacher's distribution after the last one gives one token more. So
every round yields between 1 and k + 1 tokens for one teacher evaluation. Both caches roll back to the kept tokens
(:meth:`LanguageModel._truncate`): nothing of the prefix is evaluated again.

* Greedy (temperature 0): a proposal is kept when it is the teacher's argmax (after the repetition penalty), so the
  output is the teacher's own greedy output token for token. (A backend may round a batched evaluation differently
  from a one-token one; the bench checks the outputs are identical on real models.)
* Sampling: the rejection scheme of Leviathan et al. (2023) and Chen et al. (2023). With p the teacher's and q the
  draft's distribution at a position (each after the same repetition penalty, temperature, top-k and top-p), a
  proposal x drawn from q is kept with probability min(1, p(x) / q(x)); a refused one is replaced by a draw from
  max(p - q, 0), renormalised; a round whose proposals are all kept draws one more token from p. Every token then
  follows the teacher's distribution exactly. The draws come from the request's seeded generator, but not in the
  order plain sampling makes them: with a fixed ``draft_tokens`` a seed reproduces a speculative run (not the
  plain run with that seed); with the adaptive k, which follows measured times, it may not.

How many tokens the draft proposes (k) is ``draft_tokens`` when given; otherwise :class:`DraftSchedule` chooses it
before every round from what it has measured so far on this model pair: the share of proposals the teacher keeps,
the draft's cost per proposal and the teacher's cost to check n tokens at once. It takes the k (0 included: no
proposal, the teacher alone) that maximises expected tokens per second, so a draft that does not pay for itself is
mostly left idle rather than slowing the teacher down, and probes it now and then in case the text gets easier.

The draft must speak the teacher's vocabulary: the same tokenizer, or a trimmed subset of it (``distill --vocab``
keeps a subset of the teacher's tokens under new ids). :class:`VocabularyMap` matches the two by the bytes each
token stands for (control tokens by their text) and refuses a draft with a token the teacher lacks. A teacher token
outside a trimmed draft's vocabulary reaches the draft as the draft's own tokens for the same bytes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.model import LanguageModel, common_prefix
from edgedistill.runtime.sampling import Sampler, SamplingParams, draw_token, greedy_token

DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16


def check_draft_tokens(value: Any) -> int | None:
    """``draft_tokens`` as given: None (adaptive) or an integer in [1, :data:`MAX_DRAFT_TOKENS`].

    Raises:
        EdgeDistillError: anything else.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_DRAFT_TOKENS:
        raise EdgeDistillError(
            f"draft_tokens: must be an integer from 1 to {MAX_DRAFT_TOKENS} (or none: adaptive), got {value!r}"
        )
    return int(value)


def _token_keys(model: LanguageModel) -> list[tuple[str, Any]]:
    """What each id of ``model`` stands for: ``("bytes", b)`` for text, ``("control", text)`` for control tokens."""
    keys: list[tuple[str, Any]] = []
    for token_id in range(model.info.vocab_size):
        piece = model.token_bytes(token_id)
        keys.append(("bytes", piece) if piece else ("control", model.detokenize([token_id], special=True)))
    return keys


class VocabularyMap:
    """How a draft's token ids correspond to its teacher's.

    Args:
        teacher: the model that verifies.
        draft: the model that proposes; every token of it must stand for the same bytes (or control text) as some
            token of the teacher.

    Raises:
        EdgeDistillError: a draft token the teacher does not have (another tokenizer), named in the message.
    """

    def __init__(self, teacher: LanguageModel, draft: LanguageModel) -> None:
        teacher_keys = _token_keys(teacher)
        draft_keys = _token_keys(draft)
        index: dict[tuple[str, Any], int] = {}
        for token_id, key in enumerate(teacher_keys):
            index.setdefault(key, token_id)
        to_teacher = np.empty(len(draft_keys), dtype=np.int64)
        for token_id, key in enumerate(draft_keys):
            match = index.get(key)
            if match is None:
                raise EdgeDistillError(
                    f"draft {Path(draft.info.path).name}: its vocabulary does not map onto the teacher's "
                    f"({Path(teacher.info.path).name}): draft token {token_id} ({key[1]!r}) has no counterpart; "
                    "a draft must use the teacher's tokenizer or a trimmed subset of it"
                )
            to_teacher[token_id] = match
        #: draft id -> teacher id
        self.to_teacher = to_teacher
        #: teacher id -> draft id (-1: not in the draft's vocabulary)
        self.to_draft = np.full(len(teacher_keys), -1, dtype=np.int64)
        self.to_draft[to_teacher[::-1]] = np.arange(len(draft_keys) - 1, -1, -1)  # the first of duplicates wins
        self.identity = len(draft_keys) == len(teacher_keys) and bool(
            np.array_equal(to_teacher, np.arange(len(draft_keys)))
        )
        self.draft_size = len(draft_keys)
        self._draft = draft
        self._teacher_keys = teacher_keys
        self._pieces = {key[1]: token_id for token_id, key in enumerate(draft_keys) if key[0] == "bytes"}
        self._longest = max((len(piece) for piece in self._pieces), default=1)
        self._splits: dict[int, list[int]] = {}

    def draft_ids(self, teacher_ids: Sequence[int]) -> list[int]:
        """The draft's tokens for the teacher's: the same token where the draft has it, else the draft's tokens for
        its bytes (a control token the draft lacks is left out)."""
        if self.identity:
            return [int(i) for i in teacher_ids]
        out: list[int] = []
        for token_id in teacher_ids:
            mapped = int(self.to_draft[token_id])
            out.extend((mapped,) if mapped >= 0 else self._split(int(token_id)))
        return out

    def _split(self, teacher_id: int) -> list[int]:
        split = self._splits.get(teacher_id)
        if split is None:
            kind, value = self._teacher_keys[teacher_id]
            split = self._splits[teacher_id] = self._tokenize(value) if kind == "bytes" else []
        return split

    def _tokenize(self, piece: bytes) -> list[int]:
        """The draft tokenizer's ids for ``piece`` when they give back exactly its bytes, else the longest pieces
        of the draft's vocabulary from the left (bytes no piece covers are left out)."""
        try:
            ids = self._draft.tokenize(piece.decode("utf-8"), add_special=False)
            if b"".join(self._draft.token_bytes(i) for i in ids) == piece:
                return ids
        except (UnicodeDecodeError, EdgeDistillError):
            pass  # part of a character: only byte pieces can spell it
        out: list[int] = []
        position = 0
        while position < len(piece):
            for length in range(min(self._longest, len(piece) - position), 0, -1):
                match = self._pieces.get(piece[position : position + length])
                if match is not None:
                    out.append(match)
                    position += length
                    break
            else:
                position += 1
        return out


class DraftSchedule:
    """Chooses k, the tokens the draft proposes next, from measured acceptance and costs (or keeps a fixed k).

    Model: with a share ``a`` of proposals kept (each independently), a round of k proposals yields
    ``(1 - a**(k+1)) / (1 - a)`` tokens and costs ``k * draft + verify(k + 1)`` seconds, where ``draft`` is the
    measured cost of one proposal and ``verify(n)`` the measured cost of the teacher checking n tokens at once
    (between measured sizes, a straight line through them). k = 0 is the teacher alone (one token per
    ``verify(1)``). The first two rounds propose :data:`DEFAULT_DRAFT_TOKENS` and 1 tokens, to measure two sizes;
    then each round takes the k of the highest expected tokens per second. While k is 0 one token is proposed after
    :attr:`PROBE_EVERY` idle rounds, to keep the acceptance current; each probe that leaves k at 0 doubles that
    wait (up to :attr:`MAX_PROBE_EVERY`), and a k above 0 resets it. Counts and costs are moving averages, kept
    across generations of the same model.

    Args:
        fixed: always propose this many (the acceptance and costs are still measured).
    """

    PROBE_EVERY = 8
    MAX_PROBE_EVERY = 128
    KEEP = 0.9  # weight of the past in the acceptance counts, per round
    SMOOTH = 0.8  # weight of the past in the costs

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self.kept = 1.0  # decayed counts of kept and refused proposals (a prior of one each: acceptance 1/2)
        self.refused = 1.0
        self.draft_cost: float | None = None  # seconds per proposal
        self.verify: dict[int, float] = {}  # tokens checked at once -> seconds
        self.idle = 0  # rounds since the last proposal
        self.probe_every = self.PROBE_EVERY
        self.rounds = 0
        self.k = fixed if fixed is not None else DEFAULT_DRAFT_TOKENS

    @property
    def acceptance(self) -> float:
        return self.kept / (self.kept + self.refused)

    def update(self, drafted: int, accepted: int, checked: int, draft_seconds: float, verify_seconds: float) -> None:
        """Record a round (``checked``: tokens the teacher evaluated in it) and choose the next k."""
        self.rounds += 1
        if drafted:
            self.kept = self.KEEP * self.kept + accepted
            self.refused = self.KEEP * self.refused + (accepted < drafted)
            self.draft_cost = _smooth(self.draft_cost, draft_seconds / drafted, self.SMOOTH)
            self.idle = 0
        else:
            self.idle += 1
        self.verify[checked] = _smooth(self.verify.get(checked), verify_seconds, self.SMOOTH)
        if self.fixed is None:
            self.k = self._choose()

    def expected_rate(self, k: int) -> float:
        """Expected tokens per second with k proposals per round."""
        a = min(self.acceptance, 1 - 1e-9)
        tokens = (1 - a ** (k + 1)) / (1 - a)
        return tokens / (k * (self.draft_cost or 0.0) + self.verify_time(k + 1))

    def verify_time(self, n: int) -> float:
        """The teacher's measured (or interpolated) seconds to check ``n`` tokens at once."""
        if n in self.verify:
            return self.verify[n]
        sizes = sorted(self.verify)
        if len(sizes) < 2:
            return self.verify[sizes[0]] * n / sizes[0]
        mean_n = sum(sizes) / len(sizes)
        mean_t = sum(self.verify[m] for m in sizes) / len(sizes)
        slope = sum((m - mean_n) * (self.verify[m] - mean_t) for m in sizes) / sum((m - mean_n) ** 2 for m in sizes)
        return max(mean_t + slope * (n - mean_n), min(self.verify.values()) * 0.5)

    def _choose(self) -> int:
        if self.rounds == 1:
            return 1  # a second size of check, for the cost line
        if self.draft_cost is None:
            return 1
        best = max(range(MAX_DRAFT_TOKENS + 1), key=self.expected_rate)
        if best > 0:
            self.probe_every = self.PROBE_EVERY
        elif self.idle >= self.probe_every:
            self.probe_every = min(2 * self.probe_every, self.MAX_PROBE_EVERY)
            return 1
        return best


def _smooth(old: float | None, new: float, weight: float) -> float:
    return new if old is None else weight * old + (1 - weight) * new


class SpeculativeModel(LanguageModel):
    """The teacher, generating with a draft model's proposals; otherwise the teacher itself (tokenizer, chat
    template, info, logits).

    Args:
        teacher: the model whose output this is.
        draft: the model that proposes tokens (owned from now on: closed with this one).
        draft_tokens: tokens proposed per round; None adapts it to the acceptance.
        vocabulary: the map between the two vocabularies, when already built for this pair (the bench builds one
            per draft and several models with different ``draft_tokens``).

    Raises:
        EdgeDistillError: a draft whose vocabulary does not map onto the teacher's, or a bad ``draft_tokens``.
    """

    def __init__(
        self,
        teacher: LanguageModel,
        draft: LanguageModel,
        draft_tokens: int | None = None,
        vocabulary: VocabularyMap | None = None,
    ) -> None:
        super().__init__()
        self.draft_tokens = check_draft_tokens(draft_tokens)
        self.teacher = teacher
        self.draft = draft
        self.vocabulary = vocabulary or VocabularyMap(teacher, draft)
        self.schedule = DraftSchedule(self.draft_tokens)
        self.info = teacher.info
        self.eos_ids = teacher.eos_ids
        self.chat_template = teacher.chat_template
        self._draft_cached: list[int] = []  # the draft ids in the draft's cache, in order
        self._draft_eos = frozenset(int(self.vocabulary.to_draft[i]) for i in teacher.eos_ids) - {-1}

    # The teacher's primitives: what the base class builds logits(), evaluate() and the prefix reuse on.

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        return self.teacher.tokenize(text, add_special)

    def detokenize(self, token_ids: Sequence[int], special: bool = True) -> str:
        return self.teacher.detokenize(token_ids, special)

    def token_bytes(self, token_id: int) -> bytes:
        return self.teacher.token_bytes(token_id)

    def _evaluate(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        return self.teacher._evaluate(token_ids, start)

    def _truncate(self, length: int) -> None:
        self.teacher._truncate(length)

    def _all_logits(self, token_ids: Sequence[int]) -> np.ndarray:
        return self.teacher._all_logits(token_ids)

    def _score(self, token_ids: Sequence[int], start: int) -> np.ndarray:
        return self.teacher._score(token_ids, start)

    def close(self) -> None:
        self.teacher.close()
        self.draft.close()

    def reset_cache(self) -> None:
        """Empty both models' caches."""
        with self._locked():
            self._forget()

    # ------------------------------------------------------------------------------------------------ generation

    def _tokens(self, ids: list[int], sampler: Sampler, params: SamplingParams, stats: dict[str, Any]) -> Iterator[int]:
        try:
            pending = self._teacher_prefix(ids)
            draft_pending = self._draft_prefix(self.vocabulary.draft_ids(ids))
        except BaseException:
            self._forget()
            raise
        draft_sampler = Sampler(params, self.vocabulary.draft_size, self._draft_cached + draft_pending)
        schedule = self.schedule
        stats.update(rounds=0, drafted=0, accepted=0, draft_seconds=0.0, verify_seconds=0.0)
        produced = 0
        while True:
            budget = min(
                schedule.k,
                params.max_tokens - produced - 1,  # the round's own token comes on top of the proposals
                self.context - len(self._cached) - len(pending),
                self.draft.context - len(self._draft_cached) - len(draft_pending) + 1,
            )
            draft_before, verify_before = stats["draft_seconds"], stats["verify_seconds"]
            try:
                tokens, accepted, drafted, draft_pending = self._round(
                    pending, draft_pending, max(budget, 0), sampler, draft_sampler, params.greedy, stats
                )
            except BaseException:
                self._forget()
                raise
            stats["rounds"] += 1
            stats["drafted"] += drafted
            stats["accepted"] += accepted
            schedule.update(
                drafted,
                accepted,
                len(pending) + drafted,
                stats["draft_seconds"] - draft_before,
                stats["verify_seconds"] - verify_before,
            )
            stats["draft_tokens"] = schedule.k
            pending = tokens[-1:]
            for token_id in tokens:
                produced += 1
                yield token_id

    def _round(
        self,
        pending: list[int],
        draft_pending: list[int],
        budget: int,
        sampler: Sampler,
        draft_sampler: Sampler,
        greedy: bool,
        stats: dict[str, Any],
    ) -> tuple[list[int], int, int, list[int]]:
        """One round: up to ``budget`` proposals, one teacher evaluation, the kept tokens.

        Returns:
            ``(tokens, accepted, drafted, draft_pending)``: the round's output (the kept proposals, then the
            teacher's own token), how many proposals were kept of how many, and the draft tokens its cache still
            lacks.
        """
        vocabulary = self.vocabulary
        rng = sampler.rng
        mark = draft_sampler.mark()
        drafted: list[int] = []  # draft ids
        proposals: list[tuple[np.ndarray, np.ndarray] | None] = []  # the draft's distribution at each (sampling)
        draft_start = len(self._draft_cached)
        started = time.perf_counter()
        if budget > 0 and draft_pending:
            row = self.draft._evaluate(draft_pending, draft_start)
            self._draft_cached.extend(draft_pending)
            while True:
                if greedy:
                    token_id = greedy_token(draft_sampler.penalized(row))
                    proposals.append(None)
                else:
                    candidates, probs = draft_sampler.distribution(row)
                    token_id = draw_token(candidates, probs, rng)
                    proposals.append((vocabulary.to_teacher[candidates], probs))
                draft_sampler.observe(token_id)
                drafted.append(token_id)
                if len(drafted) == budget or token_id in self._draft_eos:
                    break
                row = self.draft._evaluate([token_id], len(self._draft_cached))
                self._draft_cached.append(token_id)
        stats["draft_seconds"] += time.perf_counter() - started

        started = time.perf_counter()
        proposed = [int(vocabulary.to_teacher[i]) for i in drafted]
        start = len(self._cached)
        if proposed:
            rows = self.teacher._score(pending + proposed, start)
        else:  # the teacher alone this round: the last position's logits are all it needs
            rows = self.teacher._evaluate(pending, start)[None, :]
        self._cached.extend(pending + proposed)
        stats["verify_seconds"] += time.perf_counter() - started

        tokens: list[int] = []
        first = len(pending) - 1  # rows[first + j]: the teacher's distribution for proposal j
        for j, token_id in enumerate(proposed):
            row = rows[first + j]
            if greedy:
                choice = sampler(row)
                tokens.append(choice)
                if choice != token_id:
                    break
                continue
            choice = self._check(sampler, row, token_id, proposals[j], rng)  # type: ignore[arg-type]
            tokens.append(choice)
            if choice != token_id:
                break
        else:
            tokens.append(sampler(rows[first + len(proposed)]))
        accepted = len(tokens) - 1

        # Roll back to the kept tokens: the teacher holds the context and the kept proposals; the draft evaluated
        # its pending tokens and every proposal but its last.
        keep = start + len(pending) + accepted
        del self._cached[keep:]
        self.teacher._truncate(keep)
        draft_keep = draft_start + (len(draft_pending) + min(accepted, len(drafted) - 1) if drafted else 0)
        del self._draft_cached[draft_keep:]
        self.draft._truncate(draft_keep)
        unevaluated = draft_pending if not drafted else drafted[-1:] if accepted == len(drafted) else []
        follow = unevaluated + vocabulary.draft_ids(tokens[accepted:])
        draft_sampler.rollback(mark)
        for token_id in drafted[:accepted] + follow:
            draft_sampler.observe(token_id)
        return tokens, accepted, len(drafted), follow

    @staticmethod
    def _check(
        sampler: Sampler,
        row: np.ndarray,
        token_id: int,
        proposal: tuple[np.ndarray, np.ndarray],
        rng: np.random.Generator,
    ) -> int:
        """The rejection step for one proposal: ``token_id`` when kept, else a draw from ``max(p - q, 0)``."""
        candidates, probs = sampler.distribution(row)
        p = np.zeros(row.shape[0], dtype=np.float64)
        p[candidates] = probs
        q = np.zeros_like(p)
        q[proposal[0]] = proposal[1]
        if rng.random() * q[token_id] < p[token_id]:
            sampler.observe(token_id)
            return token_id
        residual = np.maximum(p - q, 0.0)
        choice = draw_token(None, residual if residual.sum() > 0 else p, rng)
        sampler.observe(choice)
        return choice

    # ------------------------------------------------------------------------------------------------ the caches

    def _teacher_prefix(self, ids: list[int]) -> list[int]:
        """Evaluate the prompt but its last token (reusing the cached prefix); the last one opens the first round."""
        shared = common_prefix(self._cached, ids[:-1])
        del self._cached[shared:]
        self.teacher._truncate(shared)
        if len(ids) - 1 > shared:
            self.teacher._evaluate(ids[shared:-1], shared)
            self._cached = list(ids[:-1])
        return ids[-1:]

    def _draft_prefix(self, draft_ids: list[int]) -> list[int]:
        """The same for the draft, in its own ids; more than the last token stays pending if its context is full."""
        evaluate = draft_ids[: max(0, min(len(draft_ids) - 1, self.draft.context - 1))]
        shared = common_prefix(self._draft_cached, evaluate)
        del self._draft_cached[shared:]
        self.draft._truncate(shared)
        if len(evaluate) > shared:
            self.draft._evaluate(evaluate[shared:], shared)
            self._draft_cached = list(evaluate)
        return draft_ids[len(evaluate) :]

    def _forget(self) -> None:
        self._cached = []
        self._draft_cached = []
        self.teacher._truncate(0)
        self.draft._truncate(0)
