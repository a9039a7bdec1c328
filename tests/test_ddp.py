"""Scale-out: a two-process torchrun on CPU (gloo) finishes and its checkpoint loads."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, tiny_teacher, text_data, tiny_shape):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "edgedistill",
        "distill",
        "--teacher",
        str(tiny_teacher),
        "--student",
        str(tiny_shape),
        "--data",
        str(text_data),
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--save-every",
        "2",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["train"]["world_size"] == 2 and summary["train"]["device"] == "cpu"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # rank 0 alone writes
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32
