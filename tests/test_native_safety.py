"""Native code cannot take a command down: llama.cpp's buffer choice on AMX CPUs, crashes in a child process become
one-line errors, and q8_0 / k-quant files decode through llama.cpp on whatever CPU runs the tests."""

from __future__ import annotations

import ctypes
import math
import os

import numpy as np
import pytest
from export_helpers import read_manifest, run_export, save_checkpoint

from edgedistill import llamacpp
from edgedistill.errors import EdgeDistillError
from edgedistill.isolate import describe_exit, run_isolated


def test_isolated_call_returns_its_result():
    assert run_isolated(math.factorial, 10, what="factorial") == 3628800


def test_isolated_exception_is_raised_in_the_caller():
    with pytest.raises(ValueError, match="invalid literal"):
        run_isolated(int, "not a number", what="int")


def test_segfault_in_the_child_becomes_one_line_naming_the_work():
    with pytest.raises(EdgeDistillError) as caught:
        run_isolated(ctypes.string_at, 0, what="parity check of model-q8_0.gguf")  # reads address 0: SIGSEGV
    message = str(caught.value)
    assert message.startswith("parity check of model-q8_0.gguf: the native library crashed (killed by SIGSEGV)")
    assert "\n" not in message


def test_abort_in_the_child_is_reported_with_its_signal():
    with pytest.raises(EdgeDistillError, match="killed by SIGABRT"):
        run_isolated(os.abort, what="bench worker")


def test_describe_exit():
    assert describe_exit(-11) == "killed by SIGSEGV"
    assert describe_exit(139) == "exit 139 (SIGSEGV)"
    assert describe_exit(3) == "exit 3"


# ------------------------------------------------------------------------------------------ buffer-type policy

llama_cpp = pytest.importorskip("llama_cpp")


@pytest.mark.parametrize(
    ("flags", "setting", "expected"),
    [
        ({"avx512f", "avx512_vnni"}, None, True),  # AMD EPYC Zen 4: the default (repacked) buffers
        ({"avx512f", "amx_int8", "amx_tile", "amx_bf16"}, None, False),  # Sapphire Rapids: plain CPU buffers
        ({"avx512f", "amx_int8", "amx_tile"}, "on", True),
        ({"avx512f"}, "off", False),
    ],
)
def test_extra_buffers_are_off_exactly_on_amx_cpus(monkeypatch, flags, setting, expected):
    monkeypatch.setattr(llamacpp, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(llamacpp, "build_has_amx", lambda lib: False)
    if setting is None:
        monkeypatch.delenv(llamacpp.EXTRA_BUFFERS_ENV, raising=False)
    else:
        monkeypatch.setenv(llamacpp.EXTRA_BUFFERS_ENV, setting)
    assert llamacpp.extra_buffers_enabled(llama_cpp) is expected


def test_a_build_with_amx_kernels_turns_extra_buffers_off(monkeypatch):
    monkeypatch.setattr(llamacpp, "cpu_flags", lambda: frozenset())
    monkeypatch.setattr(llamacpp, "build_has_amx", lambda lib: True)
    monkeypatch.delenv(llamacpp.EXTRA_BUFFERS_ENV, raising=False)
    assert llamacpp.extra_buffers_enabled(llama_cpp) is False


def test_a_bad_setting_is_one_line(monkeypatch):
    monkeypatch.setenv(llamacpp.EXTRA_BUFFERS_ENV, "maybe")
    with pytest.raises(EdgeDistillError, match="EDGEDISTILL_LLAMA_EXTRA_BUFFERS='maybe': expected auto, on or off"):
        llamacpp.extra_buffers_enabled(llama_cpp)


def test_cpu_flags_read_this_machine():
    if not os.path.exists("/proc/cpuinfo"):
        pytest.skip("no /proc/cpuinfo")
    assert llamacpp.cpu_flags()  # x86 "flags" or arm "Features": never empty on Linux


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """q8_0 and q4_k_m exports of a tiny Llama: the two kinds of file that segfaulted on AMX CPUs."""
    checkpoint = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
    out = tmp_path_factory.mktemp("gguf")
    assert run_export("gguf", str(checkpoint), "--quant", "q8_0,q4_k_m", "--out", str(out), "--threads", "1") == 0
    return out, read_manifest(out)


@pytest.mark.parametrize("setting", ["auto", "on", "off"])
def test_q8_0_and_k_quant_decode_with_each_buffer_setting(monkeypatch, quantized, setting):
    """Both settings give the same logits where both run: the choice costs speed, not correctness. On an AMX CPU
    "on" is skipped: that is the crashing configuration the policy avoids."""
    out, manifest = quantized
    if setting == "on" and (llamacpp.build_has_amx(llama_cpp) or llamacpp.AMX_FLAGS & llamacpp.cpu_flags()):
        pytest.skip("extra buffers crash on this AMX CPU (ggml-org/llama.cpp#20824)")
    assert {a["quantization"] for a in manifest["artifacts"]} == {"q8_0", "q4_k_m"}
    monkeypatch.setenv(llamacpp.EXTRA_BUFFERS_ENV, setting)
    for record in manifest["artifacts"]:
        assert record["passed"], record["parity"]
        with llamacpp.LlamaCpp(out / record["path"], n_ctx=64, n_batch=64, threads=1, f32_cache=True) as llm:
            ids = llm.tokenize("hello world, hello world", add_special=True)
            logits = llm.evaluate(ids, all_logits=True)
            assert logits.shape == (len(ids), llm.n_vocab) and np.isfinite(logits).all()
            # the last row from a full evaluation equals the row from an incremental one through the cache
            llm.evaluate(ids[:-1])
            np.testing.assert_allclose(llm.evaluate(ids[-1:], start=len(ids) - 1), logits[-1], atol=1e-4)


def test_evaluate_beyond_the_context_is_one_line(quantized):
    out, manifest = quantized
    with llamacpp.LlamaCpp(out / manifest["artifacts"][0]["path"], n_ctx=8, n_batch=8) as llm:
        with pytest.raises(EdgeDistillError, match="exceed the context of 8"):
            llm.evaluate(list(range(9)))
