"""The shared sampler, stop strings, incremental UTF-8 decoding and the chat template, on plain numpy arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty, sample_token
from edgedistill.runtime.text import ChatTemplate, IncrementalDecoder, StopMatcher, check_messages

VOCAB = 1000


def _logits(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, VOCAB).astype(np.float32)


@pytest.mark.parametrize(
    "options, field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_tokens": 1.0}, "max_tokens"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"seed": "x"}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": [3]}, "stop"),
        ({"stop": 3}, "stop"),
    ],
)
def test_nonsense_values_are_refused_naming_the_field(options, field):
    with pytest.raises(EdgeDistillError, match=field):
        SamplingParams(**options)


def test_unknown_option_is_named():
    with pytest.raises(EdgeDistillError, match="'temprature'"):
        SamplingParams.from_options({"temprature": 0.5})


def test_values_are_normalised():
    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), stop="x", seed=np.int64(7))
    assert params.stop == ("x",) and type(params.temperature) is float and type(params.top_k) is int
    assert type(params.seed) is int and not params.greedy and SamplingParams().greedy


def test_greedy_is_argmax_and_ignores_the_seed():
    logits = _logits()
    for seed in (None, 0, 1):
        assert Sampler(SamplingParams(seed=seed), VOCAB)(logits) == int(np.argmax(logits))


def test_same_seed_same_tokens_different_seed_different_tokens():
    def draws(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed), VOCAB)
        return [sampler(_logits(i)) for i in range(50)]

    assert draws(1) == draws(1)
    assert draws(1) != draws(2)


def test_top_k_limits_the_support():
    logits = _logits()
    allowed = set(np.argsort(-logits)[:5].tolist())
    rng = np.random.default_rng(0)
    drawn = {sample_token(logits, 5.0, 5, 1.0, rng) for _ in range(500)}
    assert drawn <= allowed and len(drawn) > 1
    assert {sample_token(logits, 5.0, 1, 1.0, rng) for _ in range(20)} == {int(np.argmax(logits))}


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    rng = np.random.default_rng(0)
    assert {sample_token(logits, 1.0, 0, 0.5, rng) for _ in range(200)} == {0}
    assert {sample_token(logits, 1.0, 0, 0.8, rng) for _ in range(400)} == {0, 1}
    assert {sample_token(logits, 1.0, 0, 0.81, rng) for _ in range(800)} == {0, 1, 2}


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    """The prefiltered path (most likely 512 first) and the full sort keep the same tokens."""
    logits = np.random.default_rng(3).normal(0, 1, 49152).astype(np.float32)
    for top_p in (0.05, 0.5, 0.99):
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        keep = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
        expected = set(order[:keep].tolist())
        rng = np.random.default_rng(0)
        drawn = {sample_token(logits, 1.0, 0, top_p, rng) for _ in range(300)}
        assert drawn <= expected


def test_temperature_sharpens_and_flattens():
    logits = np.array([2.0, 1.0, 0.0], dtype=np.float32)

    def share_of_first(temperature: float) -> float:
        rng = np.random.default_rng(0)
        return sum(sample_token(logits, temperature, 0, 1.0, rng) == 0 for _ in range(3000)) / 3000

    expected = math.exp(2) / (math.exp(2) + math.exp(1) + 1)
    assert abs(share_of_first(1.0) - expected) < 0.03
    assert share_of_first(0.1) > 0.99 and share_of_first(100.0) < 0.4


def test_repetition_penalty_formula():
    logits = np.array([2.0, -2.0, 1.0, 0.5], dtype=np.float32)
    out = apply_repetition_penalty(logits, [0, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.5]  # the backend's buffer is not modified
    sampler = Sampler(SamplingParams(repetition_penalty=3.0), 4, context_ids=[0])
    assert sampler(logits) == 2  # 2.0 / 3 < 1.0


def test_non_finite_logits_are_an_error_not_a_crash():
    bad = np.full(VOCAB, np.nan, dtype=np.float32)
    with pytest.raises(EdgeDistillError, match="not finite"):
        Sampler(SamplingParams(), VOCAB)(bad)
    with pytest.raises(EdgeDistillError, match="NaN|not finite"):
        Sampler(SamplingParams(temperature=1.0, seed=0), VOCAB)(bad)


# ----------------------------------------------------------------------------------------------- stop strings


def _run_stops(stops: list[str], chunks: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    emitted = []
    for chunk in chunks:
        text, stopped = matcher.push(chunk)
        emitted.append(text)
        if stopped:
            return "".join(emitted), True, emitted
    emitted.append(matcher.flush())
    return "".join(emitted), False, emitted


def test_stop_string_split_across_pieces():
    text, stopped, emitted = _run_stops(["END"], ["hello E", "N", "D and more"])
    assert (text, stopped) == ("hello ", True)
    assert emitted[0] == "hello "  # "E" held back: it might begin the stop string


def test_partial_match_that_fails_is_released():
    text, stopped, emitted = _run_stops(["END"], ["hello E", "Nx", " tail"])
    assert (text, stopped) == ("hello ENx tail", False)
    assert emitted[1] == "ENx"


def test_earliest_of_several_stops_wins_and_no_stop_passes_through():
    assert _run_stops(["b", "a"], ["xxab"])[:2] == ("xx", True)
    assert _run_stops([], ["a", "b"])[:2] == ("ab", False)
    assert _run_stops(["\n\n"], ["line\n", "\n", "next"])[:2] == ("line", True)


# ------------------------------------------------------------------------------------------- UTF-8 decoding


def test_incremental_decoder_buffers_multibyte_characters():
    text = "aé🙂z"
    data = text.encode("utf-8")
    pieces = {i: data[i : i + 1] for i in range(len(data))}  # one byte per "token"
    decoder = IncrementalDecoder(pieces.__getitem__)
    out = [decoder.add(i) for i in range(len(data))] + [decoder.flush()]
    assert "".join(out) == text
    assert out[1:3] == ["", "é"] and out[3:7] == ["", "", "", "🙂"]


def test_incomplete_sequence_at_the_end_becomes_a_replacement_character():
    decoder = IncrementalDecoder({0: b"ok", 1: "🙂".encode()[:2]}.__getitem__)
    assert decoder.add(0) == "ok" and decoder.add(1) == "" and decoder.flush() == "\ufffd"


# ------------------------------------------------------------------------------------------- chat template


def test_chat_template_matches_hugging_face_and_reports_errors():
    from conftest import CHATML, make_tokenizer

    tokenizer = make_tokenizer()
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi {{ x }}"}]
    template = ChatTemplate(CHATML, {"eos_token": "<|im_end|>"})
    assert template.render(messages) == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    with pytest.raises(EdgeDistillError, match="does not compile"):
        ChatTemplate("{% for %}")
    with pytest.raises(EdgeDistillError, match="only users"):
        ChatTemplate("{{ raise_exception('only users') }}").render([{"role": "user", "content": "x"}])
    sandboxed = ChatTemplate("{{ messages.__class__.__mro__ }}")
    with pytest.raises(EdgeDistillError):
        sandboxed.render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages",
    [[], "hello", [{"role": "user"}], [{"role": "robot", "content": "x"}], [{"role": "user", "content": 3}], [3]],
)
def test_malformed_messages_are_refused(messages):
    with pytest.raises(EdgeDistillError, match="messages"):
        check_messages(messages)
