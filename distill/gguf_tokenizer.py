"""Build a Hugging Face fast tokenizer from the tokenizer stored inside a GGUF file.

transformers' own GGUF conversion gets byte-level BPE vocabularies wrong in ways that matter for distillation: for
SmolLM2 it reports ``<|im_start|>`` as the EOS token, prepends a BOS id that llama.cpp does not, and installs a
SentencePiece-style decoder (FACTS.md). For ``tokenizer.ggml.model == "gpt2"`` we therefore build the tokenizer
ourselves from the file's tokens, merges, token types and special ids with the ``tokenizers`` library; other
tokenizer models fall back to transformers' conversion with the special ids corrected from the file. The file is
read by the shared core's GGUF reader (:mod:`edgedistill.gguf_header`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgedistill.gguf_header import read_gguf_metadata

# llama.cpp token types (gguf.TokenType): CONTROL and USER_DEFINED tokens are never split by the pre-tokenizer.
_CONTROL, _USER_DEFINED = 3, 4


def _pre_tokenizers(pre: str) -> list[Any] | None:
    """The Hugging Face pre-tokenizer sequence for a llama.cpp ``tokenizer.ggml.pre`` name we know to be exact."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    table = {
        # SmolLM2's tokenizer.json: single digits, then GPT-2's byte-level split.
        "smollm": [pre_tokenizers.Digits(individual_digits=True), byte_level],
        "gpt-2": [byte_level],
        "default": [byte_level],
    }
    return table.get(pre)


def tokenizer_from_gguf(path: str | Path) -> Any:
    """A ``PreTrainedTokenizerFast`` equivalent to the tokenizer llama.cpp builds from ``path``."""
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    meta = read_gguf_metadata(path, "tokenizer.")
    model = meta.get("tokenizer.ggml.model")
    pre_sequence = _pre_tokenizers(meta.get("tokenizer.ggml.pre", "default"))
    if model == "gpt2" and pre_sequence is not None:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(meta, pre_sequence))
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    tokenizer.bos_token = token("bos")
    tokenizer.eos_token = token("eos")
    tokenizer.unk_token = token("unknown")
    tokenizer.pad_token = token("padding") or tokenizer.eos_token
    if "tokenizer.chat_template" in meta:
        tokenizer.chat_template = meta["tokenizer.chat_template"]
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def _byte_level_bpe(meta: dict[str, Any], pre_sequence: list[Any]) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    vocab = {text: index for index, text in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(pre_sequence)
    tokenizer.decoder = decoders.ByteLevel()
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(single=f"{tokens[bos_id]} $A", special_tokens=[(tokens[bos_id], bos_id)]),
            ]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [
        AddedToken(text, special=kind == _CONTROL, normalized=False)
        for text, kind in zip(tokens, types)
        if kind in (_CONTROL, _USER_DEFINED)
    ]
    tokenizer.add_tokens(added)
    return tokenizer
