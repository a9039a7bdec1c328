"""Tiny models and tokenizers built in process (no network, deterministic seeds)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. A small model learns from a large one.",
    "Knowledge distillation trains a student to match the teacher's distribution over tokens.",
    "def add(a, b):\n    return a + b  # numbers 0 1 2 3 4 5 6 7 8 9 and <tags> like <think> or </answer>",
    "Temperature softens the teacher's probabilities; alpha mixes cross-entropy with the KL term.",
]


def pytest_configure(config):
    """Converted GGUF teachers (distill/teacher.py) go to a cache of this session's own, not the user's."""
    config._edgedistill_cache = tempfile.mkdtemp(prefix="edgedistill-test-cache-")
    os.environ["EDGEDISTILL_CACHE"] = config._edgedistill_cache


def pytest_unconfigure(config):
    shutil.rmtree(getattr(config, "_edgedistill_cache", ""), ignore_errors=True)


def make_tokenizer(vocab_size: int = 320, corpus: list[str] | None = None):
    """A byte-level BPE tokenizer with ChatML special tokens and chat template, like SmolLM2's, but tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((corpus or TRAINING_TEXT) * 20, trainer=trainer)
    return chatml_tokenizer(tokenizer)


def chatml_tokenizer(backend):
    """A ``tokenizers.Tokenizer`` as transformers' fast tokenizer with SmolLM2's ChatML specials and template."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        chat_template=CHATML,
        clean_up_tokenization_spaces=False,
    )


def make_llama(
    vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, ffn: int = 128
):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config).eval()


def save_teacher(directory: Path, vocab_pad: int = 0, seed: int = 0, **shape) -> Path:
    tokenizer = make_tokenizer()
    model = make_llama(len(tokenizer) + vocab_pad, seed=seed, **shape)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 2-layer, width-64 Llama teacher with a 320-token tokenizer, saved as a Hugging Face checkpoint."""
    return save_teacher(tmp_path_factory.mktemp("teacher"))


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def text_data(tmp_path_factory) -> Path:
    """A jsonl pretraining file with enough documents for a document-level held-out split."""
    sentences = [f"{line} Example number {i}." for i in range(30) for line in TRAINING_TEXT]
    return write_jsonl(tmp_path_factory.mktemp("data") / "text.jsonl", [{"text": s} for s in sentences])


def one_group_shape(path: Path) -> Path:
    """A student shape file prunable from a 2-KV-group teacher with head_dim 16: hidden 32 = 2 heads x 16, one KV
    group, 2 layers, FFN 64."""
    shape = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64
    )
    path.write_text(json.dumps(dict(shape, head_dim=16)))
    return path


@pytest.fixture
def tiny_shape(tmp_path) -> Path:
    path = tmp_path / "student.json"
    path.write_text(
        json.dumps(
            dict(
                hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64
            )
        )
    )
    return path
