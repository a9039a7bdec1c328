"""The runtime on a tiny exported student: greedy parity with PyTorch in both formats, logits, tokenizer, chat
template, streaming equal to non-streaming, stop strings, seeded sampling, KV-cache reuse and thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from runtime_helpers import tiny_exports, torch_greedy, torch_logits

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime import load
from edgedistill.runtime.model import FINISH_LENGTH, FINISH_STOP

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")

PROMPTS = ["The quick brown fox", "def add(a, b):\n    return", "Knowledge distillation trains"]
GREEDY_TOKENS = 24


@pytest.fixture(scope="module")
def exports():
    return tiny_exports()


@pytest.fixture(scope="module", params=["onnx", "gguf"])
def model(request, exports):
    path = exports.onnx_dir if request.param == "onnx" else exports.gguf
    loaded = load(path, threads=1, context=256)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def both(exports):
    onnx, gguf = load(exports.onnx_dir, threads=1, context=256), load(exports.gguf, threads=1, context=256)
    yield onnx, gguf
    onnx.close()
    gguf.close()


@pytest.fixture(scope="module")
def hf_tokenizer(exports):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exports.checkpoint)


def test_greedy_equals_pytorch_in_both_formats(both, exports, hf_tokenizer):
    onnx, gguf = both
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt)["input_ids"]
        expected = torch_greedy(exports.checkpoint, ids, GREEDY_TOKENS, onnx.eos_ids)
        for model in (onnx, gguf):
            assert model.tokenize(prompt) == ids, model.info.backend
            completion = model.complete(prompt, max_tokens=GREEDY_TOKENS)
            assert completion.token_ids == expected, (model.info.backend, prompt)
            assert completion.text == hf_tokenizer.decode(
                [t for t in expected if t not in onnx.eos_ids], skip_special_tokens=True
            )


def test_logits_match_pytorch(both, exports, hf_tokenizer):
    ids = hf_tokenizer(PROMPTS[0] + " " + PROMPTS[2])["input_ids"]
    reference = torch_logits(exports.checkpoint, ids)
    for model in both:
        logits = model.logits(ids)
        assert logits.shape == reference.shape and logits.dtype == np.float32
        assert np.max(np.abs(logits - reference)) < 1e-3, model.info.backend


def test_logits_longer_than_one_prefill_chunk(model):
    """Evaluation logits over more tokens than one onnxruntime run / llama.cpp batch takes, against token-by-token
    decoding through the cache."""
    ids = [int(i) for i in np.random.default_rng(0).integers(3, model.info.vocab_size, size=200)]
    full = model.logits(ids)
    stepwise = [model._evaluate(ids[:1], 0).copy()]
    for position in range(1, 40):
        stepwise.append(model._evaluate(ids[position : position + 1], position).copy())
    model._truncate(0)
    model._cached = []
    assert np.max(np.abs(full[:40] - np.stack(stepwise))) < 1e-3


def test_tokenizer_and_detokenizer_match_hugging_face(both, hf_tokenizer):
    texts = ["Hello world", "<|im_start|>user\nhi<|im_end|>\n", "numbers 0 1 2 and ünïcødé 🙂", "  spaces  "]
    for model in both:
        for text in texts:
            ids = model.tokenize(text)
            assert ids == hf_tokenizer(text)["input_ids"], (model.info.backend, text)
            assert model.detokenize(ids) == hf_tokenizer.decode(ids), (model.info.backend, text)
            assert model.detokenize(ids, special=False) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_chat_template_renders_like_hugging_face(both, hf_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for model in both:
        assert model.render_chat(messages) == expected, model.info.backend
        assert isinstance(model.chat(messages, max_tokens=8), str)


def test_chat_equals_generation_from_the_rendered_prompt(model):
    messages = [{"role": "user", "content": "Say something."}]
    prompt_ids = model.tokenize(model.render_chat(messages), add_special=False)
    from edgedistill.runtime.sampling import SamplingParams

    stream = model.stream_ids(prompt_ids, SamplingParams(max_tokens=12))
    assert model.chat(messages, max_tokens=12) == "".join(stream)


def test_streamed_text_equals_generated_text(model):
    for options in ({"max_tokens": 40}, {"max_tokens": 40, "temperature": 1.5, "seed": 3}):
        for prompt in PROMPTS:
            pieces = list(model.stream(prompt, **options))
            completion = model.complete(prompt, **options)
            assert "".join(pieces) == completion.text == model.generate(prompt, **options)
            assert all(pieces)


def test_stream_pieces_never_split_a_character(model):
    """High-temperature sampling from a byte-level vocabulary emits stray bytes; every piece is whole text and the
    pieces join to the detokenized output."""
    stream = model.stream("ü 🙂", max_tokens=60, temperature=3.0, seed=7)
    pieces = list(stream)
    ids = stream.completion.token_ids
    text = model.detokenize([i for i in ids if i not in model.eos_ids], special=False)
    assert "".join(pieces) == text
    for piece in pieces:
        piece.encode("utf-8")  # a str holding a lone surrogate or split sequence would fail here


def test_incremental_decoder_holds_back_partial_characters(model):
    from edgedistill.runtime.text import IncrementalDecoder

    text = "naïve café 🙂🚀 日本語"
    ids = model.tokenize(text, add_special=False)
    decoder = IncrementalDecoder(model.token_bytes)
    pieces = [decoder.add(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert any(piece == "" for piece in pieces)  # some token ended inside a multi-byte character


def test_stop_strings(model):
    prompt = PROMPTS[1]
    full = model.complete(prompt, max_tokens=40)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = model.complete(prompt, max_tokens=40, stop=[stop, "never-appears"])
    assert cut.text == full.text[: full.text.index(stop)]
    assert cut.finish_reason == FINISH_STOP and cut.completion_tokens < full.completion_tokens
    assert "".join(model.stream(prompt, max_tokens=40, stop=stop)) == cut.text
    # A stop string that is only a prefix of the output's tail is not held back at the end.
    assert model.generate(prompt, max_tokens=40, stop=full.text[-1] + "\x00") == full.text


def test_max_tokens_and_finish_reason(model):
    completion = model.complete(PROMPTS[0], max_tokens=5)
    assert completion.completion_tokens <= 5
    if FINISH_STOP != completion.finish_reason:
        assert completion.finish_reason == FINISH_LENGTH and completion.completion_tokens == 5
    assert completion.prompt_tokens == len(model.tokenize(PROMPTS[0]))


def test_generation_stops_when_the_context_is_full(exports):
    for path in (exports.onnx_dir, exports.gguf):
        with load(path, threads=1, context=16) as small:
            ids = small.tokenize(PROMPTS[0])
            completion = small.complete(PROMPTS[0], max_tokens=100, temperature=1.0, seed=0)
            assert completion.finish_reason in (FINISH_LENGTH, FINISH_STOP)
            assert len(ids) + completion.completion_tokens <= 17


def test_seeded_sampling_is_reproducible_and_identical_across_formats(both):
    onnx, gguf = both
    options = {"max_tokens": 30, "temperature": 0.9, "top_k": 50, "top_p": 0.9, "seed": 1234}
    first = onnx.complete(PROMPTS[0], **options)
    assert onnx.complete(PROMPTS[0], **options).token_ids == first.token_ids
    # The same sampler on logits that agree to 1e-5: the same draws.
    assert gguf.complete(PROMPTS[0], **options).token_ids == first.token_ids
    others = {tuple(onnx.complete(PROMPTS[0], **{**options, "seed": seed}).token_ids) for seed in range(4)}
    assert len(others) > 1


def test_repetition_penalty_changes_greedy_output(model):
    plain = model.complete(PROMPTS[2], max_tokens=40)
    penalized = model.complete(PROMPTS[2], max_tokens=40, repetition_penalty=5.0)
    assert plain.token_ids != penalized.token_ids
    repeats = len(penalized.token_ids) - len(set(penalized.token_ids))
    assert repeats <= len(plain.token_ids) - len(set(plain.token_ids))


def test_cache_reuse_gives_the_same_result(model):
    """A prompt sharing a prefix with the previous one reuses the cached keys and values; results must not change."""
    base = "The quick brown fox jumps over the lazy dog."
    fresh = [model.complete(p, max_tokens=16).token_ids for p in (base, base + " Again", base)]
    model.logits([5])  # clears the cache
    assert model.complete(base + " Again", max_tokens=16).token_ids == fresh[1]
    assert model.complete(base, max_tokens=16).token_ids == fresh[0] == fresh[2]


def test_concurrent_generations_are_serialized_and_correct(model):
    expected = {prompt: model.generate(prompt, max_tokens=20) for prompt in PROMPTS}
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            results[index] = model.generate(PROMPTS[index % len(PROMPTS)], max_tokens=20)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and len(results) == 6
    for index, text in results.items():
        assert text == expected[PROMPTS[index % len(PROMPTS)]]


def test_an_open_stream_blocks_a_second_one_in_the_same_thread(model):
    stream = model.stream(PROMPTS[0], max_tokens=10)
    next(stream, None)
    with pytest.raises(EdgeDistillError, match="still open"):
        model.generate(PROMPTS[1], max_tokens=3)
    stream.close()
    assert model.generate(PROMPTS[1], max_tokens=3) is not None


def test_info(both, exports):
    onnx, gguf = both
    assert onnx.info.backend == "onnxruntime" and onnx.info.format == "onnx" and onnx.info.quantization == "fp32"
    assert gguf.info.backend == "llama.cpp" and gguf.info.format == "gguf" and gguf.info.quantization == "f32"
    from transformers import AutoModelForCausalLM

    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(exports.checkpoint).parameters())
    for model in both:
        assert model.info.parameters == parameters
        assert model.info.context == 256 and model.info.trained_context == 512 and model.info.threads == 1
        assert model.info.vocab_size == onnx.info.vocab_size
        assert model.info.file_bytes > 0 and model.info.to_dict()["backend"] == model.info.backend


def test_the_exported_graph_engine_agrees_with_the_fused_one(both, exports, hf_tokenizer):
    """The fallback engine (optimum's graph as exported, ping-pong cache) against the default (GroupQueryAttention
    rewrite, in-place cache): same logits, same greedy tokens, PyTorch's tokens."""
    from edgedistill.runtime.onnx_backend import ConcatEngine, InPlaceEngine, OnnxModel

    fused = both[0]
    assert isinstance(fused.engine, InPlaceEngine) and fused.fallback_reason == ""
    with OnnxModel(exports.onnx_dir, threads=1, context=256, fuse_attention=False) as plain:
        assert isinstance(plain.engine, ConcatEngine) and plain.fallback_reason == "disabled by the caller"
        ids = hf_tokenizer(PROMPTS[1])["input_ids"]
        assert np.max(np.abs(plain.logits(ids) - fused.logits(ids))) < 1e-4
        for prompt in PROMPTS:
            expected = torch_greedy(exports.checkpoint, hf_tokenizer(prompt)["input_ids"], 16, fused.eos_ids)
            assert plain.complete(prompt, max_tokens=16).token_ids == expected
        base = "The quick brown fox jumps over the lazy dog."  # cache truncation with two key/value heads
        first = plain.complete(base + " Again", max_tokens=8).token_ids
        plain.complete(base, max_tokens=8)
        assert plain.complete(base + " Again", max_tokens=8).token_ids == first


def test_the_rewrite_declines_what_it_does_not_compute(exports):
    import json

    from edgedistill.runtime.onnx_graph import fuse_attention

    config = json.loads((exports.onnx_dir / "config.json").read_text())
    assert fuse_attention(exports.onnx_dir / "model.onnx", config, 64).model is not None
    for change, reason in [
        ({"model_type": "mistral"}, "model_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
        ({"num_hidden_layers": config["num_hidden_layers"] + 1}, "layer 2"),
    ]:
        result = fuse_attention(exports.onnx_dir / "model.onnx", {**config, **change}, 64)
        assert result.model is None and reason in result.reason


@pytest.mark.slow
def test_quantized_onnx_exports_run_fused(exports, tmp_path):
    """int8 (dynamic) and int4 (MatMulNBits) exports: the rewrite finds their attention too, and agrees with the
    graph as exported."""
    import contextlib
    import io

    from export_helpers import run_export

    from edgedistill.runtime.onnx_backend import InPlaceEngine, OnnxModel

    with contextlib.redirect_stdout(io.StringIO()):
        assert run_export("onnx", str(exports.checkpoint), "--quant", "int8,int4", "--out", str(tmp_path)) == 0
    ids = list(range(10, 60))
    for quant in ("int8", "int4"):
        directory = tmp_path / f"tiny-student-onnx-{quant}"
        with OnnxModel(directory, threads=1) as fused, OnnxModel(directory, threads=1, fuse_attention=False) as plain:
            assert isinstance(fused.engine, InPlaceEngine), fused.fallback_reason
            assert fused.info.quantization == quant
            a, b = fused.logits(ids), plain.logits(ids)
            assert np.mean(np.argmax(a, -1) == np.argmax(b, -1)) > 0.9
            assert np.mean(np.abs(a - b)) < 0.05


@pytest.mark.slow
def test_linear_rope_scaling_is_fused_exactly(tmp_path):
    """A student with linearly scaled rotary positions: the rotary tables computed for GroupQueryAttention agree
    with the exported graph's own."""
    import contextlib
    import io

    import torch
    from conftest import make_tokenizer
    from export_helpers import make_attention_llama, run_export

    from edgedistill.runtime.onnx_backend import InPlaceEngine, OnnxModel

    tokenizer = make_tokenizer()
    model = make_attention_llama(len(tokenizer), seed=1)
    model.config.rope_scaling = {"rope_type": "linear", "factor": 4.0}
    model.model.rotary_emb = type(model.model.rotary_emb)(config=model.config)
    checkpoint = tmp_path / "scaled"
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    with contextlib.redirect_stdout(io.StringIO()):
        assert run_export("onnx", str(checkpoint), "--quant", "fp32", "--out", str(tmp_path / "out")) == 0
    directory = tmp_path / "out" / "scaled-onnx-fp32"
    ids = list(range(5, 105))
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].numpy()
    with OnnxModel(directory, threads=1) as fused, OnnxModel(directory, threads=1, fuse_attention=False) as plain:
        assert isinstance(fused.engine, InPlaceEngine), fused.fallback_reason
        assert np.max(np.abs(fused.logits(ids) - reference)) < 1e-3
        assert np.max(np.abs(plain.logits(ids) - reference)) < 1e-3
