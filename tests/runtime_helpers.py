"""Helpers for the runtime tests: one tiny student exported once per test process to ONNX fp32 and GGUF f32,
its PyTorch reference, the runtime CLI as a function and as a subprocess."""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export_helpers import run_export, save_checkpoint

from edgedistill.errors import EdgeDistillError

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TinyExports:
    """The tiny student's checkpoint and its two artifacts."""

    checkpoint: Path
    onnx_dir: Path
    gguf: Path


@functools.lru_cache(maxsize=1)
def tiny_exports() -> TinyExports:
    """Export the attention-dependent tiny Llama of ``export_helpers`` once per process (a few seconds).

    Module-scoped fixtures in several test files share it; the directory is removed when the process exits.
    """
    root = Path(tempfile.mkdtemp(prefix="edgedistill-runtime-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    checkpoint = save_checkpoint(root / "ckpt" / "tiny-student")
    out = root / "out"
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        for fmt, quant in (("onnx", "fp32"), ("gguf", "f32")):
            code = run_export(fmt, str(checkpoint), "--quant", quant, "--out", str(out), "--threads", "1")
            assert code == 0, f"export {fmt} {quant} failed"
    return TinyExports(checkpoint, out / "tiny-student-onnx-fp32", out / "tiny-student-f32.gguf")


def torch_greedy(checkpoint: Path, prompt_ids: list[int], max_tokens: int, eos_ids: frozenset[int]) -> list[int]:
    """PyTorch's greedy continuation, one full forward per step (no cache), stopping after an end token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = int(torch.argmax(logits))
            out.append(token)
            if token in eos_ids:
                break
            ids.append(token)
    return out


def torch_logits(checkpoint: Path, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def cli(command: str, *argv: str) -> int:
    """``edgedistill COMMAND ARGV`` through the functions the top-level CLI registers, as its ``main`` does."""
    from edgedistill.runtime import cli as runtime_cli

    parser = argparse.ArgumentParser(prog=f"edgedistill {command}")
    getattr(runtime_cli, f"add_{command}_args")(parser)
    args = parser.parse_args(list(argv))
    try:
        return getattr(runtime_cli, f"run_{command}")(args)
    except EdgeDistillError as err:
        print(f"edgedistill: error: {err}", file=sys.stderr)
        return 2


# What a subprocess runs: the same as cli(), in a fresh interpreter, so that a crash (a signal) shows as such.
_SUBPROCESS_MAIN = """
import sys
sys.path.insert(0, {tests!r})
from runtime_helpers import cli
sys.exit(cli(*sys.argv[1:]))
"""


def cli_subprocess(
    command: str, *argv: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run the runtime CLI in a child Python; returns the completed process (text stdout and stderr)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-c", _SUBPROCESS_MAIN.format(tests=str(TESTS)), command, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
    )


def cli_popen(command: str, *argv: str) -> subprocess.Popen:
    """Start the runtime CLI in a child Python (for ``serve``); stdout and stderr are pipes."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-c", _SUBPROCESS_MAIN.format(tests=str(TESTS)), command, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


@contextmanager
def serve_process(*argv: str) -> Iterator[tuple[subprocess.Popen, str, str]]:
    """``edgedistill serve ARGV`` in a child Python: ``(process, banner line, base URL)``; killed if still alive at
    the end of the block."""
    import re

    process = cli_popen("serve", *argv)
    try:
        banner = process.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", banner)
        assert match, banner + process.stderr.read()
        yield process, banner, match.group(1)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stdout.close()
        process.stderr.close()


def post_json(url: str, body: dict, timeout: float = 30) -> dict:
    """POST ``body`` as JSON to ``url``; the JSON answer."""
    import json
    import urllib.request

    post = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(post, timeout=timeout) as response:
        return json.load(response)


def request(server, method: str, path: str, body=None, headers=None, raw: bytes | None = None, timeout: float = 60):
    """One HTTP request to a :func:`running` server; returns (status, parsed JSON or text)."""
    import http.client
    import json

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        payload = response.read().decode()
        kind = response.getheader("Content-Type", "")
        return response.status, json.loads(payload) if kind.startswith("application/json") else payload
    finally:
        connection.close()


@contextmanager
def running(model, **kwargs) -> Iterator[Any]:
    """A real ModelServer on a free loopback port, serving from a thread for the block's duration."""
    from edgedistill.runtime.server import ModelServer

    server = ModelServer(model, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
