"""Bad input gives a clear error, never a crash: corrupt and truncated model files (checked in a child process, so
that an abort inside llama.cpp or onnxruntime would show as a signal), a prompt longer than the context, nonsense
sampling values and arguments, through the API (EdgeDistillError) and the CLI (exit code 2, one line)."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
from runtime_helpers import REPO, cli_subprocess, tiny_exports

from edgedistill.errors import EdgeDistillError
from edgedistill.runtime import load

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def exports():
    return tiny_exports()


def _gguf_variants(source, directory) -> dict[str, object]:
    """Damaged copies of a GGUF file, by name."""
    import gguf

    data = source.read_bytes()
    reader = gguf.GGUFReader(source)
    embedding = reader.tensors[0]
    field = reader.fields["llama.block_count"]
    block_count_at = field.offset + 8 + len("llama.block_count") + 4
    last = reader.tensors[-1]
    variants = {
        "empty": b"",
        "magic only": data[:4],
        "header cut": data[:200],
        "metadata cut": data[: embedding.data_offset // 2],
        "half the weights": data[: (embedding.data_offset + len(data)) // 2],
        "last tensor cut": data[: last.data_offset + last.n_bytes - 1],
        "wrong magic": b"GGUX" + data[4:],
        "version 99": data[:4] + struct.pack("<I", 99) + data[8:],
        "big endian": data[:4] + struct.pack(">I", 3) + data[8:],
        "huge metadata count": data[:16] + struct.pack("<Q", 2**60) + data[24:],
        "huge key length": data[:24] + struct.pack("<Q", 2**40) + data[32:],
        "zero layers": data[:block_count_at] + struct.pack("<I", 0) + data[block_count_at + 4 :],
        "random bytes": bytes(range(256)) * 64,
    }
    paths = {}
    for name, content in variants.items():
        path = directory / (name.replace(" ", "-") + ".gguf")
        path.write_bytes(content)
        paths[name] = path
    nan_weights = bytearray(data)
    nan_weights[embedding.data_offset : embedding.data_offset + embedding.n_bytes] = b"\xff" * embedding.n_bytes
    paths["nan weights"] = directory / "nan-weights.gguf"
    paths["nan weights"].write_bytes(bytes(nan_weights))
    return paths


def _onnx_variants(source_dir, directory) -> dict[str, object]:
    """Damaged copies of an ONNX export directory, by name."""
    model = (source_dir / "model.onnx").read_bytes()
    variants = {}
    for name, mutate in {
        "model cut in half": lambda d: (d / "model.onnx").write_bytes(model[: len(model) // 2]),
        "model cut near the end": lambda d: (d / "model.onnx").write_bytes(model[:-100]),
        "model is text": lambda d: (d / "model.onnx").write_text("not a model"),
        "empty model": lambda d: (d / "model.onnx").write_bytes(b""),
        "no tokenizer": lambda d: (d / "tokenizer.json").unlink(),
        "broken tokenizer": lambda d: (d / "tokenizer.json").write_text("{"),
        "no config": lambda d: (d / "config.json").unlink(),
        "config not json": lambda d: (d / "config.json").write_text("{'a': 1"),
        "no model file": lambda d: (d / "model.onnx").unlink(),
    }.items():
        target = directory / name.replace(" ", "-")
        shutil.copytree(source_dir, target)
        mutate(target)
        variants[name] = target
    return variants


# Loads each path in a child interpreter; prints {name: error message or "loaded" or "generated"} as JSON.
_LOAD_ALL = """
import json, sys
from edgedistill.errors import EdgeDistillError
from edgedistill.runtime import load
results = {}
for name, path in json.loads(sys.argv[1]).items():
    try:
        model = load(path, threads=1)
        model.generate("The quick brown fox", max_tokens=4)
        results[name] = "generated"
    except EdgeDistillError as err:
        results[name] = "error: " + str(err)
print(json.dumps(results))
"""


def _load_in_child(paths: dict[str, object]) -> dict[str, str]:
    arguments = json.dumps({name: str(path) for name, path in paths.items()})
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_LOAD_ALL), arguments],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, f"the process died ({result.returncode}): {result.stderr[-2000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_corrupt_and_truncated_gguf_files_give_errors(exports, tmp_path):
    paths = _gguf_variants(exports.gguf, tmp_path)
    results = _load_in_child(paths)
    for name, outcome in results.items():
        assert outcome.startswith("error: "), (name, outcome)
        assert "\n" not in outcome
    assert "truncated" in results["half the weights"] and "truncated" in results["last tensor cut"]
    assert "b'GGUX'" in results["wrong magic"] and "version 99" in results["version 99"]
    assert "big-endian" in results["big endian"] and "block_count" in results["zero layers"]
    assert "not finite" in results["nan weights"]


def test_corrupt_onnx_exports_give_errors(exports, tmp_path):
    results = _load_in_child(_onnx_variants(exports.onnx_dir, tmp_path))
    for name, outcome in results.items():
        assert outcome.startswith("error: "), (name, outcome)
    assert "onnxruntime cannot load" in results["model cut in half"]
    assert "tokenizer.json" in results["no tokenizer"] and "config.json" in results["no config"]
    assert "model.onnx" in results["no model file"]


def test_paths_that_are_not_models(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    for path, message in [
        (tmp_path / "missing.gguf", "no such model file"),
        (tmp_path / "notes.txt", "not a model this runtime loads"),
        (tmp_path, "model.onnx"),
    ]:
        with pytest.raises(EdgeDistillError, match=message):
            load(path)


@pytest.fixture(scope="module", params=["onnx", "gguf"])
def model(request, exports):
    loaded = load(exports.onnx_dir if request.param == "onnx" else exports.gguf, threads=1, context=32)
    yield loaded
    loaded.close()


def test_prompt_longer_than_the_context(model):
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    assert len(model.tokenize(long_prompt)) > 32
    with pytest.raises(EdgeDistillError, match="do not fit the context of 32"):
        model.generate(long_prompt)
    with pytest.raises(EdgeDistillError, match="exceed the context of 32"):
        model.logits(model.tokenize(long_prompt))
    assert model.generate("The quick", max_tokens=3) is not None  # still usable


def test_nonsense_arguments_through_the_api(model, exports):
    for options in ({"temperature": -1}, {"top_p": 0}, {"top_k": -3}, {"max_tokens": 0}, {"stop": [""]}):
        with pytest.raises(EdgeDistillError, match="sampling:"):
            model.generate("hi", **options)
    with pytest.raises(EdgeDistillError, match="unknown option"):
        model.generate("hi", temp=0.5)
    with pytest.raises(EdgeDistillError, match="prompt: must be a string"):
        model.generate(["hi"])
    with pytest.raises(EdgeDistillError, match="outside the vocabulary"):
        model.logits([model.info.vocab_size])
    with pytest.raises(EdgeDistillError, match="empty"):
        model.logits([])
    with pytest.raises(EdgeDistillError, match="messages"):
        model.chat([{"role": "user"}])
    path = exports.onnx_dir if model.info.format == "onnx" else exports.gguf
    with pytest.raises(EdgeDistillError, match="exceed the model's maximum of 512"):
        load(path, context=100_000)
    with pytest.raises(EdgeDistillError, match="context"):
        load(path, context=0)
    with pytest.raises(EdgeDistillError, match="threads"):
        load(path, threads=-2)


def test_the_cli_exits_2_with_one_line(exports, tmp_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(exports.gguf.read_bytes()[:5000])
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 20
    cases = [
        ("generate", str(truncated), "hi"),
        ("generate", str(tmp_path), "hi"),
        ("generate", str(exports.gguf), long_prompt, "--context", "32"),
        ("generate", str(exports.onnx_dir), "hi", "--temperature", "-1"),
        ("generate", str(exports.onnx_dir), "hi", "--top-p", "1.5"),
        ("generate", str(exports.gguf), "hi", "--max-tokens", "0"),
        ("serve", str(exports.gguf), "--port", "70000"),
        ("chat", str(truncated)),
    ]
    for case in cases:
        result = cli_subprocess(*case)
        assert result.returncode == 2, (case, result.returncode, result.stderr[-2000:])
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edgedistill: error: "), (case, result.stderr[-2000:])
        assert "Traceback" not in result.stderr
