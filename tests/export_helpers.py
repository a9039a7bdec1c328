"""Helpers for the export tests: tiny checkpoints whose outputs depend on attention, and the CLI as a function."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from conftest import make_llama, make_tokenizer

# The tiny models' residual stream is dominated by their (x20) embeddings; scaling the attention projections
# makes the logits depend on attention and RoPE, so that a wrong q/k layout shows in the parity figures.
ATTENTION_SCALE = 8.0


def make_attention_llama(vocab_size: int, seed: int = 0):
    """``conftest.make_llama`` with its attention projections scaled by :data:`ATTENTION_SCALE`."""
    import torch

    model = make_llama(vocab_size, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.self_attn.o_proj,
            ):
                proj.weight.mul_(ATTENTION_SCALE)
    return model


def save_checkpoint(directory: Path, tokenizer=None, seed: int = 0) -> Path:
    """A Hugging Face checkpoint of an attention-dependent tiny Llama with the conftest tokenizer."""
    tokenizer = tokenizer or make_tokenizer()
    model = make_attention_llama(len(tokenizer), seed=seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def run_export(*argv: str, formats=None) -> int:
    """``edgedistill export ARGV`` through the two functions the CLI registers (with another format registry when
    ``formats`` is given)."""
    from edgedistill.export.cli import add_args, run
    from edgedistill.export.registry import FORMATS

    formats = formats if formats is not None else FORMATS
    parser = argparse.ArgumentParser(prog="edgedistill export")
    add_args(parser, formats)
    return run(parser.parse_args(list(argv)), formats)


def last_json_line(stdout: str) -> dict:
    """The compact JSON document on the last line of the command's stdout."""
    return json.loads(stdout.strip().splitlines()[-1])


def read_manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def inverse_permute_rotary(weight, heads: int):
    """Undo ``export.gguf.permute_rotary`` (interleaved -> rotate-half), written independently of it."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
