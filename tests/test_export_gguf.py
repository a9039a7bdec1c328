"""GGUF export of tiny in-process Llamas: files load and generate in llama.cpp, the manifest's figures hold when
recomputed here, the metadata and tokenizer are complete, and the default teacher's tokenizer passes the probe."""

from __future__ import annotations

import copy
import hashlib
import logging

import numpy as np
import pytest
from conftest import make_tokenizer
from export_helpers import inverse_permute_rotary, make_attention_llama, read_manifest, run_export, save_checkpoint

from edgedistill.errors import EdgeDistillError
from edgedistill.export import gguf as gguf_export
from edgedistill.export import parity
from edgedistill.llamacpp import LlamaCpp

pytest.importorskip("llama_cpp")
ALL_QUANTS = "f32,f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0"


@pytest.fixture(scope="module", autouse=True)
def _quiet_llama_cpp():
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.ERROR)
    yield
    log.setLevel(level)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-out")
    code = run_export("gguf", str(checkpoint), "--quant", ALL_QUANTS, "--out", str(out), "--threads", "1")
    return code, out, read_manifest(out)


def _llama(path, f32_cache=False):
    """llama.cpp through the public low-level API, with the AMX-safe buffer choice (edgedistill/llamacpp.py):
    ``llama_cpp.Llama`` itself segfaults on q8_0 and k-quant files on AMX CPUs (ggml-org/llama.cpp#20824)."""
    return LlamaCpp(path, n_ctx=128, n_batch=128, threads=1, f32_cache=f32_cache)


def test_every_quantization_is_written_and_passes(exported):
    code, out, manifest = exported
    assert code == 0
    records = {a["quantization"]: a for a in manifest["artifacts"]}
    assert set(records) == set(ALL_QUANTS.split(","))
    for quant, record in records.items():
        path = out / record["path"]
        assert path.name == f"tiny-llama-{quant}.gguf"
        assert record["format"] == "gguf" and record["passed"], record["parity"]["failures"]
        assert record["bytes"] == path.stat().st_size
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    # No temporary file is left behind.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    sizes = {q: r["bytes"] for q, r in records.items()}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


def test_each_gguf_loads_in_llama_cpp_and_generates(exported):
    _, out, manifest = exported
    for record in manifest["artifacts"]:
        with _llama(out / record["path"]) as llm:
            ids = llm.tokenize("The quick brown", add_special=True)
            logits = llm.evaluate(ids)
            for _ in range(8):  # greedy decoding, one position at a time through the KV cache
                assert np.isfinite(logits).all()
                next_id = int(np.argmax(logits))
                logits = llm.evaluate([next_id], start=len(ids))
                ids.append(next_id)


def test_manifest_parity_figures_recomputed(exported, checkpoint):
    """Logits of llama.cpp and PyTorch and the tokenizer probe, computed here without the exporter's code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, manifest = exported
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompts = parity.probe_prompt_ids(tokenizer, model.config.max_position_embeddings)
    with torch.no_grad():
        reference = [model(torch.tensor([ids])).logits[0].numpy() for ids in prompts]
    assert model.num_parameters() == manifest["artifacts"][0]["parameters"]
    probes = parity.probe_strings(tokenizer)
    assert len(probes) >= parity.MIN_PROBE_STRINGS
    expected = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in probes]
    for record in manifest["artifacts"]:
        # The manifest states how llama.cpp ran for its figures: float32 KV cache, no flash attention.
        assert record["details"]["parity_runtime"]["kv_cache"] == "f32"
        assert record["details"]["parity_runtime"]["flash_attention"] is False
        with _llama(out / record["path"], f32_cache=True) as llm:
            diffs, agree = [], 0
            for ids, ref in zip(prompts, reference):
                logits = llm.evaluate(ids, all_logits=True)
                diffs.append(np.abs(logits - ref))
                agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
            matches = sum(llm.tokenize(t) == e for t, e in zip(probes, expected))
        got = record["parity"]
        positions = sum(len(ids) for ids in prompts)
        assert got["positions"] == positions
        assert got["max_logit_diff"] == pytest.approx(max(d.max() for d in diffs), rel=1e-3, abs=1e-4)
        assert got["mean_logit_diff"] == pytest.approx(
            sum(d.sum() for d in diffs) / sum(d.size for d in diffs), rel=1e-3, abs=1e-5
        )
        assert got["top1_agreement"] == pytest.approx(agree / positions, abs=1.5 / positions)
        assert got["tokenizer_matches"] == matches == len(probes) == got["tokenizer_total"]
        if record["quantization"] in ("f32", "f16"):
            assert got["greedy_equal"] is True


def test_greedy_tokens_equal_pytorch_for_f32(exported, checkpoint):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = tokenizer(parity.PROBE_PROMPTS[0])["input_ids"]
    torch_tokens = []
    with torch.no_grad():  # no cache, no EOS stop: the plainest greedy loop
        for _ in range(parity.GREEDY_TOKENS):
            torch_tokens.append(int(model(torch.tensor([ids + torch_tokens])).logits[0, -1].argmax()))
    with _llama(out / "tiny-llama-f32.gguf") as llm:  # llama.cpp's default float16 KV cache
        tokens = [int(np.argmax(llm.evaluate(ids)))]
        while len(tokens) < parity.GREEDY_TOKENS:
            tokens.append(int(np.argmax(llm.evaluate(tokens[-1:], start=len(ids) + len(tokens) - 1))))
    assert tokens == torch_tokens


def test_gguf_metadata_and_tokenizer_fields(exported, checkpoint):
    from gguf import GGUFReader, TokenType
    from transformers import AutoTokenizer

    from edgedistill import __version__

    _, out, manifest = exported
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    reader = GGUFReader(str(out / "tiny-llama-f16.gguf"))
    meta = {key: field.contents() for key, field in reader.fields.items()}
    assert meta["general.architecture"] == "llama"
    assert meta["general.name"] == "tiny-llama"
    assert meta[gguf_export.EDGEDISTILL_VERSION_KEY] == __version__
    assert meta["general.file_type"] == 1  # llama.cpp's quantizer set it: MOSTLY_F16
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == manifest["artifacts"][0]["details"]["tokenizer_pre"] == "gpt-2"
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == len(tokenizer) == meta["llama.vocab_size"]
    assert all(tokens[i] == t for t, i in tokenizer.get_vocab().items())
    assert len(meta["tokenizer.ggml.merges"]) > 0
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    types = meta["tokenizer.ggml.token_type"]
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert types[tokenizer.convert_tokens_to_ids(special)] == TokenType.CONTROL
    assert "blk.0.attn_q.weight" in {t.name for t in reader.tensors}
    assert "output.weight" not in {t.name for t in reader.tensors}  # tied: llama.cpp reuses token_embd


def test_padded_vocabulary_gets_unused_tokens():
    tokenizer = make_tokenizer()
    vocab = gguf_export.vocab_from_tokenizer(tokenizer, len(tokenizer) + 5)
    assert len(vocab.tokens) == len(tokenizer) + 5
    assert vocab.tokens[-1] == f"[PAD{len(tokenizer) + 4}]" and vocab.token_types[-1] == 5  # TokenType.UNUSED
    with pytest.raises(EdgeDistillError, match="embedding has only"):
        gguf_export.vocab_from_tokenizer(tokenizer, len(tokenizer) - 1)


def test_permutation_is_what_llama_cpp_needs(tmp_path):
    """The same weights written without the q/k permutation fail parity: the check sees a wrong layout."""
    tokenizer = make_tokenizer()
    model = make_attention_llama(len(tokenizer))
    reference = parity.torch_reference(model, parity.probe_prompt_ids(tokenizer, 512))
    unpermuted = copy.deepcopy(model)
    config = model.config
    for layer in unpermuted.model.layers:
        q, k = layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight
        q.data = q.data.new_tensor(inverse_permute_rotary(q.data.numpy(), config.num_attention_heads))
        k.data = k.data.new_tensor(inverse_permute_rotary(k.data.numpy(), config.num_key_value_heads))
    vocab = gguf_export.vocab_from_tokenizer(tokenizer, config.vocab_size)
    probes = ["hello world"]
    expected = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in probes]
    reports = {}
    for name, weights in (("right", model), ("wrong", unpermuted)):
        path = tmp_path / f"{name}.gguf"
        gguf_export.write_gguf(path, config, vocab, "gpt-2", {"name": name}, model=weights)
        reports[name] = gguf_export.check_gguf(path, "f32", reference, probes, expected, [], [], threads=1)
    assert reports["right"].passed, reports["right"].failures
    assert not reports["wrong"].passed
    assert reports["wrong"].top1_agreement < 0.9 and reports["wrong"].max_logit_diff > 0.1


def test_interrupted_export_leaves_no_file(tmp_path, checkpoint):
    """A stop between two artifacts (here raised from the progress callback) leaves the output directory empty."""
    from edgedistill.export.source import load_source, resolve_source

    source = resolve_source(str(checkpoint))
    loaded = load_source(source)
    reference = parity.torch_reference(loaded.model, parity.probe_prompt_ids(loaded.tokenizer, 512), 1, 4)
    calls = []

    def stop_after_first_artifact(line: str) -> None:
        calls.append(line)
        if ".gguf:" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        gguf_export.export_gguf(
            source, loaded, ["f16", "q8_0", "f32"], tmp_path, reference, ["a b"], 1, progress=stop_after_first_artifact
        )
    assert any("f16.gguf" in line for line in calls)
    assert list(tmp_path.iterdir()) == []


def test_default_teacher_tokenizer_probe(tmp_path):
    """The default teacher's tokenizer: llama.cpp tokenizes every probe string exactly as Hugging Face does once
    the pre-tokenizer is chosen by probing; GPT-2's split (a plausible guess) does not."""
    from edgedistill.distill.teacher import DEFAULT_TEACHER, load_config, load_tokenizer, resolve_teacher

    try:
        source = resolve_teacher(DEFAULT_TEACHER)
    except EdgeDistillError as err:
        pytest.skip(str(err))
    tokenizer = load_tokenizer(source)
    config = load_config(source)
    probes = parity.probe_strings(tokenizer)
    assert len(probes) >= parity.MIN_PROBE_STRINGS
    expected = parity.hf_token_ids(tokenizer, probes)
    vocab = gguf_export.vocab_from_tokenizer(tokenizer, config.vocab_size)
    assert vocab.add_bos is False and vocab.tokens[vocab.eos_id] == "<|im_end|>"
    pre, scores = gguf_export.choose_pre_tokenizer(tmp_path, config, vocab, {"name": "t"}, probes, expected)
    assert pre == "smollm"
    assert scores["smollm"] == len(probes)
    assert 0 < scores["gpt-2"] < len(probes)  # digits: SmolLM2 splits them one by one
    assert list(tmp_path.iterdir()) == []
