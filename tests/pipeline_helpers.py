"""The smallest pipeline that runs every stage: shape files for tiny students and the settings of such a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def student_shape(path: Path, hidden: int, layers: int) -> str:
    """A student shape file (2 heads of 16, 1 KV head, FFN twice the width): prunable from the tiny teacher
    (width 64, 4 heads of 16, 2 KV heads), which keeps its head size whatever the width; returns its path."""
    path.write_text(
        json.dumps(
            dict(
                hidden_size=hidden,
                num_hidden_layers=layers,
                num_attention_heads=2,
                num_key_value_heads=1,
                intermediate_size=2 * hidden,
                head_dim=16,
            )
        )
    )
    return str(path)


def tiny_pipeline_settings(tmp_path: Path, tiny_teacher: Path, text_data: Path, **overrides: Any) -> dict[str, Any]:
    """Settings of a pipeline run in seconds: two tiny students, 4 steps, one quantization per format."""
    values: dict[str, Any] = dict(
        out=str(tmp_path / "run"),
        teacher=str(tiny_teacher),
        data=[str(text_data)],
        students=[student_shape(tmp_path / "s32.json", 32, 2), student_shape(tmp_path / "s16.json", 16, 1)],
        steps=4,
        batch_size=2,
        seq_len=32,
        train_tokens=0,
        heldout_tokens=0,
        top_k=8,
        gguf_quants=["q8_0"],
        onnx_quants=["int8"],
        bench_threads=[1],
        bench_prompt_tokens=8,
        bench_gen_tokens=4,
        bench_repeat=1,
        bench_warmup=0,
        quality_tokens=64,
        sample_prompts=["def add(a, b):"],
        sample_tokens=4,
        threads=1,
    )
    values.update(overrides)
    return values
