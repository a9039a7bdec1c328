"""ONNX export of a tiny in-process Llama: each artifact loads in plain onnxruntime and in optimum's
ORTModelForCausalLM, carries its tokenizer, and the manifest's figures hold when recomputed here."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from export_helpers import read_manifest, run_export, save_checkpoint

from edgedistill.export import onnx as onnx_export
from edgedistill.export import parity

pytest.importorskip("onnxruntime")
pytest.importorskip("optimum.onnxruntime")
QUANTS = ("fp32", "int8", "int4")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx-out")
    code = run_export("onnx", str(checkpoint), "--quant", ",".join(QUANTS), "--out", str(out), "--threads", "1")
    return code, out, read_manifest(out)


def _session(path):
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _full_logits(session, ids: list[int], layers: int, kv_heads: int, head_dim: int) -> np.ndarray:
    """Logits of one prompt with an empty past, fed by input names read from the session itself."""
    feed = {}
    for item in session.get_inputs():
        if item.name == "input_ids":
            feed[item.name] = np.array([ids], dtype=np.int64)
        elif item.name == "attention_mask":
            feed[item.name] = np.ones((1, len(ids)), dtype=np.int64)
        elif item.name == "position_ids":
            feed[item.name] = np.arange(len(ids), dtype=np.int64)[None]
        else:
            assert item.name.startswith("past_key_values.")
            feed[item.name] = np.zeros((1, kv_heads, 0, head_dim), dtype=np.float32)
    return session.run(["logits"], feed)[0][0]


def test_every_quantization_is_written_and_passes(exported):
    code, out, manifest = exported
    assert code == 0
    records = {a["quantization"]: a for a in manifest["artifacts"]}
    assert set(records) == set(QUANTS)
    for quant, record in records.items():
        path = out / record["path"]
        assert path == out / f"tiny-llama-onnx-{quant}" / "model.onnx"
        assert record["format"] == "onnx" and record["passed"], record["parity"]["failures"]
        assert record["bytes"] == path.stat().st_size
        assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (path.parent / name).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert records["fp32"]["bytes"] > records["int8"]["bytes"] > records["int4"]["bytes"]


def test_decoder_has_past_key_value_inputs_and_outputs(exported):
    _, out, manifest = exported
    for record in manifest["artifacts"]:
        session = _session(out / record["path"])
        inputs = {i.name for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= inputs
        assert {"logits", "present.0.key", "present.1.value"} <= outputs


def test_quantized_graphs_use_onnxruntime_quantized_ops(exported):
    import onnx

    _, out, _ = exported
    ops = {
        q: {n.op_type for n in onnx.load(str(out / f"tiny-llama-onnx-{q}" / "model.onnx")).graph.node} for q in QUANTS
    }
    assert "MatMulInteger" in ops["int8"] or "DynamicQuantizeMatMul" in ops["int8"]
    assert "MatMulNBits" in ops["int4"]
    assert not {"MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul"} & ops["fp32"]


def test_manifest_parity_figures_recomputed(exported, checkpoint):
    """Logits of plain onnxruntime (no past reuse) and PyTorch, and the saved tokenizer, computed here."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, manifest = exported
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    prompts = parity.probe_prompt_ids(tokenizer, config.max_position_embeddings)
    with torch.no_grad():
        reference = [model(torch.tensor([ids])).logits[0].numpy() for ids in prompts]
    probes = parity.probe_strings(tokenizer)
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in probes]
    for record in manifest["artifacts"]:
        path = out / record["path"]
        assert record["parameters"] == model.num_parameters()
        session = _session(path)
        diffs, agree = [], 0
        for ids, ref in zip(prompts, reference):
            logits = _full_logits(session, ids, config.num_hidden_layers, config.num_key_value_heads, head_dim)
            diffs.append(np.abs(logits.astype(np.float64) - ref))
            agree += int((logits.argmax(-1) == ref.argmax(-1)).sum())
        saved = AutoTokenizer.from_pretrained(path.parent)
        matches = sum(saved(t, add_special_tokens=False)["input_ids"] == e for t, e in zip(probes, expected))
        got = record["parity"]
        positions = sum(len(ids) for ids in prompts)
        assert got["positions"] == positions
        assert got["max_logit_diff"] == pytest.approx(max(d.max() for d in diffs), rel=1e-3, abs=1e-5)
        assert got["mean_logit_diff"] == pytest.approx(
            sum(d.sum() for d in diffs) / sum(d.size for d in diffs), rel=1e-3, abs=1e-6
        )
        assert got["top1_agreement"] == pytest.approx(agree / positions, abs=1.5 / positions)
        assert got["tokenizer_matches"] == matches == len(probes) >= parity.MIN_PROBE_STRINGS
        assert saved.chat_template == tokenizer.chat_template
    fp32 = next(r for r in manifest["artifacts"] if r["quantization"] == "fp32")
    assert fp32["parity"]["greedy_equal"] is True and fp32["parity"]["max_logit_diff"] < 1e-4


def test_each_artifact_generates_in_optimum(exported, checkpoint):
    """ORTModelForCausalLM loads every artifact directory; fp32's greedy tokens equal PyTorch's generate()."""
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, manifest = exported
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    encoded = tokenizer([parity.PROBE_PROMPTS[0]], return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    settings = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model.generate(**inputs, **settings)
    for record in manifest["artifacts"]:
        ort_model = ORTModelForCausalLM.from_pretrained((out / record["path"]).parent)
        generated = ort_model.generate(**inputs, **settings)
        assert generated.shape == expected.shape
        if record["quantization"] == "fp32":
            assert generated.tolist() == expected.tolist()


def test_interrupted_export_leaves_no_directory(tmp_path, checkpoint):
    from edgedistill.export.source import load_source, resolve_source

    source = resolve_source(str(checkpoint))
    loaded = load_source(source)
    reference = parity.torch_reference(loaded.model, parity.probe_prompt_ids(loaded.tokenizer, 512), 1, 4)

    def stop_after_first_artifact(line: str) -> None:
        if "-onnx-int8:" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_onnx(
            source,
            loaded,
            ["int8", "int4", "fp32"],
            tmp_path,
            reference,
            ["a b"],
            1,
            progress=stop_after_first_artifact,
        )
    assert list(tmp_path.iterdir()) == []
