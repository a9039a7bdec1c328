"""Every damaged input is one clean error: each case runs the real CLI (``python -m edgedistill generate|chat``) in a
child process on a damaged copy of the tiny exports, and must exit with code 2 and exactly one stderr line
``edgedistill: error: ...`` that names the file and the field, with no traceback and no signal (an abort inside
llama.cpp shows as -6, a segfault as -11).

The GGUF variants are rewritten with gguf-py (GGUFReader, GGUFWriter) where the damage is expressible as metadata or
tensors, and patched at offsets the reader reports where it is not (a duplicated key, a bad count). The children
run concurrently, once per module; each test checks one result.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from runtime_helpers import REPO, tiny_exports

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

T = gguf.GGUFValueType
NAN = float("nan")
ARCH = "llama"
GENERATE = ("generate", "--threads", "1", "--max-tokens", "2")
CHAT = ("chat", "--threads", "1", "--max-tokens", "2")
CHILD_TIMEOUT_S = 60


@dataclass(frozen=True)
class Case:
    """One damaged input: the CLI arguments (the model path first after the command), stdin, and the texts the one
    error line must contain."""

    argv: tuple[Any, ...]
    expect: tuple[str, ...]
    stdin: bytes | None = None


# ----------------------------------------------------------------------------------------------- GGUF crafting


def rewrite_gguf(
    source: Path,
    target: Path,
    values: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    keep_tensor: Callable[[str], bool] = lambda name: True,
) -> Path:
    """A copy of ``source`` with metadata replaced, added (``(value, type)`` or ``(items, ARRAY, item type)``) or
    dropped, and tensors left out, written by gguf-py."""
    reader = gguf.GGUFReader(source)
    fields: dict[str, tuple[Any, Any, Any]] = {}
    for key, item in reader.fields.items():
        if key.startswith("GGUF."):  # the reader's view of the header, not metadata
            continue
        sub_type = item.types[-1] if item.types[0] == T.ARRAY else None
        fields[key] = (item.contents(), item.types[0], sub_type)
    for key, value in (values or {}).items():
        if isinstance(value, tuple):
            fields[key] = (value[0], value[1], value[2] if len(value) > 2 else None)
        else:  # a new value of the key's existing type
            fields[key] = (value, fields[key][1], fields[key][2])
    for key in drop:
        fields.pop(key, None)
    arch = str(fields.get("general.architecture", (ARCH,))[0])
    writer = gguf.GGUFWriter(target, arch)
    for key, (value, value_type, sub_type) in fields.items():
        if key != "general.architecture":  # the writer starts with it
            writer.add_key_value(key, value, value_type, sub_type=sub_type)
    if "general.architecture" in drop:
        del writer.kv_data[0]["general.architecture"]
    for tensor in reader.tensors:
        if keep_tensor(tensor.name):
            writer.add_tensor(tensor.name, tensor.data.copy(), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def patch(data: bytes, offset: int, fmt: str, value: Any) -> bytes:
    """``data`` with the little-endian ``fmt`` value at ``offset`` replaced."""
    packed = struct.pack("<" + fmt, value)
    return data[:offset] + packed + data[offset + len(packed) :]


def metadata_value_offset(reader: Any, key: str) -> int:
    """Where the value type of metadata ``key`` sits (after its length-prefixed key)."""
    return reader.fields[key].offset + 8 + len(key.encode())


def tensor_info_offset(reader: Any, index: int) -> tuple[int, str]:
    """Where tensor ``index``'s n_dims sits, and its name."""
    tensor = reader.tensors[index]
    return tensor.field.offset + 8 + len(tensor.name.encode()), tensor.name


def replaced_tokens(source: Path, change: Callable[[list[str]], list[str]]) -> tuple:
    tokens = gguf.GGUFReader(source).fields["tokenizer.ggml.tokens"].contents()
    return (change(list(tokens)), T.ARRAY, T.STRING)


def distinct_tokens(count: int) -> list[str]:
    return [f"tok{index}" for index in range(count)]


# ------------------------------------------------------------------------------------------------------ cases


def gguf_cases(source: Path, out: Path) -> dict[str, Case]:
    """Damaged GGUF files, by name."""
    data = source.read_bytes()
    reader = gguf.GGUFReader(source)
    first, last = reader.tensors[0], reader.tensors[-1]
    cases: dict[str, Case] = {}

    def damaged(name: str, content: bytes) -> Path:
        path = out / f"{name}.gguf"
        path.write_bytes(content)
        return path

    def metadata(name: str, expect: tuple[str, ...], command=GENERATE, **options: Any) -> None:
        path = rewrite_gguf(source, out / f"{name}.gguf", **options)
        cases[name] = Case((command[0], path, *(["hi"] if command is GENERATE else []), *command[1:]), expect)

    def raw(name: str, content: bytes, expect: tuple[str, ...]) -> None:
        cases[name] = Case(("generate", damaged(name, content), "hi", *GENERATE[1:]), expect)

    # The issue's cases: llama.cpp aborted (SIGABRT) or raised.
    metadata("block-count-1000", (f"{ARCH}.block_count", "1000"), values={f"{ARCH}.block_count": 1000})
    metadata("rms-eps-nan", ("layer_norm_rms_epsilon", "nan"), values={f"{ARCH}.attention.layer_norm_rms_epsilon": NAN})
    metadata("rms-eps-negative", ("layer_norm_rms_epsilon",), values={f"{ARCH}.attention.layer_norm_rms_epsilon": -1.0})
    metadata("context-2-31", (f"{ARCH}.context_length",), values={f"{ARCH}.context_length": 2**31})
    metadata("context-zero", (f"{ARCH}.context_length",), values={f"{ARCH}.context_length": 0})
    # Hyperparameters against each other and against the tensors.
    metadata(
        "one-layer-missing", (f"{ARCH}.block_count", "layers 0..0"), keep_tensor=lambda n: not n.startswith("blk.1.")
    )
    metadata("embedding-vs-token-embd", ("token_embd.weight", "[128, 320]"), values={f"{ARCH}.embedding_length": 128})
    metadata("head-count-zero", (f"{ARCH}.attention.head_count",), values={f"{ARCH}.attention.head_count": 0})
    metadata("kv-heads-not-dividing", ("head_count_kv", "3"), values={f"{ARCH}.attention.head_count_kv": 3})
    metadata("feed-forward-zero", (f"{ARCH}.feed_forward_length",), values={f"{ARCH}.feed_forward_length": 0})
    metadata(
        "head-count-array-short",
        (f"{ARCH}.attention.head_count", "one per layer"),
        values={f"{ARCH}.attention.head_count": ([4], T.ARRAY, T.UINT32)},
    )
    metadata("vocab-size-mismatch", (f"{ARCH}.vocab_size", "320 tokens"), values={f"{ARCH}.vocab_size": 300})
    metadata("rope-base-nan", (f"{ARCH}.rope.freq_base",), values={f"{ARCH}.rope.freq_base": NAN})
    metadata(
        "rope-scaling-unknown",
        (f"{ARCH}.rope.scaling.type", "linear"),
        values={f"{ARCH}.rope.scaling.type": ("zigzag", T.STRING)},
    )
    metadata(
        "experts-without-used",
        (f"{ARCH}.expert_used_count",),
        values={f"{ARCH}.expert_count": (1000, T.UINT32)},
    )
    metadata("block-count-string", (f"{ARCH}.block_count", "'2'"), values={f"{ARCH}.block_count": ("2", T.STRING)})
    metadata("no-architecture", ("general.architecture",), drop=("general.architecture",))
    # The vocabulary.
    metadata("no-tokens", ("tokenizer.ggml.tokens", "missing"), drop=("tokenizer.ggml.tokens",))
    metadata(
        "tokens-shorter-than-embedding",
        ("token_embd.weight", "300 tokens"),
        values={
            "tokenizer.ggml.tokens": (distinct_tokens(300), T.ARRAY, T.STRING),
            "tokenizer.ggml.token_type": ([1] * 300, T.ARRAY, T.INT32),
        },
        drop=(f"{ARCH}.vocab_size",),
    )
    metadata(
        "duplicate-token",
        ("tokenizer.ggml.tokens", "repeats token"),
        values={"tokenizer.ggml.tokens": replaced_tokens(source, lambda t: t[:100] + [t[99]] + t[101:])},
    )
    metadata(
        "token-type-short",
        ("tokenizer.ggml.token_type", "10 entries"),
        values={"tokenizer.ggml.token_type": ([1] * 10, T.ARRAY, T.INT32)},
    )
    metadata("eos-out-of-vocab", ("tokenizer.ggml.eos_token_id", "5000"), values={"tokenizer.ggml.eos_token_id": 5000})
    metadata(
        "sentencepiece-without-bytes", ("tokenizer.ggml.tokens", "<0x00>"), values={"tokenizer.ggml.model": "llama"}
    )
    metadata(
        "damaged-for-chat", ("layer_norm_rms_epsilon",), CHAT, values={f"{ARCH}.attention.layer_norm_rms_epsilon": NAN}
    )

    # The file's structure, patched where gguf-py would not write the damage.
    raw("empty-file", b"", ("only 0 bytes",))
    raw("header-only", data[:24], ("exceed the file",))
    raw("half-the-tensors", data[: (first.data_offset + len(data)) // 2], ("truncated", "ends at byte"))
    raw("last-byte-missing", data[: last.data_offset + last.n_bytes - 1], ("truncated", last.name))
    raw("wrong-magic", b"GGUX" + data[4:], ("b'GGUX'",))
    raw("version-99", patch(data, 4, "I", 99), ("version 99",))
    merges_at = metadata_value_offset(reader, "tokenizer.ggml.merges")
    raw("array-length-2-40", patch(data, merges_at + 8, "Q", 2**40), ("tokenizer.ggml.merges",))
    name_at = metadata_value_offset(reader, "general.name")
    raw("string-length-huge", patch(data, name_at + 4, "Q", 2**62), ("general.name",))
    type_key = reader.fields["general.type"].offset + 8
    raw("duplicate-key", data[:type_key] + b"general.name" + data[type_key + 12 :], ("general.name", "twice"))
    dims_at, name = tensor_info_offset(reader, 1)
    n_dims = len(reader.tensors[1].shape)
    raw("unknown-tensor-type", patch(data, dims_at + 4 + 8 * n_dims, "I", 77), (name, "ggml type 77"))
    raw("nine-dimensions", patch(data, dims_at, "I", 9), (name, "9 dimensions"))
    raw("element-count-overflow", patch(patch(data, dims_at + 4, "Q", 2**62), dims_at + 12, "Q", 2**62), (name,))
    offset_at = dims_at + 4 + 8 * n_dims + 4
    raw(
        "tensor-offset-moved",
        patch(data, offset_at, "Q", reader.tensors[1].data_offset - first.data_offset + 32),
        (name, "offset"),
    )

    # Chat templates (GGUF tokenizer.chat_template), through generate --chat.
    for case, template, expect in (
        ("template-syntax", "{% for message in messages %}\n{{ message['content'] }\n", ("line 2",)),
        ("template-range-1e9", "{% for i in range(10**9) %}x{% endfor %}", ("Range too big",)),
        (
            "template-silent-loop",
            "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}",
            ("2 s",),
        ),
        ("template-output-huge", "{% for a in range(99999) %}{{ 'x' * 99999 }}{% endfor %}", ("1000000",)),
        ("template-raise", "{{ raise_exception('roles must alternate') }}", ("roles must alternate",)),
        ("template-undefined", "{{ nothing.here }}", ("UndefinedError",)),
        ("template-type-error", "{{ messages + 1 }}", ("TypeError",)),
    ):
        path = rewrite_gguf(source, out / f"{case}.gguf", values={"tokenizer.chat_template": template})
        cases[case] = Case(("generate", path, "hi", "--chat", *GENERATE[1:]), ("tokenizer.chat_template", *expect))

    # Text that is not UTF-8: argv bytes (Python hands them over as lone surrogates) and stdin bytes.
    cases["gguf-prompt-argv-not-utf8"] = Case(
        ("generate", source, b"caf\xe9 \xff", *GENERATE[1:]), ("prompt:", "UTF-8")
    )
    cases["gguf-prompt-stdin-not-utf8"] = Case(
        ("generate", source, "-", *GENERATE[1:]), ("prompt (standard input)", "0xff"), stdin=b"ok \xff\xfe"
    )
    cases["gguf-chat-stdin-not-utf8"] = Case(
        ("chat", source, *CHAT[1:]), ("standard input: line 2",), stdin=b"hi\n\xc3(\n"
    )
    cases["gguf-chat-system-not-utf8"] = Case(("chat", source, "--system", b"\xff", *CHAT[1:]), ("--system", "UTF-8"))
    return cases


def onnx_cases(source: Path, out: Path) -> dict[str, Case]:
    """Damaged ONNX export directories, by name."""
    model = (source / "model.onnx").read_bytes()
    cases: dict[str, Case] = {}

    def export(name: str, expect: tuple[str, ...], mutate: Callable[[Path], Any], *extra: Any, chat=False) -> None:
        target = out / name
        shutil.copytree(source, target)
        mutate(target)
        argv = ("generate", target, *extra) if extra else ("generate", target, "hi")
        cases[name] = Case((*argv, *(["--chat"] if chat else []), *GENERATE[1:]), expect)

    def json_edit(file: str, **changes: Any) -> Callable[[Path], None]:
        def mutate(directory: Path) -> None:
            data = json.loads((directory / file).read_text())
            data.update(changes)
            (directory / file).write_text(json.dumps(data))

        return mutate

    def write(file: str, content: bytes) -> Callable[[Path], None]:
        return lambda directory: (directory / file).write_bytes(content)

    for case, value in (("string", "x"), ("float", 1.5), ("bool-list", [True]), ("nested-list", [[2]])):
        export(
            f"eos-{case}",
            ("generation_config.json", "eos_token_id"),
            json_edit("generation_config.json", eos_token_id=value),
        )
    export(
        "eos-out-of-vocab-onnx",
        ("generation_config.json", "99999"),
        json_edit("generation_config.json", eos_token_id=99999),
    )
    export(
        "context-1e12",
        ("config.json", "max_position_embeddings"),
        json_edit("config.json", max_position_embeddings=10**12),
    )
    export(
        "context-negative",
        ("config.json", "max_position_embeddings"),
        json_edit("config.json", max_position_embeddings=-1),
    )
    export("layers-zero", ("config.json", "num_hidden_layers"), json_edit("config.json", num_hidden_layers=0))
    export("hidden-size-string", ("config.json", "hidden_size"), json_edit("config.json", hidden_size="64"))
    export("config-not-json", ("config.json", "not valid JSON"), write("config.json", b"{'a': 1"))
    export("config-a-list", ("config.json", "JSON object"), write("config.json", b"[1, 2]"))
    export("config-deeply-nested", ("config.json", "not valid JSON"), write("config.json", b"[" * 100_000))
    export(
        "generation-config-a-number", ("generation_config.json", "JSON object"), write("generation_config.json", b"3")
    )
    export(
        "tokenizer-config-not-utf8",
        ("tokenizer_config.json", "UTF-8"),
        write("tokenizer_config.json", b'{"a": "\xff"}'),
    )
    export("model-zero-bytes", ("model.onnx",), write("model.onnx", b""))
    export("model-random-bytes", ("model.onnx",), write("model.onnx", random.Random(0).randbytes(4096)))
    export("model-truncated", ("model.onnx",), write("model.onnx", model[: len(model) * 2 // 3]))
    export("no-tokenizer", ("tokenizer.json",), lambda d: (d / "tokenizer.json").unlink())
    export("tokenizer-not-json", ("tokenizer.json",), write("tokenizer.json", b"{"))
    export(
        "template-file-syntax", ("chat_template.jinja", "line 1"), write("chat_template.jinja", b"{% if %}"), chat=True
    )
    export(
        "template-file-not-utf8",
        ("chat_template.jinja", "UTF-8"),
        write("chat_template.jinja", b"\xff{{ x }}"),
        chat=True,
    )

    def template_not_a_string(directory: Path) -> None:
        (directory / "chat_template.jinja").unlink()
        json_edit("tokenizer_config.json", chat_template=5)(directory)

    export("template-config-not-a-string", ("tokenizer_config.json", "chat_template"), template_not_a_string, chat=True)
    export(
        "onnx-prompt-argv-not-utf8", ("prompt:", "UTF-8"), lambda d: None, "\udcff".encode("utf-8", "surrogateescape")
    )
    cases["onnx-prompt-stdin-not-utf8"] = Case(
        ("generate", source, "-", *GENERATE[1:]), ("prompt (standard input)",), stdin=b"\x80abc"
    )
    return cases


# ------------------------------------------------------------------------------------------------------ running


def run_cli(case: Case) -> subprocess.CompletedProcess:
    argv = [os.fsencode(a) if isinstance(a, Path) else a for a in case.argv]
    return subprocess.run(
        [sys.executable, "-m", "edgedistill", *argv],
        input=case.stdin if case.stdin is not None else b"",
        capture_output=True,
        timeout=CHILD_TIMEOUT_S,
        cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


# The cases by name, for collection (the builders need the exports); test_every_case_is_listed keeps the two equal.
CASE_NAMES = [
    # GGUF metadata
    "block-count-1000", "rms-eps-nan", "rms-eps-negative", "context-2-31", "context-zero", "one-layer-missing",
    "embedding-vs-token-embd", "head-count-zero", "kv-heads-not-dividing", "feed-forward-zero",
    "head-count-array-short", "vocab-size-mismatch", "rope-base-nan", "rope-scaling-unknown", "experts-without-used",
    "block-count-string", "no-architecture", "no-tokens", "tokens-shorter-than-embedding", "duplicate-token",
    "token-type-short", "eos-out-of-vocab", "sentencepiece-without-bytes", "damaged-for-chat",
    # GGUF structure
    "empty-file", "header-only", "half-the-tensors", "last-byte-missing", "wrong-magic", "version-99",
    "array-length-2-40", "string-length-huge", "duplicate-key", "unknown-tensor-type", "nine-dimensions",
    "element-count-overflow", "tensor-offset-moved",
    # GGUF chat templates
    "template-syntax", "template-range-1e9", "template-silent-loop", "template-output-huge", "template-raise",
    "template-undefined", "template-type-error",
    # text that is not UTF-8
    "gguf-prompt-argv-not-utf8", "gguf-prompt-stdin-not-utf8", "gguf-chat-stdin-not-utf8",
    "gguf-chat-system-not-utf8", "onnx-prompt-argv-not-utf8", "onnx-prompt-stdin-not-utf8",
    # ONNX exports
    "eos-string", "eos-float", "eos-bool-list", "eos-nested-list", "eos-out-of-vocab-onnx", "context-1e12",
    "context-negative", "layers-zero", "hidden-size-string", "config-not-json", "config-a-list",
    "config-deeply-nested", "generation-config-a-number", "tokenizer-config-not-utf8", "model-zero-bytes",
    "model-random-bytes", "model-truncated", "no-tokenizer", "tokenizer-not-json", "template-file-syntax",
    "template-file-not-utf8", "template-config-not-a-string",
]  # fmt: skip


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, tuple[Case, subprocess.CompletedProcess]]:
    exports = tiny_exports()
    out = tmp_path_factory.mktemp("damaged")
    cases = gguf_cases(exports.gguf, out)
    cases.update(onnx_cases(exports.onnx_dir, out))
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        results = dict(zip(cases, pool.map(run_cli, cases.values())))
    return {name: (cases[name], results[name]) for name in cases}


def test_every_case_is_listed(outcomes):
    assert sorted(outcomes) == sorted(CASE_NAMES)
    assert len(CASE_NAMES) >= 30


@pytest.mark.parametrize("name", CASE_NAMES)
def test_damaged_input_gives_one_clean_error(outcomes, name):
    case, result = outcomes[name]
    stderr = result.stderr.decode("utf-8", errors="replace")
    assert result.returncode == 2, f"{name}: exit {result.returncode}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgedistill: error: "), stderr[-3000:]
    model = Path(os.fsdecode(case.argv[1])) if isinstance(case.argv[1], Path) else None
    expected = list(case.expect)
    if model is not None and not any(text.startswith(("prompt", "standard input", "--system")) for text in expected):
        expected.append(model.name)  # the message names the file
    for text in expected:
        assert text in lines[0], f"{name}: {text!r} not in {lines[0]!r}"


# ------------------------------------------------------------------------------------------- through the API


@pytest.fixture(scope="module", params=["onnx", "gguf"])
def model(request):
    from edgedistill.runtime import load

    exports = tiny_exports()
    loaded = load(exports.onnx_dir if request.param == "onnx" else exports.gguf, threads=1, context=64)
    yield loaded
    loaded.close()


@pytest.mark.parametrize("text", ["\ud800", "ok \udcff", "caf\udce9"])
def test_text_that_is_not_utf8_through_the_api(model, text):
    from edgedistill.errors import EdgeDistillError

    with pytest.raises(EdgeDistillError, match=r"^prompt: not valid UTF-8"):
        model.generate(text, max_tokens=2)
    with pytest.raises(EdgeDistillError, match=r"^messages\[0\]\.content: not valid UTF-8"):
        model.chat([{"role": "user", "content": text}], max_tokens=2)
    with pytest.raises(EdgeDistillError, match=r"^tokenize: text: not valid UTF-8"):
        model.tokenize(text)
    with pytest.raises(EdgeDistillError, match=r"^sampling: stop\[0\]: not valid UTF-8"):
        model.generate("hi", stop=[text])
    assert model.generate("hi", max_tokens=2) is not None  # still usable


def test_a_cache_beyond_the_memory_is_refused_before_allocation():
    from edgedistill.errors import EdgeDistillError
    from edgedistill.runtime.model import MAX_CONTEXT, check_cache_memory, resolve_context

    with pytest.raises(EdgeDistillError, match=r"^context: a cache of 16777216 tokens for m.gguf needs"):
        check_cache_memory(MAX_CONTEXT, 2**40, "m.gguf")
    with pytest.raises(EdgeDistillError, match="runtime's maximum"):
        resolve_context(MAX_CONTEXT + 1, None)
