"""``edgedistill export`` as the CLI runs it: bad input fails in one line naming the thing at fault, a parity
failure gives a non-zero exit unless ``--allow-mismatch``, the manifest merges runs, a GGUF is accepted as input."""

from __future__ import annotations

import json

import pytest
from conftest import make_tokenizer
from export_helpers import last_json_line, read_manifest, run_export, save_checkpoint

from edgedistill.errors import EdgeDistillError

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama")


def _fails(match: str, *argv: str) -> str:
    with pytest.raises(EdgeDistillError, match=match) as info:
        run_export(*argv)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_not_a_checkpoint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _fails("config.json", "gguf", str(empty), "--out", str(tmp_path / "out"))
    assert str(empty) in message
    _fails("no such file or directory", "onnx", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a model")
    _fails("not a GGUF file", "gguf", str(fake), "--out", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_architecture_we_cannot_export(tmp_path):
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    message = _fails("cannot be exported", "onnx", str(gpt2), "--out", str(tmp_path / "out"))
    assert "GPT2LMHeadModel" in message


def test_gguf_of_another_architecture(tmp_path):
    import gguf

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(path=None, arch="gpt2")
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _fails("architecture 'gpt2'", "gguf", str(path), "--out", str(tmp_path / "out"))


def test_llama_variant_gguf_cannot_hold(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        attention_bias=True,
    )
    directory = tmp_path / "biased"
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _fails("attention_bias", "gguf", str(directory), "--out", str(tmp_path / "out"), "--threads", "1")
    assert not [p for p in (tmp_path / "out").iterdir()]


def test_unknown_quantization(tmp_path, checkpoint):
    message = _fails("--quant", "gguf", str(checkpoint), "--quant", "f16,q3_x", "--out", str(tmp_path / "out"))
    assert "'q3_x'" in message and "q4_k_m" in message
    message = _fails("--quant", "onnx", str(checkpoint), "--quant", "f16", "--out", str(tmp_path / "out"))
    assert "onnx" in message and "'f16'" in message


def test_unwritable_output(tmp_path, checkpoint):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _fails("--out", "gguf", str(checkpoint), "--out", str(blocker))
    message = _fails("--out", "gguf", str(checkpoint), "--out", str(blocker / "sub"))
    assert str(blocker / "sub") in message


def test_parity_failure_exits_non_zero_unless_allowed(tmp_path, capsys):
    """A tokenizer whose pre-tokenizer no llama.cpp setting reproduces (it splits around every 'e')."""
    from tokenizers import pre_tokenizers

    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("e", "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    directory = save_checkpoint(tmp_path / "odd-tokenizer", tokenizer=tokenizer)
    out = tmp_path / "out"
    assert run_export("gguf", str(directory), "--quant", "f16", "--out", str(out), "--threads", "1") == 1
    summary = last_json_line(capsys.readouterr().out)
    assert summary["passed"] is False and summary["artifacts"][0]["passed"] is False
    record = read_manifest(out)["artifacts"][0]
    assert record["parity"]["tokenizer_matches"] < record["parity"]["tokenizer_total"]
    assert any("tokenizer differs" in failure for failure in record["parity"]["failures"])
    assert (
        run_export("gguf", str(directory), "--quant", "f16", "--out", str(out), "--threads", "1", "--allow-mismatch")
        == 0
    )


def test_manifest_merges_formats_and_replaces_reruns(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    assert run_export("gguf", str(checkpoint), "--quant", "q8_0", "--out", str(out), "--threads", "1") == 0
    assert run_export("onnx", str(checkpoint), "--quant", "int4", "--out", str(out), "--threads", "1") == 0
    assert (
        run_export(
            "gguf", str(checkpoint), "--quant", "q8_0,q8_0", "--out", str(out), "--threads", "1", "--name", "renamed"
        )
        == 0
    )
    stdout = capsys.readouterr().out
    summary = last_json_line(stdout)
    assert summary["format"] == "gguf" and summary["passed"] is True
    assert [a["path"] for a in summary["artifacts"]] == ["renamed-q8_0.gguf"]
    assert "renamed-q8_0.gguf" in stdout.splitlines()[-2]  # the human table precedes the JSON line
    paths = sorted(a["path"] for a in read_manifest(out)["artifacts"])
    assert paths == ["renamed-q8_0.gguf", "tiny-llama-onnx-int4/model.onnx", "tiny-llama-q8_0.gguf"]
    assert run_export("gguf", str(checkpoint), "--quant", "q8_0", "--out", str(out), "--threads", "1") == 0
    assert len(read_manifest(out)["artifacts"]) == 3


def test_gguf_file_as_input(tmp_path, checkpoint):
    """A GGUF (as the default teacher is) is dequantized by transformers and exported like a checkpoint."""
    first = tmp_path / "first"
    assert run_export("gguf", str(checkpoint), "--quant", "f32", "--out", str(first), "--threads", "1") == 0
    source = first / "tiny-llama-f32.gguf"
    out = tmp_path / "again"
    assert run_export("onnx", str(source), "--quant", "fp32", "--out", str(out), "--threads", "1") == 0
    record = read_manifest(out)["artifacts"][0]
    assert record["path"] == "tiny-llama-f32-onnx-fp32/model.onnx" and record["passed"]
    assert record["source"]["kind"] == "gguf"
