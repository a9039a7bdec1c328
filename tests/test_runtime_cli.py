"""The runtime's commands: ``generate`` prints the text on stdout, ``chat`` keeps a conversation (``/reset``,
``/exit``) and streams, ``serve`` answers over HTTP and stops cleanly on Ctrl-C."""

from __future__ import annotations

import argparse
import io
import json
import signal
import urllib.request

import pytest
from runtime_helpers import cli, cli_subprocess, post_json, serve_process, tiny_exports

from edgedistill.runtime import cli as runtime_cli
from edgedistill.runtime import load

pytest.importorskip("onnxruntime")
pytest.importorskip("llama_cpp")
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def exports():
    return tiny_exports()


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_generate_prints_the_text(exports, capsys, fmt):
    path = str(exports.onnx_dir if fmt == "onnx" else exports.gguf)
    assert cli("generate", path, PROMPT, "--max-tokens", "12", "--threads", "1") == 0
    with load(path, threads=1) as model:
        assert capsys.readouterr().out == model.generate(PROMPT, max_tokens=12) + "\n"
        options = ["--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3", "--max-tokens", "12"]
        assert cli("generate", path, PROMPT, *options, "--threads", "1", "--stats") == 0
        captured = capsys.readouterr()
        expected = model.generate(PROMPT, max_tokens=12, temperature=0.8, top_k=20, top_p=0.9, seed=3)
        assert captured.out == expected + "\n"
        assert "tokens/s" in captured.err
        assert cli("generate", path, "Say hi", "--chat", "--max-tokens", "6", "--threads", "1") == 0
        assert capsys.readouterr().out == model.chat([{"role": "user", "content": "Say hi"}], max_tokens=6) + "\n"


def test_generate_in_a_child_process(exports):
    result = cli_subprocess("generate", str(exports.gguf), PROMPT, "--max-tokens", "8", "--threads", "1")
    assert result.returncode == 0, result.stderr
    with load(exports.gguf, threads=1) as model:
        assert result.stdout == model.generate(PROMPT, max_tokens=8) + "\n"


def _chat_args(path: str, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    runtime_cli.add_chat_args(parser)
    return parser.parse_args([path, "--max-tokens", "10", "--threads", "1", *extra])


@pytest.mark.parametrize("fmt", ["onnx", "gguf"])
def test_chat_keeps_history_and_resets(exports, fmt):
    path = str(exports.onnx_dir if fmt == "onnx" else exports.gguf)
    out = io.StringIO()
    stdin = io.StringIO("Hello\nHello\n/reset\nHello\n/help\n\n/exit\nnever read\n")
    assert runtime_cli.run_chat(_chat_args(path), stdin=stdin, out=out) == 0
    lines = out.getvalue().split("\n")
    assert "(conversation cleared)" in lines and any("/reset" in line for line in lines)
    first, second = lines[0], lines[1]
    third = lines[lines.index("(conversation cleared)") + 1]
    with load(path, threads=1) as model:
        hello = {"role": "user", "content": "Hello"}
        assert first == model.chat([hello], max_tokens=10)
        assert second == model.chat([hello, {"role": "assistant", "content": first}, hello], max_tokens=10)
        assert third == first


def test_chat_with_a_system_message_and_end_of_input(exports):
    out = io.StringIO()
    args = _chat_args(str(exports.onnx_dir), "--system", "Be brief.")
    assert runtime_cli.run_chat(args, stdin=io.StringIO("Hi"), out=out) == 0  # no newline, then end of input
    with load(exports.onnx_dir, threads=1) as model:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
        assert out.getvalue() == model.chat(messages, max_tokens=10) + "\n"


def test_chat_survives_a_turn_that_overflows_the_context(exports):
    out = io.StringIO()
    args = _chat_args(str(exports.gguf), "--context", "24")
    long_line = "The quick brown fox jumps over the lazy dog " * 4
    assert runtime_cli.run_chat(args, stdin=io.StringIO(f"{long_line}\nHi\n"), out=out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("error: prompt:") and "/reset" in lines[0]
    assert len(lines) == 2  # the next turn still gets its reply


def test_chat_in_a_child_process(exports):
    result = cli_subprocess("chat", str(exports.onnx_dir), "--max-tokens", "5", stdin="Hi\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_serve_answers_and_stops_on_ctrl_c(exports, stop):
    with serve_process(str(exports.gguf), "--port", "0", "--threads", "1", "--model-id", "tiny") as (process, _, url):
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as response:
            assert json.load(response)["data"][0]["id"] == "tiny"
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
        text = post_json(f"{url}/v1/completions", body)["choices"][0]["text"]
        with load(exports.gguf, threads=1) as model:
            assert text == model.generate(PROMPT, max_tokens=6)
        process.send_signal(stop)
        assert process.wait(timeout=30) == 0
