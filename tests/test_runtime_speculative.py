"""Speculative decoding in the runtime (``runtime/speculative.py``) on tiny exported models.

A draft proposes tokens, the teacher checks them in one batched evaluation. What is shown here:

1. greedy output is the teacher's own, token for token, with drafts that always agree (the teacher itself), never
   agree (a draft whose argmax is a token the teacher never emits) and sometimes agree (the teacher with perturbed
   weights), in GGUF, ONNX and mixed pairs, with fixed and adaptive k, with a repetition penalty, and when
   max_tokens or the context ends a round early;
2. a draft with a trimmed vocabulary (``distill.vocab.trim_tokenizer``) works; a draft with another tokenizer is
   refused in one line (library and CLI);
3. sampling follows the teacher's exact distribution (chi-square goodness of fit, alpha = 0.001), and a seed
   reproduces a speculative run;
4. both KV caches after rollbacks equal a fresh prefill, and the next generation reuses the cached prefix;
5. bad ``draft_tokens`` values are refused;
6. the ``generate`` and ``chat`` commands and the HTTP server with a draft.

The drafts are tiny checkpoints built here and exported to GGUF f32 and ONNX fp32 once per module.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tokenizer
from export_helpers import run_export, save_checkpoint
from runtime_helpers import cli, cli_subprocess, post_json, request, running, serve_process, tiny_exports

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime import load
from edgedistill.runtime.model import FINISH_LENGTH
from edgedistill.runtime.sampling import SamplingParams, apply_repetition_penalty, token_distribution
from edgedistill.runtime.speculative import DEFAULT_DRAFT_TOKENS, MAX_DRAFT_TOKENS, DraftSchedule, SpeculativeModel

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")

CONTEXT = 256
PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Knowledge distillation trains", "Temperature softens"]
GREEDY_TOKENS = 24
# The "never" draft's final norm is zero: all its logits are 0, so its argmax is always token 0 (<|endoftext|>).
NEVER_TOKEN = 0
# The "sometimes" draft is the teacher with Gaussian noise of this fraction of each tensor's spread added to every
# weight. (An independently seeded tiny model agrees with the teacher's greedy choice about once in 260 tokens: too
# seldom to show "sometimes"; this one agrees about a quarter of the time, and shares 2 or 3 of the teacher's top 4.)
SOMETIMES_NOISE = 0.1
# The chi-square tests: significance level, seeds (samples) per test, top-k of the sampling.
ALPHA = 0.001
SAMPLES = 2000
TOP_K = 4
# Teacher format and draft format of each pair the greedy tests run.
PAIRS = {"gguf": ("gguf", "gguf"), "onnx": ("onnx", "onnx"), "mixed": ("gguf", "onnx")}
SPEC_KEYS = {"rounds", "drafted", "accepted", "draft_seconds", "verify_seconds", "draft_tokens"}


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def exports():
    return tiny_exports()


@pytest.fixture(scope="module")
def hf_tokenizer(exports):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exports.checkpoint)


def _export(checkpoint: Path, fmt: str, out: Path) -> Path:
    quant = "f32" if fmt == "gguf" else "fp32"
    with contextlib.redirect_stdout(io.StringIO()):
        code = run_export(fmt, str(checkpoint), "--quant", quant, "--out", str(out), "--threads", "1")
    assert code == 0, f"export {fmt} of {checkpoint.name} failed"
    return out / (f"{checkpoint.name}-f32.gguf" if fmt == "gguf" else f"{checkpoint.name}-onnx-fp32")


def _trimmed_ids(tokenizer) -> np.ndarray:
    """The specials, the 256 byte-level bases (and the chat template's tokens), and every other merge."""
    from edgedistill.distill.vocab import mandatory_ids

    keep = mandatory_ids(tokenizer)
    merges = [i for i in range(len(tokenizer)) if i not in keep]
    return np.array(sorted(keep | set(merges[::2])), dtype=np.int64)


@pytest.fixture(scope="module")
def drafts(exports, hf_tokenizer, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Draft models by kind, then format: ``always`` (the teacher itself), ``sometimes``, ``never``, ``trimmed``
    (the teacher over a trimmed vocabulary) and ``other`` (another tokenizer; GGUF only)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from edgedistill.distill.vocab import trim_tokenizer

    root = tmp_path_factory.mktemp("drafts")

    def teacher_copy():
        return AutoModelForCausalLM.from_pretrained(exports.checkpoint, dtype=torch.float32).eval()

    def save(model, tokenizer, name: str) -> Path:
        directory = root / "ckpt" / name
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        return directory

    checkpoints: dict[str, Path] = {}
    model = teacher_copy()
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn(weight.shape, generator=noise) * SOMETIMES_NOISE * weight.std())
    checkpoints["sometimes"] = save(model, hf_tokenizer, "sometimes")

    model = teacher_copy()
    with torch.no_grad():
        model.model.norm.weight.zero_()
    checkpoints["never"] = save(model, hf_tokenizer, "never")

    ids = _trimmed_ids(hf_tokenizer)
    trimmed_tokenizer, _ = trim_tokenizer(hf_tokenizer, ids)
    model = teacher_copy()
    config = model.config
    config.vocab_size = len(ids)
    rows = torch.from_numpy(ids)
    state = {
        name: tensor[rows] if name in ("model.embed_tokens.weight", "lm_head.weight") else tensor
        for name, tensor in model.state_dict().items()
    }
    trimmed = LlamaForCausalLM(config).eval()
    trimmed.load_state_dict(state)
    checkpoints["trimmed"] = save(trimmed, trimmed_tokenizer, "trimmed")

    other_tokenizer = make_tokenizer(300, ["zebra zygote zzz quartz jazz fizz buzz", "xylophone qwerty kayak"])
    other = save_checkpoint(root / "ckpt" / "other", tokenizer=other_tokenizer, seed=4)

    out = root / "out"
    paths = {"always": {"gguf": exports.gguf, "onnx": exports.onnx_dir}}
    for kind, checkpoint in checkpoints.items():
        paths[kind] = {fmt: _export(checkpoint, fmt, out / kind) for fmt in ("gguf", "onnx")}
    paths["other"] = {"gguf": _export(other, "gguf", out / "other")}
    return paths


def _teacher_path(exports, fmt: str) -> Path:
    return exports.gguf if fmt == "gguf" else exports.onnx_dir


@pytest.fixture(scope="module")
def teachers(exports):
    """The plain teachers: the reference every speculative output is compared with."""
    models = {fmt: load(_teacher_path(exports, fmt), threads=1, context=CONTEXT) for fmt in ("gguf", "onnx")}
    yield models
    for model in models.values():
        model.close()


def _speculative(
    exports, drafts, teacher: str, kind: str, draft: str, k: int | None, context: int = CONTEXT
) -> SpeculativeModel:
    """The ``teacher`` format's teacher drafted by the ``kind`` draft in the ``draft`` format, ``k`` per round."""
    path = _teacher_path(exports, teacher)
    model = load(path, threads=1, context=context, draft=drafts[kind][draft], draft_tokens=k)
    assert isinstance(model, SpeculativeModel)
    return model


def _drain(stream):
    for _ in stream:
        pass
    return stream.completion


# ------------------------------------------------------------------------------------------- the schedule of k


def _feed(schedule: DraftSchedule, rounds: int, keep: float, draft_s: float, verify_s) -> list[int]:
    """Run ``rounds`` rounds in which a share ``keep`` of proposals is kept (the first refused one ends the round),
    proposals cost ``draft_s`` each and checking n tokens costs ``verify_s(n)``; the k chosen before each round."""
    chosen = []
    for _ in range(rounds):
        k = schedule.k
        chosen.append(k)
        accepted = 0
        while accepted < k and (accepted + 1) / (k + 1) <= keep + 1e-9:
            accepted += 1
        schedule.update(k, accepted, k + 1, k * draft_s, verify_s(k + 1))
    return chosen


def test_the_schedule_proposes_many_when_they_pay_and_none_when_they_do_not():
    cheap_batch = lambda n: 0.010 + 0.001 * n  # noqa: E731 - checking 5 tokens costs 1.4x one
    # Every proposal kept, a draft at 1/10 of the teacher's cost: k climbs to its maximum as the acceptance does.
    schedule = DraftSchedule()
    chosen = _feed(schedule, 12, keep=1.0, draft_s=0.001, verify_s=cheap_batch)
    assert chosen[:2] == [DEFAULT_DRAFT_TOKENS, 1] and chosen[2:] == sorted(chosen[2:]), chosen
    assert chosen[-1] == MAX_DRAFT_TOKENS and schedule.acceptance > 0.9, chosen
    # Nothing kept: the teacher alone (k = 0), with a probe of one proposal after PROBE_EVERY idle rounds, then
    # after twice as many each time.
    schedule = DraftSchedule()
    chosen = _feed(schedule, 80, keep=0.0, draft_s=0.001, verify_s=cheap_batch)
    probes = [i for i, k in enumerate(chosen) if i > 2 and k == 1]
    assert chosen[2:].count(0) >= 70 and len(probes) >= 2, chosen
    waits = [b - a - 1 for a, b in zip(probes, probes[1:])]
    assert waits == [DraftSchedule.PROBE_EVERY * 2 ** (i + 1) for i in range(len(waits))], chosen
    # Every proposal kept, but a draft as slow as the teacher and a check that costs per token: not worth it.
    schedule = DraftSchedule()
    chosen = _feed(schedule, 10, keep=1.0, draft_s=0.010, verify_s=lambda n: 0.010 * n)
    assert chosen[-1] == 0, chosen
    # A fixed k is kept whatever is measured.
    schedule = DraftSchedule(fixed=3)
    assert set(_feed(schedule, 10, keep=0.0, draft_s=0.01, verify_s=cheap_batch)) == {3}
    assert schedule.acceptance < 0.1


def test_the_schedule_expects_tokens_per_second_from_the_measurements():
    schedule = DraftSchedule()
    schedule.update(4, 2, 5, 0.004, 0.015)  # 4 proposals at 1 ms, 2 kept, 15 ms to check 5 tokens
    schedule.update(1, 1, 2, 0.001, 0.012)
    assert schedule.verify_time(5) == pytest.approx(0.015) and schedule.verify_time(2) == pytest.approx(0.012)
    assert schedule.verify_time(1) == pytest.approx(0.011)  # on the line through the two sizes measured
    a = schedule.acceptance
    assert schedule.expected_rate(0) == pytest.approx(1 / 0.011)
    assert schedule.expected_rate(2) == pytest.approx((1 + a + a * a) / (2 * schedule.draft_cost + 0.013))


# ------------------------------------------------------------------------------------------- 1. greedy parity


def _check_stats(done, k: int | None) -> dict:
    spec = done.speculative
    assert spec is not None and set(spec) == SPEC_KEYS, spec
    assert 0 <= spec["accepted"] <= spec["drafted"] and spec["rounds"] >= 1
    assert spec["draft_seconds"] >= 0 and spec["verify_seconds"] > 0
    if done.finish_reason == FINISH_LENGTH:
        # every round yields its kept proposals plus one token of the teacher's, for one teacher evaluation
        assert done.completion_tokens == spec["rounds"] + spec["accepted"], spec
    if k is not None:
        assert spec["draft_tokens"] == k and spec["drafted"] <= k * spec["rounds"]
    else:
        assert 0 <= spec["draft_tokens"] <= MAX_DRAFT_TOKENS
    return spec


@pytest.mark.parametrize("kind", ["always", "never", "sometimes"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_greedy_output_is_the_teachers_token_for_token(exports, drafts, teachers, pair, kind):
    teacher_fmt, draft_fmt = PAIRS[pair]
    plain = teachers[teacher_fmt]
    for k in (1, 3, None):
        with _speculative(exports, drafts, teacher_fmt, kind, draft_fmt, k) as model:
            assert model.vocabulary.identity
            for penalty in (1.0, 1.3):
                accepted = drafted = 0
                for prompt in PROMPTS:
                    expected = plain.complete(prompt, max_tokens=GREEDY_TOKENS, repetition_penalty=penalty)
                    if kind == "never":
                        assert NEVER_TOKEN not in expected.token_ids, "the never-draft's token is the teacher's too"
                    done = model.complete(prompt, max_tokens=GREEDY_TOKENS, repetition_penalty=penalty)
                    where = (pair, kind, k, penalty, prompt)
                    assert done.token_ids == expected.token_ids, where
                    assert done.text == expected.text and done.finish_reason == expected.finish_reason, where
                    assert done.prompt_tokens == expected.prompt_tokens, where
                    spec = _check_stats(done, k)
                    accepted += spec["accepted"]
                    drafted += spec["drafted"]
                where = (pair, kind, k, penalty, accepted, drafted)
                if k is None:  # the schedule follows measured times: how much it proposes is the machine's
                    assert accepted <= drafted, where
                elif kind == "always":
                    assert 0 < accepted == drafted, where
                elif kind == "never":
                    assert accepted == 0 < drafted, where
                else:
                    assert 0 < accepted < drafted, where


@pytest.mark.parametrize("pair", list(PAIRS))
def test_max_tokens_ending_a_round_early(exports, drafts, teachers, pair):
    """max_tokens caps the proposals: the output is as long as the teacher's (e.g. 5 tokens with k = 3, where an
    accepted round of 3 proposals and a bonus token gives 4, and the next round may add only 1)."""
    teacher_fmt, draft_fmt = PAIRS[pair]
    plain = teachers[teacher_fmt]
    for kind in ("always", "sometimes"):
        with _speculative(exports, drafts, teacher_fmt, kind, draft_fmt, 3) as model:
            for max_tokens in (1, 2, 4, 5, 6, 9):
                for prompt in PROMPTS[:2]:
                    expected = plain.complete(prompt, max_tokens=max_tokens)
                    done = model.complete(prompt, max_tokens=max_tokens)
                    assert len(done.token_ids) == len(expected.token_ids) == max_tokens, (kind, max_tokens)
                    assert done.token_ids == expected.token_ids and done.text == expected.text
                    assert done.finish_reason == expected.finish_reason == FINISH_LENGTH
                    _check_stats(done, 3)
                    if max_tokens == 1:
                        assert done.speculative["drafted"] == 0  # no room for a proposal: the teacher alone
    # k = 16 against a nearly full context: the context caps the proposals too.
    prompt = PROMPTS[2]
    for context in (len(plain.tokenize(prompt)) + extra for extra in (1, 4, 9)):
        with load(_teacher_path(exports, teacher_fmt), threads=1, context=context) as small:
            expected = small.complete(prompt, max_tokens=64)
        with _speculative(exports, drafts, teacher_fmt, "always", draft_fmt, 16, context=context) as model:
            done = model.complete(prompt, max_tokens=64)
        assert done.token_ids == expected.token_ids and done.finish_reason == expected.finish_reason, context
        assert len(done.token_ids) == context - done.prompt_tokens + 1


def test_a_speculative_model_is_the_teacher_otherwise(exports, drafts, teachers):
    plain = teachers["onnx"]
    with _speculative(exports, drafts, "onnx", "sometimes", "gguf", None) as model:
        assert model.info == plain.info and model.eos_ids == plain.eos_ids
        assert model.tokenize(PROMPTS[1]) == plain.tokenize(PROMPTS[1])
        ids = plain.tokenize(PROMPTS[0] + PROMPTS[2])
        np.testing.assert_allclose(model.logits(ids), plain.logits(ids), atol=1e-5, rtol=0)
        for prompt in PROMPTS:
            stream = model.stream(prompt, max_tokens=16)
            pieces = list(stream)
            assert "".join(pieces) == stream.completion.text == plain.generate(prompt, max_tokens=16)
        messages = [{"role": "user", "content": "Say something."}]
        assert model.chat(messages, max_tokens=12) == plain.chat(messages, max_tokens=12)
        # a stop string, then a stream closed early, may end a round midway: the next generations are still right
        stop = plain.generate(PROMPTS[0], max_tokens=20)[5:8]
        cut = model.complete(PROMPTS[0], max_tokens=20, stop=[stop])
        assert cut.text == plain.generate(PROMPTS[0], max_tokens=20, stop=[stop]) and cut.finish_reason == "stop"
        assert model.generate(PROMPTS[0] + cut.text, max_tokens=16) == plain.generate(PROMPTS[0] + cut.text,
                                                                                    max_tokens=16)  # fmt: skip
        with model.stream(PROMPTS[2], max_tokens=30) as stream:
            next(stream)
        assert model.generate(PROMPTS[2][:-3], max_tokens=16) == plain.generate(PROMPTS[2][:-3], max_tokens=16)
    assert plain.complete(PROMPTS[0], max_tokens=4).speculative is None


# ------------------------------------------------------------------------------------------ 2. vocabularies


@pytest.mark.parametrize("pair", ["gguf", "onnx", "mixed"])
def test_a_draft_with_a_trimmed_vocabulary(exports, drafts, teachers, hf_tokenizer, pair):
    teacher_fmt, draft_fmt = PAIRS[pair]
    plain = teachers[teacher_fmt]
    kept = _trimmed_ids(hf_tokenizer)
    assert len(kept) < len(hf_tokenizer)
    accepted = drafted = 0
    emitted: set[int] = set()
    for k in (3, None):
        with _speculative(exports, drafts, teacher_fmt, "trimmed", draft_fmt, k) as model:
            vocabulary = model.vocabulary
            assert not vocabulary.identity and vocabulary.draft_size == model.draft.info.vocab_size == len(kept)
            # each draft token is the teacher token of the same bytes: the trimmed vocabulary's own map
            np.testing.assert_array_equal(vocabulary.to_teacher, kept)
            for penalty in (1.0, 1.3):
                for prompt in PROMPTS:
                    expected = plain.complete(prompt, max_tokens=GREEDY_TOKENS, repetition_penalty=penalty)
                    done = model.complete(prompt, max_tokens=GREEDY_TOKENS, repetition_penalty=penalty)
                    assert done.token_ids == expected.token_ids and done.text == expected.text, (k, penalty, prompt)
                    spec = _check_stats(done, k)
                    accepted += spec["accepted"]
                    drafted += spec["drafted"]
                    emitted.update(expected.token_ids)
                    # what the draft reads for the teacher's tokens stands for the same bytes
                    ids = model.tokenize(prompt) + done.token_ids
                    draft_bytes = b"".join(model.draft.token_bytes(i) for i in vocabulary.draft_ids(ids))
                    assert draft_bytes == b"".join(model.token_bytes(i) for i in ids)
    assert 0 < accepted < drafted
    # the teacher emitted tokens the draft lacks: they reached the draft as several of its own tokens
    assert emitted - set(kept.tolist())


def test_a_trimmed_draft_whose_context_fills_first(exports, drafts):
    """The trimmed draft reads the teacher's tokens as more of its own: with the teacher at the draft's context, the
    draft's fills first; it then stops proposing and the teacher goes on alone to the end of its context."""
    text = "The quick brown fox jumps over the lazy dog. Knowledge distillation trains a student. " * 12
    with _speculative(exports, drafts, "gguf", "trimmed", "gguf", 3, context=512) as model:
        assert model.draft.context == model.context == 512
        plain = model.teacher
        prompt = plain.tokenize(text)[:400]
        assert len(model.vocabulary.draft_ids(prompt)) < model.draft.context
        params = SamplingParams(max_tokens=200)
        done = _drain(model.stream_ids(prompt, params))
        assert 0 < done.speculative["drafted"] < 3 * done.speculative["rounds"]
        longer = plain.tokenize(text)[:480]
        assert len(model.vocabulary.draft_ids(longer)) > model.draft.context
        beyond = _drain(model.stream_ids(longer, params))
        assert beyond.speculative["drafted"] == 0
        model.reset_cache()
        assert done.token_ids == _drain(plain.stream_ids(prompt, params)).token_ids
        assert len(done.token_ids) == 512 - 400 + 1
        assert beyond.token_ids == _drain(plain.stream_ids(longer, params)).token_ids


def test_a_draft_with_another_tokenizer_is_refused(exports, drafts):
    other = drafts["other"]["gguf"]
    for teacher in ("gguf", "onnx"):
        with pytest.raises(EdgeDistillError) as caught:
            load(_teacher_path(exports, teacher), threads=1, draft=other)
        message = str(caught.value)
        assert "does not map onto" in message and "\n" not in message and other.name in message
    result = cli_subprocess("generate", str(exports.gguf), "hi", "--draft", str(other), "--threads", "1")
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not map onto" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------------------ 3. sampling


def chi2_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for X ~ chi-square with ``df`` degrees of freedom, in closed form (scipy is not in the
    environment): the regularized upper incomplete gamma Q(df/2, statistic/2), a finite sum for integer df."""
    half = statistic / 2
    if df % 2 == 0:
        term = total = 1.0
        for i in range(1, df // 2):
            term *= half / i
            total += term
        return math.exp(-half) * total
    total = math.erfc(math.sqrt(half))
    term = math.sqrt(half) / math.gamma(1.5) * math.exp(-half)
    for i in range(1, (df - 1) // 2 + 1):
        total += term
        term *= half / (i + 0.5)
    return total


def test_chi2_sf_matches_the_table():
    """The critical values of the chi-square table at alpha = 0.001."""
    for df, critical in ((1, 10.828), (2, 13.816), (3, 16.266), (4, 18.467), (5, 20.515), (10, 29.588),
                         (15, 37.697), (30, 59.703), (63, 103.442)):  # fmt: skip
        assert chi2_sf(critical, df) == pytest.approx(ALPHA, rel=1e-3), df


def _exact_sequences(teacher, prompt_ids: list[int], length: int, temperature: float, penalty: float) -> dict:
    """The teacher's exact probability of each sequence of ``length`` tokens: top-k 4 sampling after the repetition
    penalty of the prompt and the tokens before (as :class:`~edgedistill.runtime.sampling.Sampler` applies it)."""
    sequences = {(): 1.0}
    for _ in range(length):
        longer = {}
        for prefix, probability in sequences.items():
            row = _penalized(teacher.logits(prompt_ids + list(prefix))[-1], prompt_ids + list(prefix), penalty)
            candidates, probs = token_distribution(row, temperature, TOP_K, 1.0)
            for token_id, p in zip(candidates.tolist(), probs.tolist()):
                longer[prefix + (token_id,)] = probability * p
        sequences = longer
    return sequences


def _penalized(row: np.ndarray, seen: list[int], penalty: float) -> np.ndarray:
    return row if penalty == 1.0 else apply_repetition_penalty(row, sorted(set(seen)), penalty)


def _chi_square(counts: dict, expected: dict, n: int) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom, bins with an expected count under 5 merged (smallest
    first, into one bin until it reaches 5; a remainder joins the last merged bin)."""
    bins: list[list[float]] = []
    observed_sum = expected_sum = 0.0
    for key in sorted(expected, key=expected.get):
        observed_sum += counts.get(key, 0)
        expected_sum += n * expected[key]
        if expected_sum >= 5:
            bins.append([observed_sum, expected_sum])
            observed_sum = expected_sum = 0.0
    if expected_sum > 0:
        bins[-1][0] += observed_sum
        bins[-1][1] += expected_sum
    statistic = sum((observed - want) ** 2 / want for observed, want in bins)
    return statistic, len(bins) - 1


# A prompt for the trimmed draft: it holds teacher tokens the draft lacks (the draft reads it as other tokens) and
# the teacher's top 4 after it include a merge the draft has under another id, so that a proposal's distribution
# must be carried into the teacher's ids to be compared.
TRIMMED_PROMPT = "cross match tokens add"


@pytest.mark.parametrize(
    "teacher_fmt, kind, prompt, temperature, penalty, length",
    [
        # the setup: temperature 1, top-k 4, two tokens, draft_tokens 2 (so one proposal and a bonus token)
        pytest.param("gguf", "sometimes", PROMPTS[0], 1.0, 1.0, 2, id="gguf-pairs"),
        pytest.param("onnx", "sometimes", PROMPTS[0], 1.0, 1.0, 2, id="onnx-pairs"),
        # The tiny teacher's top 4 are nearly uniform at temperature 1, where the acceptance rule hardly matters:
        # sharper, three tokens (two proposals and a bonus token in a round), and a repetition penalty that the
        # teacher's distribution at the second proposal must include the first one in.
        pytest.param("onnx", "sometimes", PROMPTS[0], 0.05, 1.5, 3, id="onnx-triples-sharp-penalty"),
        pytest.param("gguf", "trimmed", TRIMMED_PROMPT, 0.2, 1.5, 3, id="gguf-trimmed-triples-penalty"),
    ],
)
def test_sampling_follows_the_teachers_distribution(exports, drafts, teachers, teacher_fmt, kind, prompt,
                                                    temperature, penalty, length):  # fmt: skip
    """The sequences of ``length`` tokens over seeds 0..SAMPLES-1 against the teacher's exact probabilities
    (Pearson's chi-square goodness of fit, rejected at p < ALPHA = 0.001)."""
    plain = teachers[teacher_fmt]
    prompt_ids = plain.tokenize(prompt)
    exact = _exact_sequences(plain, prompt_ids, length, temperature, penalty)
    assert sum(exact.values()) == pytest.approx(1.0)
    counts: dict[tuple[int, ...], int] = {}
    accepted = drafted = 0
    options = dict(max_tokens=length, temperature=temperature, top_k=TOP_K, repetition_penalty=penalty)
    with _speculative(exports, drafts, teacher_fmt, kind, teacher_fmt, 2) as model:
        if kind == "trimmed":
            to_draft = model.vocabulary.to_draft
            assert (to_draft[prompt_ids] < 0).any()
            first = {prefix[0] for prefix in exact}
            assert any(to_draft[t] not in (-1, t) for t in first), first
        for seed in range(SAMPLES):
            done = model.complete(prompt, seed=seed, **options)
            key = tuple(done.token_ids)
            counts[key] = counts.get(key, 0) + 1
            accepted += done.speculative["accepted"]
            drafted += done.speculative["drafted"]
    assert 0 < accepted < drafted  # both the acceptance and the rejection (residual) branches ran
    outside = set(counts) - set(exact)
    assert not outside, f"sequences the teacher cannot produce: {sorted(outside)[:5]}"
    statistic, df = _chi_square(counts, exact, SAMPLES)
    p_value = chi2_sf(statistic, df)
    assert df >= 3
    assert p_value > ALPHA, f"chi-square {statistic:.1f} with {df} degrees of freedom: p = {p_value:.2g}"


@pytest.mark.parametrize("pair", ["gguf", "onnx"])
def test_a_seed_reproduces_a_speculative_sampling_run(exports, drafts, pair):
    """With a fixed k. (The adaptive k depends on measured times, so the same seed may draw differently: the
    distribution is the teacher's either way.)"""
    teacher_fmt, draft_fmt = PAIRS[pair]
    options = dict(max_tokens=32, temperature=1.0, top_p=0.95, repetition_penalty=1.1)
    runs = []
    for k in (3, 3, 2):
        with _speculative(exports, drafts, teacher_fmt, "sometimes", draft_fmt, k) as model:
            first = model.complete(PROMPTS[1], seed=11, **options)
            model.complete(PROMPTS[2], seed=3, **options)  # another generation in between: a different cache
            again = model.complete(PROMPTS[1], seed=11, **options)
            other = model.complete(PROMPTS[1], seed=12, **options)
        counts = {key: first.speculative[key] for key in ("rounds", "drafted", "accepted", "draft_tokens")}
        assert again.token_ids == first.token_ids and again.text == first.text
        assert {key: again.speculative[key] for key in counts} == counts
        assert other.token_ids != first.token_ids
        assert 0 < first.speculative["accepted"] <= first.speculative["drafted"]
        runs.append(first.token_ids)
    assert runs[0] == runs[1]  # a freshly loaded model, the same seed: the same run


# ------------------------------------------------------------------------------------------------ 4. caches


def _assert_cache_is_a_fresh_prefill(model, cached: list[int], token_id: int, what: str) -> None:
    """The next token through ``model``'s cache gives the logits of a fresh evaluation of ``cached + [token]``."""
    assert cached, what
    incremental = np.array(model._evaluate([token_id], len(cached)), copy=True)
    fresh = model.logits(cached + [token_id])[-1]  # resets the cache: computed second
    np.testing.assert_allclose(incremental, fresh, atol=1e-4, rtol=0, err_msg=what)


@pytest.mark.parametrize("pair, kind", [("gguf", "sometimes"), ("onnx", "sometimes"), ("mixed", "sometimes"),
                                        ("gguf", "trimmed"), ("onnx", "trimmed")])  # fmt: skip
def test_rollback_leaves_both_caches_as_a_fresh_prefill(exports, drafts, pair, kind):
    teacher_fmt, draft_fmt = PAIRS[pair]
    with _speculative(exports, drafts, teacher_fmt, kind, draft_fmt, 3) as model:
        for options in ({}, {"temperature": 1.0, "top_k": 8, "seed": 5}, {"repetition_penalty": 1.3}):
            for prompt in PROMPTS[:2]:
                prompt_ids = model.tokenize(prompt)
                done = model.complete(prompt, max_tokens=GREEDY_TOKENS, **options)
                spec = done.speculative
                assert spec["accepted"] < spec["drafted"], "no proposal was refused: nothing rolled back"
                out = done.token_ids
                # the teacher holds the prompt and every output token but the last (which opens the next round)
                assert model._cached == prompt_ids + out[:-1], (options, prompt)
                draft_ids = model.vocabulary.draft_ids(prompt_ids + out)
                assert model._draft_cached == draft_ids[: len(model._draft_cached)], (options, prompt)
                assert len(model._draft_cached) >= len(model.vocabulary.draft_ids(prompt_ids)) - 1
                _assert_cache_is_a_fresh_prefill(model.teacher, model._cached, out[-1], f"teacher {options}")
                next_draft = draft_ids[len(model._draft_cached)]
                _assert_cache_is_a_fresh_prefill(model.draft, model._draft_cached, next_draft, f"draft {options}")
                model.reset_cache()  # the checks above moved the caches behind the model's back


class _Recorder:
    """Wraps a model's ``_evaluate`` (it still runs): records ``(number of tokens, start)`` of each call."""

    def __init__(self, model) -> None:
        self.model = model
        self.calls: list[tuple[int, int]] = []
        self._evaluate = model._evaluate

    def __call__(self, token_ids, start):
        self.calls.append((len(token_ids), start))
        return self._evaluate(token_ids, start)

    def __enter__(self):
        self.model._evaluate = self
        return self

    def __exit__(self, *exc):
        del self.model._evaluate


@pytest.mark.parametrize("pair, kind", [("gguf", "sometimes"), ("onnx", "sometimes"), ("mixed", "trimmed")])
def test_a_prompt_extending_the_output_reuses_the_cached_prefix(exports, drafts, teachers, pair, kind):
    teacher_fmt, draft_fmt = PAIRS[pair]
    plain = teachers[teacher_fmt]
    params = SamplingParams(max_tokens=12)
    with _speculative(exports, drafts, teacher_fmt, kind, draft_fmt, 3) as model:
        ids = model.tokenize(PROMPTS[1])
        first = _drain(model.stream_ids(ids, params))
        assert first.token_ids == _drain(plain.stream_ids(ids, params)).token_ids
        longer = ids + first.token_ids + model.tokenize(" and then", add_special=False)
        draft_cached = len(model._draft_cached)
        assert draft_cached > 0
        with _Recorder(model.teacher) as teacher_calls, _Recorder(model.draft) as draft_calls:
            second = _drain(model.stream_ids(longer, params))
        assert second.token_ids == _drain(plain.stream_ids(longer, params)).token_ids
        # the teacher evaluates only what its cache lacks of the new prompt (all but its last token), from where
        # the first generation left off; so does the draft
        shared = len(ids) + len(first.token_ids) - 1
        assert teacher_calls.calls[0] == (len(longer) - 1 - shared, shared)
        assert draft_calls.calls[0][1] == draft_cached
        assert second.speculative["rounds"] >= 1


# ------------------------------------------------------------------------------------------- 5. bad arguments


def test_bad_draft_tokens_are_refused(exports, drafts, capsys):
    with pytest.raises(EdgeDistillError, match="draft_tokens") as caught:
        load(exports.gguf, threads=1, draft_tokens=3)
    assert "draft" in str(caught.value)
    for value in (0, 17, -1, True, 2.5, "3"):
        with pytest.raises(EdgeDistillError, match="draft_tokens") as caught:
            load(exports.gguf, threads=1, draft=drafts["always"]["onnx"], draft_tokens=value)
        assert "\n" not in str(caught.value)
    assert cli("generate", str(exports.gguf), "hi", "--draft-tokens", "3", "--threads", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "draft_tokens" in err[0]
    result = cli_subprocess(
        "generate", str(exports.gguf), "hi", "--draft", str(drafts["always"]["gguf"]), "--draft-tokens", "0",
        "--threads", "1",
    )  # fmt: skip
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "draft_tokens" in lines[0] and "Traceback" not in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------ 6. CLI and server


def test_generate_command_with_a_draft(exports, drafts, teachers):
    draft = drafts["sometimes"]["gguf"]
    args = ("--max-tokens", "20", "--threads", "1")
    result = cli_subprocess("generate", str(exports.gguf), PROMPTS[0], "--draft", str(draft), "--stats", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout == teachers["gguf"].generate(PROMPTS[0], max_tokens=20) + "\n"
    draft_lines = [line for line in result.stderr.splitlines() if line.startswith("draft:")]
    assert len(draft_lines) == 1 and "accepted" in draft_lines[0], result.stderr
    assert "tokens/s" in result.stderr


def test_generate_and_chat_functions_with_a_draft(exports, drafts, teachers, capsys, monkeypatch):
    plain = teachers["onnx"]
    draft = str(drafts["sometimes"]["onnx"])
    assert cli("generate", str(exports.onnx_dir), PROMPTS[2], "--draft", draft, "--draft-tokens", "2",
               "--max-tokens", "16", "--threads", "1", "--stats") == 0  # fmt: skip
    captured = capsys.readouterr()
    assert captured.out == plain.generate(PROMPTS[2], max_tokens=16) + "\n"
    assert "accepted" in captured.err
    # chat: two turns, the second with the first's reply in its history
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\nHello\n/exit\n"))
    assert cli("chat", str(exports.onnx_dir), "--draft", draft, "--max-tokens", "10", "--threads", "1") == 0
    first, second = capsys.readouterr().out.splitlines()
    hello = {"role": "user", "content": "Hello"}
    assert first == plain.chat([hello], max_tokens=10)
    assert second == plain.chat([hello, {"role": "assistant", "content": first}, hello], max_tokens=10)


def test_serve_command_with_a_draft(exports, drafts, teachers):
    draft = drafts["sometimes"]["gguf"]
    argv = (str(exports.gguf), "--port", "0", "--threads", "1", "--model-id", "tiny", "--draft", str(draft))
    with serve_process(*argv, "--draft-tokens", "2") as (process, banner, url):
        assert f"drafted by {draft.name}" in banner, banner
        body = {"model": "tiny", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0}
        text = post_json(f"{url}/v1/completions", body)["choices"][0]["text"]
        assert text == teachers["gguf"].generate(PROMPTS[1], max_tokens=12)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def _post(server, path: str, body: dict):
    return request(server, "POST", path, body)


def test_server_with_a_speculative_model(exports, drafts, teachers):
    plain = teachers["gguf"]
    messages = [{"role": "user", "content": "Say something."}]
    with _speculative(exports, drafts, "gguf", "sometimes", "onnx", None) as model, running(model) as server:
        for prompt in PROMPTS[:2]:
            body = {"model": server.model_id, "prompt": prompt, "max_tokens": 20, "temperature": 0}
            status, reply = _post(server, "/v1/completions", body)
            assert status == 200, reply
            expected = plain.complete(prompt, max_tokens=20)
            assert reply["choices"][0]["text"] == expected.text
            assert reply["usage"]["completion_tokens"] == expected.completion_tokens
            status, text = _post(server, "/v1/completions", {**body, "stream": True})
            assert status == 200
            chunks = [json.loads(block[len("data: ") :]) for block in text.strip().split("\n\n")[:-1]]
            assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == expected.text
        body = {"model": server.model_id, "messages": messages, "max_tokens": 16, "temperature": 0}
        status, reply = _post(server, "/v1/chat/completions", body)
        assert status == 200 and reply["choices"][0]["message"]["content"] == plain.chat(messages, max_tokens=16)
